"""Is every digit of a year in the gradient? Linear probes per digit of the target year (run once by hand).

Usage: python scripts/probe_years.py [BLOCK ...]   (default: blocks 7 15 22, the gradients stage's depths)
Reads every year fact of data/facts/history.csv (not the corrections stage's sample), in both directions (target =
the right year, or the wrong one), and takes the gradients stage's gradients (last prompt position) and activations
at each block. Facts are split 70/30 (seeded); a logistic-regression probe (gradsense.analysis.probe_predictions) is
fit per digit of the target year (thousands, hundreds, tens, units) on the first part and scored on the rest, beside
the same probe on the activations (which hold what the model believes, not the target of a counterfactual) and on
shuffled labels, on the gradient summed over the target-predicting positions (gradients.position =
target), and on the gradient at the position that predicts that digit (what a reading of every
target-predicting position would see), and Backward Lens (−g through the final norm and unembedding, no training) at
that position, its first choice among the ten digits. A digit the gradient probe cannot read above its controls is not linearly in the gradient at that
position, whatever a describer is trained on.

Measured (SmolLM2-135M, 188 year facts, 112 held-out items; a year tokenises as a bare space, then one token per
digit, so the last prompt position predicts only the space): the whole year is read from the last-position gradient
(what the describer reads) for 0.009 / 0.036 / 0.071 of held-out items at blocks 7 / 15 / 22 (block 22: hundreds
0.64, tens 0.29, units 0.30 against majority 0.39 / 0.09 / 0.18); summed over the target positions 0.03 / 0.09 /
0.12; from the gradient at the position that predicts each digit 0.15 / 0.27 / 0.55 (block 22: 0.81 / 0.75 / 0.83);
Backward Lens at those positions, untrained, 0.00 / 0.04 / 0.12 (block 22: 0.54 / 0.65 / 0.69).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

import gradsense
from gradsense.analysis import lens_ranks, model_lens, probe_predictions
from gradsense.gradients import correction_gradients

DIGITS = ("thousands", "hundreds", "tens", "units")


def year_items(path: str = "data/facts/history.csv") -> pd.DataFrame:
    """Both directions of every history fact whose answers are four-digit years."""
    facts = pd.read_csv(path, dtype=str, keep_default_na=False)
    facts = facts[facts["right"].str.fullmatch(r"\d{4}") & facts["wrong"].str.fullmatch(r"\d{4}")]
    facts = facts.reset_index(drop=True).assign(fact=lambda f: np.arange(len(f)))
    rows = [
        {"fact": f.fact, "prompt": f.relation.format(f.subject), "target": target, "direction": direction}
        for f in facts.itertuples()
        for target, direction in ((f.right, "correct"), (f.wrong, "counterfactual"))
    ]
    return pd.DataFrame(rows).assign(id=lambda t: np.arange(len(t)))


def main(layers: list[int]) -> None:
    """Print one row per (block, digit): gradient, activation and shuffled-label probe accuracy on held-out facts."""
    items = year_items()
    model, tokenizer = gradsense.load_model(None)
    # One pass: the gradient at each of the 5 target-predicting positions (a bare space, then one per digit).
    each = correction_gradients(model, tokenizer, items, layers, "each", progress=False, slots=5)
    if (each.n_target_tokens != 5).any():
        raise SystemExit("a year should be 5 target tokens (space + 4 digits)")
    last, summed, per_digit = each.grads[:, :, 0], each.grads.sum(2), each.grads[:, :, 1:].transpose(0, 2, 1, 3)
    acts = each.acts[:, :, 0]  # the activation at the last prompt position
    held = np.random.default_rng(0).permutation(items["fact"].max() + 1)[: int(0.3 * (items["fact"].max() + 1))]
    test = items["fact"].isin(held).to_numpy()
    train = ~test
    counterfactual = (items["direction"] == "counterfactual").to_numpy()[test]
    print(f"{items['fact'].nunique()} year facts, {len(items)} items: {train.sum()} probe-train, {test.sum()} held out")
    rows = []
    for i_layer, layer in enumerate(each.layers):
        whole: dict[str, np.ndarray] = {}
        for i, name in enumerate(DIGITS):
            digit = items["target"].str[i].to_numpy()
            truth = digit[test]
            majority = pd.Series(digit[train]).value_counts().idxmax()
            row = {"block": layer, "digit": name, "majority": float(np.mean(truth == majority))}
            tokens = np.tile(tokenizer.convert_tokens_to_ids(list("0123456789")), (int(test.sum()), 1))
            ranks = lens_ranks(-per_digit[i_layer][i][test], tokens, *model_lens(model))
            lens_right = np.array(list("0123456789"))[ranks.argmin(1)] == truth
            row["Backward Lens at its position"] = float(lens_right.mean())
            whole["Backward Lens at its position"] = whole.get("Backward Lens at its position", True) & lens_right
            for what, x, shuffle in (
                ("gradient", last[i_layer], False),
                ("activation", acts[i_layer], False),
                ("shuffled", last[i_layer], True),
                ("gradient summed over the target", summed[i_layer], False),
                ("gradient at its position", per_digit[i_layer][i], False),
            ):
                right = probe_predictions(x, digit, train, test, seed=0, shuffle=shuffle) == truth
                row[what] = float(right.mean())
                whole[what] = whole.get(what, np.ones_like(right)) & right
                if what in ("gradient", "activation"):
                    row[f"{what} cf"] = float(right[counterfactual].mean())
            rows.append(row)
        rows.append({"block": layer, "digit": "whole year", **{w: float(r.mean()) for w, r in whole.items()}})
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [7, 15, 22])
