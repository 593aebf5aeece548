# %% [markdown]
# # 07 · Seeds, ablations and the main table
# Collects the describer trainings of params.yaml's `runs:`: each is its own `training@<key>` stage instance in
# dvc.yaml (`gradsense run <key>`, cached on its own entry: changing one variant retrains that one only). Every run
# starts from the settings recorded in the `train` stage's checkpoint (same items, steps, batch, learning rate), changes
# the ones its entry names, and is scored on the held-out items of the `evaluate` stage: its test-subject items and its
# decoupling plan (passage from domain A, gradient from domain B ≠ A). Seeds use all of them; variants the subset the
# `controls` stage scored (its `max_items`, `decoupling_per_pair`), where the main describer was re-scored on the same
# items.
#
# - **Seeds** (role `seed`; seed `seed` is the train stage's run, read from `results/evaluate/`), at the train
#   stage's budget.
# - **Budget**: the run with role `reference` is the main settings at the variants' budget (the full preset trains
#   every variant 1 epoch, the paper says so), the row the variants compare with ("main settings, variant budget");
#   without one (the ci preset) the variants compare with the main describer.
# - **Ablations** (role `variant`): magnitude mode (norm-matched vs raw × learned scale), source layer (≈ 25 / 50 /
#   75 % depth), projector kind (linear / MLP / linear + LoRA), gradient ↔ steering-vector transfer (a describer
#   trained on steering vectors, tested on both; the main describer tested on steering vectors), and
#   correcting-an-error vs pushing-a-counterfactual items (the main describer's rates split by direction).
# - **Selection on validation**: every variant is also scored on `selection_items` validation items (trained
#   templates and domains, never test); the variant a researcher would pick is the best there (`selection.csv`).
# - **Held-out-domain rotation** (role `fold`): one describer per fold, each trained without that domain, beside the
#   one that holds out the train stage's `heldout_domain` at the same budget (the reference run, or the train stage's
#   describer); each is scored on up to `fold_items` items of its own held-out domain (answer recall, domain forced
#   choice among every domain name, the round trip), and the held-out-domain number is the mean over the folds.
# - **The main table**: the main result (seeds pooled: CIs resample items, each seed's estimate as its own spread),
#   every control of stage `controls` and every ablation, each beside its paired difference against the main
#   describer (controls) or the reference (ablations) on the same items, as CSV and LaTeX.
#
# Outputs: `results/ablations/` (main_table, seeds, ablations, per-item descriptions), `figures/ablations/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
runs = {
    "seed_1": {"role": "seed", "seed": 1},
    "seed_2": {"role": "seed", "seed": 2},
    "raw": {"role": "variant", "label": "raw × learned scale", "mode": "raw"},
    "layer_7": {"role": "variant", "label": "source layer 7 (25%)", "source_layer": 0.25},
    "layer_22": {"role": "variant", "label": "source layer 22 (75%)", "source_layer": 0.75},
    "mlp": {"role": "variant", "label": "MLP projector", "kind": "mlp", "init": "random"},
    "lora": {"role": "variant", "label": "linear + LoRA (r = 8)", "lora_rank": 8},
    "steering": {"role": "variant", "label": "trained on steering vectors", "train_on": "steering"},
    "fold_history": {"role": "fold", "fold": "history"},
}
selection_items = 3
fold_items = 3
batch_size = 16
n_boot = 200

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from gradsense import controls as ct
from gradsense import folds as fd
from gradsense import main_table as mt
from gradsense import runs as rn
from gradsense import selection as sl
from gradsense.paths import Paths
from gradsense.report import save_figure, save_json, save_table
from gradsense.seeding import seed_everything

PATHS = Paths("..")
RESULTS, FIGURES = PATHS.results("ablations"), PATHS.figures("ablations")
rng = seed_everything(seed)

# %%
specs = rn.run_specs(runs)
ctx = rn.load_context(PATHS, model_name, device, seed, selection_items, fold_items, batch_size)
frames = {key: rn.read_run(PATHS.root, spec) for key, spec in specs.items()}  # one-line error when a run is missing
main_test, main_decoupled, items = ctx.main_test, ctx.main_decoupled, ctx.items
main_sub = ct.stored_condition(ctx.control_items, ct.TRAINED)
print(
    f"{len(specs)} runs; seeds: {len(ctx.test_all)} test items, {len(ctx.plan_all)} pairs; variants:"
    f" {len(ctx.test_sub)} items, {len(ctx.plan_sub)} pairs; selection: {len(ctx.val_items)} validation items"
)

# %% [markdown]
# ## Every run's scores
# Variants are scored on the controls stage's items; its "trained describer" and "steering vector" rows are the main
# describer on them (re-scored there with the same decoding), so they are read, not recomputed.

# %%
reference = next((s for s in specs.values() if s.role == "reference"), None)
collected, selection, fold_frames = {}, {}, {}
for key, spec in specs.items():
    if spec.role == "seed":
        collected[(mt.SEED, spec.label)] = (frames[key]["test"], frames[key]["decoupled"])
