"""Per-example activation gradients: d(−Σ log p(target tokens | prompt)) / d(output of block ℓ), batched.

One forward and one `torch.autograd.grad` per batch: the items' losses are summed, which is exact because items
never interact (each row attends only to itself), so d(Σ_b loss_b)/d h_b = d loss_b / d h_b. The parameters stay
frozen and the graph starts at the earliest requested layer: its output is replaced by a detached leaf that
requires grad, so nothing below it is ever differentiated. Later layers' outputs are kept as graph nodes and
differentiated in the same call. Layer ℓ = output of block ℓ = HF `hidden_states[ℓ + 1]` (see gradsense.hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.files import atomic_path
from gradsense.hooks import edit_block_outputs, edit_module_io
from gradsense.models import blocks, check_layer, model_device, n_layers
from gradsense.sampling import stratified
from gradsense.scoring import Batch, batches, encode, target_text, tokenize_prompt, tokenize_target

POSITIONS = ("last", "target", "each")


@dataclass
class ActivationGradients:
    """Gradients and activations at the output of each requested block, one row per item (float32 numpy)."""

    grads: np.ndarray  # (L, N, d_model) d loss / d h at the site; (L, N, slots, d_model) when position="each"
    acts: np.ndarray  # (L, N, d_model) h at the site (mean over the sites when position="target"), like grads
    loss: np.ndarray  # (N,) summed target NLL in nats
    layers: list[int]
    ids: list
    position: str
    n_target_tokens: np.ndarray  # (N,)
    # Optional (units=True): the MLP hidden units of each layer's block (the input of down_proj), same position.
    unit_acts: np.ndarray | None = None  # (L, N, d_mlp) hidden unit values act(gate) * up
    unit_grads: np.ndarray | None = None  # (L, N, d_mlp) d loss / d (down_proj input)
    unit_input_grad_sq: np.ndarray | None = None  # (L, N, d_mlp) (d loss/d gate_j)² + (d loss/d up_j)²

    @property
    def index(self) -> pd.DataFrame:
        """One row per item: its row number, id, loss and number of target tokens."""
        return pd.DataFrame(
            {
                "row": np.arange(len(self.ids)),
                "id": self.ids,
                "loss": self.loss,
                "n_target_tokens": self.n_target_tokens,
            }
        )

    def at(self, layer: int) -> int:
        """Index of `layer` along the first axis of the arrays."""
        if layer not in self.layers:
            raise GradsenseError(f"layer {layer} was not extracted (have {self.layers})")
        return self.layers.index(layer)


def resolve_layers(model: nn.Module, spec: int | float | Sequence[int | float]) -> list[int]:
    """Block indices from ints (indices, negative from the end) or floats in [0, 1) (fraction of depth, floored)."""
    items = [spec] if isinstance(spec, (int, float)) else list(spec)
    if not items:
        raise GradsenseError("layers: at least one layer is needed")
    count, layers = n_layers(model), []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise GradsenseError(f"layers: {item!r} is neither a block index nor a depth fraction")
        if isinstance(item, float):
            if not 0.0 <= item < 1.0:
                raise GradsenseError(f"layers: fraction {item} is outside [0, 1)")
            item = int(item * count)  # floor: 0.25/0.5/0.75 of 30 blocks → 7, 15, 22
        layers.append(check_layer(model, item))
    if len(set(layers)) != len(layers):
        raise GradsenseError(f"layers: {items} resolves to repeated blocks {layers}")
    return layers


def resolve_layer(model: nn.Module, spec: int | float | None) -> int | None:
    """One block index from a block index or a depth fraction (`resolve_layers`); None stays None (the default)."""
    return None if spec is None else resolve_layers(model, spec)[0]


def extracted_layer(layers: Sequence[int], wanted: int | None = None, role: str = "source") -> int:
    """The block a later stage reads (`role` names it in errors): `wanted`, which must be one of the extracted
    `layers`, or when None the middle extracted layer, `layers[len(layers) // 2]` (the 2nd of 3 depths)."""
    layers = [int(x) for x in layers]
    if not layers:
        raise GradsenseError(f"no extracted gradient layers to choose the {role} layer from")
    chosen = layers[len(layers) // 2] if wanted is None else int(wanted)
    if chosen not in layers:
        raise GradsenseError(f"{role} layer {chosen} was not extracted by the gradients stage (have {layers})")
    return chosen


def _leaf(h: torch.Tensor) -> torch.Tensor:
    """A detached copy that requires grad: the backward pass stops here."""
    return h.detach().requires_grad_(True)


def target_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B,) summed target NLL, with the unembedding applied only at the positions that predict target tokens."""
    hidden = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    where = batch.target_positions
    logits = model.get_output_embeddings()(hidden[where])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision → float32, float64 kept
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # models that soft-cap their logits (e.g. Gemma 2) do it after the unembedding
        logits = torch.tanh(logits / cap) * cap
    picked = torch.log_softmax(logits, dim=-1).gather(-1, batch.labels[where][:, None])[:, 0]
    rows = where.nonzero()[:, 0]
    return torch.zeros(len(where), dtype=picked.dtype, device=picked.device).index_add(0, rows, -picked)


