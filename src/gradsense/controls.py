"""The controls stage's conditions: their names, the references' evaluation and passages, and the controls table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from gradsense.describer import Describer
from gradsense.errors import GradsenseError
from gradsense.evaluate import ANSWER_RECALL, READ_DOMAIN, read_domain_values
from gradsense.main_table import PAIRED_COLUMNS, Pair, condition_rows, core_evaluation, paired_rates, with_paired
from gradsense.stats import rate_rows

GROUP = "controls"  # the controls' group in the main table

# Condition names: the rows of `controls.csv`, which the ablations stage reads back by name.
TRAINED = "trained describer"
NO_INJECTION = "no injection"
NOISE = "norm-matched noise"
STEERING = "steering vector"
UNTRAINED = "untrained projector"
TEXT_ONLY = "text-only (no gradient)"
SHUFFLED = "shuffled gradients"
BACKWARD_LENS = "Backward Lens (top token of −g)"
LINEAR_PROBE = "linear probe on g"

TEXT_ONLY_HEADER = "Facts a model was corrected on, and the training pressure each one put on it:"


def reference_evaluation(describer: Describer, *args, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`main_table.core_evaluation` on the original model (LoRA adapters off): the references that train nothing
    (an untrained projector, the text-only prompt) must not read through the trained describer's adapters."""
    with describer.original_model():
        return core_evaluation(describer, *args, **kwargs)


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
    lines = [TEXT_ONLY_HEADER]
    for ex in examples.itertuples():
        lines += [f"Fact: {ex.prompt} {str(ex.target).strip()}", f"Pressure: {str(ex.label).splitlines()[0]}"]
    return "\n".join([*lines, f"Fact: {prompt} {str(target).strip()}"])


def text_only_contexts(examples: pd.DataFrame, test: pd.DataFrame) -> list[str]:
    """The text-only passage of each test item (its own prompt and target)."""
    return [text_only_passage(examples, p, t) for p, t in zip(test["prompt"], test["target"])]


def text_only_plan(examples: pd.DataFrame, plan: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """A decoupling plan whose every passage (domain A) is followed by the text-only passage of the row's gradient
    item (domain B, found in `items` by `row`)."""
    by_row = items.set_index("row")
    return plan.assign(
        context=[
            f"{passage}\n\n{text_only_passage(examples, by_row.at[r, 'prompt'], by_row.at[r, 'target'])}"
            for passage, r in zip(plan["context"], plan["row"])
        ]
    )


def controls_table(
    runs: Mapping[str, Pair],
    lens_ranks: Sequence[int] | np.ndarray,
    probe_predicted: Sequence[str] | np.ndarray,
    probe_truth: Sequence[str] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    lens_ids: Sequence[str] | None = None,
    probe_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Rates with CIs of every describer condition (`runs`: name → (test, decoupling) frames; the SHUFFLED run also
    gets READ_DOMAIN), then the training-free baselines on the test items: Backward Lens (the target token ranks first
    under −g, counted as its answer recall — lenient, only the first token) and the linear probe (predicted = true
    domain); group GROUP. Every condition but TRAINED carries its paired difference against TRAINED on the same rows
    (baselines too when their item ids are given)."""
    if len(probe_predicted) != len(probe_truth):
        raise GradsenseError(f"{len(probe_predicted)} probe predictions for {len(probe_truth)} items")
    rows = condition_rows(runs, n_boot, seed)
    if SHUFFLED in runs:
        shuffled = runs[SHUFFLED][0]
        rows += rate_rows({READ_DOMAIN: read_domain_values(shuffled)}, n_boot, seed, condition=SHUFFLED)
    lens_hits = np.asarray(lens_ranks) == 0
    probe_hits = np.asarray(probe_predicted) == np.asarray(probe_truth)
    rows += rate_rows({ANSWER_RECALL: lens_hits}, n_boot, seed, lens_ids, condition=BACKWARD_LENS)
    rows += rate_rows({"domain accuracy": probe_hits}, n_boot, seed, probe_ids, condition=LINEAR_PROBE)
    table = pd.DataFrame(rows).assign(group=GROUP)
    if TRAINED not in runs:
        return table
    paired = {name: pair for name, pair in runs.items() if name != TRAINED}
    if lens_ids is not None:
        paired[BACKWARD_LENS] = (pd.DataFrame({"id": list(lens_ids), "answer_ok": lens_hits}), None)
    if probe_ids is not None:
        paired[LINEAR_PROBE] = (pd.DataFrame({"id": list(probe_ids), "domain_ok": probe_hits}), None)
    differences = [
        row
        for name, pair in paired.items()
        for row in paired_rates(pair, runs[TRAINED], n_boot, seed, group=GROUP, condition=name, vs=TRAINED)
    ]
    return with_paired(table, pd.DataFrame(differences, columns=["group", "condition", "metric", *PAIRED_COLUMNS]))


def stored_condition(per_item: pd.DataFrame, condition: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One condition's (test, decoupling) frames from the controls stage's `controls_items` table."""
    rows = per_item[per_item["condition"] == condition]
    if rows.empty:
        have = sorted(set(per_item["condition"]))
        raise GradsenseError(f"the controls items have no condition {condition!r} (have {have})")
    test, decoupled = rows[rows["part"] == "test"], rows[rows["part"] == "decoupling"]
    return test.reset_index(drop=True), decoupled.reset_index(drop=True)