collected[(mt.MAIN_ON_SUBSET, f"main describer (seed {seed})")] = main_sub
collected[(mt.TRANSFER, "gradient-trained, tested on steering vectors")] = ct.stored_condition(
    ctx.control_items, ct.STEERING
)
for key, spec in specs.items():
    if spec.role in ("reference", "variant"):
        collected[(mt.ABLATION, spec.label)] = (frames[key]["test"], frames[key]["decoupled"])
        selection[spec.label] = frames[key]["selection"]
    if spec.train_on == "steering":
        collected[(mt.TRANSFER, "steering-trained, tested on steering vectors")] = (
            frames[key]["transfer_test"],
            frames[key]["transfer_decoupled"],
        )
# the fold of the train stage's held-out domain: the reference run (variants' budget), else the main describer
fold_frames[ctx.heldout_domain] = (
    frames[reference.key]["fold"] if reference else rn.score_fold(ctx, ctx.main, ctx.heldout_domain)
)
fold_frames |= {spec.fold: frames[key]["fold"] for key, spec in specs.items() if spec.role == "fold"}
per_item = mt.per_item_table(collected, ["group", "condition"])
save_table(per_item, RESULTS, "ablation_items")

# %% [markdown]
# ## Seeds: the main result with three describers
# Seed `seed` is the `train` stage's describer (its `evaluate` outputs on the same items); the pooled row resamples
# (item, seed) pairs.

# %%
seed_runs = {f"seed {seed}": (main_test, main_decoupled)} | {
    name: pair for (group, name), pair in collected.items() if group == mt.SEED
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
ablation_rows = mt.run_rows({key: pair for key, pair in collected.items() if key[0] != mt.SEED}, n_boot, seed)
ablation_rows += mt.direction_rows(pooled_test, pooled_decoupled, items, n_boot, seed)
ablations = pd.DataFrame(ablation_rows)
# Paired differences on the same items: each ablation against the main settings at its budget, transfer rows and
# that reference against the main describer.
MAIN = f"main describer (seed {seed})"
reference_pairs = {MAIN: main_sub} | ({reference.label: collected[(mt.ABLATION, reference.label)]} if reference else {})
against = {
    key: (reference.label if reference and key[0] == mt.ABLATION and key[1] != reference.label else MAIN)
    for key in collected
    if key[0] in (mt.ABLATION, mt.TRANSFER)
}
ablations = mt.with_paired(ablations, mt.paired_rows(collected, against, reference_pairs, n_boot, seed))
save_table(ablations, RESULTS, "ablations")

# %% [markdown]
# ## Selection on validation items
# The variant a researcher would keep is chosen on validation items only (trained templates and domains, the
# `val` split): the highest answer recall, then domain accuracy. Its test row above is its one score on test.

# %%
selection_table = sl.selection_table(selection, items, n_boot, seed)
chosen_variant = sl.choose(selection_table)
save_table(selection_table, RESULTS, "selection")
save_json({"chosen": chosen_variant, "split": "val", "n_items": len(ctx.val_items)}, RESULTS / "selection.json")
print(f"chosen on validation: {chosen_variant}")
selection_table

# %% [markdown]
# ## Held-out-domain rotation
# One describer per held-out domain (the train stage's `heldout_domain` and every fold run's domain), each trained
# without its domain and scored on that domain's items; the mean over folds weighs each fold the same, its CI
# resamples items within each fold.

# %%
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
n_seeds = sum(s.role == "seed" for s in specs.values())
assert len(seed_runs) == n_seeds + 1 and {mt.SEED, mt.ABLATION, mt.TRANSFER} <= {g for g, _ in collected}
pooled_success = mt.main_result(long).loc[["decoupling success"]]
assert len(pooled_success) == 1 and pooled_success["n"].iloc[0] == len(pooled_decoupled)
assert all(len(s) == len(ctx.test_sub) for (g, _), (s, _) in collected.items() if g != mt.SEED)
# every ablation and transfer row carries a paired difference; leakage leaves out passages no describer can name
compared = long[long["group"].isin([ct.GROUP, mt.ABLATION, mt.TRANSFER]) & (long["condition"] != ct.TRAINED)]
assert compared.groupby(["group", "condition"])["difference"].apply(lambda d: d.notna().any()).all()
leak = mt.main_result(long).loc["decoupling leakage"]
assert leak["n"] + leak["excluded"] == len(pooled_decoupled)
assert set(selection_table["split"]) == {"val"} and chosen_variant in selection
assert len(fold_frames) == sum(s.role == "fold" for s in specs.values()) + 1 and set(fold_table["fold"]) == {
    *fold_frames,
    fd.MEAN,
}
# The written main table has one row per (group, condition) of the long form, "n/a" where a metric cannot exist.
written = pd.read_csv(RESULTS / "main_table.csv", keep_default_na=False)
assert len(written) == len(set(zip(long["group"], long["condition"]))) and len(written) == len(table)
assert (written.loc[written["condition"] == ct.BACKWARD_LENS, "domain accuracy"] == "n/a").all()
table
