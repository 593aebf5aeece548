"""Choose the projector's initialisation and injection block on the validation split (run once by hand; not a stage).

Usage: python scripts/select_init.py EPOCHS SPEC [SPEC ...] [--source BLOCK [BLOCK]] [--seeds SEED ...]
       SPEC = BLOCK[L][R<rank>], e.g. 1 15 15L 22L 1 1L 15LR8; --source: the blocks the describer reads (default 22;
       a block the gradients stage did not extract is computed here for the stage's items, as the stage does; two
       blocks: the first minus the second, paired on the validation items); --seeds: one describer per seed
Needs the pipeline's corrections, gradients and oracle outputs under results/. For each spec, trains the train
stage's describer (params.yaml settings: linear projector reading --source, bfloat16) injected at BLOCK, with the
lens init when the spec has an L (every slot starts as −g) and PyTorch's random init otherwise, with LoRA of that
rank on the model when it ends in R<rank> (a freshly loaded model per spec), and prints domain
accuracy and answer recall on 200 validation-split items (trained templates and domains), split by whether the
answer is among the training answers. The choice is made on those numbers. For the record only, it also prints the
same on the external new-phrasings set (never trained on, not used for the choice); the test split is never read.

Run for the full paper (2026-12-02, 2-core AMD EPYC, 1 epoch = 113 steps each, 200 validation items, 27 of them with
an answer no training item has):
- block 15 random: domain 0.79, answer 0.475 (unseen answers 0/27); new phrasings 0.46 / 0.06;
- block 15 lens:   domain 0.81, answer 0.625 (1/27);                  new phrasings 0.50 / 0.23;
- block 22 lens:   domain 0.73, answer 0.605 (1/27);                  new phrasings 0.41 / 0.31;
- block 1 random:  domain 0.73, answer 0.335 (0/27); block 1 lens: domain 0.67, answer 0.24 (0/27);
hence `train.init: lens` at `inject_layer` block 15. Then with LoRA on blocks 15–29 (q, v; same day and machine,
about 3 min per spec):
- block 15 lens, LoRA 8:    domain 0.885, answer 0.81 (5/27);   new phrasings 0.66 / 0.44;
- block 15 random, LoRA 8:  domain 0.87, answer 0.565 (0/27);   new phrasings 0.58 / 0.16;
- block 15 lens, LoRA 32:   domain 0.90, answer 0.82 (5/27);    new phrasings 0.59 / 0.43;
- block 8 lens, LoRA 8:     domain 0.84, answer 0.61 (0/27);    new phrasings 0.56 / 0.16;
hence `train.lora_rank: 8` (rank 32 is within 3 of the 200 items, for 4× the adapter).
Reading block-26 gradients against block 22, three seeds each, paired on the same 200 validation items (2026-12-06,
2-core Intel Xeon with AMX, `1 15LR8 --source 26 22 --seeds 0 1 2`, one run at a time, about 3 min each):
- source 26: domain 0.880 / 0.830 / 0.910, answer 0.810 / 0.815 / 0.825 (unseen answers 1, 2, 1 of 28);
  new phrasings 0.59 / 0.47, 0.51 / 0.43, 0.55 / 0.51;
- source 22: domain 0.825 / 0.835 / 0.895, answer 0.760 / 0.780 / 0.780 (1, 2, 2 of 28);
  new phrasings 0.51 / 0.39, 0.57 / 0.42, 0.54 / 0.44;
- 26 − 22 (items' seed means, items resampled): answer +0.043 [+0.020, +0.068] (per seed +0.050, +0.035, +0.045),
  domain +0.022 [−0.002, +0.045] (+0.055, −0.005, +0.015);
hence `train.source_layer: 0.875` (block 26), which the gradients stage now extracts.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
from select_source_layer import selection_inputs, train_describer  # scripts/ is on the path of a script run from it

import gradsense
from gradsense import evaluate as ev
from gradsense import external as ex
from gradsense.describer import DescriberConfig
from gradsense.gradients import correction_gradients
from gradsense.sampling import stratified
from gradsense.stats import paired_difference
from gradsense.training import TrainConfig

SOURCE_LAYER = 22


def rates(scored, seen: np.ndarray | None = None) -> str:
    """Domain accuracy and answer recall of scored rows (and answer recall on answers unseen in training)."""
    text = f"domain {scored['domain_ok'].mean():.3f} answer {scored['answer_ok'].mean():.3f}"
    if seen is not None and (~seen).any():
        text += f" (unseen answers {int(scored['answer_ok'][~seen].sum())}/{int((~seen).sum())})"
    return text + f" n = {len(scored)}"


def scoring_sets(inputs) -> tuple:
    """(200 validation items spread over the domains, whether each answer is a training answer, the new-phrasings
    set with its rows, the `describe_items` options) that every selection script scores on."""
    scored_items = stratified(inputs.val_pool, "domain", 200, order="shuffle", seed=0)
    seen = ev.seen_answers(scored_items["target"], inputs.train_items["target"])
    external = ex.external_items(max_items=160, seed=0)
    phrasings = external[external["set"] == ex.NEW_PHRASINGS].reset_index(drop=True)
    phrasings = phrasings.assign(row=np.arange(len(phrasings)))
    domains = sorted(inputs.stage.items["domain"].unique())
    return scored_items, seen, phrasings, {"seed": 0, "batch_size": 64, "max_new_tokens": 0, "domains": domains}


def train_only(config: DescriberConfig, epochs: float, inputs, grads: np.ndarray, **train_options) -> tuple:
    """Train the train stage's describer (a freshly loaded model: LoRA changes it in place) on `grads` for `epochs`
    (and any other `TrainConfig` settings given); returns the describer and the seconds it took."""
    model, tokenizer = gradsense.load_model(None)
    defaults = {"batch_size": 16, "control_share": 0.2, "context_share": 0.75, "hard_share": 0.3, "eval_every": 35}
    train = TrainConfig(epochs=epochs, **{**defaults, **train_options})
    start = time.perf_counter()
    describer = train_describer(model, tokenizer, inputs, grads, config, train)
    return describer, time.perf_counter() - start


def train_and_score(
    config: DescriberConfig, epochs: float, inputs, scored: list, options: dict, **train_options
) -> tuple[list, float]:
    """`train_only` on the first entry's gradients, then score each (gradients, items[, control]) entry of `scored`
    (control "gradient" unless named); returns the scored tables and the seconds it took."""
    start = time.perf_counter()
    describer, _ = train_only(config, epochs, inputs, scored[0][0], **train_options)
    tables = [ev.describe_items(describer, grads, items, *control, **options) for grads, items, *control in scored]
    return tables, time.perf_counter() - start


def at_rows(grads: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    """`grads` (one per item) placed at the items' `rows` of an (n_rows, …) zero array, the stage's row order."""
    out = np.zeros((n_rows, *grads.shape[1:]), dtype=np.float32)
    out[rows] = grads
    return out


def stage_gradients(model, tokenizer, inputs, source: int) -> np.ndarray:
    """(n, d) last-position gradients of the stage's items at block `source`, one row per item row: the gradients
    stage's own for a block it extracted, computed here (as that stage does) for any other block."""
    if source in [int(x) for x in inputs.stage.arrays["layers"]]:
        return inputs.stage.vectors("grads", source)
    items = inputs.stage.items
    grads = correction_gradients(model, tokenizer, items, [source], "last", 32).grads[0]
    return at_rows(grads, items["row"].to_numpy(), int(items["row"].max()) + 1)


