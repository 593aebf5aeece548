# %% [markdown]
# # 03 · Lookahead oracle and teacher labels
# What does a gradient *mean*? The oracle answers by looking ahead: replace the output h of block ℓ at the last
# prompt position by h − α·(g/‖g‖)·‖h‖ (a *virtual step* along −g) and watch the next-token distribution move.
# Controls in the same run: the opposite direction (+g) and random directions of the same norm.
# 1. **α sweep** on validation items; the labelling α is the smallest α in the grid at which the median validation
#    item gains ≥ `min_median_gain` nats on its target (a rule, never tuned per item; the test split is not read).
# 2. **Labelling pass** at that α: the teacher-forced log p of the whole target and source before and after the step,
#    KL, the tokens pushed up and down, and the model's own answer now (its greedy continuation); a teacher turns
#    each record into a label `domain: <d> | from: <answer now> | to: <whole target>` + one sentence, e.g.
#    `domain: history | from: 1799 | to: 1789`. The oracle is the judge: an item whose step raises the target by
#    less than `unclear_min_gain` nats is labelled `to: unclear` and left out of training (counted below). With
#    `step_positions = "each"` that gain is the one of the step at *every* target-predicting position, each along
#    its own gradient (the whole target's gradient): a year's last prompt position predicts only a bare space, so
#    the last-position step alone leaves most years `unclear` (the table `step_positions` shows both).
# 3. **Oracle validity**: one real SGD step on all the weights with the same loss, compared with the virtual step
#    (rank correlation over the top-N tokens, sign agreement, top promoted token), against a random direction.
# 4. **Faithfulness**: how often the top promoted token is the target's first visible token.
#
# Inputs: `results/corrections/corrections.csv`, `results/gradients/gradients.npz`.
# Outputs: `results/oracle/`, `figures/oracle/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
layer = None
alphas = [0.01, 0.03, 0.1]
min_median_gain = 1.0
sweep_items = 10
max_items = 40
top_k = 5
min_prob = 0.02
n_random = 1
batch_size = 64
validity_items = 2
validity_lrs = [0.0001]
validity_top_n = 50
teacher = "template"
teacher_model = None
teacher_url = None
unclear_min_gain = 0.5
step_positions = "each"
examples_per_domain = 2

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

import gradsense
from gradsense import oracle, validity
from gradsense.corrections import load_corrections
from gradsense.errors import GradsenseError
from gradsense.files import read_jsonl, write_jsonl
from gradsense.gradients import activation_gradients, extracted_layer, load_gradients, resolve_layer
from gradsense.paths import Paths
from gradsense.report import save_figure, save_json, save_table
from gradsense.sampling import stratified
from gradsense.scoring import target_text
from gradsense.seeding import seed_everything
from gradsense.shifts import item_shifts
from gradsense.teacher import (
    UNCLEAR,
    as_record,
    clarity_gain,
    label_records,
    make_teacher,
    normalize_answer,
    parse_label,
)

paths = Paths("..")
RESULTS, FIGURES = paths.results("oracle"), paths.figures("oracle")
seed_everything(seed)

# %% [markdown]
# ## Inputs
# The gradient file may hold a subset of the corrections (its `ids`); rows are aligned by id. `layer` = null takes
# the middle of the extracted layers.

# %%
table = load_corrections(paths.corrections)
arrays = load_gradients(paths.gradients)
layers = arrays["layers"]
model, tokenizer = gradsense.load_model(model_name, device=device)
layer = extracted_layer(layers, resolve_layer(model, layer), role="oracle")
missing = sorted(set(arrays["ids"]) - set(table["id"]))
if missing:
    raise GradsenseError(f"gradients file has ids not in corrections.csv, e.g. {missing[0]}")
