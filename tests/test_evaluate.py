"""Evaluation of the describer: sets, per-item scores, forced choice, decoupling, rates (tiny Llama)."""

import numpy as np
import pandas as pd
import pytest
import torch

from gradsense import evaluate as ev
from gradsense.errors import GradsenseError
from gradsense.projector import Describer, DescriberConfig, Projector

D = 64


@pytest.fixture(scope="module")
def describer(tiny):
    torch.manual_seed(0)
    model, tok = tiny
    config = DescriberConfig(source_layer=1, inject_layer=1, k=2)
    return Describer(model, tok, Projector(D, 2, "linear", "norm"), config)


def items(n_per_domain: int = 4) -> pd.DataFrame:
    """A small corrections-like table with a `row` column into a gradient array."""
    rows = []
    for d, domain in enumerate(["biology", "history", "sport"]):
        for i in range(n_per_domain):
            rows.append(
                {
                    "id": f"{domain}-{i}",
                    "domain": domain,
                    "target": f"{1066 + i}" if domain == "history" else f"t{d}{i}",
                    "direction": "correct",
                    "split": ["train", "val", "test", "test"][i % 4],
                    "template_split": ["train", "heldout"][i % 2],
                    "label": f"domain: {domain} | from: a | to: t{d}{i}",
                }
            )
    return pd.DataFrame(rows).assign(row=lambda t: np.arange(len(t)))


def grads(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)


def test_answer_identification(tiny):
    _, tok = tiny
    assert ev.answer_identified("Paris, France", "paris") and not ev.answer_identified(None, "Paris")
    assert not ev.answer_identified("Lyon", "Paris")
    assert ev.token_identified("1", "1066", tok)  # the labels name the first visible token of a year
    assert ev.token_identified("1066", "1066", tok) and not ev.token_identified("2", "1066", tok)


def test_score_descriptions(tiny):
    _, tok = tiny
    table = items(1)
    described = pd.DataFrame(
        {
            "description": ["x"] * 3,
            "domain": ["biology", "none", None],
            "from": [None] * 3,
            "to": ["t00", "<none>", None],
        }
    )
    scored = ev.score_descriptions(described, table, tok)
    assert scored["domain_ok"].tolist() == [True, False, False]
    assert scored["answer_ok"].tolist() == [True, False, False]
    assert scored["pressure"].tolist() == [True, False, False] and scored["parsed"].tolist() == [True, True, False]
    assert scored["teacher_to_ok"].tolist() == [True, False, False]
    with pytest.raises(GradsenseError, match="descriptions for"):
        ev.score_descriptions(described.head(2), table, tok)


def test_evaluation_sets_are_disjoint_and_capped():
    table = items(8)
    sets = ev.evaluation_sets(table, "sport", None)
    test, templates, domain = (table.iloc[sets[k]] for k in ("test subjects", "held-out templates", "held-out domain"))
    assert (
        (test["split"] == "test").all()
        and (test["template_split"] == "train").all()
        and "sport" not in set(test["domain"])
    )
    assert (templates["template_split"] == "heldout").all() and (domain["domain"] == "sport").all() and len(domain) == 8
    assert not set(test["id"]) & set(templates["id"])
    capped = ev.evaluation_sets(table, "sport", 3, seed=1)["held-out domain"]
    assert len(capped) == 3 and list(capped) == sorted(capped)
    assert ev.stratified(table, 3)["domain"].nunique() == 3  # round-robin over domains


def test_choice_sets():
    labels = [f"label {i}" for i in range(12)]
    sets = ev.choice_sets(labels[:3], labels, n_choices=10, seed=0)
    assert [s[0] for s in sets] == labels[:3]
    assert all(len(set(s)) == 10 for s in sets)
    assert sets == ev.choice_sets(labels[:3], labels, n_choices=10, seed=0)
    with pytest.raises(GradsenseError, match="distinct"):
        ev.choice_sets(labels[:3], labels[:5], n_choices=10)


def test_forced_choice_ranks_match_the_label_likelihoods(describer):
    labels = [f"domain: d{i} | from: a | to: b{i}" for i in range(6)]
    result = ev.forced_choice(describer, grads(3), labels[:3], labels, n_choices=4, seed=0)
    assert result["rank"].between(0, 3).all() and (result["correct"] == (result["rank"] == 0)).all()
    own = describer.label_logprobs(describer.projector(torch.as_tensor(grads(3))), [None] * 3, labels[:3])
    np.testing.assert_allclose(result["score_own"], own, rtol=1e-5)
    none = ev.forced_choice(describer, grads(3), labels[:3], labels, n_choices=4, control="none")
    assert len(none) == 3


def test_describe_items_scores_the_injected_item(describer):
    table = items(2)
    prompts = [f"Fact {i}." for i in range(len(table))]
    scored = ev.describe_items(describer, grads(len(table)), table, "shuffle", prompts, max_new_tokens=3, seed=2)
    assert (scored["id"] != scored["source_id"]).all() and len(scored) == len(table)
    by_id = table.set_index("id")
    assert (scored["domain"].to_numpy() == by_id.loc[scored["source_id"], "domain"].to_numpy()).all()
    assert (scored["read_domain"].to_numpy() == table["domain"].to_numpy()).all()
    rates = ev.heldout_table({("test", "shuffle"): scored, ("test", "gradient"): scored.assign(control="gradient")}, 50)
    assert set(rates["metric"]) == set(ev.METRICS) | {"names the read item's domain"}
    assert rates["estimate"].between(0, 1).all()
    differ = (scored["domain"] != scored["read_domain"]).sum()
    assert rates.query("metric == \"names the read item's domain\"")["n"].tolist() == [differ]


