"""A few training steps of the tiny describer, its projector saved by the main process: run by
tests/test_accelerate.py as one process and under `accelerate launch --num_processes 2` (gloo, CPU)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate import PartialState  # noqa: E402

from gradsense.training import TrainConfig, train_projector  # noqa: E402

from describer_helpers import LABELS, config, grads  # noqa: E402
from tiny_model import tiny_llama  # noqa: E402

model, tokenizer = tiny_llama(seed=0)
train = TrainConfig(steps=4, batch_size=6, lr=0.01, control_share=0.34, context_share=0.5, eval_every=2)
describer, curve = train_projector(
    model, tokenizer, grads(), LABELS, config(), train, ["ctx a.", "ctx b."], (grads(3, 1), LABELS[:3]), False
)
state = PartialState()
print(f"process {state.process_index} of {state.num_processes}", file=sys.stderr)
if state.is_main_process:
    weights = {k: v.detach().clone() for k, v in describer.projector.state_dict().items()}
    record = {"projector": weights, "loss": curve["loss"].tolist(), "val": curve["val_loss"].tolist()}
    torch.save(record | {"processes": state.num_processes}, sys.argv[1])
