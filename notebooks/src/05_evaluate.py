# %% [markdown]
# # 05 · Evaluate the describer
# The trained describer (`results/train/checkpoint`) reads gradients it never saw and says what pressure it feels
# by structured greedy decoding: the head's field names `domain: … | from: … | to: …` are given and the model says
# each value (the labels' format; every head parses), then `max_new_tokens` tokens of free sentence (0: none).
#
# - **Held-out sets**: new subjects (test split), held-out relation templates (test split), and the domain left out
#   of training (`heldout_domain` in the checkpoint).
# - **External sets**: corrections the describer never trained on and no setting was chosen on: a third-party fact
#   dataset (GeoNames) and hand-written facts in relation templates that appear nowhere in training, each also read
#   inside unseen passages (decoupling).
# - **Metrics**: domain accuracy (parsed domain = the item's domain); answer recall (the whole target, normalised
#   for case, spaces and punctuation, as words of `to`), exact match, 'from' recall (`from` = the source or the
#   model's answer now, as its label says); forced
#   choice (the item's own label ranked against the labels of 9 other items by the mean per-token log-likelihood
#   under the injection; chance 0.1); false positives ("names a domain": one of the corpus's domains is named,
#   under no injection or norm-matched noise); the shuffled-gradient control: each item's own fact prompt is read as the
#   passage while another item's gradient is injected, scored against the injected item ("names the read item's
#   domain" = the report follows the prompt instead, among pairs whose domains differ).
# - **Decoupling**: a passage from domain A is read before the question while a gradient from domain B ≠ A is
#   injected, over all ordered domain pairs; success = reports B, leakage = reports A. The seed's case (a history
#   gradient inside a biology passage) is reported on its own line, from `seed_case_items` history items.
#
# - **Baselines on the same items**: the most frequent training answer of the item's relation template, no injection
#   (a control above), a same-template shuffle (another item of the same relation injected: does the report say that
#   item's answer?), the Backward Lens hit@1 (top token of −g) at every extracted layer (the source layer's first),
#   and a linear probe of the domain trained on the training gradients.
# - **Round trip** (open vocabulary, exact because gradients are computable): the gradient of (prompt → the described
#   `to`) against the true gradient (cosine), beside the same for the answer of another item of the same template.
#
# Rates carry 95% CIs from `gradsense.stats.rate_interval`: a percentile bootstrap over items (decoupling rows
# clustered by passage), a Wilson interval for a 0/1 rate within 0.05 of 0 or 1. Leakage counts only passages of a
# domain the describer was trained to name. Outputs: `results/evaluate/`, `figures/evaluate/`.

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
max_external_items = 6
external_per_pair = 1
batch_size = 16
max_new_tokens = 0
n_boot = 200

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

import gradsense
from gradsense import baselines as bl
from gradsense import decoupling as dc
from gradsense import evaluate as ev
from gradsense import external as ex
from gradsense import forced_choice as fc
from gradsense.analysis import probe_predictions
from gradsense.checkpoint import load_describer
from gradsense.corrections import template_kinds
from gradsense.inputs import contexts_path, load_stage_inputs, read_contexts, training_items
from gradsense.paths import Paths
from gradsense.report import save_figure, save_table
from gradsense.sampling import stratified
from gradsense.seeding import seed_everything
from gradsense.stats import bootstrap_ci, rate_rows

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
# External items: gradients at every extracted layer, the source layer (what the describer reads) first; the Backward
# Lens reads each of them (its first row is the source layer's, the one the replication table takes).
layers = [int(x) for x in inputs.arrays["layers"]]
lens_layers = [config.source_layer, *[x for x in layers if x != config.source_layer]]
external = ex.external_items(max_items=max_external_items, seed=seed)
with describer.original_model():  # gradients of the model the oracle ran, not of the LoRA-tuned describer
    external_grads = ex.external_gradients(model, tokenizer, external, lens_layers, batch_size)
