"""The main table: each condition's core evaluation (test items + decoupling pairs), its rates, and their assembly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from gradsense import stats
from gradsense.decoupling import run_decoupling
from gradsense.describer import Describer
from gradsense.evaluate import ANSWER_RECALL, METRICS, describe_items

# The main table's metrics: name → column of a scored test frame / of a decoupling frame.
CORE_TEST = {m: METRICS[m] for m in ("domain accuracy", ANSWER_RECALL, "'from' recall", "names a domain")}
CORE_DECOUPLING = {
    "decoupling success": "success",
    "decoupling leakage": "leakage",
    "answer recall in the passage": "answer_ok",
    "'to' from the passage": "to_from_passage",
}
RATE_COLUMNS = ["group", "condition", "metric", "estimate", "low", "high", "n", "n_clusters", "ci", "excluded"]
PAIRED_COLUMNS = ["vs", "difference", "diff_low", "diff_high", "n_paired"]  # against a reference on the same rows
SEED_COLUMNS = ["seed_mean", "seed_sd", "seeds"]  # the pooled rows: each seed's estimate, as its own spread
COLUMNS = [*RATE_COLUMNS, *PAIRED_COLUMNS, *SEED_COLUMNS]  # the long form's columns

# Groups of the main table's rows (controls are group `gradsense.controls.GROUP`).
MAIN_RESULT = "main result"
SEED = "seed"
MAIN_ON_SUBSET = "main on subset"
ABLATION = "ablation"
TRANSFER = "transfer"
DIRECTION = "direction"
DIRECTIONS = {"correct": "correcting an error", "counterfactual": "pushing a counterfactual"}
POOLED = "seeds pooled"  # the end of the pooled main result's condition name

Pair = tuple[pd.DataFrame | None, pd.DataFrame | None]  # (scored test items, scored decoupling rows) of one run


def core_evaluation(
    describer: Describer,
    vectors: np.ndarray,
    items: pd.DataFrame,
    test: pd.DataFrame,
    plan: pd.DataFrame,
    control: str = "gradient",
    test_contexts: Sequence[str | None] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 0,
    domains: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The main table's two evaluations of one describer: held-out `test` items (no passage unless `test_contexts`)
    and the decoupling `plan` (passage A, vector of domain B); `vectors` (N, d) are what the projector reads
    (gradients, or steering vectors for the transfer rows); `domains` as in `score_descriptions`."""
    options = {"seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    scored = describe_items(describer, vectors, test, control, test_contexts, domains=domains, **options)
    decoupled = run_decoupling(describer, vectors, plan, items, describer.tokenizer, control=control, **options)
    return scored, decoupled


def core_rates(
    scored: pd.DataFrame | None, decoupled: pd.DataFrame | None, n_boot: int = 1000, seed: int = 0, **keys: object
) -> list[dict]:
    """Rows of the main table for one condition: CORE_TEST rates on the test items and CORE_DECOUPLING rates on
    the decoupling pairs, each with its 95% CI (`gradsense.stats.rate_interval`): test rows clustered by item (an
    item scored under several seeds is one unit), decoupling rows by passage (a missing or empty part gives no rows)."""
    rows = []
    if scored is not None and len(scored):
        values = {metric: scored[column].to_numpy() for metric, column in CORE_TEST.items()}
        rows += stats.rate_rows(values, n_boot, seed, clusters=scored.get("id"), **keys)
    if decoupled is not None and len(decoupled):
        values = {metric: decoupled[column].to_numpy() for metric, column in CORE_DECOUPLING.items()}
        rows += stats.rate_rows(values, n_boot, seed, clusters=decoupled.get("context"), **keys)
    return rows


def condition_rows(runs: Mapping[str, Pair], n_boot: int = 1000, seed: int = 0, **keys: object) -> list[dict]:
    """`core_rates` of every run, its name as the condition (`keys` added to every row)."""
    return [row for name, (s, d) in runs.items() for row in core_rates(s, d, n_boot, seed, condition=name, **keys)]


def run_rows(runs: Mapping[tuple[str, str], Pair], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """`core_rates` of every run, keyed (group, condition)."""
    return [
        row
        for (group, name), (s, d) in runs.items()
        for row in core_rates(s, d, n_boot, seed, condition=name, group=group)
    ]


def per_item_table(runs: Mapping[str | tuple[str, ...], Pair], keys: Sequence[str]) -> pd.DataFrame:
    """Every run's scored frames stacked, with its key columns (`keys` name the parts of each run's key, a string
    key is one part) and `part` = test | decoupling (a missing part is skipped)."""
    return pd.concat(
        [
            frame.assign(**dict(zip(keys, key if isinstance(key, tuple) else (key,))), part=part)
            for key, pair in runs.items()
            for part, frame in zip(("test", "decoupling"), pair)
            if frame is not None
        ],
        ignore_index=True,
    )


def _paired(frame: pd.DataFrame) -> pd.DataFrame:
    """A scored frame keyed for pairing: its item id and the occurrence of that id (rows in plan order)."""
    return frame.assign(occurrence=frame.groupby("id").cumcount())


def paired_rates(pair: Pair, reference: Pair, n_boot: int = 1000, seed: int = 0, **keys: object) -> list[dict]:
    """Per core metric: mean(run − reference) over the rows both scored (the same items; decoupling rows the same
    planned pairs, in plan order), with its CI clustered as in `core_rates` (test by item, decoupling by the
    reference's passage); a part or metric either side lacks gives no row."""
    rows = []
    for frame, ref, metrics, cluster in zip(pair, reference, (CORE_TEST, CORE_DECOUPLING), ("id", "context")):
        if frame is None or ref is None or not len(frame) or not len(ref):
            continue
        columns = [c for c in metrics.values() if c in frame.columns and c in ref.columns]
        left = _paired(frame)[["id", "occurrence", *columns]]
        right = _paired(ref)[list(dict.fromkeys(["id", "occurrence", cluster, *columns]))]
        merged = left.merge(right, on=["id", "occurrence"])
        for metric, c in metrics.items():
            if c in columns and len(merged):
                a, b = merged[f"{c}_x"].astype(float), merged[f"{c}_y"].astype(float)
                rows.append(
                    {**keys, "metric": metric, **stats.paired_difference(a, b, merged[cluster], n_boot, seed=seed)}
                )
    return rows


def paired_rows(
    runs: Mapping[tuple[str, str], Pair],
    references: Mapping[tuple[str, str], str],
    reference_pairs: Mapping[str, Pair],
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """`paired_rates` of every run keyed (group, condition) that `references` maps to a reference name (its pair in
    `reference_pairs`), as rows with `vs` = that name."""
    rows = [
        row
        for key, name in references.items()
        for row in paired_rates(runs[key], reference_pairs[name], n_boot, seed, group=key[0], condition=key[1], vs=name)
    ]
    return pd.DataFrame(rows, columns=["group", "condition", "metric", *PAIRED_COLUMNS])


def with_paired(rates: pd.DataFrame, paired: pd.DataFrame) -> pd.DataFrame:
    """Rate rows with their paired difference (by group, condition, metric) where there is one."""
    keys = ["group", "condition", "metric"]
    return rates.drop(columns=[c for c in PAIRED_COLUMNS if c in rates.columns]).merge(paired, on=keys, how="left")


def pooled_condition(n_seeds: int) -> str:
    """The main result's condition name when `n_seeds` describers are pooled."""
    return f"describer, {n_seeds} {POOLED}"


def pool(pairs: Sequence[Pair]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test, decoupling) frames of several runs stacked: the rows of a pooled rate are (item, seed) pairs."""
    return (
        pd.concat([s for s, _ in pairs], ignore_index=True),
        pd.concat([d for _, d in pairs], ignore_index=True),
    )


def seeds_table(seed_runs: Mapping[str, Pair], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The main result per seed (conditions = the keys) and pooled over seeds (`pooled_condition`: CIs cluster an
    item's rows over seeds, and each metric's seed_mean ± seed_sd over the single-seed estimates), group
    MAIN_RESULT."""
    single = pd.DataFrame(condition_rows(seed_runs, n_boot, seed))
    pooled_test, pooled_decoupled = pool(list(seed_runs.values()))
    pooled = pd.DataFrame(
        core_rates(pooled_test, pooled_decoupled, n_boot, seed, condition=pooled_condition(len(seed_runs)))
    )
    spread = {m: stats.seed_spread(part["estimate"]) for m, part in single.groupby("metric", sort=False)}
    pooled = pooled.assign(**{c: [spread[m][c] for m in pooled["metric"]] for c in SEED_COLUMNS})
    return pd.concat([single, pooled], ignore_index=True).assign(group=MAIN_RESULT)


def seed_spread(seeds: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation, min and max of each metric's estimate over the single-seed rows of `seeds_table`."""
    single = seeds[~seeds["condition"].str.endswith(POOLED)]
    return single.groupby("metric", sort=False)["estimate"].agg(["mean", "std", "min", "max"])


def direction_rows(
    pooled_test: pd.DataFrame,
    pooled_decoupled: pd.DataFrame,
    items: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """The pooled main result split by the item's direction (correcting an error vs pushing a counterfactual), group
    DIRECTION; decoupling rows take the direction of their gradient's item (`items` by id)."""
    rows = []
    for direction, label in DIRECTIONS.items():
        s = pooled_test[pooled_test["direction"] == direction]
        d = pooled_decoupled[pooled_decoupled["id"].isin(items.loc[items["direction"] == direction, "id"])]
        rows += core_rates(s, d, n_boot, seed, condition=f"{label} ({POOLED})", group=DIRECTION)
    return rows


def main_table_long(seeds: pd.DataFrame, *parts: pd.DataFrame) -> pd.DataFrame:
    """The main table in long form: the pooled main result of `seeds_table`, then every row of `parts` (controls,
    ablations), restricted to the core metrics."""
    pooled = seeds[seeds["condition"].str.endswith(POOLED)]
    long = pd.concat([pooled, *parts], ignore_index=True).reindex(columns=COLUMNS)
    return long.loc[long["metric"].isin([*CORE_TEST, *CORE_DECOUPLING])].reset_index(drop=True)


def main_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Wide form of core rate rows: one row per (group, condition), "estimate [low, high]" per metric."""
    cell = rates.assign(
        value=[f"{e:.2f} [{lo:.2f}, {hi:.2f}]" for e, lo, hi in zip(rates["estimate"], rates["low"], rates["high"])]
    )
    order = list(dict.fromkeys(zip(cell["group"], cell["condition"])))
    wide = cell.pivot_table(index=["group", "condition"], columns="metric", values="value", aggfunc="first")
    metrics = [m for m in [*CORE_TEST, *CORE_DECOUPLING] if m in wide.columns]
    return (
        wide.reindex(pd.MultiIndex.from_tuples(order, names=["group", "condition"]))[metrics]
        .fillna("n/a")
        .reset_index()
    )


def paired_table(long: pd.DataFrame) -> pd.DataFrame:
    """Wide form of the paired differences: one row per (group, condition, vs), "Δ [low, high]" per core metric."""
    rows = long.dropna(subset=["difference"])
    cell = rows.assign(
        value=[
            f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            for d, lo, hi in zip(rows["difference"], rows["diff_low"], rows["diff_high"])
        ]
    )
    keys = ["group", "condition", "vs"]
    order = list(dict.fromkeys(zip(*(cell[k] for k in keys))))
    wide = cell.pivot_table(index=keys, columns="metric", values="value", aggfunc="first")
    metrics = [m for m in [*CORE_TEST, *CORE_DECOUPLING] if m in wide.columns]
    index = pd.MultiIndex.from_tuples(order, names=keys)
    return wide.reindex(index)[metrics].fillna("n/a").reset_index()


def main_result(long: pd.DataFrame) -> pd.DataFrame:
    """The main result's rows of the long main table (the pooled describer), indexed by metric."""
    return long[long["group"] == MAIN_RESULT].set_index("metric")