def each_position(batch: Batch, slots: int) -> torch.Tensor:
    """(B, slots) indices of the first `slots` target-predicting positions of each row (they run from the last
    prompt token on), the last one repeated when a target has fewer tokens."""
    n_target = batch.target_positions.sum(1, keepdim=True)
    offsets = torch.arange(slots, device=n_target.device)[None, :]
    return batch.last_prompt[:, None].to(n_target.device) + torch.minimum(offsets, n_target - 1)


def last_position(grads: np.ndarray) -> np.ndarray:
    """(N, d) gradients at the last prompt position from (N, d) or per-position (N, slots, d) ones (slot 0)."""
    grads = np.asarray(grads)
    return grads[:, 0] if grads.ndim == 3 else grads


def _select(x: torch.Tensor, batch: Batch, position: str, reduce: str, slots: int = 1) -> torch.Tensor:
    """(B, T, d) → (B, d): the last prompt position, or the sum/mean over the target-predicting positions;
    "each": (B, slots, d), one row per target-predicting position (`each_position`)."""
    if position == "last":
        return x[torch.arange(len(x), device=x.device), batch.last_prompt]
    if position == "each":
        return x[torch.arange(len(x), device=x.device)[:, None], each_position(batch, slots).to(x.device)]
    where = batch.target_positions[..., None].to(x.dtype)
    total = (x * where).sum(1)
    return total if reduce == "sum" else total / where.sum(1)


def length_batches(
    tokenizer, prompts: Sequence[str], targets: Sequence[str], ids: Sequence, batch_size: int
) -> list[np.ndarray]:
    """Row indices grouped into batches of similar token length (less padding), after validating every item
    up front so a bad item fails before any compute."""
    lengths = [
        len(tokenize_prompt(tokenizer, p, i)) + len(tokenize_target(tokenizer, t, i))
        for p, t, i in zip(prompts, targets, ids)
    ]
    order = np.argsort(lengths, kind="stable")
    return [order[part] for part in batches(len(order), batch_size)]


def pick_rows(items: Sequence, rows: np.ndarray) -> list:
    """The entries of `items` at `rows`, in that order."""
    return [items[i] for i in rows]


