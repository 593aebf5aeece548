"""One correction explored as a researcher would: what the describer says under the correction's gradient and under
its controls (no injection, noise, another correction's gradient), which next tokens the oracle's virtual step along
−g pushes up and down, how the right and wrong answers move, and the round trip of the described `to`.

The virtual step is the oracle's (`oracle.virtual_step`, h ← h − α·(g/‖g‖)·‖h‖ at the output of block `layer`): by
default at the describer's source layer with α = 0.03, the labelling α of both presets; `oracle_setting` reads the
α and layer a run chose (`results/oracle/alpha.json`), so the step is the one that labelled the training data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradsense.baselines import roundtrip_cosines
from gradsense.describer import Describer
from gradsense.errors import GradsenseError
from gradsense.gradients import activation_gradients, last_position
from gradsense.items import check_lengths, item_gradients, item_problem
from gradsense.oracle import top_shift, virtual_step, virtual_steps
from gradsense.scoring import target_text

DEFAULT_ALPHA = 0.03  # the labelling α of the ci and full presets (results/oracle/alpha.json)
DEFAULT_OTHER = {"prompt": "The capital of France is", "right": "Paris", "wrong": "London"}  # the shuffled control
CONTROL_ROWS = ("gradient", "none", "noise", "shuffled")  # the rows of `Exploration.heads`, in this order
HEAD_COLUMNS = ("description", "domain", "from", "to", "sentence", "injected")
SHIFT_COLUMNS = ("direction", "token", "token_id", "dlogp", "p_old", "p_new")
ANSWER_COLUMNS = ("text", "logp_old", "dlogp")


@dataclass
class Exploration:
    """Everything the explore notebook shows for one correction (every number is computed by `explore`)."""

    prompt: str
    right: str
    wrong: str | None
    context: str | None
    heads: pd.DataFrame  # index CONTROL_ROWS; columns HEAD_COLUMNS
    shifts: pd.DataFrame  # ≤ top-k pushed up (Δ > 0), then ≤ top-k pushed down (Δ < 0); columns SHIFT_COLUMNS
    answers: pd.DataFrame  # index right (and wrong when given); columns ANSWER_COLUMNS (whole answer, teacher-forced)
    roundtrip_cosine: float  # cos(g, gradient of prompt → the described `to`); NaN when `to` did not parse
    alpha: float
    layer: int  # the block of the virtual step
    source_layer: int  # the block whose gradient the describer reads

    @property
    def head(self) -> dict:
        """The describer's head under the correction's own gradient: {domain, from, to}."""
        return {k: self.heads.loc["gradient", k] for k in ("domain", "from", "to")}

    @property
    def right_dlogp(self) -> float:
        """Δ log p of the right answer under the virtual step along −g."""
        return float(self.answers.loc["right", "dlogp"])

    @property
    def wrong_dlogp(self) -> float | None:
        """Δ log p of the wrong answer under the step (None without a wrong answer)."""
        return float(self.answers.loc["wrong", "dlogp"]) if "wrong" in self.answers.index else None


def oracle_setting(root: str | Path = ".") -> tuple[float, int | None]:
    """(α, layer) of a run's oracle from `<root>/results/oracle/alpha.json`; (DEFAULT_ALPHA, None) without one."""
    path = Path(root) / "results" / "oracle" / "alpha.json"
    if not path.is_file():
        return DEFAULT_ALPHA, None
    chosen = json.loads(path.read_text())
    layer = chosen.get("layer")
    return float(chosen["alpha"]), None if layer is None else int(layer)


def _optional(text: str | None) -> str | None:
    """A blank optional field (an empty form box) is None."""
    return text if isinstance(text, str) and text.strip() else None


def _checked(item: dict, what: str) -> dict:
    """The item, or a one-line GradsenseError naming what is wrong with it."""
    problem = item_problem(item)
    if problem:
        raise GradsenseError(f"{what}: {problem}")
    return item


def _sentence(description: str) -> str:
    """The free sentence after the head line ("" when the describer said none)."""
    return description.split("\n", 1)[1].strip() if "\n" in description else ""


