"""Choose the describer's source layer on the validation split (run once by hand; not a pipeline stage).

Usage: python scripts/select_source_layer.py EPOCHS LR LAYER [LAYER ...]
Needs the pipeline's corrections, gradients and oracle outputs under results/. For each layer, trains the train
stage's describer (params.yaml settings: linear projector, injection at block 15, bfloat16) and prints its domain
accuracy, answer recall and 'from' recall on up to 160 validation-split items (trained templates and domains); the
test split is never read. Run for the full paper (both layers at once, one CPU thread each; 3 epochs, lr 0.002;
the α-step labels of `oracle`): block 15 domain 0.863 /
answer 0.494; block 22 domain 0.825 / answer 0.656, hence `train.source_layer: 22`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

import gradsense
from gradsense import evaluate as ev
from gradsense.describer import DescriberConfig
from gradsense.inputs import (
    StageInputs,
    contexts_path,
    load_stage_inputs,
    read_contexts,
    training_items,
    validation_set,
)
from gradsense.passages import training_passages
from gradsense.paths import Paths
from gradsense.sampling import stratified
from gradsense.training import TrainConfig, planned_steps, train_projector


@dataclass
class Selection:
    """What a selection script trains on: the train stage's items, its validation set and passages (held-out domain
    religion, seed 0, as params.yaml)."""

    stage: StageInputs
    train_items: pd.DataFrame
    val_pool: pd.DataFrame
    val_set: pd.DataFrame
    passages: list[str]
    negatives: list[list[str]]


def selection_inputs() -> Selection:
    """The pipeline's corrections, gradients and labels under results/, split as the train stage splits them."""
    stage = load_stage_inputs(Paths("."))
    neutral = read_contexts(contexts_path()).query("pool == 'neutral'")["text"].tolist()
    train_items, val_pool = training_items(stage.items, "religion")
    passages, negatives = training_passages(neutral, train_items, 0)
    return Selection(stage, train_items, val_pool, validation_set(val_pool, 32), passages, negatives)


def train_describer(
    model, tokenizer, inputs: Selection, grads: np.ndarray, config: DescriberConfig, train: TrainConfig
):
    """The train stage's training of one describer on `grads` (rows of the stage's items), step chosen on validation."""
    describer, _ = train_projector(
        model,
        tokenizer,
        grads[inputs.train_items["row"].to_numpy()],
        inputs.train_items["label"].tolist(),
        config,
        train,
        inputs.passages,
        val=(grads[inputs.val_set["row"].to_numpy()], inputs.val_set["label"].tolist()),
        hard_negatives=inputs.negatives,
        progress=False,
    )
    return describer


def main(epochs: float, lr: float, layers: list[int]) -> None:
    """Train and score one describer per layer on the validation split."""
    inputs = selection_inputs()
    items = inputs.stage.items
    held = items[(items["split"] == "val") & (items["template_split"] == "train") & (items["domain"] != "religion")]
    scored_items = stratified(held, "domain", 160, order="shuffle", seed=0)
    model, tokenizer = gradsense.load_model(None)
    for layer in layers:
        grads = inputs.stage.vectors("grads", layer)
        config = DescriberConfig(source_layer=layer, inject_layer=15, k=4, precision="bf16")
        train = TrainConfig(epochs=epochs, batch_size=16, lr=lr, control_share=0.2, context_share=0.75, hard_share=0.3)
        start = time.perf_counter()
        describer = train_describer(model, tokenizer, inputs, grads, config, train)
        scored = ev.describe_items(describer, grads, scored_items, batch_size=16, max_new_tokens=0)
        print(
            f"block {layer}: {planned_steps(len(inputs.train_items), train)} steps in {time.perf_counter() - start:.0f} s; "
            f"validation domain {scored['domain_ok'].mean():.3f} answer {scored['answer_ok'].mean():.3f} "
            f"from {scored['from_ok'].mean():.3f} (n = {len(scored)})",
            flush=True,
        )


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]), [int(x) for x in sys.argv[3:]])
