"""Describer training throughput: seconds per step and tokens per second, float32 vs bfloat16 autocast, and with vs
without the prefix cache (the columns before the first slot run once without autograd).

Usage: python benchmarks/bench_training.py [--steps N] [--batch-size B] [--device auto]
Uses the pipeline's gradients and labels when `results/` has them (else random gradients and a fixed label), the
full paper's train settings from params.yaml (injection layer, k, label cap, context share), and times
`Describer.loss` + backward + AdamW on batches drawn as in training, the variants alternating step by step.
Writes results/bench/training.json.
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


VARIANTS = (("fp32", True), ("bf16", False), ("bf16", True))  # (precision, prefix cache) per timed variant


def bench(model, tokenizer, settings: dict, steps: int, batch: int, pool: list[str]) -> list[dict]:
    """Time `steps` training steps (after one warm-up step) of a fresh linear projector per variant: fp32 and bf16
    autocast, and bf16 with one pass over every column (the prefix cache off); the variants alternate on the same
    batches, so drift in the machine's speed hits them alike (paired)."""
    from gradsense import describer as describer_module
    from gradsense.gradients import resolve_layer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    d_model = model.config.hidden_size
    inject_layer = resolve_layer(model, settings["inject_layer"])
    grads, labels = inputs(batch * (steps + 1), d_model, resolve_layer(model, settings["source_layer"]))
    runs = []
    for precision, _ in VARIANTS:
        config = DescriberConfig(
            source_layer=inject_layer, inject_layer=inject_layer, k=settings["k"], precision=precision
        )
        describer = Describer(model, tokenizer, Projector(d_model, config.k), config)
        runs.append((describer, torch.optim.AdamW(describer.projector.parameters(), lr=settings["lr"])))
    times: list[list[float]] = [[] for _ in VARIANTS]
    tokens = []
    full_pass = describer_module.prefix_columns
    for step in range(steps + 1):
        part = slice(step * batch, (step + 1) * batch)
        contexts = [
            pool[int(rng.integers(len(pool)))] if rng.random() < settings["context_share"] else None
            for _ in range(batch)
        ]
        encoded, _ = encode_interpretations(tokenizer, runs[0][0].config, contexts, labels[part])
        for j, ((describer, optimizer), (_, cached)) in enumerate(zip(runs, VARIANTS)):
            describer_module.prefix_columns = full_pass if cached else (lambda *args: 0)
            try:
                start = time.perf_counter()
                vectors = describer.projector(torch.as_tensor(grads[part], device=describer.device))
                loss = describer.loss(vectors, contexts, labels[part], settings["max_label_tokens"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seconds = time.perf_counter() - start
            finally:
                describer_module.prefix_columns = full_pass
            if step:  # the first step warms up kernels and allocations
                times[j].append(seconds)
        if step:
            tokens.append(int(encoded.attention_mask.sum()))
    return [
        {
            "precision": precision,
            "prefix_cache": cached,
            "steps": steps,
            "batch_size": batch,
            "seconds_per_step": float(np.median(t)),
            "tokens_per_step": float(np.mean(tokens)),
            "tokens_per_s": float(np.sum(tokens) / np.sum(t)),
            "rows_per_s": float(batch * steps / np.sum(t)),
        }
        for (precision, cached), t in zip(VARIANTS, times)
    ]


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
    runs = bench(model, tokenizer, settings, args.steps, batch, pool)
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
        "bf16_speedup": runs[0]["seconds_per_step"] / runs[2]["seconds_per_step"],  # both with the prefix cache
        "prefix_cache_speedup": runs[1]["seconds_per_step"] / runs[2]["seconds_per_step"],  # both bf16
    }
    pipeline_timing = timing_path(ROOT, "train")
    if pipeline_timing.is_file():
        report["pipeline_train_stage"] = json.loads(pipeline_timing.read_text())
    out = Paths(ROOT).results("bench") / "training.json"
    write_text(out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
