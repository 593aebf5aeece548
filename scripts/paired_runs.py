"""Paired differences between two evaluate runs on the same items (run by hand; not a stage).

Usage: python scripts/paired_runs.py EVALUATE_A EVALUATE_B [OUT.csv]
Each argument is an evaluate stage's output folder (results/evaluate/ of one run, copied aside). Rows are matched on
the item and its occurrence in plan order (descriptions: gradient rows of one set), so both runs must come from the
same corrections and evaluation plan. For every set, and for history alone, prints A, B and
A − B with its bootstrap interval (`gradsense.main_table.paired_rates`, as the paper's paired rows: items resampled,
decoupling rows clustered by passage).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from gradsense.main_table import CORE_DECOUPLING, CORE_TEST, paired_rates

DECOUPLING_TABLES = {
    "decoupling: all pairs": "decoupling_items.csv",
    "decoupling: the seed's case": "seed_case_items.csv",
    "decoupling: external sets": "external_decoupling_items.csv",
}


def _read(root: Path, name: str) -> pd.DataFrame:
    """One item table of an evaluate folder (ids as text)."""
    return pd.read_csv(root / name, dtype={"id": str})


def _rows(a: pd.DataFrame, b: pd.DataFrame, part: int, name: str) -> list[dict]:
    """A, B and `main_table.paired_rates` of one set (`part` 0: described items, 1: decoupling rows), for all rows
    and for history's gradients alone."""
    if len(a) != len(b):
        raise SystemExit(f"{name}: the runs scored different rows ({len(a)} and {len(b)})")
    domain, metrics = ("domain", CORE_TEST) if part == 0 else ("gradient_domain", CORE_DECOUPLING)
    rows = []
    for subset, keep in (("all", slice(None)), ("history", a[domain] == "history")):
        x, y = a[keep], b[b["id"].isin(a.loc[keep, "id"])]
        run, reference = ((x, None), (y, None)) if part == 0 else ((None, x), (None, y))
        means = {m: (x[c].astype(float).mean(), y[c].astype(float).mean()) for m, c in metrics.items()}
        for row in paired_rates(run, reference, set=name, rows=subset):
            rows.append({**row, "a": means[row["metric"]][0], "b": means[row["metric"]][1]})
    return rows


def paired_table(a: Path, b: Path) -> pd.DataFrame:
    """Every set's paired differences between evaluate folders `a` and `b`."""
    desc_a, desc_b = (_read(r, "descriptions.csv") for r in (a, b))
    desc_a, desc_b = (d[d["control"] == "gradient"] for d in (desc_a, desc_b))
    rows = []
    for name in sorted(set(desc_a["set"])):
        rows += _rows(desc_a[desc_a["set"] == name], desc_b[desc_b["set"] == name], 0, name)
    for name, table in DECOUPLING_TABLES.items():
        part_a, part_b = _read(a, table), _read(b, table)
        if len(part_a):
            rows += _rows(part_a, part_b, 1, name)
    return pd.DataFrame(rows)


def main(a: str, b: str, out: str | None = None) -> None:
    """Print (and optionally save) the paired table."""
    table = paired_table(Path(a), Path(b))
    if out:
        table.to_csv(out, index=False)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main(*sys.argv[1:4])
