"""Describing throughput: items per second of structured decoding by batch size, and whether the descriptions stay
the same when the batch size changes.

Usage: python benchmarks/bench_describe.py [--root DIR] [--items 96] [--batch-sizes 16 32 64] [--precision fp32]
Reads the train stage's checkpoint and gradients under `--root` (default: the full paper's results when they exist,
else the ci preset's in build/ci: run `make paper` or `make paper-ci` first), describes the first `--items` gradients (every other one after a neutral passage, as in
decoupling), once per batch size, the sizes alternating over two rounds (paired). Writes results/bench/describe.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import gradsense
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
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=["checkpoint", "fp32", "bf16"], default="checkpoint")
    args = parser.parse_args()
    roots = [Path(args.root)] if args.root else [ROOT, ROOT / "build" / "ci"]
    paths = next((Paths(r) for r in roots if Paths(r).checkpoint.is_dir()), None)
    if paths is None:
        raise SystemExit(f"no describer checkpoint under {' or '.join(map(str, roots))}: run the pipeline first")
    model, tokenizer = gradsense.load_model(None)
    describer = load_describer(paths.checkpoint, model, tokenizer)
    if args.precision != "checkpoint":
        describer.config.precision = args.precision
    arrays = load_gradients(paths.gradients)
    grads = arrays["grads"][arrays["layers"].index(describer.config.source_layer)][: args.items]
    pool = read_contexts(contexts_path()).query("pool == 'neutral'")["text"].tolist()
    contexts = [pool[i % len(pool)] if i % 2 else None for i in range(len(grads))]
    times: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    texts: dict[int, list[str]] = {}
    describer.describe_gradients(grads[:4], contexts[:4], batch_size=4, max_new_tokens=0)  # warm-up
    for _ in range(args.rounds):
        for size in args.batch_sizes:
            start = time.perf_counter()
            frame = describer.describe_gradients(grads, contexts, batch_size=size, max_new_tokens=0)
            times[size].append(time.perf_counter() - start)
            texts[size] = frame["description"].tolist()
    first = args.batch_sizes[0]
    runs = [
        {
            "batch_size": size,
            "seconds": float(np.median(times[size])),
            "items_per_s": float(len(grads) / np.median(times[size])),
            "same_as_first": float(np.mean([a == b for a, b in zip(texts[size], texts[first])])),
        }
        for size in args.batch_sizes
    ]
    report = {
        "machine": machine_info() | {"platform": platform.platform()},
        "root": str(paths.root),
        "items": len(grads),
        "precision": describer.config.precision,
        "runs": runs,
        "speedup_largest_vs_first": runs[0]["seconds"] / runs[-1]["seconds"],
    }
    out = Paths(ROOT).results("bench") / "describe.json"
    write_text(out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
