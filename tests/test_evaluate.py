"""The held-out evaluation, forced choice and decoupling, on tiny synthetic items with hand-computed expectations."""

import numpy as np
import pandas as pd
import pytest
import torch

from gradsense import decoupling as dc
from gradsense import evaluate as ev
from gradsense import forced_choice as fc
from gradsense.errors import GradsenseError
from gradsense.teacher import NO_DOMAIN

DOMAINS = ["biology", "history", "sport"]


def items(n_per_domain: int = 4) -> pd.DataFrame:
    """A small corrections-like table with a `row` column into a gradient array."""
    rows = []
    for d, domain in enumerate(DOMAINS):
        for i in range(n_per_domain):
            rows.append(
                {
                    "id": f"{domain}-{i}",
                    "domain": domain,
                    "target": f"{1066 + i}" if domain == "history" else f"t{d}{i}",
                    "source": f"s{d}{i}",
                    "direction": ["correct", "counterfactual"][i % 2],
                    "split": ["train", "val", "test", "test"][i % 4],
                    "template_split": ["train", "heldout"][i % 2],
                    "prompt": f"Fact {domain} {i} is",
                    "label": f"domain: {domain} | from: a | to: t{d}{i}",
                }
            )
    return pd.DataFrame(rows).assign(row=lambda t: np.arange(len(t)))


def one_hot(table: pd.DataFrame) -> np.ndarray:
    """Gradients that encode their item's domain: a one-hot vector on the domain's index."""
    return np.eye(len(DOMAINS), dtype=np.float32)[[DOMAINS.index(d) for d in table["domain"]]]


class FakeDescriber:
    """A describer stand-in whose report is a fixed rule of the injected vector and the passage read."""

    def __init__(self, tokenizer, reads: str = "gradient"):
        self.tokenizer, self.reads = tokenizer, reads

    def report(self, vector: np.ndarray, context: str | None) -> str:
        if self.reads == "passage":
            return next(d for d in DOMAINS if context and d in context)
        return DOMAINS[int(np.argmax(vector))] if np.abs(vector).sum() else NO_DOMAIN

    def describe_gradients(
        self, grads, contexts=None, control="gradient", seed=0, batch_size=16, max_new_tokens=0, progress=False
    ):
        n = len(grads)
        source = np.roll(np.arange(n), 1) if control == "shuffle" else np.arange(n)
        vectors = np.zeros_like(np.asarray(grads)) if control == "none" else np.asarray(grads)[source]
        contexts = list(contexts) if contexts is not None else [None] * n
        domains = [self.report(v, c) for v, c in zip(vectors, contexts)]
        return pd.DataFrame(
            {
                "description": [f"domain: {d}" for d in domains],
                "domain": domains,
                "from": [None] * n,
                "to": ["t00"] * n,
                "source_row": source,
            }
        )


# --------------------------------------------------------------------------------------------- sets and scores


def test_answer_recall_needs_the_whole_answer():
    assert ev.answer_identified("Paris, France", "paris") and not ev.answer_identified(None, "Paris")
    assert not ev.answer_identified("Lyon", "Paris")
    # A wrong year that shares the first digit (or digits) is not the answer; the right one is, in any spacing.
    assert not ev.answer_identified("1", "1066") and not ev.answer_identified("1067", "1066")
    assert not ev.answer_identified("10660", "1066") and ev.answer_identified(" in 1066.", "1066")
    assert ev.answer_identified("the Bone  Marrow", "bone marrow") and not ev.answer_identified("bone", "bone marrow")
    assert ev.answer_exact("Bone marrow!", "bone marrow") and not ev.answer_exact("red bone marrow", "bone marrow")
    assert not ev.answer_identified("anything", "") and not ev.answer_exact("", "")


def test_from_recall_accepts_the_source_or_the_labels_answer_now():
    label = "domain: history | from: 1799 | to: 1789"
    assert ev.from_identified("1799", "1788", label) and ev.from_identified("1788.", "1788", label)
    assert not ev.from_identified("1789", "1788", label) and not ev.from_identified(None, "1788", label)
    assert ev.from_identified("1788", "1788", None) and not ev.from_identified("", "", None)


