"""Score a trained describer: held-out sets, controls, forced choice, and decoupling (context from domain A,
gradient from domain B), with bootstrap confidence intervals (`gradsense.stats.bootstrap_ci`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.oracle import first_visible_token
from gradsense.projector import Describer
from gradsense.scoring import batches
from gradsense.stats import bootstrap_ci
from gradsense.teacher import parse_label

NONE_DOMAIN = "none"


# --------------------------------------------------------------------------------------------- evaluation sets


def evaluation_sets(
    corrections: pd.DataFrame, heldout_domain: str | None, max_items: int | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Row indices (into `corrections`) of each held-out set, each capped at `max_items` (seeded, stratified by
    domain): `test subjects` (test split, trained templates and domains), `held-out templates` (test split, the
    held-out template of each domain), `held-out domain` (every item of the domain left out of training)."""
    c = corrections.reset_index(drop=True)
    trained = c["domain"] != heldout_domain
    sets = {
        "test subjects": (c["split"] == "test") & (c["template_split"] == "train") & trained,
        "held-out templates": (c["split"] == "test") & (c["template_split"] == "heldout") & trained,
    }
    if heldout_domain is not None:
        sets["held-out domain"] = ~trained
    return {
        name: _cap(np.flatnonzero(mask.to_numpy()), c["domain"].to_numpy(), max_items, seed)
        for name, mask in sets.items()
    }


def stratified(frame: pd.DataFrame, max_items: int | None, seed: int = 0) -> pd.DataFrame:
    """At most `max_items` rows of `frame`, drawn round-robin over its domains in a seeded order (order kept)."""
    frame = frame.reset_index(drop=True)
    return frame.iloc[_cap(np.arange(len(frame)), frame["domain"].to_numpy(), max_items, seed)]


def _cap(rows: np.ndarray, domains: np.ndarray, max_items: int | None, seed: int) -> np.ndarray:
    """At most `max_items` rows, drawn round-robin over domains in a seeded order (kept in table order)."""
    if max_items is None or len(rows) <= max_items:
        return rows
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(rows)
    rank = pd.Series(domains[shuffled]).groupby(domains[shuffled]).cumcount().to_numpy()
    return np.sort(shuffled[np.argsort(rank, kind="stable")[:max_items]])


# --------------------------------------------------------------------------------------------- per-item scores


def answer_identified(to: str | None, answer: str) -> bool:
    """The target answer's text appears in the parsed `to` field (case-insensitive)."""
    return bool(to) and answer.strip().casefold() in str(to).casefold()


