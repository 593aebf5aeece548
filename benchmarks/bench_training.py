"""Describer training throughput: seconds per step and tokens per second, float32 vs bfloat16 autocast.

Usage: python benchmarks/bench_training.py [--steps N] [--batch-size B] [--device auto]
Uses the pipeline's gradients and labels when `results/` has them (else random gradients and a fixed label), the
full paper's train settings from params.yaml (injection layer, k, label cap, context share), and times
`Describer.loss` + backward + AdamW on batches drawn as in training. Writes results/bench/training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import gradsense
from gradsense.describer import Describer, DescriberConfig, Projector
from gradsense.files import write_text
from gradsense.inputs import contexts_path, read_contexts
from gradsense.paths import Paths
from gradsense.prompt import encode_interpretations
from gradsense.timing import machine_info, timing_path

ROOT = Path(__file__).resolve().parents[1]


def inputs(n: int, d_model: int, layer: int) -> tuple[np.ndarray, list[str]]:
    """Gradients and labels of the pipeline's first n labelled items, or random ones before the pipeline ran."""
    grads_file, labels_file = Paths(ROOT).gradients, Paths(ROOT).labels
    if grads_file.is_file() and labels_file.is_file():
        from gradsense.gradients import load_gradients
        from gradsense.inputs import read_labels

        arrays = load_gradients(grads_file)
        labels = read_labels(labels_file)
        rows = [i for i, item in enumerate(arrays["ids"]) if str(item) in labels][:n]
        grads = arrays["grads"][arrays["layers"].index(layer)] if layer in arrays["layers"] else arrays["grads"][0]
        return grads[rows], [labels[str(arrays["ids"][i])] for i in rows]
    rng = np.random.default_rng(0)
    label = "domain: geography | from: London | to: Paris\nThe update pushes this geography answer towards Paris."
    return rng.standard_normal((n, d_model)).astype(np.float32), [label] * n


def bench(model, tokenizer, precision: str, settings: dict, steps: int, batch: int, pool: list[str]) -> dict:
    """Time `steps` training steps (after one warm-up step) of a fresh linear projector."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    d_model = model.config.hidden_size
    config = DescriberConfig(
        source_layer=settings["inject_layer"],
        inject_layer=settings["inject_layer"],
        k=settings["k"],
        precision=precision,
    )
    describer = Describer(model, tokenizer, Projector(d_model, config.k), config)
    optimizer = torch.optim.AdamW(describer.projector.parameters(), lr=settings["lr"])
    grads, labels = inputs(batch * (steps + 1), d_model, settings["inject_layer"])
    times, tokens = [], []
    for step in range(steps + 1):
        part = slice(step * batch, (step + 1) * batch)
        contexts = [
            pool[int(rng.integers(len(pool)))] if rng.random() < settings["context_share"] else None
            for _ in range(batch)
        ]
        encoded, _ = encode_interpretations(tokenizer, config, contexts, labels[part], settings["max_label_tokens"])
        start = time.perf_counter()
        vectors = describer.projector(torch.as_tensor(grads[part], device=describer.device))
        loss = describer.loss(vectors, contexts, labels[part], settings["max_label_tokens"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up kernels and allocations
            times.append(time.perf_counter() - start)
            tokens.append(int(encoded.attention_mask.sum()))
    return {
        "precision": precision,
        "steps": steps,
        "batch_size": batch,
        "seconds_per_step": float(np.median(times)),
        "tokens_per_step": float(np.mean(tokens)),
        "tokens_per_s": float(np.sum(tokens) / np.sum(times)),
        "rows_per_s": float(batch * steps / np.sum(times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size of params.yaml")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    settings = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    batch = args.batch_size or settings["batch_size"]
    model, tokenizer = gradsense.load_model(None, device=args.device)
    contexts = read_contexts(contexts_path())
    pool = contexts.loc[contexts["pool"] == "neutral", "text"].tolist()
    runs = [bench(model, tokenizer, p, settings, args.steps, batch, pool) for p in ("fp32", "bf16")]
    report = {
        "machine": machine_info()
        | {
            "platform": platform.platform(),
            "device": str(next(model.parameters()).device),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": os.getloadavg(),
        },
        "inject_layer": settings["inject_layer"],
        "k": settings["k"],
        "max_label_tokens": settings["max_label_tokens"],
        "runs": runs,
        "bf16_speedup": runs[0]["seconds_per_step"] / runs[1]["seconds_per_step"],
    }
    pipeline_timing = timing_path(ROOT, "train")
    if pipeline_timing.is_file():
        report["pipeline_train_stage"] = json.loads(pipeline_timing.read_text())
    out = Paths(ROOT).results("bench") / "training.json"
    write_text(out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