def test_score_descriptions(tiny):
    _, tok = tiny
    table = items(1)
    described = pd.DataFrame(
        {
            "description": ["x"] * 3,
            "domain": ["biology", NO_DOMAIN, None],
            "from": ["a", "s10", None],
            "to": ["t00", "<none>", "1"],
        }
    )
    scored = ev.score_descriptions(described, table, tok)
    assert scored["domain_ok"].tolist() == [True, False, False]
    assert scored["answer_ok"].tolist() == [True, False, False]  # "1" is not history-0's 1066
    assert scored["answer_exact"].tolist() == [True, False, False]
    assert scored["from_ok"].tolist() == [True, True, False]  # the label's `from`, the source, nothing
    assert scored["pressure"].tolist() == [True, False, False] and scored["parsed"].tolist() == [True, True, False]
    # With a domain list, only those domains count as feeling a pressure.
    assert ev.score_descriptions(described, table, tok, ["history"])["pressure"].tolist() == [False, False, False]
    with pytest.raises(GradsenseError, match="descriptions for"):
        ev.score_descriptions(described.head(2), table, tok)


def test_evaluation_sets_are_disjoint_and_capped():
    table = items(8)
    sets = ev.evaluation_sets(table, "sport", None)
    test, templates, domain = (table.iloc[sets[k]] for k in (ev.TEST_SUBJECTS, ev.HELDOUT_TEMPLATES, ev.HELDOUT_DOMAIN))
    # Items 2 and 6 of each domain are test split on the trained template (i % 4 == 2, i % 2 == 0).
    assert sorted(test["id"]) == ["biology-2", "biology-6", "history-2", "history-6"]
    assert sorted(templates["id"]) == ["biology-3", "biology-7", "history-3", "history-7"]
    assert len(domain) == 8 and set(domain["domain"]) == {"sport"}
    capped = ev.evaluation_sets(table, "sport", 2, seed=1)[ev.TEST_SUBJECTS]
    assert len(capped) == 2 and set(table.iloc[capped]["domain"]) == {"biology", "history"}  # one per domain
    assert list(capped) == sorted(capped)
    assert ev.HELDOUT_DOMAIN not in ev.evaluation_sets(table, None)


def test_select_items_keeps_the_order_of_the_ids():
    table = items(2)
    assert ev.select_items(table, ["sport-1", "biology-0"])["row"].tolist() == [5, 0]
    with pytest.raises(GradsenseError, match="not among the items"):
        ev.select_items(table, ["nope"])


def test_describe_items_scores_the_injected_item(tiny):
    _, tok = tiny
    table = items(1)  # biology-0, history-0, sport-0; the fake shuffle injects the previous row's gradient
    scored = ev.describe_items(FakeDescriber(tok), one_hot(table), table, "shuffle", table["prompt"].tolist())
    assert scored["source_id"].tolist() == ["sport-0", "biology-0", "history-0"]
    assert scored["domain"].tolist() == ["sport", "biology", "history"]  # scored against the injected item
    assert scored["domain_ok"].all() and not scored["read_domain_ok"].any()  # follows the gradient, not the prompt
    none = ev.describe_items(FakeDescriber(tok), one_hot(table), table, "none")
    assert none["reported_domain"].tolist() == [NO_DOMAIN] * 3 and not none["pressure"].any()


def test_heldout_table_rates_and_the_read_domain_metric(tiny):
    _, tok = tiny
    table = items(1)
    shuffled = ev.describe_items(
        FakeDescriber(tok, "passage"), one_hot(table), table, "shuffle", [f"a {d} passage" for d in table["domain"]]
    )
    rates = ev.heldout_table({("test", "shuffle"): shuffled}, n_boot=20).set_index("metric")
    assert rates.loc["domain accuracy", "estimate"] == 0.0  # it reported the passage's (read) domain every time
    assert rates.loc[ev.READ_DOMAIN, "estimate"] == 1.0 and rates.loc[ev.READ_DOMAIN, "n"] == 3
    same = shuffled.assign(read_domain=shuffled["domain"])  # no pair differs in domain: the metric has no rows
    assert ev.read_domain_values(same).size == 0


def test_confusion_rows_are_distributions():
    table = ev.confusion(["a", "a", "b"], ["a", NO_DOMAIN, "zzz"], ["a", "b"])
    assert list(table.columns) == ["a", "b", NO_DOMAIN, "other"]
    assert table.loc["a"].tolist() == [0.5, 0.0, 0.5, 0.0] and table.loc["b", "other"] == 1.0


# --------------------------------------------------------------------------------------------- forced choice


def test_choice_sets():
    labels = [f"label {i}" for i in range(12)]
    sets = fc.choice_sets(labels[:3], labels, n_choices=10, seed=0)
    assert [s[0] for s in sets] == labels[:3]
    assert all(len(set(s)) == 10 and s[0] not in s[1:] for s in sets)
    with pytest.raises(GradsenseError, match="distinct"):
        fc.choice_sets(labels[:3], labels[:5], n_choices=10)


