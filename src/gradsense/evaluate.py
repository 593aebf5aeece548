"""The held-out evaluation: which items are scored, and how one report of the describer is scored against its item."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradsense.describer import Describer
from gradsense.errors import GradsenseError
from gradsense.sampling import stratified
from gradsense.scoring import first_visible_token
from gradsense.stats import rate_rows
from gradsense.teacher import NO_DOMAIN, parse_label

TEST_SUBJECTS = "test subjects"  # new subjects on trained templates and domains: the main result's items
HELDOUT_TEMPLATES = "held-out templates"
HELDOUT_DOMAIN = "held-out domain"
READ_DOMAIN = "names the read item's domain"  # the shuffle control: the report follows the prompt, not the gradient

# The held-out table's metrics: name → column of a scored frame (`score_descriptions`).
METRICS = {
    "domain accuracy": "domain_ok",
    "answer in 'to'": "answer_ok",
    "answer token in 'to'": "token_ok",
    "names a domain": "pressure",
    "head parsed": "parsed",
    "teacher's 'to' reproduced": "teacher_to_ok",
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
    """The target answer's text appears in the parsed `to` field (case-insensitive)."""
    return bool(to) and answer.strip().casefold() in str(to).casefold()


def token_identified(to: str | None, answer: str, tokenizer: Any) -> bool:
    """The parsed `to` is the answer's first visible token (the granularity of the oracle's labels), or contains
    the whole answer."""
    if not to:
        return False
    first = first_visible_token(tokenizer, answer).casefold()
    return str(to).strip().casefold() == first or answer_identified(to, answer)


def teacher_to(label: str | None) -> str | None:
    """The `to` token of a teacher label (None without a label)."""
    return parse_label(label)["to"] if isinstance(label, str) else None


def same_token(reported: str | None, expected: str | None) -> bool:
    """Both present and equal up to case and surrounding space."""
    return bool(reported) and bool(expected) and str(reported).strip().casefold() == str(expected).strip().casefold()


def score_descriptions(
    described: pd.DataFrame, items: pd.DataFrame, tokenizer: Any, domains: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per row (aligned with `items`): domain_ok, answer_ok (target text in `to`), token_ok (first target token
    or whole target in `to`), pressure (one of `domains` is named — with None, any domain but NO_DOMAIN: a false
    positive under the no-injection and noise controls), parsed (a head was found), teacher_to_ok (`to` = the `to`
    of the item's teacher label, the token the describer was trained to say; False when the item has no label)."""
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
            "token_ok": [token_identified(t, a, tokenizer) for t, a in zip(described["to"], items["target"])],
            "pressure": described["domain"].isin(list(domains)).to_numpy()
            if domains is not None
            else described["domain"].notna().to_numpy() & (described["domain"].fillna("").to_numpy() != NO_DOMAIN),
            "teacher_to_ok": [same_token(t, teacher_to(label)) for t, label in zip(described["to"], labels)],
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
