"""The interpretation prompt: a fixed question with k placeholder slots that receive the projected gradient.

`interpretation_ids` renders one prompt (optionally after a context passage) and finds its slots;
`encode_interpretations` left-pads a batch of them, with label tokens for training and scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from gradsense.errors import GradsenseError
from gradsense.scoring import Batch, pad_batch
from gradsense.teacher import NO_DOMAIN, label_head

if TYPE_CHECKING:
    from gradsense.describer import DescriberConfig

SYSTEM = "You sense training pressure."
QUESTION = "You feel a training pressure:{slots}. Describe it."
NO_PRESSURE = label_head(NO_DOMAIN, "", "") + "\nNo training pressure is felt."  # the controls' fixed label
_SENTINEL = "\x00SLOTS\x00"


def interpretation_ids(tokenizer, config: DescriberConfig, context: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted interpretation prompt and the indices of its k placeholder tokens.

    The prompt is rendered with a sentinel where the slots go; prefix and suffix are tokenized separately around k
    copies of the placeholder token, so the slots are exactly k tokens whatever the context holds.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise GradsenseError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template")
    user = config.question.format(slots=_SENTINEL)
    if context is not None and str(context).strip():
        user = f"{str(context).strip()}\n\n{user}"
    messages = [{"role": "system", "content": config.system}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix, suffix = text.split(_SENTINEL)
    slot = placeholder_id(tokenizer, config.placeholder)
    head = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    tail = list(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    return head + [slot] * config.k + tail, list(range(len(head), len(head) + config.k))


def placeholder_id(tokenizer, placeholder: str) -> int:
    """The token id used for each slot: the last token of the placeholder string (" ?" is one token in SmolLM2)."""
    ids = tokenizer(placeholder, add_special_tokens=False)["input_ids"]
    if not ids:
        raise GradsenseError(f"placeholder {placeholder!r} tokenizes to nothing")
    return int(ids[-1])


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a description: the end-of-turn token of the chat template and eos."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.insert(0, im_end)
    return ids


def encode_interpretations(
    tokenizer,
    config: DescriberConfig,
    contexts: Sequence[str | None],
    labels: Sequence[str] | None = None,
    max_label_tokens: int | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
) -> tuple[Batch, torch.Tensor]:
    """Left-padded batch of interpretation prompts (+ label tokens and an end-of-turn token), and slot positions (B, k).

    Left padding puts every row's end in the last column, so the label positions are the last columns of the batch
    (the loss then needs logits only there). `prefixes`: token ids already said by the assistant (structured
    decoding), appended to each prompt as unlabelled tokens.
    """
    end = stop_ids(tokenizer)[:1]
    rows, prompt_lens, slot_offsets = [], [], []
    for i, context in enumerate(contexts):
        ids, slots = interpretation_ids(tokenizer, config, context)
        if prefixes is not None:
            ids = ids + [int(t) for t in prefixes[i]]
        label_ids: list[int] = []
        if labels is not None:
            label_ids = list(tokenizer(labels[i], add_special_tokens=False)["input_ids"])
            if not label_ids:
                raise GradsenseError(f"label {i} ({labels[i]!r}) tokenizes to nothing")
            label_ids = (label_ids + end)[:max_label_tokens] if max_label_tokens else label_ids + end
        rows.append(ids + label_ids)
        prompt_lens.append(len(ids))
        slot_offsets.append(slots)
    batch, starts = pad_batch(tokenizer, rows, prompt_lens, "left")
    return batch, torch.tensor(slot_offsets, dtype=torch.long).reshape(len(rows), config.k) + starts[:, None]
