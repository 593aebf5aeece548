"""Check, in a reproduced DVC pipeline folder, that changing one run of params.yaml's `runs:` retrains that run only.

Usage: python scripts/check_instances.py FOLDER [RUN]
Edits runs.<RUN> (default: the first variant; its learning rate halved), runs `dvc repro`, and asserts that the stages
that ran are that run's `training@<RUN>` instance and the stages after it (ablations, paper), none of the other
trainings; then restores params.yaml, runs `dvc repro` again (DVC's run cache restores the outputs) and asserts that
nothing is left to reproduce. Prints the stages that ran; exits 1 when any check fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

DOWNSTREAM = ["ablations", "paper"]


def repro(folder: Path) -> list[str]:
    """`dvc repro` in `folder`; the stages it ran (not those it skipped or restored from the run cache)."""
    done = subprocess.run(["dvc", "repro"], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"dvc repro failed in {folder}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return re.findall(r"^Running stage '([^']+)'", done.stdout, flags=re.M)


def main(folder: str, run: str | None = None) -> int:
    """Edit one run, reproduce, check which stages ran, restore; 0 when every check holds."""
    root = Path(folder)
    params_file = root / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    run = run or next(k for k, v in params["runs"].items() if v["role"] == "variant")
    params["runs"][run]["lr"] = 0.001  # a setting the checkpoint records; variant_configs applies it
    params_file.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    try:
        ran = repro(root)
    finally:
        params_file.write_text(original)
    print(f"runs.{run}.lr changed → dvc repro ran: {', '.join(ran)}")
    ok = ran == [f"training@{run}", *DOWNSTREAM]
    restored = repro(root)
    print(f"params.yaml restored → dvc repro ran: {', '.join(restored) or 'nothing (outputs from the run cache)'}")
    status = subprocess.run(["dvc", "status", "--quiet"], cwd=root).returncode
    ok = ok and not [s for s in restored if s.startswith("training@")] and status == 0
    print("only the edited run was retrained" if ok else "FAILED: other stages ran, or the pipeline is not up to date")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
