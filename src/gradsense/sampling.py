"""One stratified sampler: at most so many rows per group (or in all), drawn in a stated order, table order kept.

Every subset the pipeline takes goes through `stratified`. How the earlier samplers map onto it:

- `corrections.sample_facts(facts, k, seed)`: `stratified(facts, "domain", per_group=k, within="relation",
  order=["relation", key])` with `key` a seeded sha256 column: round-robin over a domain's templates in hash order.
- `gradients.balanced_subset(table, max_items)`: `stratified(table, "domain", per_group=k, unit="fact_id")`: the
  first k facts of each domain in table order (whole facts: every row of a chosen fact).
- `oracle.stratified_sample(frame, n, by, seed)`: `stratified(frame, by, n, order="shuffle_groups", fill="even")`:
  ⌈n / groups⌉ seeded draws per group, then a seeded draw of exactly n of those (the draws of pandas `sample`).
- `evaluate.stratified(frame, n, seed)` / `evaluate._cap`: `stratified(frame, "domain", n, order="shuffle")`: one
  seeded permutation, then round-robin over the domains until n rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from gradsense.errors import GradsenseError

ORDERS = ("keep", "shuffle", "shuffle_groups")
FILLS = ("round_robin", "even")


def _columns(frame: pd.DataFrame, names: str | Sequence[str], what: str) -> list[str]:
    """Column names as a list, each checked to exist."""
    names = [names] if isinstance(names, str) else list(names)
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise GradsenseError(f"stratified sample: {what} columns {missing} are not in the table")
    return names


def _count(value: int | None, what: str) -> int | None:
    """A positive integer or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise GradsenseError(f"{what} must be a positive integer or null, not {value!r}")
    return None if value is None else int(value)


def _draw(frame: pd.DataFrame, order: str | Sequence[str], groups: np.ndarray, seed: int) -> np.ndarray:
    """Row positions in the order rows are drawn."""
    if not isinstance(order, str):
        ranked = frame.reset_index(drop=True).sort_values(_columns(frame, order, "order"), kind="stable")
        return ranked.index.to_numpy()
    if order == "keep":
        return np.arange(len(frame))
    if order == "shuffle":
        return np.random.default_rng(seed).permutation(len(frame))
    if order == "shuffle_groups":
        parts = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        return np.concatenate([p[np.random.RandomState(seed).permutation(len(p))] for p in parts] or [np.arange(0)])
    raise GradsenseError(f"stratified sample: order must be one of {ORDERS} or a list of columns, not {order!r}")


def stratified(
    frame: pd.DataFrame,
    by: str | Sequence[str],
    n: int | None = None,
    *,
    per_group: int | None = None,
    order: str | Sequence[str] = "keep",
    within: str | Sequence[str] = (),
    fill: str = "round_robin",
    unit: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """At most `per_group` rows of each `by` group and at most `n` rows in all, returned in the frame's order.

    Rows are drawn in `order`: "keep" (frame order), "shuffle" (one seeded numpy permutation), "shuffle_groups"
    (each group permuted by its own `RandomState(seed)`), or a list of columns to sort by (e.g. a seeded hash key).
    Within a group, rows are taken round-robin over the `within` strata (the k-th row of every stratum before the
    (k+1)-th of any; ties in draw order). `n` is reached by `fill`: "round_robin" (the k-th row of every group
    before the (k+1)-th of any) or "even" (⌈n / groups⌉ per group, then a seeded random n of those). `n` ≥ the
    number of rows keeps every row. With `unit` (e.g. "fact_id"), whole units are sampled (counted by their first
    row) and every row of a chosen unit is returned. The frame's index is kept.
    """
    n, per_group = _count(n, "sample size"), _count(per_group, "per-group size")
    by = _columns(frame, by, "group")
    within = _columns(frame, within, "within")
    if fill not in FILLS:
        raise GradsenseError(f"stratified sample: fill must be one of {FILLS}, not {fill!r}")
    candidates = frame if unit is None else frame.drop_duplicates(_columns(frame, unit, "unit")[0])
    groups = candidates.groupby(by, sort=True).ngroup().to_numpy()
    draw = _draw(candidates, order, groups, seed)
    strata = pd.Series(candidates.groupby(by + within, sort=True).ngroup().to_numpy()[draw])
    rank = strata.groupby(strata).cumcount().to_numpy()
    sequence = draw[np.argsort(rank, kind="stable")]  # round-robin over the strata (and so over the groups)
    if per_group is not None:
        taken = pd.Series(groups[sequence]).groupby(groups[sequence]).cumcount().to_numpy()
        sequence = sequence[taken < per_group]
    if n is not None and len(candidates) > n and len(sequence) > n:
        if fill == "round_robin":
            sequence = sequence[:n]
        else:
            even = -(-n // len(np.unique(groups)))
            taken = pd.Series(groups[sequence]).groupby(groups[sequence]).cumcount().to_numpy()
            sequence = sequence[taken < even]
            # The survivors in group order (each in draw order), then a seeded draw of n (pandas `sample`). As in
            # pandas `groupby.apply`, when every group comes back whole and in frame order, frame order is used.
            whole = all(
                np.array_equal(sequence[groups[sequence] == g], np.flatnonzero(groups == g)) for g in np.unique(groups)
            )
            sequence = np.sort(sequence) if whole else sequence[np.argsort(groups[sequence], kind="stable")]
            if len(sequence) > n:
                sequence = sequence[np.random.RandomState(seed).permutation(len(sequence))[:n]]
    chosen = candidates.iloc[np.sort(sequence)]
    if unit is None:
        return chosen
    return frame[frame[unit].isin(chosen[unit])]
