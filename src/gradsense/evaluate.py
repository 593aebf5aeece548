"""The held-out evaluation: which items are scored, and how one report of the describer is scored against its item."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradsense.describer import Describer
from gradsense.errors import GradsenseError
from gradsense.sampling import stratified
from gradsense.stats import rate_rows
from gradsense.teacher import NO_DOMAIN, normalize_answer, parse_label

TEST_SUBJECTS = "test subjects"  # new subjects on trained templates and domains: the main result's items
HELDOUT_TEMPLATES = "held-out templates"
HELDOUT_DOMAIN = "held-out domain"
READ_DOMAIN = "names the read item's domain"  # the shuffle control: the report follows the prompt, not the gradient

ANSWER_RECALL = "answer recall"  # the whole target (normalised) in `to`: the headline metric
# The held-out table's metrics: name → column of a scored frame (`score_descriptions`).
METRICS = {
    "domain accuracy": "domain_ok",
    ANSWER_RECALL: "answer_ok",
    "answer exact": "answer_exact",
    "'from' recall": "from_ok",
    "names a domain": "pressure",
    "head parsed": "parsed",
}


# --------------------------------------------------------------------------------------------- evaluation sets


def evaluation_sets(
    corrections: pd.DataFrame, heldout_domain: str | None, max_items: int | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Row positions (into `corrections`) of each held-out set, each capped at `max_items` (seeded, round-robin over
    domains: `gradsense.sampling.stratified`): `test subjects` (test split, trained templates and domains),
    `held-out templates` (test split, the held-out template of each domain), `held-out domain` (every item of the
    domain left out of training)."""
    c = corrections.reset_index(drop=True)
    trained = c["domain"] != heldout_domain
    sets = {
        TEST_SUBJECTS: (c["split"] == "test") & (c["template_split"] == "train") & trained,
        HELDOUT_TEMPLATES: (c["split"] == "test") & (c["template_split"] == "heldout") & trained,
    }
    if heldout_domain is not None:
        sets[HELDOUT_DOMAIN] = ~trained
    return {
        name: stratified(c[mask], "domain", max_items, order="shuffle", seed=seed).index.to_numpy()
        for name, mask in sets.items()
    }


def select_items(items: pd.DataFrame, ids: Sequence[str] | pd.Series) -> pd.DataFrame:
    """The rows of `items` with these ids, in the order of `ids` (an unknown id is an error)."""
    missing = sorted(set(ids) - set(items["id"]))
    if missing:
        raise GradsenseError(f"{len(missing)} ids are not among the items (first: {missing[0]})")
    return items.set_index("id").loc[list(ids)].reset_index()


def main_test_rows(descriptions: pd.DataFrame) -> pd.DataFrame:
    """The evaluate stage's scored test-subject items under the gradient (its `descriptions` table's main rows)."""
    return descriptions.query(f"set == '{TEST_SUBJECTS}' and control == 'gradient'")


# --------------------------------------------------------------------------------------------- per-item scores


def answer_identified(to: str | None, answer: str) -> bool:
    """Answer recall: the whole answer, normalised (case, spaces, punctuation: `teacher.normalize_answer`), appears in
    the parsed `to` as whole words ("1789" is not recalled by "1" or "17890")."""
    want = normalize_answer(answer)
    return bool(want) and f" {want} " in f" {normalize_answer(to)} "


def answer_exact(to: str | None, answer: str) -> bool:
    """Exact match: `to` is the answer, up to case, spaces and punctuation."""
    want = normalize_answer(answer)
    return bool(want) and normalize_answer(to) == want


def label_from(label: str | None) -> str | None:
    """The `from` of a teacher label (None without a label)."""
    return parse_label(label)["from"] if isinstance(label, str) else None


def from_identified(reported: str | None, source: str, label: str | None = None) -> bool:
    """'from' recall: the reported `from` is the item's source or the `from` of its label (the model's answer now),
    up to case, spaces and punctuation."""
    got = normalize_answer(reported)
    return bool(got) and got in {normalize_answer(source), normalize_answer(label_from(label))} - {""}


