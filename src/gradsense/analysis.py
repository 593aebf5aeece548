"""Geometry of activation gradients: PCA, domain cosines, linear probes, the Backward Lens, steering cosines, gating.

Every function takes plain arrays (one row per item) so it can be tested on synthetic data; the notebook only
calls them and plots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from gradsense.errors import GradsenseError
from gradsense.stats import bootstrap_ci


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), in float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching rows of a and b (any leading shape), clipped to [-1, 1] against float rounding."""
    return np.clip((unit_rows(a) * unit_rows(b)).sum(-1), -1.0, 1.0)


def pca_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) coordinates of the unit-normalised rows on their first two principal components, and the explained
    variance ratios."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed)
    coords = pca.fit_transform(unit_rows(x))
    return coords, pca.explained_variance_ratio_


def domain_cosines(x: np.ndarray, domains: Sequence, groups: Sequence | None = None) -> pd.DataFrame:
    """Per item: mean cosine to the other items of its domain (`within`) and to items of other domains (`across`).

    Items sharing a `group` (e.g. the same fact asked in both directions, the same prompt) are left out of each
    other's means: their similarity says nothing about the domain.
    """
    domains = np.asarray(domains)
    groups = np.asarray(groups) if groups is not None else np.arange(len(domains))
    if len(domains) != len(x) or len(groups) != len(x):
        raise GradsenseError(f"{len(x)} rows but {len(domains)} domains and {len(groups)} groups")
    u = unit_rows(x)
    cos = u @ u.T
    same_domain = domains[:, None] == domains[None, :]
    unrelated = groups[:, None] != groups[None, :]
    within_mask, across_mask = same_domain & unrelated, ~same_domain

    def masked_mean(mask: np.ndarray) -> np.ndarray:
        count = mask.sum(1)
        return np.where(count > 0, (cos * mask).sum(1) / np.maximum(count, 1), np.nan)

    return pd.DataFrame({"domain": domains, "within": masked_mean(within_mask), "across": masked_mean(across_mask)})


def domain_cosine_matrix(x: np.ndarray, domains: Sequence) -> pd.DataFrame:
    """Mean cosine between the items of each pair of domains (diagonal: distinct items of one domain)."""
    domains = np.asarray(domains)
    u = unit_rows(x)
    cos = u @ u.T
    np.fill_diagonal(cos, np.nan)
    names = sorted(np.unique(domains).tolist())
    table = [[np.nanmean(cos[np.ix_(domains == a, domains == b)]) for b in names] for a in names]
    return pd.DataFrame(table, index=names, columns=names)


def probe_predictions(
    x: np.ndarray, labels: Sequence, train: np.ndarray, test: np.ndarray, seed: int = 0, shuffle: bool = False
) -> np.ndarray:
    """Test-set predictions of a logistic-regression probe fit on the train rows (unit-normalised, standardised).

    shuffle=True permutes the training labels (seeded): the chance level of the same pipeline.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    train, test = np.asarray(train, bool), np.asarray(test, bool)
    if train.sum() == 0 or test.sum() == 0:
        raise GradsenseError(f"probe needs train and test rows (got {train.sum()} and {test.sum()})")
    y = labels[train]
    if len(np.unique(y)) < 2:
        raise GradsenseError(f"probe needs at least two classes in the train rows (got {np.unique(y).tolist()})")
    if shuffle:
        y = np.random.default_rng(seed).permutation(y)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    probe.fit(unit_rows(x[train]), y)
    return probe.predict(unit_rows(x[test]))


def probe_table(
    features: Mapping[str, np.ndarray],
    layers: Sequence[int],
    labels: Sequence,
    train: np.ndarray,
    test: np.ndarray,
    seed: int = 0,
    n_boot: int = 1000,
    shuffled: str | None = "gradient",
) -> pd.DataFrame:
    """Held-out accuracy with a bootstrap CI per (features, layer), plus the same probe on shuffled labels.

    features: name → (L, N, d) array; `shuffled` names the features whose shuffled-label control is added.
    """
    labels, train, test = np.asarray(labels), np.asarray(train, bool), np.asarray(test, bool)
    if train.sum() == 0 or test.sum() == 0:
        raise GradsenseError(f"probe needs train and test rows (got {train.sum()} and {test.sum()})")
    truth = labels[test]
    majority = pd.Series(labels[train]).value_counts().sort_index(kind="stable").idxmax()  # ties: first by name
    rows = []
    runs = [(name, array, False) for name, array in features.items()]
    if shuffled is not None:
        runs.append((f"{shuffled} (shuffled labels)", features[shuffled], True))
    for name, array, shuffle in runs:
        for i, layer in enumerate(layers):
            correct = probe_predictions(array[i], labels, train, test, seed, shuffle) == truth
            acc, low, high = bootstrap_ci(correct.astype(float), n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "features": name,
                    "layer": layer,
                    "accuracy": acc,
                    "low": low,
                    "high": high,
                    "n_test": len(truth),
                    "majority": float(np.mean(truth == majority)),
                }
            )
    return pd.DataFrame(rows)


@torch.no_grad()
def lens_ranks(
    vectors: np.ndarray,
    tokens: np.ndarray,
    norm: Callable[[torch.Tensor], torch.Tensor],
    unembed: Callable[[torch.Tensor], torch.Tensor],
    chunk: int = 256,
) -> np.ndarray:
    """(N, m) rank (0 = top) of each of the m `tokens[i]` among the vocabulary logits unembed(norm(vectors[i]))."""
    tokens = np.asarray(tokens).reshape(len(vectors), -1)
    weight = next((p for p in getattr(unembed, "parameters", list)()), None)
    dtype = weight.dtype if weight is not None else torch.float32
    device = weight.device if weight is not None else torch.device("cpu")
    ranks = np.zeros(tokens.shape, dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        v = torch.as_tensor(np.asarray(vectors[start : start + chunk]), dtype=dtype, device=device)
        logits = unembed(norm(v)).float()
        picked = logits.gather(1, torch.as_tensor(tokens[start : start + chunk], device=device))
        ranks[start : start + chunk] = (logits[:, None, :] > picked[:, :, None]).sum(-1).cpu().numpy()
    return ranks


def model_lens(model) -> tuple[Callable, Callable]:
    """(final norm, unembedding) of a causal LM: the read-out that the Backward Lens applies to −g."""
    return model.get_decoder().norm, model.get_output_embeddings()


def backward_lens(model, vectors: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(L, N, m) ranks of `tokens` (N, m) when each (L, N, d) vector is read through the model's final norm and
    unembedding; pass −g for the Backward Lens, h for the logit lens."""
    norm, unembed = model_lens(model)
    return np.stack([lens_ranks(layer_vectors, tokens, norm, unembed) for layer_vectors in vectors])


