"""The describer: a model, its tokenizer and a `Projector` that maps an activation gradient to k vectors injected at
the interpretation prompt's slots (block `inject_layer`), so the (frozen, optionally LoRA-tuned) model says what
pressure it feels. Also its controls (no injection, norm-matched noise, shuffled gradients, an untrained projector).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gradsense import decoding
from gradsense.errors import GradsenseError
from gradsense.hooks import inject
from gradsense.models import architecture, check_layer, model_device
from gradsense.prompt import NO_PRESSURE, QUESTION, SYSTEM, encode_interpretations
from gradsense.scoring import batches
from gradsense.teacher import parse_label

CONTROLS = ("gradient", "none", "noise", "shuffle")  # what the describer is given: see `Describer.vectors`
INITS = ("random", "lens")  # how a projector starts: see `Projector`
READS = ("last", "each")  # which gradient positions the projector reads: see `DescriberConfig.read`


@dataclass
class DescriberConfig:
    """Everything that fixes how a gradient becomes a description (stored in the checkpoint's metadata)."""

    source_layer: int  # block whose output the gradient is taken at
    inject_layer: int  # block whose output receives the projected vectors
    k: int = 4  # number of placeholder slots
    mode: str = "norm"  # "norm": norm-matched to the residual; "raw": raw gradient × learned scale
    kind: str = "linear"  # "linear" (d → k·d) or "mlp"
    init: str = "random"  # "random" (PyTorch's default) or "lens": every slot starts as −g (linear only; `Projector`)
    mlp_hidden: int = 1024
    lora_rank: int = 0  # 0 = model frozen; > 0 = LoRA on q_proj, v_proj through peft
    lora_alpha: int = 16
    precision: str = "fp32"  # "bf16": training and scoring passes under bfloat16 autocast (decoding stays float32)
    placeholder: str = " ?"
    system: str = SYSTEM
    question: str = QUESTION
    no_pressure: str = NO_PRESSURE
    max_value_tokens: int | None = None  # the longest trained head value (+ its field stop); decoding's cap
    read: str = "last"  # "last": the gradient at the last prompt token; "each": slot j reads target position j

    def check(self, model: nn.Module) -> None:
        """Validate the settings against a model (one-line GradsenseError)."""
        check_layer(model, self.source_layer)
        check_layer(model, self.inject_layer)
        if self.mode not in ("norm", "raw"):
            raise GradsenseError(f"train.mode must be 'norm' or 'raw', not {self.mode!r}")
        if self.kind not in ("linear", "mlp"):
            raise GradsenseError(f"train.kind must be 'linear' or 'mlp', not {self.kind!r}")
        if self.init not in INITS:
            raise GradsenseError(f"train.init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.init == "lens" and self.kind != "linear":
            raise GradsenseError(f"train.init 'lens' needs train.kind 'linear', not {self.kind!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise GradsenseError(f"train.k must be a positive integer, not {self.k!r}")
        if self.read not in READS:
            raise GradsenseError(f"train.read must be one of {', '.join(READS)}, not {self.read!r}")
        if self.read == "each" and self.kind != "linear":
            raise GradsenseError(f"train.read 'each' needs train.kind 'linear', not {self.kind!r}")
        if self.precision not in ("fp32", "bf16"):
            raise GradsenseError(f"train.precision must be 'fp32' or 'bf16', not {self.precision!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise GradsenseError(f"train.lora_rank must be an integer ≥ 0, not {self.lora_rank!r}")


class Projector(nn.Module):
    """Map a gradient g (B, d) to k vectors (B, k, d): `linear` (d → k·d) or `mlp` (d → hidden → k·d).

    mode "norm": the input is g/‖g‖ (the injection fixes the magnitude); mode "raw": the input is g divided by a
    fixed reference norm (the median training ‖g‖) and the output is multiplied by a learned scale, without a final
    bias, so the injected magnitude follows the gradient's.

    init "lens" (linear only): the weight starts as k stacked copies of −I and the bias at 0, so every slot starts as
    −g, the direction Backward Lens reads the target from (SmolLM2 ties its embeddings); "random": PyTorch's default.
    """

    def __init__(
        self,
        d_model: int,
        k: int,
        kind: str = "linear",
        mode: str = "norm",
        mlp_hidden: int = 1024,
        init: str = "random",
    ):
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
        if init == "lens":
            if kind != "linear":
                raise GradsenseError(f"projector init 'lens' needs kind 'linear', not {kind!r}")
            with torch.no_grad():
                self.net.weight.copy_(-torch.eye(d_model).repeat(k, 1))
                if self.net.bias is not None:
                    self.net.bias.zero_()
        elif init != "random":
            raise GradsenseError(f"projector init must be one of {', '.join(INITS)}, not {init!r}")
        self.register_buffer("grad_norm_ref", torch.tensor(1.0))
        self.log_scale = nn.Parameter(torch.zeros(()), requires_grad=mode == "raw")

    def forward(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, d) gradients → (B, k, d) vectors to inject; (B, k, d) gradients, one per target-predicting position
        (`read="each"`) → slot j reads position j alone through its own block of the linear map."""
        if grads.shape[-1] != self.d_model:
            raise GradsenseError(f"gradient width {grads.shape[-1]} != projector width {self.d_model}")
        scaled = grads / grads.norm(dim=-1, keepdim=True).clamp_min(1e-12) if self.mode == "norm" else grads
        if self.mode == "raw":
            scaled = scaled / self.grad_norm_ref
        if grads.ndim == 3:
            if self.kind != "linear" or grads.shape[1] != self.k:
                raise GradsenseError(
                    f"per-position gradients {tuple(grads.shape)} need a linear projector of k = {self.k}"
                )
            weight = self.net.weight.view(self.k, self.d_model, self.d_model)
            out = torch.einsum("bki,koi->bko", scaled, weight)
            out = out + self.net.bias.view(self.k, self.d_model) if self.net.bias is not None else out
        else:
            out = self.net(scaled).view(len(grads), self.k, self.d_model)
        return out if self.mode == "norm" else out * self.log_scale.exp()


def new_projector(d_model: int, config: DescriberConfig) -> Projector:
    """A projector of width `d_model` built (and initialised) as `config` says."""
    return Projector(d_model, config.k, config.kind, config.mode, config.mlp_hidden, config.init)


def add_lora(model: nn.Module, rank: int, alpha: int, first_layer: int = 0) -> list[nn.Parameter]:
    """Insert LoRA adapters (peft) on q_proj and v_proj of blocks `first_layer`… in place; returns their (trainable)
    parameters. The describer starts at its injection layer: earlier blocks cannot see the injection, and adapters
    there would only add backward passes."""
    from peft import LoraConfig, inject_adapter_in_model

    from gradsense.models import n_layers

    layers = list(range(first_layer, n_layers(model)))
    inject_adapter_in_model(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            layers_to_transform=layers,
            layers_pattern="layers",
        ),
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

    @property
    def norm_match(self) -> bool:
        """Whether injected vectors are rescaled to the residual's norm (mode "norm") or added as they are ("raw")."""
        return self.config.mode == "norm"

    def precision(self):
        """The autocast context of the describer's training and scoring passes (bfloat16 when configured, else
        nothing); decoding runs without it (`decoding`)."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def original_model(self):
        """A context in which `self.model` is the original model (LoRA adapters off): the one whose gradients the
        describer reads, so gradients of new items must be taken inside it."""
        return adapters_off(self.model) if self.config.lora_rank > 0 else nullcontext()

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
        """Logits and label ids at the label positions only (the last `keep` positions), under the injection.

        With gradients on and the model frozen, the columns before the first slot (they never see the injection:
        attention is causal) run first without autograd into a KV cache, so the backward pass covers only the
        columns from the first slot on (`prefix_columns`)."""
        batch, positions = encode_interpretations(self.tokenizer, self.config, contexts, labels, max_label_tokens)
        batch = batch.to(self.device)
        keep = int((batch.labels != -100).sum(-1).max()) + 1
        split = prefix_columns(self.model, positions, vectors)
        past = None
        if split:
            with torch.no_grad(), self.precision():
                past = self.model(
                    input_ids=batch.input_ids[:, :split],
                    attention_mask=batch.attention_mask[:, :split],
                    position_ids=batch.position_ids[:, :split],
                    use_cache=True,
                    logits_to_keep=1,
                ).past_key_values
        with (
            self.precision(),
            inject(self.model, self.config.inject_layer, positions - split, vectors, self.norm_match),
        ):
            logits = self.model(
                input_ids=batch.input_ids[:, split:],
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids[:, split:],
                past_key_values=past,
                use_cache=past is not None,
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
        """Mean cross-entropy of the heads' trained tokens (values and their ends, `prompt.head_ids`) given the
        injection (logits computed only at label positions)."""
        logits, labels_kept = self._label_logits(vectors, contexts, labels, max_label_tokens)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels_kept.flatten(), ignore_index=-100)

    def loss_terms(
        self,
        vectors: torch.Tensor | None,
        contexts: Sequence[str | None],
        labels: Sequence[str],
        max_label_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, number of trained tokens) of `loss`: one process's share of a batch split over
        several (their sums over the batch's token count is the batch's `loss`)."""
        logits, labels_kept = self._label_logits(vectors, contexts, labels, max_label_tokens)
        flat = labels_kept.flatten()
        total = nn.functional.cross_entropy(logits.flatten(0, 1), flat, ignore_index=-100, reduction="sum")
        return total, (flat != -100).sum()

    @torch.no_grad()
    def label_logprobs(
        self,
        vectors: torch.Tensor | None,
        contexts: Sequence[str | None],
        labels: Sequence[str],
        max_label_tokens: int | None = None,
    ) -> np.ndarray:
        """Per row: mean log p of the head's trained tokens under the injection (length-normalised, forced choice)."""
        logits, labels_kept = self._label_logits(vectors, contexts, labels, max_label_tokens)
        logp = torch.log_softmax(logits, -1).gather(-1, labels_kept.clamp(min=0)[..., None])[..., 0]
        mask = labels_kept != -100
        return ((logp * mask).sum(-1) / mask.sum(-1)).cpu().numpy().astype(np.float64)

    def generate(
        self,
        vectors: torch.Tensor | None,
        contexts: Sequence[str | None],
        max_new_tokens: int = 24,
        structured: bool = True,
    ) -> list[str]:
        """Greedy descriptions for one batch under the injection (vectors (B, k, d) or None); see `decoding.generate`."""
        return decoding.generate(self, vectors, contexts, max_new_tokens, structured)

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


def prefix_columns(model: nn.Module, positions: torch.Tensor, vectors: torch.Tensor | None) -> int:
    """How many leading columns a training pass may run without autograd: those before the batch's first slot when
    gradients are on, vectors are injected and no model weight is trained (LoRA changes the cached keys and values);
    0 otherwise (one pass over every column)."""
    if not torch.is_grad_enabled() or vectors is None or not vectors.requires_grad:
        return 0
    if any(p.requires_grad for p in model.parameters()):
        return 0
    return int(positions.min())


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


def untrained_describer(describer: Describer, seed: int = 0) -> Describer:
    """The same describer with a freshly initialised (seeded, never trained; `config.init`) projector: the untrained
    control."""
    torch.manual_seed(seed)
    cfg = describer.config
    projector = new_projector(describer.projector.d_model, cfg)
    projector.grad_norm_ref.copy_(describer.projector.grad_norm_ref)
    projector.log_scale.data.copy_(describer.projector.log_scale.data)  # raw mode: the trained describer's scale
    projector.requires_grad_(False)
    meta = {"untrained": True, "trained_domains": describer.meta.get("trained_domains")}  # leakage: the same rows
    return Describer(describer.model, describer.tokenizer, projector, cfg, meta)
