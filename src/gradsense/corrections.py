"""The corrections table: facts with a right and a wrong answer, both directions, subject/template/domain splits,
and the model's own belief (teacher-forced log p of each answer).

A *fact* is (relation template with `{}`, subject, right answer, wrong answer, domain). Each fact yields one row per
direction: `correct` (target = right, source = wrong: fixing an error) and `counterfactual` (target = wrong,
source = right: pushing a counterfactual). Answers are stored without a leading space; the model continues the
prompt with `scoring.target_text(answer)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.files import atomic_path
from gradsense.models import data_dir
from gradsense.sampling import stratified
from gradsense.scoring import score_targets, target_text, tokenize_prompt, tokenize_target

FACT_FILES = ("counterfact.csv", "history.csv", "biology.csv")
FACT_COLUMNS = ["relation", "subject", "right", "wrong", "domain"]
DIRECTIONS = ("correct", "counterfactual")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
# The contract other stages read: keep these names and this order.
COLUMNS = [
    "id",
    "fact_id",
    "domain",
    "relation",
    "subject",
    "prompt",
    "right",
    "wrong",
    "direction",
    "target",
    "source",
    "split",
    "template_split",
    "logp_target",
    "logp_source",
    "greedy_target",
    "model_prefers_target",
]


def _key(seed: int, *parts: str) -> str:
    """A seeded sort key that is the same on every platform and Python run (unlike `hash`)."""
    return hashlib.sha256("|".join([str(seed), *parts]).encode()).hexdigest()


def fill_template(relation: str, subject: str) -> str:
    """The prompt: the template with `{}` replaced by the subject, without trailing whitespace."""
    return relation.replace("{}", subject).rstrip()


def read_fact_table(path: str | Path) -> pd.DataFrame:
    """One fact CSV (relation, subject, right, wrong, domain), checked: no empty field, one `{}`, right ≠ wrong."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"fact table {path} is missing")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in FACT_COLUMNS if c not in table.columns]
    if missing:
        raise GradsenseError(f"fact table {path} lacks columns {missing}")
    table = table[FACT_COLUMNS].apply(lambda col: col.str.strip())
    for i, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        where = f"fact table {path.name} line {i}"
        empty = [c for c in FACT_COLUMNS if not getattr(row, c)]
        if empty:
            raise GradsenseError(f"{where}: empty {', '.join(empty)}")
        if row.relation.count("{}") != 1:
            raise GradsenseError(f"{where}: template {row.relation!r} must hold exactly one '{{}}'")
        if row.right == row.wrong:
            raise GradsenseError(f"{where}: right and wrong answers are both {row.right!r}")
    dup = table.duplicated(["relation", "subject"], keep=False)
    if dup.any():
        first = table[dup].iloc[0]
        where = f"fact table {path.name}"
        raise GradsenseError(f"{where}: subject {first.subject!r} appears twice under {first.relation!r}")
    return table


def load_facts(folder: str | Path | None = None, files: Sequence[str] = FACT_FILES) -> pd.DataFrame:
    """All fact tables under `data/facts/` in one frame with a stable `fact_id` (`<domain>-<nnnn>`, file order)."""
    folder = Path(folder) if folder is not None else data_dir() / "facts"
    facts = pd.concat([read_fact_table(folder / name) for name in files], ignore_index=True)
    dup = facts.duplicated(["relation", "subject"], keep=False)
    if dup.any():
        first = facts[dup].iloc[0]
        raise GradsenseError(f"subject {first.subject!r} under {first.relation!r} appears in two fact tables")
    facts.insert(0, "fact_id", [f"{d}-{k:04d}" for d, k in zip(facts["domain"], facts.groupby("domain").cumcount())])
    return facts


