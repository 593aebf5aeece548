# %% [markdown]
# # 07 · Seeds, ablations and the main table
# The main describer is retrained with other seeds, and variants of it are trained with one setting changed; every
# run starts from the settings recorded in the `train` stage's checkpoint (same items, steps, batch, learning rate)
# and is scored on the held-out items of the `evaluate` stage: its test-subject items and its decoupling plan
# (passage from domain A, gradient from domain B ≠ A). Seeds use all of them; variants the subset the `controls`
# stage scored (its `max_items`, `decoupling_per_pair`), where the main describer was re-scored on the same items.
#
# - **Seeds**: `seeds` (seed `seed` is the train stage's run, read from `results/evaluate/`), at the train stage's
#   budget.
# - **Budget**: `variant_epochs` (when set) trains every variant for that many epochs, and then the main settings are
#   retrained at the same budget as the row the variants compare with ("main settings, variant budget").
# - **Ablations** (`variants`): magnitude mode (norm-matched vs raw × learned scale), source layer (≈ 25 / 50 / 75 %
#   depth), projector kind (linear / MLP / linear + LoRA), gradient ↔ steering-vector transfer (a describer trained on
#   steering vectors, tested on both; the main describer tested on steering vectors), and correcting-an-error vs
#   pushing-a-counterfactual items (the main describer's rates split by direction).
# - **Selection on validation**: every variant is also scored on `selection_items` validation items (trained
#   templates and domains, never test); the variant a researcher would pick is the best there (`selection.csv`).
# - **Held-out-domain rotation**: one describer per domain of `heldout_folds`, each trained without that domain, at the
#   variants' budget, beside the run that holds out the train stage's `heldout_domain` at the same budget; each is
#   scored on up to `fold_items` items of its own held-out domain (answer recall, domain forced choice among every
#   domain name, the round trip), and the held-out-domain number is the mean over the folds.
# - **The main table**: the main result (seeds pooled: CIs resample items, each seed's estimate as its own spread),
#   every control of stage `controls` and every ablation, each beside its paired difference against the main
#   describer (controls) or the main settings at the variants' budget (ablations) on the same items, as CSV and
#   LaTeX.
#
# Outputs: `results/ablations/` (main_table, seeds, ablations, per-item descriptions, run timings), `figures/ablations/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
seeds = [1, 2]
variants = [
    {"name": "raw × learned scale", "mode": "raw"},
    {"name": "source layer 7 (25%)", "source_layer": 7},
    {"name": "source layer 22 (75%)", "source_layer": 22},
    {"name": "MLP projector", "kind": "mlp"},
    {"name": "linear + LoRA (r = 8)", "lora_rank": 8},
    {"name": "trained on steering vectors", "train_on": "steering"},
]
variant_epochs = None
selection_items = 3
heldout_folds = ["history"]
fold_items = 3
batch_size = 16
n_boot = 200

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import gradsense
from gradsense import controls as ct
from gradsense import decoupling as dc
from gradsense import evaluate as ev
from gradsense import folds as fd
from gradsense import main_table as mt
from gradsense import selection as sl
from gradsense.checkpoint import load_describer, variant_configs
from gradsense.inputs import contexts_path, load_stage_inputs, read_contexts, training_items, validation_set
from gradsense.passages import training_passages
from gradsense.paths import Paths
from gradsense.report import save_figure, save_json, save_table
from gradsense.sampling import stratified
from gradsense.seeding import seed_everything
from gradsense.training import train_projector

PATHS = Paths("..")
RESULTS, FIGURES = PATHS.results("ablations"), PATHS.figures("ablations")
rng = seed_everything(seed)

