"""Training the describer: batches of gradients (plus noise and no-injection controls labelled "no pressure"), some
rows after a neutral context passage, the label loss through the injection, AdamW on the projector (and LoRA).
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

from gradsense.describer import Describer, DescriberConfig, Projector, add_lora, noise_like
from gradsense.errors import GradsenseError
from gradsense.hooks import capture
from gradsense.prompt import encode_interpretations
from gradsense.scoring import batches


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


def batch_plan(n_items: int, config: TrainConfig, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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
    g = torch.where((kinds_t == 1)[:, None], noisy, g)
    vectors = describer.projector(g.to(describer.device))
    vectors = vectors * (kinds_t != 2).to(vectors)[:, None, None]  # zero = no injection in both modes
    row_labels = [labels[i] if kind == 0 else describer.config.no_pressure for i, kind in zip(idx, kinds)]
    return vectors, row_labels


def draw_contexts(pool: Sequence[str], n: int, share: float, rng: np.random.Generator) -> list[str | None]:
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
        calibrate_raw_scale(
            describer,
            grads_t[: train.batch_size],
            draw_contexts(context_pool, train.batch_size, train.context_share, rng),
        )
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=train.lr, weight_decay=train.weight_decay)
    curve = []
    plan = list(batch_plan(len(labels), train, rng))
    for step, (idx, kinds) in enumerate(tqdm(plan, desc="train projector", disable=not progress), start=1):
        start = time.perf_counter()
        contexts = draw_contexts(context_pool, len(idx), train.context_share, rng)
        vectors, row_labels = batch_rows(describer, grads_t, labels, idx, kinds, contexts, rng)
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
