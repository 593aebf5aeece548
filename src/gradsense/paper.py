"""The paper's headline numbers, each read from an earlier stage's result table."""

from __future__ import annotations

import pandas as pd

from gradsense.errors import GradsenseError


def fact_answer_shares(answers: pd.DataFrame) -> dict[str, float]:
    """Shares of the model card's probe facts where the right answer beats a wrong one, and where greedy decoding
    says it (`fact_answers` table)."""
    if answers.empty:
        raise GradsenseError("the model card's fact_answers table is empty")
    return {
        "right_beats_wrong": float(answers["right_beats_wrong"].mean()),
        "greedy_right": float(answers["greedy_right"].mean()),
    }


def prefers_right_share(corrections: pd.DataFrame) -> float:
    """Share of facts whose right answer the model already prefers (its belief on the "correct" rows)."""
    correct = corrections.loc[corrections["direction"] == "correct", "model_prefers_target"]
    if correct.empty:
        raise GradsenseError("the corrections table has no 'correct' rows")
    return float(correct.mean())


def best_gradient_probe(probe: pd.DataFrame) -> pd.Series:
    """The domain probe's best row on gradient features (highest accuracy)."""
    rows = probe[probe["features"] == "gradient"]
    if rows.empty:
        raise GradsenseError("the domain probe table has no rows on gradient features")
    return rows.sort_values("accuracy").iloc[-1]
