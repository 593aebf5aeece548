"""The lookahead oracle: move the residual stream along −g (a "virtual step") and watch the next-token distribution.

A virtual step replaces the output h of block `layer` at the last prompt position by h − α·(g/‖g‖)·‖h‖, so α is a
fraction of the residual norm. `virtual_step` does one item over the whole vocabulary; `virtual_steps` does many items
× an α grid and step kinds (−g, +g, random same-norm directions) in one forward per batch; `sweep_items` picks the
validation items of the α sweep and `choose_alpha` states the rule for the labelling α (the block is
`gradients.extracted_layer`); the labelling pass at that α (`item_shifts`) lives in `gradsense.shifts`. The check against a real SGD step and label faithfulness live in `gradsense.validity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.hooks import edit_block_output
from gradsense.models import check_layer, model_device
from gradsense.sampling import stratified
from gradsense.scoring import encode, forward, target_text, tokenize_target

STEP_KINDS = ("gradient", "opposite", "random")  # the −g step and its two controls: +g, a random direction


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


def position_steps(where: torch.Tensor, directions: torch.Tensor, alphas: float | torch.Tensor):
    """edit_fn(h): row b's hidden state at each position where[b, j] becomes h − α_b·directions[b, j]·‖h‖ (α one
    float or one per row; a zero direction leaves it; a position listed twice gets both shifts)."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        pos = where.to(hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(pos)
        h = hidden[rows, pos].float()
        alpha = torch.as_tensor(alphas).to(h)
        alpha = alpha[:, None, None] if alpha.ndim else alpha
        shift = (-alpha * directions.to(h) * h.norm(dim=-1, keepdim=True)).to(hidden.dtype)
        return hidden + torch.zeros_like(hidden).index_put_((rows, pos), shift, accumulate=True)

    return edit


def step_edit(positions: torch.Tensor, directions: torch.Tensor, alphas: torch.Tensor):
    """edit_fn(h): row b's hidden state at positions[b] becomes h − α_b·u_b·‖h‖ (other positions untouched): the
    one-position-per-row case of `position_steps`."""
    return position_steps(positions[:, None], directions[:, None], alphas)


