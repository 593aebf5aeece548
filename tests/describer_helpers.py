"""Small describers on the tiny Llama, shared by the describer's test files (prompt, describer, decoding, …)."""

import numpy as np
import torch

from gradsense.describer import Describer, DescriberConfig, new_projector

from tiny_model import tiny_llama

D = 64  # the tiny Llama's width
LABELS = [f"domain: {d} | from: a | to: b{i}. A push." for i, d in enumerate(["history", "biology", "sport"] * 4)]


def config(**kw) -> DescriberConfig:
    """Layer 1 → layer 1, two slots, a small MLP width; `kw` overrides."""
    return DescriberConfig(**{"source_layer": 1, "inject_layer": 1, "k": 2, "mlp_hidden": 16, **kw})


def grads(n: int = 12, seed: int = 0) -> np.ndarray:
    """Seeded Gaussian stand-ins for (n, D) gradients."""
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def describer(model, tok, **kw) -> Describer:
    """A describer with a seeded, untrained projector."""
    torch.manual_seed(0)
    cfg = config(**kw)
    return Describer(model, tok, new_projector(D, cfg), cfg)


def talkative_llama(seed: int = 3):
    """A tiny Llama with larger weights, so that greedy tokens depend on the input (the default init babbles one
    token)."""
    model, tok = tiny_llama(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model, tok
