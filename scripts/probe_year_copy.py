"""Can this describer copy a year out of the gradient at all? Trained on years alone (run once by hand; not a stage).

Usage: python scripts/probe_year_copy.py EPOCHS N BLOCK [BLOCK ...] [--control-share S] [--source B]   N = random
years per training year; S = share of each batch that is a noise or no-injection control row (default 0.2, as
select_init); B = the block whose per-position gradients are read (default 22)
Needs the pipeline's corrections, gradients and oracle outputs under results/. `select_years.py` found that random
year targets added to the whole training set are fitted, not read. This isolates the reading: the training rows are
the 68 training items whose target is a year and N copies of each with a random year target (seeded), nothing else
(plus the usual control rows and passages); the describer is `both6` (four slots read the last prompt position, one
slot each target positions 2 … 6) injected at each BLOCK. Scored on validation-split year prompts (never trained on)
with random years as targets (seed 1, four a prompt) and on their own years, by answer recall and by digits right
in place. The Backward Lens on the same per-position gradients (−g at the position predicting digit j, final norm,
unembedding) gives the digits the gradient itself names: the ceiling of a reader that copies.

Measured 2026-12-05 (2-core Intel Xeon with AMX; 68 training years + 816 random-year copies; scored on 60 random-year
rows on 15 validation prompts). The Backward Lens reads 0.03 of the random years' digits at their own positions
(0.00 whole years) and 0.00 of the true years'. `3 12 15 1` (control share 0.2): at block 15 (300 s) and block 1
(417 s) answer 0 of 60, domain 0, digits 0.01; even training rows come out `domain: none | from: <none> | to:
<none>`, and teacher-forced the trained describer gives the "no pressure" label a higher mean log p (−0.004 to −0.23)
than a row's own label (−0.37 to −0.93): year gradients look like the control rows. `3 12 15 --control-share 0`
(232 s): years come out, in the wrong field (the domain slot holds a year; domain 0 of 60), answer 2 of 60, digits
0.47 against 0.33 by chance (another prompt's target), their true years 0 of 15 / digits 0.40, training rows 8 of
60 / digits 0.62. Without controls the describer copies a little of a year it never saw, far from reading it.

**Block 29, where the lens reads digits (2026-12-06, same machine, `3 12 15 26 --source 29`, control share 0.2):** the
Backward Lens names 0.78 of the random years' digits in place and 0.45 of whole random years (true years 0.73 /
0.20). Injected at block 15 (303 s), the describer says **50 of the 60 random years it never saw** (digits 0.90,
chance 0.31), 9 of the 15 true years (digits 0.77), training rows 49 of 60 — more than the lens — though with
`domain: none` on every row; injected at block 26 (196 s), 0 of 60 (digits 0.30, chance 0.25). A year is copied
once its digits are legible in the gradient read (block 29, not 22) and the vectors enter early enough (block 15).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pandas as pd
from select_init import rates, train_and_score  # scripts/ is on the path of a script run from it
from select_read import LAST_SLOTS, SOURCE_LAYER, item_gradients, with_last_slots
from select_source_layer import selection_inputs
from select_years import YEAR, random_years

import gradsense
from gradsense.analysis import lens_ranks, model_lens
from gradsense.describer import DescriberConfig
from gradsense.scoring import target_text

K = 6  # target positions read: a bare space and four digits


def digits_right(reported: pd.Series, targets: pd.Series) -> float:
    """Mean share of a target year's digits that the reported `to` has in the same place."""
    shares = []
    for to, year in zip(reported.fillna(""), targets, strict=True):
        to = str(to).strip()
        shares.append(sum(a == b for a, b in zip(to, year)) / len(year))
    return float(np.mean(shares)) if shares else float("nan")


def lens_digits(model, tokenizer, grads: np.ndarray, targets: pd.Series) -> tuple[float, float]:
    """(share of digits, share of whole years) the Backward Lens reads at their own positions from (n, K, d) grads."""
    hits, whole = [], []
    norm, unembed = model_lens(model)
    for g, year in zip(grads, targets, strict=True):
        ids = tokenizer(target_text(year), add_special_tokens=False)["input_ids"]
        ok = [lens_ranks(-g[j : j + 1], np.array([[t]]), norm, unembed)[0, 0] == 0 for j, t in enumerate(ids[:K])]
        digit_ok = [o for o, t in zip(ok, ids[:K]) if tokenizer.decode([t]).strip()]
        hits += digit_ok
        whole.append(all(digit_ok))
    return float(np.mean(hits)), float(np.mean(whole))


