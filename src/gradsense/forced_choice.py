"""Forced choice: does the describer, under an item's injection, find the item's own label likelier than others'?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gradsense.describer import Describer
from gradsense.errors import GradsenseError
from gradsense.scoring import batches
from gradsense.stats import rate_rows

TOP_1 = "forced choice top-1"


def choice_sets(
    labels: Sequence[str], pool: Sequence[str] | None = None, n_choices: int = 10, seed: int = 0
) -> list[list[str]]:
    """Per item: its own label first, then `n_choices − 1` distinct labels from `pool` (default: the items' labels)
    that differ from it, drawn in a seeded order; too few distinct labels is an error."""
    labels = list(labels)
    pool = list(dict.fromkeys(labels if pool is None else pool))  # distinct, first-seen order
    rng = np.random.default_rng(seed)
    sets = []
    for own in labels:
        others = [pool[j] for j in rng.permutation(len(pool)) if pool[j] != own][: n_choices - 1]
        if len(others) < n_choices - 1:
            raise GradsenseError(
                f"forced choice needs {n_choices - 1} other distinct labels, only {len(others)} available"
            )
        sets.append([own, *others])
    return sets


def choice_ranks(scores: np.ndarray) -> np.ndarray:
    """Per row of (items, choices) scores whose column 0 is the item's own label: how many others score at least as
    high (0 = the own label wins; ties count against it)."""
    scores = np.asarray(scores)
    return (scores[:, 1:] >= scores[:, :1]).sum(1)


def forced_choice(
    describer: Describer,
    grads: np.ndarray,
    labels: Sequence[str],
    pool: Sequence[str] | None = None,
    n_choices: int = 10,
    control: str = "gradient",
    seed: int = 0,
    batch_size: int = 16,
    max_label_tokens: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Per item: the rank (0 = best) of its own label among `n_choices` candidates (its own + others from `pool`),
    by the mean per-token log-likelihood under the item's injection (no context); `correct` = rank 0 (chance
    1/n_choices). Ties count against the item's own label."""
    sets = choice_sets(labels, pool, n_choices, seed)
    grads_t = torch.as_tensor(np.asarray(grads), dtype=torch.float32)
    rows_item = np.repeat(np.arange(len(sets)), n_choices)
    texts = [text for choice in sets for text in choice]
    scores = np.zeros(len(texts))
    rng = np.random.default_rng(seed)
    for part in tqdm(list(batches(len(texts), batch_size)), desc=f"forced choice ({control})", disable=not progress):
        with torch.no_grad():
            vectors = describer.vectors(grads_t[torch.as_tensor(rows_item[part])], control, rng)
        scores[part] = describer.label_logprobs(vectors, [None] * len(texts[part]), texts[part], max_label_tokens)
    scores = scores.reshape(len(sets), n_choices)
    rank = choice_ranks(scores)
    return pd.DataFrame(
        {"rank": rank, "correct": rank == 0, "score_own": scores[:, 0], "score_best_other": scores[:, 1:].max(1)}
    )


def forced_choice_rows(
    forced: Mapping[str, pd.DataFrame], n_boot: int = 1000, seed: int = 0, set_name: str = "test subjects"
) -> list[dict]:
    """Held-out table rows: the top-1 rate with its bootstrap CI per control (`forced` maps control → result)."""
    return [
        row
        for control, frame in forced.items()
        for row in rate_rows({TOP_1: frame["correct"]}, n_boot, seed, set=set_name, control=control)
    ]
