"""gradsense.stats: intervals that resample the sampled unit, Wilson near 0 and 1, paired differences, folds."""

import numpy as np
import pytest

from gradsense.stats import (
    CLUSTER_BOOTSTRAP,
    WILSON,
    cluster_bootstrap,
    mean_over_folds,
    paired_difference,
    rate_interval,
    rate_rows,
    seed_spread,
)


def _items(n: int = 60, p: float = 0.4, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_clustered_interval_is_wider_than_rows_when_rows_repeat():
    items = _items()
    rows, clusters = np.repeat(items, 4), np.repeat(np.arange(len(items)), 4)  # each item read 4 times (seeds)
    _, row_low, row_high = cluster_bootstrap(rows, None, 500)
    est, low, high = cluster_bootstrap(rows, clusters, 500)
    assert est == pytest.approx(items.mean())
    assert (high - low) > 1.5 * (row_high - row_low)  # ≈ 2× (√4) when all 4 rows agree
    # ... and the clustered interval of the repeated rows is the interval of the items themselves
    assert (low, high) == pytest.approx(cluster_bootstrap(items, None, 500)[1:], abs=0.03)


def test_wilson_interval_at_zero_and_one_is_not_degenerate():
    zero, one = rate_interval(np.zeros(30)), rate_interval(np.ones(30))
    assert zero["ci"] == one["ci"] == WILSON
    assert zero["low"] == 0 and 0.05 < zero["high"] < 0.2
    assert one["high"] == 1 and 0.8 < one["low"] < 0.95
    # with repeated rows the Wilson n is the number of clusters: wider than with every row counted
    repeated = rate_interval(np.zeros(120), np.repeat(np.arange(30), 4))
    assert repeated["n"] == 120 and repeated["n_clusters"] == 30 and repeated["high"] == pytest.approx(zero["high"])


def test_rate_interval_names_its_method_and_counts():
    values = np.repeat(_items(), 2)
    row = rate_interval(values, np.repeat(np.arange(60), 2))
    assert row["ci"] == CLUSTER_BOOTSTRAP and row["n"] == 120 and row["n_clusters"] == 60
    assert row["low"] < row["estimate"] < row["high"]
    with pytest.raises(ValueError, match="cluster labels"):
        rate_interval(values, np.arange(3))


def test_rate_rows_leave_out_nan_rows_and_count_them():
    rows = rate_rows({"leakage": [1.0, 0.0, np.nan, 0.0], "success": [1, 1, 0, 1]}, 100, 0, kind="x")
    leakage, success = rows
    assert leakage["n"] == 3 and leakage["excluded"] == 1 and leakage["estimate"] == pytest.approx(1 / 3)
    assert success["n"] == 4 and success["excluded"] == 0 and leakage["kind"] == "x"


def test_paired_difference_is_tighter_than_unpaired_for_correlated_scores():
    a = _items(200, 0.5, seed=1)
    b = a.copy()
    b[:20] = 1 - b[:20]  # the same items, 20 flipped
    paired = paired_difference(a, b, n_boot=500)
    assert paired["difference"] == pytest.approx(a.mean() - b.mean())
    width = paired["diff_high"] - paired["diff_low"]
    _, la, ha = cluster_bootstrap(a, None, 500)
    assert width < (ha - la)  # an unpaired difference would be wider than either rate's interval
    assert paired["n_paired"] == 200
    with pytest.raises(ValueError, match="paired"):
        paired_difference(a, b[:5])


def test_mean_over_folds_weighs_each_fold_the_same():
    small, large = np.ones(10), np.zeros(90)
    est, low, high = mean_over_folds([small, large, _items(40, 0.5)], n_boot=300)
    assert est == pytest.approx((1 + 0 + _items(40, 0.5).mean()) / 3)
    assert low < est < high
    assert np.isnan(mean_over_folds([small, np.array([])])[0])
    zero = mean_over_folds([np.zeros(10), np.zeros(20)])
    assert zero[:2] == (0, 0) and zero[2] > 0.05  # Wilson over the 30 items, not [0, 0]


def test_seed_spread_reports_mean_and_sd():
    spread = seed_spread([0.6, 0.7, 0.8])
    assert spread["seed_mean"] == pytest.approx(0.7) and spread["seed_sd"] == pytest.approx(0.1)
    assert spread["seeds"] == 3 and np.isnan(seed_spread([0.5])["seed_sd"])
