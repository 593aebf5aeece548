"""Is the oracle valid? The virtual step against one real SGD step on the weights, and label faithfulness.

`real_step_validity` takes one SGD step θ ← θ − lr·∇θ NLL(target) on every weight and compares its next-token shift
with the virtual step's (and a random direction's); `validity_summary` and `acceptance` reduce the per-item tables
to the numbers the oracle stage reports; `faithfulness` says how often the observed tokens are the dataset answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.models import check_layer, model_device
from gradsense.oracle import check_alphas, edited_rows, random_directions, unit_directions
from gradsense.scoring import encode, forward, target_text
from gradsense.teacher import UNCLEAR, clarity_gain, normalize_answer, parse_label


def _real_step_rows(
    model: nn.Module, tokenizer, prompt: str, target: str, source: str, lrs: Sequence[float], item: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs (1+L, V) and Δ seq log p of target/source (L, 2) for the unmodified model + each lr.

    One SGD step θ ← θ − lr·∇θ NLL(target) on every parameter; the parameters are restored exactly afterwards.
    """
    device = model_device(model)
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    batch = encode(tokenizer, [prompt, prompt], [target_text(target), target_text(source)], ids=[item, item]).to(device)

    def measure() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            lp = torch.log_softmax(forward(model, batch).logits.float(), -1)
        picked = lp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
        return lp[0, batch.last_prompt[0]].cpu(), (picked * batch.target_positions).sum(-1).cpu()

    try:
        for p in params:
            p.requires_grad_(True)
        logits = forward(model, batch).logits[:1].float()
        lp = torch.log_softmax(logits, -1)
        labels = batch.labels[:1]
        loss = -(lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum()
        grads = torch.autograd.grad(loss, params)
        base_next, base_seq = measure()
        nexts, dseq = [base_next], []
        for lr in lrs:
            with torch.no_grad():  # in place, no temporaries: the parameters are 0.5 GB for SmolLM2
                for p, g, s in zip(params, grads, saved):
                    p.copy_(s).add_(g, alpha=-lr)
            nxt, seq = measure()
            nexts.append(nxt)
            dseq.append(seq - base_seq)
    finally:
        with torch.no_grad():
            for p, s, flag in zip(params, saved, flags):
                p.copy_(s)
                p.requires_grad_(flag)
    return torch.stack(nexts), torch.stack(dseq)


def _top_promoted(old: torch.Tensor, dlogp: torch.Tensor, min_prob: float) -> int:
    """The token pushed up most among those with p ≥ min_prob before or after."""
    eligible = (old.exp() >= min_prob) | ((old + dlogp).exp() >= min_prob)
    return int(torch.where(eligible, dlogp, torch.tensor(-torch.inf)).argmax())


def _compare(old: torch.Tensor, real: torch.Tensor, virtual: torch.Tensor, top: torch.Tensor, min_prob: float) -> dict:
    """Spearman ρ of the two Δlog p over the `top` token ids and agreement of their top promoted tokens."""
    rho = spearmanr(real[top].numpy(), virtual[top].numpy()).statistic
    up_real, up_virtual = _top_promoted(old, real, min_prob), _top_promoted(old, virtual, min_prob)
    return {"spearman": float(rho), "top_agree": up_real == up_virtual}


def real_step_validity(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    sources: Sequence[str],
    grads,
    layer: int,
    alpha: float,
    lrs: Sequence[float],
    top_n: int = 50,
    min_prob: float = 0.02,
    seed: int = 0,
    ids: Sequence[object] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Does the virtual step predict what one real SGD step (same loss) does to the next-token distribution?

    Per item × lr: Spearman ρ of Δlog p over the `top_n` most probable tokens (before the step), sign agreement of
    Δ target / Δ source, agreement of the top promoted token — for the −g virtual step and for a random
    same-norm direction. Returns (summary per item × lr, token-level table for the scatter).
    """
    layer = check_layer(model, layer)
    (alpha,) = check_alphas([alpha])
    lrs = check_alphas(lrs)
    names = list(ids) if ids is not None else list(range(len(prompts)))
    units = unit_directions(grads, names)
    randoms = random_directions(len(prompts), units.shape[1], 1, seed)[:, 0]
    summary, tokens = [], []
    for i in tqdm(range(len(prompts)), desc="real SGD steps", disable=not progress):
        # Virtual rows: base, −g, random; each with target and source continuations (6 rows, one forward).
        dirs = torch.stack([units[i], units[i], randoms[i]] * 2)
        alphas = torch.tensor([0.0, alpha, alpha] * 2)
        conts = [target_text(targets[i])] * 3 + [target_text(sources[i])] * 3
        next_lp, seq = edited_rows(model, tokenizer, [prompts[i]] * 6, conts, dirs, alphas, layer, [names[i]] * 6)
        virtual = {
            "virtual": (next_lp[1] - next_lp[0], seq[1] - seq[0], seq[4] - seq[3]),
            "random": (next_lp[2] - next_lp[0], seq[2] - seq[0], seq[5] - seq[3]),
        }
        real_next, real_seq = _real_step_rows(model, tokenizer, prompts[i], targets[i], sources[i], lrs, names[i])
        old = real_next[0]
        top = old.topk(min(top_n, len(old))).indices
        for k, lr in enumerate(lrs):
            real = real_next[k + 1] - old
            row = {
                "item": i,
                "id": names[i],
                "lr": lr,
                "alpha": alpha,
                "real_dlogp_target": float(real_seq[k, 0]),
                "real_dlogp_source": float(real_seq[k, 1]),
            }
            for name, (dv, dt, ds) in virtual.items():
                cmp = _compare(old, real, dv, top, min_prob)
                row |= {
                    f"{name}_spearman": cmp["spearman"],
                    f"{name}_top_agree": cmp["top_agree"],
                    f"{name}_dlogp_target": float(dt),
                    f"{name}_dlogp_source": float(ds),
                    f"{name}_sign_target": bool(np.sign(float(dt)) == np.sign(float(real_seq[k, 0]))),
                    f"{name}_sign_source": bool(np.sign(float(ds)) == np.sign(float(real_seq[k, 1]))),
                }
            summary.append(row)
            for t in top.tolist():
                tokens.append(
                    {
                        "item": i,
                        "id": names[i],
                        "lr": lr,
                        "token": t,
                        "real": float(real[t]),
                        "virtual": float(virtual["virtual"][0][t]),
                        "random": float(virtual["random"][0][t]),
                    }
                )
    return pd.DataFrame(summary), pd.DataFrame(tokens)


def faithfulness(shifts: pd.DataFrame, by: Sequence[str] = ("domain", "direction")) -> pd.DataFrame:
    """How often the top promoted token is the target's first visible token (and the demoted one the source's)."""
    frame = shifts.assign(
        to_is_target=shifts["to_token"] == shifts["target_first"],
        from_is_source=shifts["from_token"] == shifts["source_first"],
        target_up=shifts["dlogp_target"] > 0,
    )
    return (
        frame.groupby(list(by), sort=True)
        .agg(
            n=("id", "size"),
            to_is_target=("to_is_target", "mean"),
            from_is_source=("from_is_source", "mean"),
            target_up=("target_up", "mean"),
            median_dlogp_target=("dlogp_target", "median"),
        )
        .reset_index()
    )


def label_faithfulness(labelled: pd.DataFrame, by: Sequence[str] = ("domain", "direction")) -> pd.DataFrame:
    """How often a label's `to` is the whole target and its `from` the source or the model's answer now (`belief`),
    per group; `clear` = the label names an answer (not `unclear`)."""
    heads = pd.DataFrame([parse_label(t) for t in labelled["label"]], index=labelled.index)

    def same(a, b) -> list[bool]:
        return [normalize_answer(x) == normalize_answer(y) for x, y in zip(a, b)]

    frame = labelled.assign(
        clear=heads["to"].fillna("").str.casefold() != UNCLEAR,
        to_is_target=same(heads["to"], labelled["target"]),
        from_is_source=same(heads["from"], labelled["source"]),
        from_is_belief=same(heads["from"], labelled["belief"]),
    ).assign(from_is_source_or_belief=lambda f: f["from_is_source"] | f["from_is_belief"])
    columns = ["clear", "to_is_target", "from_is_source", "from_is_belief", "from_is_source_or_belief"]
    return frame.groupby(list(by), sort=True).agg(n=("id", "size"), **{c: (c, "mean") for c in columns}).reset_index()


def clarity_counts(labelled: pd.DataFrame, min_gain: float) -> pd.DataFrame:
    """Per split: items labelled with their target (the step raised it by ≥ `min_gain` nats), and items labelled
    `unclear` (left out of training) because the step raised it by less or lowered it (`teacher.clarity_gain`)."""
    clear = np.array([(parse_label(t)["to"] or "").casefold() != UNCLEAR for t in labelled["label"]], dtype=bool)
    gain = np.array([clarity_gain(r) for r in labelled.to_dict("records")], dtype=float)
    less = f"raised < {min_gain:g} nats"
    reason = np.where(clear, "clear", np.where(gain > 0, less, "not raised"))
    table = pd.crosstab(labelled["split"], reason).reindex(columns=["clear", less, "not raised"])
    return table.fillna(0).astype(int).reset_index().rename_axis(columns=None)


def step_position_clarity(shifts: pd.DataFrame, min_gain: float) -> pd.DataFrame:
    """Per domain, then all: items, the share the last-position step makes clear (dlogp_target ≥ `min_gain`) and
    the share the step at every target-predicting position does (dlogp_target_each), with both median gains."""
    if "dlogp_target_each" not in shifts:
        raise GradsenseError("the shifts have no dlogp_target_each (run the oracle with step_positions 'each')")
    groups = [*shifts.groupby("domain", sort=True), ("all", shifts)]
    return pd.DataFrame(
        [
            {
                "domain": name,
                "n": len(part),
                "clear_last": float((part["dlogp_target"] >= min_gain).mean()),
                "clear_each": float((part["dlogp_target_each"] >= min_gain).mean()),
                "median_gain_last": float(part["dlogp_target"].median()),
                "median_gain_each": float(part["dlogp_target_each"].median()),
            }
            for name, part in groups
        ]
    )


VALIDITY_METRICS = ("spearman", "sign_target", "sign_source", "top_agree")


def validity_summary(validity: pd.DataFrame, metrics: Sequence[str] = VALIDITY_METRICS) -> pd.DataFrame:
    """Per lr and step (virtual, random): the mean over items of each `real_step_validity` metric."""
    return pd.DataFrame(
        [
            {"lr": lr, "step": name, **{m: float(part[f"{name}_{m}"].mean()) for m in metrics}}
            for lr, part in validity.groupby("lr", sort=True)
            for name in ("virtual", "random")
        ]
    )


def acceptance(shifts: pd.DataFrame) -> dict:
    """The oracle's acceptance numbers over the given `item_shifts` rows: share and mean of Δlog p(target) > 0 under
    −g, mean |Δ| under a random direction and its ratio to the −g mean, mean Δ under +g, share with the source down."""
    out = {
        "n_test": len(shifts),
        "share_target_up": float((shifts["dlogp_target"] > 0).mean()),
        "mean_dlogp_target": float(shifts["dlogp_target"].mean()),
        "mean_abs_random_dlogp_target": float(shifts["random_dlogp_target"].abs().mean()),
        "mean_opposite_dlogp_target": float(shifts["opposite_dlogp_target"].mean()),
        "share_source_down": float((shifts["dlogp_source"] < 0).mean()),
    }
    out["random_over_gradient"] = out["mean_abs_random_dlogp_target"] / out["mean_dlogp_target"]
    return out