# %%
model, tokenizer = gradsense.load_model(model_name, device=device)
main = load_describer(PATHS.checkpoint, model, tokenizer)
meta = main.meta
inputs = load_stage_inputs(PATHS)
items = inputs.items
VECTORS = {"gradient": "grads", "steering": "steering"}  # what a describer reads → its array in gradients.npz
neutral = read_contexts(contexts_path()).query("pool == 'neutral'")["text"].tolist()
heldout_domain = meta.get("heldout_domain")
train_items, val_pool = training_items(items, heldout_domain)
val_items = stratified(val_pool, "domain", selection_items, order="shuffle", seed=seed)  # the selection's items
pool, negatives = training_passages(neutral, train_items, seed)  # the train stage's passages
main_test = ev.main_test_rows(pd.read_csv(PATHS.descriptions))
main_decoupled = pd.read_csv(PATHS.decoupling_items)
test_all = ev.select_items(items, main_test["id"])
plan_all = dc.replay_plan(main_decoupled, items, None)
# Variants are scored on the controls stage's items; its "trained describer" and "steering vector" rows are the main
# describer on them (re-scored there with the same decoding), so they are read, not recomputed.
control_items = pd.read_csv(PATHS.controls_items)
main_sub = ct.stored_condition(control_items, ct.TRAINED)
test_sub = ev.select_items(items, main_sub[0]["id"])
plan_sub = dc.replay_plan(main_sub[1], items, None)
print(
    f"seeds: {len(test_all)} test items, {len(plan_all)} pairs; variants: {len(test_sub)} items, {len(plan_sub)} pairs;"
    f" selection: {len(val_items)} validation items"
)

# %% [markdown]
# ## Train and score every run
# Each run trains a fresh projector with its settings (LoRA runs on a freshly loaded model, so that adapters never
# leak into another run) and is scored with the same structured greedy decoding as the `evaluate` stage.

# %%
options = {"seed": seed, "batch_size": batch_size, "max_new_tokens": 0}  # the head only, as in `evaluate`
domains = {"domains": sorted(items["domain"].unique())}  # naming one of these = feeling a pressure


def train_run(overrides: dict, fold: str | None = None):
    """Train one describer from the main checkpoint's settings with `overrides` (+ `train_on`), on the training
    items and passages of the train stage, or — for a held-out `fold` — of every domain but that one; returns it."""
    overrides = dict(overrides)
    train_on = overrides.pop("train_on", "gradient")
    config, train = variant_configs(meta, overrides)
    run_model = model if config.lora_rank == 0 else gradsense.load_model(model_name, device=device)[0]
    source = inputs.vectors(VECTORS[train_on], config.source_layer)
    rows, (passages, hard) = train_items, (pool, negatives)
    if fold is not None:
        rows, _ = training_items(items, fold)
        passages, hard = training_passages(neutral, rows, seed)
    # the validation items that pick the step are those of the train stage (of the trained domains)
    val_rows = validation_set(val_pool[val_pool["domain"] != fold], meta.get("train", {}).get("val_items", 32))
    describer, _ = train_projector(
        run_model,
        tokenizer,
        source[rows["row"].to_numpy()],
        rows["label"].tolist(),
        config,
        train,
        passages,
        hard_negatives=hard,
        val=(source[val_rows["row"].to_numpy()], val_rows["label"].tolist()),
    )
    return describer


runs, timings, selection = {}, [], {}
for run_seed in seeds:
    start = time.perf_counter()
    describer = train_run({"seed": run_seed})
    grads = inputs.vectors("grads", describer.config.source_layer)
    runs[(mt.SEED, f"seed {run_seed}")] = mt.core_evaluation(
        describer, grads, items, test_all, plan_all, **options, **domains
    )
    timings.append({"run": f"seed {run_seed}", "seconds": time.perf_counter() - start})
runs[(mt.MAIN_ON_SUBSET, "main describer (seed 0)")] = main_sub
runs[(mt.TRANSFER, "gradient-trained, tested on steering vectors")] = ct.stored_condition(control_items, ct.STEERING)
budget = {} if variant_epochs is None else {"epochs": variant_epochs}
REFERENCE = "main settings, variant budget"
reference = [{"name": REFERENCE}] if budget else []
for variant in reference + variants:
    start = time.perf_counter()
    overrides = budget | {k: v for k, v in variant.items() if k != "name"}
    describer = train_run(overrides)
    layer = describer.config.source_layer
    runs[(mt.ABLATION, variant["name"])] = mt.core_evaluation(
        describer, inputs.vectors("grads", layer), items, test_sub, plan_sub, **options, **domains
    )
    grads_val = inputs.vectors(VECTORS[overrides.get("train_on", "gradient")], layer)
    selection[variant["name"]] = ev.describe_items(describer, grads_val, val_items, **options, **domains)
    if variant["name"] == REFERENCE:
        budget_describer = describer  # the held-out-domain fold of `heldout_domain` at the variants' budget
    if overrides.get("train_on") == "steering":
        runs[(mt.TRANSFER, "steering-trained, tested on steering vectors")] = mt.core_evaluation(
            describer, inputs.vectors("steering", layer), items, test_sub, plan_sub, **options, **domains
        )
    timings.append({"run": variant["name"], "seconds": time.perf_counter() - start})
