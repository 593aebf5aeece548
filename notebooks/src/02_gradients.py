# %% [markdown]
# # 02 · Activation gradients
# For every correction (prompt, target) the per-item gradient g = ∂(−Σ log p(target tokens | prompt)) / ∂h of the
# output h of block ℓ at the last prompt position, at three depths, with the activations h at the same sites and
# the contrastive steering vector (state after prompt + target minus after prompt + source, last token).
# Then: what does g carry? Geometry (PCA, cosine within vs across domains), a linear probe of the domain (held-out
# subjects and held-out templates, beside activations and shuffled labels), the Backward Lens (−g read through the
# final norm and unembedding), the cosine between −g and the steering vector, and the gating share (how much of the
# gradient at the MLP hidden units falls on the units the prompt activated).
# Input: `results/corrections/corrections.csv`. Outputs: `results/gradients/`, `figures/gradients/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
layers = [0.25, 0.5, 0.75]
position = "last"
batch_size = 32
max_items = 96
gating_fractions = [0.01, 0.05, 0.1, 0.25]
n_boot = 500

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

import gradsense
from gradsense import analysis
from gradsense.corrections import load_corrections
from gradsense.gradients import balanced_subset, correction_gradients, load_gradients, resolve_layers, save_gradients
from gradsense.paths import Paths
from gradsense.report import save_figure, save_json, save_table
from gradsense.scoring import first_visible_id
from gradsense.seeding import seed_everything
from gradsense.steering import correction_steering

paths = Paths("..")
RESULTS, FIGURES = paths.results("gradients"), paths.figures("gradients")
seed_everything(seed)

# %% [markdown]
# ## Extract
# `max_items` keeps an even, deterministic share of every domain (whole facts, both directions, table order kept);
# null = every row. One forward and one backward per batch for the gradients (MLP units included), one forward per
# distinct prompt + answer for the steering vectors.

# %%
table = balanced_subset(load_corrections(paths.corrections), max_items)
model, tokenizer = gradsense.load_model(model_name, device=device)
layers = resolve_layers(model, layers)
result = correction_gradients(model, tokenizer, table, layers, position, batch_size, units=True)
steering = correction_steering(model, tokenizer, table, layers, batch_size)
save_gradients(paths.gradients, result, steering)
save_table(
    table[["id", "fact_id", "domain", "direction", "split"]].join(result.index[["loss", "n_target_tokens"]]),
    RESULTS,
    "index",
)
print(f"{len(table)} items, layers {layers}, d_model {result.grads.shape[-1]}")

# %%
saved = load_gradients(paths.gradients)
L, N, D = saved["grads"].shape
norms = analysis.norms_table(
    {"gradient": saved["grads"], "activation": saved["acts"], "steering": saved["steering"]}, layers
)
save_table(norms, RESULTS, "norms")
norms.pivot(index="layer", columns="kind", values="median_norm")

# %% [markdown]
# ## Checks on the extraction

# %%
assert (L, N) == (len(layers), len(table)) and saved["grads"].dtype == np.float32
assert saved["ids"].tolist() == table["id"].tolist() and saved["layers"] == layers
for key in ("grads", "acts", "steering"):
    assert saved[key].shape == (L, N, D) and np.isfinite(saved[key]).all(), key
assert (np.linalg.norm(saved["grads"], axis=-1) > 0).all()
# The loss is the corrections stage's own −log p(target), measured independently with scoring.score_targets.
np.testing.assert_allclose(saved["loss"], -table["logp_target"].to_numpy(), rtol=2e-3, atol=2e-3)
same_fact = table.groupby("fact_id")["id"].transform("size") == 2
if same_fact.any():  # a fact in both directions: the steering vectors are opposite
    pairs = table[same_fact].sort_values(["fact_id", "direction"]).index.to_numpy().reshape(-1, 2)
    np.testing.assert_allclose(saved["steering"][:, pairs[:, 0]], -saved["steering"][:, pairs[:, 1]], atol=1e-4)

# %% [markdown]
# ## Geometry: PCA and cosine within vs across domains
# Cosines between unit-normalised vectors; the two directions of one fact (the same prompt) are left out of each
# other's within-domain means.

# %%
features = {"gradient": saved["grads"], "activation": saved["acts"]}
pca = analysis.pca_table(features, layers, table["domain"], seed)
cosines = analysis.domain_cosine_table(features, layers, table["domain"], table["fact_id"], n_boot, seed)
save_table(cosines, RESULTS, "domain_cosines")
cosines

# %%
grid = sns.relplot(
    data=pca,
    x="pc1",
    y="pc2",
    hue="domain",
    row="features",
    col="layer",
    kind="scatter",
    s=12,
    alpha=0.7,
    height=2.6,
    facet_kws={"sharex": False, "sharey": False},
)
grid.set_titles("{row_name} · layer {col_name}")
save_figure(grid.figure, FIGURES, "pca_by_domain")

