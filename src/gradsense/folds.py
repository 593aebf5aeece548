"""Held-out-domain rotation: describers each trained without one domain, scored on that domain, and their mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from gradsense import stats
from gradsense.baselines import paired_roundtrip
from gradsense.describer import Describer
from gradsense.errors import GradsenseError
from gradsense.evaluate import ANSWER_RECALL, describe_items
from gradsense.forced_choice import DOMAIN_CHOICE, domain_choice, domain_logprobs
from gradsense.sampling import stratified

ROUND_TRIP = "round trip: described − other answer (cosine)"
# The fold metrics: name → column of `score_fold`'s frame (rates in [0, 1], the round trip a cosine difference).
METRICS = {ANSWER_RECALL: "answer_ok", "names a domain": "pressure", DOMAIN_CHOICE: "domain_choice", ROUND_TRIP: "trip"}
MEAN = "mean over folds"


def fold_items(items: pd.DataFrame, domain: str, max_items: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Every item of the held-out `domain` (all splits: the domain was never trained), capped at `max_items` (seeded,
    stratified over templates)."""
    members = items[items["domain"] == domain]
    if members.empty:
        raise GradsenseError(f"held-out fold {domain!r}: no items of that domain")
    return stratified(members, "relation", max_items, order="shuffle", seed=seed)


def score_fold(
    describer: Describer,
    vectors: np.ndarray,
    members: pd.DataFrame,
    domains: Sequence[str],
    seed: int = 0,
    batch_size: int = 16,
) -> pd.DataFrame:
    """The fold's items (`members`, rows into `vectors`) described under their own gradient and scored: answer
    recall, names a domain, domain forced choice among `domains` (so the unseen name can win) and the round trip
    (cosine of the true gradient with the gradient of the described `to`, minus that of another same-template
    item's answer; NaN without one)."""
    rows = members["row"].to_numpy()
    scored = describe_items(describer, vectors, members, "gradient", None, seed, batch_size, 0, domains=domains)
    choice = domain_choice(domain_logprobs(describer, vectors[rows], domains, batch_size), members["domain"], domains)
    trip = paired_roundtrip(
        describer.model,
        describer.tokenizer,
        members,
        scored["reported_to"].tolist(),
        vectors[rows],
        describer.config.source_layer,
        seed,
        batch_size,
    )
    return scored.assign(domain_choice=choice, trip=(trip["cos_described"] - trip["cos_partner"]).to_numpy())


def fold_table(folds: Mapping[str, pd.DataFrame], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per fold (held-out domain → `score_fold` frame) every METRICS value with its CI over items, then MEAN: the
    mean of the folds' means, items resampled within each fold (`gradsense.stats.mean_over_folds`)."""
    if not folds:
        raise GradsenseError("held-out-domain rotation needs at least one fold")
    rows = []
    for domain, frame in folds.items():
        values = {m: frame[c].to_numpy(dtype=float) for m, c in METRICS.items()}
        rows += stats.rate_rows(values, n_boot, seed, clusters=frame["id"], fold=domain)
    for metric, column in METRICS.items():
        parts = [f[column].dropna().to_numpy(dtype=float) for f in folds.values()]
        est, low, high = stats.mean_over_folds(parts, n_boot, seed=seed)
        rows.append(
            {
                "fold": MEAN,
                "metric": metric,
                "estimate": est,
                "low": low,
                "high": high,
                "n": int(sum(map(len, parts))),
                "n_clusters": len(parts),
                "ci": stats.WILSON if stats.near_edge(np.concatenate(parts), est) else stats.STRATIFIED,
                "excluded": 0,
            }
        )
    table = pd.DataFrame(rows)
    table["n_folds"] = len(folds)
    return table
