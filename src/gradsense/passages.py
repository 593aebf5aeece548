"""Training passages: what the describer reads before its question while it learns.

The pool mixes neutral text with statements of training-split facts of every trained domain (so a passage about
another domain's facts is familiar and must be ignored), and each item gets hard negatives: statements of other
facts of its own relation with a different answer ("The capital of Spain is Madrid." while the gradient pushes
towards Paris). Evaluation passages (`contexts.csv`'s domain pool, the external sets' passages) are never in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from gradsense.errors import GradsenseError
from gradsense.teacher import normalize_answer


def fact_statement(prompt: str, answer: str) -> str:
    """A fact as one sentence: the prompt, the answer and a full stop."""
    return f"{str(prompt).rstrip()} {str(answer).strip()}."


def fact_statements(items: pd.DataFrame) -> pd.DataFrame:
    """One true statement per fact (prompt + right answer), with its fact_id, relation and domain."""
    facts = items.drop_duplicates("fact_id").sort_values("fact_id", kind="stable")
    return pd.DataFrame(
        {
            "fact_id": facts["fact_id"].to_numpy(),
            "relation": facts["relation"].to_numpy(),
            "domain": facts["domain"].to_numpy(),
            "right": facts["right"].to_numpy(),
            "text": [fact_statement(p, r) for p, r in zip(facts["prompt"], facts["right"])],
        }
    )


def passage_pool(neutral: Sequence[str], items: pd.DataFrame, per_passage: int = 2, seed: int = 0) -> list[str]:
    """Neutral passages plus passages of `per_passage` fact statements each (the facts of `items`, shuffled with
    `seed`, so one passage may mix domains)."""
    if per_passage < 1:
        raise GradsenseError(f"per_passage must be ≥ 1, not {per_passage}")
    texts = fact_statements(items)["text"].to_numpy()
    order = np.random.default_rng(seed).permutation(len(texts))
    grouped = [" ".join(texts[order[i : i + per_passage]]) for i in range(0, len(order), per_passage)]
    return [str(t) for t in neutral] + grouped


def hard_negatives(items: pd.DataFrame, per_item: int = 8, seed: int = 0) -> list[list[str]]:
    """Per item: up to `per_item` statements of other facts of its relation whose answer is not the item's target
    (seeded choice), from the facts of `items`."""
    statements = fact_statements(items)
    rng = np.random.default_rng(seed)
    by_relation = {rel: frame for rel, frame in statements.groupby("relation", sort=True)}
    out = []
    for fact_id, relation, target in zip(items["fact_id"], items["relation"], items["target"]):
        pool = by_relation.get(relation)
        if pool is None:
            out.append([])
            continue
        keep = (pool["fact_id"] != fact_id) & (pool["right"].map(normalize_answer) != normalize_answer(target))
        texts = pool.loc[keep, "text"].tolist()
        if len(texts) > per_item:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), per_item, replace=False))]
        out.append(texts)
    return out


def training_passages(
    neutral: Sequence[str], train_items: pd.DataFrame, seed: int = 0
) -> tuple[list[str], list[list[str]]]:
    """What a describer reads while it trains: the passage pool (`passage_pool`) and each item's hard negatives
    (`hard_negatives`), both from the training items' facts."""
    return passage_pool(neutral, train_items, seed=seed), hard_negatives(train_items, seed=seed)