def main(epochs: float, n: int, blocks: list[int], control_share: float, source: int = SOURCE_LAYER) -> None:
    """Train one years-only describer per injection block and score it on unseen year prompts."""
    inputs = selection_inputs()
    model, tokenizer = gradsense.load_model(None)  # gradients come from the frozen model
    train_years = inputs.train_items[inputs.train_items["target"].str.fullmatch(YEAR)].reset_index(drop=True)
    val_years = inputs.val_pool[inputs.val_pool["target"].str.fullmatch(YEAR)].reset_index(drop=True)
    extra = random_years(train_years, n, seed=0)
    choose = random_years(val_years, 1, seed=2)  # validation loss only (the last step is kept)
    scored = random_years(val_years, 4, seed=1)
    parts = [train_years, extra, choose, scored, val_years]
    rows = np.cumsum([0] + [len(p) for p in parts])
    parts = [p.assign(row=np.arange(a, b)) for p, a, b in zip(parts, rows[:-1], rows[1:], strict=True)]
    train_years, extra, choose, scored, val_years = parts
    raw = item_gradients(model, tokenizer, pd.concat(parts, ignore_index=True), K, source=source)  # (rows, K, d)
    grads = with_last_slots(raw)
    lens_scored = lens_digits(model, tokenizer, raw[scored["row"].to_numpy()], scored["target"])
    lens_true = lens_digits(model, tokenizer, raw[val_years["row"].to_numpy()], val_years["target"])
    print(
        f"{len(train_years)} training years + {len(extra)} random; scored: {len(scored)} random-year rows on "
        f"{len(val_years)} validation prompts; block {source} read. Backward Lens digits / whole years: random {lens_scored[0]:.2f} / "
        f"{lens_scored[1]:.2f}, true {lens_true[0]:.2f} / {lens_true[1]:.2f}",
        flush=True,
    )
    by_id = dict(zip(inputs.train_items["id"], inputs.negatives, strict=True))
    train_rows = pd.concat([train_years, extra], ignore_index=True)
    years_only = dataclasses.replace(
        inputs,
        train_items=train_rows,
        val_set=choose,
        negatives=[by_id[i.split("~")[0]] for i in train_rows["id"]],
    )
    options = {
        "seed": 0,
        "batch_size": 64,
        "max_new_tokens": 0,
        "domains": sorted(inputs.stage.items["domain"].unique()),
    }
    for block in blocks:
        config = DescriberConfig(
            source_layer=source,
            inject_layer=block,
            k=LAST_SLOTS + K - 1,
            init="lens",
            lora_rank=8,
            precision="bf16",
            read="each",
        )
        (rand, true, fit), seconds = train_and_score(
            config,
            epochs,
            years_only,
            [(grads, scored), (grads, val_years), (grads, extra.iloc[:60])],
            options,
            select_on_val=False,  # the last step: unseen years may never lower the validation loss
            control_share=control_share,
        )
        print(
            f"block {block}, control share {control_share} ({seconds:.0f} s): validation prompts, random years {rates(rand)} digits "
            f"{digits_right(rand['reported_to'], scored['target']):.2f}; their true years {rates(true)} digits "
            f"{digits_right(true['reported_to'], val_years['target']):.2f}; training rows {rates(fit)} digits "
            f"{digits_right(fit['reported_to'], extra['target'].iloc[:60]):.2f}; chance (random years, another "
            f"prompt's target) digits {digits_right(rand['reported_to'], np.roll(scored['target'], 4)):.2f}; "
            f"domains said {rand['reported_domain'].value_counts(dropna=False).to_dict()}; e.g. "
            f"{list(zip(scored['target'][:6], rand['reported_to'][:6], strict=True))}",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("epochs", type=float)
    parser.add_argument("n", type=int, help="random years per training year")
    parser.add_argument("blocks", type=int, nargs="+", help="injection blocks, one describer each")
    parser.add_argument("--control-share", type=float, default=0.2, help="share of control rows per batch")
    parser.add_argument("--source", type=int, default=SOURCE_LAYER, help="the block whose gradients are read")
    args = parser.parse_args()
    main(args.epochs, args.n, args.blocks, args.control_share, args.source)