items = table.set_index("id").loc[arrays["ids"]].reset_index()
items["row"] = np.arange(len(items))  # row in the gradient arrays
grads = arrays["grads"][layers.index(layer)]
print(
    f"{len(items)} items with gradients, layer {layer}, grad norm median {np.median(np.linalg.norm(grads, axis=1)):.3g}"
)


def run_steps(frame, grid, **kw):
    """Virtual steps for the rows of `frame` (a thin wrapper naming the columns)."""
    return oracle.virtual_steps(
        model,
        tokenizer,
        frame["prompt"].tolist(),
        frame["target"].tolist(),
        frame["source"].tolist(),
        grads[frame["row"].to_numpy()],
        layer,
        grid,
        n_random=n_random,
        top_k=top_k,
        min_prob=min_prob,
        batch_size=batch_size,
        seed=seed,
        ids=frame["id"].tolist(),
        **kw,
    )


# %% [markdown]
# ## α sweep on validation items (gradient, +g, random) and the labelling α

# %%
# Even draws over the groups: ⌈n / groups⌉ seeded rows per group, then a seeded n of those.
even = dict(order="shuffle_groups", fill="even", seed=seed)
sweep_frame = oracle.sweep_items(items, sweep_items, seed)  # validation rows only, the same even draws
sweep = run_steps(sweep_frame, [0.0] + list(alphas))
sweep = sweep.merge(sweep_frame[["id", "domain", "direction"]], on="id")
chosen = oracle.choose_alpha(sweep, min_median_gain)
alpha = chosen["alpha"]
save_table(sweep.drop(columns=["up_ids", "down_ids", "up_dlogp", "down_dlogp"]), RESULTS, "sweep")
save_json(chosen | {"layer": layer, "n_sweep_items": len(sweep_frame)}, RESULTS / "alpha.json")
chosen

# %% [markdown]
# ## Labelling pass at the chosen α

# %%
label_frame = stratified(items, ["split", "direction", "domain"], max_items, **even)
if step_positions not in ("last", "each"):
    raise GradsenseError(f"oracle.step_positions must be 'last' or 'each', not {step_positions!r}")
grads_each = None
if step_positions == "each":  # the gradient at every target-predicting position, at the stepped block
    grads_each = activation_gradients(
        model,
        tokenizer,
        label_frame["prompt"].tolist(),
        [target_text(t) for t in label_frame["target"]],
        [layer],
        "each",
        batch_size,
        label_frame["id"].tolist(),
        slots=int(arrays["n_target_tokens"][label_frame["row"].to_numpy()].max()),
    ).grads[0]
shifts = item_shifts(
    model,
    tokenizer,
    label_frame["prompt"].tolist(),
    label_frame["target"].tolist(),
    label_frame["source"].tolist(),
    grads[label_frame["row"].to_numpy()],
    layer,
    alpha,
    top_k=top_k,
    min_prob=min_prob,
    batch_size=batch_size,
    seed=seed,
    ids=label_frame["id"].tolist(),
    grads_each=grads_each,
)
shifts = label_frame.drop(columns="row").merge(shifts, on="id")
teach = make_teacher(teacher, teacher_model, teacher_url, unclear_min_gain)
records = [as_record(r) for r in shifts.to_dict("records")]
shifts["label"] = label_records(teach, records, RESULTS / "teacher_cache.jsonl")
parsed = pd.DataFrame([parse_label(t) for t in shifts["label"]])
label_columns = [
    "id",
    "label",
    "domain",
    "direction",
    "split",
    "template_split",
    "fact_id",
    "prompt",
    "target",
    "source",
    "belief",
    "to_token",
    "from_token",
    "logp_target_old",
    "logp_target_new",
    "dlogp_target",
    "dlogp_source",
    "kl",
    "alpha",
    "layer",
] + (["dlogp_target_each"] if grads_each is not None else [])
write_jsonl(shifts[label_columns].to_dict("records"), paths.labels, sort_keys=True)
save_table(
    shifts.drop(columns=["label"]).assign(
        up_tokens=shifts["up_tokens"].map("|".join), down_tokens=shifts["down_tokens"].map("|".join)
    ),
    RESULTS,
    "shifts",
)
clarity = validity.clarity_counts(shifts, unclear_min_gain)  # the labels decide; the gain says why
save_table(clarity, RESULTS, "label_clarity")
print(clarity.to_string(index=False))
if grads_each is not None:  # which items the whole-target step makes clear, by domain
    positions_table = validity.step_position_clarity(shifts, unclear_min_gain)
    save_table(positions_table, RESULTS, "step_positions")
    print(positions_table.to_string(index=False))
