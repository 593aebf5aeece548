"""The paper's headline numbers, from small result tables."""

import pandas as pd
import pytest

from gradsense import paper
from gradsense.errors import GradsenseError


def test_fact_answer_shares():
    answers = pd.DataFrame(
        {"right_beats_wrong": [True, True, False, True], "greedy_right": [False, True, False, False]}
    )
    assert paper.fact_answer_shares(answers) == {"right_beats_wrong": 0.75, "greedy_right": 0.25}
    with pytest.raises(GradsenseError, match="empty"):
        paper.fact_answer_shares(answers.iloc[:0])


def test_prefers_right_share_reads_only_correct_rows():
    corrections = pd.DataFrame(
        {"direction": ["correct", "counterfactual", "correct"], "model_prefers_target": [True, False, False]}
    )
    assert paper.prefers_right_share(corrections) == 0.5
    with pytest.raises(GradsenseError, match="'correct' rows"):
        paper.prefers_right_share(corrections.iloc[1:2])


def test_best_gradient_probe_ignores_other_features():
    probe = pd.DataFrame(
        {"features": ["gradient", "activation", "gradient"], "accuracy": [0.6, 0.9, 0.7], "layer": [7, 15, 22]}
    )
    assert paper.best_gradient_probe(probe)["layer"] == 22
    with pytest.raises(GradsenseError, match="gradient features"):
        paper.best_gradient_probe(probe.iloc[1:2])
