# %% [markdown]
# # Explore: what pressure does the model feel?
# Type a fact prompt, the answer a correction would push towards (`right`), optionally the answer it pushes away
# from (`wrong`, for your notes only) and a passage read before the question (`context`). The gradient of the loss
# on `right` is taken at the checkpoint's source layer, projected, injected into the interpretation prompt, and the
# model says what it feels. Not part of the pipeline: it reads the checkpoint that `dvc repro train` writes
# (`results/train/checkpoint`). The command line does the same: `gradsense describe --prompt … --right …`.

# %%
from gradsense.checkpoint import load_describer
from gradsense.items import describe
from gradsense.paths import Paths

describer = load_describer(Paths("..").checkpoint, device="auto")  # loads the model named in the checkpoint
print(describer.meta.get("model_name") or "SmolLM2-135M-Instruct", describer.config)


def feel(
    prompt: str, right: str, wrong: str | None = None, context: str | None = None, control: str = "gradient"
) -> dict:
    """Describe one correction (control: gradient, none, noise)."""
    item = {"id": "explore", "prompt": prompt, "right": right, "wrong": wrong, "context": context}
    return describe([item], describer=describer, control=control)[0]


# %% [markdown]
# ## Your correction

# %%
prompt = "The Battle of Hastings took place in the year"
right = "1066"
wrong = "1067"
context = None  # e.g. "Cells divide by mitosis, and each daughter cell receives a full copy of the chromosomes."

feel(prompt, right, wrong, context)

# %% [markdown]
# ## The same question inside a passage from another domain, and the controls

# %%
for label, kwargs in [
    ("biology passage", {"context": "The heart pumps blood through arteries, and the veins carry it back."}),
    ("no injection", {"control": "none"}),
    ("noise of the same norm", {"control": "noise"}),
]:
    print(f"{label:>24}: {feel(prompt, right, wrong, **kwargs)['description']!r}")
