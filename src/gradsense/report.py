"""Write results the same way everywhere, atomically: tables as CSV + LaTeX, figures as PNG + PDF, records as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from gradsense.files import atomic_path, write_text


def save_table(df: pd.DataFrame, directory: str | Path, name: str, float_format: str = "%.3f") -> Path:
    """Write `name.csv` and `name.tex` (booktabs) under `directory`; returns the CSV path."""
    directory = Path(directory)
    csv = directory / f"{name}.csv"
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_text(
        directory / f"{name}.tex", df.to_latex(index=False, float_format=lambda x: float_format % x, escape=True)
    )
    return csv


def save_figure(fig, directory: str | Path, name: str) -> Path:
    """Write `name.png` (150 dpi) and `name.pdf` under `directory`; returns the PNG path."""
    directory = Path(directory)
    png = directory / f"{name}.png"
    # Fixed metadata keeps the files byte-identical across runs with the same inputs.
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight", metadata={"Software": None})
    with atomic_path(directory / f"{name}.pdf") as tmp:
        fig.savefig(
            tmp, format="pdf", bbox_inches="tight", metadata={"Creator": None, "Producer": None, "CreationDate": None}
        )
    return png


def save_json(obj: object, path: str | Path) -> Path:
    """Write sorted, indented JSON (parent folders created)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