def test_decoupling_over_all_pairs(describer, tiny):
    _, tok = tiny
    table = items(2)
    passages = pd.DataFrame(
        {"domain": ["biology", "history", "sport", "music"], "text": ["cell.", "war.", "goal.", "song."]}
    )
    plan = ev.decoupling_plan(table, passages, per_pair=2, seed=0)
    assert len(plan) == 3 * 3 * 2 and (plan["gradient_domain"] != plan["context_domain"]).all()
    result = ev.decoupling(describer, grads(len(table)), plan, table, tok, max_new_tokens=3)
    reported = result["reported_domain"].fillna("")
    assert (result["success"] == (reported == result["gradient_domain"])).all()
    assert (result["leakage"] == (reported == result["context_domain"])).all()
    matrix = ev.decoupling_matrix(result)
    assert matrix.shape == (4, 3) and np.isnan(matrix.loc["biology", "biology"])
    only = ev.decoupling_plan(table, passages, per_pair=1, domains=["biology", "history"])
    assert sorted(zip(only["context_domain"], only["gradient_domain"])) == [
        ("biology", "history"),
        ("history", "biology"),
    ]


def test_confusion_rows_are_distributions():
    table = ev.confusion(["a", "a", "b"], ["a", "none", "zzz"], ["a", "b"])
    assert list(table.columns) == ["a", "b", "none", "other"]
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    assert table.loc["b", "other"] == 1.0


def test_replay_plan_and_core_evaluation(describer, tiny):
    """A stored decoupling plan replays onto the same items by id; the core evaluation scores test items and pairs
    under a control; its rates carry CIs; shuffle is refused for decoupling."""
    _, tok = tiny
    table = items(2)
    passages = pd.DataFrame({"domain": ["biology", "history", "sport"], "text": ["cell.", "war.", "goal."]})
    plan = ev.decoupling_plan(table, passages, per_pair=2, seed=0)
    stored = ev.decoupling(describer, grads(len(table)), plan, table, tok, max_new_tokens=0)
    replayed = ev.replay_plan(stored, table.iloc[::-1].reset_index(drop=True))
    assert replayed[["row", "gradient_domain", "context_domain", "context"]].equals(
        plan[["row", "gradient_domain", "context_domain", "context"]]
    )
    one = ev.replay_plan(stored, table, per_pair=1)
    assert len(one) == 6 and not one.duplicated(["context_domain", "gradient_domain"]).any()
    with pytest.raises(GradsenseError, match="without a gradient"):
        ev.replay_plan(stored, table.iloc[1:])
    test = table.iloc[:3]
    scored, decoupled = ev.core_evaluation(describer, grads(len(table)), table, test, one, "none")
    assert len(scored) == 3 and len(decoupled) == 6 and set(scored["control"]) == {"none"}
    rates = pd.DataFrame(ev.core_rates(scored, decoupled, n_boot=50, condition="x", group="g"))
    assert list(rates["metric"]) == [*ev.CORE_TEST, *ev.CORE_DECOUPLING]
    assert rates.loc[rates["metric"] == "decoupling success", "estimate"].iloc[0] == decoupled["success"].mean()
    assert (rates["low"] <= rates["estimate"]).all() and (rates["estimate"] <= rates["high"]).all()
    with pytest.raises(GradsenseError, match="decoupling control"):
        ev.decoupling(describer, grads(len(table)), one, table, tok, control="shuffle")


def test_main_table_is_wide_with_na_for_missing_metrics():
    rows = ev.rate_rows({"domain accuracy": [1, 0], "decoupling success": [1, 1]}, 20, condition="a", group="g")
    rows += ev.rate_rows({"answer token in 'to'": [0, 0, 1]}, 20, condition="lens", group="controls")
    table = ev.main_table(pd.DataFrame(rows))
    assert list(table["condition"]) == ["a", "lens"]
    assert table.loc[0, "domain accuracy"].startswith("0.50 [") and table.loc[1, "domain accuracy"] == "n/a"
    assert list(table.columns) == ["group", "condition", "domain accuracy", "answer token in 'to'", "decoupling success"]


def test_text_only_passage_states_the_fact_after_labelled_examples():
    train = items(3).assign(prompt=lambda t: "Fact about " + t["id"] + " is")
    examples = ev.text_examples(train, per_domain=1, seed=0)
    assert sorted(examples["domain"]) == ["biology", "history", "sport"]
    assert examples.equals(ev.text_examples(train, per_domain=1, seed=0))
    passage = ev.text_only_passage(examples, "The capital of France is", " Paris")
    lines = passage.splitlines()
    assert lines[-1] == "Fact: The capital of France is Paris" and len(lines) == 1 + 2 * 3 + 1
    assert all(line.startswith("Pressure: domain: ") for line in lines[2:-1:2])
