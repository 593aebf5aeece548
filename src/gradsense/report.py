"""Write results the same way everywhere: tables as CSV + LaTeX, figures as PNG + PDF, records as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def save_table(df: pd.DataFrame, directory: str | Path, name: str, float_format: str = "%.3f") -> Path:
    """Write `name.csv` and `name.tex` (booktabs) under `directory`; returns the CSV path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv = directory / f"{name}.csv"
    df.to_csv(csv, index=False, float_format="%.6g")
    latex = df.to_latex(index=False, float_format=lambda x: float_format % x, escape=True)
    (directory / f"{name}.tex").write_text(latex)
    return csv


def save_figure(fig, directory: str | Path, name: str) -> Path:
    """Write `name.png` (150 dpi) and `name.pdf` under `directory`; returns the PNG path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png = directory / f"{name}.png"
    # Fixed metadata keeps the files byte-identical across runs with the same inputs.
    fig.savefig(png, dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(directory / f"{name}.pdf", bbox_inches="tight", metadata={"Creator": None, "Producer": None, "CreationDate": None})
    return png


def save_json(obj: object, path: str | Path) -> Path:
    """Write sorted, indented JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    return path
