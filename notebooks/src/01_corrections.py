# %% [markdown]
# # 01 · Corrections
# Builds the corrections table every later stage reads: facts from CounterFact (8 domains mapped from relation
# templates) and curated history and biology facts, each with a right and a plausible wrong answer, in both
# directions (`correct`: target = right answer, fixing an error; `counterfactual`: target = wrong answer). Splits:
# train/val/test by subject, one held-out relation template per domain, and a held-out-domain option. For every
# fact the model's own belief is recorded (teacher-forced log p of both answers, whether greedy decoding gives the
# target), so later stages can separate correcting an error from pushing a counterfactual.
# Outputs: `results/corrections/corrections.csv` (the table), summary tables, `figures/corrections/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
per_domain = 6
fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
directions = ["correct", "counterfactual"]
heldout_domain = "religion"
batch_size = 32

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

import gradsense
from gradsense.corrections import (
    COLUMNS,
    belief_by_domain,
    corrections_facts,
    corrections_table,
    fact_margins,
    heldout_domain_masks,
    load_corrections,
    load_facts,
    save_corrections,
    summarize,
    template_counts,
)
from gradsense.paths import Paths
from gradsense.report import save_figure, save_json, save_table
from gradsense.seeding import seed_everything

paths = Paths("..")
RESULTS, FIGURES = paths.results("corrections"), paths.figures("corrections")
seed_everything(seed)

# %%
facts = load_facts()
model, tokenizer = gradsense.load_model(model_name, device=device)
table = corrections_table(model, tokenizer, facts, per_domain, fractions, directions, seed, batch_size)
save_corrections(table, paths.corrections)
table.head()

# %% [markdown]
# ## Splits and the model's belief per domain
# `prefers_right`: share of facts where log p(right) > log p(wrong); `greedy_right`: greedy decoding produces the
# right answer; `median_margin`: median log p(right) − log p(wrong) in nats.

# %%
summary = summarize(table)
save_table(summary, RESULTS, "summary")
by_domain = belief_by_domain(table)  # every split together
save_table(by_domain, RESULTS, "belief_by_domain")
templates = template_counts(table)
save_table(templates, RESULTS, "templates")
per_fact = fact_margins(table)  # margin = log p(right) − log p(wrong), whatever the direction
key_facts = corrections_facts(table, heldout_domain, seed)
held_templates = key_facts["heldout_templates"]
save_json(key_facts, RESULTS / "corrections.json")
by_domain

# %%
order = by_domain.sort_values("prefers_right")["domain"].tolist()
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
sns.boxplot(data=per_fact, x="domain", y="margin", order=order, ax=axes[0], color="0.85", fliersize=0)
sns.stripplot(data=per_fact, x="domain", y="margin", order=order, ax=axes[0], size=2, alpha=0.5, jitter=0.25)
axes[0].axhline(0, color="k", lw=0.8)
axes[0].set(xlabel="", ylabel="log p(right) − log p(wrong)  [nats]", title="The model's own belief per fact")
axes[0].tick_params(axis="x", rotation=45)
sns.barplot(data=by_domain, y="domain", x="prefers_right", order=order, ax=axes[1], color="C0")
axes[1].axvline(0.5, color="k", lw=0.8, ls="--")
axes[1].set(xlim=(0, 1), xlabel="share preferring the right answer", ylabel="", title="Right beats wrong")
fig.tight_layout()
save_figure(fig, FIGURES, "belief_by_domain")

# %% [markdown]
# ## Checks

# %%
assert list(table.columns) == COLUMNS and len(table) > 0
# No subject in two splits (compared case-insensitively, as the split is made).
subject_splits = table.groupby(table["subject"].str.casefold())["split"].nunique()
assert (subject_splits == 1).all(), subject_splits[subject_splits > 1].head()
assert set(table["split"]) <= {"train", "val", "test"} and (table["split"] == "train").any()
# Every domain of the fact tables is present, the curated history and biology included, with ≥ 6 domains.
assert set(table["domain"]) == set(facts["domain"]) and {"history", "biology"} <= set(table["domain"])
assert table["domain"].nunique() >= 6
# Both directions for every fact, with target/source swapped between them.
assert set(table["direction"]) == set(directions)
assert (table.groupby("fact_id")["direction"].nunique() == len(directions)).all()
correct = table["direction"] == "correct"
assert (table.loc[correct, "target"] == table.loc[correct, "right"]).all()
assert (table.loc[~correct, "target"] == table.loc[~correct, "wrong"]).all()
# Every domain with ≥ 2 templates holds exactly one template out.
assert (templates.query("template_split == 'heldout'").groupby("domain")["relation"].nunique() == 1).all()
assert set(held_templates) == {d for d, g in templates.groupby("domain") if g["relation"].nunique() >= 2}
# The held-out-domain masks partition the rows.
train_mask, test_mask = heldout_domain_masks(table, heldout_domain)
assert test_mask.any() and train_mask.any() and not (train_mask & test_mask).any()
# Finite log-probabilities (summed over the whole target, so ≤ 0), and the preference column agrees with them.
assert np.isfinite(table[["logp_target", "logp_source"]].to_numpy()).all()
assert (table[["logp_target", "logp_source"]] <= 0).all().all()
assert (table["model_prefers_target"] == (table["logp_target"] > table["logp_source"])).all()
assert not table["prompt"].str.endswith(" ").any() and not table["target"].str.startswith(" ").any()
if model_name is None and per_domain is not None and per_domain >= 50:
    # Measured, not assumed: SmolLM2 prefers the right answer for most facts overall.
    assert by_domain["prefers_right"].mean() > 0.5, by_domain
# What every later stage reads is the table computed here, and the saved summaries are the computed ones.
pd.testing.assert_frame_equal(load_corrections(paths.corrections), table, check_dtype=False, rtol=1e-5)
for name, frame in {"summary": summary, "belief_by_domain": by_domain, "templates": templates}.items():
    back = pd.read_csv(RESULTS / f"{name}.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(
        back, frame.astype({"domain": str}), check_dtype=False, check_categorical=False, rtol=1e-5
    )
assert key_facts["heldout_domain_rows"] == int(test_mask.sum()) and key_facts["n_rows"] == len(table)
