# %% [markdown]
# # 00 · Model card
# Loads the model under study, records its architecture (load time and peak memory go to `results/timing/`), and checks how well it
# answers a small set of fact prompts across domains (probability of the right answer, whether greedy decoding
# gives it, and whether it beats a plausible wrong answer). Outputs: `results/model_card/`, `figures/model_card/`.

# %% tags=["parameters"]
seed = 0
model_name = None
device = "auto"
max_facts = 12
batch_size = 32

# %%
import json
import time

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

import gradsense
from gradsense.model_card import fact_accuracy, fact_answers, probe_facts
from gradsense.models import architecture, resolve_device
from gradsense.paths import Paths
from gradsense.report import save_figure, save_json, save_table
from gradsense.seeding import seed_everything
from gradsense.timing import peak_rss_gb, save_timing

paths = Paths("..")
RESULTS, FIGURES = paths.results("model_card"), paths.figures("model_card")
seed_everything(seed)

# %%
start = time.perf_counter()
model, tokenizer = gradsense.load_model(model_name, device=device)
load_s = time.perf_counter() - start
card = architecture(model)
card.update(model=model_name or "SmolLM2-135M-Instruct (GGUF Q4_1, data/)", device=str(resolve_device(device)))
save_json(card, RESULTS / "model_card.json")
# Timings and memory vary run to run: they go to results/timing/, so the card and its table are reproducible.
save_timing(paths.root, "model_card", {"load_s": round(load_s, 2), "load_peak_rss_gb": peak_rss_gb()})
as_rows = lambda d: pd.DataFrame([d]).T.reset_index().set_axis(["property", "value"], axis=1).astype(str)  # noqa: E731
save_table(as_rows(card), RESULTS, "architecture")
card

# %%
facts = fact_answers(model, tokenizer, probe_facts(max_facts), batch_size)
save_table(facts, RESULTS, "fact_answers")
by_domain = fact_accuracy(facts)
save_table(by_domain, RESULTS, "fact_accuracy")
by_domain

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
sns.stripplot(data=facts, x="domain", y="p_right", hue="right_beats_wrong", ax=axes[0], size=6, jitter=0.15)
axes[0].set(yscale="log", ylabel="p(right answer | prompt)", xlabel="", title="Probability of the right answer")
axes[0].tick_params(axis="x", rotation=45)
sns.barplot(
    data=by_domain.melt(id_vars="domain", value_vars=["greedy_right", "right_beats_wrong"]),
    x="domain",
    y="value",
    hue="variable",
    ax=axes[1],
)
axes[1].set(ylim=(0, 1), ylabel="share of facts", xlabel="", title="Greedy answer right / right beats wrong")
axes[1].tick_params(axis="x", rotation=45)
fig.tight_layout()
save_figure(fig, FIGURES, "fact_answers")

# %% [markdown]
# ## Checks

# %%
assert card["n_layers"] > 0 and card["d_model"] > 0 and card["n_parameters"] > 0
if model_name is None:
    assert (card["n_layers"], card["d_model"], card["vocab_size"]) == (30, 576, 49152)
    # The model knows most of these facts better than a plausible wrong answer (measured, not assumed).
    assert facts["right_beats_wrong"].mean() > 0.5, facts["right_beats_wrong"].mean()
assert facts["p_right"].between(0, 1).all() and len(facts) > 0
# What was saved is what was computed: the tables read back equal the frames above.
pd.testing.assert_frame_equal(pd.read_csv(RESULTS / "fact_accuracy.csv"), by_domain, check_dtype=False, rtol=1e-5)
assert pd.read_csv(RESULTS / "fact_answers.csv")["right_beats_wrong"].tolist() == facts["right_beats_wrong"].tolist()
assert json.loads((RESULTS / "model_card.json").read_text())["n_parameters"] == card["n_parameters"]
