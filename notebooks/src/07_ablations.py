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
# - **The main table**: the main result (seeds pooled), every control of stage `controls` and every ablation, with
#   bootstrap 95% CIs, as CSV and LaTeX.
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
from gradsense import main_table as mt
from gradsense.checkpoint import load_describer, variant_configs
from gradsense.inputs import contexts_path, load_stage_inputs, read_contexts, training_items
from gradsense.passages import training_passages
from gradsense.paths import Paths
from gradsense.report import save_figure, save_json, save_table
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
train_items, _ = training_items(items, meta.get("heldout_domain"))
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
    f"seeds: {len(test_all)} test items, {len(plan_all)} pairs; variants: {len(test_sub)} items, {len(plan_sub)} pairs"
)

# %% [markdown]
# ## Train and score every run
# Each run trains a fresh projector with its settings (LoRA runs on a freshly loaded model, so that adapters never
# leak into another run) and is scored with the same structured greedy decoding as the `evaluate` stage.

# %%
options = {"seed": seed, "batch_size": batch_size, "max_new_tokens": 0}  # the head only, as in `evaluate`
domains = {"domains": sorted(items["domain"].unique())}  # naming one of these = feeling a pressure


def train_run(overrides: dict):
    """Train one describer from the main checkpoint's settings with `overrides` (+ `train_on`); returns it."""
    overrides = dict(overrides)
    train_on = overrides.pop("train_on", "gradient")
    config, train = variant_configs(meta, overrides)
    run_model = model if config.lora_rank == 0 else gradsense.load_model(model_name, device=device)[0]
    source = inputs.vectors(VECTORS[train_on], config.source_layer)
    describer, _ = train_projector(
        run_model,
        tokenizer,
        source[train_items["row"].to_numpy()],
        train_items["label"].tolist(),
        config,
        train,
        pool,
        hard_negatives=negatives,
    )
    return describer


runs, timings = {}, []
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
reference = [{"name": "main settings, variant budget"}] if budget else []
for variant in reference + variants:
    start = time.perf_counter()
    overrides = budget | {k: v for k, v in variant.items() if k != "name"}
    describer = train_run(overrides)
    layer = describer.config.source_layer
    runs[(mt.ABLATION, variant["name"])] = mt.core_evaluation(
        describer, inputs.vectors("grads", layer), items, test_sub, plan_sub, **options, **domains
    )
    if overrides.get("train_on") == "steering":
        runs[(mt.TRANSFER, "steering-trained, tested on steering vectors")] = mt.core_evaluation(
            describer, inputs.vectors("steering", layer), items, test_sub, plan_sub, **options, **domains
        )
    timings.append({"run": variant["name"], "seconds": time.perf_counter() - start})
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
save_table(ablations, RESULTS, "ablations")

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
# The written main table has one row per (group, condition) of the long form, "n/a" where a metric cannot exist.
written = pd.read_csv(RESULTS / "main_table.csv", keep_default_na=False)
assert len(written) == len(set(zip(long["group"], long["condition"]))) and len(written) == len(table)
assert (written.loc[written["condition"] == ct.BACKWARD_LENS, "domain accuracy"] == "n/a").all()
table