def test_choice_ranks_count_ties_against_the_own_label():
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]])
    assert fc.choice_ranks(scores).tolist() == [0, 2, 1]


class ScoringDescriber:
    """Scores a label 1 when it names the domain index the injected vector points at, else 0."""

    def vectors(self, grads, control, rng):
        return torch.zeros_like(grads) if control == "none" else grads

    def label_logprobs(self, vectors, contexts, texts, max_label_tokens=None):
        return np.array([float(f"d{int(v.argmax())} " in t and bool(v.abs().sum())) for v, t in zip(vectors, texts)])


def test_forced_choice_picks_the_label_the_injection_supports():
    labels = [f"domain: d{i} | to: x" for i in range(3)] + ["domain: none | to: y"]
    grads = np.eye(3, dtype=np.float32)[[0, 2, 1]]  # items 0 and 2 point at their own label, item 1 at d2
    own = [labels[0], labels[1], labels[1]]
    result = fc.forced_choice(ScoringDescriber(), grads, own, labels, n_choices=3, batch_size=4, seed=0)
    assert result["correct"].tolist() == [True, False, True]
    assert result["score_own"].tolist() == [1.0, 0.0, 1.0]
    # Item 1's own label scores 0; it wins only if neither distractor is d2's label (ties count against it).
    assert result["rank"][1] >= 1
    none = fc.forced_choice(ScoringDescriber(), grads, own, labels, n_choices=3, control="none")
    assert not none["correct"].any()  # every label ties at 0 without an injection
    rows = pd.DataFrame(fc.forced_choice_rows({"gradient": result, "none": none}, n_boot=20))
    assert rows["estimate"].tolist() == [2 / 3, 0.0] and rows["metric"].eq(fc.TOP_1).all()


# --------------------------------------------------------------------------------------------- decoupling


PASSAGES = pd.DataFrame({"domain": DOMAINS + ["music"], "text": [f"a {d} passage" for d in DOMAINS + ["music"]]})


def test_decoupling_plan_covers_every_ordered_pair():
    table = items(2)
    plan = dc.decoupling_plan(table, PASSAGES, per_pair=2, seed=0)
    assert len(plan) == 3 * 3 * 2  # 3 gradient domains × 3 other passage domains × 2 items
    by_row = table.set_index("row")["domain"]
    assert (by_row.loc[plan["row"]].to_numpy() == plan["gradient_domain"].to_numpy()).all()
    assert all(f"a {a} passage" == c for a, c in zip(plan["context_domain"], plan["context"]))
    only = dc.decoupling_plan(table, PASSAGES, per_pair=1, domains=["biology", "history"])
    assert sorted(zip(only["context_domain"], only["gradient_domain"])) == [
        ("biology", "history"),
        ("history", "biology"),
    ]
    with pytest.raises(GradsenseError, match="decoupling needs"):
        dc.decoupling_plan(table, PASSAGES, domains=["chess"])


def test_score_decoupled_success_and_leakage(tiny):
    _, tok = tiny
    table = items(1)
    plan = pd.DataFrame(
        {
            "row": [0, 0, 1],
            "gradient_domain": ["biology", "biology", "history"],
            "context_domain": ["sport", "history", "sport"],
            "context": ["x", "y", "z"],
        }
    )
    described = pd.DataFrame(
        {"description": ["d"] * 3, "domain": ["biology", "history", None], "to": ["t00", "y", "1"]}
    )
    scored = dc.score_decoupled(plan, described, table, tok)
    assert scored["success"].tolist() == [True, False, False]
    assert scored["leakage"].tolist() == [False, True, False]
    assert scored["answer_ok"].tolist() == [True, False, False]
    assert scored["to_from_passage"].tolist() == [False, True, False]  # row 2 said its passage "y"
    assert scored["id"].tolist() == ["biology-0", "biology-0", "history-0"]
    with pytest.raises(GradsenseError, match="decoupling rows"):
        dc.score_decoupled(plan, described.head(2), table, tok)
    # A passage domain the describer was never trained to name cannot leak: NaN, left out of the leakage rate.
    nameable = dc.score_decoupled(plan, described, table, tok, nameable=["biology", "history"])
    assert nameable["leakage"].isna().tolist() == [True, False, True] and nameable["leakage"].iloc[1] == 1
    summary = dc.decoupling_summary({"all": nameable}, n_boot=20).set_index("metric")
    assert summary.loc["leakage (reports A)", ["n", "excluded"]].tolist() == [1, 2]
    assert summary.loc["success (reports B)", ["n", "excluded"]].tolist() == [3, 0]