if not budget:
    budget_describer = main  # no separate budget: the train stage's describer is the fold of `heldout_domain`
fold_runs = {heldout_domain: budget_describer}
for fold in heldout_folds:
    start = time.perf_counter()
    fold_runs[fold] = train_run(budget, fold=fold)
    timings.append({"run": f"held-out domain fold: {fold}", "seconds": time.perf_counter() - start})
save_json({"runs": timings}, RESULTS / "timing.json")  # timings stay out of the tables (reproducible)
per_item = mt.per_item_table(runs, ["group", "condition"])
save_table(per_item, RESULTS, "ablation_items")

# %% [markdown]
# ## Seeds: the main result with three describers
# Seed `seed` is the `train` stage's describer (its `evaluate` outputs on the same items); the pooled row resamples
# (item, seed) pairs.

# %%
seed_runs = {f"seed {seed}": (main_test, main_decoupled)} | {
    name: pair for (group, name), pair in runs.items() if group == mt.SEED
}
seeds_table = mt.seeds_table(seed_runs, n_boot, seed)
spread = mt.seed_spread(seeds_table)
save_table(seeds_table, RESULTS, "seeds")
save_table(spread.reset_index(), RESULTS, "seed_spread")
spread.round(3)

# %% [markdown]
# ## Ablations, transfer, and correcting vs counterfactual items

# %%
pooled_test, pooled_decoupled = mt.pool(list(seed_runs.values()))
ablation_rows = mt.run_rows({key: pair for key, pair in runs.items() if key[0] != mt.SEED}, n_boot, seed)
ablation_rows += mt.direction_rows(pooled_test, pooled_decoupled, items, n_boot, seed)
ablations = pd.DataFrame(ablation_rows)
# Paired differences on the same items: each ablation against the main settings at its budget, transfer rows and
# that reference against the main describer.
reference_pairs = {"main describer (seed 0)": main_sub} | (
    {REFERENCE: runs[(mt.ABLATION, REFERENCE)]} if budget else {}
)
against = {
    key: (REFERENCE if budget and key[0] == mt.ABLATION and key[1] != REFERENCE else "main describer (seed 0)")
    for key in runs
    if key[0] in (mt.ABLATION, mt.TRANSFER)
}
ablations = mt.with_paired(ablations, mt.paired_rows(runs, against, reference_pairs, n_boot, seed))
save_table(ablations, RESULTS, "ablations")

# %% [markdown]
# ## Selection on validation items
# The variant a researcher would keep is chosen on validation items only (trained templates and domains, the
# `val` split): the highest answer recall, then domain accuracy. Its test row above is its one score on test.

# %%
selection_table = sl.selection_table(selection, items, n_boot, seed)
chosen_variant = sl.choose(selection_table)
save_table(selection_table, RESULTS, "selection")
save_json({"chosen": chosen_variant, "split": "val", "n_items": len(val_items)}, RESULTS / "selection.json")
print(f"chosen on validation: {chosen_variant}")
selection_table

# %% [markdown]
# ## Held-out-domain rotation
# One describer per held-out domain (`heldout_domain` and every `heldout_folds` domain), each trained at the variants'
# budget without its domain and scored on that domain's items; the mean over folds weighs each fold the same, its CI
# resamples items within each fold.