shifts[["id", "domain", "direction", "target", "belief", "dlogp_target", "label"]].head(8)

# %% [markdown]
# ## Acceptance on the test items: −g raises the target; same-norm random directions barely move it

# %%
acceptance = {"alpha": alpha, "layer": layer} | validity.acceptance(shifts[shifts["split"] == "test"])
save_json(acceptance, RESULTS / "acceptance.json")
acceptance

# %% [markdown]
# ## Oracle validity: the virtual step against one real SGD step on every weight

# %%
valid_frame = stratified(items[items["split"] == "test"], ["direction"], validity_items, **even)
steps, step_tokens = validity.real_step_validity(
    model,
    tokenizer,
    valid_frame["prompt"].tolist(),
    valid_frame["target"].tolist(),
    valid_frame["source"].tolist(),
    grads[valid_frame["row"].to_numpy()],
    layer,
    alpha,
    validity_lrs,
    top_n=validity_top_n,
    min_prob=min_prob,
    seed=seed,
    ids=valid_frame["id"].tolist(),
)
steps = steps.merge(valid_frame[["id", "domain", "direction"]], on="id")
save_table(steps, RESULTS, "validity")
save_table(step_tokens, RESULTS, "validity_tokens")
validity_summary = validity.validity_summary(steps)
save_table(validity_summary, RESULTS, "validity_summary")
validity_summary

# %% [markdown]
# ## Faithfulness and example labels

# %%
faith = validity.faithfulness(shifts)
save_table(faith, RESULTS, "faithfulness")
label_faith = validity.label_faithfulness(shifts)
save_table(label_faith, RESULTS, "label_faithfulness")
label_faith
examples = (
    shifts.groupby("domain", sort=True)
    .head(examples_per_domain)[["domain", "direction", "prompt", "target", "source", "label"]]
    .assign(label=lambda f: f["label"].str.replace("\n", " — "))
)
save_table(examples, RESULTS, "example_labels")
faith

# %% [markdown]
# ## Figures

# %%
curve = sweep.copy()
fig = sns.relplot(
    data=curve,
    x="alpha",
    y="dlogp_target",
    hue="control",
    col="direction",
    kind="line",
    errorbar=("pi", 50),
    estimator="median",
    marker="o",
    height=3.2,
    aspect=1.2,
)
fig.set(xlabel="α (fraction of ‖h‖)", ylabel="Δ log p(target) [nats]")
fig.refline(y=0, color="grey", lw=0.8)
for ax in fig.axes.flat:  # symlog: α = 0 sits at the origin, the grid is roughly log-spaced
    ax.set_xscale("symlog", linthresh=min(alphas))
    ax.set_xticks([0.0] + list(alphas), [f"{a:g}" for a in [0.0] + list(alphas)])
    ax.axvline(alpha, color="black", ls=":", lw=1)
fig.figure.suptitle(f"Virtual step at block {layer}: median and IQR over {len(sweep_frame)} validation items", y=1.04)
save_figure(fig.figure, FIGURES, "dlogp_vs_alpha")

# %%
lr0 = validity_lrs[0]
tokens0 = step_tokens[step_tokens["lr"] == lr0]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
for ax, name in zip(axes, ("virtual", "random")):
    rho = steps[steps["lr"] == lr0][f"{name}_spearman"].mean()
    ax.scatter(tokens0[name], tokens0["real"], s=6, alpha=0.5)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set(xlabel=f"{name} step Δ log p (α={alpha})", title=f"{name}: mean per-item Spearman ρ = {rho:.2f}")
