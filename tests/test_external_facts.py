"""The external evaluation sets in sources/facts/ (evaluation-only, never read by training): format, no overlap with the
training tables (templates, subjects, context passages), and the promised sizes per domain."""

import re
from pathlib import Path

import pandas as pd
import pytest

from gradsense.corrections import read_fact_table

FACTS = Path(__file__).resolve().parents[1] / "sources" / "facts"
TRAINING_TABLES = ("counterfact.csv", "history.csv", "biology.csv")
EXTERNAL_TABLES = ("external_dataset.csv", "external_phrasings.csv")
TRAINED_DOMAINS = {
    "geography",
    "history",
    "biology",
    "language",
    "occupation",
    "sport",
    "music",
    "company",
    "television",
}
OTHER_DOMAINS = ("language", "occupation", "sport", "music", "company", "television")
TRIVIAL = {"a", "an", "the", "of", "s", "is", "was"}


def table(name: str) -> pd.DataFrame:
    return read_fact_table(FACTS / name)


def training() -> pd.DataFrame:
    return pd.concat([table(name) for name in TRAINING_TABLES], ignore_index=True)


def skeleton(template: str) -> tuple[str, ...]:
    """A template without case, punctuation, articles, possessive 's and is/was: two templates that differ only by
    such words have the same skeleton."""
    return tuple(t for t in re.findall(r"\{\}|[a-z0-9]+", template.lower()) if t not in TRIVIAL)


@pytest.fixture(scope="module")
def train():
    return training()


@pytest.fixture(scope="module")
def dataset():
    return table("external_dataset.csv")


@pytest.fixture(scope="module")
def phrasings():
    return table("external_phrasings.csv")


@pytest.fixture(scope="module")
def passages():
    return pd.read_csv(FACTS / "external_passages.csv", dtype=str, keep_default_na=False)


@pytest.mark.parametrize("name", EXTERNAL_TABLES)
def test_external_templates_are_new(name, train):
    external = set(table(name)["relation"])
    trained = set(train["relation"])
    assert not external & trained
    trained_skeletons = {skeleton(t): t for t in trained}
    near = {t: trained_skeletons[skeleton(t)] for t in external if skeleton(t) in trained_skeletons}
    assert not near, f"templates that differ from a training template only by trivial words: {near}"


@pytest.mark.parametrize("name", EXTERNAL_TABLES)
def test_external_subjects_are_not_training_subjects(name, train):
    trained = set(train["subject"].str.casefold())
    shared = sorted(s for s in table(name)["subject"] if s.casefold() in trained)
    assert not shared


@pytest.mark.parametrize("name", EXTERNAL_TABLES)
def test_external_domains_are_trained_domains(name):
    assert set(table(name)["domain"]) <= TRAINED_DOMAINS | {"religion"}


def test_dataset_size_and_answers(dataset):
    assert 150 <= len(dataset) <= 300
    assert set(dataset["domain"]) <= TRAINED_DOMAINS
    for column in ("right", "wrong"):
        assert (dataset[column].str.split().str.len() <= 4).all(), column
    assert dataset.groupby("relation").size().min() >= 20


def test_phrasings_minimum_counts(phrasings):
    counts = phrasings["domain"].value_counts()
    for domain in ("history", "biology", "geography"):
        assert counts.get(domain, 0) >= 40, domain
    assert sum(counts.get(d, 0) for d in OTHER_DOMAINS) >= 20
    for domain in OTHER_DOMAINS:
        assert counts.get(domain, 0) >= 5, domain


def test_phrasings_history_years_are_digits(phrasings):
    history = phrasings[phrasings["domain"] == "history"]
    years = history[history["relation"].str.contains("year")]
    assert len(years) >= 20
    for column in ("right", "wrong"):
        assert years[column].str.fullmatch(r"\d{3,4}").all(), column


def test_passages_format_and_counts(passages):
    assert list(passages.columns) == ["id", "domain", "text"]
    assert passages["id"].is_unique
    assert (passages["text"].str.strip() != "").all()
    assert set(passages["domain"]) == TRAINED_DOMAINS
    assert (passages["domain"].value_counts() == 10).all()
    assert all(i.startswith(f"ext-{d}-") for i, d in zip(passages["id"], passages["domain"]))
    sentences = passages["text"].str.count(r"[.!?](?:\s|$)")
    assert sentences.between(1, 3).all()


def sentences_of(text: str) -> set[str]:
    return {s.strip().casefold() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()}


def test_passages_are_unseen(passages):
    contexts = pd.read_csv(FACTS / "contexts.csv", dtype=str, keep_default_na=False)
    seen_texts = {t.strip().casefold() for t in contexts["text"]}
    seen_sentences = set().union(*(sentences_of(t) for t in contexts["text"]))
    for text in passages["text"]:
        assert text.strip().casefold() not in seen_texts
        assert not sentences_of(text) & seen_sentences, text


def test_passages_do_not_state_external_facts(passages):
    facts = pd.concat([table(name) for name in EXTERNAL_TABLES], ignore_index=True)

    def mentions(text: str, phrase: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE) is not None

    stated = [
        (text, fact.subject, fact.right)
        for text in passages["text"]
        for fact in facts.itertuples()
        if mentions(text, fact.subject) and mentions(text, fact.right)
    ]
    assert not stated