def score_descriptions(
    described: pd.DataFrame, items: pd.DataFrame, tokenizer: Any, domains: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per row (aligned with `items`): domain_ok, answer_ok (answer recall: the whole target in `to`,
    `answer_identified`), answer_exact, from_ok ('from' recall, `from_identified`), pressure (one of `domains` is
    named — with None, any domain but NO_DOMAIN: a false positive under the no-injection and noise controls), parsed
    (a head was found)."""
    if len(described) != len(items):
        raise GradsenseError(f"{len(described)} descriptions for {len(items)} items")
    items = items.reset_index(drop=True)
    described = described.reset_index(drop=True)
    labels = items["label"] if "label" in items else [None] * len(items)
    return pd.DataFrame(
        {
            "id": items["id"],
            "domain": items["domain"],
            "target": items["target"],
            "description": described["description"],
            "reported_domain": described["domain"],
            "reported_from": described["from"],
            "reported_to": described["to"],
            "parsed": described["domain"].notna(),
            "domain_ok": described["domain"].fillna("").to_numpy() == items["domain"].to_numpy(),
            "answer_ok": [answer_identified(t, a) for t, a in zip(described["to"], items["target"])],
            "answer_exact": [answer_exact(t, a) for t, a in zip(described["to"], items["target"])],
            "from_ok": [
                from_identified(f, src, label) for f, src, label in zip(described["from"], items["source"], labels)
            ],
            "pressure": described["domain"].isin(list(domains)).to_numpy()
            if domains is not None
            else described["domain"].notna().to_numpy() & (described["domain"].fillna("").to_numpy() != NO_DOMAIN),
        }
    )


def describe_items(
    describer: Describer,
    grads: np.ndarray,
    items: pd.DataFrame,
    control: str = "gradient",
    contexts: Sequence[str | None] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    progress: bool = False,
    domains: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Describe `items` (with a `row` column into `grads`) under a control and score each description against the
    item whose gradient was injected (for "shuffle": another item); `id` names the item read, `source_id` the
    injected one, `read_domain_ok` = the report names the read item's domain (with `contexts` = each item's own
    prompt, the shuffle control asks whether the report follows the prompt it reads or the gradient it feels;
    `domains`: the domains whose naming counts as feeling a pressure, see `score_descriptions`)."""
    items = items.reset_index(drop=True)
    described = describer.describe_gradients(
        np.asarray(grads)[items["row"].to_numpy()], contexts, control, seed, batch_size, max_new_tokens, progress
    )
    injected = items.iloc[described["source_row"].to_numpy()].reset_index(drop=True)
    scored = score_descriptions(described, injected, describer.tokenizer, domains)
    return scored.assign(
        id=items["id"].to_numpy(),
        source_id=injected["id"].to_numpy(),
        control=control,
        direction=injected["direction"].to_numpy(),
        read_domain=items["domain"].to_numpy(),
        read_domain_ok=scored["reported_domain"].fillna("").to_numpy() == items["domain"].to_numpy(),
    )


# --------------------------------------------------------------------------------------------- tables


def read_domain_values(shuffled: pd.DataFrame) -> np.ndarray:
    """`read_domain_ok` of a shuffle-control frame on the rows where the read and the injected item's domains differ."""
    differ = shuffled["domain"].to_numpy() != shuffled["read_domain"].to_numpy()
    return shuffled["read_domain_ok"].to_numpy()[differ]


def heldout_table(scored: Mapping[tuple[str, str], pd.DataFrame], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Rates with bootstrap CIs per (evaluation set, control): every metric of `METRICS` (+ READ_DOMAIN under
    "shuffle"). On the no-injection and noise controls "names a domain" is the false-positive rate."""
    rows = []
    for (name, control), frame in scored.items():
        values = {metric: frame[column].to_numpy() for metric, column in METRICS.items()}
        if control == "shuffle":
            values[READ_DOMAIN] = read_domain_values(frame)
        rows += rate_rows(values, n_boot, seed, set=name, control=control)
    return pd.DataFrame(rows)


def descriptions_table(scored: Mapping[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """Every scored frame stacked, with its evaluation set in a `set` column (the control is already a column)."""
    return pd.concat([frame.assign(set=name) for (name, _), frame in scored.items()], ignore_index=True)


def confusion(true: Sequence[str], reported: Sequence[str | None], domains: Sequence[str]) -> pd.DataFrame:
    """Row-normalised confusion: true domain (rows) × reported domain (columns: `domains`, NO_DOMAIN, "other")."""
    columns = list(domains) + [NO_DOMAIN, "other"]
    known = set(domains) | {NO_DOMAIN}
    rep = [r if r in known else "other" for r in reported]
    table = pd.crosstab(
        pd.Categorical(list(true), categories=list(domains)), pd.Categorical(rep, categories=columns), dropna=False
    )
    table.index.name, table.columns.name = "true domain", "reported domain"
    return table.div(table.sum(axis=1).replace(0, np.nan), axis=0)


def seen_answers(targets: Sequence[str], trained: Sequence[str]) -> np.ndarray:
    """Per target: whether it (normalised) is among the answers the describer was trained to say."""
    known = {normalize_answer(t) for t in trained}
    return np.array([normalize_answer(t) in known for t in targets], dtype=bool)


def rates_by(
    frame: pd.DataFrame, by: Sequence[str], metrics: Mapping[str, str], n_boot: int = 1000, seed: int = 0, **keys
) -> pd.DataFrame:
    """Rates with bootstrap CIs (items resampled) of `metrics` (name → column) per group of `by` columns."""
    rows = []
    for group, part in frame.groupby(list(by), sort=True):
        group = group if isinstance(group, tuple) else (group,)
        values = {m: part[c].to_numpy() for m, c in metrics.items()}
        rows += rate_rows(values, n_boot, seed, **keys, **dict(zip(by, group)))
    return pd.DataFrame(rows)
