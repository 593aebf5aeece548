"""Re-run some stages of the ci preset against a reference run and compare their tables byte for byte.

Usage: python scripts/check_stages.py REFERENCE STAGE [STAGE ...]   (a training instance: training@<key>)
REFERENCE is a finished ci run (e.g. build/ci-baseline, a copy of build/ci after `make paper-ci`). The stages run
in a scratch copy (build/check-<stages>) whose other stages' results are the reference's, with today's notebooks
(converted from notebooks/src/*.py by jupytext) and today's package; then each re-run stage's CSV tables are compared with the
reference's. Exit 1 when any differ.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def convert_all(target: Path) -> None:
    """Write every notebooks/src/*.py as target/<name>.ipynb (jupytext), with the kernel papermill needs."""
    target.mkdir(parents=True, exist_ok=True)
    for src in sorted((ROOT / "notebooks" / "src").glob("*.py")):
        notebook = jupytext.read(src, fmt="py:percent")
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(notebook, target / f"{src.stem}.ipynb")


def main(reference: str, *stages: str) -> int:
    """Run the stages in a scratch copy of the reference and compare their CSVs."""
    reference_dir = Path(reference).resolve()
    scratch = ROOT / "build" / ("check-" + "-".join(stages))
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copytree(reference_dir / "results", scratch / "results")
    if (reference_dir / "figures").exists():
        shutil.copytree(reference_dir / "figures", scratch / "figures")
    shutil.copy(ROOT / "params-ci.yaml", scratch / "params.yaml")
    (scratch / "data").symlink_to(ROOT / "data")
    convert_all(scratch / "notebooks")
    failed = 0
    for stage in stages:
        print(f"== {stage}", flush=True)
        key = stage.split("@", 1)[1] if stage.startswith("training@") else None
        command = ["gradsense", "run", key] if key else ["gradsense", "papermill", stage]
        run = subprocess.run(command, cwd=scratch)
        if run.returncode:
            print(f"stage {stage} failed (exit {run.returncode})")
            failed += 1
            continue
        folder = Path("runs") / key if key else Path(stage)
        new, old = scratch / "results" / folder, reference_dir / "results" / folder
        names = sorted(
            {p.relative_to(old).as_posix() for p in old.rglob("*.csv")}
            | {p.relative_to(new).as_posix() for p in new.rglob("*.csv")}
        )
        for name in names:
            a, b = old / name, new / name
            if not (a.is_file() and b.is_file()) or a.read_bytes() != b.read_bytes():
                print(f"  differs or missing: {stage}/{name}")
                failed += 1
        print(f"  {len(names)} tables compared")
    print("identical" if not failed else f"{failed} problems")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], *sys.argv[2:]))