@torch.no_grad()
def edited_rows(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    conts: Sequence[str] | None,
    directions: torch.Tensor,
    alphas: torch.Tensor,
    layer: int,
    ids: Sequence[object] | None = None,
    positions: torch.Tensor | None = None,
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
    with edit_block_output(model, layer, step_edit(where, directions, alphas)):
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
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    conts: Sequence[str] | None,
    directions: torch.Tensor,
    alphas: torch.Tensor,
    layer: int,
    ids: Sequence[object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`edited_rows` at the last prompt position, sharing work: the step cannot change anything before the last
    prompt token (causal attention), so each distinct prompt's prefix runs once into a KV cache and every row runs
    only its last prompt token + continuation (about 3× fewer tokens for short prompts and many variants)."""
    device = model_device(model)
    names = list(ids) if ids is not None else list(range(len(prompts)))
    unique: dict[str, int] = {}
    row_item = torch.tensor([unique.setdefault(p, len(unique)) for p in prompts])
    first_row = {i: r for r, i in reversed(list(enumerate(row_item.tolist())))}
    pre = encode(tokenizer, list(unique), ids=[names[first_row[i]] for i in range(len(unique))]).to(device)
    if pre.input_ids.shape[1] < 2:  # single-token prompts: no prefix to share
        return edited_rows(model, tokenizer, prompts, conts, directions, alphas, layer, ids, pre.last_prompt[row_item])
    cache = model(
        input_ids=pre.input_ids[:, :-1],
        attention_mask=pre.attention_mask[:, :-1],
        position_ids=pre.position_ids[:, :-1],
        use_cache=True,
    ).past_key_values
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
    with edit_block_output(model, layer, step_edit(zero, directions, alphas)):
        logits = model(
            input_ids=suffix, attention_mask=full_mask, position_ids=positions, past_key_values=cache, use_cache=True
        ).logits.float()
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
    logp, _ = edited_rows(
        model,
        tokenizer,
        [prompt, prompt],
        None,
        unit,
        torch.tensor([0.0, alpha]),
        layer,
        positions=torch.tensor([pos, pos]),
    )
    return VirtualStep(dlogp=logp[1] - logp[0], logp_old=logp[0], logp_new=logp[1], alpha=alpha, layer=layer)


def _variants(alphas: list[float], controls: Sequence[str], n_random: int) -> list[tuple[str, int, float]]:
    """(control, repeat, α) per edited row of one item; the unedited base row comes first."""
    out = [("base", 0, 0.0)]
    for control in controls:
        for rep in range(n_random if control == "random" else 1):
            out += [(control, rep, a) for a in alphas]
    return out


def top_shift(dlogp: torch.Tensor, eligible: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
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
    controls: Sequence[str] = STEP_KINDS,
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
    id, control (gradient = −g, opposite = +g, random = same-norm random direction), repeat, alpha, logp_target_old
    (teacher-forced log p of the whole target before the step), dlogp_target (its change), logp_source_old,
    dlogp_source (−g rows only; NaN for controls and without sources), kl (KL(new‖old) of the next token), top1 (argmax token after the step),
    up_ids/down_ids (top-k tokens by Δlog p among tokens with p ≥ min_prob before or after), up_dlogp/down_dlogp.
    A pushed-up token must have p ≥ min_prob after the step, a pushed-down one before it (Δ > 0 ⇒ p grows).
    `batch_size` counts forward rows; an item takes 1 + |α|·(controls + n_random − 1) target rows + 1 + |α| source rows.
    """
    layer = check_layer(model, layer)
    grid = check_alphas(alphas)
    if len(targets) != len(prompts) or (sources is not None and len(sources) != len(prompts)):
        raise GradsenseError(f"{len(prompts)} prompts but {len(targets)} targets / sources of another length")
    unknown = [c for c in controls if c not in STEP_KINDS]
    if unknown or not controls:
        raise GradsenseError(f"controls {list(controls)!r} invalid: choose from {STEP_KINDS}")
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
        next_lp, seq = edited_rows(
            model, tokenizer, row_prompts, row_conts, torch.stack(row_dirs), torch.tensor(row_alpha), layer, row_ids
        )
        for j, i in enumerate(items):
            base = j * per_item
            src = base + len(variants)  # the source rows follow the target rows, in src_of order
            old = next_lp[base]
            p_old_ok = old.exp() >= min_prob
            for v, (control, rep, a) in enumerate(variants[1:], start=1):
                new = next_lp[base + v]
                dlogp = new - old
                up, down = top_shift(dlogp, p_old_ok | (new.exp() >= min_prob), top_k)
                has_source = sources is not None and v in src_of
                records.append(
                    {
                        "item": i,
                        "id": names[i],
                        "control": control,
                        "repeat": rep,
                        "alpha": a,
                        "logp_target_old": float(seq[base]),
                        "dlogp_target": float(seq[base + v] - seq[base]),
                        "dlogp_source": float(seq[src + src_of[v]] - seq[src]) if has_source else float("nan"),
                        "logp_source_old": float(seq[src]) if has_source else float("nan"),
                        "kl": float((new.exp() * dlogp).sum().clamp(min=0)),
                        "top1": int(new.argmax()),
                        "up_ids": up,
                        "down_ids": down,
                        "up_dlogp": [round(float(dlogp[t]), 4) for t in up],
                        "down_dlogp": [round(float(dlogp[t]), 4) for t in down],
                    }
                )
    return pd.DataFrame.from_records(records)


def sweep_items(items: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """The items of the α sweep: validation-split rows only (α is a selected setting; the test split is scored once),
    stratified by direction × domain with even seeded draws (`n` None = every validation row)."""
    val = items[items["split"] == "val"]
    if val.empty:
        raise GradsenseError("the α sweep needs validation items (split == 'val'), and there are none")
    return stratified(val, ["direction", "domain"], n, order="shuffle_groups", fill="even", seed=seed)


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
    return {
        "alpha": alpha,
        "median_gain": float(medians[alpha]),
        "rule_met": bool(len(reached)),
        "min_median_gain": float(min_median_gain),
        "medians": {float(k): float(v) for k, v in medians.items()},
    }
