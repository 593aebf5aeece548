"""The lookahead oracle: move the residual stream along −g (a "virtual step") and watch the next-token distribution.

A virtual step replaces the output h of block `layer` at the last prompt position by h − α·(g/‖g‖)·‖h‖, so α is a
fraction of the residual norm. `virtual_step` does one item over the whole vocabulary; `virtual_steps` does many items
× an α grid with controls (+g, random same-norm directions) in one forward per batch; `real_step_validity` checks the
oracle against one real SGD step on the weights with the same loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.hooks import edit_block_output
from gradsense.models import check_layer, model_device
from gradsense.scoring import encode, forward, target_text, tokenize_target

CONTROLS = ("gradient", "opposite", "random")


@dataclass
class VirtualStep:
    """One item's virtual step: next-token log-probs before/after and their change, over the whole vocabulary."""

    dlogp: torch.Tensor  # (V,) logp_new − logp_old
    logp_old: torch.Tensor  # (V,)
    logp_new: torch.Tensor  # (V,)
    alpha: float
    layer: int


def check_alphas(alphas: float | Sequence[float]) -> list[float]:
    """A non-empty grid of finite α ≥ 0 (α is a fraction of ‖h‖); anything else is a GradsenseError."""
    grid = [alphas] if np.isscalar(alphas) else list(alphas)
    if not grid:
        raise GradsenseError("alpha grid is empty: give at least one α ≥ 0")
    for a in grid:
        if not isinstance(a, (int, float, np.integer, np.floating)) or not np.isfinite(a) or a < 0:
            raise GradsenseError(f"alpha {a!r} is invalid: every α must be a finite number ≥ 0")
    return [float(a) for a in grid]


def unit_directions(grads, ids: Sequence[object] | None = None) -> torch.Tensor:
    """(N, d) float32 g/‖g‖ from (N, d) or (d,) gradients; a zero or non-finite gradient names its item."""
    g = torch.as_tensor(np.asarray(grads, dtype=np.float32) if not torch.is_tensor(grads) else grads).float().cpu()
    g = g[None] if g.ndim == 1 else g
    if g.ndim != 2:
        raise GradsenseError(f"gradients must be (d,) or (N, d), not shape {tuple(g.shape)}")
    names = list(ids) if ids is not None else list(range(len(g)))
    finite = torch.isfinite(g).all(-1)
    norms = g.double().norm(dim=-1)
    for i in range(len(g)):
        if not finite[i]:
            raise GradsenseError(f"item {names[i]}: gradient is not finite")
        if not norms[i] > 0:
            raise GradsenseError(f"item {names[i]}: gradient is zero (no direction to step along)")
    return (g.double() / norms[:, None]).float()


def random_directions(n: int, d: int, n_random: int = 1, seed: int = 0) -> torch.Tensor:
    """(n, n_random, d) unit vectors from a seeded Gaussian, independent of batching."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, n_random, d, generator=gen, dtype=torch.float64)
    return (r / r.norm(dim=-1, keepdim=True)).float()


def _step_edit(positions: torch.Tensor, directions: torch.Tensor, alphas: torch.Tensor):
    """edit_fn(h): row b's hidden state at positions[b] becomes h − α_b·u_b·‖h‖ (other positions untouched)."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pos = positions.to(hidden.device)
        h = hidden[rows, pos].float()
        shift = -alphas.to(h)[:, None] * directions.to(h) * h.norm(dim=-1, keepdim=True)
        delta = torch.zeros_like(hidden)
        delta[rows, pos] = shift.to(hidden.dtype)
        return hidden + delta

    return edit


