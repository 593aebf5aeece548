"""Contrastive steering vectors: the block outputs at the last token of prompt + right minus prompt + wrong.

The activation-space reference the gradient is compared with (the gradients stage's `gradient_steering_cosine`)
and the vector the steering-trained describer reads; one forward per distinct (prompt, continuation), no backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.gradients import length_batches, pick_rows
from gradsense.hooks import edit_block_outputs
from gradsense.models import check_layer, model_device
from gradsense.scoring import encode, target_text


@torch.no_grad()
def final_token_activations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 32,
    ids: Sequence | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(L, N, d) output of each block at the last token of prompt + continuation (tokenised as in teacher forcing)."""
    layers = [check_layer(model, layer) for layer in layers]
    ids = list(ids) if ids is not None else list(range(len(prompts)))
    if not len(prompts) == len(continuations) == len(ids):
        raise GradsenseError(f"{len(prompts)} prompts, {len(continuations)} continuations and {len(ids)} ids")
    device, parts = model_device(model), []
    groups = length_batches(tokenizer, prompts, continuations, ids, batch_size)
    for rows in tqdm(groups, desc="final-token activations", disable=not progress):
        batch = encode(
            tokenizer, pick_rows(prompts, rows), pick_rows(continuations, rows), "left", pick_rows(ids, rows)
        ).to(device)
        last = batch.last_prompt + batch.target_positions.sum(1)
        store: dict[int, torch.Tensor] = {}

        def keep(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def fn(h: torch.Tensor) -> torch.Tensor:
                store[layer] = h[torch.arange(len(h), device=h.device), last]
                return h

            return fn

        with edit_block_outputs(model, {layer: keep(layer) for layer in layers}):
            # Only the blocks are needed: run the body, never the unembedding.
            model.get_decoder()(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        parts.append(torch.stack([store[layer] for layer in layers]).float().cpu())
    if not parts:
        raise GradsenseError("no prompts given")
    order = np.argsort(np.concatenate(groups), kind="stable")
    return torch.cat(parts, dim=1).numpy().astype(np.float32)[:, order]


def steering_vectors(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    rights: Sequence[str],
    wrongs: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 32,
    ids: Sequence | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(L, N, d) contrastive steering vector: output of block ℓ at the last token of prompt+right minus prompt+wrong.

    `rights` / `wrongs` are continuation strings like `targets` (use `scoring.target_text(answer)`).
    """
    if not len(prompts) == len(rights) == len(wrongs):
        raise GradsenseError(f"{len(prompts)} prompts, {len(rights)} rights and {len(wrongs)} wrongs")
    kw = dict(layers=layers, batch_size=batch_size, ids=ids, progress=progress)
    return final_token_activations(model, tokenizer, prompts, rights, **kw) - final_token_activations(
        model, tokenizer, prompts, wrongs, **kw
    )


def correction_steering(
    model: nn.Module, tokenizer, table: pd.DataFrame, layers: Sequence[int], batch_size: int = 32, progress: bool = True
) -> np.ndarray:
    """(L, N, d) steering vector towards each row's target: state after prompt+target minus after prompt+source.

    Each distinct (prompt, continuation) is run once, so a fact asked in both directions costs two passes, not four.
    """
    pairs = pd.concat(
        [
            table[["prompt", "target"]].set_axis(["prompt", "answer"], axis=1),
            table[["prompt", "source"]].set_axis(["prompt", "answer"], axis=1),
        ]
    )
    unique = pairs.drop_duplicates().reset_index(drop=True)  # first-occurrence order: deterministic
    acts = final_token_activations(
        model,
        tokenizer,
        unique["prompt"].tolist(),
        [target_text(a) for a in unique["answer"]],
        layers,
        batch_size,
        progress=progress,
    )
    where = {key: i for i, key in enumerate(zip(unique["prompt"], unique["answer"]))}
    to_target = [where[key] for key in zip(table["prompt"], table["target"])]
    to_source = [where[key] for key in zip(table["prompt"], table["source"])]
    return acts[:, to_target] - acts[:, to_source]
