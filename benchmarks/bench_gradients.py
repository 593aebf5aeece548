"""Speed of the activation-gradient extractor on the real model: batched vs a per-example loop vs a bare pass.

Writes results/bench/gradients.json. Four timings over the same prompts (real facts, batch 32), each repeated and
interleaved so that load from other processes hits all of them alike:
- batched: `activation_gradients(..., batch_size=32)` (tokenisation, hooks, gathering and numpy copies included);
- loop: the same function one item at a time;
- bare: pre-tokenised batches (the same length-sorted groups), the same cut, the restricted unembedding, one
  autograd.grad, nothing kept (the compute floor of the extractor); `bare_full_logits`: the same with the stock
  HF forward (logits at every position).
Targets: batched ≥ 3.5× the loop, and batched time ≤ 1.15× bare time.

Usage: python benchmarks/bench_gradients.py [--items 96] [--repeats 3] [--layers 7 15 22] [--threads N] [--facts DIR]
On a CPU shared with other jobs, --threads 1 avoids the thread oversubscription that slows every timing alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gradsense.corrections import fill_template, load_facts, sample_facts
from gradsense.gradients import activation_gradients, length_batches, target_loss
from gradsense.hooks import edit_block_outputs
from gradsense.models import load_model
from gradsense.report import save_json
from gradsense.scoring import encode, forward, target_nll, target_text
from gradsense.seeding import seed_everything
from gradsense.timing import machine_info

ROOT = Path(__file__).resolve().parents[1]


def real_items(n: int, facts_dir: str | None, seed: int) -> tuple[list[str], list[str]]:
    """n (prompt, right-answer continuation) pairs, an even share of every domain of the fact tables."""
    facts = load_facts(facts_dir) if facts_dir else load_facts()
    per_domain = -(-n // facts["domain"].nunique())
    facts = sample_facts(facts, per_domain, seed).head(n)
    prompts = [fill_template(r, s) for r, s in zip(facts["relation"], facts["subject"])]
    return prompts, [target_text(a) for a in facts["right"]]


def bare_pass(model, encoded, layers, full_logits: bool) -> None:
    """Forward with the graph cut at the earliest layer, the summed target NLL, one autograd.grad; nothing kept."""
    first = min(layers)
    for batch in encoded:
        sites = {}

        def keep(layer):
            def fn(h):
                h = h.detach().requires_grad_(True) if layer == first else h
                sites[layer] = h
                return h

            return fn

        with torch.enable_grad(), edit_block_outputs(model, {layer: keep(layer) for layer in layers}):
            if full_logits:
                loss = target_nll(forward(model, batch).logits, batch.labels)
            else:
                loss = target_loss(model, batch)
            torch.autograd.grad(loss.sum(), [sites[layer] for layer in layers])


def main() -> None:
    """Time the three ways and write the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="+", default=[7, 15, 22])
    parser.add_argument("--facts", default=None, help="folder with the fact tables (default data/facts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "gradients.json"))
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seed_everything(0)
    model, tokenizer = load_model(None, device="cpu")
    prompts, targets = real_items(args.items, args.facts, seed=0)
    # The same length-sorted batches as the extractor, so `bare` differs from `batched` only by the bookkeeping.
    groups = length_batches(tokenizer, prompts, targets, list(range(len(prompts))), args.batch_size)
    encoded = [encode(tokenizer, [prompts[i] for i in rows], [targets[i] for i in rows]) for rows in groups]
    layers = args.layers

    runs = {
        "batched": lambda: activation_gradients(
            model, tokenizer, prompts, targets, layers, "last", args.batch_size, progress=False
        ),
        "loop": lambda: activation_gradients(model, tokenizer, prompts, targets, layers, "last", 1, progress=False),
        "bare": lambda: bare_pass(model, encoded, layers, full_logits=False),
        "bare_full_logits": lambda: bare_pass(model, encoded, layers, full_logits=True),
    }
    bare_pass(model, encoded[:1], layers, full_logits=False)  # warm-up (allocator, kernels)
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()

    n = len(prompts)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    record = {f"items_per_s_{name}": n / t for name, t in median.items()}
    record.update(
        seconds={name: [round(t, 3) for t in times] for name, times in seconds.items()},
        speedup_vs_loop=median["loop"] / median["batched"],
        time_ratio_vs_bare=median["batched"] / median["bare"],
        time_ratio_vs_bare_full_logits=median["batched"] / median["bare_full_logits"],
        targets={"speedup_vs_loop_min": 3.5, "time_ratio_vs_bare_max": 1.15},
        meets_targets=bool(median["loop"] / median["batched"] >= 3.5 and median["batched"] / median["bare"] <= 1.15),
        n_items=n,
        batch_size=args.batch_size,
        layers=layers,
        position="last",
        repeats=args.repeats,
        statistic="median over repeats",
        machine=machine_info()
        | {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
    )
    save_json(record, args.out)
    print({k: round(v, 2) for k, v in record.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
