"""The describer: project an activation gradient into k placeholder slots of an interpretation prompt, inject it into
the residual stream at layer J, and let the (frozen, optionally LoRA-tuned) model say what pressure it feels.

Pieces, in reading order: the interpretation prompt (`interpretation_ids`, `encode_interpretations`), the injection
(`injecting`: norm-matched or raw × learned scale), the `Projector` (linear or MLP), the `Describer` (model +
projector + settings: loss, generation, label likelihoods), training (`train_projector`), checkpoints
(`save_checkpoint`, `load_describer`) and `describe` (used by the CLI and the exploration notebook).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.hooks import capture, inject
from gradsense.models import REPO_ROOT, architecture, check_layer, model_device
from gradsense.scoring import Batch, batches, pad_batch, target_text
from gradsense.teacher import label_head, parse_label

SYSTEM = "You sense training pressure."
QUESTION = "You feel a training pressure:{slots}. Describe it."
NO_PRESSURE = label_head("none", "", "") + "\nNo training pressure is felt."  # the controls' fixed label
CONTROLS = ("gradient", "none", "noise", "shuffle")
FIELD_LEADS = ("domain:", " | from:", " | to:")  # the head's field names, given during structured decoding
FIELD_TOKENS = 8  # at most this many tokens per head value
DEFAULT_CHECKPOINT = REPO_ROOT / "results" / "train" / "checkpoint"
_SENTINEL = "\x00SLOTS\x00"


# --------------------------------------------------------------------------------------------- settings


@dataclass
class DescriberConfig:
    """Everything that fixes how a gradient becomes a description (stored in the checkpoint's metadata)."""

    source_layer: int  # block whose output the gradient is taken at
    inject_layer: int  # block whose output receives the projected vectors
    k: int = 4  # number of placeholder slots
    mode: str = "norm"  # "norm": norm-matched to the residual; "raw": raw gradient × learned scale
    kind: str = "linear"  # "linear" (d → k·d) or "mlp"
    mlp_hidden: int = 1024
    lora_rank: int = 0  # 0 = model frozen; > 0 = LoRA on q_proj, v_proj through peft
    lora_alpha: int = 16
    precision: str = "fp32"  # "bf16": the describer's forward passes under bfloat16 autocast (≈ 2× faster on AMX CPUs)
    placeholder: str = " ?"
    system: str = SYSTEM
    question: str = QUESTION
    no_pressure: str = NO_PRESSURE

    def check(self, model: nn.Module) -> None:
        """Validate the settings against a model (one-line GradsenseError)."""
        check_layer(model, self.source_layer)
        check_layer(model, self.inject_layer)
        if self.mode not in ("norm", "raw"):
            raise GradsenseError(f"train.mode must be 'norm' or 'raw', not {self.mode!r}")
        if self.kind not in ("linear", "mlp"):
            raise GradsenseError(f"train.kind must be 'linear' or 'mlp', not {self.kind!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise GradsenseError(f"train.k must be a positive integer, not {self.k!r}")
        if self.precision not in ("fp32", "bf16"):
            raise GradsenseError(f"train.precision must be 'fp32' or 'bf16', not {self.precision!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise GradsenseError(f"train.lora_rank must be an integer ≥ 0, not {self.lora_rank!r}")


@dataclass
class TrainConfig:
    """Optimisation settings of `train_projector`."""

    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    control_share: float = 0.2  # share of each batch that is noise or no injection, labelled "no pressure"
    context_share: float = 0.75  # share of rows that get a neutral context passage before the question
    max_label_tokens: int | None = 40  # cap on label tokens (cost grows with length); None = whole label
    eval_every: int = 25
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Validate (one-line GradsenseError)."""
        if self.steps < 1 or self.batch_size < 1:
            raise GradsenseError(f"train.steps and train.batch_size must be ≥ 1, not {self.steps}, {self.batch_size}")
        for name in ("control_share", "context_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise GradsenseError(f"train.{name} must be within [0, 1], not {getattr(self, name)}")


# --------------------------------------------------------------------------------------------- the prompt


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


# --------------------------------------------------------------------------------------------- the injection


@contextmanager
def injecting(
    model: nn.Module, layer: int, positions: torch.Tensor, vectors: torch.Tensor | None, mode: str
) -> Iterator[None]:
    """Add `vectors` (B, k, d) at `positions` (B, k) of block `layer`'s output; `None` injects nothing.

    mode "raw" adds the vectors as they are (through `hooks.inject`); mode "norm" rescales each vector to the norm of
    the residual it is added to (as Activation Oracles do), so only its direction carries information. A zero vector
    stays zero in both modes (rows without injection in a mixed batch).
    """
    if vectors is None:
        yield
        return
    with inject(model, layer, positions, vectors, norm_match=mode == "norm"):
        yield


# --------------------------------------------------------------------------------------------- the projector


class Projector(nn.Module):
    """Map a gradient g (B, d) to k vectors (B, k, d): `linear` (d → k·d) or `mlp` (d → hidden → k·d).

    mode "norm": the input is g/‖g‖ (the injection fixes the magnitude); mode "raw": the input is g divided by a
    fixed reference norm (the median training ‖g‖) and the output is multiplied by a learned scale, without a final
    bias, so the injected magnitude follows the gradient's.
    """

    def __init__(self, d_model: int, k: int, kind: str = "linear", mode: str = "norm", mlp_hidden: int = 1024):
        super().__init__()
        self.d_model, self.k, self.kind, self.mode = d_model, k, kind, mode
        bias = mode == "norm"
        if kind == "linear":
            self.net = nn.Linear(d_model, k * d_model, bias=bias)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(d_model, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, k * d_model, bias=bias)
            )
        else:
            raise GradsenseError(f"projector kind must be 'linear' or 'mlp', not {kind!r}")
        self.register_buffer("grad_norm_ref", torch.tensor(1.0))
        self.log_scale = nn.Parameter(torch.zeros(()), requires_grad=mode == "raw")

    def forward(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, d) gradients → (B, k, d) vectors to inject."""
        if grads.shape[-1] != self.d_model:
            raise GradsenseError(f"gradient width {grads.shape[-1]} != projector width {self.d_model}")
        if self.mode == "norm":
            out = self.net(grads / grads.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        else:
            out = self.net(grads / self.grad_norm_ref) * self.log_scale.exp()
        return out.view(len(grads), self.k, self.d_model)


# --------------------------------------------------------------------------------------------- LoRA (optional)


def add_lora(model: nn.Module, rank: int, alpha: int, first_layer: int = 0) -> list[nn.Parameter]:
    """Insert LoRA adapters (peft) on q_proj and v_proj of blocks `first_layer`… in place; returns their (trainable)
    parameters. The describer starts at its injection layer: earlier blocks cannot see the injection, and adapters
    there would only add backward passes."""
    from peft import LoraConfig, inject_adapter_in_model

    from gradsense.models import n_layers

    layers = list(range(first_layer, n_layers(model)))
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                   layers_to_transform=layers, layers_pattern="layers"),
        model,
    )
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a model (empty without adapters)."""
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if "lora_" in n}


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run the model without its LoRA adapters (gradients of new items must come from the original model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


# --------------------------------------------------------------------------------------------- the describer


def fingerprint(model: nn.Module) -> dict:
    """Architecture plus a hash of the first embedding rows: identifies the model a projector was trained for."""
    arch = architecture(model)
    emb = model.get_input_embeddings().weight[:64].detach().float().cpu().numpy()
    return {
        "model_type": arch["model_type"],
        "n_layers": arch["n_layers"],
        "d_model": arch["d_model"],
        "vocab_size": arch["vocab_size"],
        "n_parameters": int(sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)),
        "embedding_sha256": hashlib.sha256(emb.tobytes()).hexdigest()[:16],
    }


class Describer:
    """A model, its tokenizer and a trained projector: turns gradients (+ optional contexts) into descriptions."""

    def __init__(
        self, model: nn.Module, tokenizer, projector: Projector, config: DescriberConfig, meta: dict | None = None
    ):
        config.check(model)
        self.model, self.tokenizer, self.projector, self.config = model, tokenizer, projector, config
        self.meta = meta or {}
        self.projector.to(model_device(model))

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return model_device(self.model)

    def precision(self):
        """The autocast context of the describer's forward passes (bfloat16 when configured, else nothing)."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def vectors(
        self, grads: torch.Tensor, control: str = "gradient", rng: np.random.Generator | None = None
    ) -> torch.Tensor | None:
        """Vectors to inject for a control: the gradient ("gradient"), nothing ("none"), or Gaussian noise with each
        gradient's norm ("noise"); "shuffle" is handled by `describe_gradients` (whole-set derangement)."""
        grads = torch.as_tensor(grads, dtype=torch.float32, device=self.device)
        if control == "none":
            return None
        if control == "noise":
            noise = torch.as_tensor(
                noise_like(grads.cpu().numpy(), rng or np.random.default_rng(0)), device=self.device
            )
            return self.projector(noise)
        if control == "gradient":
            return self.projector(grads)
        raise GradsenseError(f"unknown control {control!r} (choose from gradient, none, noise)")

    def _label_logits(
        self,
        vectors: torch.Tensor | None,
        contexts: Sequence[str | None],
        labels: Sequence[str],
        max_label_tokens: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and label ids at the label positions only (the last `keep` positions), under the injection."""
        batch, positions = encode_interpretations(self.tokenizer, self.config, contexts, labels, max_label_tokens)
        batch = batch.to(self.device)
        keep = int((batch.labels != -100).sum(-1).max()) + 1
        with self.precision(), injecting(self.model, self.config.inject_layer, positions, vectors, self.config.mode):
            logits = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                logits_to_keep=keep,
            ).logits
        return logits.float(), batch.labels[:, -keep:]

    def loss(
        self,
        vectors: torch.Tensor | None,
        contexts: Sequence[str | None],
        labels: Sequence[str],
        max_label_tokens: int | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy of the label tokens given the injection (logits computed only at label positions)."""
        logits, labels_kept = self._label_logits(vectors, contexts, labels, max_label_tokens)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels_kept.flatten(), ignore_index=-100)

    @torch.no_grad()
    def label_logprobs(
        self,
        vectors: torch.Tensor | None,
        contexts: Sequence[str | None],
        labels: Sequence[str],
        max_label_tokens: int | None = None,
    ) -> np.ndarray:
        """Per row: mean log p(label token) under the injection (length-normalised, for forced choice)."""
        logits, labels_kept = self._label_logits(vectors, contexts, labels, max_label_tokens)
        logp = torch.log_softmax(logits, -1).gather(-1, labels_kept.clamp(min=0)[..., None])[..., 0]
        mask = labels_kept != -100
        return ((logp * mask).sum(-1) / mask.sum(-1)).cpu().numpy().astype(np.float64)

    @torch.no_grad()
    def generate_ids(
        self,
        vectors: torch.Tensor | None,
        contexts: Sequence[str | None],
        max_new_tokens: int = 24,
        prefixes: Sequence[Sequence[int]] | None = None,
        stops: Sequence[int] | None = None,
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        """Greedy new token ids for one batch under the injection (vectors (B, k, d) or None), after each row's
        `prefixes` (already-said tokens), cut before the first of `stops` (default: end of turn)."""
        batch, positions = encode_interpretations(self.tokenizer, self.config, contexts, prefixes=prefixes)
        batch = batch.to(self.device)
        stops = list(stops) if stops is not None else stop_ids(self.tokenizer)
        with self.precision(), injecting(self.model, self.config.inject_layer, positions, vectors, self.config.mode):
            out = self.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=stops,
            )
        rows = out[:, batch.input_ids.shape[1] :].tolist()
        stop_set = set(stops)
        return [row[: next((i for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]

    def field_stops(self) -> list[int]:
        """Token ids that end a head field: any token whose text holds '|' or a line break, and the end-of-turn ids."""
        return self._token_classes()[0]

    def _token_classes(self) -> tuple[list[int], list[int]]:
        """(field stops, blank tokens: whitespace-only and not a stop), from one pass over the vocabulary (cached)."""
        if not hasattr(self, "_classes"):
            tok = self.tokenizer
            texts = [tok.decode([i]) for i in range(len(tok))]
            ends = [i for i, text in enumerate(texts) if any(c in text for c in "|\n\r")]
            end_set = set(ends)
            blank = [i for i, text in enumerate(texts) if not text.strip() and i not in end_set]
            self._classes = (list(dict.fromkeys(stop_ids(tok) + ends)), blank)
        return self._classes

    def generate(
        self,
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
        tok = self.tokenizer
        if not structured:
            ids = self.generate_ids(vectors, contexts, max_new_tokens)
        else:
            with self.precision():
                ids = self._structured_ids(vectors, contexts, max_new_tokens)
        return [tok.decode(row, skip_special_tokens=True).strip() for row in ids]

    @torch.no_grad()
    def _structured_ids(
        self, vectors: torch.Tensor | None, contexts: Sequence[str | None], sentence_tokens: int
    ) -> list[list[int]]:
        """Token ids said after the prompt under structured decoding: one prefill, then one token per row and step
        (a field name's token when one is pending, else the greedy token), with the KV cache."""
        tok = self.tokenizer
        leads = [list(tok(lead, add_special_tokens=False)["input_ids"]) for lead in FIELD_LEADS]
        newline = list(tok("\n", add_special_tokens=False)["input_ids"])
        stops, blank = self._token_classes()
        field_end = set(stops)
        banned = torch.tensor(sorted(field_end | set(blank)), device=self.device)  # a value's first token
        batch, positions = encode_interpretations(tok, self.config, contexts)
        batch = batch.to(self.device)
        n = len(contexts)
        said: list[list[int]] = [[] for _ in range(n)]
        pending = [list(leads[0]) for _ in range(n)]
        phase, length = [0] * n, [0] * n  # phase 0–2: head fields, 3: sentence, 4: done
        mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        with injecting(self.model, self.config.inject_layer, positions, vectors, self.config.mode):
            out = self.model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                             use_cache=True, logits_to_keep=1)
            for _ in range(sum(map(len, leads)) + len(leads) * (FIELD_TOKENS + 1) + len(newline) + sentence_tokens):
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
                out = self.model(input_ids=torch.tensor(step, device=self.device)[:, None], attention_mask=mask,
                                 position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
        return said

    def describe_gradients(
        self,
        grads: np.ndarray | torch.Tensor,
        contexts: Sequence[str | None] | None = None,
        control: str = "gradient",
        seed: int = 0,
        batch_size: int = 16,
        max_new_tokens: int = 24,
        progress: bool = False,
        structured: bool = True,
    ) -> pd.DataFrame:
        """One row per gradient: description and its parsed domain/from/to (controls as in `vectors`; for "shuffle"
        the column `source_row` names whose gradient was injected; decoding as in `generate`)."""
        grads = torch.as_tensor(np.asarray(grads), dtype=torch.float32)
        n = len(grads)
        contexts = list(contexts) if contexts is not None else [None] * n
        if len(contexts) != n:
            raise GradsenseError(f"{n} gradients but {len(contexts)} contexts")
        rng = np.random.default_rng(seed)
        source = shuffle_order(n, np.random.default_rng(seed)) if control == "shuffle" else np.arange(n)
        if control == "shuffle":
            grads = grads[torch.as_tensor(source)]
            control = "gradient"
        texts: list[str] = []
        for part in tqdm(list(batches(n, batch_size)), desc=f"describe ({control})", disable=not progress):
            with torch.no_grad():
                vectors = self.vectors(grads[part], control, rng)
            texts += self.generate(vectors, contexts[part], max_new_tokens, structured)
        parsed = [parse_label(t) for t in texts]
        return pd.DataFrame(
            {
                "description": texts,
                "domain": [p["domain"] for p in parsed],
                "from": [p["from"] for p in parsed],
                "to": [p["to"] for p in parsed],
                "source_row": source,
            }
        )


def noise_like(grads: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian vectors with each row's norm (the norm-matched noise control)."""
    noise = rng.standard_normal(grads.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
    return noise * np.linalg.norm(grads, axis=-1, keepdims=True)


def shuffle_order(n: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded derangement of range(n) (no row keeps its own gradient) for n ≥ 2."""
    if n < 2:
        return np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


# --------------------------------------------------------------------------------------------- training


def _calibrate_raw_scale(describer: Describer, grads: torch.Tensor, contexts: Sequence[str | None]) -> None:
    """Raw mode: set the reference ‖g‖ to the median training norm and the initial scale so that the injected
    vectors start at the median residual norm at the slots (after that the scale is learned)."""
    proj, cfg = describer.projector, describer.config
    proj.grad_norm_ref.fill_(float(grads.norm(dim=-1).median()))
    batch, positions = encode_interpretations(describer.tokenizer, cfg, contexts)
    store: dict[int, torch.Tensor] = {}
    with torch.no_grad(), capture(describer.model, [cfg.inject_layer], store):
        b = batch.to(describer.device)
        describer.model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            position_ids=b.position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
        hidden = store[cfg.inject_layer]
        pos = positions.to(hidden.device)
        rows = torch.arange(len(hidden), device=hidden.device)[:, None].expand_as(pos)
        resid = hidden[rows, pos].norm(dim=-1).median()
        proj.log_scale.zero_()
        out = proj(grads.to(describer.device)).norm(dim=-1).median()
        proj.log_scale.fill_(float(torch.log(resid / out.clamp_min(1e-12))))


def _batch_plan(n_items: int, config: TrainConfig, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per step: item indices (−1 = control row) and control kinds (0 gradient, 1 noise, 2 no injection).
    Items are drawn epoch by epoch from seeded permutations so every item is seen before any repeats."""
    n_ctrl = int(round(config.batch_size * config.control_share))
    order: list[int] = []
    for _ in range(config.steps):
        n_grad = config.batch_size - n_ctrl
        while len(order) < n_grad:
            order += rng.permutation(n_items).tolist()
        take, order = order[:n_grad], order[n_grad:]
        kinds = np.array([0] * n_grad + [1 + (j % 2) for j in range(n_ctrl)])
        idx = np.array(take + [int(rng.integers(n_items)) for _ in range(n_ctrl)])  # controls borrow a norm
        yield idx, kinds


def _rows(
    describer: Describer,
    grads: torch.Tensor,
    labels: Sequence[str],
    idx: np.ndarray,
    kinds: np.ndarray,
    contexts: list[str | None],
    rng: np.random.Generator,
) -> tuple[torch.Tensor, list[str]]:
    """Vectors and labels of one batch: gradient rows get their label; noise/no-injection rows get "no pressure"."""
    g = grads[torch.as_tensor(idx)]
    noisy = torch.as_tensor(noise_like(g.numpy(), rng))
    kinds_t = torch.as_tensor(kinds)
    g = torch.where((kinds_t == 1)[:, None], noisy, g)
    vectors = describer.projector(g.to(describer.device))
    vectors = vectors * (kinds_t != 2).to(vectors)[:, None, None]  # zero = no injection in both modes
    row_labels = [labels[i] if kind == 0 else describer.config.no_pressure for i, kind in zip(idx, kinds)]
    return vectors, row_labels


def _draw_contexts(pool: Sequence[str], n: int, share: float, rng: np.random.Generator) -> list[str | None]:
    """A neutral passage for a `share` of rows (seeded), None for the rest."""
    use = rng.random(n) < share
    picks = rng.integers(len(pool), size=n) if len(pool) else np.zeros(n, int)
    return [pool[p] if u and len(pool) else None for u, p in zip(use, picks)]


def train_projector(
    model: nn.Module,
    tokenizer,
    grads: np.ndarray,
    labels: Sequence[str],
    config: DescriberConfig,
    train: TrainConfig,
    context_pool: Sequence[str] = (),
    val: tuple[np.ndarray, Sequence[str]] | None = None,
    progress: bool = True,
) -> tuple[Describer, pd.DataFrame]:
    """Train a projector (and LoRA if configured) so that injected gradients make the model say their labels.

    Returns the describer and the training curve (step, loss, seconds; val_loss every `eval_every` steps on the
    `val` (grads, labels) pair with no context)."""
    config.check(model)
    train.check()
    grads_t = torch.as_tensor(np.asarray(grads), dtype=torch.float32)
    if grads_t.ndim != 2 or len(grads_t) != len(labels) or len(labels) == 0:
        raise GradsenseError(f"need (N, d) gradients and N labels, got {tuple(grads_t.shape)} and {len(labels)} labels")
    if not torch.isfinite(grads_t).all():
        raise GradsenseError("training gradients contain non-finite values")
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    projector = Projector(grads_t.shape[1], config.k, config.kind, config.mode, config.mlp_hidden)
    params = list(projector.parameters())
    if config.lora_rank > 0:
        params += add_lora(model, config.lora_rank, config.lora_alpha, config.inject_layer)
    describer = Describer(model, tokenizer, projector, config)
    if config.mode == "raw":
        _calibrate_raw_scale(
            describer,
            grads_t[: train.batch_size],
            _draw_contexts(context_pool, train.batch_size, train.context_share, rng),
        )
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=train.lr, weight_decay=train.weight_decay)
    curve = []
    plan = list(_batch_plan(len(labels), train, rng))
    for step, (idx, kinds) in enumerate(tqdm(plan, desc="train projector", disable=not progress), start=1):
        start = time.perf_counter()
        contexts = _draw_contexts(context_pool, len(idx), train.context_share, rng)
        vectors, row_labels = _rows(describer, grads_t, labels, idx, kinds, contexts, rng)
        loss = describer.loss(vectors, contexts, row_labels, train.max_label_tokens)
        if not torch.isfinite(loss):
            raise GradsenseError(f"training loss became non-finite at step {step} (lower train.lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start, "val_loss": math.nan}
        if val is not None and (step % train.eval_every == 0 or step == train.steps or step == 1):
            record["val_loss"] = validation_loss(describer, *val, max_label_tokens=train.max_label_tokens)
        curve.append(record)
    describer.meta = {"train": asdict(train)}
    return describer, pd.DataFrame(curve)


@torch.no_grad()
def validation_loss(
    describer: Describer,
    grads: np.ndarray,
    labels: Sequence[str],
    batch_size: int = 16,
    max_label_tokens: int | None = None,
) -> float:
    """Mean label loss of held-out gradients (no context), batch-weighted."""
    grads_t = torch.as_tensor(np.asarray(grads), dtype=torch.float32)
    total, count = 0.0, 0
    for part in batches(len(labels), batch_size):
        vectors = describer.projector(grads_t[part].to(describer.device))
        n = len(labels[part])
        total += float(describer.loss(vectors, [None] * n, list(labels[part]), max_label_tokens)) * n
        count += n
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------- pipeline inputs


def read_labels(path: str | Path) -> dict[str, str]:
    """{item id: label} from the oracle stage's labels.jsonl (one-line error naming the first bad line)."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"labels file {path} is missing (run the oracle stage)")
    labels: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            labels[str(row["id"])] = str(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GradsenseError(f"{path}: line {number} is not a JSON object with 'id' and 'label'") from None
    return labels


def read_contexts(path: str | Path) -> pd.DataFrame:
    """The context passages (columns id, pool = neutral|domain, domain, text)."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"context passages {path} are missing (run `make data`)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != ["id", "pool", "domain", "text"] or not set(table["pool"]) <= {"neutral", "domain"}:
        raise GradsenseError(f"context passages {path} need columns id, pool (neutral|domain), domain, text")
    return table


def join_items(corrections: pd.DataFrame, grad_ids: Sequence[str], labels: Mapping[str, str]) -> pd.DataFrame:
    """Corrections rows that have a gradient, with `row` (their index in the gradient arrays) and `label` (None when
    the oracle labelled no such item), in gradient order."""
    where = {str(i): r for r, i in enumerate(grad_ids)}
    items = corrections[corrections["id"].astype(str).isin(where)].copy()
    if items.empty:
        raise GradsenseError("no corrections row has a gradient (do the corrections and gradients stages match?)")
    items["row"] = [where[str(i)] for i in items["id"]]
    items["label"] = [labels.get(str(i)) for i in items["id"]]
    return items.sort_values("row").reset_index(drop=True)


def training_items(items: pd.DataFrame, heldout_domain: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation pool): labelled items of the train / val split, on trained relation templates, in every
    domain but the held-out one (the describer never sees held-out subjects, templates or domain)."""
    labelled = items.dropna(subset=["label"])
    usable = (labelled["template_split"] == "train") & (labelled["domain"] != heldout_domain)
    return labelled[usable & (labelled["split"] == "train")], labelled[usable & (labelled["split"] == "val")]


def variant_configs(meta: Mapping, overrides: Mapping | None = None) -> tuple[DescriberConfig, TrainConfig]:
    """The describer and training settings recorded in a checkpoint's metadata, with `overrides` (an ablation or
    another seed) replacing some of them; an unknown setting is an error."""
    config, train = dict(meta["config"]), dict(meta.get("train", {}))
    for key, value in (overrides or {}).items():
        if key in config:
            config[key] = value
        elif key in train:
            train[key] = value
        else:
            raise GradsenseError(f"unknown describer setting {key!r} (have {sorted(config) + sorted(train)})")
    return DescriberConfig(**config), TrainConfig(**train)


def untrained_describer(describer: Describer, seed: int = 0) -> Describer:
    """The same describer with a freshly initialised (seeded, never trained) projector: the untrained control."""
    torch.manual_seed(seed)
    cfg = describer.config
    projector = Projector(describer.projector.d_model, cfg.k, cfg.kind, cfg.mode, cfg.mlp_hidden)
    projector.grad_norm_ref.copy_(describer.projector.grad_norm_ref)
    projector.log_scale.data.copy_(describer.projector.log_scale.data)  # raw mode: the trained describer's scale
    projector.requires_grad_(False)
    return Describer(describer.model, describer.tokenizer, projector, cfg, {"untrained": True})


def source_layer_of(layers: Sequence[int], wanted: int | None) -> int:
    """The gradient layer to read: `wanted`, or the middle extracted layer when None (error when not extracted)."""
    layers = [int(x) for x in layers]
    if wanted is None:
        return layers[len(layers) // 2]
    if wanted not in layers:
        raise GradsenseError(f"source layer {wanted} was not extracted by the gradients stage (have {layers})")
    return int(wanted)


# --------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    describer: Describer, directory: str | Path, model_name: str | None = None, extra: dict | None = None
) -> Path:
    """Write `projector.pt` (projector + LoRA tensors) and `meta.json` (model fingerprint, layers, settings) into
    `directory`, atomically (a temporary folder renamed into place)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "gradsense-projector/1",
        "model_name": model_name,
        "fingerprint": fingerprint(describer.model),
        "d_model": describer.projector.d_model,
        "config": asdict(describer.config),
        **describer.meta,
        **(extra or {}),
    }
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        state = {"projector": describer.projector.state_dict(), "lora": lora_state(describer.model)}
        torch.save(state, tmp / "projector.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=float) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_meta(directory: str | Path) -> dict:
    """The metadata of a checkpoint folder (one-line error when missing or unreadable)."""
    directory = Path(directory)
    meta_file, weights = directory / "meta.json", directory / "projector.pt"
    if not meta_file.is_file() or not weights.is_file():
        raise GradsenseError(
            f"checkpoint {directory} is missing (need meta.json and projector.pt; run `dvc repro train`)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise GradsenseError(
            f"checkpoint {directory}: meta.json is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    if meta.get("format") != "gradsense-projector/1":
        raise GradsenseError(f"checkpoint {directory}: unknown format {meta.get('format')!r}")
    return meta


def load_describer(
    directory: str | Path | None = None,
    model: nn.Module | None = None,
    tokenizer=None,
    device: str = "auto",
    source_layer: int | None = None,
) -> Describer:
    """Rebuild a describer from a checkpoint: the model named in its metadata (or the one given, which must match the
    fingerprint), the projector and any LoRA adapters (inserted into the model in place)."""
    directory = Path(directory) if directory is not None else DEFAULT_CHECKPOINT
    meta = read_meta(directory)
    if model is None:
        from gradsense.models import load_model

        model, tokenizer = load_model(meta.get("model_name"), device=device)
    found, expected = fingerprint(model), meta["fingerprint"]
    if found != expected:
        diff = ", ".join(
            f"{k}={expected.get(k)} (model has {found.get(k)})" for k in expected if found.get(k) != expected.get(k)
        )
        raise GradsenseError(f"checkpoint {directory} was trained for another model: {diff}")
    config = DescriberConfig(**meta["config"])
    if source_layer is not None and source_layer != config.source_layer:
        raise GradsenseError(
            f"checkpoint {directory} reads gradients of layer {config.source_layer}, not layer {source_layer}"
        )
    state = torch.load(directory / "projector.pt", map_location="cpu", weights_only=True)
    projector = Projector(meta["d_model"], config.k, config.kind, config.mode, config.mlp_hidden)
    projector.load_state_dict(state["projector"])
    projector.requires_grad_(False)
    if config.lora_rank > 0 and not any("lora_" in n for n, _ in model.named_parameters()):
        add_lora(model, config.lora_rank, config.lora_alpha, config.inject_layer)
    if state["lora"]:
        missing = set(state["lora"]) - set(model.state_dict())
        if missing:
            raise GradsenseError(f"checkpoint {directory}: LoRA tensors do not fit the model ({len(missing)} missing)")
        model.load_state_dict(state["lora"], strict=False)
        for _, p in model.named_parameters():
            p.requires_grad_(False)
    return Describer(model, tokenizer, projector, config, meta)


# --------------------------------------------------------------------------------------------- describe


def read_items(path: str | Path) -> list[dict]:
    """Items from a JSONL file (`id`, `prompt`, `right`, optional `wrong`, `context`); every malformed line is
    reported with its line number in one error."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"input file {path} is missing")
    items, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: invalid JSON ({exc.msg})")
            continue
        problem = item_problem(item)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            items.append(item)
    if problems:
        raise GradsenseError(f"{path}: {len(problems)} malformed line(s): " + "; ".join(problems))
    if not items:
        raise GradsenseError(f"{path}: no items")
    return items


def item_problem(item: object) -> str | None:
    """Why an item is malformed (None when it is fine)."""
    if not isinstance(item, dict):
        return "not a JSON object"
    for key in ("id", "prompt", "right"):
        if key not in item:
            return f"missing field {key!r}"
    for key in ("prompt", "right"):
        if not isinstance(item[key], str) or not item[key].strip():
            return f"field {key!r} must be a non-empty string"
    for key in ("wrong", "context"):
        if item.get(key) is not None and not isinstance(item[key], str):
            return f"field {key!r} must be a string"
    return None


def item_gradients(describer: Describer, items: Sequence[Mapping], batch_size: int = 32) -> np.ndarray:
    """(N, d) gradients of each item's loss on `right` at the describer's source layer, from the original model."""
    from gradsense.gradients import activation_gradients

    prompts = [it["prompt"] for it in items]
    targets = [target_text(it["right"]) for it in items]
    guard = adapters_off(describer.model) if describer.config.lora_rank > 0 else nullcontext()
    with guard:
        result = activation_gradients(
            describer.model,
            describer.tokenizer,
            prompts,
            targets,
            [describer.config.source_layer],
            batch_size=batch_size,
            ids=[it["id"] for it in items],
            progress=False,
        )
    return np.asarray(result.grads[0], dtype=np.float32)


def describe(
    items: Sequence[Mapping],
    checkpoint: str | Path | None = None,
    describer: Describer | None = None,
    control: str = "gradient",
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    device: str = "auto",
) -> list[dict]:
    """Describe the training pressure of each item `{id, prompt, right, wrong?, context?}` (target = right): returns
    `{id, description, domain, from, to}` per item. Controls: "none", "noise", "shuffle" (see `Describer.vectors`)."""
    if control not in CONTROLS:
        raise GradsenseError(f"unknown control {control!r} (choose from {', '.join(CONTROLS)})")
    if control == "shuffle" and len(items) < 2:
        raise GradsenseError("the shuffle control needs at least two items (each gets another item's gradient)")
    for i, item in enumerate(items):
        problem = item_problem(item)
        if problem:
            raise GradsenseError(f"item {item.get('id', i) if isinstance(item, dict) else i}: {problem}")
    describer = describer or load_describer(checkpoint, device=device)
    grads = item_gradients(describer, items)
    table = describer.describe_gradients(
        grads, [it.get("context") for it in items], control, seed, batch_size, max_new_tokens
    )
    # Unparsed fields are null (pandas turns None into NaN, which is not valid JSON).
    rows = table[["description", "domain", "from", "to"]].astype(object).where(table.notna(), None).to_dict("records")
    return [{"id": item["id"], **row} for item, row in zip(items, rows)]


def write_jsonl(records: Sequence[Mapping], path: str | Path) -> Path:
    """Write records as JSONL through a temporary file renamed into place (no partial file looks complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}-", delete=False) as tmp:
        for record in records:
            tmp.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    Path(tmp.name).replace(path)
    return path
