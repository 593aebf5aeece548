"""Baselines for the describer's `to` answer and an open-vocabulary faithfulness measure (the round trip).

Baselines: the most frequent training answer of the item's relation template, the Backward Lens hit@1 (the top
token of −g read through the final norm and unembedding), and a same-template partner (another item of the same
template with a different answer) for shuffle controls. Round trip: the activation gradient that a described
answer implies, −log p(answer | prompt) at the same layer and position, against the gradient the model was under.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import nn

from gradsense.analysis import lens_ranks, model_lens, row_cosine
from gradsense.errors import GradsenseError
from gradsense.gradients import activation_gradients
from gradsense.scoring import first_visible_id, target_text
from gradsense.teacher import normalize_answer


def _require(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    """Raise naming the columns `frame` lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise GradsenseError(f"{name} table lacks columns {missing}")


def _present(answer: object) -> bool:
    """Whether an answer is a string with something other than whitespace (None, NaN, "" and "  " are absent)."""
    return isinstance(answer, str) and bool(answer.strip())


def majority_answers(train: pd.DataFrame, items: pd.DataFrame) -> list[str | None]:
    """Per item: the most frequent training `target` of its `relation` (ties: the first by normalized answer, then
    by the raw string); None when the relation has no training rows."""
    _require(train, ("relation", "target"), "training")
    _require(items, ("relation",), "items")
    best: dict[str, str] = {}
    for relation, targets in train.groupby("relation", sort=False)["target"]:
        counts = Counter(t for t in targets if isinstance(t, str))
        if counts:
            best[relation] = min(counts, key=lambda t: (-counts[t], normalize_answer(t), t))
    return [best.get(relation) for relation in items["relation"]]


def same_template_partners(items: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """(N,) position of another row with the same `relation` and a different normalized `target`, drawn with a
    seeded numpy generator; -1 where there is none."""
    _require(items, ("relation", "target"), "items")
    relations = items["relation"].to_numpy()
    answers = np.asarray([normalize_answer(t) for t in items["target"]], dtype=object)
    rng = np.random.default_rng(seed)
    partners = np.full(len(items), -1, dtype=np.int64)
    for i in range(len(items)):
        candidates = np.flatnonzero((relations == relations[i]) & (answers != answers[i]))
        if len(candidates):
            partners[i] = int(rng.choice(candidates))
    return partners


def lens_hits(model: nn.Module, tokenizer, grads: np.ndarray, targets: Sequence[str]) -> np.ndarray:
    """(N,) bool Backward Lens hit@1: the top token of −g (final norm, then unembedding) is the target's first
    visible token; `grads` is (N, d) at one layer."""
    grads = np.asarray(grads)
    if grads.ndim != 2 or len(grads) != len(targets):
        raise GradsenseError(f"lens_hits needs (N, d) gradients for {len(targets)} targets, got {grads.shape}")
    if len(targets) == 0:
        return np.zeros(0, dtype=bool)
    tokens = np.asarray([first_visible_id(tokenizer, t) for t in targets], dtype=np.int64)
    return lens_ranks(-grads, tokens[:, None], *model_lens(model))[:, 0] == 0


def roundtrip_cosines(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str | None],
    true_grads: np.ndarray,
    layer: int,
    batch_size: int = 32,
    position: str = "last",
) -> np.ndarray:
    """(N,) cosine of true_grads[i] with the gradient of −log p(answers[i] | prompts[i]) at the same layer and
    position (one batched call); NaN where the answer is None, NaN or blank."""
    true_grads = np.asarray(true_grads)
    if true_grads.ndim != 2 or len(true_grads) != len(prompts):
        raise GradsenseError(
            f"true_grads must be ({len(prompts)}, d) for {len(prompts)} prompts, not {true_grads.shape}"
        )
    if len(answers) != len(prompts):
        raise GradsenseError(f"{len(prompts)} prompts but {len(answers)} answers")
    cos = np.full(len(prompts), np.nan)
    rows = np.asarray([i for i, answer in enumerate(answers) if _present(answer)], dtype=np.int64)
    if len(rows) == 0:
        return cos
    implied = activation_gradients(
        model,
        tokenizer,
        [prompts[i] for i in rows],
        [target_text(answers[i]) for i in rows],
        [layer],
        position,
        batch_size,
        progress=False,
    ).grads[0]
    if implied.shape[1] != true_grads.shape[1]:
        raise GradsenseError(f"true_grads have width {true_grads.shape[1]} but layer {layer} has {implied.shape[1]}")
    cos[rows] = row_cosine(implied, true_grads[rows])
    return cos


def paired_roundtrip(
    model: nn.Module,
    tokenizer,
    items: pd.DataFrame,
    described_to: Sequence[str | None],
    true_grads: np.ndarray,
    layer: int,
    seed: int = 0,
    batch_size: int = 32,
    position: str = "last",
) -> pd.DataFrame:
    """Per item (columns id, cos_described, cos_partner, cos_target): the round-trip cosine of its true gradient
    with the gradient of the described answer, of a same-template partner's target (NaN without a partner) and of
    its own target (the ceiling: 1 when the true gradient was computed the same way)."""
    _require(items, ("id", "prompt", "target", "relation"), "items")
    n = len(items)
    if len(described_to) != n:
        raise GradsenseError(f"{n} items but {len(described_to)} described answers")
    true_grads = np.asarray(true_grads)
    if len(true_grads) != n:
        raise GradsenseError(f"{n} items but {len(true_grads)} true gradient rows")
    targets = items["target"].tolist()
    partners = same_template_partners(items, seed)
    partner_answers = [targets[p] if p >= 0 else None for p in partners]
    prompts = items["prompt"].tolist()
    cos = roundtrip_cosines(
        model,
        tokenizer,
        prompts * 3,
        list(described_to) + partner_answers + targets,
        np.concatenate([true_grads] * 3),
        layer,
        batch_size,
        position,
    )
    return pd.DataFrame(
        {
            "id": items["id"].tolist(),
            "cos_described": cos[:n],
            "cos_partner": cos[n : 2 * n],
            "cos_target": cos[2 * n :],
        }
    )
