"""Rebuild counterfact.csv (the vendored CounterFact subset) from the Geometry-of-Truth CSV and counterfact_domains.csv.

Usage: python sources/facts/make_counterfact.py [path/to/counterfact_true_false.csv]
Deterministic: facts are taken round-robin over each domain's templates, in sha256(seed|relation|subject) order.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
SOURCE = Path("/work/shared/data/counterfact_true_false.csv")
CAP_PER_DOMAIN = 400
SEED = "gradsense-0"


def pairs(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per (relation, subject): the true target and the false target of its statement pair."""
    true, false = raw.iloc[::2].reset_index(drop=True), raw.iloc[1::2].reset_index(drop=True)
    # The source lists each fact as a (true, false) pair of consecutive rows; refuse anything else.
    ok = (true["label"] == 1) & (false["label"] == 0) & (true["relation"] == false["relation"])
    ok &= (true["subject"] == false["subject"]) & (true["true_target"] == false["true_target"])
    if not ok.all():
        raise SystemExit(f"{(~ok).sum()} rows are not (true, false) pairs")
    facts = pd.DataFrame({
        "relation": true["relation"], "subject": true["subject"], "right": true["true_target"], "wrong": false["target"],
    })
    # A subject with several true answers under one template (e.g. official languages of the EU) is ambiguous: drop it.
    counts = facts.groupby(["relation", "subject"])["right"].transform("size")
    return facts[(counts == 1) & (facts["right"] != facts["wrong"])].reset_index(drop=True)


def rank_key(relation: str, subject: str) -> str:
    """A seeded, platform-independent sort key."""
    return hashlib.sha256(f"{SEED}|{relation}|{subject}".encode()).hexdigest()


def select(facts: pd.DataFrame, domains: pd.DataFrame, cap: int) -> pd.DataFrame:
    """Facts of the mapped templates, at most `cap` per domain, balanced round-robin over the domain's templates."""
    facts = facts.merge(domains, on="relation", how="inner")
    facts["key"] = [rank_key(r, s) for r, s in zip(facts["relation"], facts["subject"])]
    facts = facts.sort_values(["domain", "relation", "key"])
    facts["rank"] = facts.groupby(["domain", "relation"]).cumcount()
    facts = facts.sort_values(["domain", "rank", "relation"])
    facts = facts.groupby("domain", sort=True).head(cap)
    return facts.sort_values(["domain", "relation", "key"])[["relation", "subject", "right", "wrong", "domain"]]


def main(source: Path = SOURCE) -> None:
    """Write counterfact.csv next to this script."""
    raw = pd.read_csv(source)
    domains = pd.read_csv(HERE / "counterfact_domains.csv")
    if domains["relation"].duplicated().any():
        raise SystemExit("counterfact_domains.csv maps a template twice")
    missing = set(domains["relation"]) - set(raw["relation"])
    if missing:
        raise SystemExit(f"templates not in the source: {sorted(missing)}")
    out = select(pairs(raw), domains, CAP_PER_DOMAIN)
    out.to_csv(HERE / "counterfact.csv", index=False)
    print(out.groupby("domain").size().to_string())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE)
