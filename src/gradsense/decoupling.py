"""Decoupling: a passage of domain A is read while a gradient of domain B ≠ A is injected; does the report say B?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradsense.describer import Describer
from gradsense.errors import GradsenseError
from gradsense.evaluate import answer_identified
from gradsense.stats import rate_rows

CONTROLS = ("gradient", "none", "noise")  # shuffle has no meaning here: every row already reads a foreign passage

# The decoupling summary's metrics: name → column of a `run_decoupling` frame.
SUMMARY = {
    "success (reports B)": "success",
    "leakage (reports A)": "leakage",
    "answer recall": "answer_ok",
    "'to' from the passage": "to_from_passage",
}


def decoupling_plan(
    items: pd.DataFrame,
    passages: pd.DataFrame,
    per_pair: int = 2,
    domains: Sequence[str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Rows (item row, gradient domain B, context domain A ≠ B, passage) for every ordered pair of domains: for each
    pair, `per_pair` items of domain B (seeded) each read inside a passage of domain A. `items` must have a `row`
    column (its index in the gradient array); `passages` has `domain` and `text`."""
    rng = np.random.default_rng(seed)
    grad_domains = sorted(set(items["domain"]) if domains is None else set(domains) & set(items["domain"]))
    ctx_domains = sorted(set(passages["domain"]) if domains is None else set(domains) & set(passages["domain"]))
    if not grad_domains or not ctx_domains:
        raise GradsenseError(f"decoupling needs items and passages of the domains {list(domains or [])}")
    plan = []
    for b in grad_domains:
        rows_b = items.loc[items["domain"] == b, "row"].to_numpy()
        for a in ctx_domains:
            if a == b:
                continue
            texts = passages.loc[passages["domain"] == a, "text"].to_numpy()
            for r in rng.choice(rows_b, size=min(per_pair, len(rows_b)), replace=False):
                plan.append(
                    {"row": int(r), "gradient_domain": b, "context_domain": a, "context": str(rng.choice(texts))}
                )
    return pd.DataFrame(plan)


def case_plan(
    items: pd.DataFrame, passages: pd.DataFrame, gradient_domain: str, context_domain: str, n: int, seed: int = 0
) -> pd.DataFrame | None:
    """The plan of one (gradient domain B, passage domain A) case — `n` items of B, each in a random passage of A
    (seeded) — or None when there is no such item or passage."""
    grad_items = items[items["domain"] == gradient_domain]
    texts = passages[passages["domain"] == context_domain]
    if not len(grad_items) or not len(texts):
        return None
    return decoupling_plan(grad_items, texts, n, None, seed)


def replay_plan(decoupled: pd.DataFrame, items: pd.DataFrame, per_pair: int | None = None) -> pd.DataFrame:
    """The decoupling plan of an earlier evaluation (its `decoupling_items` table: item id, domains, passage per row),
    re-indexed into `items` by id; `per_pair` keeps the first rows of each ordered pair (None: all)."""
    plan = decoupled[["id", "gradient_domain", "context_domain", "context"]].copy()
    if per_pair is not None:
        plan = plan.groupby(["context_domain", "gradient_domain"], sort=False).head(per_pair)
    missing = sorted(set(plan["id"]) - set(items["id"]))
    if missing:
        raise GradsenseError(f"decoupling plan names {len(missing)} items without a gradient (first: {missing[0]})")
    plan["row"] = items.set_index("id").loc[plan["id"], "row"].to_numpy()
    return plan.drop(columns="id").reset_index(drop=True)


def score_decoupled(
    plan: pd.DataFrame,
    described: pd.DataFrame,
    items: pd.DataFrame,
    tokenizer: Any,
    nameable: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The plan with each row's report scored: success = names the gradient's domain B, leakage = names the passage's
    domain A (NaN where A is not among the `nameable` domains the describer was trained to say: leakage cannot
    happen there; None = every domain); answer_ok = answer recall (`gradsense.evaluate.answer_identified`, the target of the item in `row`);
    to_from_passage = the reported `to` is a phrase of the passage read (and not the target)."""
    if len(described) != len(plan):
        raise GradsenseError(f"{len(described)} descriptions for {len(plan)} decoupling rows")
    by_row = items.set_index("row")
    targets = by_row.loc[plan["row"], "target"].to_numpy()
    reported = described["domain"].fillna("").to_numpy()
    possible = np.ones(len(plan), bool) if nameable is None else plan["context_domain"].isin(list(nameable)).to_numpy()
    answer_ok = [answer_identified(t, a) for t, a in zip(described["to"], targets)]
    return plan.assign(
        id=by_row.loc[plan["row"], "id"].to_numpy(),
        target=targets,
        description=described["description"].to_numpy(),
        reported_domain=described["domain"].to_numpy(),
        reported_to=described["to"].to_numpy(),
        success=reported == plan["gradient_domain"].to_numpy(),
        leakage=np.where(possible, reported == plan["context_domain"].to_numpy(), np.nan),
        answer_ok=answer_ok,
        to_from_passage=[
            bool(t) and not ok and answer_identified(c, t)
            for t, ok, c in zip(described["to"], answer_ok, plan["context"])
        ],
    )


def run_decoupling(
    describer: Describer,
    grads: np.ndarray,
    plan: pd.DataFrame,
    items: pd.DataFrame,
    tokenizer: Any,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    seed: int = 0,
    progress: bool = False,
    control: str = "gradient",
) -> pd.DataFrame:
    """Describe each planned (gradient, context) pair and score it (`score_decoupled`, leakage possible for the
    describer's `trained_domains` when its meta names them); controls "none" and "noise" replace the injection."""
    if control not in CONTROLS:
        raise GradsenseError(f"decoupling control must be gradient, none or noise, not {control!r}")
    described = describer.describe_gradients(
        np.asarray(grads)[plan["row"].to_numpy()],
        plan["context"].tolist(),
        control,
        seed,
        batch_size,
        max_new_tokens,
        progress,
    )
    return score_decoupled(plan, described, items, tokenizer, trained_domains(describer))


def trained_domains(describer: Any) -> list[str] | None:
    """The domains a describer was trained to name (its meta's `trained_domains`), or None when it does not say."""
    meta = getattr(describer, "meta", None) or {}
    return meta.get("trained_domains")


def decoupling_matrix(results: pd.DataFrame, value: str = "success") -> pd.DataFrame:
    """Mean of `value` per (context domain A: rows, gradient domain B: columns); the diagonal is empty."""
    return (
        results.pivot_table(index="context_domain", columns="gradient_domain", values=value, aggfunc="mean")
        .sort_index()
        .sort_index(axis=1)
    )


def pair_rates(results: pd.DataFrame) -> pd.DataFrame:
    """Success and leakage rates per ordered pair (context domain A, gradient domain B), in long form."""
    return (
        results.groupby(["context_domain", "gradient_domain"], sort=True)[["success", "leakage"]].mean().reset_index()
    )


def decoupling_summary(parts: Mapping[str, pd.DataFrame], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Rates of every `SUMMARY` metric per named set of decoupling rows (`pairs`; empty sets give no rows), CIs
    resampling passages (a passage is read by many rows); leakage counts only rows where it can happen."""
    rows = []
    for name, frame in parts.items():
        if len(frame):
            values = {m: frame[c] for m, c in SUMMARY.items()}
            rows += rate_rows(values, n_boot, seed, clusters=frame.get("context"), pairs=name)
    return pd.DataFrame(rows)
