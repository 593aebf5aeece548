"""Confidence intervals that resample the unit that was sampled: a cluster bootstrap (scipy), Wilson intervals near
0 and 1, paired differences, means over folds, and rate rows that carry them with their method."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

LEVEL = 0.95
NEAR = 0.05  # a 0/1 rate within this of 0 or 1 gets a Wilson interval (a percentile bootstrap collapses there)
BOOTSTRAP = "percentile bootstrap over rows"
CLUSTER_BOOTSTRAP = "percentile cluster bootstrap"
WILSON = "Wilson (n = clusters)"
STRATIFIED = "percentile bootstrap within folds"


def _codes(n: int, clusters: Sequence | np.ndarray | None) -> np.ndarray:
    """Integer cluster codes of `n` rows (None: every row its own cluster)."""
    if clusters is None:
        return np.arange(n)
    clusters = np.asarray(clusters)
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} values")
    return pd.factorize(pd.Series(clusters, dtype=object))[0]


def _ratio(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """The pooled mean of resampled clusters: their summed values over their summed rows."""
    return np.sum(sums, axis=axis) / np.sum(counts, axis=axis)


def _mean_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean of the samples' means (each fold weighs the same)."""
    return np.mean([x.mean(axis=axis) for x in samples], axis=0)


def _percentile(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    estimate: float,
    n_boot: int,
    level: float,
    seed: int,
    paired: bool = False,
) -> tuple[float, float, float]:
    """(estimate, low, high): scipy's percentile bootstrap of a vectorized `statistic`, the interval widened to hold
    the estimate."""
    result = sps.bootstrap(
        data,
        statistic,
        paired=paired,
        vectorized=True,
        n_resamples=n_boot,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return estimate, float(min(low, estimate)), float(max(high, estimate))


def cluster_bootstrap(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence | np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the rows and its percentile interval from resampling whole clusters (rows that
    share a label: an item over seeds, a passage read many times); `clusters` None resamples rows."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return (float("nan"),) * 3
    codes = _codes(len(v), clusters)
    sums, counts = np.bincount(codes, weights=v), np.bincount(codes).astype(float)
    estimate = float(v.mean())
    if len(sums) < 2 or np.ptp(sums / counts) == 0:
        return estimate, estimate, estimate
    return _percentile((sums, counts), _ratio, estimate, n_boot, level, seed, paired=True)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, level: float = LEVEL, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high) with the percentile bootstrap over rows (each row sampled once)."""
    return cluster_bootstrap(values, None, n_boot, level, seed)


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of `successes` out of `n` (never [0, 0] at 0 nor [1, 1] at 1)."""
    if n <= 0:
        return float("nan"), float("nan")
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def is_binary(values: np.ndarray) -> bool:
    """Whether every value is 0 or 1."""
    return bool(np.isin(values, (0.0, 1.0)).all())


def near_edge(values: np.ndarray, estimate: float) -> bool:
    """Whether a rate gets a Wilson interval: 0/1 values whose estimate lies within NEAR of 0 or 1."""
    return len(values) > 0 and is_binary(values) and min(estimate, 1 - estimate) <= NEAR


def _wilson_around(estimate: float, n: int, level: float) -> tuple[float, float]:
    """The Wilson interval of a rate `estimate` over `n` units, widened to hold the estimate."""
    low, high = wilson_interval(round(estimate * n), n, level)
    return min(low, estimate), max(high, estimate)


def rate_interval(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence | np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = LEVEL,
    seed: int = 0,
) -> dict:
    """estimate, low, high, n, n_clusters and ci (the method) of a rate: the cluster bootstrap, or for a 0/1 rate
    within NEAR of 0 or 1 the Wilson interval with the clusters as n (conservative when rows repeat)."""
    v = np.asarray(values, dtype=float)
    codes = _codes(len(v), clusters)
    n_clusters = int(codes.max()) + 1 if len(v) else 0
    if len(v) and near_edge(v, float(v.mean())):
        estimate, (low, high), method = float(v.mean()), _wilson_around(float(v.mean()), n_clusters, level), WILSON
    else:
        estimate, low, high = cluster_bootstrap(v, codes, n_boot, level, seed)
        method = BOOTSTRAP if clusters is None or n_clusters == len(v) else CLUSTER_BOOTSTRAP
    return {"estimate": estimate, "low": low, "high": high, "n": len(v), "n_clusters": n_clusters, "ci": method}


def rate_rows(
    values: Mapping[str, Sequence[float] | np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    clusters: Sequence | np.ndarray | None = None,
    **keys: object,
) -> list[dict]:
    """One row per metric (`rate_interval` of its values, NaN rows left out and counted as `excluded`), plus the key
    columns; `clusters` labels the rows (shared by every metric)."""
    rows = []
    for metric, v in values.items():
        v = np.asarray(v, dtype=float)
        keep = ~np.isnan(v)
        labels = None if clusters is None else np.asarray(clusters)[keep]
        interval = rate_interval(v[keep], labels, n_boot, seed=seed)
        rows.append({**keys, "metric": metric, **interval, "excluded": int((~keep).sum())})
    return rows


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    clusters: Sequence | np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = LEVEL,
    seed: int = 0,
) -> dict:
    """mean(a − b) over rows scored both ways (the same items) with its cluster-bootstrap interval: difference,
    diff_low, diff_high, n_paired (rows where either is NaN are dropped)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"paired difference of {len(a)} and {len(b)} rows")
    keep = ~(np.isnan(a) | np.isnan(b))
    labels = None if clusters is None else np.asarray(clusters)[keep]
    diff, low, high = cluster_bootstrap(a[keep] - b[keep], labels, n_boot, level, seed)
    return {"difference": diff, "diff_low": low, "diff_high": high, "n_paired": int(keep.sum())}


def mean_over_folds(
    folds: Sequence[Sequence[float] | np.ndarray], n_boot: int = 1000, level: float = LEVEL, seed: int = 0
) -> tuple[float, float, float]:
    """(mean of the folds' means, low, high): items resampled within each fold (each fold weighs the same); a 0/1
    rate within NEAR of 0 or 1 gets the Wilson interval of all the folds' items instead."""
    samples = [np.asarray(f, dtype=float) for f in folds]
    if not samples or any(len(s) == 0 for s in samples):
        return (float("nan"),) * 3
    estimate = float(np.mean([s.mean() for s in samples]))
    if near_edge(np.concatenate(samples), estimate):
        return estimate, *_wilson_around(estimate, sum(map(len, samples)), level)
    if all(np.ptp(s) == 0 for s in samples):
        return estimate, estimate, estimate
    return _percentile(tuple(samples), _mean_of_means, estimate, n_boot, level, seed)


def seed_spread(estimates: Sequence[float] | np.ndarray) -> dict:
    """Mean and standard deviation (ddof 1) of one metric's estimates over seeds, with their count."""
    e = np.asarray(estimates, dtype=float)
    return {
        "seed_mean": float(e.mean()),
        "seed_sd": float(e.std(ddof=1)) if len(e) > 1 else float("nan"),
        "seeds": len(e),
    }
