"""The model card: how well the model under study knows a small set of fact prompts, per domain."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from gradsense.errors import GradsenseError
from gradsense.models import data_dir
from gradsense.sampling import stratified
from gradsense.scoring import score_targets

FACT_COLUMNS = ("domain", "prompt", "right", "wrong")


def probe_facts(max_facts: int | None = None) -> pd.DataFrame:
    """The probe facts of `data/facts/probe_facts.csv`: an even share of every domain (the first ⌈max/domains⌉ of
    each, file order kept), or all of them when `max_facts` is None."""
    path = data_dir() / "facts" / "probe_facts.csv"
    if not path.is_file():
        raise GradsenseError(f"probe facts {path} are missing (run `make data`)")
    facts = pd.read_csv(path)
    missing = [c for c in FACT_COLUMNS if c not in facts.columns]
    if missing:
        raise GradsenseError(f"probe facts {path} lack columns {missing}")
    if max_facts is None:
        return facts
    return stratified(facts, "domain", per_group=-(-max_facts // facts["domain"].nunique())).reset_index(drop=True)


def fact_answers(model: nn.Module, tokenizer, facts: pd.DataFrame, batch_size: int = 32) -> pd.DataFrame:
    """Per fact: log p of the right and the wrong answer (after a space), p(right), whether greedy decoding gives the
    right answer, whether right beats wrong, and the right answer's token count."""
    prompts = facts["prompt"].tolist()
    right = score_targets(model, tokenizer, prompts, [" " + a for a in facts["right"]], batch_size)
    wrong = score_targets(model, tokenizer, prompts, [" " + a for a in facts["wrong"]], batch_size)
    return facts.assign(
        logp_right=right["logp"],
        logp_wrong=wrong["logp"],
        p_right=np.exp(right["logp"]),
        greedy_right=right["greedy"],
        right_beats_wrong=right["logp"] > wrong["logp"],
        n_tokens_right=right["n_tokens"],
    )


def fact_accuracy(answers: pd.DataFrame) -> pd.DataFrame:
    """Per domain: facts, share answered right greedily, share where right beats wrong, median p(right)."""
    return (
        answers.groupby("domain", sort=True)
        .agg(
            n=("prompt", "size"),
            greedy_right=("greedy_right", "mean"),
            right_beats_wrong=("right_beats_wrong", "mean"),
            median_p_right=("p_right", "median"),
        )
        .reset_index()
    )