axes[0].set_ylabel(f"real SGD step Δ log p (lr={lr0})")
fig.suptitle(f"Top-{validity_top_n} next tokens of {len(valid_frame)} test items", y=1.02)
fig.tight_layout()
save_figure(fig, FIGURES, "virtual_vs_real")

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
sns.barplot(data=faith, x="domain", y="to_is_target", hue="direction", ax=ax)
ax.set(ylim=(0, 1), ylabel="top promoted token = target", xlabel="", title=f"Oracle faithfulness at α={alpha}")
ax.tick_params(axis="x", rotation=45)
fig.tight_layout()
save_figure(fig, FIGURES, "faithfulness")

# %% [markdown]
# ## Checks

# %%
assert chosen["alpha"] in alphas
if chosen["rule_met"]:  # the smallest α of the grid that meets the rule
    assert chosen["median_gain"] >= min_median_gain
    assert all(v < min_median_gain for a, v in chosen["medians"].items() if a < alpha)
# α = 0 is the identity: nothing moves.
assert sweep[sweep["alpha"] == 0.0][["dlogp_target", "dlogp_source", "kl"]].abs().max().max() < 1e-4
grad_sweep = sweep[(sweep["control"] == "gradient") & (sweep["alpha"] > 0)]
opp_sweep = sweep[(sweep["control"] == "opposite") & (sweep["alpha"] > 0)]
assert grad_sweep["dlogp_target"].median() > 0 > opp_sweep["dlogp_target"].median()
# Every label has the parseable head; `to` is the whole target exactly when the step raised it enough.
assert parsed["domain"].notna().all() and parsed["to"].notna().all() and parsed["from"].notna().all()
assert (parsed["domain"] == shifts["domain"].str.lower()).all()
clear = (parsed["to"] != UNCLEAR).to_numpy()
assert (parsed["to"][clear].map(normalize_answer) == shifts["target"][clear].map(normalize_answer)).all()
gain = np.array([clarity_gain(r) for r in records])  # the teacher's view (rounded to 3 decimals): the gain judged
assert (clear == (gain >= unclear_min_gain)).all() and clarity["clear"].sum() == clear.sum()
# The labelled dataset on disk is the labelling pass: same ids, labels and observed tokens, in order.
labels_back = pd.DataFrame(read_jsonl(paths.labels))
assert list(labels_back.columns) == sorted(label_columns)
assert labels_back["id"].tolist() == shifts["id"].tolist() and labels_back["label"].tolist() == shifts["label"].tolist()
assert labels_back["to_token"].tolist() == shifts["to_token"].tolist()
# Acceptance (measured): −g raises the target for ≥ 90% of test items; random same-norm steps move it < 1/10 as much.
print(acceptance)
assert acceptance["n_test"] > 0
assert acceptance["share_target_up"] >= 0.9, acceptance
assert acceptance["random_over_gradient"] < 0.1, acceptance
# Validity: the virtual step ranks the real step's token shifts better than a random direction does.
assert steps["real_dlogp_target"].gt(0).mean() >= 0.5
assert steps["virtual_spearman"].mean() > steps["random_spearman"].mean()
assert steps["virtual_sign_target"].mean() >= steps["random_sign_target"].mean()
# The saved tables are the computed ones (CSV keeps 6 significant digits).
for name, frame in {"validity_summary": validity_summary, "faithfulness": faith}.items():
    pd.testing.assert_frame_equal(pd.read_csv(RESULTS / f"{name}.csv"), frame, check_dtype=False, rtol=1e-5)
assert pd.read_csv(RESULTS / "sweep.csv")["alpha"].tolist() == sweep["alpha"].tolist()
