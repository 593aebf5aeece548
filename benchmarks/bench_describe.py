"""Describing throughput: items per second of structured decoding by batch size, in float32 (the pipeline's
decoding) and under bfloat16 autocast, and whether the descriptions stay the same across batch sizes and precisions.

Usage: python benchmarks/bench_describe.py [--root DIR] [--items 96] [--batch-sizes 16 64] [--precisions fp32 bf16]
Reads the train stage's checkpoint and gradients under `--root` (default: the full paper's results when they exist,
else the ci preset's in build/ci: run `make paper` or `make paper-ci` first), describes the first `--items`
gradients (every other one after a neutral passage, as in decoupling), once per precision and batch size, the
variants alternating over two rounds (paired). Writes results/bench/describe.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import gradsense
from gradsense import decoding
from gradsense.checkpoint import load_describer
from gradsense.files import write_text
from gradsense.gradients import load_gradients
from gradsense.inputs import contexts_path, read_contexts
from gradsense.paths import Paths
from gradsense.timing import machine_info

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    args = parser.parse_args()
    roots = [Path(args.root)] if args.root else [ROOT, ROOT / "build" / "ci"]
    paths = next((Paths(r) for r in roots if Paths(r).checkpoint.is_dir()), None)
    if paths is None:
        raise SystemExit(f"no describer checkpoint under {' or '.join(map(str, roots))}: run the pipeline first")
    model, tokenizer = gradsense.load_model(None)
    describer = load_describer(paths.checkpoint, model, tokenizer)
    arrays = load_gradients(paths.gradients)
    grads = arrays["grads"][arrays["layers"].index(describer.config.source_layer)][: args.items]
    pool = read_contexts(contexts_path()).query("pool == 'neutral'")["text"].tolist()
    contexts = [pool[i % len(pool)] if i % 2 else None for i in range(len(grads))]
    variants = [(p, b) for p in args.precisions for b in args.batch_sizes]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    texts: dict[tuple, list[str]] = {}
    describer.describe_gradients(grads[:4], contexts[:4], batch_size=4, max_new_tokens=0)  # warm-up
    for _ in range(args.rounds):
        for precision, size in variants:  # alternating: drift in the machine's speed hits every variant alike
            with decoding_precision(describer, precision):
                start = time.perf_counter()
                frame = describer.describe_gradients(grads, contexts, batch_size=size, max_new_tokens=0)
                times[precision, size].append(time.perf_counter() - start)
            texts[precision, size] = frame["description"].tolist()
    first = variants[0]
    runs = [
        {
            "decoding": precision,
            "batch_size": size,
            "seconds": float(np.median(times[precision, size])),
            "items_per_s": float(len(grads) / np.median(times[precision, size])),
            "same_as_first": float(np.mean([a == b for a, b in zip(texts[precision, size], texts[first])])),
        }
        for precision, size in variants
    ]
    report = {
        "machine": machine_info() | {"platform": platform.platform()},
        "root": str(paths.root),
        "items": len(grads),
        "trained_precision": describer.config.precision,
        "first": {"decoding": first[0], "batch_size": first[1]},
        "runs": runs,
    }
    out = Paths(ROOT).results("bench") / "describe.json"
    write_text(out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))


@contextmanager
def decoding_precision(describer, precision: str):
    """Decode in `precision`: float32 is the pipeline's decoding; "bf16" wraps it in bfloat16 autocast (as decoding
    ran before), to compare."""
    if precision == "fp32":
        yield
        return
    original = decoding.structured_ids

    def autocast_ids(*args, **kwargs):
        with torch.autocast(describer.device.type, dtype=torch.bfloat16):
            return original(*args, **kwargs)

    decoding.structured_ids = autocast_ids
    try:
        yield
    finally:
        decoding.structured_ids = original


if __name__ == "__main__":
    main()
