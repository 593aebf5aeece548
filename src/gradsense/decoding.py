"""Greedy decoding under the injection: free text (HF `generate`) or *structured*, where the head's field names are
given and the model says each value (the format of every training label), so every description's head parses.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from gradsense.hooks import inject
from gradsense.prompt import encode_interpretations, stop_ids

if TYPE_CHECKING:
    from gradsense.describer import Describer

FIELD_LEADS = ("domain:", " | from:", " | to:")  # the head's field names, given during structured decoding
FIELD_TOKENS = 8  # at most this many tokens per head value


@lru_cache(maxsize=8)
def token_classes(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(field stops, blank tokens), from one pass over the vocabulary (cached per tokenizer).

    Field stops end a head value: the end-of-turn ids and every token whose text holds '|' or a line break. Blank
    tokens are whitespace-only and not a stop; a value's first token is neither.
    """
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    ends = [i for i, text in enumerate(texts) if any(c in text for c in "|\n\r")]
    end_set = set(ends)
    blank = [i for i, text in enumerate(texts) if not text.strip() and i not in end_set]
    return tuple(dict.fromkeys(stop_ids(tokenizer) + ends)), tuple(blank)


def field_stops(tokenizer) -> list[int]:
    """Token ids that end a head field: any token whose text holds '|' or a line break, and the end-of-turn ids."""
    return list(token_classes(tokenizer)[0])


@torch.no_grad()
def generate_ids(
    describer: Describer,
    vectors: torch.Tensor | None,
    contexts: Sequence[str | None],
    max_new_tokens: int = 24,
    prefixes: Sequence[Sequence[int]] | None = None,
    stops: Sequence[int] | None = None,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Greedy new token ids for one batch under the injection (vectors (B, k, d) or None), after each row's
    `prefixes` (already-said tokens), cut before the first of `stops` (default: end of turn); HF `generate`."""
    d, tok = describer, describer.tokenizer
    batch, positions = encode_interpretations(tok, d.config, contexts, prefixes=prefixes)
    batch = batch.to(d.device)
    stops = list(stops) if stops is not None else stop_ids(tok)
    with d.precision(), inject(d.model, d.config.inject_layer, positions, vectors, d.norm_match):
        out = d.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=stops,
        )
    rows = out[:, batch.input_ids.shape[1] :].tolist()
    stop_set = set(stops)
    return [row[: next((i for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]


def structured_steps(tokenizer, sentence_tokens: int) -> int:
    """The most tokens structured decoding says: every field name, FIELD_TOKENS + 1 per value, a line break, the
    sentence."""
    leads = sum(len(tokenizer(lead, add_special_tokens=False)["input_ids"]) for lead in FIELD_LEADS)
    newline = len(tokenizer("\n", add_special_tokens=False)["input_ids"])
    return leads + len(FIELD_LEADS) * (FIELD_TOKENS + 1) + newline + sentence_tokens


@torch.no_grad()
def structured_ids(
    describer: Describer, vectors: torch.Tensor | None, contexts: Sequence[str | None], sentence_tokens: int
) -> list[list[int]]:
    """Token ids said after the prompt under structured decoding: one prefill, then one token per row and step
    (a field name's token when one is pending, else the greedy token), with the KV cache."""
    d, tok = describer, describer.tokenizer
    leads = [list(tok(lead, add_special_tokens=False)["input_ids"]) for lead in FIELD_LEADS]
    newline = list(tok("\n", add_special_tokens=False)["input_ids"])
    stops, blank = token_classes(tok)
    field_end = set(stops)
    banned = torch.tensor(sorted(field_end | set(blank)), device=d.device)  # a value's first token
    batch, positions = encode_interpretations(tok, d.config, contexts)
    batch = batch.to(d.device)
    n = len(contexts)
    said: list[list[int]] = [[] for _ in range(n)]
    pending = [list(leads[0]) for _ in range(n)]
    phase, length = [0] * n, [0] * n  # phase 0–2: head fields, 3: sentence, 4: done
    mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with inject(d.model, d.config.inject_layer, positions, vectors, d.norm_match):
        out = d.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        for _ in range(structured_steps(tok, sentence_tokens)):
            logits = out.logits[:, -1].float()
            step = []
            for r in range(n):
                if phase[r] < 3 and not pending[r]:
                    if length[r] == 0:  # a value has at least one token
                        logits[r, banned] = -torch.inf
                    choice = int(logits[r].argmax())
                    if choice in field_end or length[r] >= FIELD_TOKENS:  # the value ends: next field name
                        phase[r] += 1
                        length[r] = 0
                        pending[r] = list(leads[phase[r]]) if phase[r] < 3 else list(newline)
                        if phase[r] == 3 and sentence_tokens == 0:
                            phase[r], pending[r] = 4, []
                    else:
                        length[r] += 1
                        pending[r] = [choice]
                elif phase[r] == 3 and not pending[r]:
                    choice = int(logits[r].argmax())
                    if choice in field_end or length[r] >= sentence_tokens:  # the sentence is one line
                        phase[r] = 4
                    else:
                        length[r] += 1
                        pending[r] = [choice]
                token = pending[r].pop(0) if pending[r] and phase[r] < 4 else pad
                if phase[r] < 4:
                    said[r].append(token)
                step.append(token)
            if all(p == 4 for p in phase):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = d.model(
                input_ids=torch.tensor(step, device=d.device)[:, None],
                attention_mask=mask,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return said


def generate(
    describer: Describer,
    vectors: torch.Tensor | None,
    contexts: Sequence[str | None],
    max_new_tokens: int = 24,
    structured: bool = True,
) -> list[str]:
    """Greedy descriptions for one batch under the injection (vectors (B, k, d) or None).

    structured (default): the head's field names are given ("domain:", " | from:", " | to:", the format of every
    training label) and the model says each value (greedy, ≤ FIELD_TOKENS tokens, ended by '|' or a line break),
    then up to `max_new_tokens` tokens of free sentence on one new line; the head always parses and its values are
    the model's own (a value's first token is neither blank nor a field end). Unstructured: `max_new_tokens` tokens
    of free text.
    """
    if not structured:
        ids = generate_ids(describer, vectors, contexts, max_new_tokens)
    else:
        with describer.precision():
            ids = structured_ids(describer, vectors, contexts, max_new_tokens)
    return [describer.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
