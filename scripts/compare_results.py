"""Compare the result tables (CSV) of two pipeline runs; exit 1 and list the differences if any differ.

Usage: python scripts/compare_results.py RESULTS_A RESULTS_B
Only CSV tables are compared: timings and memory (results/timing/*.json) and executed notebooks are not.
"""

import sys
from pathlib import Path


def tables(root: Path) -> dict[str, bytes]:
    """Every CSV under a results folder, by relative path (bench/ excluded)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*.csv"))
        if p.relative_to(root).parts[0] != "bench"
    }


def main(a: str, b: str) -> int:
    """Print identical/different/missing tables; non-zero exit when any differ."""
    left, right = tables(Path(a)), tables(Path(b))
    different = sorted(k for k in left.keys() & right.keys() if left[k] != right[k])
    missing = sorted(left.keys() ^ right.keys())
    print(
        f"{len(left.keys() & right.keys()) - len(different)} tables identical, {len(different)} differ, "
        f"{len(missing)} in one run only"
    )
    for name in different:
        print(f"  differs: {name}")
    for name in missing:
        print(f"  only in one run: {name}")
    return 1 if different or missing or not left else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
