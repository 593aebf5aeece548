"""The `gradsense` command: run pipeline stages, fetch the raw inputs, describe gradients."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradsense.errors import GradsenseError


def _papermill(args: argparse.Namespace) -> None:
    from gradsense.pipeline import run_stage

    print(run_stage(args.stage, Path(args.root), Path(args.params) if args.params else None))


def _run(args: argparse.Namespace) -> None:
    from gradsense.runs import run_instances

    run_instances(args.keys or None, Path(args.root), Path(args.params) if args.params else None)


def _replicate(args: argparse.Namespace) -> None:
    from gradsense.pipeline import read_params
    from gradsense.replication import replicate

    root = Path(args.root)
    params = Path(args.params) if args.params else root / "params.yaml"
    for key in args.keys or list(read_params(params).get("replication") or {}):
        print(replicate(key, root, params))


def _fetch_data(args: argparse.Namespace) -> None:
    from gradsense.data import fetch_data

    fetch_data(Path(args.root))


def _describe(args: argparse.Namespace) -> None:
    import time

    from gradsense.files import writable_parent, write_jsonl
    from gradsense.items import BATCH_SIZE, describe, read_items, summary_line

    control = "none" if args.no_inject else "noise" if args.noise else "shuffle" if args.shuffle else "gradient"
    options = {
        "checkpoint": args.checkpoint,
        "control": control,
        "seed": args.seed,
        "device": args.device,
        "max_new_tokens": args.max_new_tokens,
        "faithfulness": args.faithfulness,
    }
    if args.input is not None:
        if args.prompt is not None or args.output is None:
            raise GradsenseError("give either --input FILE --output FILE, or --prompt P --right R")
        items = read_items(args.input)
        writable_parent(args.output)  # before the model loads: a bad --output fails at once, not after the run
        start = time.perf_counter()
        records = describe(items, **options, progress=len(items) > BATCH_SIZE)  # tqdm bars on stderr when long
        write_jsonl(records, args.output, sort_keys=False)  # fields in the order id, description, domain, from, to
        print(f"{len(records)} descriptions written to {args.output}")
        print(summary_line(records, time.perf_counter() - start), file=sys.stderr)
        return
    if args.prompt is None or args.right is None:
        raise GradsenseError("give either --input FILE --output FILE, or --prompt P --right R")
    item = {"id": "prompt", "prompt": args.prompt, "right": args.right, "wrong": args.wrong, "context": args.context}
    record = describe([item], **options)[0]
    print(record["description"])
    if args.faithfulness:
        print(f"round-trip cosine: {record['roundtrip_cosine']}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `gradsense` command."""
    parser = argparse.ArgumentParser(prog="gradsense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    stage = sub.add_parser("papermill", help="execute one pipeline stage's notebook with its params (used by dvc.yaml)")
    stage.add_argument("stage")
    stage.add_argument("--root", default=".", help="project root (default: current folder)")
    stage.add_argument("--params", default=None, help="params file (default: <root>/params.yaml)")
    stage.set_defaults(func=_papermill)

    run = sub.add_parser("run", help="train and score runs of params.yaml's runs: (used by dvc.yaml's training@<key>)")
    run.add_argument("keys", nargs="*", help="the runs (default: every run, in one process)")
    run.add_argument("--root", default=".", help="project root (default: current folder)")
    run.add_argument("--params", default=None, help="params file (default: <root>/params.yaml)")
    run.set_defaults(func=_run)

    rep = sub.add_parser(
        "replicate",
        help="corrections → evaluate on another model (params.yaml's replication:; dvc.yaml's replication@)",
    )
    rep.add_argument("keys", nargs="*", help="the replications (default: every one, in turn)")
    rep.add_argument("--root", default=".", help="project root (default: current folder)")
    rep.add_argument("--params", default=None, help="params file (default: <root>/params.yaml)")
    rep.set_defaults(func=_replicate)

    fetch = sub.add_parser("fetch-data", help="rebuild data/ from its pinned sources and verify it against data.dvc")
    fetch.add_argument("--root", default=".", help="project root (default: current folder)")
    fetch.set_defaults(func=_fetch_data)

    desc = sub.add_parser("describe", help="inject each item's gradient (target = right); say what pressure it feels")
    desc.add_argument("--input", help="JSONL items {id, prompt, right, wrong?, context?}")
    desc.add_argument("--output", help="JSONL output {id, description, domain, from, to} (with --input)")
    desc.add_argument("--prompt", help="one item: the prompt")
    desc.add_argument("--right", help="one item: the answer the gradient pushes towards")
    desc.add_argument("--wrong", help="one item: the answer it pushes away from (optional, unused)")
    desc.add_argument("--context", help="one item: a passage read before the question")
    desc.add_argument("--checkpoint", default=None, help="trained projector folder (default: results/train/checkpoint)")
    controls = desc.add_mutually_exclusive_group()
    controls.add_argument("--no-inject", action="store_true", help="control: inject nothing")
    controls.add_argument("--noise", action="store_true", help="control: Gaussian noise with each gradient's norm")
    controls.add_argument("--shuffle", action="store_true", help="control: another item's gradient (needs ≥ 2 items)")
    desc.add_argument("--seed", type=int, default=0, help="seed of the noise/shuffle controls")
    desc.add_argument(
        "--max-new-tokens", type=int, default=0, help="tokens of a one-line sentence after the head (trained: none)"
    )
    desc.add_argument(
        "--faithfulness",
        action="store_true",
        help="add roundtrip_cosine: cos(item gradient, gradient of prompt → the described 'to')",
    )
    desc.add_argument("--device", default="auto")
    desc.set_defaults(func=_describe)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors on stderr and exit code 1 for bad input."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GradsenseError as exc:
        print(f"gradsense: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
