"""The one stratified sampler, on small frames whose selections are worked out by hand."""

import pandas as pd
import pytest

from gradsense.errors import GradsenseError
from gradsense.sampling import stratified


def picked(frame: pd.DataFrame, *args, **kwargs) -> list[int]:
    """The index labels `stratified` keeps."""
    return stratified(frame, *args, **kwargs).index.tolist()


def test_head_per_group_in_frame_order():
    frame = pd.DataFrame({"domain": list("abaabc")})
    # a: rows 0, 2, 3 → first two; b: rows 1, 4; c: row 5.
    assert picked(frame, "domain", per_group=2) == [0, 1, 2, 4, 5]


def test_within_strata_are_taken_round_robin():
    frame = pd.DataFrame({"domain": ["a"] * 4, "relation": ["r1", "r1", "r1", "r2"]})
    # The first fact of each template (rows 0 and 3) before the second of any; a plain head would give [0, 1].
    assert picked(frame, "domain", per_group=2, within="relation") == [0, 3]


def test_order_by_a_key_column():
    frame = pd.DataFrame({"domain": ["a"] * 4, "key": [3, 1, 2, 0]})
    assert picked(frame, "domain", per_group=2, order=["key"]) == [1, 3]  # the two smallest keys, frame order kept


def test_whole_units_are_kept_together():
    frame = pd.DataFrame({"fact_id": ["f1", "f1", "f2", "f2", "f3", "f3"], "domain": list("aaaabb")})
    assert picked(frame, "domain", per_group=1, unit="fact_id") == [0, 1, 4, 5]


def test_total_round_robin_over_groups():
    frame = pd.DataFrame({"domain": list("aaabc")})
    assert picked(frame, "domain", 3) == [0, 3, 4]  # one of each domain first
    assert picked(frame, "domain", 4) == [0, 1, 3, 4]  # then a's second row


def test_seeded_shuffle_then_round_robin():
    frame = pd.DataFrame({"domain": list("aaabbb")})
    # default_rng(0).permutation(6) = [3, 2, 5, 4, 0, 1]: b, a, b, b, a, a → round-robin 3, 2, 5, …
    assert picked(frame, "domain", 3, order="shuffle", seed=0) == [2, 3, 5]


def test_even_fill_draws_per_group():
    frame = pd.DataFrame({"domain": list("aaaab")})
    # ⌈3 / 2⌉ = 2 per group; RandomState(0).permutation(4) = [2, 3, 1, 0] draws a's rows 2, 3; b has only row 4.
    assert picked(frame, "domain", 3, order="shuffle_groups", fill="even", seed=0) == [2, 3, 4]


def test_even_fill_trims_with_a_seeded_draw():
    frame = pd.DataFrame({"domain": list("aabbcc")})
    # One per group (RandomState(0).permutation(2) = [1, 0]): rows 1, 3, 5; then RandomState(0).permutation(3)[:2]
    # = [2, 1] keeps the 3rd and 2nd of those: rows 5 and 3.
    assert picked(frame, "domain", 2, order="shuffle_groups", fill="even", seed=0) == [3, 5]


def test_even_fill_with_whole_groups_trims_in_frame_order():
    frame = pd.DataFrame({"domain": list("bac")})
    # Every group comes back whole, so (as pandas did) the trim draws positions [2, 1] of the frame order: rows 2, 1.
    # Drawing in group order (a, b, c) instead would keep rows 2 and 0.
    assert picked(frame, "domain", 2, order="shuffle_groups", fill="even", seed=0) == [1, 2]


def test_enough_room_keeps_every_row_and_the_index():
    frame = pd.DataFrame({"domain": list("aaaab")}, index=[10, 11, 12, 13, 14])
    assert picked(frame, "domain", 5, order="shuffle_groups", fill="even") == [10, 11, 12, 13, 14]
    assert picked(frame, "domain") == [10, 11, 12, 13, 14]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "sample size"),
        ({"per_group": -1}, "per-group size"),
        ({"order": "random"}, "order must be"),
        ({"fill": "uneven", "n": 1}, "fill must be"),
        ({"within": "relation"}, "within columns"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(GradsenseError, match=match):
        stratified(pd.DataFrame({"domain": list("ab")}), "domain", **kwargs)


def test_unknown_group_column():
    with pytest.raises(GradsenseError, match="group columns"):
        stratified(pd.DataFrame({"domain": list("ab")}), "split", 1)
