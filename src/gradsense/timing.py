"""Wall times and memory, kept apart from the results: `results/timing/<name>.json` (DVC metrics, uncached), each
with the machine, thread count and precision it was measured with, so timings from different machines compare."""

from __future__ import annotations

import json
import os
import platform
import resource
from collections.abc import Mapping
from pathlib import Path

from gradsense.report import save_json

FOLDER = Path("results") / "timing"


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (None where there is no such file or line)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), None)


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`), or the platform's processor string elsewhere."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The matrix-unit flags that decide bf16 speed on this CPU (AMX, avx512_bf16), as far as /proc/cpuinfo says."""
    flags = (_cpuinfo_field("flags") or "").split()
    return sorted(f for f in set(flags) if f.startswith("amx") or f == "avx512_bf16")


def machine_info() -> dict:
    """CPU model, matrix flags, cores, torch threads, torch version and GPU (None without CUDA)."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def peak_rss_gb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its reaped children) in GiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 2**20, 3)  # KiB on Linux


def timing_path(root: str | Path, name: str) -> Path:
    """`<root>/results/timing/<name>.json`."""
    return Path(root) / FOLDER / f"{name}.json"


def save_timing(root: str | Path, name: str, record: Mapping) -> Path:
    """Merge `record` into `results/timing/<name>.json` (with the machine), keeping what the file already holds."""
    path = timing_path(root, name)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(record)
    merged["machine"] = machine_info()
    return save_json(merged, path)


def read_timings(root: str | Path) -> dict[str, dict]:
    """Every timing record under `<root>/results/timing`, by name."""
    folder = Path(root) / FOLDER
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
