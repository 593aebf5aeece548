"""Wall time and peak memory of every pipeline stage, for the `ci` preset and/or the full CPU paper.

Usage: python benchmarks/bench_pipeline.py [--ci] [--full]
  --ci    runs `make paper-ci` (the whole pipeline on params-ci.yaml in build/ci) and times it
  --full  reads the stage records of the last `make paper` / `dvc repro` in results/ (run that first)
Writes results/bench/pipeline.json (per-stage wall_s and peak_rss_gb from each stage's stage_run.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage_records(root: Path) -> dict:
    """Per-stage records (stage_run.json) of a pipeline run under `root/results`, in dvc.yaml order."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    records = {}
    for name in stages:
        path = root / "results" / name / "stage_run.json"
        if path.is_file():
            records[name] = json.loads(path.read_text())
    total = sum(r["wall_s"] for r in records.values())
    peak = max((r["peak_rss_gb"] for r in records.values()), default=float("nan"))
    return {"stages": records, "total_stage_wall_s": round(total, 1), "max_peak_rss_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true")
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    out_path = ROOT / "results" / "bench" / "pipeline.json"
    report = json.loads(out_path.read_text()) if out_path.is_file() else {}
    report["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if args.ci:
        start = time.perf_counter()
        subprocess.run(["make", "--no-print-directory", "paper-ci"], cwd=ROOT, check=True)
        report["ci"] = stage_records(ROOT / "build" / "ci") | {
            "make_paper_ci_wall_s": round(time.perf_counter() - start, 1)
        }
    if args.full:
        report["full"] = stage_records(ROOT)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
