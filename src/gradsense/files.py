"""Write files so that no half-written one ever looks complete: one atomic writer, one JSONL reader and writer."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from gradsense.errors import GradsenseError


def writable_parent(path: str | Path, folder_ok: bool = False) -> Path:
    """Create `path`'s folder, or raise a one-line error naming it (call before any long computation)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GradsenseError(f"cannot create the folder of {path}: {exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK):
        raise GradsenseError(f"cannot write into {path.parent}: permission denied")
    if path.is_dir() and not folder_ok:
        raise GradsenseError(f"cannot write {path}: it is a folder")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes, else it is removed."""
    path = writable_parent(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` (folder) only if the block finishes."""
    path = writable_parent(path, folder_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def jsonl_line(record: Mapping, sort_keys: bool = True) -> str:
    """One JSON object on one line (UTF-8 kept, NaN refused, numpy scalars as floats)."""
    return json.dumps(record, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False, default=float) + "\n"


def write_jsonl(records: Iterable[Mapping], path: str | Path, sort_keys: bool = True) -> Path:
    """Write one JSON object per line, atomically; returns the path."""
    return write_text(path, "".join(jsonl_line(r, sort_keys) for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file (blank lines skipped); a missing file or a bad line is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"{path} is missing")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GradsenseError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise GradsenseError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