# %%
middle = layers[len(layers) // 2]
heat = analysis.domain_cosine_matrix(saved["grads"][layers.index(middle)], table["domain"])
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
long = cosines.melt(id_vars=["features", "layer"], value_vars=["within", "across"], var_name="pairs", value_name="cos")
long["series"] = long["features"] + ", " + long["pairs"] + " domain"
sns.barplot(data=long, x="layer", y="cos", hue="series", ax=axes[0], errorbar=None)
axes[0].set(title="Mean cosine between items", ylabel="cosine")
axes[0].legend(fontsize=7)
sns.heatmap(heat, annot=True, fmt=".2f", cmap="vlag", center=0, ax=axes[1], cbar=False, annot_kws={"size": 7})
axes[1].set(title=f"Gradient cosine between domains, layer {middle}")
fig.tight_layout()
save_figure(fig, FIGURES, "domain_cosines")

# %% [markdown]
# ## Linear probe of the domain
# Logistic regression on unit-normalised, standardised vectors; trained on the `train` split, scored on `test`
# (subjects never shared), and separately trained on the seen templates and scored on each domain's held-out
# template. 95% bootstrap CIs over test items; the shuffled-label probe is the chance level of the same pipeline.

# %%
labels = table["domain"].to_numpy()
splits = {
    "held-out subjects": (table["split"].eq("train").to_numpy(), table["split"].eq("test").to_numpy()),
    "held-out templates": (
        table["template_split"].eq("train").to_numpy(),
        table["template_split"].eq("heldout").to_numpy(),
    ),
}
probe = pd.concat(
    [
        analysis.probe_table(features, layers, labels, train, test, seed, n_boot).assign(split=name)
        for name, (train, test) in splits.items()
        if train.any() and test.any()
    ],
    ignore_index=True,
)
save_table(probe, RESULTS, "domain_probe")
probe.pivot_table(index=["split", "layer"], columns="features", values="accuracy")

# %%
grid = sns.FacetGrid(probe, col="split", height=3.2, aspect=1.2)
for ax, (name, part) in zip(grid.axes.flat, probe.groupby("split", sort=False)):
    for features_name, rows in part.groupby("features", sort=False):
        yerr = [rows["accuracy"] - rows["low"], rows["high"] - rows["accuracy"]]
        ax.errorbar(rows["layer"], rows["accuracy"], yerr=yerr, marker="o", capsize=3, label=features_name)
    ax.axhline(part["majority"].iloc[0], color="grey", ls=":", label="majority class")
    ax.set(title=name, xlabel="layer", ylabel="domain accuracy (test)", ylim=(0, 1.02), xticks=layers)
grid.axes.flat[0].legend(fontsize=7)
save_figure(grid.figure, FIGURES, "domain_probe")

# %% [markdown]
# ## Backward Lens
# −g (the direction that lowers the loss) read through the final norm and unembedding, like a logit lens on h.
# The token scored is the first token of the continuation that is not only whitespace: this tokenizer writes
# " 1066" as " ", "1", "0", "6", "6", so the bare space token would say nothing; for years the lens is asked for the
# first digit. Chance for hit@k is k / vocabulary size.

# %%
target_tok = [first_visible_id(tokenizer, a) for a in table["target"]]
source_tok = [first_visible_id(tokenizer, a) for a in table["source"]]
tokens = np.stack([target_tok, source_tok], axis=1)
ranks_g = analysis.backward_lens(model, -saved["grads"], tokens)
ranks_h = analysis.backward_lens(model, saved["acts"], tokens)
vocab = model.get_output_embeddings().weight.shape[0]
lens = pd.concat(
    [
        analysis.lens_table(ranks_g[..., 0], layers, n_boot=n_boot, seed=seed).assign(reading="−g (Backward Lens)"),
        analysis.lens_table(ranks_h[..., 0], layers, n_boot=n_boot, seed=seed).assign(reading="h (logit lens)"),
    ],
    ignore_index=True,
).assign(chance=lambda d: d["k"] / vocab)
lens_vs_source = analysis.lens_target_vs_source(ranks_g, layers, tokens[:, 0] != tokens[:, 1])
save_table(lens, RESULTS, "backward_lens")
save_table(lens_vs_source, RESULTS, "backward_lens_target_vs_source")
lens.pivot_table(index=["reading", "k"], columns="layer", values="hit")

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.4))
for (reading, k), rows in lens.groupby(["reading", "k"], sort=False):
    ax.errorbar(
        rows["layer"],
        rows["hit"],
        yerr=[rows["hit"] - rows["low"], rows["high"] - rows["hit"]],
        marker="o",
        capsize=3,
        ls="-" if k == 1 else "--",
        label=f"{reading} hit@{k}",
    )
ax.set(
    xlabel="layer",
    ylabel="share of items",
    ylim=(0, 1.02),
    xticks=layers,
    title="Target's first token read from −g and h",
)
ax.legend(fontsize=7)
save_figure(fig, FIGURES, "backward_lens")

# %% [markdown]
# ## Gradient vs steering vector
# cos(−g, s) per item, s = state after prompt + target minus after prompt + source (last token, same block). The
# null pairs each −g with the steering vector of another, randomly chosen item.