def sample_facts(facts: pd.DataFrame, per_domain: int | None, seed: int = 0) -> pd.DataFrame:
    """At most `per_domain` facts of each domain, taken round-robin over its templates in a seeded order."""
    if per_domain is None:
        return facts.sort_values("fact_id", kind="stable").reset_index(drop=True)
    if not isinstance(per_domain, int) or per_domain < 1:
        raise GradsenseError(f"per_domain must be a positive integer or None, not {per_domain!r}")
    keyed = facts.assign(_key=[_key(seed, "sample", f) for f in facts["fact_id"]])
    # Round-robin: the k-th fact of every template comes before the (k+1)-th of any, so templates stay balanced.
    sampled = stratified(keyed, "domain", per_group=per_domain, within="relation", order=["relation", "_key"])
    return sampled.drop(columns="_key").sort_values("fact_id", kind="stable").reset_index(drop=True)


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Split fractions as a dict over train/val/test that sums to 1."""
    if set(fractions) != set(SPLITS):
        raise GradsenseError(f"split fractions must name exactly {list(SPLITS)}, not {sorted(fractions)}")
    values = {s: float(fractions[s]) for s in SPLITS}
    if any(not 0 <= v <= 1 for v in values.values()) or abs(sum(values.values()) - 1) > 1e-6:
        raise GradsenseError(f"split fractions must be in [0, 1] and sum to 1, not {values}")
    return values


def assign_splits(facts: pd.DataFrame, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0) -> pd.Series:
    """train/val/test per fact by subject (case-insensitive): no subject in two splits; fractions hold per domain."""
    fractions = check_fractions(fractions)
    keys = facts["subject"].str.casefold()
    split_of: dict[str, str] = {}
    for domain in sorted(facts["domain"].unique()):
        # A subject already placed by an earlier domain keeps its split; the rest are cut in seeded order.
        subjects = sorted(set(keys[facts["domain"] == domain]) - split_of.keys(), key=lambda s: _key(seed, "split", s))
        bounds = np.round(np.cumsum([fractions[s] for s in SPLITS]) * len(subjects)).astype(int)
        for start, stop, split in zip([0, *bounds[:-1]], bounds, SPLITS):
            split_of.update({s: split for s in subjects[start:stop]})
    return keys.map(split_of).rename("split")


def heldout_templates(facts: pd.DataFrame, seed: int = 0) -> dict[str, str]:
    """One held-out relation template per domain that has at least two templates (seeded choice)."""
    chosen = {}
    for domain, relations in facts.groupby("domain", sort=True)["relation"]:
        templates = sorted(relations.unique())
        if len(templates) >= 2:
            chosen[domain] = min(templates, key=lambda t: _key(seed, "template", domain, t))
    return chosen


PARAPHRASE, NEW_RELATION = "paraphrase", "new relation"


def template_kinds(facts: pd.DataFrame, min_overlap: float = 0.5) -> dict[str, str]:
    """Per held-out template (`template_split` = heldout): a paraphrase of a trained relation when at least
    `min_overlap` of its distinct right answers are right answers of its domain's trained templates ("The capital
    city of {} is" beside "The capital of {} is"), else a new relation ("{} was born in the year")."""
    kinds = {}
    for (domain, relation), part in facts[facts["template_split"] == "heldout"].groupby(["domain", "relation"]):
        trained = facts[(facts["domain"] == domain) & (facts["template_split"] == "train")]
        answers = set(part["right"])
        overlap = len(answers & set(trained["right"])) / len(answers)
        kinds[relation] = PARAPHRASE if overlap >= min_overlap else NEW_RELATION
    return kinds


def assign_template_split(facts: pd.DataFrame, seed: int = 0) -> pd.Series:
    """`heldout` for facts of each domain's held-out template, else `train`."""
    held = heldout_templates(facts, seed)
    is_held = [held.get(d) == r for d, r in zip(facts["domain"], facts["relation"])]
    return pd.Series(np.where(is_held, "heldout", "train"), index=facts.index, name="template_split")


