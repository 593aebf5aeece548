"""Training the describer: batches of gradients (plus noise and no-injection controls labelled "no pressure"), some
rows after a context passage (neutral text, other facts, or a hard negative: another answer of the item's own
relation), the loss on the label head's values through the injection, AdamW on the projector (and LoRA).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gradsense.describer import Describer, DescriberConfig, add_lora, new_projector, noise_like
from gradsense.errors import GradsenseError
from gradsense.hooks import capture
from gradsense.prompt import FIELD_LEADS, encode_interpretations, lead_split, value_lengths
from gradsense.scoring import batches
from gradsense.teacher import parse_label


@dataclass
class TrainConfig:
    """Optimisation settings of `train_projector`."""

    steps: int = 150  # used when `epochs` is None
    epochs: float | None = None  # passes over the training items; sets the steps (`planned_steps`)
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    control_share: float = 0.2  # share of each batch that is noise or no injection, labelled "no pressure"
    context_share: float = 0.75  # share of rows that get a context passage before the question
    hard_share: float = 0.3  # of those, the share that reads a hard negative (another answer of the same relation)
    max_label_tokens: int | None = None  # cap on head tokens; None = the whole head
    domain_repeats: dict[str, int] = field(default_factory=dict)  # draws per pass of a domain's items (default 1)
    eval_every: int = 25
    select_on_val: bool = True  # with `val`: return the parameters of the evaluation with the lowest val_loss
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Validate (one-line GradsenseError)."""
        if self.steps < 1 or self.batch_size < 1:
            raise GradsenseError(f"train.steps and train.batch_size must be ≥ 1, not {self.steps}, {self.batch_size}")
        if self.epochs is not None and not self.epochs > 0:
            raise GradsenseError(f"train.epochs must be > 0 or null, not {self.epochs}")
        for name in ("control_share", "context_share", "hard_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise GradsenseError(f"train.{name} must be within [0, 1], not {getattr(self, name)}")
        bad = {d: r for d, r in self.domain_repeats.items() if not (isinstance(r, int) and r >= 1)}
        if bad:
            raise GradsenseError(f"train.domain_repeats must be integers ≥ 1, not {bad}")


def calibrate_raw_scale(describer: Describer, grads: torch.Tensor, contexts: Sequence[str | None]) -> None:
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


def planned_steps(n_items: int, config: TrainConfig) -> int:
    """Optimiser steps: `steps`, or enough gradient rows for `epochs` passes over `n_items` items."""
    if config.epochs is None:
        return int(config.steps)
    n_grad = config.batch_size - int(round(config.batch_size * config.control_share))
    if n_grad < 1:
        raise GradsenseError("train.control_share leaves no gradient rows in a batch")
    return max(1, math.ceil(config.epochs * n_items / n_grad))


def batch_plan(
    n_items: int, config: TrainConfig, rng: np.random.Generator, repeats: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per step: item indices (−1 = control row) and control kinds (0 gradient, 1 noise, 2 no injection).
    Items are drawn pass by pass from seeded permutations so every item is seen before any repeats; `repeats[i]`
    puts item i that many times in every pass (the number of steps still follows `n_items`)."""
    n_ctrl = int(round(config.batch_size * config.control_share))
    pool = np.repeat(np.arange(n_items), 1 if repeats is None else repeats)  # one pass, shuffled each time
    order: list[int] = []
    for _ in range(planned_steps(n_items, config)):
        n_grad = config.batch_size - n_ctrl
        while len(order) < n_grad:
            order += pool[rng.permutation(len(pool))].tolist()
        take, order = order[:n_grad], order[n_grad:]
        kinds = np.array([0] * n_grad + [1 + (j % 2) for j in range(n_ctrl)])
        idx = np.array(take + [int(rng.integers(n_items)) for _ in range(n_ctrl)])  # controls borrow a norm
        yield idx, kinds


def batch_rows(
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
    g = torch.where((kinds_t == 1).view(-1, *[1] * (g.ndim - 1)), noisy, g)
    vectors = describer.projector(g.to(describer.device))
    vectors = vectors * (kinds_t != 2).to(vectors)[:, None, None]  # zero = no injection in both modes
    row_labels = [labels[i] if kind == 0 else describer.config.no_pressure for i, kind in zip(idx, kinds)]
    return vectors, row_labels


def draw_contexts(
    pool: Sequence[str],
    n: int,
    share: float,
    rng: np.random.Generator,
    hard: Sequence[Sequence[str]] | None = None,
    hard_share: float = 0.0,
) -> list[str | None]:
    """A passage for a `share` of rows (seeded), None for the rest: from `pool`, or for a `hard_share` of them one
    of the row's own `hard` negatives when it has any."""
    use = rng.random(n) < share
    use_hard = rng.random(n) < hard_share
    picks = rng.integers(len(pool), size=n) if len(pool) else np.zeros(n, int)
    out: list[str | None] = []
    for i, (u, p) in enumerate(zip(use, picks)):
        own = hard[i] if hard is not None else ()
        if u and use_hard[i] and len(own):
            out.append(own[int(rng.integers(len(own)))])
        else:
            out.append(pool[p] if u and len(pool) else None)
    return out


def value_limit(tokenizer, labels: Sequence[str]) -> int:
    """The longest head value of `labels` in tokens, plus the field-name tokens said before a name's '|' (the
    structured decoder's cap)."""
    before_stop = max(max(lead_split(tokenizer, lead)[1], 0) for lead in FIELD_LEADS[1:])
    return max(max(value_lengths(tokenizer, label)) for label in labels) + before_stop


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
    hard_negatives: Sequence[Sequence[str]] | None = None,
) -> tuple[Describer, pd.DataFrame]:
    """Train a projector (and LoRA if configured) so that injected gradients make the model say their labels' heads.

    `hard_negatives[i]`: passages stating another answer of item i's relation (read by a `hard_share` of its context
    rows). Sets `config.max_value_tokens` (decoding's cap) from the labels. Returns the describer and the training
    curve (step, loss, seconds; val_loss every `eval_every` steps on the `val` (grads, labels) pair, no context).

    With `val` and `train.select_on_val`, the number of steps is chosen on validation: the trainable parameters
    (projector, LoRA) of the evaluation with the lowest val_loss (the first on ties) are restored at the end. With
    `val`, `describer.meta["selection"]` records `selected_step` and `selected_val_loss` (the last step's when
    selection is off)."""
    config.check(model)
    train.check()
    grads_t = torch.as_tensor(np.asarray(grads), dtype=torch.float32)
    shape = "(N, d)" if config.read == "last" else f"(N, {config.k}, d)"
    if grads_t.ndim != (2 if config.read == "last" else 3) or len(grads_t) != len(labels) or len(labels) == 0:
        raise GradsenseError(
            f"need {shape} gradients and N labels, got {tuple(grads_t.shape)} and {len(labels)} labels"
        )
    if not torch.isfinite(grads_t).all():
        raise GradsenseError("training gradients contain non-finite values")
    if hard_negatives is not None and len(hard_negatives) != len(labels):
        raise GradsenseError(f"{len(hard_negatives)} hard-negative lists for {len(labels)} labels")
    config.max_value_tokens = value_limit(tokenizer, [*labels, config.no_pressure])
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    projector = new_projector(grads_t.shape[-1], config)
    params = list(projector.parameters())
    if config.lora_rank > 0:
        params += add_lora(model, config.lora_rank, config.lora_alpha, config.inject_layer)
    describer = Describer(model, tokenizer, projector, config)
    if config.mode == "raw":
        calibrate_raw_scale(
            describer,
            grads_t[: train.batch_size],
            draw_contexts(context_pool, train.batch_size, train.context_share, rng),
        )
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    curve = []
    repeats = None
    if train.domain_repeats:
        repeats = np.array([train.domain_repeats.get(parse_label(label)["domain"], 1) for label in labels])
    plan = list(batch_plan(len(labels), train, rng, repeats))
    best_loss, best_step, snapshot = math.inf, None, None
    shards = Shards()  # one process, or the processes of `accelerate launch` (each takes a share of every batch)
    bar = not progress or not shards.main
    for step, (idx, kinds) in enumerate(tqdm(plan, desc="train projector", disable=bar), start=1):
        start = time.perf_counter()
        hard = [hard_negatives[i] if k == 0 else () for i, k in zip(idx, kinds)] if hard_negatives else None
        contexts = draw_contexts(context_pool, len(idx), train.context_share, rng, hard, train.hard_share)
        vectors, row_labels = batch_rows(describer, grads_t, labels, idx, kinds, contexts, rng)
        optimizer.zero_grad(set_to_none=True)
        loss = shards.loss(describer, vectors, contexts, row_labels, train.max_label_tokens)
        if not torch.isfinite(loss):
            raise GradsenseError(f"training loss became non-finite at step {step} (lower train.lr)")
        shards.backward(loss, trainable)
        optimizer.step()
        loss = shards.batch_value(loss)
        record = {"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start, "val_loss": math.nan}
        if val is not None and (step % train.eval_every == 0 or step == len(plan) or step == 1):
            record["val_loss"] = validation_loss(describer, *val, max_label_tokens=train.max_label_tokens)
            if train.select_on_val and record["val_loss"] < best_loss:  # NaN never wins
                best_loss, best_step = record["val_loss"], step
                snapshot = None if step == len(plan) else [p.detach().clone() for p in params]
        curve.append(record)
    named = {parse_label(label)["domain"] for label in labels} - {None}
    describer.meta = {"train": asdict(train), "trained_domains": sorted(named)}  # what leakage can name
    if val is not None:
        if best_step is None:  # selection off (or no finite val_loss): the last step, evaluated above
            best_loss, best_step = curve[-1]["val_loss"], len(plan)
        elif snapshot is not None:
            with torch.no_grad():
                for p, saved in zip(params, snapshot):
                    p.copy_(saved)
        describer.meta["selection"] = {"selected_step": int(best_step), "selected_val_loss": float(best_loss)}
    return describer, pd.DataFrame(curve)


class Shards:
    """Data parallel training under Hugging Face `accelerate` (`accelerate launch --multi_gpu --num_processes N`;
    gloo between CPU processes, NCCL between GPUs): every process draws the same global batch (same seeds), takes rows rank, rank + N, …, and the
    gradients are summed across processes, so N processes train what one process trains on the same global batch.
    In one process it is plain training (the batch's mean loss, no communication)."""

    def __init__(self) -> None:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo between CPU processes, NCCL between GPUs
        self.rank, self.world, self.main = state.process_index, state.num_processes, state.is_main_process

    def loss(self, describer: Describer, vectors, contexts, labels, max_label_tokens) -> torch.Tensor:
        """This process's share of the batch's mean token loss (the whole mean in one process)."""
        if self.world == 1:
            return describer.loss(vectors, contexts, labels, max_label_tokens)
        from accelerate.utils import reduce

        mine = list(range(self.rank, len(labels), self.world))
        total, count = describer.loss_terms(
            vectors[mine], [contexts[i] for i in mine], [labels[i] for i in mine], max_label_tokens
        )
        return total / reduce(count.to(total.dtype).detach(), "sum")  # over the whole batch's trained tokens

    def backward(self, loss: torch.Tensor, parameters: Sequence[torch.Tensor]) -> None:
        """Backward pass, then the gradients summed over the processes (every process steps the same way)."""
        loss.backward()
        if self.world > 1:
            from accelerate.utils import reduce

            for p in parameters:
                if p.grad is not None:
                    p.grad = reduce(p.grad, "sum")

    def batch_value(self, loss: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (the sum of the processes' shares)."""
        if self.world == 1:
            return loss.detach()
        from accelerate.utils import reduce

        return reduce(loss.detach(), "sum")


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
