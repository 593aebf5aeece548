"""The corrections table: fact-table quality, splits (subject, template, domain), directions, determinism, bad
input, and the model-belief columns (tiny model; one small integration test on SmolLM2)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradsense.corrections import (
    COLUMNS,
    FACT_COLUMNS,
    belief_by_domain,
    build_corrections,
    corrections_facts,
    corrections_table,
    fact_margins,
    heldout_domain_masks,
    heldout_templates,
    load_corrections,
    load_facts,
    read_fact_table,
    record_belief,
    sample_facts,
    save_corrections,
    summarize,
    template_counts,
)
from gradsense.errors import GradsenseError

from tiny_model import CharTokenizer

SOURCES = Path(__file__).resolve().parents[1] / "sources" / "facts"


@pytest.fixture(scope="module")
def facts() -> pd.DataFrame:
    """Every fact table from sources/facts (no data/ needed)."""
    return load_facts(SOURCES)


@pytest.fixture(scope="module")
def table(facts) -> pd.DataFrame:
    """A corrections table without belief columns, 40 facts per domain."""
    return build_corrections(facts, per_domain=40, seed=0)


def small_facts() -> pd.DataFrame:
    """Four hand-written facts over two domains, for the model tests."""
    rows = [
        ("The capital of {} is", "France", "Paris", "London", "geography"),
        ("The capital of {} is", "Japan", "Tokyo", "Beijing", "geography"),
        ("{} took place in the year", "The Battle of Hastings", "1066", "1067", "history"),
        ("{} is produced by the", "Insulin", "pancreas", "liver", "biology"),
    ]
    facts = pd.DataFrame(rows, columns=FACT_COLUMNS)
    return facts.assign(fact_id=[f"t-{i:04d}" for i in range(len(facts))])


# --- the fact tables -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["history.csv", "biology.csv"])
def test_curated_tables_are_clean(name):
    raw = pd.read_csv(SOURCES / name, dtype=str, keep_default_na=False)
    assert list(raw.columns) == FACT_COLUMNS
    assert len(raw) >= 150
    assert raw["relation"].nunique() >= 4  # several templates, so a held-out template exists
    assert (raw[FACT_COLUMNS].apply(lambda c: c.str.strip() != "")).all().all()
    assert (raw["right"] != raw["wrong"]).all()
    assert not raw.duplicated(["relation", "subject"]).any()
    assert raw["relation"].str.count(r"\{\}").eq(1).all()
    assert (raw["domain"] == name.removesuffix(".csv")).all()
    # Answers are stored without surrounding spaces and templates without trailing ones.
    assert not raw["right"].str.match(r"^\s|.*\s$").any() and not raw["relation"].str.endswith(" ").any()


def test_counterfact_domains_follow_the_committed_template_map():
    vendored = read_fact_table(SOURCES / "counterfact.csv")
    mapping = pd.read_csv(SOURCES / "counterfact_domains.csv", dtype=str, keep_default_na=False)
    assert not mapping["relation"].duplicated().any()
    joined = vendored.merge(mapping, on="relation", how="left", suffixes=("", "_map"))
    assert joined["domain_map"].notna().all() and (joined["domain"] == joined["domain_map"]).all()
    assert vendored["domain"].nunique() >= 6
    assert vendored.groupby("domain").size().max() <= 400


def test_load_facts_gives_stable_ids(facts):
    assert facts["fact_id"].is_unique
    assert {"history", "biology"} <= set(facts["domain"])
    assert facts["fact_id"].str.fullmatch(r"[a-z_]+-\d{4}").all()
    assert load_facts(SOURCES)["fact_id"].equals(facts["fact_id"])


# --- splits and directions ------------------------------------------------------------------------------------


def test_no_subject_in_two_splits(table):
    per_subject = table.groupby(table["subject"].str.casefold())["split"].nunique()
    assert (per_subject == 1).all()
    for domain, group in table.drop_duplicates("fact_id").groupby("domain"):
        shares = group["split"].value_counts(normalize=True)
        assert set(shares.index) == {"train", "val", "test"}, domain
        assert 0.5 <= shares["train"] <= 0.85, (domain, shares)


def test_subject_shared_across_domains_stays_in_one_split():
    facts = pd.DataFrame(
        [
            ("The capital of {} is", "Kenya", "Nairobi", "Mombasa", "geography"),
            ("The first president of {} was", "Kenya", "Jomo Kenyatta", "Daniel arap Moi", "history"),
        ]
        + [("The capital of {} is", f"Country{i}", "A", "B", "geography") for i in range(8)]
        + [("The first president of {} was", f"Country{i}x", "A", "B", "history") for i in range(8)],
        columns=FACT_COLUMNS,
    ).assign(fact_id=lambda f: [f"f-{i:04d}" for i in range(len(f))])
    table = build_corrections(facts)
    assert table.loc[table["subject"] == "Kenya", "split"].nunique() == 1


def test_one_heldout_template_per_domain(table, facts):
    facts40 = table.drop_duplicates("fact_id")
    held = heldout_templates(facts40)
    multi = {d for d, g in facts40.groupby("domain") if g["relation"].nunique() >= 2}
    assert set(held) == multi
    heldout_rows = table[table["template_split"] == "heldout"]
    assert (heldout_rows.groupby("domain")["relation"].nunique() == 1).all()
    assert all(held[d] == r for d, r in zip(heldout_rows["domain"], heldout_rows["relation"]))
    assert set(table["template_split"]) == {"train", "heldout"}


def test_single_template_domain_holds_nothing_out():
    facts = small_facts()
    table = build_corrections(facts[facts["domain"] != "geography"])
    assert (table["template_split"] == "train").all()


def test_heldout_domain_masks(table):
    train, test = heldout_domain_masks(table, "biology")
    assert test.sum() == (table["domain"] == "biology").sum() > 0
    assert not (train & test).any() and (train | test).all()
    assert set(table.loc[train, "domain"]) == set(table["domain"]) - {"biology"}
    with pytest.raises(GradsenseError, match="astrology"):
        heldout_domain_masks(table, "astrology")


def test_both_directions(table):
    assert table["id"].is_unique
    assert (table.groupby("fact_id")["direction"].nunique() == 2).all()
    correct, counter = table[table["direction"] == "correct"], table[table["direction"] == "counterfactual"]
    assert (correct["target"] == correct["right"]).all() and (correct["source"] == correct["wrong"]).all()
    assert (counter["target"] == counter["wrong"]).all() and (counter["source"] == counter["right"]).all()
    assert (table["id"] == table["fact_id"] + "-" + table["direction"]).all()
    only = build_corrections(small_facts(), directions=["counterfactual"])
    assert set(only["direction"]) == {"counterfactual"} and len(only) == 4


def test_prompts_fill_the_template(table):
    row = table.iloc[0]
    assert row["prompt"] == row["relation"].replace("{}", row["subject"])
    assert not table["prompt"].str.endswith(" ").any()


def test_sampling_is_capped_and_balanced_over_templates(facts):
    sampled = sample_facts(facts, per_domain=20, seed=3)
    assert (sampled.groupby("domain").size() == 20).all()
    for domain, group in sampled.groupby("domain"):
        available = facts[facts["domain"] == domain].groupby("relation").size()
        counts = group.groupby("relation").size().reindex(available.index, fill_value=0)
        # Round-robin: templates that did not run out differ by at most one fact.
        unexhausted = counts[available >= counts.max()]
        assert unexhausted.max() - unexhausted.min() <= 1, (domain, counts)


def test_same_seed_same_table(facts):
    first = build_corrections(facts, per_domain=25, seed=7)
    again = build_corrections(facts.sample(frac=1, random_state=1), per_domain=25, seed=7)  # row order is irrelevant
    pd.testing.assert_frame_equal(first, again)
    other = build_corrections(facts, per_domain=25, seed=8)
    assert not first["fact_id"].equals(other["fact_id"]) or not first["split"].equals(other["split"])


# --- bad input ------------------------------------------------------------------------------------------------


def test_empty_prompt_names_the_item(tiny):
    model, tokenizer = tiny
    table = build_corrections(small_facts())
    table.loc[2, "prompt"] = "  "
    with pytest.raises(GradsenseError, match=table.loc[2, "id"]):
        record_belief(table, model, tokenizer)


@pytest.mark.parametrize("answer", ["", "   "])
def test_empty_answer_names_the_item(tiny, answer):
    model, tokenizer = tiny
    table = build_corrections(small_facts())
    table.loc[5, "wrong"] = answer
    with pytest.raises(GradsenseError, match=table.loc[5, "id"]):
        record_belief(table, model, tokenizer)


def test_answer_that_tokenizes_to_nothing_names_the_item(tiny):
    model, tokenizer = tiny

    class Silent:
        """A tokenizer that drops every target (as a vocabulary without those symbols would)."""

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1, 2] if add_special_tokens else []}

    table = build_corrections(small_facts())
    with pytest.raises(GradsenseError, match=f"{table.loc[0, 'id']}.*tokenizes to nothing"):
        record_belief(table, model, Silent())


def test_bad_fact_tables(tmp_path):
    def write(rows):
        path = tmp_path / "bad.csv"
        pd.DataFrame(rows, columns=FACT_COLUMNS).to_csv(path, index=False)
        return path

    with pytest.raises(GradsenseError, match="bad.csv line 3: empty subject"):
        read_fact_table(write([("{} is", "a", "b", "c", "d"), ("{} is", "", "b", "c", "d")]))
    with pytest.raises(GradsenseError, match="exactly one"):
        read_fact_table(write([("is", "a", "b", "c", "d")]))
    with pytest.raises(GradsenseError, match="right and wrong"):
        read_fact_table(write([("{} is", "a", "b", "b", "d")]))
    with pytest.raises(GradsenseError, match="appears twice"):
        read_fact_table(write([("{} is", "a", "b", "c", "d"), ("{} is", "a", "x", "y", "d")]))
    (tmp_path / "cols.csv").write_text("relation,subject\n{} is,a\n")
    with pytest.raises(GradsenseError, match="lacks columns"):
        read_fact_table(tmp_path / "cols.csv")
    with pytest.raises(GradsenseError, match="missing"):
        read_fact_table(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fractions": {"train": 0.8, "val": 0.1}}, "fractions"),
        ({"fractions": {"train": 0.8, "val": 0.3, "test": 0.1}}, "sum to 1"),
        ({"directions": []}, "directions"),
        ({"directions": ["sideways"]}, "directions"),
        ({"per_domain": 0}, "per_domain"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(GradsenseError, match=match):
        build_corrections(small_facts(), **kwargs)


def test_save_is_atomic_and_checks_the_contract(tmp_path, tiny):
    model, tokenizer = tiny
    table = corrections_table(model, tokenizer, small_facts())
    path = save_corrections(table, tmp_path / "c" / "corrections.csv")
    assert sorted(p.name for p in path.parent.iterdir()) == ["corrections.csv"]  # no temp file left behind
    back = load_corrections(path)
    assert list(back.columns) == COLUMNS and back["right"].tolist() == table["right"].tolist()
    assert back["greedy_target"].dtype == bool
    np.testing.assert_allclose(back["logp_target"], table["logp_target"], rtol=1e-5)
    with pytest.raises(GradsenseError, match="contract"):
        save_corrections(table.drop(columns="split"), tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


# --- the model's belief -----------------------------------------------------------------------------------------


def fake_scores(model, tokenizer, prompts, targets, batch_size=32):
    """A stand-in for `score_targets`: log p = −(length of the continuation), greedy only for " Paris"."""
    return {
        "logp": np.array([-float(len(t)) for t in targets]),
        "greedy": np.array([t == " Paris" for t in targets]),
        "n_tokens": np.array([len(t) for t in targets]),
    }


def test_belief_columns_follow_the_direction(monkeypatch):
    monkeypatch.setattr("gradsense.corrections.score_targets", fake_scores)
    table = record_belief(build_corrections(small_facts()), None, CharTokenizer(), batch_size=1)
    rows = table.set_index("id")
    # France: right " Paris" (6 characters), wrong " London" (7). correct: target Paris; counterfactual: target London.
    france_correct, france_counter = rows.loc["t-0000-correct"], rows.loc["t-0000-counterfactual"]
    assert (france_correct["logp_target"], france_correct["logp_source"]) == (-6.0, -7.0)
    assert (france_counter["logp_target"], france_counter["logp_source"]) == (-7.0, -6.0)
    assert france_correct["model_prefers_target"] and not france_counter["model_prefers_target"]
    assert france_correct["greedy_target"] and not france_counter["greedy_target"]
    # Hastings: " 1066" and " 1067" tie at −5: neither answer is preferred in either direction.
    hastings = rows.loc[["t-0002-correct", "t-0002-counterfactual"]]
    assert (hastings["logp_target"] == -5.0).all() and not hastings["model_prefers_target"].any()
    # Insulin, scored in length order and put back in place: right " pancreas" (−9), wrong " liver" (−6).
    assert (
        rows.loc["t-0003-correct", "logp_target"] == -9.0 and rows.loc["t-0003-counterfactual", "logp_target"] == -6.0
    )


def belief_table() -> pd.DataFrame:
    """Three facts with known log-probabilities (margin = log p(right) − log p(wrong): +2, −1, +3)."""
    rows = [
        # fact, domain, split, direction, logp_target, logp_source, greedy_target
        ("g1", "geo", "train", "correct", -1.0, -3.0, True),
        ("g1", "geo", "train", "counterfactual", -3.0, -1.0, False),
        ("g2", "geo", "test", "correct", -2.0, -1.0, False),
        ("g2", "geo", "test", "counterfactual", -1.0, -2.0, True),
        ("h1", "hist", "train", "counterfactual", -4.0, -1.0, False),  # one direction only, right = source
    ]
    table = pd.DataFrame(
        rows, columns=["fact_id", "domain", "split", "direction", "logp_target", "logp_source", "greedy_target"]
    )
    return table.assign(relation="{} r", template_split="train")


def test_summary_counts_and_belief_by_hand():
    summary = summarize(belief_table()).set_index(["domain", "split"])
    assert summary.loc[("geo", "train"), ["n_facts", "n_rows"]].tolist() == [1, 2]
    assert summary.loc[("geo", "train"), "prefers_right"] == 1.0 and summary.loc[("geo", "train"), "median_margin"] == 2
    assert summary.loc[("geo", "test"), "prefers_right"] == 0.0 and summary.loc[("geo", "test"), "median_margin"] == -1
    assert summary.loc[("geo", "train"), "greedy_right"] == 1.0 and summary.loc[("geo", "test"), "greedy_right"] == 0.0
    assert summary.loc[("hist", "train"), "median_margin"] == 3  # right is the source of a counterfactual row
    by_domain = belief_by_domain(belief_table()).set_index("domain")
    assert by_domain.loc["geo", ["n_facts", "n_rows", "prefers_right", "median_margin"]].tolist() == [2, 4, 0.5, 0.5]


def test_fact_margins_and_key_facts():
    table = belief_table()
    assert fact_margins(table)["margin"].tolist() == [2.0, -1.0, 3.0]
    facts = corrections_facts(table, "hist")
    assert (facts["n_rows"], facts["n_facts"], facts["heldout_domain_rows"]) == (5, 3, 1)
    assert facts["prefers_right"] == pytest.approx(2 / 3) and facts["domains"] == ["geo", "hist"]
    assert facts["heldout_templates"] == {}  # one template per domain: none held out
    with pytest.raises(GradsenseError, match="held-out domain 'bio'"):
        corrections_facts(table, "bio")


def test_template_counts():
    table = build_corrections(small_facts())
    counts = template_counts(table).set_index(["domain", "relation"])["n_facts"]
    assert counts[("geography", "The capital of {} is")] == 2 and counts.sum() == 4


@pytest.mark.integration
def test_smol_prefers_the_right_answer_on_easy_facts(smol):
    model, tokenizer = smol
    table = corrections_table(model, tokenizer, small_facts())
    correct = table[table["direction"] == "correct"].set_index("subject")
    assert correct.loc["France", "model_prefers_target"] and correct.loc["France", "greedy_target"]
    assert correct["model_prefers_target"].mean() >= 0.75, correct[["logp_target", "logp_source"]]


def test_template_kinds_tell_paraphrases_from_new_relations():
    from gradsense.corrections import NEW_RELATION, PARAPHRASE, template_kinds

    facts = pd.DataFrame(
        {
            "domain": ["geo"] * 5 + ["hist"] * 3,
            "relation": ["capital of {}", "capital of {}", "capital city of {}", "capital city of {}", "{} in"]
            + ["{} year", "{} born", "{} born"],
            "right": ["Paris", "Rome", "Rome", "Lima", "Asia", "1066", "1809", "1770"],
            "template_split": ["train", "train", "heldout", "heldout", "train", "train", "heldout", "heldout"],
        }
    )
    # Half of "capital city"'s answers (Rome) are trained answers: a paraphrase; no birth year is an event year.
    assert template_kinds(facts) == {"capital city of {}": PARAPHRASE, "{} born": NEW_RELATION}
    assert template_kinds(facts, min_overlap=0.75)["capital city of {}"] == NEW_RELATION