# %%
steer_cos = analysis.steering_cosine_table(saved["grads"], saved["steering"], table["direction"], layers, n_boot, seed)
cos_gs = analysis.row_cosine(-saved["grads"], saved["steering"])  # per item, for the violin plot
save_table(steer_cos, RESULTS, "gradient_steering_cosine")
steer_cos.pivot(index="pairs", columns="layer", values="mean")

# %%
long = pd.DataFrame(
    {"layer": np.repeat(layers, N), "cos": cos_gs.ravel(), "direction": np.tile(table["direction"].to_numpy(), L)}
)
fig, ax = plt.subplots(figsize=(5.5, 3.4))
sns.violinplot(data=long, x="layer", y="cos", hue="direction", ax=ax, cut=0, inner="quartile")
for i, row in enumerate(steer_cos[steer_cos["pairs"] == "shuffled items"].itertuples()):
    ax.plot([i - 0.4, i + 0.4], [row.mean] * 2, color="k", ls=":", lw=1, label="shuffled items" if i == 0 else None)
ax.axhline(0, color="grey", lw=0.5)
ax.set(ylabel="cos(−g, steering vector)", title="Gradient vs contrastive steering vector")
ax.legend(fontsize=7)
save_figure(fig, FIGURES, "gradient_steering_cosine")

# %% [markdown]
# ## Gating: does the gradient flow through the units the prompt activated?
# At each layer's MLP hidden units u = act(gate) ⊙ up (the input of down_proj), the share of ‖∂L/∂u‖² on the
# top-k units by |u| for that prompt, against the uniform share k/d_mlp and against the top-k units of another prompt.
# ∂L/∂u = W_downᵀ g does not itself depend on this prompt's u, so the gate is tested a second time where it acts:
# at the units' inputs, (∂L/∂gate_j)² + (∂L/∂up_j)², the gradient that flows back into the residual stream.

# %%
gating = analysis.gating_sites_table(
    result.unit_grads, result.unit_input_grad_sq, result.unit_acts, layers, gating_fractions, n_boot, seed
)
save_table(gating, RESULTS, "gating_share")
gating.pivot_table(index=["site", "fraction"], columns="layer", values="share")

# %%
grid = sns.FacetGrid(gating, col="site", height=3.2, aspect=1.2)
for ax, (site, part) in zip(grid.axes.flat, gating.groupby("site", sort=False)):
    for (fraction, rows), color in zip(part.groupby("fraction"), sns.color_palette()):
        ax.errorbar(
            rows["layer"],
            rows["share"],
            yerr=[rows["share"] - rows["low"], rows["high"] - rows["share"]],
            marker="o",
            capsize=3,
            color=color,
            label=f"top {fraction:.0%}",
        )
        ax.plot(rows["layer"], rows["control"], color=color, ls=":", lw=1)
        ax.axhline(fraction, color=color, ls="--", lw=0.8)
    ax.set(title=site, xlabel="layer", ylabel="share of squared gradient", ylim=(0, 1), xticks=layers)
grid.axes.flat[0].legend(fontsize=7, title="dashed: uniform, dotted: other prompt's units", title_fontsize=6)
save_figure(grid.figure, FIGURES, "gating_share")

# %% [markdown]
# ## Checks on the analyses

# %%
summary = {
    "n_items": N,
    "layers": layers,
    "position": position,
    "d_model": D,
    "probe_gradient_best": float(probe[probe["features"] == "gradient"]["accuracy"].max()),
    "probe_shuffled_best": float(probe[probe["features"].str.contains("shuffled")]["accuracy"].max()),
    "lens_hit10_best": float(lens[(lens["reading"].str.startswith("−g")) & (lens["k"] == 10)]["hit"].max()),
    "steering_cos_mean": steer_cos[steer_cos["pairs"] == "same item"].set_index("layer")["mean"].to_dict(),
}
save_json(summary, RESULTS / "summary.json")
assert probe["accuracy"].between(0, 1).all() and (probe["low"] <= probe["accuracy"]).all()
assert (probe["accuracy"] <= probe["high"]).all() and set(probe["features"]) >= {"gradient", "activation"}
assert ((ranks_g >= 0) & (ranks_g < vocab)).all() and lens["hit"].between(0, 1).all()
assert np.abs(cos_gs).max() <= 1 + 1e-6 and len(steer_cos) >= 2 * L
# The top-k share is a share: bounded by 1 and it grows with k at every layer.
assert gating["share"].between(0, 1).all()
assert (gating.sort_values("fraction").groupby(["site", "layer"])["share"].diff().dropna() >= -1e-9).all()
# What was saved is what was computed (CSV keeps 6 significant digits), and the gradients are the ones analysed.
for name, frame in {
    "norms": norms,
    "domain_cosines": cosines,
    "domain_probe": probe,
    "backward_lens": lens,
    "gradient_steering_cosine": steer_cos,
    "gating_share": gating,
}.items():
    pd.testing.assert_frame_equal(pd.read_csv(RESULTS / f"{name}.csv"), frame, check_dtype=False, rtol=1e-5)
np.testing.assert_array_equal(load_gradients(paths.gradients)["grads"], result.grads)
assert ((cosines["low"] <= cosines["margin"]) & (cosines["margin"] <= cosines["high"])).all()
summary
