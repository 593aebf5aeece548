"""Paired differences between two evaluate runs on the same items (run by hand; not a stage).

Usage: python scripts/paired_runs.py EVALUATE_A EVALUATE_B [OUT.csv]
Each argument is an evaluate stage's output folder (results/evaluate/ of one run, copied aside). Rows are matched on
the item (descriptions: set and id, gradient rows only) or on the item and its passage (decoupling tables), so both
runs must come from the same corrections and evaluation plan. For every set, and for history alone, prints A, B and
A − B with its bootstrap interval (`gradsense.stats.paired_difference`: items resampled; decoupling rows clustered by
passage, as the evaluate stage's own CIs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from gradsense.stats import paired_difference

DESCRIPTION_METRICS = {"domain": "domain_ok", "answer": "answer_ok"}
DECOUPLING_METRICS = {"success": "success", "leakage": "leakage", "answer in passage": "answer_ok"}
DECOUPLING_TABLES = {
    "decoupling: all pairs": "decoupling_items.csv",
    "decoupling: the seed's case": "seed_case_items.csv",
    "decoupling: external sets": "external_decoupling_items.csv",
}


def _rows(a: pd.DataFrame, b: pd.DataFrame, keys: list[str], metrics: dict, name: str, cluster: str | None) -> list:
    """One row per metric: A, B and the paired difference on the rows both runs scored (all, then history)."""
    both = a.merge(b, on=keys, suffixes=("_a", "_b"), validate="one_to_one")
    if len(both) != len(a) or len(both) != len(b):
        raise SystemExit(f"{name}: the runs scored different rows ({len(a)} and {len(b)}, {len(both)} shared)")
    domain = "gradient_domain_a" if "gradient_domain_a" in both else "domain_a"
    out = []
    for part, frame in (("all", both), ("history", both[both[domain] == "history"])):
        for metric, column in metrics.items():
            x, y = frame[f"{column}_a"].astype(float), frame[f"{column}_b"].astype(float)
            clusters = frame[cluster].to_numpy() if cluster else None
            diff = paired_difference(x.to_numpy(), y.to_numpy(), clusters)
            out.append({"set": name, "rows": part, "metric": metric, "a": x.mean(), "b": y.mean(), **diff})
    return out


def paired_table(a: Path, b: Path) -> pd.DataFrame:
    """Every set's paired differences between evaluate folders `a` and `b`."""
    read = lambda root, name: pd.read_csv(root / name, dtype={"id": str})  # noqa: E731
    desc_a, desc_b = (read(r, "descriptions.csv") for r in (a, b))
    desc_a, desc_b = (d[d["control"] == "gradient"] for d in (desc_a, desc_b))
    rows = []
    for name in sorted(set(desc_a["set"])):
        rows += _rows(
            desc_a[desc_a["set"] == name], desc_b[desc_b["set"] == name], ["id"], DESCRIPTION_METRICS, name, None
        )
    for name, table in DECOUPLING_TABLES.items():
        part_a, part_b = read(a, table), read(b, table)
        if len(part_a):
            rows += _rows(part_a, part_b, ["id", "context"], DECOUPLING_METRICS, name, "context")
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