# %%
all_domains = sorted(items["domain"].unique())
fold_frames = {}
for fold, describer in fold_runs.items():
    members = fd.fold_items(items, fold, fold_items, seed)
    fold_frames[fold] = fd.score_fold(
        describer, inputs.vectors("grads", describer.config.source_layer), members, all_domains, seed, batch_size
    )
fold_table = fd.fold_table(fold_frames, n_boot, seed)
save_table(fold_table, RESULTS, "heldout_folds")
save_table(
    pd.concat([f.assign(fold=k) for k, f in fold_frames.items()], ignore_index=True), RESULTS, "heldout_fold_items"
)
fold_table.pivot_table(index="fold", columns="metric", values="estimate").round(3)

# %% [markdown]
# ## The main table
# The main result (seeds pooled), every control (stage `controls`), the ablations and transfer rows; rates with
# bootstrap 95% CIs ("n/a": the condition cannot produce that metric).

# %%
controls = pd.read_csv(PATHS.controls)
long = mt.main_table_long(seeds_table, controls, ablations)
save_table(long, RESULTS, "main_table_long")
table = mt.main_table(long)
save_table(table, RESULTS, "main_table")
paired_table = mt.paired_table(long)
save_table(paired_table, RESULTS, "main_table_paired")
table

# %%
metrics = ["domain accuracy", "decoupling success", "decoupling leakage"]
conditions = list(dict.fromkeys(zip(long["group"], long["condition"])))
fig, axes = plt.subplots(1, len(metrics), figsize=(14, 0.36 * len(conditions) + 1.8), sharey=True)
y = np.arange(len(conditions))
for ax, metric in zip(axes, metrics):
    part = long[long["metric"] == metric].set_index(["group", "condition"]).reindex(conditions)
    colors = [f"C{sorted(set(g for g, _ in conditions)).index(g)}" for g, _ in conditions]
    ax.errorbar(
        part["estimate"],
        y,
        xerr=[part["estimate"] - part["low"], part["high"] - part["estimate"]],
        fmt="none",
        ecolor="grey",
    )
    ax.scatter(part["estimate"], y, c=colors, zorder=3)
    ax.set(title=metric, xlim=(-0.05, 1.05), yticks=y, yticklabels=[f"{c} · {g}" for g, c in conditions])
    ax.invert_yaxis()
fig.suptitle("Main table: main result, controls and ablations (95% bootstrap CIs)")
fig.tight_layout()
save_figure(fig, FIGURES, "main_table")

# %% [markdown]
# ## Checks

# %%
assert long["estimate"].between(0, 1).all() and (long["low"] <= long["estimate"]).all()
assert (long["estimate"] <= long["high"]).all() and (long["n"] > 0).all()
assert len(seed_runs) == len(seeds) + 1 and {mt.SEED, mt.ABLATION, mt.TRANSFER} <= {g for g, _ in runs}
pooled_success = mt.main_result(long).loc[["decoupling success"]]
assert len(pooled_success) == 1 and pooled_success["n"].iloc[0] == len(pooled_decoupled)
assert all(len(s) == len(test_sub) for (g, _), (s, _) in runs.items() if g != mt.SEED)
# every ablation and transfer row carries a paired difference; leakage leaves out passages no describer can name
compared = long[long["group"].isin([ct.GROUP, mt.ABLATION, mt.TRANSFER]) & (long["condition"] != ct.TRAINED)]
assert compared.groupby(["group", "condition"])["difference"].apply(lambda d: d.notna().any()).all()
leak = mt.main_result(long).loc["decoupling leakage"]
assert leak["n"] + leak["excluded"] == len(pooled_decoupled)
assert set(selection_table["split"]) == {"val"} and chosen_variant in selection
assert len(fold_frames) == len(heldout_folds) + 1 and set(fold_table["fold"]) == {*fold_frames, fd.MEAN}
# The written main table has one row per (group, condition) of the long form, "n/a" where a metric cannot exist.
written = pd.read_csv(RESULTS / "main_table.csv", keep_default_na=False)
assert len(written) == len(set(zip(long["group"], long["condition"]))) and len(written) == len(table)
assert (written.loc[written["condition"] == ct.BACKWARD_LENS, "domain accuracy"] == "n/a").all()
table
