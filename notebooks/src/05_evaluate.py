# %% [markdown]
# # 05 · Evaluate the describer
# The trained describer (`results/train/checkpoint`) reads gradients it never saw and says what pressure it feels
# by structured greedy decoding: the head's field names `domain: … | from: … | to: …` are given and the model says
# each value (the labels' format; every head parses), then `max_new_tokens` tokens of free sentence (0: none).
#
# - **Held-out sets**: new subjects (test split), held-out relation templates (test split), and the domain left out
#   of training (`heldout_domain` in the checkpoint).
# - **Metrics**: domain accuracy (parsed domain = the item's domain); answer identification, strict (the target's
#   text inside `to`) and at the labels' granularity (`to` = the target's first visible token, as the oracle's
#   labels name it); whether `to` reproduces the `to` of the item's teacher label (what training asked for); forced
#   choice (the item's own label ranked against the labels of 9 other items by the mean per-token log-likelihood
#   under the injection; chance 0.1); false positives ("names a domain": one of the corpus's domains is named,
#   under no injection or norm-matched noise); the shuffled-gradient control: each item's own fact prompt is read as the
#   passage while another item's gradient is injected, scored against the injected item ("names the read item's
#   domain" = the report follows the prompt instead, among pairs whose domains differ).
# - **Decoupling**: a passage from domain A is read before the question while a gradient from domain B ≠ A is
#   injected, over all ordered domain pairs; success = reports B, leakage = reports A. The seed's case (a history
#   gradient inside a biology passage) is reported on its own line, from `seed_case_items` history items.
#
# All rates carry percentile-bootstrap 95% CIs over items. Outputs: `results/evaluate/`, `figures/evaluate/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
max_items = 3
max_control_items = 2
forced_choice_items = 2
n_choices = 10
decoupling_per_pair = 1
seed_case_items = 2
decoupling_domains = ["biology", "history"]
batch_size = 16
max_new_tokens = 0
n_boot = 200

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

import gradsense
from gradsense import decoupling as dc
from gradsense import evaluate as ev
from gradsense import forced_choice as fc
from gradsense.checkpoint import load_describer
from gradsense.inputs import contexts_path, load_stage_inputs, read_contexts
from gradsense.paths import Paths
from gradsense.report import save_figure, save_table
from gradsense.sampling import stratified
from gradsense.seeding import seed_everything

PATHS = Paths("..")
RESULTS, FIGURES = PATHS.results("evaluate"), PATHS.figures("evaluate")
rng = seed_everything(seed)

# %%
model, tokenizer = gradsense.load_model(model_name, device=device)
describer = load_describer(PATHS.checkpoint, model, tokenizer)
meta, config = describer.meta, describer.config
inputs = load_stage_inputs(PATHS)
grads, items = inputs.vectors("grads", config.source_layer), inputs.items
passages = read_contexts(contexts_path()).query("pool == 'domain'")
heldout_domain = meta.get("heldout_domain")
sets = {name: items.iloc[rows] for name, rows in ev.evaluation_sets(items, heldout_domain, max_items, seed).items()}
pd.DataFrame(
    {
        "set": list(sets),
        "items": [len(s) for s in sets.values()],
        "domains": [s["domain"].nunique() for s in sets.values()],
    }
)

# %% [markdown]
# ## Held-out sets and controls

