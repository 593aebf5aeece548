"""Can the describer learn to read a year from the gradient rather than recall it from the fact? Chosen on the
validation split (run once by hand; not a stage).

Usage: python scripts/select_years.py EPOCHS N [N ...]     N = counterfactual targets per training year (0 = none)
Needs the pipeline's corrections, gradients and oracle outputs under results/. The describer of `select_read.py`'s
`both6` (four slots read the last prompt position, one slot each reads target positions 2 … 6: a bare space and four
digits) is trained on the train stage's items plus, for every training item whose target is a year, N copies whose
target is another year drawn at random (1000–2025, seeded; not its target, not its source). Each copy's gradient is
that of −log p(random year | prompt) and its label the item's head with `to` set to that year: a year then cannot be
recalled from the fact, only read from the gradient. Scored, as `select_read.py`, on 200 validation-split items (and
history, and years), on every validation-split year, on the same validation prompts with a random year as the target
(prompts never trained on: is the year read?), on history's own training items and, for the record only, on the
external new-phrasings set. The test split is never read.

Measured 2026-12-05 (2-core Intel Xeon with AMX, `select_years.py 3 4 0`; y4 against y0): validation 0.870 / 0.840
against 0.890 / 0.815; validation years 0 / 1 of 15 against 0 / 0; validation prompts with random years 1 / 0 of 15
against 0 / 0; history's 68 training years 0.06 / 0.25 against 0.03 / 0.00. The copies are fitted, not read.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pandas as pd
from select_init import at_rows, rates, scoring_sets, train_and_score  # scripts/ is on the path of a script run from it
from select_read import LAST_SLOTS, SOURCE_LAYER, item_gradients, report, with_last_slots
from select_source_layer import selection_inputs

import gradsense
from gradsense import external as ex
from gradsense.describer import DescriberConfig
from gradsense.teacher import label_head, parse_label

K = 6  # target positions read: a bare space and four digits
YEAR = r"\d{3,4}"


def random_years(items: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n copies of each item, its target replaced by a random year (not its target or source) and its label's `to`
    by that year; `row` left to the caller."""
    rng = np.random.default_rng(seed)
    copies = []
    for _, item in items.iterrows():
        head = parse_label(item["label"])
        taken = {str(item["target"]), str(item.get("source", ""))}
        for j in range(n):
            year = str(rng.integers(1000, 2026))
            while year in taken:
                year = str(rng.integers(1000, 2026))
            taken.add(year)
            copy = item.copy()
            copy["id"], copy["target"] = f"{item['id']}~y{j}", year
            copy["label"] = label_head(head["domain"], head["from"], year)
            copies.append(copy)
    return pd.DataFrame(copies).reset_index(drop=True)


def each_gradients(model, tokenizer, items: pd.DataFrame) -> np.ndarray:
    """Block-22 gradients of the items' (prompt, target) read as `both6`: (n, LAST_SLOTS + K − 1, d)."""
    return with_last_slots(item_gradients(model, tokenizer, items, K))


def main(epochs: float, counts: list[int]) -> None:
    """Train and score one describer per count of random years per training year."""
    inputs = selection_inputs()
    scored_items, seen, phrasings, options = scoring_sets(inputs)
    model, tokenizer = gradsense.load_model(None)  # gradients come from the frozen model
    items = inputs.stage.items
    n_rows = len(inputs.stage.arrays["ids"])
    needed = items[
        items["row"].isin(np.concatenate([inputs.train_items["row"], inputs.val_set["row"], scored_items["row"]]))
    ]
    val_years = inputs.val_pool[inputs.val_pool["target"].str.fullmatch(YEAR)].reset_index(drop=True)
    known = pd.concat([needed, val_years]).drop_duplicates("row")
    base = each_gradients(model, tokenizer, known)
    grads = at_rows(base, known["row"].to_numpy(), n_rows)
    ext_grads = with_last_slots(
        ex.external_gradients(model, tokenizer, phrasings, [SOURCE_LAYER], 32, position="each", slots=K)[0]
    )
    history = inputs.train_items[inputs.train_items["domain"] == "history"].reset_index(drop=True)
    train_years = inputs.train_items[inputs.train_items["target"].str.fullmatch(YEAR)]
    val_random = random_years(val_years, 1, seed=1)
    val_random_grads = each_gradients(model, tokenizer, val_random)
    print(
        f"{len(train_years)} training years, {len(val_years)} validation years; {n_rows} stage rows",
        flush=True,
    )
    for n in counts:
        extra = random_years(train_years, n, seed=0) if n else train_years.iloc[:0]
        extra = extra.assign(row=n_rows + np.arange(len(extra)))
        all_grads = np.concatenate([grads, each_gradients(model, tokenizer, extra)]) if n else grads
        by_id = dict(zip(inputs.train_items["id"], inputs.negatives, strict=True))
        negatives = list(inputs.negatives) + [by_id[i.split("~")[0]] for i in extra["id"]]
        augmented = dataclasses.replace(
            inputs, train_items=pd.concat([inputs.train_items, extra], ignore_index=True), negatives=negatives
        )
        config = DescriberConfig(
            source_layer=SOURCE_LAYER,
            inject_layer=15,
            k=LAST_SLOTS + K - 1,
            init="lens",
            lora_rank=8,
            precision="bf16",
            read="each",
        )
        (val, vy, vr, fit, new), seconds = train_and_score(
            config,
            epochs,
            augmented,
            [
                (all_grads, scored_items),
                (all_grads, val_years),
                (val_random_grads, val_random.assign(row=np.arange(len(val_random)))),
                (all_grads, history),
                (ext_grads, phrasings),
            ],
            options,
        )
        print(
            f"y{n} (+{len(extra)} rows, {seconds:.0f} s): validation {report(val, scored_items, seen)}; "
            f"validation years {rates(vy)}; validation prompts, random years {rates(vr)}; "
            f"history's training items {report(fit, history)}; new phrasings (not for the choice) "
            f"{report(new, phrasings)}",
            flush=True,
        )


if __name__ == "__main__":
    main(float(sys.argv[1]), [int(n) for n in sys.argv[2:]])
