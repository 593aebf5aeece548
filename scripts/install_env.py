"""Install the pinned environment into a venv: uv when it works (about 20 s), else pip (about 3.5 min).

Usage: python scripts/install_env.py VENV
uv is given pip's own configuration (find-links, index URLs, constraints from `pip config list`), so both tools
install the same pinned files: torch==2.13.0 first (on the project's machines a CPU build on disk), then the exact
lock requirements.txt, then gradsense itself (editable, no dependencies).
"""

import shlex
import subprocess
import sys
from pathlib import Path

UV = "uv==0.13.9"
STEPS = (["torch==2.13.0"], ["-r", "requirements.txt"], ["--no-deps", "-e", "."])


def pip_config(pip: Path) -> dict[str, str]:
    """`pip config list` as {key without scope: value} (environment entries override files, as in pip)."""
    out = subprocess.run([str(pip), "config", "list"], capture_output=True, text=True).stdout
    config: dict[str, str] = {}
    for line in sorted(out.splitlines(), key=lambda line: line.startswith(":env:")):
        key, _, value = line.partition("=")
        config[key.split(".", 1)[-1]] = value.strip("'\"")
    return config


def uv_args(config: dict[str, str]) -> list[str]:
    """uv flags equivalent to pip's configuration (every index trusted alike, as pip does)."""
    args = ["--index-strategy", "unsafe-best-match"]
    if "index-url" in config:
        args += ["--index-url", config["index-url"]]
    for url in shlex.split(config.get("extra-index-url", "")):
        args += ["--extra-index-url", url]
    for folder in shlex.split(config.get("find-links", "")):
        args += ["--find-links", folder]
    if "constraint" in config:
        args += ["--constraint", config["constraint"]]
    return args


def main(venv: str) -> int:
    """Try uv, fall back to pip; exit non-zero only when pip fails too."""
    bin_dir = Path(venv) / "bin"
    pip, python = bin_dir / "pip", bin_dir / "python"
    quiet = ["-q", "--disable-pip-version-check"]
    if subprocess.run([str(pip), "install", *quiet, UV]).returncode == 0:
        flags = uv_args(pip_config(pip))
        uv = [str(bin_dir / "uv"), "pip", "install", "-q", "--python", str(python), *flags]
        if all(subprocess.run(uv + step).returncode == 0 for step in STEPS):
            return 0
        print("uv could not install the environment; falling back to pip", file=sys.stderr)
    for step in STEPS:
        if subprocess.run([str(pip), "install", *quiet, *step]).returncode:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