def heldout_domain_masks(table: pd.DataFrame, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) boolean masks over the rows: test = the named domain, train = every other domain."""
    if domain not in set(table["domain"]):
        known = sorted(set(table["domain"]))
        raise GradsenseError(f"held-out domain {domain!r} is not in the table (domains: {known})")
    test = (table["domain"] == domain).to_numpy()
    return ~test, test


def check_directions(directions: Sequence[str]) -> list[str]:
    """The requested directions, validated, in the canonical order."""
    directions = list(directions)
    unknown = [d for d in directions if d not in DIRECTIONS]
    if not directions or unknown:
        raise GradsenseError(f"directions must be a non-empty subset of {list(DIRECTIONS)}, not {directions}")
    return [d for d in DIRECTIONS if d in directions]


def expand_directions(facts: pd.DataFrame, directions: Sequence[str] = DIRECTIONS) -> pd.DataFrame:
    """One row per fact and direction, with `id`, `direction`, `target`, `source` (fact order, then direction)."""
    parts = []
    for rank, direction in enumerate(check_directions(directions)):
        correct = direction == "correct"
        parts.append(
            facts.assign(
                id=facts["fact_id"] + "-" + direction,
                direction=direction,
                _rank=rank,
                target=facts["right"] if correct else facts["wrong"],
                source=facts["wrong"] if correct else facts["right"],
            )
        )
    rows = pd.concat(parts).sort_values(["fact_id", "_rank"], kind="stable")
    return rows.drop(columns="_rank").reset_index(drop=True)


def build_corrections(
    facts: pd.DataFrame,
    per_domain: int | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    directions: Sequence[str] = DIRECTIONS,
    seed: int = 0,
) -> pd.DataFrame:
    """The corrections table without the belief columns: sampled facts, prompts, splits, both directions."""
    facts = sample_facts(facts, per_domain, seed)
    facts = facts.assign(
        prompt=[fill_template(r, s) for r, s in zip(facts["relation"], facts["subject"])],
        split=assign_splits(facts, fractions, seed),
        template_split=assign_template_split(facts, seed),
    )
    return expand_directions(facts, directions)


def check_items(table: pd.DataFrame, tokenizer) -> np.ndarray:
    """Raise a GradsenseError naming the first item with an empty prompt or an answer that tokenizes to nothing;
    return each row's prompt+longest-answer token count (used to batch similar lengths together)."""
    lengths = np.zeros(len(table), dtype=int)
    for i, row in enumerate(table[["id", "prompt", "right", "wrong"]].itertuples(index=False)):
        n_prompt = len(tokenize_prompt(tokenizer, row.prompt, row.id))
        n_answer = 0
        for answer in (row.right, row.wrong):
            if not isinstance(answer, str) or not answer.strip():
                raise GradsenseError(f"item {row.id}: empty answer {answer!r}")
            n_answer = max(n_answer, len(tokenize_target(tokenizer, target_text(answer), row.id)))
        lengths[i] = n_prompt + n_answer
    return lengths


def record_belief(table: pd.DataFrame, model: nn.Module, tokenizer, batch_size: int = 32) -> pd.DataFrame:
    """Add `logp_target`, `logp_source` (summed teacher-forced log p of each answer), `greedy_target`
    (greedy decoding gives the target) and `model_prefers_target`; each answer is scored once per fact."""
    lengths = check_items(table, tokenizer)
    facts = table.assign(_len=lengths).drop_duplicates("fact_id").reset_index(drop=True)
    prompts = facts["prompt"].tolist() * 2
    answers = [target_text(a) for a in facts["right"]] + [target_text(a) for a in facts["wrong"]]
    # Score in length order so each batch pads little, then put the scores back in place.
    order = np.argsort(np.tile(facts["_len"].to_numpy(), 2), kind="stable")
    logp, greedy = np.empty(len(order)), np.empty(len(order), dtype=bool)
    chunk = batch_size * 8  # several batches per progress step
    for start in tqdm(range(0, len(order), chunk), desc="belief", unit="chunk", disable=len(order) <= chunk):
        part = order[start : start + chunk]
        scored = score_targets(model, tokenizer, [prompts[i] for i in part], [answers[i] for i in part], batch_size)
        logp[part], greedy[part] = scored["logp"], scored["greedy"]
    n = len(facts)
    belief = pd.DataFrame(
        {
            "fact_id": facts["fact_id"],
            "logp_right": logp[:n],
            "logp_wrong": logp[n:],
            "greedy_right": greedy[:n],
            "greedy_wrong": greedy[n:],
        }
    )
    rows = table.merge(belief, on="fact_id", how="left", validate="many_to_one")
    bad = ~np.isfinite(rows[["logp_right", "logp_wrong"]].to_numpy()).all(axis=1)
    if bad.any():
        raise GradsenseError(f"item {rows['id'][bad].iloc[0]}: non-finite log-probability")
    correct = (rows["direction"] == "correct").to_numpy()
    return table.assign(
        logp_target=np.where(correct, rows["logp_right"], rows["logp_wrong"]),
        logp_source=np.where(correct, rows["logp_wrong"], rows["logp_right"]),
        greedy_target=np.where(correct, rows["greedy_right"], rows["greedy_wrong"]).astype(bool),
    ).assign(model_prefers_target=lambda t: t["logp_target"] > t["logp_source"])


