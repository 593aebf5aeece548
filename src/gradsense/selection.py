"""Model selection on the validation split only: the variants' validation rates and the one a researcher keeps."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from gradsense import stats
from gradsense.errors import GradsenseError
from gradsense.evaluate import ANSWER_RECALL

SPLIT = "val"
# What decides, in order: name → column of a scored frame (`gradsense.evaluate.describe_items`).
CRITERIA = {ANSWER_RECALL: "answer_ok", "domain accuracy": "domain_ok"}


def validation_only(frame: pd.DataFrame, items: pd.DataFrame, what: str = "selection") -> pd.DataFrame:
    """`frame` unchanged when every row's item (by `id`) is a validation item of `items`; a one-line error otherwise
    (a choice must never see a test row)."""
    split = items.set_index("id")["split"].reindex(frame["id"])
    if split.isna().any() or (split != SPLIT).any():
        bad = frame["id"][(split != SPLIT).to_numpy()].iloc[0]
        raise GradsenseError(f"{what} may read only validation items; {bad!r} is not one")
    return frame


def selection_table(
    scored: Mapping[str, pd.DataFrame], items: pd.DataFrame, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per candidate (name → its scored validation items), every CRITERIA rate with its CI; column split = val."""
    if not scored:
        raise GradsenseError("selection needs at least one candidate")
    rows = []
    for name, frame in scored.items():
        validation_only(frame, items, f"selection of {name!r}")
        values = {m: frame[c].to_numpy(dtype=float) for m, c in CRITERIA.items()}
        rows += stats.rate_rows(values, n_boot, seed, clusters=frame["id"], candidate=name, split=SPLIT)
    return pd.DataFrame(rows)


def choose(table: pd.DataFrame) -> str:
    """The candidate with the best CRITERIA estimates in order (answer recall, then domain accuracy; first listed
    wins a tie), from validation rows only."""
    if table.empty or (table["split"] != SPLIT).any():
        raise GradsenseError("choose reads a selection table of validation rows only")
    wide = table.pivot_table(index="candidate", columns="metric", values="estimate", sort=False)
    order = list(dict.fromkeys(table["candidate"]))
    ranked = sorted(order, key=lambda c: tuple(-wide.at[c, m] for m in CRITERIA))
    return ranked[0]
