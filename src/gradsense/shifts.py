"""The labelling pass of the oracle: at the chosen α, what each item's virtual step moved (the teacher's input).

`item_shifts` runs the step for every item and records, per item, the teacher-forced log-probability of the whole
target and the whole source before and after the step, the model's own current answer (`greedy_answers`), and the
tokens the step promotes and demotes most (`observed_tokens`, among tokens the model gives some probability).
With per-position gradients it also records `dlogp_target_each` (`whole_target_gains`): the same step taken at
every position that predicts a target token, each along its own gradient, which is the step of the whole target's
gradient (a year's last prompt position predicts only a bare space; its digits are predicted after it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradsense.errors import GradsenseError
from gradsense.gradients import each_position
from gradsense.hooks import edit_block_output
from gradsense.models import check_layer, model_device
from gradsense.oracle import (
    STEP_KINDS,
    check_alphas,
    position_steps,
    step_edit,
    top_shift,
    unit_directions,
    virtual_steps,
)
from gradsense.scoring import batches, encode, first_visible_token, forward, target_nll, target_text

ANSWER_END = ".,;:!?\n"  # a greedy continuation's answer ends before the first of these
ARTICLES = ("the", "a", "an")  # dropped from the start of a greedy answer ("the pancreas" → "pancreas")


def _visible(tokenizer, ids: Sequence[int]) -> str:
    """The decoded text of token ids, stripped."""
    return tokenizer.decode(list(ids)).strip()


def observed_tokens(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    grads,
    layer: int,
    alpha: float,
    up_ids: Sequence[int | None],
    down_ids: Sequence[int | None],
    min_prob: float = 0.02,
    batch_size: int = 64,
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
        with torch.no_grad(), edit_block_output(model, layer, step_edit(batch.last_prompt, dirs, alphas)):
            logits = forward(model, batch, logits_to_keep=1).logits[:, -1].float()
        lp = torch.log_softmax(logits, -1).cpu()
        for j, (i, which, tok) in enumerate(part):
            old, new = lp[2 * j], lp[2 * j + 1]
            up, down = top_shift(new - old, (old.exp() >= min_prob) | (new.exp() >= min_prob), 1)
            pick = up if which == "up" else down
            text = _visible(tokenizer, [tok] + pick[:1])
            (to_text if which == "up" else from_text)[i] = text
    return to_text, from_text


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_words: Sequence[int] | int = 4,
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[str]:
    """The model's own current answer to each prompt: its greedy continuation (≤ `max_new_tokens` tokens) up to the
    first punctuation mark or line break, without a leading article, at most `max_words` words (per prompt or one
    for all)."""
    words = [int(max_words)] * len(prompts) if isinstance(max_words, int) else [int(w) for w in max_words]
    if len(words) != len(prompts):
        raise GradsenseError(f"{len(prompts)} prompts but {len(words)} word limits")
    device, out = model_device(model), []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for part in batches(len(prompts), batch_size):
        batch = encode(tokenizer, list(prompts[part])).to(device)
        generated = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        for row in generated[:, batch.input_ids.shape[1] :].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            cut = next((i for i, c in enumerate(text) if c in ANSWER_END), len(text))
            out.append(text[:cut])
    answers = []
    for text, w in zip(out, words):
        tokens = text.split()
        while tokens and tokens[0].casefold() in ARTICLES:
            tokens = tokens[1:]
        answers.append(" ".join(tokens[:w]))
    return answers


@torch.no_grad()
def whole_target_gains(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    grads_each,
    layer: int,
    alpha: float,
    batch_size: int = 32,
) -> np.ndarray:
    """(N,) Δ teacher-forced log p(whole target) when the output h_j of block `layer` at every target-predicting
    position j becomes h_j − α·(g_j/‖g_j‖)·‖h_j‖, with g_j the gradient at that position (`grads_each`: (N, S, d)
    from `activation_gradients(position="each")`, S ≥ every target's token count). `targets` are continuations."""
    layer = check_layer(model, layer)
    (alpha,) = check_alphas([alpha])
    grads_each = torch.as_tensor(np.asarray(grads_each), dtype=torch.float32)
    if grads_each.ndim != 3 or len(grads_each) != len(prompts) or len(targets) != len(prompts):
        raise GradsenseError(
            f"need (N, S, d) per-position gradients for {len(prompts)} items, got {tuple(grads_each.shape)}"
        )
    units = grads_each / grads_each.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    device, gains = model_device(model), []
    for part in batches(len(prompts), batch_size):
        batch = encode(tokenizer, list(prompts[part]), list(targets[part])).to(device)
        n_target = batch.target_positions.sum(1)
        slots = units.shape[1]
        if int(n_target.max()) > slots:
            raise GradsenseError(f"a target has {int(n_target.max())} tokens but only {slots} per-position gradients")
        used = (torch.arange(slots, device=device)[None, :] < n_target[:, None]).float()  # repeats add nothing
        edit = position_steps(each_position(batch, slots), units[part].to(device) * used[..., None], alpha)
        before = target_nll(forward(model, batch).logits.float(), batch.labels)
        with edit_block_output(model, layer, edit):
            after = target_nll(forward(model, batch).logits.float(), batch.labels)
        gains.append((before - after).cpu())
    return torch.cat(gains).numpy().astype(np.float64)


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
    grads_each=None,
) -> pd.DataFrame:
    """One row per item at the labelling α: the −g step's shift, its +g and random controls, and the observed tokens.

    Columns: id, logp_target_old / logp_target_new and logp_source_old / logp_source_new (teacher-forced log p of
    the whole answer before / after the step), dlogp_target, dlogp_source, kl, opposite_dlogp_target,
    random_dlogp_target, random_kl, belief (the model's greedy answer now, `greedy_answers`, at most as many words
    as the longer answer), up_tokens / down_tokens (visible text of the top-k), to_token / from_token (top promoted
    / demoted, whitespace tokens extended by one step), target_first / source_first (first visible token of the
    dataset answers); with `grads_each` ((N, S, d) per-position gradients) also dlogp_target_each
    (`whole_target_gains`), by which the teacher then judges clarity (`teacher.clarity_gain`).
    """
    (alpha,) = check_alphas([alpha])
    names = list(ids) if ids is not None else list(range(len(prompts)))
    table = virtual_steps(
        model,
        tokenizer,
        prompts,
        targets,
        sources,
        grads,
        layer,
        [alpha],
        STEP_KINDS,
        1,
        top_k,
        min_prob,
        batch_size,
        seed,
        names,
        progress,
    )
    by = {c: table[table["control"] == c].set_index("item").sort_index() for c in STEP_KINDS}
    grad = by["gradient"]
    to_tok, from_tok = observed_tokens(
        model,
        tokenizer,
        prompts,
        grads,
        layer,
        alpha,
        [u[0] if u else None for u in grad["up_ids"]],
        [d[0] if d else None for d in grad["down_ids"]],
        min_prob,
        batch_size,
        names,
    )
    words = [max(len(str(t).split()), len(str(s).split())) for t, s in zip(targets, sources)]
    belief = greedy_answers(model, tokenizer, prompts, words, batch_size=max(1, batch_size // 2))
    logp_old = grad["logp_target_old"].to_numpy()
    extra = {}
    if grads_each is not None:
        conts = [target_text(t) for t in targets]
        gains = whole_target_gains(model, tokenizer, prompts, conts, grads_each, layer, alpha, max(1, batch_size // 2))
        extra["dlogp_target_each"] = gains
    return pd.DataFrame(
        {
            "id": names,
            "alpha": alpha,
            "layer": check_layer(model, layer),
            "logp_target_old": logp_old,
            "logp_target_new": logp_old + grad["dlogp_target"].to_numpy(),
            "logp_source_old": grad["logp_source_old"].to_numpy(),
            "logp_source_new": (grad["logp_source_old"] + grad["dlogp_source"]).to_numpy(),
            "dlogp_target": grad["dlogp_target"].to_numpy(),
            "dlogp_source": grad["dlogp_source"].to_numpy(),
            "kl": grad["kl"].to_numpy(),
            "opposite_dlogp_target": by["opposite"]["dlogp_target"].to_numpy(),
            "random_dlogp_target": by["random"]["dlogp_target"].to_numpy(),
            "random_kl": by["random"]["kl"].to_numpy(),
            "up_tokens": [[_visible(tokenizer, [t]) for t in row] for row in grad["up_ids"]],
            "down_tokens": [[_visible(tokenizer, [t]) for t in row] for row in grad["down_ids"]],
            "belief": belief,
            "to_token": to_tok,
            "from_token": from_tok,
            "target_first": [first_visible_token(tokenizer, t) for t in targets],
            "source_first": [first_visible_token(tokenizer, s) for s in sources],
            **extra,
        }
    )
