"""Notebooks: each committed .ipynb is the conversion of its percent-script source in notebooks/src/, without outputs."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))
spec = importlib.util.spec_from_file_location("py2nb", ROOT / "scripts" / "py2nb.py")
py2nb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(py2nb)


def _content(nb):
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_matches_its_source_and_has_no_outputs(source):
    notebook = nbformat.read(ROOT / "notebooks" / f"{source.stem}.ipynb", as_version=4)
    assert _content(notebook) == _content(py2nb.convert(source.read_text())), f"re-run scripts/py2nb.py on {source.name}"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in notebook.cells if c.cell_type == "code")


def test_every_notebook_has_a_source():
    assert {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")} == {s.stem for s in SOURCES}
