"""External evaluation items: both directions of every external fact, capped per set, gradients at given layers."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradsense import external as ex
from gradsense.errors import GradsenseError
from gradsense.gradients import activation_gradients
from gradsense.scoring import target_text

FACTS = Path(__file__).resolve().parents[1] / "sources" / "facts"


def test_external_items_cover_both_sets_and_directions():
    items = ex.external_items(FACTS)
    facts = {name: len(pd.read_csv(FACTS / file)) for name, file in ex.SETS.items()}
    assert items.groupby("set").size().to_dict() == {name: 2 * n for name, n in facts.items()}
    assert items["id"].is_unique and items["row"].tolist() == list(range(len(items)))
    one = items.iloc[0]
    assert one["prompt"] == one["relation"].replace("{}", one["subject"]).rstrip()
    pair = items[items["fact_id"] == one["fact_id"]].set_index("direction")
    assert pair.loc["correct", "target"] == pair.loc["counterfactual", "source"] == one["right"]


def test_external_items_are_capped_per_set_and_seeded():
    capped = ex.external_items(FACTS, max_items=10, seed=1)
    assert capped.groupby("set").size().tolist() == [10, 10]
    assert capped["id"].tolist() == ex.external_items(FACTS, max_items=10, seed=1)["id"].tolist()
    assert capped[capped["set"] == ex.NEW_PHRASINGS]["domain"].nunique() == 9  # round-robin over the domains


def test_external_passages_and_missing_files(tmp_path):
    passages = ex.external_passages(FACTS)
    assert list(passages.columns) == ["id", "domain", "text"] and len(passages) > 0
    with pytest.raises(GradsenseError, match="missing"):
        ex.external_passages(tmp_path)


def test_external_gradients_are_the_gradients_stage_s(tiny):
    model, tok = tiny
    items = ex.external_items(FACTS, max_items=3).head(4)
    got = ex.external_gradients(model, tok, items, [1, 2], batch_size=2)
    want = activation_gradients(
        model, tok, items["prompt"].tolist(), [target_text(t) for t in items["target"]], [1, 2], progress=False
    ).grads
    assert got.shape == (2, 4, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(GradsenseError, match="no external items"):
        ex.external_gradients(model, tok, items.iloc[:0], [1])