def _check_finite(ids: Sequence, loss: torch.Tensor, grads: list[torch.Tensor]) -> None:
    """Raise naming the first item whose loss or gradient is not finite."""
    bad = ~torch.isfinite(loss)
    for grad in grads:
        bad |= ~torch.isfinite(grad).flatten(1).all(1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise GradsenseError(f"item {ids[row]}: non-finite gradient (loss {float(loss[row]):.4g})")


def _unit_hooks(model: nn.Module, layers: list[int], keep: Callable) -> tuple[dict, dict]:
    """Pre/post hooks that record each layer's MLP hidden units u = act(gate) * up (down_proj input), gate and up,
    with the cut moved to the MLP input of the earliest block so that its units are differentiated too."""
    pre, post = {}, {}
    for layer in layers:
        mlp = blocks(model)[layer].mlp
        if layer == min(layers):
            pre[mlp] = _leaf
        pre[mlp.down_proj] = keep(f"u{layer}")
        post[mlp.gate_proj] = keep(f"gate{layer}")
        post[mlp.up_proj] = keep(f"up{layer}")
    return pre, post


def _batch_gradients(
    model: nn.Module, batch: Batch, layers: list[int], position: str, units: bool, ids: Sequence, slots: int = 1
) -> dict[str, torch.Tensor]:
    """Forward once with the graph cut at the earliest layer, then one autograd.grad for every recorded site."""
    sites: dict[str, torch.Tensor] = {}

    def keep(name: str, cut: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(h: torch.Tensor) -> torch.Tensor:
            sites[name] = _leaf(h) if cut else h
            return sites[name]

        return fn

    edits = {layer: keep(f"h{layer}", cut=(layer == min(layers) and not units)) for layer in layers}
    pre, post = _unit_hooks(model, layers, keep) if units else ({}, {})
    with torch.enable_grad(), edit_block_outputs(model, edits), edit_module_io(pre, post):
        loss = target_loss(model, batch)
        grads = dict(zip(sites, torch.autograd.grad(loss.sum(), list(sites.values()))))
    _check_finite(ids, loss.detach(), list(grads.values()))

    def at_position(source: dict[str, torch.Tensor], kind: str, reduce: str) -> torch.Tensor:
        picked = [_select(source[f"{kind}{layer}"].detach(), batch, position, reduce, slots) for layer in layers]
        return torch.stack(picked)

    out = {"loss": loss.detach(), "grads": at_position(grads, "h", "sum"), "acts": at_position(sites, "h", "mean")}
    if units:
        out["unit_grads"] = at_position(grads, "u", "sum")
        out["unit_acts"] = at_position(sites, "u", "mean")
        out["unit_input_grad_sq"] = at_position(grads, "gate", "sum") ** 2 + at_position(grads, "up", "sum") ** 2
    return out


def activation_gradients(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    layers: int | Sequence[int],
    position: str = "last",
    batch_size: int = 32,
    ids: Sequence | None = None,
    *,
    padding_side: str = "left",
    units: bool = False,
    progress: bool = True,
    slots: int = 4,
) -> ActivationGradients:
    """Gradient of each item's summed target NLL w.r.t. the output of each block in `layers` (float32, (L, N, d)).

    `targets` are continuation strings (use `scoring.target_text(answer)`). position="last": at the last prompt
    token; "target": summed over the positions that predict target tokens; "each": (L, N, slots, d), the gradient
    at each of the first `slots` target-predicting positions (the last repeated for shorter targets; with
    units=False only). units=True also returns the MLP
    hidden units of those blocks (values, gradients, and the squared gradient at each unit's two input projections).
    """
    if position not in POSITIONS:
        raise GradsenseError(f"position must be one of {POSITIONS}, not {position!r}")
    if position == "each" and (units or not isinstance(slots, int) or slots < 1):
        raise GradsenseError(f"position 'each' needs slots ≥ 1 and units=False, got slots={slots!r}, units={units}")
    layers = [check_layer(model, layer) for layer in ([layers] if isinstance(layers, int) else layers)]
    if not layers or len(set(layers)) != len(layers):
        raise GradsenseError(f"layers must be distinct block indices, got {layers}")
    if len(prompts) != len(targets):
        raise GradsenseError(f"{len(prompts)} prompts but {len(targets)} targets")
    ids = list(ids) if ids is not None else list(range(len(prompts)))
    if len(ids) != len(prompts):
        raise GradsenseError(f"{len(prompts)} prompts but {len(ids)} ids")
    if len(prompts) == 0:
        raise GradsenseError("no prompts given")
    device, parts = model_device(model), []
    groups = length_batches(tokenizer, prompts, targets, ids, batch_size)
    for rows in tqdm(groups, desc="activation gradients", disable=not progress):
        names = pick_rows(ids, rows)
        batch = encode(tokenizer, pick_rows(prompts, rows), pick_rows(targets, rows), padding_side, names).to(device)
        out = _batch_gradients(model, batch, layers, position, units, names, slots)
        out["n_target_tokens"] = batch.target_positions.sum(1)
        parts.append({k: v.float().cpu() for k, v in out.items()})
    order = np.argsort(np.concatenate(groups), kind="stable")  # back to the caller's row order

    def joined(key: str, axis: int) -> np.ndarray:
        return torch.cat([p[key] for p in parts], dim=axis).numpy().astype(np.float32).take(order, axis=axis)

    extra = {k: joined(k, 1) for k in ("unit_acts", "unit_grads", "unit_input_grad_sq")} if units else {}
    return ActivationGradients(
        grads=joined("grads", 1),
        acts=joined("acts", 1),
        loss=joined("loss", 0),
        layers=layers,
        ids=ids,
        position=position,
        n_target_tokens=joined("n_target_tokens", 0).astype(np.int64),
        **extra,
    )


def correction_gradients(
    model: nn.Module,
    tokenizer,
    table: pd.DataFrame,
    layers: Sequence[int],
    position: str = "last",
    batch_size: int = 32,
    units: bool = False,
    progress: bool = True,
    slots: int = 4,
) -> ActivationGradients:
    """Activation gradients of a corrections table (columns id, prompt, target): one row per table row, in order."""
    missing = [c for c in ("id", "prompt", "target") if c not in table.columns]
    if missing:
        raise GradsenseError(f"corrections table lacks columns {missing}")
    return activation_gradients(
        model,
        tokenizer,
        table["prompt"].tolist(),
        [target_text(a) for a in table["target"]],
        layers,
        position,
        batch_size,
        ids=table["id"].tolist(),
        units=units,
        progress=progress,
        slots=slots,
    )


def slot_gradients(
    model: nn.Module,
    tokenizer,
    table: pd.DataFrame,
    source: int,
    digits: int | None = None,
    last_slots: int = 4,
    slots: int = 6,
    batch_size: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """(N, last_slots + slots − 1, d) gradients for a `read="each"` describer, from one backward pass: the last
    prompt position's at block `source` in `last_slots` slots, then target positions 2 … `slots` at block `digits`."""
    if last_slots < 1 or slots < 2:
        raise GradsenseError(f"slot gradients need last_slots ≥ 1 and slots ≥ 2, got {last_slots} and {slots}")
    layers = [source] if digits in (None, source) else [source, digits]
    grads = correction_gradients(model, tokenizer, table, layers, "each", batch_size, progress=progress, slots=slots)
    first, later = grads.grads[0], grads.grads[-1]
    return np.concatenate([np.repeat(first[:, :1], last_slots, axis=1), later[:, 1:]], axis=1)


def save_gradients(path: str | Path, result: ActivationGradients, steering: np.ndarray) -> Path:
    """Write grads, acts, steering, loss, layers, ids (and position, n_target_tokens) as one .npz, atomically."""
    if steering.shape != result.grads.shape:
        raise GradsenseError(f"steering {steering.shape} and gradients {result.grads.shape} differ in shape")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            grads=result.grads,
            acts=result.acts,
            steering=steering.astype(np.float32),
            loss=result.loss,
            layers=np.asarray(result.layers, dtype=np.int64),
            ids=np.asarray([str(i) for i in result.ids]),
            position=np.asarray(result.position),
            n_target_tokens=result.n_target_tokens,
        )
    return Path(path)


def load_gradients(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays written by `save_gradients` (ids as str, layers as a list of int)."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"gradients file {path} is missing (run the gradients stage)")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["layers"] = [int(x) for x in arrays["layers"]]
    arrays["ids"] = arrays["ids"].astype(str)
    return arrays


def balanced_subset(table: pd.DataFrame, max_items: int | None) -> pd.DataFrame:
    """At most about `max_items` rows: the first facts of every domain (whole facts, all their directions), the
    table's order kept; None = the whole table."""
    if max_items is None or max_items >= len(table):
        return table.reset_index(drop=True)
    n_facts = table["fact_id"].nunique()
    per_domain = max(1, int(max_items // (len(table) / n_facts * table["domain"].nunique())))
    return stratified(table, "domain", per_group=per_domain, unit="fact_id").reset_index(drop=True)
