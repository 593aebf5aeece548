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
# | untrained projector | the gradient through a randomly initialised projector (seeded) |
# | text-only | no injection; the passage states the fact and its target in words after one labelled example per trained domain (an upper reference: the answer is in the text) |
# | Backward Lens | training-free: the top token of −g through the final norm and unembedding (answer token only) |
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
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

import gradsense
from gradsense import analysis
from gradsense import evaluate as ev
from gradsense.corrections import load_corrections
from gradsense.gradients import load_gradients
from gradsense.projector import join_items, load_describer, read_labels, training_items, untrained_describer
from gradsense.report import save_figure, save_table
from gradsense.scoring import target_text
from gradsense.seeding import seed_everything

RESULTS, FIGURES = Path("../results/controls"), Path("../figures/controls")
rng = seed_everything(seed)

# %%
model, tokenizer = gradsense.load_model(model_name, device=device)
describer = load_describer("../results/train/checkpoint", model, tokenizer)
arrays = load_gradients("../results/gradients/gradients.npz")
at = arrays["layers"].index(describer.config.source_layer)
grads, steering = arrays["grads"][at], arrays["steering"][at]
items = join_items(
    load_corrections("../results/corrections/corrections.csv"),
    arrays["ids"],
    read_labels("../results/oracle/labels.jsonl"),
)
described = pd.read_csv("../results/evaluate/descriptions.csv")
test_ids = described.query("set == 'test subjects' and control == 'gradient'")["id"]
test = ev.stratified(items.set_index("id").loc[test_ids].reset_index(), max_items, seed)
plan = ev.replay_plan(pd.read_csv("../results/evaluate/decoupling_items.csv"), items, decoupling_per_pair)
print(f"{len(test)} test items, {len(plan)} decoupling pairs, source layer {describer.config.source_layer}")

# %% [markdown]
# ## Describer conditions (same items, same decoding)

# %%
options = {"seed": seed, "batch_size": batch_size, "max_new_tokens": 0}  # the head only, as in `evaluate`
domains = {"domains": sorted(items["domain"].unique())}  # naming one of these = feeling a pressure
runs = {
    "trained describer": ev.core_evaluation(describer, grads, items, test, plan, **options, **domains),
    "no injection": ev.core_evaluation(describer, grads, items, test, plan, "none", **options, **domains),
    "norm-matched noise": ev.core_evaluation(describer, grads, items, test, plan, "noise", **options, **domains),
    "steering vector": ev.core_evaluation(describer, steering, items, test, plan, **options, **domains),
    "untrained projector": ev.core_evaluation(untrained_describer(describer, seed), grads, items, test, plan, **options, **domains),
}
# Text-only: the fact and its target in words (after labelled examples of the training items), nothing injected.
train_items, _ = training_items(items, describer.meta.get("heldout_domain"))
examples = ev.text_examples(train_items, text_examples_per_domain, seed)
texts = [ev.text_only_passage(examples, p, t) for p, t in zip(test["prompt"], test["target"])]
by_row = items.set_index("row")
plan_texts = plan.assign(
    context=[
        f"{passage}\n\n{ev.text_only_passage(examples, by_row.at[r, 'prompt'], by_row.at[r, 'target'])}"
        for passage, r in zip(plan["context"], plan["row"])
    ]
)
text_scored = ev.describe_items(describer, grads, test, "none", texts, **options, **domains)
text_decoupled = ev.decoupling(describer, grads, plan_texts, items, tokenizer, control="none", **options)
runs["text-only (no gradient)"] = (text_scored, text_decoupled)
# Shuffled gradients: each item's own fact prompt is the passage, another item's gradient is injected.
shuffled = ev.describe_items(describer, grads, test, "shuffle", test["prompt"].tolist(), **options, **domains)
rows = [row for name, (s, d) in runs.items() for row in ev.core_rates(s, d, n_boot, seed, condition=name)]
rows += ev.core_rates(shuffled, None, n_boot, seed, condition="shuffled gradients")
differ = shuffled["domain"] != shuffled["read_domain"]
rows += ev.rate_rows(
    {"names the read item's domain": shuffled.loc[differ, "read_domain_ok"]}, n_boot, seed,
    condition="shuffled gradients",
)

# %% [markdown]
# ## Training-free baselines: Backward Lens and a linear probe on g

# %%
target_tokens = np.array([[analysis.first_content_token(tokenizer, target_text(a))] for a in test["target"]])
lens_ranks = analysis.backward_lens(model, -grads[test["row"].to_numpy()][None], target_tokens)[0, :, 0]
rows += ev.rate_rows({"answer token in 'to'": lens_ranks == 0}, n_boot, seed, condition="Backward Lens (top token of −g)")
is_train = items["id"].isin(train_items["id"]).to_numpy()
is_test = items["id"].isin(test["id"]).to_numpy()
predicted = analysis.probe_predictions(grads, items["domain"].to_numpy(), is_train, is_test, seed)
truth = items.loc[is_test, "domain"].to_numpy()
rows += ev.rate_rows({"domain accuracy": predicted == truth}, n_boot, seed, condition="linear probe on g")
controls = pd.DataFrame(rows).assign(group="controls")
save_table(controls, RESULTS, "controls")
per_item = pd.concat(
    [frame.assign(condition=name, part=part) for name, pair in runs.items() for part, frame in zip(("test", "decoupling"), pair)]
    + [shuffled.assign(condition="shuffled gradients", part="test")],
    ignore_index=True,
)
save_table(per_item, RESULTS, "controls_items")
ev.main_table(controls)

# %%
shown = controls[controls["metric"].isin(["domain accuracy", "answer token in 'to'", "decoupling success", "decoupling leakage"])]
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
none = controls.query("condition == 'no injection' and metric == 'decoupling success'")["estimate"].iloc[0]
assert set(runs["no injection"][0]["control"]) == {"none"}
assert (shuffled["id"] != shuffled["source_id"]).all() or len(shuffled) < 2
assert len(lens_ranks) == len(test) and len(predicted) == len(test)
assert all(len(s) == len(test) and len(d) == len(plan) for s, d in runs.values())
assert (RESULTS / "controls.csv").is_file() and (FIGURES / "controls.png").is_file()
print(f"no-injection decoupling success {none:.2f}; {len(controls)} rate rows")
