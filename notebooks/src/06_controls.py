# %% [markdown]
# # 06 · Controls and baselines
# Every cheaper explanation of the describer's reports, run on the same held-out items as the main result: the
# test-subject items of the `evaluate` stage and its decoupling plan (passage from domain A, vector from domain
# B ≠ A), each capped by `max_items` / `decoupling_per_pair` (stratified, seeded; null = all of them).
#
# | condition | what is injected / read |
# |---|---|
# | trained describer | the item's gradient through the trained projector (the main result, on these items) |
# | no injection | nothing (the placeholders stay " ?") |
# | norm-matched noise | Gaussian noise with the gradient's norm, through the projector |
# | shuffled gradients | another item's gradient while the item's own fact is read as the passage; scored against the injected item |
# | steering vector | the item's contrastive steering vector (state after prompt + target − after prompt + source) through the trained projector |
# | untrained projector | the gradient through the projector as it starts before training (`train.init`: lens = −g in every slot; random = seeded), on the original model (LoRA adapters off) |
# | text-only | no injection, the original model (LoRA adapters off); the passage states the fact and its target in words after one labelled example per trained domain (an upper reference: the answer is in the text) |
# | Backward Lens | training-free: the top token of −g through the final norm and unembedding (first answer token only, counted as answer recall) |
# | linear probe | logistic regression on g, trained on the training items (domain only; the ceiling of what g linearly holds) |
#
# Outputs: `results/controls/controls.csv` (rates with bootstrap 95% CIs), `controls_items.csv`, `figures/controls/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
max_items = 4
decoupling_per_pair = 1
text_examples_per_domain = 1
batch_size = 16
n_boot = 200

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import gradsense
from gradsense import analysis
from gradsense import controls as ct
from gradsense import decoupling as dc
from gradsense import evaluate as ev
from gradsense import main_table as mt
from gradsense.checkpoint import load_describer
from gradsense.describer import untrained_describer
from gradsense.inputs import load_stage_inputs, training_items
from gradsense.paths import Paths
from gradsense.report import save_figure, save_table
from gradsense.sampling import stratified
from gradsense.scoring import first_visible_id, target_text
from gradsense.seeding import seed_everything

PATHS = Paths("..")
RESULTS, FIGURES = PATHS.results("controls"), PATHS.figures("controls")
rng = seed_everything(seed)

# %%
model, tokenizer = gradsense.load_model(model_name, device=device)
describer = load_describer(PATHS.checkpoint, model, tokenizer)
inputs = load_stage_inputs(PATHS)
layer = describer.config.source_layer
grads, steering, items = inputs.vectors("grads", layer), inputs.vectors("steering", layer), inputs.items
test_ids = ev.main_test_rows(pd.read_csv(PATHS.descriptions))["id"]
test = stratified(ev.select_items(items, test_ids), "domain", max_items, order="shuffle", seed=seed)
plan = dc.replay_plan(pd.read_csv(PATHS.decoupling_items), items, decoupling_per_pair)
print(f"{len(test)} test items, {len(plan)} decoupling pairs, source layer {layer}")

# %% [markdown]
# ## Describer conditions (same items, same decoding)

