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

import gradsense
from gradsense import evaluate as ev
from gradsense.describer import DescriberConfig
from gradsense.inputs import contexts_path, load_stage_inputs, read_contexts, training_items, validation_set
from gradsense.passages import training_passages
from gradsense.paths import Paths
from gradsense.sampling import stratified
from gradsense.training import TrainConfig, planned_steps, train_projector


def main(epochs: float, lr: float, layers: list[int]) -> None:
    """Train and score one describer per layer on the validation split."""
    stage = load_stage_inputs(Paths("."))
    items = stage.items
    neutral = read_contexts(contexts_path()).query("pool == 'neutral'")["text"].tolist()
    train_items, val_pool = training_items(items, "religion")
    val_set = validation_set(val_pool, 32)
    pool, negatives = training_passages(neutral, train_items, 0)
    held = items[(items["split"] == "val") & (items["template_split"] == "train") & (items["domain"] != "religion")]
    scored_items = stratified(held, "domain", 160, order="shuffle", seed=0)
    model, tokenizer = gradsense.load_model(None)
    for layer in layers:
        grads = stage.vectors("grads", layer)
        config = DescriberConfig(source_layer=layer, inject_layer=15, k=4, precision="bf16")
        train = TrainConfig(epochs=epochs, batch_size=16, lr=lr, control_share=0.2, context_share=0.75, hard_share=0.3)
        start = time.perf_counter()
        describer, _ = train_projector(
            model,
            tokenizer,
            grads[train_items["row"].to_numpy()],
            train_items["label"].tolist(),
            config,
            train,
            pool,
            val=(grads[val_set["row"].to_numpy()], val_set["label"].tolist()),
            hard_negatives=negatives,
            progress=False,
        )
        scored = ev.describe_items(describer, grads, scored_items, batch_size=16, max_new_tokens=0)
        print(
            f"block {layer}: {planned_steps(len(train_items), train)} steps in {time.perf_counter() - start:.0f} s; "
            f"validation domain {scored['domain_ok'].mean():.3f} answer {scored['answer_ok'].mean():.3f} "
            f"from {scored['from_ok'].mean():.3f} (n = {len(scored)})",
            flush=True,
        )


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]), [int(x) for x in sys.argv[3:]])
