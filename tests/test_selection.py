"""gradsense.selection: choices read validation rows only."""

import pandas as pd
import pytest

from gradsense import selection as sl
from gradsense.errors import GradsenseError

ITEMS = pd.DataFrame({"id": ["v0", "v1", "v2", "t0", "t1"], "split": ["val", "val", "val", "test", "test"]})


def scored(ids, answer_ok, domain_ok=None) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "answer_ok": answer_ok, "domain_ok": domain_ok or [True] * len(ids)})


def test_choose_picks_the_best_on_validation_in_order_of_the_criteria():
    table = sl.selection_table(
        {
            "a": scored(["v0", "v1", "v2"], [True, False, False]),
            "b": scored(["v0", "v1", "v2"], [True, True, False], [True, False, False]),
            "c": scored(["v0", "v1", "v2"], [True, True, False]),  # same answers as b, better domain
        },
        ITEMS,
        n_boot=50,
    )
    assert set(table["split"]) == {"val"} and sl.choose(table) == "c"


def test_selection_never_reads_a_test_row():
    # a candidate that looks best only because it was scored on test items is refused, not chosen
    poisoned = {"good on test": scored(["t0", "t1"], [True, True]), "val": scored(["v0", "v1"], [False, True])}
    with pytest.raises(GradsenseError, match="only validation items; 't0'"):
        sl.selection_table(poisoned, ITEMS, n_boot=20)
    with pytest.raises(GradsenseError, match="not one"):
        sl.validation_only(scored(["v0", "zz"], [True, True]), ITEMS)  # an unknown item is not validation either
    table = sl.selection_table({"val": poisoned["val"]}, ITEMS, n_boot=20)
    with pytest.raises(GradsenseError, match="validation rows only"):
        sl.choose(table.assign(split="test"))
