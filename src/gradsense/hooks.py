"""The one place that registers forward hooks on decoder blocks; every hook is a context manager, so none leaks.

Convention: "layer ℓ" means the *output* of block ℓ (0-based), i.e. HF `hidden_states[ℓ + 1]`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from gradsense.models import blocks, check_layer

Edit = Callable[[torch.Tensor], torch.Tensor]


def _split(output):
    """A block returns a tensor (transformers ≥ 5) or a tuple whose first item is the hidden state."""
    if isinstance(output, tuple):
        return output[0], lambda h: (h, *output[1:])
    return output, lambda h: h


@contextmanager
def edit_block_output(model: nn.Module, layer: int, edit: Edit) -> Iterator[None]:
    """Replace the output hidden state h of block `layer` by `edit(h)` for every forward pass inside the block."""
    block = blocks(model)[check_layer(model, layer)]

    def hook(_module, _inputs, output):
        hidden, rebuild = _split(output)
        return rebuild(edit(hidden))

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def edit_block_outputs(model: nn.Module, edits: dict[int, Edit]) -> Iterator[None]:
    """Several `edit_block_output` hooks at once, removed together."""
    with ExitStack() as stack:
        for layer, edit in edits.items():
            stack.enter_context(edit_block_output(model, layer, edit))
        yield


@contextmanager
def capture(model: nn.Module, layers: Sequence[int], store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record the output hidden state of each block in `layers` into `store[layer]` (no edit)."""

    def recorder(layer: int) -> Edit:
        def record(hidden: torch.Tensor) -> torch.Tensor:
            store[layer] = hidden
            return hidden

        return record

    with edit_block_outputs(
        model, {check_layer(model, layer): recorder(check_layer(model, layer)) for layer in layers}
    ):
        yield


@contextmanager
def inject(
    model: nn.Module, layer: int, positions: torch.Tensor, vectors: torch.Tensor | None, norm_match: bool = False
) -> Iterator[None]:
    """Add `vectors[b, j]` to the output of block `layer` at sequence position `positions[b, j]` of batch row b.

    positions: (batch, k) long; vectors: (batch, k, d), or None to inject nothing (no hook is registered).
    `norm_match` rescales each vector to the norm of the residual it is added to (as Activation Oracles do), so only
    its direction carries information; a zero vector stays zero (a row without injection in a mixed batch).
    Applied only on the full-sequence pass (not cached decode steps), so generation with a KV cache keeps the
    injection in the cache and adds it once.
    """
    if vectors is None:
        yield
        return

    def add(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[1] <= int(positions.max()):
            return hidden  # a cached decoding step: the injected positions are already in the cache
        pos = positions.to(hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(pos)
        vec = vectors.to(hidden.device, hidden.dtype)
        if norm_match:
            scale = hidden[rows, pos].detach().norm(dim=-1, keepdim=True)
            vec = vec / vec.norm(dim=-1, keepdim=True).clamp_min(1e-12) * scale
        delta = torch.zeros_like(hidden)
        delta[rows, pos] = vec
        return hidden + delta

    with edit_block_output(model, layer, add):
        yield


@contextmanager
def edit_module_io(pre: dict[nn.Module, Edit], post: dict[nn.Module, Edit]) -> Iterator[None]:
    """Forward pre-hooks `fn(x) -> x` on a submodule's first input and forward hooks `fn(y) -> y` on its output
    (for MLP internals; block outputs use `edit_block_output`)."""
    with ExitStack() as stack:
        for module, fn in pre.items():
            handle = module.register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]), *args[1:]))
            stack.callback(handle.remove)
        for module, fn in post.items():
            handle = module.register_forward_hook(lambda _m, _args, out, fn=fn: fn(out))
            stack.callback(handle.remove)
        yield