def token_identified(to: str | None, answer: str, tokenizer) -> bool:
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
    described: pd.DataFrame, items: pd.DataFrame, tokenizer, domains: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per row (aligned with `items`): domain_ok, answer_ok (target text in `to`), token_ok (first target token
    or whole target in `to`), pressure (one of `domains` is named — with None, any domain but "none": a false
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
            else described["domain"].notna().to_numpy() & (described["domain"].fillna("").to_numpy() != NONE_DOMAIN),
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


METRICS = {
    "domain accuracy": "domain_ok",
    "answer in 'to'": "answer_ok",
    "answer token in 'to'": "token_ok",
    "names a domain": "pressure",
    "head parsed": "parsed",
    "teacher's 'to' reproduced": "teacher_to_ok",
}


def heldout_table(scored: dict[tuple[str, str], pd.DataFrame], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Rates with bootstrap CIs per (evaluation set, control): every metric of `METRICS`. On the no-injection and
    noise controls "names a domain" is the false-positive rate."""
    rows = []
    for (name, control), frame in scored.items():
        values = {metric: frame[column].to_numpy() for metric, column in METRICS.items()}
        if control == "shuffle":  # where the read item and the injected one differ in domain
            differ = frame["domain"].to_numpy() != frame["read_domain"].to_numpy()
            values["names the read item's domain"] = frame["read_domain_ok"].to_numpy()[differ]
        rows += rate_rows(values, n_boot, seed, set=name, control=control)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- rates


def rate_rows(values: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0, **keys) -> list[dict]:
    """One row per metric: estimate with its bootstrap 95% CI and n, plus the given key columns."""
    rows = []
    for metric, v in values.items():
        v = np.asarray(v, dtype=float)
        est, low, high = bootstrap_ci(v, n_boot=n_boot, seed=seed)
        rows.append({**keys, "metric": metric, "estimate": est, "low": low, "high": high, "n": len(v)})
    return rows


# --------------------------------------------------------------------------------------------- forced choice


def choice_sets(
    labels: Sequence[str], pool: Sequence[str] | None = None, n_choices: int = 10, seed: int = 0
) -> list[list[str]]:
    """Per item: its own label first, then `n_choices − 1` distinct labels from `pool` (default: the items' labels)
    that differ from it, drawn in a seeded order; too few distinct labels is an error."""
    labels = list(labels)
    pool = list(dict.fromkeys(labels if pool is None else pool))  # distinct, first-seen order
    rng = np.random.default_rng(seed)
    sets = []
    for own in labels:
        others = [pool[j] for j in rng.permutation(len(pool)) if pool[j] != own][: n_choices - 1]
        if len(others) < n_choices - 1:
            raise GradsenseError(
                f"forced choice needs {n_choices - 1} other distinct labels, only {len(others)} available"
            )
        sets.append([own, *others])
    return sets


def forced_choice(
    describer: Describer,
    grads: np.ndarray,
    labels: Sequence[str],
    pool: Sequence[str] | None = None,
    n_choices: int = 10,
    control: str = "gradient",
    seed: int = 0,
    batch_size: int = 16,
    max_label_tokens: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Per item: the rank (0 = best) of its own label among `n_choices` candidates (its own + others from `pool`),
    by the mean per-token log-likelihood under the item's injection (no context); `correct` = rank 0 (chance
    1/n_choices). Ties count against the item's own label."""
    sets = choice_sets(labels, pool, n_choices, seed)
    grads_t = torch.as_tensor(np.asarray(grads), dtype=torch.float32)
    rows_item = np.repeat(np.arange(len(sets)), n_choices)
    texts = [text for choice in sets for text in choice]
    scores = np.zeros(len(texts))
    rng = np.random.default_rng(seed)
    for part in tqdm(list(batches(len(texts), batch_size)), desc=f"forced choice ({control})", disable=not progress):
        with torch.no_grad():
            vectors = describer.vectors(grads_t[torch.as_tensor(rows_item[part])], control, rng)
        scores[part] = describer.label_logprobs(vectors, [None] * len(texts[part]), texts[part], max_label_tokens)
    scores = scores.reshape(len(sets), n_choices)
    rank = (scores[:, 1:] >= scores[:, :1]).sum(1)
    return pd.DataFrame(
        {"rank": rank, "correct": rank == 0, "score_own": scores[:, 0], "score_best_other": scores[:, 1:].max(1)}
    )


# --------------------------------------------------------------------------------------------- decoupling


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


def decoupling(
    describer: Describer,
    grads: np.ndarray,
    plan: pd.DataFrame,
    items: pd.DataFrame,
    tokenizer,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    seed: int = 0,
    progress: bool = False,
    control: str = "gradient",
) -> pd.DataFrame:
    """Describe each planned (gradient, context) pair; success = reports the gradient's domain B, leakage = reports
    the context's domain A; answer_ok as in `score_descriptions`. Controls "none" and "noise" replace the injection
    (the shuffle control has no meaning here: every row already pairs a gradient with a foreign passage)."""
    if control not in ("gradient", "none", "noise"):
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
    by_row = items.set_index("row")
    targets = by_row.loc[plan["row"], "target"].to_numpy()
    reported = described["domain"].fillna("").to_numpy()
    return plan.assign(
        id=by_row.loc[plan["row"], "id"].to_numpy(),
        target=targets,
        description=described["description"].to_numpy(),
        reported_domain=described["domain"].to_numpy(),
        reported_to=described["to"].to_numpy(),
        success=reported == plan["gradient_domain"].to_numpy(),
        leakage=reported == plan["context_domain"].to_numpy(),
        answer_ok=[answer_identified(t, a) for t, a in zip(described["to"], targets)],
        token_ok=[token_identified(t, a, tokenizer) for t, a in zip(described["to"], targets)],
    )


def decoupling_matrix(results: pd.DataFrame, value: str = "success") -> pd.DataFrame:
    """Mean of `value` per (context domain A: rows, gradient domain B: columns); the diagonal is empty."""
    return (
        results.pivot_table(index="context_domain", columns="gradient_domain", values=value, aggfunc="mean")
        .sort_index()
        .sort_index(axis=1)
    )


def confusion(true: Sequence[str], reported: Sequence[str | None], domains: Sequence[str]) -> pd.DataFrame:
    """Row-normalised confusion matrix: true domain (rows) × reported domain (columns: `domains`, "none", "other")."""
    columns = list(domains) + [NONE_DOMAIN, "other"]
    known = set(domains) | {NONE_DOMAIN}
    rep = [r if r in known else "other" for r in reported]
    table = pd.crosstab(
        pd.Categorical(list(true), categories=list(domains)), pd.Categorical(rep, categories=columns), dropna=False
    )
    table.index.name, table.columns.name = "true domain", "reported domain"
    return table.div(table.sum(axis=1).replace(0, np.nan), axis=0)


# --------------------------------------------------------------------------------------------- the main table


CORE_TEST = {"domain accuracy": "domain_ok", "answer token in 'to'": "token_ok", "names a domain": "pressure"}
CORE_DECOUPLING = {"decoupling success": "success", "decoupling leakage": "leakage"}


def core_evaluation(
    describer: Describer,
    vectors: np.ndarray,
    items: pd.DataFrame,
    test: pd.DataFrame,
    plan: pd.DataFrame,
    control: str = "gradient",
    test_contexts: Sequence[str | None] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 0,
    domains: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The main table's two evaluations of one describer: held-out `test` items (no passage unless `test_contexts`)
    and the decoupling `plan` (passage A, vector of domain B); `vectors` (N, d) are what the projector reads
    (gradients, or steering vectors for the transfer rows); `domains` as in `score_descriptions`."""
    options = {"seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    scored = describe_items(describer, vectors, test, control, test_contexts, domains=domains, **options)
    decoupled = decoupling(describer, vectors, plan, items, describer.tokenizer, control=control, **options)
    return scored, decoupled


def core_rates(
    scored: pd.DataFrame | None, decoupled: pd.DataFrame | None, n_boot: int = 1000, seed: int = 0, **keys
) -> list[dict]:
    """Rows of the main table for one condition: CORE_TEST rates on the test items and CORE_DECOUPLING rates on
    the decoupling pairs, each with its bootstrap 95% CI (a missing or empty part gives no rows)."""
    values = {}
    if scored is not None and len(scored):
        values |= {metric: scored[column].to_numpy() for metric, column in CORE_TEST.items()}
    if decoupled is not None and len(decoupled):
        values |= {metric: decoupled[column].to_numpy() for metric, column in CORE_DECOUPLING.items()}
    return rate_rows(values, n_boot, seed, **keys)


def main_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Wide form of core rate rows: one row per (group, condition), "estimate [low, high]" per metric."""
    cell = rates.assign(
        value=[f"{e:.2f} [{lo:.2f}, {hi:.2f}]" for e, lo, hi in zip(rates["estimate"], rates["low"], rates["high"])]
    )
    order = list(dict.fromkeys(zip(cell["group"], cell["condition"])))
    wide = cell.pivot_table(index=["group", "condition"], columns="metric", values="value", aggfunc="first")
    metrics = [m for m in [*CORE_TEST, *CORE_DECOUPLING] if m in wide.columns]
    return wide.reindex(pd.MultiIndex.from_tuples(order, names=["group", "condition"]))[metrics].fillna("n/a").reset_index()


# --------------------------------------------------------------------------------------------- text-only reference


def text_examples(train_items: pd.DataFrame, per_domain: int = 1, seed: int = 0) -> pd.DataFrame:
    """`per_domain` labelled training items of each domain (seeded), shown to the text-only reference."""
    rng = np.random.default_rng(seed)
    picks = [
        frame.iloc[np.sort(rng.permutation(len(frame))[:per_domain])]
        for _, frame in train_items.dropna(subset=["label"]).groupby("domain", sort=True)
    ]
    return pd.concat(picks, ignore_index=True) if picks else train_items.iloc[:0]


def text_only_passage(examples: pd.DataFrame, prompt: str, target: str) -> str:
    """The text-only reference's passage: labelled example facts, then the item's fact and correction in words (no
    gradient is injected; the model reads what the gradient would have told it)."""
    lines = ["Facts a model was corrected on, and the training pressure each one put on it:"]
    for ex in examples.itertuples():
        lines += [f"Fact: {ex.prompt} {str(ex.target).strip()}", f"Pressure: {str(ex.label).splitlines()[0]}"]
    return "\n".join([*lines, f"Fact: {prompt} {str(target).strip()}"])
