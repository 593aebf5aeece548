"""Run a two-point sweep as queued DVC experiments in a reproduced pipeline folder and check that both points show.

Usage: python scripts/check_sweep.py FOLDER [PARAM VALUE_A VALUE_B]
Default sweep: runs.raw.lr = 0.001 and 0.004 (one variant's learning rate: each point retrains that run only, then the
main table and the paper). The folder becomes a git repository if it is not one (experiments are git commits), the
points are queued with `dvc exp run --queue -S PARAM=VALUE`, run by `dvc queue start --jobs 2`, and `dvc exp show`
must list both, each finished, with its parameter value and the paper's metrics. Exits 1 when a check fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

TIMEOUT_S = 1200


def dvc(folder: Path, *args: str) -> str:
    """Run one dvc command in `folder`; its stdout (exit with its output on failure)."""
    done = subprocess.run(["dvc", *args], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


def as_git_repo(folder: Path) -> None:
    """Make `folder` (a DVC project made with --no-scm) a git repository with one commit of its pipeline."""
    if not (folder / ".git").is_dir():
        shutil.rmtree(folder / ".dvc" / "tmp" / "exps", ignore_errors=True)  # no queue of another repository
        subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
        dvc(folder, "config", "core.no_scm", "false")
        # as in the project: outputs live in DVC's cache, never in git (and DVC's own scratch is ignored)
        (folder / ".gitignore").write_text("/results/\n/figures/\n")
        (folder / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    git = ["git", "-c", "user.name=gradsense", "-c", "user.email=sweep@gradsense.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "pipeline"], cwd=folder, check=True)


def wait_for_queue(folder: Path) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last output."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        status = dvc(folder, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(5)
    sys.exit(f"the queued sweep did not finish in {TIMEOUT_S} s")


def main(folder: str, param: str = "runs.raw.lr", *values: str) -> int:
    """Queue, run and show a two-point sweep; 0 when both points finished and show their values and metrics."""
    root = Path(folder)
    values = values or ("0.001", "0.004")
    as_git_repo(root)
    current = yaml.safe_load((root / "params.yaml").read_text())
    for part in param.split(".")[:-1]:
        current = current.get(part, {})
    new = "" if param.split(".")[-1] in current else "+"  # Hydra's syntax for a key the file does not have yet
    for value in values:
        dvc(root, "exp", "run", "--queue", "-S", f"{new}{param}={value}")
    start = time.perf_counter()
    # the workers are daemons that inherit the output handles: no pipe, or reading it would wait for them to exit
    subprocess.run(["dvc", "queue", "start", "--jobs", "2"], cwd=root, check=True, stdout=subprocess.DEVNULL)
    try:
        status = wait_for_queue(root)
    finally:
        dvc(root, "queue", "stop")
    print(status.strip())
    print(f"two queued points ran in {time.perf_counter() - start:.0f} s (2 workers)")
    shown = json.loads(dvc(root, "exp", "show", "--json"))
    points = [e for base in shown for e in (base.get("experiments") or [])]
    found = {}
    for point in points:
        run = point["revs"][0]
        data = run.get("data") or {}
        params = data.get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = data.get("metrics", {}).get("results/paper/metrics.json", {}).get("data", {})
        value = params
        for part in param.split("."):
            value = value.get(part, {}) if isinstance(value, dict) else None
        found[str(value)] = (run.get("name"), metrics.get("ablations", {}))
    for value in values:
        name, ablations = found.get(str(float(value)), found.get(value, (None, {})))
        print(f"{param} = {value}: experiment {name}, ablation metrics {json.dumps(ablations)[:160]}")
    ok = "Failed" not in status and all(found.get(str(float(v)), found.get(v, (None, {})))[1] for v in values)
    print("both points are in dvc exp show" if ok else f"FAILED: dvc exp show lacks a point ({sorted(found)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
