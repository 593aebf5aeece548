"""Notebooks: each committed .ipynb is paired by jupytext with its percent script in notebooks/src/, and stores no outputs."""

from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))


def _cells(notebook) -> list[tuple]:
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in notebook.cells]


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_pair_is_in_sync_and_has_no_outputs(source):
    notebook = jupytext.read(ROOT / "notebooks" / f"{source.stem}.ipynb")
    assert _cells(notebook) == _cells(jupytext.read(source)), (
        f"notebooks/{source.stem}.ipynb and its script differ: run `make sync` (jupytext --sync)"
    )
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in notebook.cells if c.cell_type == "code"
    )


def test_every_notebook_has_a_script_and_the_pairing_is_configured():
    assert {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")} == {s.stem for s in SOURCES}
    config = jupytext.config.load_jupytext_configuration_file(str(ROOT / "pyproject.toml"))
    assert config.formats in ("ipynb,src//py:percent", ["ipynb,src//py:percent"])


def test_an_edit_on_either_side_round_trips(tmp_path):
    """What JupyterLab's jupytext contents manager does on save: the .ipynb edit reaches the script and back."""
    notebook = jupytext.read(SOURCES[0])
    notebook.cells[-1].source += "\nedited = True"
    text = jupytext.writes(notebook, fmt="py:percent")
    assert "edited = True" in text
    assert _cells(jupytext.reads(text, fmt="py:percent")) == _cells(notebook)
