"""gradsense.folds: the held-out-domain rotation's items and its table (per fold, and the mean over folds)."""

import numpy as np
import pandas as pd
import pytest

from gradsense import folds
from gradsense.errors import GradsenseError
from gradsense.evaluate import ANSWER_RECALL


def fold_frame(answer_ok, trip=None) -> pd.DataFrame:
    n = len(answer_ok)
    return pd.DataFrame(
        {
            "id": [f"x{k}" for k in range(n)],
            "answer_ok": answer_ok,
            "pressure": [True] * n,
            "domain_choice": [k % 2 == 0 for k in range(n)],
            "trip": trip if trip is not None else [0.1] * n,
        }
    )


def test_fold_items_take_every_split_of_the_held_out_domain():
    items = pd.DataFrame(
        {
            "domain": ["music"] * 4 + ["history"] * 2,
            "split": ["train", "val", "test", "test", "test", "train"],
            "relation": ["a", "a", "b", "b", "c", "c"],
        }
    )
    got = folds.fold_items(items, "music")
    assert set(got["domain"]) == {"music"} and set(got["split"]) == {"train", "val", "test"}
    assert len(folds.fold_items(items, "music", max_items=2)) == 2
    with pytest.raises(GradsenseError, match="no items of that domain"):
        folds.fold_items(items, "religion")


def test_fold_table_weighs_folds_equally_and_counts_them():
    per_fold = {
        "music": fold_frame([True] * 10),
        "history": fold_frame([False] * 30),
        "religion": fold_frame([True, False] * 10),
    }
    table = folds.fold_table(per_fold, n_boot=200)
    mean = table[(table["fold"] == folds.MEAN) & (table["metric"] == ANSWER_RECALL)].iloc[0]
    assert mean["estimate"] == pytest.approx((1 + 0 + 0.5) / 3)  # not the pooled 20/60
    assert mean["low"] < mean["estimate"] < mean["high"] and mean["n"] == 60 and mean["n_clusters"] == 3
    music = table[(table["fold"] == "music") & (table["metric"] == ANSWER_RECALL)].iloc[0]
    assert music["estimate"] == 1 and music["low"] < 1 and music["ci"].startswith("Wilson")
    assert set(table["n_folds"]) == {3} and set(table["metric"]) == set(folds.METRICS)
    # a round trip missing for an item (no same-template partner) is left out, not counted as 0
    trip = folds.fold_table({"music": fold_frame([True, False], trip=[0.2, np.nan])}, n_boot=50)
    row = trip[(trip["fold"] == "music") & (trip["metric"] == folds.ROUND_TRIP)].iloc[0]
    assert row["estimate"] == pytest.approx(0.2) and row["excluded"] == 1
    with pytest.raises(GradsenseError, match="at least one fold"):
        folds.fold_table({})