def explore(
    describer: Describer,
    prompt: str,
    right: str,
    wrong: str | None = None,
    context: str | None = None,
    top_k: int = 8,
    other: Mapping | None = None,
    alpha: float = DEFAULT_ALPHA,
    layer: int | None = None,
    min_prob: float = 0.001,
    sentence_tokens: int = 16,
    seed: int = 0,
) -> Exploration:
    """Explore one correction (target = right): heads per control, token shifts, answer shifts, round-trip cosine.

    `other` ({prompt, right}, default DEFAULT_OTHER) gives the shuffled control's gradient; `layer` (default the
    describer's source layer) and `alpha` set the virtual step; a shifted token must have p ≥ min_prob before or after.
    """
    item = _checked({"id": "explore", "prompt": prompt, "right": right, "wrong": _optional(wrong)}, "explore")
    item["context"] = _optional(context)
    other_item = _checked({"id": "other", **dict(other or DEFAULT_OTHER)}, "explore (other correction)")
    if not isinstance(top_k, int) or top_k < 1:
        raise GradsenseError(f"explore: top_k must be a positive integer, not {top_k!r}")
    model, tok, config = describer.model, describer.tokenizer, describer.config
    check_lengths(describer, [item, other_item], sentence_tokens)
    source = config.source_layer
    layer = source if layer is None else int(layer)
    g = item_gradients(describer, [item, other_item])  # what the describer reads (per position with read "each")
    with describer.original_model():
        g_step = (
            last_position(g)[0]
            if layer == source
            else activation_gradients(
                model, tok, [item["prompt"]], [target_text(item["right"])], [layer], progress=False
            ).grads[0, 0]
        )
        step = virtual_step(model, tok, item["prompt"], g_step, layer, alpha)
        moved = virtual_steps(
            model,
            tok,
            [item["prompt"]],
            [item["right"]],
            [item["wrong"]] if item["wrong"] else None,
            g_step[None],
            layer,
            [alpha],
            controls=("gradient",),
            top_k=1,
            progress=False,
        ).iloc[0]
    shifts = _shifts(tok, step, top_k, min_prob)
    answers = pd.DataFrame(
        {"text": [item["right"]], "logp_old": [moved["logp_target_old"]], "dlogp": [moved["dlogp_target"]]},
        index=pd.Index(["right"], name="answer"),
    )
    if item["wrong"]:
        answers.loc["wrong"] = [item["wrong"], moved["logp_source_old"], moved["dlogp_source"]]
    heads = _heads(describer, g, item["context"], other_item, seed, sentence_tokens)
    with describer.original_model():
        to = [heads.loc["gradient", "to"]]
        cosine = roundtrip_cosines(model, tok, [item["prompt"]], to, last_position(g[:1]), source)[0]
    return Exploration(
        prompt=item["prompt"],
        right=item["right"],
        wrong=item["wrong"],
        context=item["context"],
        heads=heads,
        shifts=shifts,
        answers=answers,
        roundtrip_cosine=float(cosine),
        alpha=float(alpha),
        layer=layer,
        source_layer=source,
    )


def _shifts(tok, step, top_k: int, min_prob: float) -> pd.DataFrame:
    """The (at most) top-k tokens the step pushes up (Δ > 0) and down (Δ < 0) among tokens with p ≥ min_prob before
    or after, as `SHIFT_COLUMNS`."""
    p_old, p_new = step.logp_old.exp(), step.logp_new.exp()
    up, down = top_shift(step.dlogp, (p_old >= min_prob) | (p_new >= min_prob), top_k)
    up, down = [t for t in up if step.dlogp[t] > 0], [t for t in down if step.dlogp[t] < 0]
    rows = [
        {
            "direction": direction,
            "token": tok.decode([t]),
            "token_id": t,
            "dlogp": float(step.dlogp[t]),
            "p_old": float(p_old[t]),
            "p_new": float(p_new[t]),
        }
        for direction, ids in (("up", up), ("down", down))
        for t in ids
    ]
    return pd.DataFrame(rows, columns=list(SHIFT_COLUMNS))


def _heads(
    describer: Describer, g: np.ndarray, context: str | None, other: Mapping, seed: int, sentence_tokens: int
) -> pd.DataFrame:
    """The describer's description under each control, in the correction's own context (`CONTROL_ROWS`)."""
    run = {
        "gradient": ("gradient", g[:2]),  # row 1: the other correction's gradient, read in this context (shuffled)
        "none": ("none", g[:1]),
        "noise": ("noise", g[:1]),
    }
    tables = {
        name: describer.describe_gradients(grads, [context] * len(grads), control, seed, max_new_tokens=sentence_tokens)
        for name, (control, grads) in run.items()
    }
    rows = [tables["gradient"].iloc[0], tables["none"].iloc[0], tables["noise"].iloc[0], tables["gradient"].iloc[1]]
    injected = [
        "this correction's gradient",
        "nothing",
        "Gaussian noise of the gradient's norm",
        f"the gradient of {other['prompt']!r} → {other['right']!r}",
    ]
    heads = pd.DataFrame(
        [{k: row[k] for k in ("description", "domain", "from", "to")} for row in rows],
        index=pd.Index(CONTROL_ROWS, name="control"),
    )
    heads["sentence"] = [_sentence(d) for d in heads["description"]]
    heads["injected"] = injected
    return heads.astype(object).where(heads.notna(), None)
