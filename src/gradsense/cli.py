"""The `gradsense` command: run pipeline stages, fetch the raw inputs, describe gradients."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradsense.errors import GradsenseError


def _papermill(args: argparse.Namespace) -> None:
    from gradsense.pipeline import run_stage

    print(run_stage(args.stage, Path(args.root), Path(args.params) if args.params else None))


def _fetch_data(args: argparse.Namespace) -> None:
    from gradsense.data import fetch_data

    fetch_data(Path(args.root))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `gradsense` command."""
    parser = argparse.ArgumentParser(prog="gradsense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    stage = sub.add_parser("papermill", help="execute one pipeline stage's notebook with its params (used by dvc.yaml)")
    stage.add_argument("stage")
    stage.add_argument("--root", default=".", help="project root (default: current folder)")
    stage.add_argument("--params", default=None, help="params file (default: <root>/params.yaml)")
    stage.set_defaults(func=_papermill)

    fetch = sub.add_parser("fetch-data", help="rebuild data/ from its pinned sources and verify it against data.dvc")
    fetch.add_argument("--root", default=".", help="project root (default: current folder)")
    fetch.set_defaults(func=_fetch_data)

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
