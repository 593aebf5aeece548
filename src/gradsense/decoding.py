"""Greedy decoding under the injection: free text (HF `generate`) or *structured*, where the head's field names are
given and the model says each value (the format of every training label), so every description's head parses.

Decoding runs in float32 whatever `precision` the describer trained with: a cached step is one token per row, so
bfloat16 autocast spends its time casting every weight again at each step (benchmarks/bench_describe.py: float32 is
faster at every batch size, and its descriptions do not depend on the batch size; under bfloat16 some do).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from gradsense.hooks import inject
from gradsense.prompt import FIELD_LEADS, encode_interpretations, lead_split, stop_ids

if TYPE_CHECKING:
    from gradsense.describer import Describer

FIELD_TOKENS = 8  # at most this many tokens per head value when the describer records no longer trained value


@lru_cache(maxsize=8)
def token_classes(tokenizer) -> tuple[int, ...]:
    """Field stops, from one pass over the vocabulary (cached per tokenizer): the end-of-turn ids and every token
    whose text holds '|' or a line break (`prompt.field_stop`)."""
    ends = [i for i in range(len(tokenizer)) if any(c in tokenizer.decode([i]) for c in "|\n\r")]
    return tuple(dict.fromkeys(stop_ids(tokenizer) + ends))


def field_stops(tokenizer) -> list[int]:
    """Token ids that end a head field: any token whose text holds '|' or a line break, and the end-of-turn ids."""
    return list(token_classes(tokenizer))


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
    with inject(d.model, d.config.inject_layer, positions, vectors, d.norm_match):
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


def value_limit(describer: Describer) -> int:
    """The most tokens a head value may take: the longest value the describer was trained on (+ the tokens of a
    field name before its '|'), else FIELD_TOKENS."""
    return int(describer.config.max_value_tokens or FIELD_TOKENS)


def structured_steps(tokenizer, sentence_tokens: int, limit: int = FIELD_TOKENS) -> int:
    """The most tokens structured decoding says: every field name, `limit` + 1 per value, an end, the sentence."""
    leads = sum(len(tokenizer(lead, add_special_tokens=False)["input_ids"]) for lead in FIELD_LEADS)
    newline = len(tokenizer("\n", add_special_tokens=False)["input_ids"])
    return leads + len(FIELD_LEADS) * (limit + 1) + newline + 1 + sentence_tokens


@torch.no_grad()
def structured_ids(
    describer: Describer, vectors: torch.Tensor | None, contexts: Sequence[str | None], sentence_tokens: int
) -> list[list[int]]:
    """Token ids said after the prompt under structured decoding: one prefill, then one token per row and step
    (a field name's token when one is pending, else the greedy token), with the KV cache.

    The head is said exactly as `prompt.head_ids` tokenizes a trained label: each field name is given; a value is
    the model's greedy tokens until it says a field stop (a token with '|' or a line break, or the end of turn),
    never stopping while the value is still blank and never past `value_limit`. When the stop is the next field
    name's own stop token, it is kept and the rest of that name follows; any other stop is replaced by the name.
    """
    d, tok = describer, describer.tokenizer
    limit = value_limit(d)
    leads = [lead_split(tok, lead) for lead in FIELD_LEADS[1:]]  # names that end the domain and from values
    newline = list(tok("\n", add_special_tokens=False)["input_ids"])
    end_of_turn = stop_ids(tok)[:1]
    field_end = set(token_classes(tok))
    banned = torch.tensor(sorted(field_end), device=d.device)  # while a value is blank
    batch, positions = encode_interpretations(tok, d.config, contexts)
    batch = batch.to(d.device)
    n = len(contexts)
    said: list[list[int]] = [[] for _ in range(n)]
    value: list[list[int]] = [[] for _ in range(n)]
    first = list(tok(FIELD_LEADS[0], add_special_tokens=False)["input_ids"])
    pending = [list(first) for _ in range(n)]
    phase = [0] * n  # phase 0–2: head values, 3: sentence, 4: done
    mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def after_value(r: int, choice: int) -> list[int]:
        """What follows row r's finished value: the rest of the next field name when the model said that name up to
        its stop token itself (those tokens stay, as in training), else the whole name; or the sentence's line
        break; or nothing."""
        p = phase[r]
        if p < 2:
            ids, stop = leads[p]
            own = stop >= 0 and ids[stop] == choice and (stop == 0 or value[r][-stop:] == ids[:stop])
            return [choice] + ids[stop + 1 :] if own else list(ids)
        if sentence_tokens > 0:
            return [choice] if choice in newline else list(newline)
        return []

    with inject(d.model, d.config.inject_layer, positions, vectors, d.norm_match):
        out = d.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        for _ in range(structured_steps(tok, sentence_tokens, limit)):
            logits = out.logits[:, -1].float()
            step = []
            for r in range(n):
                if phase[r] < 3 and not pending[r]:
                    if not tok.decode(value[r]).strip():  # a value has a visible token before it ends
                        logits[r, banned] = -torch.inf
                    choice = int(logits[r].argmax())
                    if choice in field_end or len(value[r]) >= limit:  # the value ends
                        pending[r] = after_value(r, choice)
                        phase[r] += 1
                        value[r] = []
                        if phase[r] == 3 and sentence_tokens == 0:
                            phase[r] = 4
                    else:
                        value[r].append(choice)
                        pending[r] = [choice]
                elif phase[r] == 3 and not pending[r]:
                    choice = int(logits[r].argmax())
                    if choice in field_end or len(value[r]) >= sentence_tokens:  # the sentence is one line
                        phase[r] = 4
                    else:
                        value[r].append(choice)
                        pending[r] = [choice]
                if pending[r]:
                    token = pending[r].pop(0)
                    said[r].append(token)
                else:
                    token = end_of_turn[0] if end_of_turn else pad
                step.append(token)
            if all(p == 4 and not pending[r] for r, p in enumerate(phase)):
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
    training label) and the model says each value (`structured_ids`: greedy, ended by '|', a line break or the end of
    turn, at most as long as the longest trained value), then up to `max_new_tokens` tokens of free sentence on one
    new line; the head always parses and its values are the model's own. Unstructured: `max_new_tokens` tokens of
    free text.
    """
    if not structured:
        ids = generate_ids(describer, vectors, contexts, max_new_tokens)
    else:
        ids = structured_ids(describer, vectors, contexts, max_new_tokens)
    return [describer.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
