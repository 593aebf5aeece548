"""Tokenise (prompt, target) pairs for teacher forcing and score targets under the model, batched."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradsense.errors import GradsenseError
from gradsense.models import model_device


@dataclass
class Batch:
    """A padded batch of prompt + target token sequences (targets may be empty for prompt-only batches)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T), counted from each row's first real token
    last_prompt: torch.Tensor  # (B,) index of the last prompt token
    labels: torch.Tensor  # (B, T) the next token at positions that predict a target token, else -100

    def to(self, device: torch.device) -> Batch:
        """The same batch on another device."""
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def target_positions(self) -> torch.Tensor:
        """(B, T) bool: positions whose next token is a target token."""
        return self.labels != -100


def tokenize_prompt(tokenizer, prompt: str, item: object = None) -> list[int]:
    """Prompt token ids (with the tokenizer's usual special tokens); an empty prompt is an error."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise GradsenseError(f"item {item}: empty prompt")
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def tokenize_target(tokenizer, target: str, item: object = None) -> list[int]:
    """Target token ids (no special tokens); a target that tokenizes to nothing is an error."""
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"]) if isinstance(target, str) else []
    if not ids:
        raise GradsenseError(f"item {item}: target {target!r} tokenizes to nothing")
    return ids


def encode(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str] | None = None,
    padding_side: str = "left",
    ids: Sequence[object] | None = None,
) -> Batch:
    """Pad prompt (+ target) token ids into one batch; `ids` name items in error messages."""
    if targets is not None and len(targets) != len(prompts):
        raise GradsenseError(f"{len(prompts)} prompts but {len(targets)} targets")
    if padding_side not in ("left", "right"):
        raise GradsenseError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    names = list(ids) if ids is not None else list(range(len(prompts)))
    rows, prompt_lens = [], []
    for i, prompt in enumerate(prompts):
        p = tokenize_prompt(tokenizer, prompt, names[i])
        t = tokenize_target(tokenizer, targets[i], names[i]) if targets is not None else []
        rows.append(p + t)
        prompt_lens.append(len(p))
    return pad_batch(tokenizer, rows, prompt_lens, padding_side)[0]


def pad_batch(
    tokenizer, rows: Sequence[list[int]], prompt_lens: Sequence[int], padding_side: str = "left"
) -> tuple[Batch, torch.Tensor]:
    """Pad token rows (prompt then target ids) into a Batch; also returns each row's start column (B,)."""
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    last_prompt = torch.zeros(len(rows), dtype=torch.long)
    starts = torch.zeros(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        start = width - len(row) if padding_side == "left" else 0
        starts[i] = start
        input_ids[i, start : start + len(row)] = torch.tensor(row)
        mask[i, start : start + len(row)] = 1
        last_prompt[i] = start + prompt_lens[i] - 1
        # position j predicts token j+1: the target tokens are predicted from last_prompt .. last_prompt+len(t)-1
        n_target = len(row) - prompt_lens[i]
        if n_target:
            labels[i, last_prompt[i] : last_prompt[i] + n_target] = torch.tensor(row[prompt_lens[i] :])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, mask, position_ids, last_prompt, labels), starts


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of range(n) of at most `batch_size`."""
    if batch_size < 1:
        raise GradsenseError(f"batch_size must be ≥ 1, not {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def forward(model: nn.Module, batch: Batch, **kwargs):
    """Run the model on a batch with its mask and position ids."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **kwargs,
    )


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed negative log-likelihood of the labelled (target) tokens of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * (labels != -100)).sum(-1)


@torch.no_grad()
def score_targets(
    model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Per item: `logp` = summed log p(target tokens | prompt) (teacher forcing) and `greedy` = every target token is
    the argmax at its position (greedy decoding would produce the target), `n_tokens` = target length."""
    logp, greedy, n_tokens = np.zeros(len(prompts)), np.zeros(len(prompts), bool), np.zeros(len(prompts), int)
    device = model_device(model)
    for part in batches(len(prompts), batch_size):
        batch = encode(tokenizer, prompts[part], targets[part]).to(device)
        logits = forward(model, batch).logits
        mask = batch.target_positions
        logp[part] = -target_nll(logits, batch.labels).double().cpu().numpy()
        hits = (logits.argmax(-1) == batch.labels) | ~mask
        greedy[part] = hits.all(-1).cpu().numpy()
        n_tokens[part] = mask.sum(-1).cpu().numpy()
    return {"logp": logp, "greedy": greedy, "n_tokens": n_tokens}


def target_logprobs(
    model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> np.ndarray:
    """Summed log p(target tokens | prompt) per item (teacher forcing), float64."""
    return score_targets(model, tokenizer, prompts, targets, batch_size)["logp"]


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """(N, vocab) log-softmax of the next token after each prompt, on the CPU."""
    rows = []
    device = model_device(model)
    for part in batches(len(prompts), batch_size):
        batch = encode(tokenizer, prompts[part]).to(device)
        logits = forward(model, batch).logits
        last = logits[torch.arange(len(logits), device=device), batch.last_prompt]
        rows.append(torch.log_softmax(last.float(), dim=-1).cpu())
    return torch.cat(rows)


def target_text(answer: str) -> str:
    """The continuation string for an answer: a leading space unless it already starts with whitespace."""
    return answer if answer[:1].isspace() else " " + answer


def first_visible_id(tokenizer, answer: str) -> int:
    """Id of the first token of `target_text(answer)` whose text is not whitespace (" 1066" → "1", not the bare
    space token); an answer with no such token is a GradsenseError."""
    for token in tokenizer(target_text(answer), add_special_tokens=False)["input_ids"]:
        if tokenizer.decode([token]).strip():
            return int(token)
    raise GradsenseError(f"answer {answer!r} has no token that is not whitespace")


def first_visible_token(tokenizer, answer: str) -> str:
    """The text of `first_visible_id` (stripped; years: the first digit), "" for an answer that is all whitespace."""
    try:
        return tokenizer.decode([first_visible_id(tokenizer, answer)]).strip()
    except GradsenseError:
        return ""