def lens_table(
    ranks: np.ndarray, layers: Sequence[int], ks: Sequence[int] = (1, 10), n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """hit@k with a bootstrap CI per layer from (L, N) ranks."""
    rows = []
    for i, layer in enumerate(layers):
        for k in ks:
            est, low, high = bootstrap_ci((ranks[i] < k).astype(float), n_boot=n_boot, seed=seed)
            rows.append({"layer": layer, "k": k, "hit": est, "low": low, "high": high, "n": ranks.shape[1]})
    return pd.DataFrame(rows)


def gating_share(weights: np.ndarray, acts: np.ndarray, k: int) -> np.ndarray:
    """Share of Σ_j weights[..., j] on the k units with the largest |acts[..., j]| (per row of the leading axes).

    With weights = squared unit gradients, a uniform spread gives k / d_mlp.
    """
    weights, acts = np.asarray(weights, dtype=np.float64), np.abs(np.asarray(acts))
    if weights.shape != acts.shape:
        raise GradsenseError(f"weights {weights.shape} and acts {acts.shape} differ in shape")
    if not 0 < k <= acts.shape[-1]:
        raise GradsenseError(f"k={k} outside 1..{acts.shape[-1]} units")
    top = np.argpartition(-acts, k - 1, axis=-1)[..., :k]
    total = weights.sum(-1)
    return np.divide(
        np.take_along_axis(weights, top, -1).sum(-1), total, out=np.full(total.shape, np.nan), where=total > 0
    )


def gating_table(
    weights: np.ndarray,
    acts: np.ndarray,
    layers: Sequence[int],
    fractions: Sequence[float],
    control_acts: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per layer and top-k fraction: mean share of the gradient's squared norm on the prompt's top-k active units
    (bootstrap CI over items), beside the uniform share k/d and, optionally, the share on another prompt's top-k."""
    d = acts.shape[-1]
    rows = []
    for fraction in fractions:
        k = max(1, int(round(fraction * d)))
        share = gating_share(weights, acts, k)
        control = gating_share(weights, control_acts, k) if control_acts is not None else None
        for i, layer in enumerate(layers):
            est, low, high = bootstrap_ci(share[i], n_boot=n_boot, seed=seed)
            row = {"layer": layer, "k": k, "fraction": k / d, "share": est, "low": low, "high": high, "uniform": k / d}
            if control is not None:
                row["control"] = float(np.mean(control[i]))
            rows.append(row)
    return pd.DataFrame(rows)


def cosine_table(cos: np.ndarray, layers: Sequence[int], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean of (L, N) cosines per layer with a bootstrap CI."""
    rows = []
    for i, layer in enumerate(layers):
        est, low, high = bootstrap_ci(cos[i], n_boot=n_boot, seed=seed)
        rows.append({"layer": layer, "mean": est, "low": low, "high": high, "n": cos.shape[1]})
    return pd.DataFrame(rows)


def norms_table(arrays: Mapping[str, np.ndarray], layers: Sequence[int]) -> pd.DataFrame:
    """Median L2 norm over items of each (L, N, d) array (kind → array) per layer; rows by layer, then kind."""
    return pd.DataFrame(
        [
            {"layer": layer, "kind": kind, "median_norm": float(np.median(np.linalg.norm(array[i], axis=-1)))}
            for i, layer in enumerate(layers)
            for kind, array in arrays.items()
        ]
    )


def pca_table(
    features: Mapping[str, np.ndarray], layers: Sequence[int], domains: Sequence, seed: int = 0
) -> pd.DataFrame:
    """Per features × layer × item: the first two principal coordinates (`pca_2d`), the domain, and the variance
    the two components explain."""
    parts = []
    for name, array in features.items():
        for i, layer in enumerate(layers):
            coords, explained = pca_2d(array[i], seed)
            parts.append(
                pd.DataFrame(
                    {
                        "features": name,
                        "layer": layer,
                        "pc1": coords[:, 0],
                        "pc2": coords[:, 1],
                        "domain": np.asarray(domains),
                        "explained": explained.sum(),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def domain_cosine_table(
    features: Mapping[str, np.ndarray],
    layers: Sequence[int],
    domains: Sequence,
    groups: Sequence | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per features × layer: mean within- and across-domain cosine (`domain_cosines`) and the per-item margin
    within − across with a bootstrap CI over the items that have both."""
    rows = []
    for name, array in features.items():
        for i, layer in enumerate(layers):
            per_item = domain_cosines(array[i], domains, groups)
            margin = (per_item["within"] - per_item["across"]).dropna().to_numpy()
            est, low, high = bootstrap_ci(margin, n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "features": name,
                    "layer": layer,
                    "within": per_item["within"].mean(),
                    "across": per_item["across"].mean(),
                    "margin": est,
                    "low": low,
                    "high": high,
                }
            )
    return pd.DataFrame(rows)


def lens_target_vs_source(ranks: np.ndarray, layers: Sequence[int], distinct: np.ndarray) -> pd.DataFrame:
    """Per layer: share of items (with distinct target and source tokens) whose target ranks above the source in
    (L, N, 2) lens ranks (…, 0 = target, …, 1 = source)."""
    distinct = np.asarray(distinct, bool)
    return pd.DataFrame(
        [
            {
                "layer": layer,
                "target_above_source": float(np.mean(ranks[i, distinct, 0] < ranks[i, distinct, 1])),
                "n": int(distinct.sum()),
            }
            for i, layer in enumerate(layers)
        ]
    )


def steering_cosine_table(
    grads: np.ndarray,
    steering: np.ndarray,
    directions: Sequence[str],
    layers: Sequence[int],
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """cos(−g, s) per layer (mean, bootstrap CI) for the same item, for a seeded shuffle of the items (the null:
    each −g against another item's s), and for the same item within each direction."""
    directions = np.asarray(directions)
    cos = row_cosine(-grads, steering)
    null = row_cosine(-grads, steering[:, np.random.default_rng(seed).permutation(grads.shape[1])])
    return pd.concat(
        [
            cosine_table(cos, layers, n_boot, seed).assign(pairs="same item"),
            cosine_table(null, layers, n_boot, seed).assign(pairs="shuffled items"),
            *[
                cosine_table(cos[:, directions == d], layers, n_boot, seed).assign(pairs=f"same item, {d}")
                for d in sorted(set(directions.tolist()))
            ],
        ],
        ignore_index=True,
    )


GATING_SITES = {"unit_grads": "∂L/∂u (down_proj input)", "unit_input_grad_sq": "∂L/∂(gate, up) (unit inputs)"}


def gating_sites_table(
    unit_grads: np.ndarray,
    unit_input_grad_sq: np.ndarray,
    unit_acts: np.ndarray,
    layers: Sequence[int],
    fractions: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """`gating_table` at the two sites of the MLP units: ‖∂L/∂u‖² (down_proj input) and the squared gradient at the
    units' inputs; the control scores each item with the previous item's active units (a roll by one)."""
    control = np.roll(unit_acts, 1, axis=1)
    return pd.concat(
        [
            gating_table(unit_grads**2, unit_acts, layers, fractions, control, n_boot, seed).assign(
                site=GATING_SITES["unit_grads"]
            ),
            gating_table(unit_input_grad_sq, unit_acts, layers, fractions, control, n_boot, seed).assign(
                site=GATING_SITES["unit_input_grad_sq"]
            ),
        ],
        ignore_index=True,
    )
