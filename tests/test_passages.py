"""Training passages: the pool of neutral text and fact statements, and each item's hard negatives."""

import pandas as pd
import pytest

from gradsense.errors import GradsenseError
from gradsense.passages import fact_statement, hard_negatives, passage_pool, training_passages


def items() -> pd.DataFrame:
    """Two relations; the capital facts appear in both directions (counterfactual target = the wrong answer)."""
    rows = [
        ("f1", "The capital of {} is", "The capital of France is", "Paris", "Paris", "geography"),
        ("f1", "The capital of {} is", "The capital of France is", "Paris", "Lyon", "geography"),
        ("f2", "The capital of {} is", "The capital of Spain is", "Madrid", "Madrid", "geography"),
        ("f3", "The capital of {} is", "The capital of Peru is", "Lima", "Lima", "geography"),
        ("f4", "{} took place in the year", "Hastings took place in the year", "1066", "1066", "history"),
    ]
    return pd.DataFrame(rows, columns=["fact_id", "relation", "prompt", "right", "target", "domain"])


def test_a_fact_statement_is_one_sentence():
    assert fact_statement("The capital of France is ", " Paris") == "The capital of France is Paris."


def test_pool_holds_the_neutral_text_and_every_fact_once():
    pool = passage_pool(["A kettle boiled."], items(), per_passage=2, seed=0)
    assert pool[0] == "A kettle boiled." and len(pool) == 1 + 2  # 4 facts, 2 per passage
    facts = " ".join(pool[1:])
    for statement in ("The capital of France is Paris.", "Hastings took place in the year 1066."):
        assert facts.count(statement) == 1
    with pytest.raises(GradsenseError, match="per_passage"):
        passage_pool([], items(), per_passage=0)


def test_hard_negatives_state_another_answer_of_the_same_relation():
    negatives = hard_negatives(items(), per_item=8, seed=0)
    assert sorted(negatives[0]) == ["The capital of Peru is Lima.", "The capital of Spain is Madrid."]
    assert sorted(negatives[1]) == sorted(negatives[0])  # never the item's own fact, whatever its target
    assert negatives[4] == []  # the only fact of its relation
    assert len(hard_negatives(items(), per_item=1, seed=0)[0]) == 1
    # A fact whose answer is the item's target is no negative: Madrid pushed onto France.
    pushed = items().assign(target=["Madrid"] * 5)
    assert hard_negatives(pushed)[0] == ["The capital of Peru is Lima."]
    pool, per_item = training_passages(["n"], items())
    assert pool[0] == "n" and per_item == negatives
