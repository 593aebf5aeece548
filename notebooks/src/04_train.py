# %% [markdown]
# # 04 · Train the describer
# A projector maps each item's activation gradient g (output of block `source_layer`, last prompt position) to k
# vectors that are added at the k placeholder tokens (" ?") of an interpretation prompt, at the output of block
# `inject_layer` (either layer a block index or a depth fraction in [0, 1), floored: 0.5 is block 15 of 30 and block
# 12 of 24, so `model.name` alone switches the model); the model (frozen, unless `lora_rank` > 0) is trained through the projector to say the oracle's
# label head for that gradient (`domain: … | from: … | to: …`; the loss is on the values and the tokens that end
# them). `init: lens` starts every slot as −g, the direction Backward Lens reads the target from (chosen on the
# validation split by `scripts/select_init.py`; `random` is PyTorch's default, an ablation run). A share `control_share` of every batch gets norm-matched noise or no injection with the fixed "no pressure"
# label, and a share `context_share` of the rows reads a passage before the question: neutral text or statements of
# other training facts (of any domain), and for a share `hard_share` of them a hard negative, a statement of another
# answer of the item's own relation. Evaluation passages are never among them. `epochs` (when set) fixes the
# number of steps: that many passes over the training items. `precision: bf16`
# runs the training passes under bfloat16 autocast (about 1.8× faster per step on AMX units; the gradients it reads
# are float32, and decoding is float32). The columns before the first slot never see the injection, so each step
# runs them without autograd and backpropagates from the first slot on (`benchmarks/bench_training.py`).
# Training uses the train split, the trained relation templates, and every domain but `heldout_domain`.
# Inputs: `results/corrections/`, `results/gradients/`, `results/oracle/labels.jsonl`, `data/facts/contexts.csv`.
# Outputs: `results/train/checkpoint/` (projector + metadata), the training curve, `figures/train/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
source_layer = None
inject_layer = 0.5
k = 4
mode = "norm"
kind = "linear"
init = "lens"
mlp_hidden = 1024
lora_rank = 0
precision = "bf16"
steps = 12
epochs = None
batch_size = 4
lr = 0.002
weight_decay = 0.0
control_share = 0.25
context_share = 0.75
hard_share = 0.3
max_label_tokens = None
domain_repeats = {}  # domain → draws of its items per pass (default 1)
heldout_domain = "religion"
val_items = 4
eval_every = 4
n_examples = 2

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

import gradsense
from gradsense.checkpoint import load_describer, read_meta, save_checkpoint
from gradsense.describer import DescriberConfig
from gradsense.gradients import extracted_layer, resolve_layer
from gradsense.inputs import (
    contexts_path,
    load_stage_inputs,
    read_contexts,
    training_items,
    validation_set,
)
from gradsense.passages import training_passages
from gradsense.paths import Paths
from gradsense.report import save_figure, save_json, save_table
from gradsense.seeding import seed_everything
from gradsense.timing import save_timing
from gradsense.training import TrainConfig, planned_steps, train_projector

paths = Paths("..")
RESULTS, FIGURES = paths.results("train"), paths.figures("train")
rng = seed_everything(seed)

# %% [markdown]
# ## Inputs
# Items are the corrections rows that have a gradient and an oracle label. Validation: up to `val_items` items of
# the validation split (trained templates and domains), spread over domains.

# %%
stage = load_stage_inputs(paths)
contexts = read_contexts(contexts_path())
neutral = contexts.loc[contexts["pool"] == "neutral", "text"].tolist()
model, tokenizer = gradsense.load_model(model_name, device=device)
# layers may be depth fractions (0.5 = the middle block of any model) or block indices; the checkpoint records blocks
layer = extracted_layer(stage.arrays["layers"], resolve_layer(model, source_layer))
inject_layer = resolve_layer(model, inject_layer)
grads = stage.vectors("grads", layer)
train_items, val_pool = training_items(stage.items, heldout_domain)
val_set = validation_set(val_pool, val_items)
pool, negatives = training_passages(neutral, train_items, seed)
summary = pd.DataFrame(
    {
        "set": ["train", "validation", "passages", "items with hard negatives"],
        "items": [len(train_items), len(val_set), len(pool), sum(map(bool, negatives))],
        "domains": [train_items["domain"].nunique(), val_set["domain"].nunique(), None, None],
    }
)
save_table(summary, RESULTS, "training_data")
print(f"source layer {layer}, gradient width {grads.shape[1]}, {len(pool)} passages ({len(neutral)} neutral)")
summary