# %%
# A false positive names one of the corpus's domains (structured decoding always says *something* after "domain:").
domain_names = sorted(items["domain"].unique())
options = {"seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "domains": domain_names}
scored = {
    (name, "gradient"): ev.describe_items(describer, grads, frame, **options)
    for name, frame in sets.items()
    if len(frame)
}
test = sets[ev.TEST_SUBJECTS]
controls = stratified(test, "domain", max_control_items, order="shuffle", seed=seed)
for control in ("none", "noise"):
    scored[(ev.TEST_SUBJECTS, control)] = ev.describe_items(describer, grads, controls, control, **options)
# Shuffle: each item's own fact prompt is read as the passage while another item's gradient is injected (without a
# passage the shuffle would only permute the same descriptions).
scored[(ev.TEST_SUBJECTS, "shuffle")] = ev.describe_items(
    describer, grads, controls, "shuffle", controls["prompt"].tolist(), **options
)
descriptions = ev.descriptions_table(scored)
save_table(descriptions, RESULTS, "descriptions")

# %% [markdown]
# ## Forced choice among 10 labels
# Distractors are labels of other items (any split); the no-injection row shows what the label prior alone picks.

# %%
chosen = stratified(test.dropna(subset=["label"]), "domain", forced_choice_items, order="shuffle", seed=seed)
pool = items["label"].dropna().tolist()
max_label_tokens = meta.get("train", {}).get("max_label_tokens")
forced = {
    control: fc.forced_choice(
        describer,
        grads[chosen["row"].to_numpy()],
        chosen["label"].tolist(),
        pool,
        n_choices,
        control,
        seed,
        batch_size,
        max_label_tokens,
    )
    for control in ("gradient", "none")
}
heldout = pd.concat(
    [ev.heldout_table(scored, n_boot, seed), pd.DataFrame(fc.forced_choice_rows(forced, n_boot, seed))],
    ignore_index=True,
)
save_table(heldout, RESULTS, "heldout")
heldout.pivot_table(index=["set", "control"], columns="metric", values="estimate", sort=False).round(3)

# %% [markdown]
# ## Decoupling: a passage from domain A, a gradient from domain B ≠ A
# Gradients come from the test-subject items of the trained domains; passages are the evaluation passages of
# `contexts.csv` (never seen in training, which used neutral passages). `decoupling_domains` = null: all domains.

# %%
domains = (
    decoupling_domains if decoupling_domains is not None else sorted(set(passages["domain"]) | set(test["domain"]))
)
test_pool = items.iloc[ev.evaluation_sets(items, heldout_domain, None, seed)[ev.TEST_SUBJECTS]]
plan = dc.decoupling_plan(test_pool, passages, decoupling_per_pair, domains, seed)
decoupled = dc.run_decoupling(describer, grads, plan, items, tokenizer, batch_size, max_new_tokens, seed)
save_table(decoupled, RESULTS, "decoupling_items")
# The seed's case on its own: history test gradients, each read inside a random biology passage.
seed_plan = dc.case_plan(test_pool, passages, "history", "biology", seed_case_items, seed)
seed_case = decoupled.iloc[:0]
if seed_plan is not None:
    seed_case = dc.run_decoupling(describer, grads, seed_plan, items, tokenizer, batch_size, max_new_tokens, seed)
save_table(seed_case, RESULTS, "seed_case_items")
SEED_CASE = "seed case: history gradient in a biology passage"
decoupling_summary = dc.decoupling_summary({"all pairs": decoupled, SEED_CASE: seed_case}, n_boot, seed)
save_table(decoupling_summary, RESULTS, "decoupling")
pair_rates = dc.pair_rates(decoupled)
save_table(pair_rates, RESULTS, "decoupling_pairs")
decoupling_summary

# %%
success, leakage = dc.decoupling_matrix(decoupled, "success"), dc.decoupling_matrix(decoupled, "leakage")
fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
for ax, matrix, title in (
    (axes[0], success, "success: reports the gradient's domain B"),
    (axes[1], leakage, "leakage: reports the passage's domain A"),
):
    sns.heatmap(matrix, vmin=0, vmax=1, annot=len(matrix) <= 12, fmt=".2f", cmap="viridis", ax=ax, cbar=ax is axes[1])
    ax.set(title=title, xlabel="gradient domain B", ylabel="passage domain A")
reported = ev.confusion(
    decoupled["gradient_domain"], decoupled["reported_domain"], sorted(set(decoupled["gradient_domain"]))
)
sns.heatmap(reported, vmin=0, vmax=1, cmap="magma", ax=axes[2])
axes[2].set(title="reported domain under decoupling", xlabel="reported domain", ylabel="gradient domain B")
fig.tight_layout()
save_figure(fig, FIGURES, "decoupling")

# %%
fig, ax = plt.subplots(figsize=(7, 5))
frame = scored[(ev.TEST_SUBJECTS, "gradient")]
sns.heatmap(
    ev.confusion(frame["domain"], frame["reported_domain"], sorted(set(frame["domain"]))),
    vmin=0,
    vmax=1,
    cmap="magma",
    ax=ax,
)
ax.set(title="Held-out subjects, no passage: reported domain", xlabel="reported domain", ylabel="true domain")
fig.tight_layout()
save_figure(fig, FIGURES, "confusion_test_subjects")

# %%
plot = heldout[heldout["metric"].isin(["domain accuracy", "answer token in 'to'", "names a domain", fc.TOP_1])]
plot = plot.assign(condition=plot["set"] + " · " + plot["control"])
metrics, conditions = list(dict.fromkeys(plot["metric"])), list(dict.fromkeys(plot["condition"]))
width = 0.8 / len(conditions)
fig, ax = plt.subplots(figsize=(10, 4))
for j, (condition, color) in enumerate(zip(conditions, sns.color_palette("tab10", len(conditions)))):
    part = plot[plot["condition"] == condition].set_index("metric").reindex(metrics)
    x = np.arange(len(metrics)) + (j - (len(conditions) - 1) / 2) * width
    ax.bar(
        x,
        part["estimate"],
        width,
        color=color,
        label=condition,
        yerr=[part["estimate"] - part["low"], part["high"] - part["estimate"]],
        capsize=2,
    )
ax.set_xticks(np.arange(len(metrics)), metrics)
ax.axhline(1 / n_choices, color="grey", lw=0.8, ls=":")  # chance for forced choice
ax.set(ylim=(0, 1.05), ylabel="rate (95% bootstrap CI)", title="Held-out evaluation")
ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
fig.tight_layout()
save_figure(fig, FIGURES, "heldout")

# %% [markdown]
# ## Checks

# %%
assert heldout["estimate"].between(0, 1).all() and (heldout["low"] <= heldout["estimate"]).all()
assert (heldout["estimate"] <= heldout["high"]).all() and (heldout["n"] > 0).all()
assert len(scored[(ev.TEST_SUBJECTS, "gradient")]) > 0
assert set(heldout["control"]) >= {"gradient", "none", "noise", "shuffle"}
shuffled = scored[(ev.TEST_SUBJECTS, "shuffle")]
assert (shuffled["id"] != shuffled["source_id"]).all() or len(shuffled) < 2  # every row read another item's gradient
assert (decoupled["gradient_domain"] != decoupled["context_domain"]).all() and len(decoupled) > 0
assert decoupled[["success", "leakage"]].sum(axis=1).max() <= 1  # a report cannot name both A and B
assert all(np.isnan(success.loc[d, d]) for d in success.index if d in success.columns)  # no A = B pairs
assert forced["gradient"]["rank"].between(0, n_choices - 1).all()
if seed_plan is not None:
    assert len(seed_case) > 0 and SEED_CASE in set(decoupling_summary["pairs"])
    assert (seed_case["gradient_domain"] == "history").all() and (seed_case["context_domain"] == "biology").all()
# What was written is what was computed (read back, not only present).
written = pd.read_csv(RESULTS / "heldout.csv")
assert len(written) == len(heldout) and list(written["metric"]) == list(heldout["metric"])
assert len(pd.read_csv(RESULTS / "descriptions.csv")) == len(descriptions)
pairs_written = pd.read_csv(RESULTS / "decoupling_pairs.csv")
assert len(pairs_written) == len(pair_rates)
assert set(pairs_written.columns) == {"context_domain", "gradient_domain", "success", "leakage"}
assert len(pd.read_csv(RESULTS / "decoupling_items.csv")) == len(decoupled)
heldout.query("control == 'gradient' and metric == 'domain accuracy'")[["set", "estimate", "low", "high", "n"]]