def test_run_decoupling_tells_a_gradient_reader_from_a_passage_reader(tiny):
    _, tok = tiny
    table = items(1)
    plan = dc.decoupling_plan(table, PASSAGES[PASSAGES["domain"] != "music"], per_pair=1, seed=0)
    follows_gradient = dc.run_decoupling(FakeDescriber(tok), one_hot(table), plan, table, tok)
    follows_passage = dc.run_decoupling(FakeDescriber(tok, "passage"), one_hot(table), plan, table, tok)
    assert follows_gradient["success"].all() and not follows_gradient["leakage"].any()
    assert follows_passage["leakage"].all() and not follows_passage["success"].any()
    matrix = dc.decoupling_matrix(follows_gradient)
    assert np.isnan(np.diag(matrix.to_numpy())).all() and np.nansum(matrix.to_numpy()) == 6  # 6 pairs, all 1
    none = dc.run_decoupling(FakeDescriber(tok), one_hot(table), plan, table, tok, control="none")
    assert not none["success"].any()
    with pytest.raises(GradsenseError, match="decoupling control"):
        dc.run_decoupling(FakeDescriber(tok), one_hot(table), plan, table, tok, control="shuffle")


def test_pair_rates_and_summary():
    results = pd.DataFrame(
        {
            "context_domain": ["a", "a", "b"],
            "gradient_domain": ["b", "b", "a"],
            "success": [True, False, True],
            "leakage": [False, True, False],
            "answer_ok": [True, True, False],
            "to_from_passage": [False, False, True],
        }
    )
    rates = dc.pair_rates(results)
    assert rates.to_dict("records") == [
        {"context_domain": "a", "gradient_domain": "b", "success": 0.5, "leakage": 0.5},
        {"context_domain": "b", "gradient_domain": "a", "success": 1.0, "leakage": 0.0},
    ]
    summary = dc.decoupling_summary({"all": results, "empty": results.iloc[:0]}, n_boot=20)
    assert set(summary["pairs"]) == {"all"} and summary["n"].eq(3).all()
    assert summary.set_index("metric")["estimate"].to_dict() == {
        "success (reports B)": 2 / 3,
        "leakage (reports A)": 1 / 3,
        "answer recall": 2 / 3,
        "'to' from the passage": 1 / 3,
    }


def test_case_plan_and_replay_plan():
    table = items(2)
    case = dc.case_plan(table, PASSAGES, "history", "biology", 2, seed=0)
    assert (
        len(case) == 2 and set(case["gradient_domain"]) == {"history"} and set(case["context"]) == {"a biology passage"}
    )
    assert dc.case_plan(table, PASSAGES, "history", "chess", 2) is None
    plan = dc.decoupling_plan(table, PASSAGES, per_pair=2, seed=0)
    stored = plan.assign(id=table.set_index("row").loc[plan["row"], "id"].to_numpy())
    replayed = dc.replay_plan(stored, table.iloc[::-1].reset_index(drop=True))  # same items in another order
    cols = ["row", "gradient_domain", "context_domain", "context"]
    assert replayed[cols].equals(plan[cols])
    one = dc.replay_plan(stored, table, per_pair=1)
    assert len(one) == 9 and not one.duplicated(["context_domain", "gradient_domain"]).any()
    with pytest.raises(GradsenseError, match="without a gradient"):
        dc.replay_plan(stored, table.iloc[1:])


def test_seen_answers_and_rates_by_group():
    assert ev.seen_answers(["Paris", "1789", "bone marrow"], ["paris.", "Bone Marrow"]).tolist() == [True, False, True]
    frame = pd.DataFrame(
        {"domain": ["a", "a", "b", "b"], "direction": ["x", "y", "x", "x"], "ok": [True, False, True, False]}
    )
    rates = ev.rates_by(frame, ["domain", "direction"], {"recall": "ok"}, n_boot=20, set="s")
    assert rates[["domain", "direction", "estimate", "n"]].values.tolist() == [
        ["a", "x", 1.0, 1],
        ["a", "y", 0.0, 1],
        ["b", "x", 0.5, 2],
    ]
    assert set(rates["set"]) == {"s"} and set(rates["metric"]) == {"recall"}