# %% [markdown]
# ## Train

# %%
config = DescriberConfig(
    source_layer=layer,
    inject_layer=inject_layer,
    k=k,
    mode=mode,
    kind=kind,
    init=init,
    mlp_hidden=mlp_hidden,
    lora_rank=lora_rank,
    precision=precision,
)
train = TrainConfig(
    steps=steps,
    epochs=epochs,
    batch_size=batch_size,
    lr=lr,
    weight_decay=weight_decay,
    control_share=control_share,
    context_share=context_share,
    hard_share=hard_share,
    max_label_tokens=max_label_tokens,
    domain_repeats=domain_repeats,
    eval_every=eval_every,
    seed=seed,
)
n_steps = planned_steps(len(train_items), train)
start = time.perf_counter()
describer, curve = train_projector(
    model,
    tokenizer,
    grads[train_items["row"].to_numpy()],
    train_items["label"].tolist(),
    config,
    train,
    pool,
    val=(grads[val_set["row"].to_numpy()], val_set["label"].tolist()),
    hard_negatives=negatives,
)
train_s = time.perf_counter() - start
save_checkpoint(
    describer,
    paths.checkpoint,
    model_name=model_name,
    extra={
        "heldout_domain": heldout_domain,
        "trained_domains": sorted(train_items["domain"].unique()),
        "n_train_items": len(train_items),
    },
)
save_table(curve.drop(columns="seconds"), RESULTS, "training_curve")  # timings go to results/timing/
selected = describer.meta.get("selection", {})  # selected_step, selected_val_loss: the step chosen on validation
save_json({"steps": n_steps, "epochs": epochs, "batch_size": batch_size, **selected}, RESULTS / "training.json")
seconds_per_step = float(curve["seconds"].median())
save_timing(
    paths.root,
    "train",
    {"train_seconds": round(train_s, 2), "seconds_per_step": seconds_per_step, "precision": precision},
)
selected

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
smooth = curve["loss"].rolling(max(1, n_steps // 20), min_periods=1).mean()
sns.lineplot(x=curve["step"], y=curve["loss"], ax=ax, alpha=0.3, label="train (batch)")
sns.lineplot(x=curve["step"], y=smooth, ax=ax, label="train (smoothed)")
val_points = curve.dropna(subset=["val_loss"])
sns.lineplot(x=val_points["step"], y=val_points["val_loss"], ax=ax, marker="o", label="validation")
ax.set(
    xlabel="step",
    ylabel="head-value cross-entropy (nats/token)",
    title=f"Describer training ({mode}, {kind}, J={inject_layer})",
)
fig.tight_layout()
save_figure(fig, FIGURES, "training_curve")

# %% [markdown]
# ## A few validation descriptions (greedy, no context)

# %%
examples = val_set.head(n_examples)
described = describer.describe_gradients(grads[examples["row"].to_numpy()], max_new_tokens=24)
shown = pd.DataFrame(
    {
        "id": examples["id"].to_numpy(),
        "teacher label": examples["label"].str.split("\n").str[0].to_numpy(),
        "description": described["description"].to_numpy(),
    }
)
save_table(shown, RESULTS, "examples")
shown

# %% [markdown]
# ## Checks

# %%
meta = read_meta(paths.checkpoint)  # meta.json and projector.pt are there
assert meta["config"]["source_layer"] == layer and meta["config"]["inject_layer"] == inject_layer
assert meta["fingerprint"]["d_model"] == grads.shape[1] == model.config.hidden_size
reloaded = load_describer(paths.checkpoint, model, tokenizer)  # the checkpoint loads back for this model
assert len(train_items) > 0 and heldout_domain not in set(train_items["domain"])
assert set(train_items["split"]) == {"train"} and set(train_items["template_split"]) == {"train"}
assert np.isfinite(curve["loss"]).all() and len(curve) == n_steps
assert meta["config"]["max_value_tokens"] >= 1  # decoding's cap, from the trained labels
quarter = max(1, n_steps // 4)
first, last = curve["loss"].iloc[:quarter].mean(), curve["loss"].iloc[-quarter:].mean()
assert last < first, (first, last)  # training lowered the loss
assert (FIGURES / "training_curve.png").is_file() and (RESULTS / "training_curve.csv").is_file()
print(f"loss {first:.3f} → {last:.3f} (first/last quarter), {seconds_per_step:.2f} s/step")