@torch.no_grad()
def _edited_rows(
    model: nn.Module, tokenizer, prompts: Sequence[str], conts: Sequence[str] | None, directions: torch.Tensor,
    alphas: torch.Tensor, layer: int, ids: Sequence[object] | None = None, positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs (R, V) at the last prompt position and summed log p of the continuation (R,) (zeros
    without continuations), with the step applied at `positions` (default: each row's last prompt position)."""
    if positions is None and len(prompts) > 1:
        return _edited_rows_shared(model, tokenizer, prompts, conts, directions, alphas, layer, ids)
    device = model_device(model)
    batch = encode(tokenizer, list(prompts), list(conts) if conts is not None else None, ids=ids).to(device)
    width = batch.input_ids.shape[1]
    keep = int(width - batch.last_prompt.min())  # left padding: every needed position lies in the last `keep`
    where = batch.last_prompt if positions is None else positions
    with edit_block_output(model, layer, _step_edit(where, directions, alphas)):
        logits = forward(model, batch, logits_to_keep=keep).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    offset = width - keep
    rows = torch.arange(len(logp), device=device)
    next_lp = logp[rows, batch.last_prompt - offset]
    labels = batch.labels[:, offset:]
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    seq = (picked * (labels != -100)).sum(-1)
    return next_lp.cpu(), seq.cpu()


@torch.no_grad()
def _edited_rows_shared(
    model: nn.Module, tokenizer, prompts: Sequence[str], conts: Sequence[str] | None, directions: torch.Tensor,
    alphas: torch.Tensor, layer: int, ids: Sequence[object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_edited_rows` at the last prompt position, sharing work: the step cannot change anything before the last
    prompt token (causal attention), so each distinct prompt's prefix runs once into a KV cache and every row runs
    only its last prompt token + continuation (about 3× fewer tokens for short prompts and many variants)."""
    device = model_device(model)
    names = list(ids) if ids is not None else list(range(len(prompts)))
    unique: dict[str, int] = {}
    row_item = torch.tensor([unique.setdefault(p, len(unique)) for p in prompts])
    first_row = {i: r for r, i in reversed(list(enumerate(row_item.tolist())))}
    pre = encode(tokenizer, list(unique), ids=[names[first_row[i]] for i in range(len(unique))]).to(device)
    if pre.input_ids.shape[1] < 2:  # single-token prompts: no prefix to share
        return _edited_rows(model, tokenizer, prompts, conts, directions, alphas, layer, ids, pre.last_prompt[row_item])
    cache = model(input_ids=pre.input_ids[:, :-1], attention_mask=pre.attention_mask[:, :-1],
                  position_ids=pre.position_ids[:, :-1], use_cache=True).past_key_values
    cache.batch_select_indices(row_item.to(device))
    cont_ids = [tokenize_target(tokenizer, c, names[r]) for r, c in enumerate(conts)] if conts is not None else []
    width = 1 + max((len(c) for c in cont_ids), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    suffix = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), -100, dtype=torch.long)
    suffix[:, 0], mask[:, 0] = pre.input_ids[row_item, -1].cpu(), 1
    for r, ids_r in enumerate(cont_ids):
        suffix[r, 1 : 1 + len(ids_r)] = torch.tensor(ids_r)
        mask[r, 1 : 1 + len(ids_r)] = 1
        labels[r, : len(ids_r)] = torch.tensor(ids_r)  # suffix position k predicts continuation token k
    suffix, mask, labels = suffix.to(device), mask.to(device), labels.to(device)
    positions = pre.position_ids[row_item, -1][:, None] + torch.arange(width, device=device)
    full_mask = torch.cat([pre.attention_mask[row_item, :-1], mask], dim=1)
    zero = torch.zeros(len(prompts), dtype=torch.long)
    with edit_block_output(model, layer, _step_edit(zero, directions, alphas)):
        logits = model(input_ids=suffix, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp[:, 0].cpu(), (picked * (labels != -100)).sum(-1).cpu()


def virtual_step(
    model: nn.Module, tokenizer, prompt: str, grad, layer: int, alpha: float, position: str | int = "last"
) -> VirtualStep:
    """The change of next-token log-probs when h ← h − α·(g/‖g‖)·‖h‖ at the output of block `layer`.

    `position` is "last" (the last prompt token) or a prompt token index (negative counts from the end); the
    next-token distribution is always read at the last prompt position.
    """
    layer = check_layer(model, layer)
    (alpha,) = check_alphas([alpha])
    unit = unit_directions(grad).expand(2, -1)
    batch = encode(tokenizer, [prompt])
    n = int(batch.input_ids.shape[1])
    if position == "last":
        pos = n - 1
    elif isinstance(position, (int, np.integer)) and -n <= position < n:
        pos = int(position) % n
    else:
        raise GradsenseError(f"position {position!r} is invalid: 'last' or a token index in -{n}..{n - 1}")
    # Two unpadded copies of the prompt in one forward: row 0 unedited (α = 0), row 1 stepped.
    logp, _ = _edited_rows(model, tokenizer, [prompt, prompt], None, unit, torch.tensor([0.0, alpha]), layer,
                           positions=torch.tensor([pos, pos]))
    return VirtualStep(dlogp=logp[1] - logp[0], logp_old=logp[0], logp_new=logp[1], alpha=alpha, layer=layer)


def _variants(alphas: list[float], controls: Sequence[str], n_random: int) -> list[tuple[str, int, float]]:
    """(control, repeat, α) per edited row of one item; the unedited base row comes first."""
    out = [("base", 0, 0.0)]
    for control in controls:
        for rep in range(n_random if control == "random" else 1):
            out += [(control, rep, a) for a in alphas]
    return out


def _top_shift(dlogp: torch.Tensor, eligible: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """Ids of the k tokens pushed up most and down most among eligible tokens."""
    k = min(k, int(eligible.sum()))
    up = torch.where(eligible, dlogp, torch.tensor(-torch.inf)).topk(k).indices.tolist() if k else []
    down = torch.where(eligible, -dlogp, torch.tensor(-torch.inf)).topk(k).indices.tolist() if k else []
    return up, down


def virtual_steps(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    sources: Sequence[str] | None,
    grads,
    layer: int,
    alphas: Sequence[float],
    controls: Sequence[str] = CONTROLS,
    n_random: int = 1,
    top_k: int = 5,
    min_prob: float = 0.02,
    batch_size: int = 64,
    seed: int = 0,
    ids: Sequence[object] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Virtual steps for many items × an α grid × controls; one row per (item, control, repeat, α).

    targets/sources are answers without the leading space (continuation = `target_text(answer)`). Columns: item,
    id, control (gradient = −g, opposite = +g, random = same-norm random direction), repeat, alpha, dlogp_target,
    dlogp_source (−g rows only; NaN for controls and without sources), kl (KL(new‖old) of the next token), top1 (argmax token after the step),
    up_ids/down_ids (top-k tokens by Δlog p among tokens with p ≥ min_prob before or after), up_dlogp/down_dlogp.
    A pushed-up token must have p ≥ min_prob after the step, a pushed-down one before it (Δ > 0 ⇒ p grows).
    `batch_size` counts forward rows; an item takes 1 + |α|·(controls + n_random − 1) target rows + 1 + |α| source rows.
    """
    layer = check_layer(model, layer)
    grid = check_alphas(alphas)
    if len(targets) != len(prompts) or (sources is not None and len(sources) != len(prompts)):
        raise GradsenseError(f"{len(prompts)} prompts but {len(targets)} targets / sources of another length")
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown or not controls:
        raise GradsenseError(f"controls {list(controls)!r} invalid: choose from {CONTROLS}")
    names = list(ids) if ids is not None else list(range(len(prompts)))
    units = unit_directions(grads, names)
    if len(units) != len(prompts):
        raise GradsenseError(f"{len(prompts)} prompts but {len(units)} gradients")
    randoms = random_directions(len(prompts), units.shape[1], n_random, seed)
    variants = _variants(grid, controls, n_random)
    # Target rows for every variant; source rows only for the unedited base and the −g steps (controls are judged
    # on the target), so an item costs fewer rows.
    src_of = {v: k for k, v in enumerate(i for i, var in enumerate(variants) if var[0] in ("base", "gradient"))}
    row_plan = [("target", v) for v in range(len(variants))]
    row_plan += [("source", v) for v in src_of] if sources is not None else []
    per_item = len(row_plan)
    step = max(1, batch_size // per_item)
    records = []
    for start in tqdm(range(0, len(prompts), step), desc="virtual steps", disable=not progress):
        items = range(start, min(start + step, len(prompts)))
        row_prompts, row_conts, row_dirs, row_alpha, row_ids = [], [], [], [], []
        for i in items:
            for kind, v in row_plan:
                control, rep, a = variants[v]
                direction = {"base": units[i], "gradient": units[i], "opposite": -units[i]}.get(control)
                row_dirs.append(randoms[i, rep] if direction is None else direction)
                row_alpha.append(a)
                row_prompts.append(prompts[i])
                row_conts.append(target_text((targets if kind == "target" else sources)[i]))
                row_ids.append(names[i])
        next_lp, seq = _edited_rows(model, tokenizer, row_prompts, row_conts, torch.stack(row_dirs),
                                    torch.tensor(row_alpha), layer, row_ids)
        for j, i in enumerate(items):
            base = j * per_item
            src = base + len(variants)  # the source rows follow the target rows, in src_of order
            old = next_lp[base]
            p_old_ok = old.exp() >= min_prob
            for v, (control, rep, a) in enumerate(variants[1:], start=1):
                new = next_lp[base + v]
                dlogp = new - old
                up, down = _top_shift(dlogp, p_old_ok | (new.exp() >= min_prob), top_k)
                has_source = sources is not None and v in src_of
                records.append({
                    "item": i, "id": names[i], "control": control, "repeat": rep, "alpha": a,
                    "dlogp_target": float(seq[base + v] - seq[base]),
                    "dlogp_source": float(seq[src + src_of[v]] - seq[src]) if has_source else float("nan"),
                    "kl": float((new.exp() * dlogp).sum().clamp(min=0)),
                    "top1": int(new.argmax()),
                    "up_ids": up, "down_ids": down,
                    "up_dlogp": [round(float(dlogp[t]), 4) for t in up],
                    "down_dlogp": [round(float(dlogp[t]), 4) for t in down],
                })
    return pd.DataFrame.from_records(records)


def choose_alpha(table: pd.DataFrame, min_median_gain: float = 1.0) -> dict:
    """The labelling α by the params rule: the smallest α whose median Δlog p(target) (gradient control) ≥ the gain.

    If no α reaches it, the α with the largest median gain, with `rule_met` False (never tuned per item).
    """
    grad = table[(table["control"] == "gradient") & (table["alpha"] > 0)]
    if grad.empty:
        raise GradsenseError("choose_alpha needs gradient-control rows with α > 0")
    medians = grad.groupby("alpha", sort=True)["dlogp_target"].median()
    reached = medians[medians >= min_median_gain]
    alpha = float(reached.index[0]) if len(reached) else float(medians.idxmax())
    return {"alpha": alpha, "median_gain": float(medians[alpha]), "rule_met": bool(len(reached)),
            "min_median_gain": float(min_median_gain), "medians": {float(k): float(v) for k, v in medians.items()}}


def _visible(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids)).strip()


def observed_tokens(
    model: nn.Module, tokenizer, prompts: Sequence[str], grads, layer: int, alpha: float,
    up_ids: Sequence[int | None], down_ids: Sequence[int | None], min_prob: float = 0.02, batch_size: int = 64,
    ids: Sequence[object] | None = None,
) -> tuple[list[str], list[str]]:
    """Visible text of each item's top promoted ("to") and demoted ("from") token.

    A whitespace-only token (years start with a bare " " token) is extended by one step: teacher-force it and take
    the top promoted (resp. demoted) token at the next position under the same step. None (no token had
    p ≥ min_prob) gives "".
    """
    layer = check_layer(model, layer)
    units = unit_directions(grads, ids)
    to_text, from_text = [], []
    pending = []  # (item, which, token id) for whitespace-only tokens
    for i, (u, d) in enumerate(zip(up_ids, down_ids)):
        for which, tok, out in (("up", u, to_text), ("down", d, from_text)):
            text = _visible(tokenizer, [tok]) if tok is not None else ""
            out.append(text)
            if not text and tok is not None:
                pending.append((i, which, tok))
    for start in range(0, len(pending), max(1, batch_size // 2)):
        part = pending[start : start + max(1, batch_size // 2)]
        rows_p = [prompts[i] for i, _, _ in part for _ in (0, 1)]
        rows_c = [tokenizer.decode([tok]) for _, _, tok in part for _ in (0, 1)]
        dirs = torch.stack([units[i] for i, _, _ in part for _ in (0, 1)])
        alphas = torch.tensor([0.0, alpha] * len(part))
        # The continuation is prompt + the whitespace token; read the distribution after it (the last row position).
        device = model_device(model)
        batch = encode(tokenizer, rows_p, rows_c).to(device)
        with torch.no_grad(), edit_block_output(model, layer, _step_edit(batch.last_prompt, dirs, alphas)):
            logits = forward(model, batch, logits_to_keep=1).logits[:, -1].float()
        lp = torch.log_softmax(logits, -1).cpu()
        for j, (i, which, tok) in enumerate(part):
            old, new = lp[2 * j], lp[2 * j + 1]
            up, down = _top_shift(new - old, (old.exp() >= min_prob) | (new.exp() >= min_prob), 1)
            pick = up if which == "up" else down
            text = _visible(tokenizer, [tok] + pick[:1])
            (to_text if which == "up" else from_text)[i] = text
    return to_text, from_text


def first_visible_token(tokenizer, answer: str) -> str:
    """The first token of `target_text(answer)` whose text is not whitespace, stripped (years: the first digit)."""
    for tok in tokenizer(target_text(answer), add_special_tokens=False)["input_ids"]:
        text = tokenizer.decode([tok]).strip()
        if text:
            return text
    return ""


# --- oracle validity: the virtual step against one real SGD step on the weights --------------------------------


def _real_step_rows(
    model: nn.Module, tokenizer, prompt: str, target: str, source: str, lrs: Sequence[float], item: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        next_lp, seq = _edited_rows(model, tokenizer, [prompts[i]] * 6, conts, dirs, alphas, layer, [names[i]] * 6)
        virtual = {"virtual": (next_lp[1] - next_lp[0], seq[1] - seq[0], seq[4] - seq[3]),
                   "random": (next_lp[2] - next_lp[0], seq[2] - seq[0], seq[5] - seq[3])}
        real_next, real_seq = _real_step_rows(model, tokenizer, prompts[i], targets[i], sources[i], lrs, names[i])
        old = real_next[0]
        top = old.topk(min(top_n, len(old))).indices
        for k, lr in enumerate(lrs):
            real = real_next[k + 1] - old
            row = {"item": i, "id": names[i], "lr": lr, "alpha": alpha,
                   "real_dlogp_target": float(real_seq[k, 0]), "real_dlogp_source": float(real_seq[k, 1])}
            for name, (dv, dt, ds) in virtual.items():
                cmp = _compare(old, real, dv, top, min_prob)
                row |= {f"{name}_spearman": cmp["spearman"], f"{name}_top_agree": cmp["top_agree"],
                        f"{name}_dlogp_target": float(dt), f"{name}_dlogp_source": float(ds),
                        f"{name}_sign_target": bool(np.sign(float(dt)) == np.sign(float(real_seq[k, 0]))),
                        f"{name}_sign_source": bool(np.sign(float(ds)) == np.sign(float(real_seq[k, 1])))}
            summary.append(row)
            for t in top.tolist():
                tokens.append({"item": i, "id": names[i], "lr": lr, "token": t, "real": float(real[t]),
                               "virtual": float(virtual["virtual"][0][t]), "random": float(virtual["random"][0][t])})
    return pd.DataFrame(summary), pd.DataFrame(tokens)


# --- the labelling pass: one α, every item ---------------------------------------------------------------------


def item_shifts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    sources: Sequence[str],
    grads,
    layer: int,
    alpha: float,
    top_k: int = 5,
    min_prob: float = 0.02,
    batch_size: int = 64,
    seed: int = 0,
    ids: Sequence[object] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per item at the labelling α: the −g step's shift, its +g and random controls, and the observed tokens.

    Columns: id, dlogp_target, dlogp_source, kl, opposite_dlogp_target, random_dlogp_target, random_kl,
    up_tokens / down_tokens (visible text of the top-k), to_token / from_token (top promoted / demoted, whitespace
    tokens extended by one step), target_first / source_first (first visible token of the dataset answers).
    """
    (alpha,) = check_alphas([alpha])
    names = list(ids) if ids is not None else list(range(len(prompts)))
    table = virtual_steps(model, tokenizer, prompts, targets, sources, grads, layer, [alpha], CONTROLS, 1, top_k,
                          min_prob, batch_size, seed, names, progress)
    by = {c: table[table["control"] == c].set_index("item").sort_index() for c in CONTROLS}
    grad = by["gradient"]
    to_tok, from_tok = observed_tokens(model, tokenizer, prompts, grads, layer, alpha,
                                       [u[0] if u else None for u in grad["up_ids"]],
                                       [d[0] if d else None for d in grad["down_ids"]],
                                       min_prob, batch_size, names)
    return pd.DataFrame({
        "id": names,
        "alpha": alpha,
        "layer": check_layer(model, layer),
        "dlogp_target": grad["dlogp_target"].to_numpy(),
        "dlogp_source": grad["dlogp_source"].to_numpy(),
        "kl": grad["kl"].to_numpy(),
        "opposite_dlogp_target": by["opposite"]["dlogp_target"].to_numpy(),
        "random_dlogp_target": by["random"]["dlogp_target"].to_numpy(),
        "random_kl": by["random"]["kl"].to_numpy(),
        "up_tokens": [[_visible(tokenizer, [t]) for t in row] for row in grad["up_ids"]],
        "down_tokens": [[_visible(tokenizer, [t]) for t in row] for row in grad["down_ids"]],
        "to_token": to_tok,
        "from_token": from_tok,
        "target_first": [first_visible_token(tokenizer, t) for t in targets],
        "source_first": [first_visible_token(tokenizer, s) for s in sources],
    })


def faithfulness(shifts: pd.DataFrame, by: Sequence[str] = ("domain", "direction")) -> pd.DataFrame:
    """How often the top promoted token is the target's first visible token (and the demoted one the source's)."""
    frame = shifts.assign(to_is_target=shifts["to_token"] == shifts["target_first"],
                          from_is_source=shifts["from_token"] == shifts["source_first"],
                          target_up=shifts["dlogp_target"] > 0)
    return (frame.groupby(list(by), sort=True)
            .agg(n=("id", "size"), to_is_target=("to_is_target", "mean"), from_is_source=("from_is_source", "mean"),
                 target_up=("target_up", "mean"), median_dlogp_target=("dlogp_target", "median"))
            .reset_index())


def stratified_sample(frame: pd.DataFrame, n: int | None, by: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """About n rows spread evenly over the groups of `by` (seeded), in the frame's order; None = every row."""
    if n is None or n >= len(frame):
        return frame
    if n < 1:
        raise GradsenseError(f"sample size must be ≥ 1 or null, not {n}")
    groups = frame.groupby(list(by), sort=True).ngroups
    per_group = -(-n // groups)
    picked = frame.groupby(list(by), sort=True, group_keys=False).apply(
        lambda g: g.sample(min(len(g), per_group), random_state=seed))
    if len(picked) > n:  # groups were rounded up: drop a seeded few so exactly n remain
        picked = picked.sample(n, random_state=seed)
    return frame.loc[sorted(picked.index)]
