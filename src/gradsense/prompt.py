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
from gradsense.teacher import NO_DOMAIN, label_head, parse_label

if TYPE_CHECKING:
    from gradsense.describer import DescriberConfig

FIELD_LEADS = ("domain:", " | from:", " | to:")  # the head's field names: given, never predicted, when decoding
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


def field_stop(tokenizer, token_id: int) -> bool:
    """Whether a token ends a head value: its text holds '|' or a line break, or it ends the turn."""
    return token_id in stop_ids(tokenizer) or any(c in tokenizer.decode([token_id]) for c in "|\n\r")


def lead_split(tokenizer, lead: str) -> tuple[list[int], int]:
    """A field name's token ids and the index of its first field-stop token (the token that ends the value before
    it; -1 when none)."""
    ids = list(tokenizer(lead, add_special_tokens=False)["input_ids"])
    return ids, next((i for i, t in enumerate(ids) if field_stop(tokenizer, t)), -1)


def head_ids(tokenizer, label: str) -> tuple[list[int], list[bool]]:
    """Token ids of a label's head, tokenized piece by piece exactly as structured decoding says it (field name,
    then " " + value, per field; then the end of turn), and which of them are trained: every value token and the
    tokens that end each value (the next field name up to its '|', the end of turn). The other field-name tokens
    are given at decoding time and carry no loss."""
    fields = parse_label(label)
    if fields["domain"] is None:
        raise GradsenseError(f"label {label!r} has no head 'domain: … | from: … | to: …'")
    values = [fields["domain"], fields["from"] or "", fields["to"] or ""]
    ids: list[int] = []
    trained: list[bool] = []
    for j, (lead, value) in enumerate(zip(FIELD_LEADS, values)):
        lead_ids, stop = lead_split(tokenizer, lead)
        ids += lead_ids
        trained += [j > 0 and i <= stop for i in range(len(lead_ids))]
        value_ids = list(tokenizer(" " + value.strip(), add_special_tokens=False)["input_ids"])
        ids += value_ids
        trained += [True] * len(value_ids)
    end = stop_ids(tokenizer)[:1]
    return ids + end, trained + [True] * len(end)


def value_lengths(tokenizer, label: str) -> list[int]:
    """Tokens of each head value of a label (as `head_ids` tokenizes them)."""
    fields = parse_label(label)
    values = [fields["domain"] or "", fields["from"] or "", fields["to"] or ""]
    return [len(tokenizer(" " + v.strip(), add_special_tokens=False)["input_ids"]) for v in values]


def encode_interpretations(
    tokenizer,
    config: DescriberConfig,
    contexts: Sequence[str | None],
    labels: Sequence[str] | None = None,
    max_label_tokens: int | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
) -> tuple[Batch, torch.Tensor]:
    """Left-padded batch of interpretation prompts (+ each label's head tokens, `head_ids`), and slot positions (B, k).

    Left padding puts every row's end in the last column, so the label positions are the last columns of the batch
    (the loss then needs logits only there). Only a head's trained tokens (values and the tokens that end them) are
    labels; the given field names are input with label -100. `prefixes`: token ids already said by the assistant
    (structured decoding), appended to each prompt as unlabelled tokens.
    """
    rows, prompt_lens, slot_offsets, masks = [], [], [], []
    for i, context in enumerate(contexts):
        ids, slots = interpretation_ids(tokenizer, config, context)
        if prefixes is not None:
            ids = ids + [int(t) for t in prefixes[i]]
        label_ids: list[int] = []
        trained: list[bool] = []
        if labels is not None:
            label_ids, trained = head_ids(tokenizer, labels[i])
            if max_label_tokens:
                label_ids, trained = label_ids[:max_label_tokens], trained[:max_label_tokens]
        rows.append(ids + label_ids)
        prompt_lens.append(len(ids))
        slot_offsets.append(slots)
        masks.append(trained)
    batch, starts = pad_batch(tokenizer, rows, prompt_lens, "left")
    if labels is not None:  # the given field-name tokens are input, not labels
        for i, trained in enumerate(masks):
            start = int(batch.last_prompt[i])
            given = torch.tensor([not t for t in trained], dtype=torch.bool)
            batch.labels[i, start : start + len(trained)][given] = -100
    return batch, torch.tensor(slot_offsets, dtype=torch.long).reshape(len(rows), config.k) + starts[:, None]
