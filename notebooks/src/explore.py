# %% [markdown]
# # Explore: what pressure does the model feel?
# Type a fact prompt, the answer a correction pushes towards (`right`), optionally the answer it pushes away from
# (`wrong`) and a passage read before the question (`passage`), and press **Explore**. The gradient of the loss on
# `right` is taken at the checkpoint's source layer; for that one correction you see
# - the describer's head (`domain | from | to`) and sentence, and the same head under the controls side by side: no
#   injection, noise of the gradient's norm, and a *shuffled* gradient (that of another correction, "The capital of
#   France is" → Paris, read in your prompt's place);
# - the oracle's view: the tokens a virtual step along −g (h ← h − α·(g/‖g‖)·‖h‖, the step that labelled the
#   training data, with the run's α and layer from `results/oracle/alpha.json`) pushes up and down, and how the
#   whole right and wrong answers move (Δ log p);
# - the round trip: the cosine between the gradient and the gradient of (prompt → the described `to`).
#
# Every number comes from `gradsense.exploration.explore` (tested in `tests/test_exploration.py`); this notebook
# only draws. Not part of the pipeline: it reads the checkpoint that `dvc repro train` writes
# (`results/train/checkpoint`). The command line gives the head alone: `gradsense describe --prompt … --right …`.

# %%
import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from gradsense.checkpoint import load_describer
from gradsense.errors import GradsenseError
from gradsense.exploration import explore, oracle_setting
from gradsense.paths import Paths

paths = Paths("..")
alpha, layer = oracle_setting(paths.root)  # the run's labelling α and step layer (0.03 and the source layer if none)
describers = {}  # checkpoint path → loaded describer


def get_describer(checkpoint: str):
    """The describer of a checkpoint folder, loaded once."""
    if checkpoint not in describers:
        describers[checkpoint] = load_describer(checkpoint, device="auto")  # loads the model named in the checkpoint
    return describers[checkpoint]


def show(found) -> plt.Figure:
    """The heads side by side, the token shifts and the answers' Δ log p as bars, the round-trip cosine."""
    print(f"head: domain: {found.head['domain']} | from: {found.head['from']} | to: {found.head['to']}")
    print(f"sentence: {found.heads.loc['gradient', 'sentence'] or '(none)'}")
    print(f"round-trip cosine (gradient vs prompt → {found.head['to']!r}): {found.roundtrip_cosine:.3f}")
    display(found.heads.drop(columns="description").T)
    fig, (ax_tok, ax_ans) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    shifts = found.shifts.iloc[::-1]
    colors = ["tab:green" if d == "up" else "tab:red" for d in shifts["direction"]]
    ax_tok.barh([repr(t) for t in shifts["token"]], shifts["dlogp"], color=colors)
    ax_tok.axvline(0, color="black", lw=0.8)
    ax_tok.set_xlabel("Δ log p of the next token (tokens with p ≥ 0.001 before or after)")
    ax_tok.set_title(f"virtual step along −g (α = {found.alpha:g}, block {found.layer})")
    answers = found.answers
    ax_ans.bar([f"{k}: {t!r}" for k, t in zip(answers.index, answers["text"])], answers["dlogp"], color="tab:blue")
    ax_ans.axhline(0, color="black", lw=0.8)
    ax_ans.set_ylabel("Δ log p of the whole answer")
    ax_ans.set_title("where the answers move")
    fig.tight_layout()
    plt.show()
    return fig


# %% [markdown]
# ## Your correction
# The form calls `explore` and draws its result (the first press loads the model, a few seconds).

# %%
form = {
    "prompt": widgets.Text(value="The Battle of Hastings took place in the year", description="prompt"),
    "right": widgets.Text(value="1066", description="right"),
    "wrong": widgets.Text(value="1067", description="wrong"),
    "passage": widgets.Textarea(value="", placeholder="optional: a passage read before the question"),
    "checkpoint": widgets.Text(value=str(paths.checkpoint), description="checkpoint"),
}
for box in form.values():
    box.layout.width = "70%"
form["passage"].description = "passage"
button = widgets.Button(description="Explore", button_style="primary")
out = widgets.Output()


def on_click(_) -> None:
    """Explore the form's correction and draw it in the output area (a bad input is one line)."""
    out.clear_output()
    with out:
        try:
            found = explore(
                get_describer(form["checkpoint"].value),
                form["prompt"].value,
                form["right"].value,
                form["wrong"].value,
                form["passage"].value,
                alpha=alpha,
                layer=layer,
            )
        except GradsenseError as exc:
            print(f"error: {exc}")
            return
        show(found)


button.on_click(on_click)
display(widgets.VBox([*form.values(), button, out]))

# %% [markdown]
# ## The default example, without the form
# The same call the button makes, so the notebook also runs top to bottom (nbval runs it after the pipeline).

# %%
describer = get_describer(str(paths.checkpoint))
print(describer.meta.get("model_name") or "SmolLM2-135M-Instruct", describer.config)
found = explore(describer, "The Battle of Hastings took place in the year", "1066", "1067", alpha=alpha, layer=layer)
fig = show(found)

# %% [markdown]
# ## The same question inside a passage from another domain

# %%
in_passage = explore(
    describer,
    found.prompt,
    found.right,
    found.wrong,
    context="The heart pumps blood through arteries, and the veins carry it back.",
    alpha=alpha,
    layer=layer,
)
pd.DataFrame({"no passage": found.heads["description"], "biology passage": in_passage.heads["description"]})

# %% [markdown]
# ## Checks: the chart shows what `explore` computed

# %%
assert found.right_dlogp > 0, f"the step along −g should raise the right answer (Δ log p = {found.right_dlogp:.3f})"
assert list(found.shifts.columns) == ["direction", "token", "token_id", "dlogp", "p_old", "p_new"]
assert set(found.shifts["direction"]) == {"up", "down"}
assert (found.shifts.query("direction == 'up'")["dlogp"] > 0).all()
assert (found.shifts.query("direction == 'down'")["dlogp"] < 0).all()
assert list(found.heads.index) == ["gradient", "none", "noise", "shuffled"]
assert list(found.heads.columns) == ["description", "domain", "from", "to", "sentence", "injected"]
assert list(found.answers.index) == ["right", "wrong"] and list(found.answers.columns) == ["text", "logp_old", "dlogp"]
bars = [patch.get_width() for patch in fig.axes[0].patches]
assert bars == list(found.shifts["dlogp"].iloc[::-1])  # the token chart draws the table
assert [patch.get_height() for patch in fig.axes[1].patches] == list(found.answers["dlogp"])
print("explore checks passed")
