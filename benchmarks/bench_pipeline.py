"""Wall time and peak memory of every pipeline stage and training instance, for the `ci` preset and/or the full paper.

Usage: python benchmarks/bench_pipeline.py [--ci] [--full]
  --ci    runs `make paper-ci` (the whole pipeline on params-ci.yaml in build/ci) and times it
  --full  reads the timing records of the last `make paper` / `dvc repro` in results/timing/ (run that first)
Writes results/bench/pipeline.json: per stage (and per `training@<key>` / `replication@<key>` instance) wall_s and peak_rss_gb, the total
stage time, the largest peak, and the machine (CPU model, matrix flags, threads, precision) each record was made on.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradsense.timing import machine_info, read_timings  # noqa: E402


def stage_records(root: Path) -> dict:
    """Per-stage and per-run timing records of a pipeline run under `root/results/timing`, and their totals."""
    records = {
        name: {k: v for k, v in record.items() if k != "machine"} | {"cpu": record["machine"]["cpu"]}
        for name, record in read_timings(root).items()
        if "wall_s" in record
    }
    total = sum(r["wall_s"] for r in records.values())
    peak = max((r.get("peak_rss_gb", 0.0) for r in records.values()), default=float("nan"))
    runs = sum(r["wall_s"] for name, r in records.items() if name.startswith("run_"))
    replications = sum(r["wall_s"] for name, r in records.items() if name.startswith("replication_"))
    machines = sorted({r["cpu"] for r in records.values()})
    return {
        "stages": records,
        "total_stage_wall_s": round(total, 1),
        "training_instances_wall_s": round(runs, 1),
        "replication_instances_wall_s": round(replications, 1),
        "max_peak_rss_gb": peak,
        "cpus_recorded": machines,
    }


def markdown_table(records: dict) -> str:
    """Where the time goes: one row per stage (the training instances summed on one row), share of the total."""
    stages = records["stages"]
    total = records["total_stage_wall_s"] or 1.0
    runs = {k: v for k, v in stages.items() if k.startswith("run_")}
    rows = [(k, v["wall_s"], v.get("peak_rss_gb", 0.0)) for k, v in stages.items() if k not in runs]
    if runs:
        peak = max(v.get("peak_rss_gb", 0.0) for v in runs.values())
        rows.append((f"training@* ({len(runs)} instances)", sum(v["wall_s"] for v in runs.values()), peak))
    lines = ["| stage | wall s | share | peak GB |", "|---|---:|---:|---:|"]
    for name, wall, peak in sorted(rows, key=lambda r: -r[1]):
        lines.append(f"| {name} | {wall:,.0f} | {wall / total:.0%} | {peak:.2f} |")
    lines.append(f"| **total** | **{total:,.0f}** | | **{records['max_peak_rss_gb']:.2f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true")
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    out_path = ROOT / "results" / "bench" / "pipeline.json"
    report = json.loads(out_path.read_text()) if out_path.is_file() else {}
    machine = machine_info()
    report["machine"] = machine | {"platform": platform.platform(), "cuda": machine["gpu"]}  # the earlier keys kept
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
    for preset in ("ci", "full"):
        if args.ci and preset == "ci" or args.full and preset == "full":
            print(f"\n{preset}:\n{markdown_table(report[preset])}")


if __name__ == "__main__":
    main()
