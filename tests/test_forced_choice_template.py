"""Forced choice within the item's relation template: same-template choice sets and scoring them."""

import numpy as np
import pandas as pd
import pytest

from gradsense import forced_choice as fc
from gradsense.errors import GradsenseError

from describer_helpers import describer, grads

# A pool of items: template "t0" has 6 distinct labels, "t1" has 3 (one repeated), "t2" has 1.
POOL = pd.DataFrame(
    {
        "label": [f"domain: history | from: a | to: x{i}" for i in range(6)]
        + ["domain: biology | from: b | to: y0", "domain: biology | from: b | to: y1"] * 2
        + ["domain: biology | from: b | to: y2", None, "domain: sport | from: c | to: z0"],
        "relation": ["t0"] * 6 + ["t1"] * 4 + ["t1", "t1", "t2"],
    }
)
OWN = ["domain: history | from: a | to: x0", "domain: biology | from: b | to: y1", "domain: history | from: a | to: x3"]
OWN_TEMPLATES = ["t0", "t1", "t0"]


def pool_args():
    return POOL["label"].tolist(), POOL["relation"].tolist()


def test_every_distractor_shares_the_template_and_differs_from_the_own_label():
    sets = fc.template_choice_sets(OWN, OWN_TEMPLATES, *pool_args(), n_choices=3, seed=0)
    by_template = POOL.dropna().groupby("relation")["label"].agg(set)
    assert [s[0] for s in sets] == OWN and all(len(s) == 3 for s in sets)
    for choice, template in zip(sets, OWN_TEMPLATES):
        assert len(set(choice)) == 3 and choice[0] not in choice[1:]  # distinct, own label only first
        assert set(choice[1:]) <= by_template[template]


def test_template_choice_sets_are_seeded():
    first = fc.template_choice_sets(OWN, OWN_TEMPLATES, *pool_args(), n_choices=3, seed=0)
    assert first == fc.template_choice_sets(OWN, OWN_TEMPLATES, *pool_args(), n_choices=3, seed=0)
    draws = {str(fc.template_choice_sets(OWN, OWN_TEMPLATES, *pool_args(), n_choices=3, seed=s)) for s in range(8)}
    assert len(draws) > 1  # the seed changes which distractors are drawn


def test_distractor_counts_skip_missing_labels_and_repeats():
    own = [*OWN, "domain: sport | from: c | to: z0", "domain: music | from: d | to: w"]
    counts = fc.template_distractor_counts(own, [*OWN_TEMPLATES, "t2", "t9"], *pool_args())
    assert counts.tolist() == [5, 2, 5, 0, 0]  # t1: y0, y2 besides y1; t2: only the own label; t9: no pool rows


def test_items_that_cannot_fill_a_set_are_an_error_and_can_be_selected_first():
    with pytest.raises(GradsenseError, match=r"1 of 3 items have fewer than 3 other labels .*'t1'"):
        fc.template_choice_sets(OWN, OWN_TEMPLATES, *pool_args(), n_choices=4)
    fits = fc.template_distractor_counts(OWN, OWN_TEMPLATES, *pool_args()) >= 3
    kept = [label for label, ok in zip(OWN, fits) if ok]
    sets = fc.template_choice_sets(kept, [t for t, ok in zip(OWN_TEMPLATES, fits) if ok], *pool_args(), n_choices=4)
    assert [s[0] for s in sets] == [OWN[0], OWN[2]] and all(len(s) == 4 for s in sets)
    assert fc.template_choice_sets([], [], *pool_args(), n_choices=4) == []  # nothing to fill is no error


def test_bad_input_is_a_one_line_error():
    with pytest.raises(GradsenseError, match="lengths must match"):
        fc.template_choice_sets(OWN, OWN_TEMPLATES[:2], *pool_args(), n_choices=3)
    with pytest.raises(GradsenseError, match="lengths must match"):
        fc.template_distractor_counts(OWN, OWN_TEMPLATES, POOL["label"].tolist(), ["t0"])
    with pytest.raises(GradsenseError, match="n_choices ≥ 2"):
        fc.template_choice_sets(OWN, OWN_TEMPLATES, *pool_args(), n_choices=1)


def test_forced_choice_needs_labels_or_sets_of_one_size(tiny):
    model, tok = tiny
    d, g = describer(model, tok), grads(3)
    with pytest.raises(GradsenseError, match="not both"):
        fc.forced_choice(d, g)
    with pytest.raises(GradsenseError, match="not both"):
        fc.forced_choice(d, g, OWN, sets=[[label, "other"] for label in OWN])
    with pytest.raises(GradsenseError, match="same size"):
        fc.forced_choice(d, g, sets=[[OWN[0], "a"], [OWN[1], "b", "c"], [OWN[2], "d"]])
    with pytest.raises(GradsenseError, match="3 sets for 2 gradients"):
        fc.forced_choice(d, g[:2], sets=[[label, "other"] for label in OWN])


def test_forced_choice_scores_precomputed_same_template_sets(tiny):
    model, tok = tiny
    sets = fc.template_choice_sets(OWN, OWN_TEMPLATES, *pool_args(), n_choices=3, seed=0)
    forced = {
        control: fc.forced_choice(describer(model, tok), grads(3), sets=sets, control=control, batch_size=4)
        for control in ("gradient", "none")
    }
    for frame in forced.values():
        assert len(frame) == 3 and frame["rank"].between(0, 2).all()
        assert (frame["correct"] == (frame["rank"] == 0)).all() and np.isfinite(frame["score_own"]).all()
    rows = pd.DataFrame(fc.forced_choice_rows(forced, n_boot=20, metric=fc.TOP_1_TEMPLATE))
    assert rows["metric"].eq(fc.TOP_1_TEMPLATE).all() and rows["control"].tolist() == ["gradient", "none"]
    assert rows["estimate"].between(0, 1).all() and (rows["n"] == 3).all()


def test_precomputed_sets_score_like_the_labels_and_pool_they_came_from(tiny):
    model, tok = tiny
    pool = POOL["label"].dropna().tolist()
    by_labels = fc.forced_choice(describer(model, tok), grads(3), OWN, pool, n_choices=4, seed=1)
    by_sets = fc.forced_choice(describer(model, tok), grads(3), sets=fc.choice_sets(OWN, pool, 4, 1), seed=1)
    pd.testing.assert_frame_equal(by_labels, by_sets)