def corrections_table(
    model: nn.Module,
    tokenizer,
    facts: pd.DataFrame | None = None,
    per_domain: int | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    directions: Sequence[str] = DIRECTIONS,
    seed: int = 0,
    batch_size: int = 32,
) -> pd.DataFrame:
    """The full corrections table (the `COLUMNS` contract): facts from data/facts by default, splits and belief."""
    facts = load_facts() if facts is None else facts
    table = build_corrections(facts, per_domain, fractions, directions, seed)
    return record_belief(table, model, tokenizer, batch_size)[COLUMNS]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per domain × split: facts, rows, and the model's belief in the right answer (share right > wrong, greedy
    right, median log p(right) − log p(wrong)), computed from every row (either direction carries both answers)."""
    correct = table["direction"] == "correct"
    margin = np.where(correct, table["logp_target"] - table["logp_source"], table["logp_source"] - table["logp_target"])
    frame = table.assign(margin=margin, prefers_right=margin > 0)
    per_fact = frame.drop_duplicates("fact_id")
    greedy_right = frame[correct].groupby(["domain", "split"])["greedy_target"].mean().rename("greedy_right")
    summary = (
        per_fact.groupby(["domain", "split"])
        .agg(n_facts=("fact_id", "size"), prefers_right=("prefers_right", "mean"), median_margin=("margin", "median"))
        .join(frame.groupby(["domain", "split"]).size().rename("n_rows"))
        .join(greedy_right)
        .reset_index()
    )
    summary["split"] = pd.Categorical(summary["split"], categories=list(SPLITS), ordered=True)
    columns = ["domain", "split", "n_facts", "n_rows", "prefers_right", "greedy_right", "median_margin"]
    return summary.sort_values(["domain", "split"])[columns].reset_index(drop=True)


def belief_by_domain(table: pd.DataFrame) -> pd.DataFrame:
    """`summarize` per domain over every split together (no split column)."""
    return summarize(table.assign(split="train")).drop(columns="split")


def fact_margins(table: pd.DataFrame) -> pd.DataFrame:
    """One row per fact (its first row) with `margin` = log p(right) − log p(wrong), whatever the row's direction."""
    return table.drop_duplicates("fact_id").assign(
        margin=lambda t: np.where(t["direction"] == "correct", 1, -1) * (t["logp_target"] - t["logp_source"])
    )


def template_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Facts per domain × relation template × template split (held out or not)."""
    return (
        table.drop_duplicates("fact_id")
        .groupby(["domain", "relation", "template_split"])
        .size()
        .rename("n_facts")
        .reset_index()
    )


def corrections_facts(table: pd.DataFrame, heldout_domain: str, seed: int = 0) -> dict:
    """The corrections stage's key facts: rows, facts, domains, the held-out domain's rows, the held-out template
    per domain and the share of facts whose right answer the model prefers."""
    _, test = heldout_domain_masks(table, heldout_domain)
    return {
        "n_rows": len(table),
        "n_facts": table["fact_id"].nunique(),
        "domains": sorted(table["domain"].unique()),
        "heldout_domain": heldout_domain,
        "heldout_domain_rows": int(test.sum()),
        "heldout_templates": heldout_templates(table.drop_duplicates("fact_id"), seed),
        "prefers_right": float((fact_margins(table)["margin"] > 0).mean()),
    }


def save_corrections(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the table as CSV atomically, checking the column contract first."""
    if list(table.columns) != COLUMNS:
        raise GradsenseError(f"corrections table columns {list(table.columns)} differ from the contract {COLUMNS}")
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return Path(path)


def load_corrections(path: str | Path) -> pd.DataFrame:
    """Read a corrections CSV written by `save_corrections` (the contract columns, answers kept as strings)."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"corrections table {path} is missing (run the corrections stage)")
    strings = {c: str for c in COLUMNS[: COLUMNS.index("template_split") + 1]}  # every text column
    table = pd.read_csv(path, dtype=strings, keep_default_na=False)
    if list(table.columns) != COLUMNS:
        raise GradsenseError(f"corrections table {path} has columns {list(table.columns)}, not the contract {COLUMNS}")
    return table
