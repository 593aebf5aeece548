"""Gradient-geometry analyses on synthetic arrays whose answer is known."""

import numpy as np
import pytest
import torch

from gradsense.analysis import (
    GATING_SITES,
    cosine_table,
    domain_cosine_matrix,
    domain_cosine_table,
    domain_cosines,
    gating_share,
    gating_sites_table,
    gating_table,
    lens_ranks,
    lens_table,
    lens_target_vs_source,
    norms_table,
    pca_2d,
    pca_table,
    probe_table,
    row_cosine,
    steering_cosine_table,
    unit_rows,
)
from gradsense.errors import GradsenseError


def _clusters(n_per: int = 40, d: int = 16, spread: float = 0.3, seed: int = 0):
    """Three well-separated domains: a mean direction per domain plus noise."""
    rng = np.random.default_rng(seed)
    centres = 3 * np.eye(3, d)
    domains = np.repeat(["bio", "geo", "hist"], n_per)
    x = centres[np.repeat(np.arange(3), n_per)] + spread * rng.standard_normal((3 * n_per, d))
    return x, domains


def test_unit_rows_and_row_cosine():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(unit_rows(x), [[0.6, 0.8], [0.0, 0.0]])
    cos = row_cosine(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [-1.0, -1.0]]))
    np.testing.assert_allclose(cos, [1, -1])


def test_row_cosine_of_a_row_with_itself_is_at_most_one():
    rows = np.random.default_rng(0).standard_normal((64, 896)).astype(np.float32)
    cos = row_cosine(rows, rows.copy())  # float32 unit rows sum to 1 ± rounding; a cosine never leaves [-1, 1]
    assert cos.max() <= 1.0 and cos.min() >= -1.0 and np.allclose(cos, 1.0)


def test_pca_separates_clusters():
    x, domains = _clusters()
    coords, explained = pca_2d(x)
    assert coords.shape == (len(x), 2) and explained.sum() > 0.8
    centroids = np.array([coords[domains == d].mean(0) for d in ("bio", "geo", "hist")])
    assert np.linalg.norm(centroids[0] - centroids[1]) > 5 * coords[domains == "bio"].std(0).max()


def test_domain_cosines_within_exceeds_across_and_groups_are_excluded():
    x, domains = _clusters()
    table = domain_cosines(x, domains)
    assert (table["within"] > table["across"] + 0.5).all()
    # Two copies of one item in the same group: excluded from each other's within-domain mean.
    pair = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    grouped = domain_cosines(pair, ["a", "a", "a", "b"], groups=[0, 0, 1, 2])
    np.testing.assert_allclose(grouped["within"][:3], [0.0, 0.0, 0.0], atol=1e-12)
    assert np.isnan(grouped["within"][3]) and grouped["across"][3] == pytest.approx(np.sqrt(0.5))
    matrix = domain_cosine_matrix(x, domains)
    assert list(matrix.index) == ["bio", "geo", "hist"]
    assert np.diag(matrix.values).min() > matrix.values[~np.eye(3, dtype=bool)].max()


def test_probe_table_real_signal_vs_shuffled_labels():
    x, domains = _clusters(n_per=60, spread=0.5)
    noise = np.random.default_rng(1).standard_normal(x.shape)
    rng = np.random.default_rng(2)
    train = rng.random(len(x)) < 0.6
    features = {"gradient": np.stack([x, x]), "noise": np.stack([noise, noise])}
    table = probe_table(features, [3, 9], domains, train, ~train, n_boot=200)
    acc = table.set_index(["features", "layer"])["accuracy"]
    assert acc["gradient", 3] > 0.95 and acc["noise", 3] < 0.6 and acc["gradient (shuffled labels)", 9] < 0.6
    assert (table["low"] <= table["accuracy"]).all() and (table["accuracy"] <= table["high"]).all()
    assert table["majority"].between(0.2, 0.5).all()
    with pytest.raises(GradsenseError):
        probe_table(features, [3, 9], domains, np.zeros(len(x), bool), ~train)


def test_lens_ranks_and_table():
    unembed = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        unembed.weight.copy_(
            torch.tensor(
                [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [-1, 0, 0, 0], [0.5, 0.5, 0, 0]],
                dtype=torch.float32,
            )
        )
    vectors = np.array([[1.0, 0.2, 0, 0], [0, 0, 0, 2.0], [-1.0, 0, 0, 0]])
    ranks = lens_ranks(vectors, np.array([[0, 4], [3, 0], [0, 4]]), lambda v: v, unembed, chunk=2)
    np.testing.assert_array_equal(ranks, [[0, 5], [0, 1], [5, 0]])  # strictly larger logits
    table = lens_table(ranks[:, 0][None], [5], ks=(1, 10), n_boot=50)
    assert table.set_index("k")["hit"].to_dict() == pytest.approx({1: 2 / 3, 10: 1.0})


def test_gating_share_known_values():
    acts = np.array([[5.0, 0.1, -4.0, 0.2]])
    weights = np.array([[1.0, 1.0, 2.0, 0.0]])
    np.testing.assert_allclose(gating_share(weights, acts, 2), [0.75])  # units 0 and 2 (|−4| counts as active)
    np.testing.assert_allclose(gating_share(weights, acts, 4), [1.0])
    rng = np.random.default_rng(0)
    uniform = gating_share(np.ones((2, 500, 100)), rng.standard_normal((2, 500, 100)), 10)
    np.testing.assert_allclose(uniform, 0.1)
    with pytest.raises(GradsenseError):
        gating_share(weights, acts, 5)
    # Gradients concentrated on the active units: share far above uniform, and above a shuffled-prompt control.
    acts = rng.standard_normal((1, 300, 200))
    weights = acts**2 + 0.01
    table = gating_table(weights, acts, [4], [0.05], control_acts=acts[:, ::-1], n_boot=50)
    row = table.iloc[0]
    assert row["k"] == 10 and row["uniform"] == 0.05 and row["share"] > 0.2 > row["control"]