# %%
options = {"seed": seed, "batch_size": batch_size, "max_new_tokens": 0}  # the head only, as in `evaluate`
domains = {"domains": sorted(items["domain"].unique())}  # naming one of these = feeling a pressure
runs = {
    ct.TRAINED: mt.core_evaluation(describer, grads, items, test, plan, **options, **domains),
    ct.NO_INJECTION: mt.core_evaluation(describer, grads, items, test, plan, "none", **options, **domains),
    ct.NOISE: mt.core_evaluation(describer, grads, items, test, plan, "noise", **options, **domains),
    ct.STEERING: mt.core_evaluation(describer, steering, items, test, plan, **options, **domains),
}
untrained = untrained_describer(describer, seed)  # reseeds torch, so it is made after the runs above
# The untrained and text-only references train nothing: they read the original model (LoRA adapters off).
runs[ct.UNTRAINED] = ct.reference_evaluation(untrained, grads, items, test, plan, **options, **domains)
# Text-only: the fact and its target in words (after labelled examples of the training items), nothing injected.
train_items, _ = training_items(items, describer.meta.get("heldout_domain"))
examples = ct.text_examples(train_items, text_examples_per_domain, seed)
runs[ct.TEXT_ONLY] = ct.reference_evaluation(
    describer,
    grads,
    items,
    test,
    ct.text_only_plan(examples, plan, items),
    "none",
    ct.text_only_contexts(examples, test),
    **options,
    **domains,
)
# Shuffled gradients: each item's own fact prompt is the passage, another item's gradient is injected.
shuffled = ev.describe_items(describer, grads, test, "shuffle", test["prompt"].tolist(), **options, **domains)
runs[ct.SHUFFLED] = (shuffled, None)

# %% [markdown]
# ## Training-free baselines: Backward Lens and a linear probe on g

# %%
target_tokens = np.array([[first_visible_id(tokenizer, target_text(a))] for a in test["target"]])
lens_ranks = analysis.backward_lens(model, -grads[test["row"].to_numpy()][None], target_tokens)[0, :, 0]
is_train = items["id"].isin(train_items["id"]).to_numpy()
is_test = items["id"].isin(test["id"]).to_numpy()
predicted = analysis.probe_predictions(grads, items["domain"].to_numpy(), is_train, is_test, seed)
truth = items.loc[is_test, "domain"].to_numpy()
probe_ids = items.loc[is_test, "id"].to_numpy()
controls = ct.controls_table(runs, lens_ranks, predicted, truth, n_boot, seed, test["id"].to_numpy(), probe_ids)
save_table(controls, RESULTS, "controls")
per_item = mt.per_item_table(runs, ["condition"])
save_table(per_item, RESULTS, "controls_items")
mt.main_table(controls)

# %%
shown = controls[
    controls["metric"].isin(["domain accuracy", "answer recall", "decoupling success", "decoupling leakage"])
]
conditions, metrics = list(dict.fromkeys(shown["condition"])), list(dict.fromkeys(shown["metric"]))
fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.45 * len(conditions) + 1.5), sharey=True)
for ax, metric in zip(np.atleast_1d(axes), metrics):
    part = shown[shown["metric"] == metric].set_index("condition").reindex(conditions)
    y = np.arange(len(conditions))
    ax.errorbar(part["estimate"], y, xerr=[part["estimate"] - part["low"], part["high"] - part["estimate"]], fmt="o")
    ax.set(title=metric, xlim=(-0.05, 1.05), yticks=y, yticklabels=conditions)
    ax.invert_yaxis()
fig.suptitle("Controls and baselines on the same held-out items (95% bootstrap CIs; missing = not applicable)")
fig.tight_layout()
save_figure(fig, FIGURES, "controls")

# %% [markdown]
# ## Checks

# %%
assert controls["estimate"].between(0, 1).all() and (controls["low"] <= controls["estimate"]).all()
assert (controls["estimate"] <= controls["high"]).all() and (controls["n"] > 0).all()
none = controls.query(f"condition == '{ct.NO_INJECTION}' and metric == 'decoupling success'")["estimate"].iloc[0]
assert set(runs[ct.NO_INJECTION][0]["control"]) == {"none"}
assert (shuffled["id"] != shuffled["source_id"]).all() or len(shuffled) < 2
assert len(lens_ranks) == len(test) and len(predicted) == len(test)
assert all(len(s) == len(test) and (d is None or len(d) == len(plan)) for s, d in runs.values())
# The ablations stage reads these conditions back by name: every describer condition is in the per-item table.
written = pd.read_csv(RESULTS / "controls_items.csv")
assert set(written["condition"]) == set(runs) and len(written) == len(per_item)
assert list(pd.read_csv(RESULTS / "controls.csv")["condition"]) == list(controls["condition"])
print(f"no-injection decoupling success {none:.2f}; {len(controls)} rate rows")
