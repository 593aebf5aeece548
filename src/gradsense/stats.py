"""Bootstrap confidence intervals for rates and other per-item statistics."""

from __future__ import annotations

from collections.abc import Callable

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
