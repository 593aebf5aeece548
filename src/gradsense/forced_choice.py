"""Forced choice: does the describer, under an item's injection, find the item's own label likelier than others'?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gradsense.describer import Describer
from gradsense.errors import GradsenseError
from gradsense.scoring import batches
from gradsense.stats import rate_rows
from gradsense.teacher import NO_DOMAIN, NO_TOKEN, UNCLEAR

TOP_1 = "forced choice top-1"
TOP_1_TEMPLATE = "forced choice top-1, same template"


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


def _template_pools(
    labels: Sequence[str], templates: Sequence[str], pool_labels: Sequence[str], pool_templates: Sequence[str]
) -> dict[str, list[str]]:
    """Template → its distinct pool labels (first-seen order; missing labels skipped), after checking lengths."""
    if len(labels) != len(templates) or len(pool_labels) != len(pool_templates):
        raise GradsenseError(
            f"same-template choice: {len(labels)} labels vs {len(templates)} templates, "
            f"{len(pool_labels)} pool labels vs {len(pool_templates)} pool templates (lengths must match)"
        )
    pools: dict[str, dict[str, None]] = {}
    for label, template in zip(pool_labels, pool_templates):
        if isinstance(label, str):
            pools.setdefault(template, {})[label] = None
    return {template: list(found) for template, found in pools.items()}


def template_distractor_counts(
    labels: Sequence[str], templates: Sequence[str], pool_labels: Sequence[str], pool_templates: Sequence[str]
) -> np.ndarray:
    """Per item: how many distinct pool labels other than its own share its template (the most distractors a
    same-template set can hold)."""
    pools = _template_pools(labels, templates, pool_labels, pool_templates)
    return np.array([sum(other != own for other in pools.get(t, [])) for own, t in zip(labels, templates)], dtype=int)


def template_choice_sets(
    labels: Sequence[str],
    templates: Sequence[str],
    pool_labels: Sequence[str],
    pool_templates: Sequence[str],
    n_choices: int = 10,
    seed: int = 0,
) -> list[list[str]]:
    """Per item: its own label first, then `n_choices − 1` distinct labels ≠ it from pool rows of the same template
    (relation), in a seeded order; an item whose template offers fewer is an error (select items with
    `template_distractor_counts` first)."""
    if n_choices < 2:
        raise GradsenseError(f"same-template choice needs n_choices ≥ 2, not {n_choices}")
    short = np.flatnonzero(template_distractor_counts(labels, templates, pool_labels, pool_templates) < n_choices - 1)
    if len(short):
        raise GradsenseError(
            f"same-template choice: {len(short)} of {len(labels)} items have fewer than {n_choices - 1} other labels "
            f"in their template (first: {templates[short[0]]!r})"
        )
    pools = _template_pools(labels, templates, pool_labels, pool_templates)
    rng = np.random.default_rng(seed)
    sets = []
    for own, template in zip(labels, templates):
        pool = pools[template]
        sets.append([own, *[pool[j] for j in rng.permutation(len(pool)) if pool[j] != own][: n_choices - 1]])
    return sets


def choice_ranks(scores: np.ndarray) -> np.ndarray:
    """Per row of (items, choices) scores whose column 0 is the item's own label: how many others score at least as
    high (0 = the own label wins; ties count against it)."""
    scores = np.asarray(scores)
    return (scores[:, 1:] >= scores[:, :1]).sum(1)


def forced_choice(
    describer: Describer,
    grads: np.ndarray,
    labels: Sequence[str] | None = None,
    pool: Sequence[str] | None = None,
    n_choices: int = 10,
    control: str = "gradient",
    seed: int = 0,
    batch_size: int = 16,
    max_label_tokens: int | None = None,
    progress: bool = False,
    sets: Sequence[Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Per item: the rank (0 = best) of its own label among `n_choices` candidates (its own + others from `pool`,
    or the given `sets`, own label first, e.g. `template_choice_sets`), by the mean per-token log-likelihood under
    the item's injection (no context); `correct` = rank 0 (chance 1/set size). Ties count against the own label."""
    if (labels is None) == (sets is None):
        raise GradsenseError("forced choice: give either labels (and a pool) or precomputed sets, not both")
    if sets is None:
        sets = choice_sets(labels, pool, n_choices, seed)
    sets = [list(choice) for choice in sets]
    n_choices = len(sets[0]) if sets else n_choices
    if len(sets) != len(grads) or any(len(choice) != n_choices for choice in sets) or n_choices < 2:
        raise GradsenseError(
            f"forced choice: {len(sets)} sets for {len(grads)} gradients; every set needs the same size ≥ 2"
        )
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
    rank = choice_ranks(scores)
    return pd.DataFrame(
        {"rank": rank, "correct": rank == 0, "score_own": scores[:, 0], "score_best_other": scores[:, 1:].max(1)}
    )


