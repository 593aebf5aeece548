"""Are a year's digits legible in the gradient at any block? The Backward Lens per block (run once by hand; not a stage).

Usage: python scripts/lens_years.py BLOCK [BLOCK ...]
Needs the pipeline's corrections, gradients and oracle outputs under results/. `probe_year_copy.py` found that the
Backward Lens on block-22 gradients names 0.03 of a year's digits in place. This asks whether another block does
better: for each BLOCK, the per-position gradients (−g at the position that predicts digit j, final norm,
unembedding) of the validation-split year prompts with their own years and with random years (seed 1, four a
prompt), and of the training years; beside them the training items whose target is not a year (first target token,
hit@1), the reading that works at block 22.

Measured 2026-12-05 (2-core Intel Xeon with AMX, `python scripts/lens_years.py 1 8 15 22 26 29`; 15 validation
years, 60 random, 68 training years, 1447 word targets), digits in place / whole years, then words' first token:
- blocks 1, 8, 15: 0.00 / 0.00 everywhere; words 0.00, 0.00, 0.01;
- block 22: validation 0.00 / 0.00, random 0.03 / 0.00, training 0.00 / 0.00; words 0.83;
- block 26: validation 0.25 / 0.00, random 0.40 / 0.00, training 0.29 / 0.00; words 0.96;
- block 29: validation 0.73 / 0.20, random 0.78 / 0.45, training 0.67 / 0.15; words 0.17.
Year digits become legible only after block 22; block 26 reads words best of all. A describer reading block-26
gradients is the next thing to try (`train.source_layer` was chosen between blocks 15 and 22 only).
"""

from __future__ import annotations

import sys

import numpy as np
from probe_year_copy import K, lens_digits  # scripts/ is on the path of a script run from it
from select_source_layer import selection_inputs
from select_years import YEAR, random_years

import gradsense
from gradsense.analysis import lens_ranks, model_lens
from gradsense.gradients import correction_gradients
from gradsense.scoring import target_text


def block_gradients(model, tokenizer, items, blocks: list[int]) -> np.ndarray:
    """(len(blocks), n, K, d) per-position gradients of the items' (prompt, target) at each block, in item order."""
    return correction_gradients(model, tokenizer, items, blocks, "each", 32, slots=K).grads


def first_token_hits(model, tokenizer, grads: np.ndarray, targets) -> float:
    """Share of items whose first target token is the Backward Lens's top token at the first target position."""
    norm, unembed = model_lens(model)
    first = np.array([[tokenizer(target_text(t), add_special_tokens=False)["input_ids"][0]] for t in targets])
    return float(np.mean(lens_ranks(-grads[:, 0], first, norm, unembed)[:, 0] == 0))


def main(blocks: list[int]) -> None:
    """Print, per block, the digits (and whole years) the Backward Lens reads, beside its hit@1 on word targets."""
    inputs = selection_inputs()
    model, tokenizer = gradsense.load_model(None)
    is_year = inputs.train_items["target"].str.fullmatch(YEAR)
    train_years = inputs.train_items[is_year].reset_index(drop=True)
    words = inputs.train_items[~is_year].reset_index(drop=True)
    val_years = inputs.val_pool[inputs.val_pool["target"].str.fullmatch(YEAR)].reset_index(drop=True)
    scored = random_years(val_years, 4, seed=1)
    sets = {"validation years": val_years, "random years": scored, "training years": train_years}
    grads = {name: block_gradients(model, tokenizer, items, blocks) for name, items in sets.items()}
    word_grads = block_gradients(model, tokenizer, words, blocks)
    print(f"{len(val_years)} validation years, {len(scored)} random, {len(train_years)} training; {len(words)} words")
    for b, block in enumerate(blocks):
        read = {name: lens_digits(model, tokenizer, grads[name][b], items["target"]) for name, items in sets.items()}
        cells = "; ".join(f"{name} digits {d:.2f} / whole {w:.2f}" for name, (d, w) in read.items())
        words_hit = first_token_hits(model, tokenizer, word_grads[b], words["target"])
        print(f"block {block}: {cells}; word targets, first token hit@1 {words_hit:.2f}", flush=True)


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]])