ext_source = external_grads[lens_layers.index(config.source_layer)]
ext_sets = {name: external[external["set"] == name] for name in ex.SETS}
train_items = training_items(items, heldout_domain)[0]
pd.DataFrame(
    {
        "set": [*sets, *ext_sets],
        "items": [len(s) for s in [*sets.values(), *ext_sets.values()]],
        "domains": [s["domain"].nunique() for s in [*sets.values(), *ext_sets.values()]],
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
for name, frame in ext_sets.items():
    if len(frame):
        scored[(name, "gradient")] = ev.describe_items(describer, ext_source, frame, **options)
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
# Two versions on the same test items, each with and without injection (the no-injection row shows what the label
# prior alone picks):
# - **Across domains** (`forced choice top-1`): distractors are labels of 9 other items of any template and split,
#   so mostly of other domains; chance 1/`n_choices` = 0.1.
# - **Same template** (`forced choice top-1, same template`): distractors are labels of other items (any split) of
#   the item's own relation template, so domain and relation are shared and only the answers (`from`, `to`) tell
#   them apart. Sets hold `n_same` = min(`n_choices`, 1 + the most distinct other labels a chosen item's template
#   offers) labels; items whose template offers fewer are left out (counts printed below); chance 1/`n_same`
#   (0.1 when every template has ≥ 9 other labels, as in the full run).

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
# Same template: distractors are other items' labels of the item's own relation template (answer-level choice).
labelled = items.dropna(subset=["label"])
same_args = (labelled["label"].tolist(), labelled["relation"].tolist())
available = fc.template_distractor_counts(chosen["label"].tolist(), chosen["relation"].tolist(), *same_args)
n_same = int(min(n_choices, max(2, 1 + available.max(initial=0))))
same = chosen[available >= n_same - 1]
same_sets = fc.template_choice_sets(same["label"].tolist(), same["relation"].tolist(), *same_args, n_same, seed)
forced_same = {
    control: fc.forced_choice(
        describer,
        grads[same["row"].to_numpy()],
        control=control,
        seed=seed,
        batch_size=batch_size,
        max_label_tokens=max_label_tokens,
        sets=same_sets,
    )
    for control in ("gradient", "none")
    if len(same)
}
print(f"same-template forced choice: {len(same)} of {len(chosen)} items, {n_same} choices each (chance 1/{n_same})")
# Domain forced choice among every domain name (the held-out one included): the head's first value under the
# injection, scored for each name, on up to `forced_choice_items` items of every set.
all_domains = sorted(set(items["domain"]) | set(external["domain"]))
choice_rows = []
for name, control in scored:
    if control == "gradient":
        vectors, members = (ext_source, ext_sets[name]) if name in ext_sets else (grads, sets[name])
        subset = stratified(members, "domain", forced_choice_items, order="shuffle", seed=seed)
        scores = fc.domain_logprobs(describer, vectors[subset["row"].to_numpy()], all_domains, batch_size)
        hits = fc.domain_choice(scores, subset["domain"], all_domains)
        choice_rows += rate_rows({fc.DOMAIN_CHOICE: hits}, n_boot, seed, set=name, control="gradient")
# Held-out templates split into paraphrases of a trained relation and new relations; answers seen or not in training.
kinds = template_kinds(items.drop_duplicates("fact_id"))
split_rows = []
templates = scored[(ev.HELDOUT_TEMPLATES, "gradient")].merge(items[["id", "relation"]], on="id")
for kind, part in templates.groupby(templates["relation"].map(kinds)):
    values = {m: part[c].to_numpy() for m, c in ev.METRICS.items()}
    split_rows += rate_rows(values, n_boot, seed, set=f"{ev.HELDOUT_TEMPLATES}: {kind}", control="gradient")
trained_answers = train_items["target"].tolist()
for (name, control), frame in list(scored.items()):
    if control == "gradient":
        seen = ev.seen_answers(frame["target"], trained_answers)
        for label, mask in (("answer seen in training", seen), ("answer never trained", ~seen)):
            if mask.any():
                values = {ev.ANSWER_RECALL: frame["answer_ok"].to_numpy()[mask]}
                split_rows += rate_rows(values, n_boot, seed, set=f"{name}: {label}", control="gradient")
heldout = pd.concat(
    [
        ev.heldout_table(scored, n_boot, seed),
        pd.DataFrame(fc.forced_choice_rows(forced, n_boot, seed)),
        pd.DataFrame(fc.forced_choice_rows(forced_same, n_boot, seed, metric=fc.TOP_1_TEMPLATE)),
        pd.DataFrame(choice_rows),
        pd.DataFrame(split_rows),
    ],
    ignore_index=True,
)
save_table(heldout, RESULTS, "heldout")
# Per domain and direction, with item-level CIs, for every set under the gradient.
by_group = pd.concat(
    [
        ev.rates_by(
            frame,
            ["domain", "direction"],
            {m: ev.METRICS[m] for m in ("domain accuracy", ev.ANSWER_RECALL, "'from' recall")},
            n_boot,
            seed,
            set=name,
        )
        for (name, control), frame in scored.items()
        if control == "gradient"
    ],
    ignore_index=True,
)
save_table(by_group, RESULTS, "heldout_by_domain")
heldout.pivot_table(index=["set", "control"], columns="metric", values="estimate", sort=False).round(3)

# %% [markdown]
# ## Baselines on the same items, and the round trip
# Every row of `baselines` is scored on the same items as the describer's row of its set. The round trip re-derives
# a gradient from what the describer said (`to`) and compares it with the gradient it read.


# %%
def set_vectors(name, layer):
    """The gradient array (at `layer`) that a set's items index with `row`, and the set's items."""
    if name in ext_sets:
        return external_grads[lens_layers.index(layer)], ext_sets[name].reset_index(drop=True)
    return inputs.vectors("grads", layer), sets[name].reset_index(drop=True)


train_x, train_domains = grads[train_items["row"].to_numpy()], train_items["domain"].to_numpy()
baseline_rows, roundtrip_rows, roundtrip_items = [], [], []
for (name, control), frame in scored.items():
    if control != "gradient":
        continue
    vectors, members = set_vectors(name, config.source_layer)
    rows, targets = members["row"].to_numpy(), members["target"].to_numpy()
    answer = {"describer": frame["answer_ok"].to_numpy()}
    majority = bl.majority_answers(train_items, members)
    answer["most frequent training answer of the template"] = [
        ev.answer_identified(m, t) for m, t in zip(majority, targets)
    ]
    for layer in lens_layers:
        answer[f"Backward Lens hit@1 (block {layer})"] = bl.lens_hits(
            model, tokenizer, set_vectors(name, layer)[0][rows], list(targets)
        )
    partners = bl.same_template_partners(members, seed)
    has = partners >= 0
    if has.any():
        swapped = describer.describe_gradients(vectors[rows[partners[has]]], batch_size=batch_size, max_new_tokens=0)
        answer["same-template shuffle: the injected item's answer"] = [
            ev.answer_identified(t, a) for t, a in zip(swapped["to"], targets[partners[has]])
        ]
        answer["same-template shuffle: the read item's answer"] = [
            ev.answer_identified(t, a) for t, a in zip(swapped["to"], targets[has])
        ]
    for baseline, values in answer.items():
        baseline_rows += rate_rows({ev.ANSWER_RECALL: values}, n_boot, seed, set=name, baseline=baseline)
    stacked = np.vstack([train_x, vectors[rows]])
    is_train = np.arange(len(stacked)) < len(train_x)
    probe = probe_predictions(stacked, np.concatenate([train_domains, members["domain"]]), is_train, ~is_train, seed)
    domain = {
        "describer": frame["domain_ok"].to_numpy(),
        "linear probe on the training gradients": probe == members["domain"],
    }
    for baseline, values in domain.items():
        baseline_rows += rate_rows({"domain accuracy": values}, n_boot, seed, set=name, baseline=baseline)
    with describer.original_model():
        trip = bl.paired_roundtrip(
            model,
            tokenizer,
            members,
            frame["reported_to"].tolist(),
            vectors[rows],
            config.source_layer,
            seed,
            batch_size,
        )
    roundtrip_items.append(trip.assign(set=name))
    both = trip.dropna(subset=["cos_described", "cos_partner"])
    for what, values in (
        ("described 'to'", trip["cos_described"].dropna()),
        ("another item's answer, same template", trip["cos_partner"].dropna()),
        ("described − other (paired)", both["cos_described"] - both["cos_partner"]),
    ):
        est, low, high = bootstrap_ci(values.to_numpy(), n_boot=n_boot, seed=seed)
        roundtrip_rows.append(
            {"set": name, "gradient of": what, "mean cosine": est, "low": low, "high": high, "n": len(values)}
        )
baselines = pd.DataFrame(baseline_rows)
save_table(baselines, RESULTS, "baselines")
roundtrip = pd.DataFrame(roundtrip_rows)
save_table(roundtrip, RESULTS, "roundtrip")
save_table(pd.concat(roundtrip_items, ignore_index=True), RESULTS, "roundtrip_items")
baselines.pivot_table(index=["set", "metric"], columns="baseline", values="estimate", sort=False).round(3)

# %%
roundtrip

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
# External sets: their gradients read inside the unseen external passages, every ordered domain pair.
EXTERNAL_PAIRS = "external sets: all pairs"
ext_plan = dc.decoupling_plan(external, ex.external_passages(), external_per_pair, None, seed)
ext_decoupled = dc.run_decoupling(
    describer, ext_source, ext_plan, external, tokenizer, batch_size, max_new_tokens, seed
).merge(external[["id", "set"]], on="id")
save_table(ext_decoupled, RESULTS, "external_decoupling_items")
parts = {"all pairs": decoupled, SEED_CASE: seed_case, EXTERNAL_PAIRS: ext_decoupled}
decoupling_summary = dc.decoupling_summary(parts, n_boot, seed)
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
plot = heldout[heldout["metric"].isin(["domain accuracy", ev.ANSWER_RECALL, "names a domain", fc.TOP_1])]
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
assert all(frame["rank"].between(0, n_same - 1).all() and len(frame) == len(same) for frame in forced_same.values())
assert (heldout["metric"] == fc.TOP_1_TEMPLATE).sum() == len(forced_same)  # one row per control when any item fits
same_pools = labelled.groupby("relation")["label"].agg(set)
assert all(set(s[1:]) <= same_pools[r] and s[0] not in s[1:] for s, r in zip(same_sets, same["relation"]))
if seed_plan is not None:
    assert len(seed_case) > 0 and SEED_CASE in set(decoupling_summary["pairs"])
    assert (seed_case["gradient_domain"] == "history").all() and (seed_case["context_domain"] == "biology").all()
# Baselines are scored on the same items as the describer's row of their set; the external sets never trained.
for name, part in baselines.groupby("set"):
    assert part["n"][part["baseline"] == "describer"].iloc[0] == len(scored[(name, "gradient")])
assert set(ext_sets) <= set(baselines["set"]) and not set(external["fact_id"]) & set(items["fact_id"])
assert (ext_decoupled["gradient_domain"] != ext_decoupled["context_domain"]).all()
paired = roundtrip["gradient of"].str.contains("paired")  # a difference of two cosines lies in [-2, 2]
assert roundtrip.loc[~paired, "mean cosine"].dropna().between(-1, 1).all()
assert roundtrip.loc[paired, "mean cosine"].dropna().between(-2, 2).all()
# What was written is what was computed (read back, not only present).
written = pd.read_csv(RESULTS / "heldout.csv")
assert len(written) == len(heldout) and list(written["metric"]) == list(heldout["metric"])
assert len(pd.read_csv(RESULTS / "descriptions.csv")) == len(descriptions)
pairs_written = pd.read_csv(RESULTS / "decoupling_pairs.csv")
assert len(pairs_written) == len(pair_rates)
assert set(pairs_written.columns) == {"context_domain", "gradient_domain", "success", "leakage"}
assert len(pd.read_csv(RESULTS / "decoupling_items.csv")) == len(decoupled)
heldout.query("control == 'gradient' and metric == 'domain accuracy'")[["set", "estimate", "low", "high", "n"]]