def forced_choice_rows(
    forced: Mapping[str, pd.DataFrame],
    n_boot: int = 1000,
    seed: int = 0,
    set_name: str = "test subjects",
    metric: str = TOP_1,
) -> list[dict]:
    """Held-out table rows: the top-1 rate (named `metric`) with its bootstrap CI per control (`forced` maps
    control → result)."""
    return [
        row
        for control, frame in forced.items()
        for row in rate_rows({metric: frame["correct"]}, n_boot, seed, set=set_name, control=control)
    ]


DOMAIN_CHOICE = "domain forced choice"


@torch.no_grad()
def domain_logprobs(
    describer: Describer, grads: np.ndarray, domains: Sequence[str], batch_size: int = 16
) -> np.ndarray:
    """(items, domains) summed log p of each domain name as the head's first value — " <domain>" and the token that
    ends it — after the given field name "domain:", under each item's injection (no context)."""
    from gradsense.hooks import inject
    from gradsense.prompt import FIELD_LEADS, interpretation_ids, lead_split
    from gradsense.scoring import pad_batch

    tok, config = describer.tokenizer, describer.config
    prompt, slots = interpretation_ids(tok, config)
    prompt = prompt + list(tok(FIELD_LEADS[0], add_special_tokens=False)["input_ids"])
    ends, stop = lead_split(tok, FIELD_LEADS[1])
    conts = [list(tok(" " + d, add_special_tokens=False)["input_ids"]) + ends[: stop + 1] for d in domains]
    grads_t = torch.as_tensor(np.asarray(grads), dtype=torch.float32)
    pairs = [(i, j) for i in range(len(grads_t)) for j in range(len(domains))]
    scores = np.zeros(len(pairs))
    for part in batches(len(pairs), batch_size):
        chunk = pairs[part]
        batch, starts = pad_batch(tok, [prompt + conts[j] for _, j in chunk], [len(prompt)] * len(chunk), "left")
        positions = torch.tensor([slots] * len(chunk)) + starts[:, None]
        vectors = describer.vectors(grads_t[[i for i, _ in chunk]])
        batch = batch.to(describer.device)
        keep = int((batch.labels != -100).sum(-1).max()) + 1
        with (
            describer.precision(),
            inject(describer.model, config.inject_layer, positions, vectors, describer.norm_match),
        ):
            logits = describer.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                logits_to_keep=keep,
            ).logits.float()
        labels = batch.labels[:, -keep:]
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        scores[part] = (logp * (labels != -100)).sum(-1).cpu().numpy()
    return scores.reshape(len(grads_t), len(domains))


def domain_choice(scores: np.ndarray, truth: Sequence[str], domains: Sequence[str]) -> np.ndarray:
    """Per item: whether its own domain has the highest of its (items, domains) `scores` (`domain_logprobs`), so a
    domain never trained on can still be chosen; ties count against it."""
    domains = list(domains)
    missing = sorted(set(truth) - set(domains))
    if missing:
        raise GradsenseError(f"domain choice: {missing[0]!r} is not among the candidate domains")
    scores = np.asarray(scores)
    own = scores[np.arange(len(scores)), [domains.index(t) for t in truth]]
    return (scores >= own[:, None]).sum(1) == 1


def names_a_value(reported_to: Sequence[str | None]) -> np.ndarray:
    """Per description: whether its `to` field names a value (not missing, blank, NO_TOKEN or UNCLEAR)."""
    return np.array([isinstance(t, str) and t.strip() not in ("", NO_TOKEN, UNCLEAR) for t in reported_to], dtype=bool)


def closed_domains(scores: np.ndarray, domains: Sequence[str], reported_to: Sequence[str | None]) -> np.ndarray:
    """Per row: the domain field read from a closed vocabulary, the one of `domains` (the columns of `scores`,
    `domain_logprobs`) with the highest score, NO_DOMAIN left out where the description names a `to` value."""
    scores = np.asarray(scores, dtype=float)
    domains = list(domains)
    if scores.ndim != 2 or scores.shape != (len(reported_to), len(domains)):
        raise GradsenseError(
            f"closed domains: scores of shape {scores.shape} for {len(reported_to)} rows and {len(domains)} domains"
        )
    if NO_DOMAIN in domains:
        scores = scores.copy()
        scores[names_a_value(reported_to), domains.index(NO_DOMAIN)] = -np.inf
    return np.array(domains, dtype=object)[scores.argmax(1)]
