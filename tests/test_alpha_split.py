"""The labelling α is chosen on validation items: `oracle.sweep_items` takes only split == "val" rows, and the
α rule (`choose_alpha`) on their sweep never reads a test (or training) row."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradsense.errors import GradsenseError
from gradsense.oracle import choose_alpha, sweep_items
from gradsense.sampling import stratified

ALPHAS = [0.01, 0.03, 0.1]
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "src" / "03_oracle.py"


def items_frame(seed: int = 0, n: int = 120) -> pd.DataFrame:
    """Synthetic items over three splits × two directions × three domains, each with a per-item gain scale."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": [f"item{i}" for i in range(n)],
            "split": rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2]),
            "direction": rng.choice(["correct", "counterfactual"], n),
            "domain": rng.choice(["history", "biology", "sport"], n),
            "gain": rng.uniform(0.0, 4.0, n),
        }
    )


def fake_sweep(frame: pd.DataFrame) -> pd.DataFrame:
    """A stand-in for `virtual_steps` on `frame`'s rows: Δlog p(target) = gain · α / max α for every control."""
    rows = [
        {"id": r.id, "control": control, "alpha": a, "dlogp_target": r.gain * a / max(ALPHAS) * (control == "gradient")}
        for r in frame.itertuples()
        for control in ("gradient", "opposite", "random")
        for a in [0.0, *ALPHAS]
    ]
    return pd.DataFrame(rows)


def altered(items: pd.DataFrame, splits: tuple[str, ...]) -> pd.DataFrame:
    """The same frame with every value of the rows of `splits` changed (their gains and groups), and more rows of
    those splits in front."""
    out = items.copy()
    hit = out["split"].isin(splits)
    out.loc[hit, "gain"] = 100.0
    out.loc[hit, "domain"] = "geography"
    out.loc[hit, "direction"] = "correct"
    extra = out[hit].assign(id=lambda f: f["id"] + "-copy")
    return pd.concat([extra, out]).reset_index(drop=True)


@pytest.mark.parametrize("n", [None, 1, 5, 12, 1000])
@pytest.mark.parametrize("seed", [0, 3])
def test_the_sweep_holds_validation_rows_only(n, seed):
    items = items_frame()
    chosen = sweep_items(items, n, seed)
    assert set(chosen["split"]) == {"val"}  # never a test or training row
    val = items[items["split"] == "val"]
    assert len(chosen) == (len(val) if n is None else min(n, len(val)))
    # The draws of the notebook's stratified sample (direction × domain, even), on the validation rows.
    even = stratified(val, ["direction", "domain"], n, order="shuffle_groups", fill="even", seed=seed)
    pd.testing.assert_frame_equal(chosen, even)
    if n is not None and n >= 6:  # enough for every direction × domain group
        assert chosen.groupby(["direction", "domain"]).ngroups == val.groupby(["direction", "domain"]).ngroups


def test_the_sweep_ignores_test_and_training_rows():
    items = items_frame()
    chosen = sweep_items(items, 8, 0)
    for splits in [("test",), ("train",), ("train", "test")]:
        again = sweep_items(altered(items, splits), 8, 0)
        assert again["id"].tolist() == chosen["id"].tolist()
        pd.testing.assert_frame_equal(again.reset_index(drop=True), chosen.reset_index(drop=True))


def test_no_validation_rows_is_a_one_line_error():
    items = items_frame()
    with pytest.raises(GradsenseError, match="validation") as err:
        sweep_items(items[items["split"] != "val"], 10, 0)
    assert "\n" not in str(err.value)


def test_choose_alpha_on_the_sweep_never_reads_test_rows():
    items = items_frame()
    chosen = choose_alpha(fake_sweep(sweep_items(items, 10, 0)), 1.0)
    for splits in [("test",), ("train", "test")]:
        again = choose_alpha(fake_sweep(sweep_items(altered(items, splits), 10, 0)), 1.0)
        assert again == chosen
    # The check can fail: the rule does read the validation rows' values.
    val_changed = choose_alpha(fake_sweep(sweep_items(altered(items, ("val",)), 10, 0)), 1.0)
    assert val_changed != chosen


def test_the_oracle_notebook_sweeps_validation_items():
    source = NOTEBOOK.read_text()
    assert "sweep_frame = oracle.sweep_items(items, sweep_items, seed)" in source
    assert 'items["split"] == "train"' not in source and "training items" not in source
