"""Choose which gradient positions the describer reads, on the validation split (run once by hand; not a stage).

Usage: python scripts/select_read.py EPOCHS SPEC [SPEC ...] [--source BLOCK] [--digits BLOCK]
       SPEC = (last|each|sum|both)<k>[h<r>], e.g. last4 each6 last4h3 both6h3; --source: the block read (default 22);
       --digits: the block whose target-position gradients a `both` spec's extra slots read (default: --source)
Needs the pipeline's corrections, gradients and oracle outputs under results/. For each spec, trains the train
stage's describer (params.yaml settings: linear projector reading --source, lens init, injected at block 15, LoRA 8,
bfloat16) with k slots that read either the last prompt position's gradient (`last`, every slot from the same
vector, as the pipeline) or one target-predicting position each (`each`: slot j reads the gradient at the position
that predicts target token j, the last repeated for shorter targets; `sum`: every slot from the gradient summed
over the target-predicting positions, `gradients.position: target`; `both`: four slots read the last prompt
position, as `last4`, and one slot each reads target positions 2 … k, so 3 + k slots), and prints domain accuracy
and answer recall on 200 validation-split items (trained templates and domains), for history alone and for targets
that are years. The choice is made on those numbers. A suffix h<r> draws every history training item r times per pass
(`train.domain_repeats`, the same number of steps), and every spec is also scored on history's own training items
(does the describer fit them?). For the record only, it also prints the same on the external new-phrasings set
(never trained on, not used for the choice); the test split is never read.

Run for the full paper (2026-12-03, 2-core Xeon with AMX, 1 epoch = 113 steps, 200 validation items of which 22
history and 5 years; labels of the last-position oracle, so only 19 training items were years):
- last, k = 4: domain 0.860, answer 0.800 (unseen answers 5/27); history 0.227 / 0.091; new phrasings 0.66 / 0.46;
- each, k = 4: domain 0.870, answer 0.750 (3/27);                  history 0.273 / 0.000; new phrasings 0.52 / 0.39;
- each, k = 6: domain 0.865, answer 0.735 (2/27);                  history 0.182 / 0.000; new phrasings 0.53 / 0.38;
hence `train.read` stayed `last`: reading every target position did not help (it cost 0.05 answer recall on
validation), and it could not teach years that training never showed (years were `unclear` labels, left out).

Run again on the labels of the whole-target oracle step (2026-12-04, 2-core AMD EPYC without AMX, years now in
training: 171 history training items; 200 validation items of which 22 history and 10 years; `python
scripts/select_read.py 1 each6 last4`, then `3 each6 last4`):
- 1 epoch, each, k = 6: domain 0.840, answer 0.735 (1/28); history 0.045 / 0.000, years 0/10; new phrasings 0.41 / 0.33;
- 1 epoch, last, k = 4: domain 0.815, answer 0.760 (1/28); history 0.045 / 0.000, years 0/10; new phrasings 0.49 / 0.37;
- 3 epochs, each, k = 6 (779 s): domain 0.860, answer 0.805 (2/28); history 0.136 / 0.000, years 0/10; new
  phrasings 0.49 / 0.42;
- 3 epochs, last, k = 4 (794 s): domain 0.890, answer 0.825 (1/28); history 0.318 / 0.000, years 0/10; new
  phrasings 0.60 / 0.45;
hence `train.read` stays `last`. With years in training and the main budget, the per-position reading still names
no validation year (0 of 10) and reads history's domain less often (0.14 against 0.32), though a linear probe reads
whole years from the same per-position gradients for 0.55 of held-out facts (`probe_years.py`): what the gradient
holds, this describer does not learn to say.
The target-summed gradient, the same machine and labels (2026-12-04, `python scripts/select_read.py 3 sum4`; the
gradient a year's last prompt position gets is tiny, median ‖g‖ 0.017 at block 22 over the 112 year items against
0.179 over the other 2,888, because that position only predicts a bare space):
- 3 epochs, sum, k = 4 (888 s): domain 0.845, answer 0.830 (2/28); history 0.045 / 0.045, years 0/10; new
  phrasings 0.58 / 0.44;
hence `train.read` stays `last` again: against last4 above, answer recall is level (+0.005), the domain falls 0.045
and history's domain falls from 0.32 to 0.05, and still no year is named. Reading the digits' positions, summed or
one slot each, does not teach this describer years.
With block 26 as the source (2026-12-06, 2-core Intel Xeon with AMX, 1 epoch, 200 validation items of which 22
history and 10 years; `--source 26`, then `--source 26 --digits 29`: the Backward Lens reads a year's digits in place
at 0.25–0.40 from block 26 and 0.67–0.78 from block 29, `lens_years.py`):
- both, k = 6, block 26: domain 0.915, answer 0.820 (3/28); history 0.545 / 0.045, years 0/10; history's training
  items 0.497 / 0.094, their 68 years 0.338 / 0.000; new phrasings 0.61 / 0.47;
- both, k = 6, last slots block 26, target slots block 29 (222 s): domain 0.865, answer 0.830 (4/28); history 0.136 /
  0.045, years 0/10; history's training items 0.398 / 0.111, their years 0.221 / 0.000; new phrasings 0.60 / 0.53;
hence no year either way: digits that the lens reads from block 29 are not said by the describer after one epoch,
not even for the training years, and history's domain falls (0.55 → 0.14) when the target slots read block 29.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
from select_init import (
    at_rows,
    rates,
    scoring_sets,
    stage_gradients,
    train_and_score,
)  # scripts/ is on the path of a script run from it
from select_source_layer import selection_inputs

import gradsense
from gradsense import external as ex
from gradsense.describer import DescriberConfig
from gradsense.gradients import correction_gradients, slot_gradients

SOURCE_LAYER = 22
LAST_SLOTS = 4  # slots that read the last prompt position in a `both` spec (the pipeline's k)


def item_gradients(
    model, tokenizer, items, slots: int, position: str = "each", source: int = SOURCE_LAYER
) -> np.ndarray:
    """Block-`source` gradients of the items' (prompt, target), in their order: (n, slots, d), one per
    target-predicting position (position "each"), or (n, d) summed over them (position "target")."""
    return correction_gradients(model, tokenizer, items, [source], position, 32, slots=slots).grads[0]


def position_gradients(
    model, tokenizer, items, n_rows: int, slots: int, position: str = "each", source: int = SOURCE_LAYER
) -> np.ndarray:
    """`item_gradients` filled at the items' rows of an (n_rows, …) array."""
    grads = item_gradients(model, tokenizer, items, slots, position, source)
    return at_rows(grads, items["row"].to_numpy(), n_rows)


