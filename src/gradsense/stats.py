"""Bootstrap confidence intervals for rates and other per-item statistics, and rate rows that carry them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic over items and its percentile bootstrap interval (items resampled)."""
    values = np.asarray(values)
    if len(values) == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(n_boot, len(values)))
    boots = np.array([statistic(values[row]) for row in draws])
    tail = (1 - level) / 2
    return float(statistic(values)), float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))


def rate_rows(
    values: Mapping[str, Sequence[float] | np.ndarray], n_boot: int = 1000, seed: int = 0, **keys: object
) -> list[dict]:
    """One row per metric: estimate with its bootstrap 95% CI and n, plus the given key columns."""
    rows = []
    for metric, v in values.items():
        v = np.asarray(v, dtype=float)
        est, low, high = bootstrap_ci(v, n_boot=n_boot, seed=seed)
        rows.append({**keys, "metric": metric, "estimate": est, "low": low, "high": high, "n": len(v)})
    return rows