def main(epochs: float, specs: list[str], sources: list[int], seeds: list[int]) -> None:
    """Train and score one describer per source, spec and seed on the validation split (and, for the record, the new
    phrasings); with two sources, the first minus the second paired on the validation items (seed-averaged per item,
    items resampled)."""
    inputs = selection_inputs()
    scored_items, seen, phrasings, options = scoring_sets(inputs)
    model, tokenizer = gradsense.load_model(None)  # the gradients of the external set come from the frozen model
    sets = {
        s: (
            stage_gradients(model, tokenizer, inputs, s),
            ex.external_gradients(model, tokenizer, phrasings, [s], 32)[0],
        )
        for s in sources
    }
    del model
    per_item: dict[tuple[int, str], list] = {}
    for spec in specs:
        match = re.fullmatch(r"(\d+)(L?)(?:R(\d+))?", spec)
        if match is None:
            raise SystemExit(f"spec {spec!r} is not BLOCK[L][R<rank>]")
        for source, (grads, ext_grads) in sets.items():
            config = DescriberConfig(
                source_layer=source,
                inject_layer=int(match[1]),
                k=4,
                init="lens" if match[2] else "random",
                lora_rank=int(match[3] or 0),
                precision="bf16",
            )
            for seed in seeds:
                (val, new), seconds = train_and_score(
                    config, epochs, inputs, [(grads, scored_items), (ext_grads, phrasings)], options, seed=seed
                )
                per_item.setdefault((source, spec), []).append(val)
                print(
                    f"source {source} block {config.inject_layer} {config.init} LoRA {config.lora_rank} seed {seed} "
                    f"({seconds:.0f} s): validation {rates(val, seen)}; new phrasings (not for the choice) {rates(new)}",
                    flush=True,
                )
    if len(sources) == 2:
        for spec in specs:
            a, b = (per_item[(s, spec)] for s in sources)
            for metric in ("domain_ok", "answer_ok"):
                mean_a, mean_b = (np.mean([t[metric].to_numpy(float) for t in runs], axis=0) for runs in (a, b))
                d = paired_difference(mean_a, mean_b)
                spread = [float(x[metric].mean() - y[metric].mean()) for x, y in zip(a, b)]
                print(
                    f"{spec} {metric}: source {sources[0]} − source {sources[1]} = {d['difference']:+.3f} "
                    f"[{d['diff_low']:+.3f}, {d['diff_high']:+.3f}] (items resampled, n = {d['n_paired']}); "
                    f"per seed {', '.join(f'{x:+.3f}' for x in spread)}",
                    flush=True,
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Choose the projector's init and injection block on validation.")
    parser.add_argument("epochs", type=float)
    parser.add_argument("specs", nargs="+")
    parser.add_argument(
        "--source", type=int, nargs="+", default=[SOURCE_LAYER], help="the blocks whose gradients are read"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (each a describer)")
    args = parser.parse_args()
    main(args.epochs, args.specs, args.source, args.seeds)
