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


def test_headline_table_puts_the_describer_beside_its_baselines():
    from gradsense.paper import HEADLINE_COLUMNS, headline_table

    ci = {"low": 0.1, "high": 0.9, "n": 10}
    heldout = pd.DataFrame(
        [
            {"set": "test subjects", "control": "gradient", "metric": "answer recall", "estimate": 0.6, **ci},
            {"set": "test subjects", "control": "none", "metric": "answer recall", "estimate": 0.0, **ci},
            {"set": "test subjects", "control": "noise", "metric": "answer recall", "estimate": 0.0, **ci},
            {
                "set": "test subjects: answer never trained",
                "control": "gradient",
                "metric": "answer recall",
                "estimate": 0.2,
                **ci,
            },
            {"set": "test subjects", "control": "gradient", "metric": "head parsed", "estimate": 1.0, **ci},
        ]
    )
    baselines = pd.DataFrame(
        [
            {"set": "test subjects", "baseline": "describer", "metric": "answer recall", "estimate": 0.6, **ci},
            {"set": "test subjects", "baseline": "Backward Lens", "metric": "answer recall", "estimate": 0.3, **ci},
        ]
    )
    decoupling = pd.DataFrame([{"pairs": "all pairs", "metric": "success (reports B)", "estimate": 0.9, **ci}])
    roundtrip = pd.DataFrame([{"set": "test subjects", "gradient of": "described 'to'", "mean cosine": 0.5, **ci}])
    table = headline_table(heldout, decoupling, baselines, roundtrip)
    assert list(table.columns) == HEADLINE_COLUMNS
    reading = table[table["part"] == "reading"]
    assert reading["who"].tolist() == ["describer", "no injection", "Backward Lens"]  # noise and splits left out
    assert reading["estimate"].tolist() == [0.6, 0.0, 0.3]
    assert table.set_index("part").loc["round trip", "metric"] == "cosine with: described 'to'"
    assert table.set_index("part").loc["decoupling", "set"] == "all pairs"
    with pytest.raises(GradsenseError, match="roundtrip table is empty"):
        headline_table(heldout, decoupling, baselines, roundtrip.iloc[:0])
    # rows without a CI method were resampled row by row: each row is its own unit
    assert set(table["ci"]) == {"percentile bootstrap over rows"} and (table["n_clusters"] == table["n"]).all()


def test_methods_table_names_split_unit_seeds_and_method_of_every_number():
    from gradsense.paper import METHODS_COLUMNS, methods_table, split_of

    row = {"estimate": 0.5, "low": 0.4, "high": 0.6, "n": 30, "n_clusters": 10, "ci": "percentile cluster bootstrap"}
    headline = pd.DataFrame(
        [
            {"part": "reading", "set": "held-out templates", "metric": "answer recall", "who": "describer", **row},
            {"part": "decoupling", "set": "all pairs", "metric": "success (reports B)", "who": "describer", **row},
        ]
    )
    long = pd.DataFrame(
        [
            {"group": "main result", "condition": "pooled", "metric": "answer recall", "seeds": 3, **row},
            {"group": "controls", "condition": "noise", "metric": "decoupling leakage", "seeds": None, **row},
        ]
    )
    folds = pd.DataFrame([{"fold": "music", "metric": "answer recall", **row}])
    table = methods_table(headline, long, folds)
    assert list(table.columns) == METHODS_COLUMNS and len(table) == 5
    assert table["unit"].tolist() == ["items", "passages", "items", "passages", "items"]
    assert table["seeds"].tolist() == [1, 1, 3, 1, 1]
    assert table.loc[0, "split"] == split_of("held-out templates") and "test split" in table.loc[0, "split"]
    with pytest.raises(GradsenseError, match="no split is known"):
        split_of("somewhere else")


def test_headline_metrics_are_flat_numbers_keyed_for_dvc():
    from gradsense.paper import headline_metrics

    row = {"low": 0.5, "high": 0.7, "n": 10}
    long = pd.DataFrame(
        [
            {"group": "main result", "condition": "pooled", "metric": "answer recall", "estimate": 0.6, **row},
            {"group": "controls", "condition": "noise", "metric": "answer recall", "estimate": 0.0, **row},
            {"group": "ablation", "condition": "MLP projector", "metric": "answer recall", "estimate": 0.4, **row},
            {"group": "ablation", "condition": "MLP projector", "metric": "decoupling leakage", "estimate": 0.1, **row},
        ]
    )
    folds = pd.DataFrame([{"fold": "mean over folds", "metric": "domain forced choice", "estimate": 0.1, **row}])
    headline = pd.DataFrame(
        [
            {
                "part": "reading",
                "set": "test subjects",
                "metric": "'from' recall",
                "who": "describer",
                "estimate": 0.25,
            },
            {"part": "reading", "set": "test subjects", "metric": "x", "who": "no injection", "estimate": 0.0},
        ]
    )
    got = headline_metrics(long, folds, headline)
    assert got["main_result"] == {"answer_recall": {"estimate": 0.6, "low": 0.5, "high": 0.7}}
    assert got["heldout_domain_folds"]["domain_forced_choice"]["estimate"] == 0.1
    assert got["sets_seed0"] == {"test_subjects": {"from_recall": 0.25}}
    assert got["ablations"] == {"mlp_projector": {"answer_recall": 0.4}}
    with pytest.raises(GradsenseError, match="no main-result rows"):
        headline_metrics(long.iloc[1:], folds, headline)
