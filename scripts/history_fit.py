"""Does the trained describer fit history on its own training items? (run once by hand on the train stage's checkpoint)

Usage: python scripts/history_fit.py [N_PER_DOMAIN]
Scores the pipeline checkpoint (results/train/checkpoint) without a passage on up to N_PER_DOMAIN (default 30)
training items and as many validation items of every trained domain, and on every year target of the two splits, with the
evaluate stage's scoring (`evaluate.describe_items`): a domain the describer misses on the items it trained on is an
optimisation failure, one it fits there and misses on validation a generalisation failure. Never reads the test split.

Run on the pipeline checkpoint of 2026-12-04 (`dvc repro train`, 2-core AMD EPYC; 30 items a domain and split):
every other trained domain fits its training items (domain ≥ 0.97, answer ≥ 0.87) and mostly holds on validation;
history does not fit them: domain 0.57 / answer 0.33 on training items (0.33 / 0.00 on validation), and its 68
training years 0.16 / 0.04 (validation years 0 of 15), said as "none", "1999", "company". History's failure is an
optimisation failure first: the describer does not learn its own training years.
"""

from __future__ import annotations

import sys

import pandas as pd

import gradsense
from gradsense import evaluate as ev
from gradsense.checkpoint import load_describer
from gradsense.inputs import load_stage_inputs, training_items
from gradsense.paths import Paths
from gradsense.sampling import stratified

YEAR = r"\d{3,4}"


def main(per_domain: int) -> None:
    """Print domain accuracy and answer recall per domain on training and validation items, and on years."""
    paths = Paths(".")
    model, tokenizer = gradsense.load_model(None)
    describer = load_describer(paths.checkpoint, model, tokenizer)
    inputs = load_stage_inputs(paths)
    train, val_pool = training_items(inputs.items, describer.meta.get("heldout_domain"))
    grads = inputs.vectors("grads", describer.config.source_layer)
    frames = []
    for split, pool in (("train", train), ("validation", val_pool)):
        sample = stratified(pool, "domain", per_group=per_domain, order="shuffle", seed=0)
        years = pool[pool["target"].astype(str).str.fullmatch(YEAR) & ~pool["id"].isin(sample["id"])]
        # every year of the split joins the per-domain sample (the per-domain table counts the sample alone)
        items = pd.concat([sample.assign(sampled=True), years.assign(sampled=False)], ignore_index=True)
        scored = ev.describe_items(describer, grads, items, batch_size=64, max_new_tokens=0)
        frames.append(scored.assign(split=split, **{c: items[c].to_numpy() for c in ("domain", "target", "sampled")}))
    scored = pd.concat(frames, ignore_index=True)
    scored["year"] = scored["target"].astype(str).str.fullmatch(YEAR)
    table = (
        scored[scored["sampled"]]
        .groupby(["domain", "split"])[["domain_ok", "answer_ok"]]
        .mean()
        .unstack("split")
        .round(3)
    )
    print(table.to_string())
    years = scored[scored["year"]].groupby("split")[["domain_ok", "answer_ok"]].agg(["mean", "size"])
    print("years\n" + years.to_string())
    said = scored[scored["year"] & (scored["split"] == "train")]
    print(
        "what it says for training years:\n" + said[["target", "reported_domain", "reported_to"]].head(12).to_string()
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