def with_last_slots(grads: np.ndarray) -> np.ndarray:
    """Per-position gradients (n, k, d) → (n, LAST_SLOTS + k − 1, d), as `slot_gradients` returns them from one
    block: the first position (the last prompt token's, what `last` reads) in LAST_SLOTS slots, then target
    positions 2 … k one slot each."""
    return np.concatenate([np.repeat(grads[:, :1], LAST_SLOTS, axis=1), grads[:, 1:]], axis=1)


def report(scored, items, seen=None) -> str:
    """All rows, then history alone and targets that are years."""
    history = (items["domain"] == "history").to_numpy()
    years = items["target"].str.fullmatch(r"\d{3,4}").to_numpy()
    return (
        f"{rates(scored, seen)}; history {rates(scored[history])}; years {rates(scored[years])}"
        if years.any()
        else f"{rates(scored, seen)}; history {rates(scored[history])}"
    )


def main(epochs: float, specs: list[str], source: int = SOURCE_LAYER, digits: int | None = None) -> None:
    """Train and score one describer per spec on the validation split (and, for the record, the new phrasings)."""
    inputs = selection_inputs()
    scored_items, seen, phrasings, options = scoring_sets(inputs)
    model, tokenizer = gradsense.load_model(None)  # gradients come from the frozen model
    needed = inputs.stage.items[
        inputs.stage.items["row"].isin(
            np.concatenate([inputs.train_items["row"], inputs.val_set["row"], scored_items["row"]])
        )
    ]
    n_rows = len(inputs.stage.arrays["ids"])
    history = inputs.train_items[inputs.train_items["domain"] == "history"].reset_index(drop=True)
    for spec in specs:
        match = re.fullmatch(r"(last|each|sum|both)(\d+)(?:h(\d+))?", spec)
        if match is None or match[3] == "0":
            raise SystemExit(f"spec {spec!r} is not (last|each|sum|both)<k>[h<r>] with r ≥ 1")
        read, k, repeats = match[1], int(match[2]), int(match[3] or 1)
        if digits is not None and read != "both":
            raise SystemExit(f"--digits is read by `both` specs only, not by {spec!r}")
        slots = k + LAST_SLOTS - 1 if read == "both" else k
        if read == "last":
            grads = stage_gradients(model, tokenizer, inputs, source)
            ext_grads = ex.external_gradients(model, tokenizer, phrasings, [source], 32)[0]
        elif read == "sum":  # one vector per row, as `last`: the gradient summed over the target positions
            grads = position_gradients(model, tokenizer, needed, n_rows, k, "target", source)
            ext_grads = ex.external_gradients(model, tokenizer, phrasings, [source], 32, position="target")[0]
        elif read == "each":
            grads = position_gradients(model, tokenizer, needed, n_rows, k, source=source)
            ext_grads = ex.external_gradients(model, tokenizer, phrasings, [source], 32, position="each", slots=k)[0]
        else:  # both: the last prompt position's (block `source`) in LAST_SLOTS slots, then target positions 2 … k
            both = {"source": source, "digits": digits, "last_slots": LAST_SLOTS, "slots": k}
            grads = at_rows(slot_gradients(model, tokenizer, needed, **both), needed["row"].to_numpy(), n_rows)
            ext_grads = slot_gradients(model, tokenizer, phrasings, **both, progress=False)
        config = DescriberConfig(
            source_layer=source,
            inject_layer=15,
            k=slots,
            init="lens",
            lora_rank=8,
            precision="bf16",
            read="last" if read in ("last", "sum") else "each",  # a summed gradient is one vector per row
        )
        (val, fit, new), seconds = train_and_score(
            config,
            epochs,
            inputs,
            [(grads, scored_items), (grads, history), (ext_grads, phrasings)],
            options,
            domain_repeats={"history": repeats},
        )
        print(
            f"{spec} source {source}{f' digits {digits}' if read == 'both' and digits else ''} ({seconds:.0f} s): validation {report(val, scored_items, seen)}; history's training items "
            f"{report(fit, history)}; new phrasings (not for the choice) {report(new, phrasings)}",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Choose which gradient positions the describer reads, on validation.")
    parser.add_argument("epochs", type=float)
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--source", type=int, default=SOURCE_LAYER, help="the block whose gradients are read")
    parser.add_argument("--digits", type=int, default=None, help="the block a `both` spec's target slots read")
    args = parser.parse_args()
    main(args.epochs, args.specs, args.source, args.digits)