def test_cosine_table():
    cos = np.array([[1.0, 1.0, 1.0], [-1.0, 0.0, 1.0]])
    table = cosine_table(cos, [2, 5], n_boot=50)
    assert table["mean"].tolist() == [1.0, 0.0] and table["layer"].tolist() == [2, 5]


def test_norms_table_by_hand():
    grads = np.array([[[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]])  # norms 5, 1, 10 → median 5
    acts = np.array([[[1.0, 0.0], [0.0, 2.0], [0.0, 3.0]]])  # norms 1, 2, 3 → median 2
    table = norms_table({"gradient": grads, "activation": acts}, [7])
    assert table.values.tolist() == [[7, "gradient", 5.0], [7, "activation", 2.0]]


def test_domain_cosine_table_by_hand():
    # a1 = (1, 0), a2 = (0.6, 0.8), b1 = (0, 1): cos(a1, a2) = 0.6, cos(a1, b1) = 0, cos(a2, b1) = 0.8.
    x = np.array([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])
    row = domain_cosine_table({"gradient": x}, [4], ["a", "a", "b"], n_boot=20).iloc[0]
    # within: 0.6, 0.6, (b1 has no partner); across: 0, 0.8, mean(0, 0.8) = 0.4.
    assert row["within"] == pytest.approx(0.6) and row["across"] == pytest.approx(0.4)
    # margin per item with both: 0.6 − 0 and 0.6 − 0.8 → mean 0.2.
    assert row["margin"] == pytest.approx(0.2) and row["low"] <= row["margin"] <= row["high"]
    # a1 and a2 are one fact asked twice: their similarity is not counted, so no item has a within-domain partner.
    same_fact = domain_cosine_table({"gradient": x}, [4], ["a", "a", "b"], groups=["f", "f", "g"], n_boot=20)
    assert np.isnan(same_fact["within"].iloc[0]) and np.isnan(same_fact["margin"].iloc[0])


def test_pca_table_keeps_items_aligned_with_domains():
    x, domains = _clusters(n_per=10, d=6)
    two = x[:20]  # bio then geo, separated along their own axes
    table = pca_table({"gradient": np.stack([two, two[::-1]])}, [1, 2], domains[:20])
    assert len(table) == 2 * 20 and table["layer"].tolist() == [1] * 20 + [2] * 20
    # Layer 1: the domains split cleanly on pc1. Layer 2 got the rows reversed but the same labels: they mix.
    first = table[table["layer"] == 1].groupby("domain")["pc1"].agg(["min", "max"])
    assert first.loc["bio", "max"] < first.loc["geo", "min"] or first.loc["geo", "max"] < first.loc["bio", "min"]
    second = table[table["layer"] == 2]
    assert second["pc1"].iloc[:10].mean() * second["pc1"].iloc[10:].mean() < 0  # still two clusters, swapped


def test_lens_target_vs_source_counts_only_distinct_tokens():
    ranks = np.array([[[0, 5], [7, 2], [3, 3]]])  # item 0: target above; item 1: below; item 2: same token
    table = lens_target_vs_source(ranks, [9], [True, True, False])
    assert table.values.tolist() == [[9, 0.5, 2]]


def test_steering_cosine_table_by_hand():
    grads = np.eye(4)[None]  # four orthogonal gradients
    steering = -grads * np.array([1, -1, 1, -1])[None, :, None]  # s = −g for correct items, +g for counterfactual
    table = steering_cosine_table(grads, steering, ["correct", "counterfactual"] * 2, [3], n_boot=20, seed=0)
    means = table.set_index("pairs")["mean"]
    assert means["same item, correct"] == 1.0 and means["same item, counterfactual"] == -1.0
    assert means["same item"] == 0.0
    # default_rng(0).permutation(4) = [2, 0, 1, 3]: only item 3 keeps its own steering vector (cos −1); the
    # others meet an orthogonal one (cos 0).
    assert means["shuffled items"] == -0.25
    assert table["pairs"].tolist() == ["same item", "shuffled items", "same item, correct", "same item, counterfactual"]


def test_gating_sites_table_by_hand():
    acts = np.array([[[3.0, 1.0], [0.0, 5.0]]])  # top-1 unit: item 0 → unit 0, item 1 → unit 1
    unit_grads = np.array([[[1.0, 2.0], [3.0, 4.0]]])  # squared: [1, 4] and [9, 16]
    input_sq = np.array([[[1.0, 1.0], [2.0, 0.0]]])
    table = gating_sites_table(unit_grads, input_sq, acts, [5], [0.5], n_boot=20).set_index("site")
    down, inputs = table.loc[GATING_SITES["unit_grads"]], table.loc[GATING_SITES["unit_input_grad_sq"]]
    assert down["k"] == 1 and down["share"] == pytest.approx((1 / 5 + 16 / 25) / 2)
    # Control: each item scored with the previous item's active unit (item 0 with item 1's unit 1, and back).
    assert down["control"] == pytest.approx((4 / 5 + 9 / 25) / 2)
    assert inputs["share"] == pytest.approx((1 / 2 + 0 / 2) / 2) and inputs["control"] == pytest.approx((1 / 2 + 1) / 2)
