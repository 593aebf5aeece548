"""Run one pipeline stage: read its section of params.yaml and execute its notebook with papermill."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from gradsense.errors import GradsenseError
from gradsense.timing import peak_rss_gb, save_timing, timing_path

SHARED_KEYS = ("seed",)
# Stages that also read other top-level sections: the collector its runs, the paper the replications it tabulates.
EXTRA_SECTIONS = {"ablations": ("runs",), "paper": ("replication",)}
VOLATILE = ("start_time", "end_time", "duration")  # papermill's clock readings, kept out of the executed notebook
HTML_STAGES = ("paper",)  # stages whose executed notebook is also exported as an HTML report (code hidden)
SCREENSHOT = "page.png"  # the HTML report's full-page screenshot beside it, kept when Chromium is installed


def notebook_for(stage: str, root: Path) -> Path:
    """The notebook `notebooks/NN_<stage>.ipynb` that implements a stage."""
    found = sorted((root / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(found) != 1:
        raise GradsenseError(f"unknown stage {stage!r}: expected one notebooks/NN_{stage}.ipynb, found {len(found)}")
    return found[0]


def read_params(params_file: str | Path) -> dict:
    """The whole params file (one-line error when it is missing)."""
    path = Path(params_file)
    if not path.is_file():
        raise GradsenseError(f"params file {path} is missing")
    return yaml.safe_load(path.read_text()) or {}


def stage_parameters(stage: str, params_file: Path) -> dict:
    """Notebook parameters for a stage: `seed`, `model.name` → `model_name`, `model.device` → `device`, then the section."""
    params = read_params(params_file)
    if stage not in params:
        raise GradsenseError(f"params file {params_file} has no section {stage!r}")
    model = params.get("model", {}) or {}
    merged = {key: params[key] for key in SHARED_KEYS if key in params}
    merged["model_name"] = model.get("name")
    merged["device"] = model.get("device", "auto")
    merged.update(params[stage] or {})
    for section in EXTRA_SECTIONS.get(stage, ()):
        merged[section] = params.get(section) or {}
    return merged


def strip_clock(notebook: Path) -> None:
    """Remove papermill's start/end times and durations, and its random id of the parameters cell, from an executed
    notebook: the same run gives the same notebook (its wall time is in results/timing/)."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        record = cell.metadata.get("papermill", {})
        for key in VOLATILE:
            record.pop(key, None)
        cell.metadata.pop("execution", None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"  # papermill gives the cell it adds a random id
    for key in (*VOLATILE, "input_path", "output_path"):
        nb.metadata.get("papermill", {}).pop(key, None)
    nbformat.write(nb, notebook)


def export_html(notebook: Path, html: Path) -> Path:
    """Render an executed notebook to a self-contained HTML page without code cells, with a table of contents."""
    import nbformat
    from nbconvert import HTMLExporter

    from gradsense import page

    nb = nbformat.read(notebook, as_version=4)
    nb.metadata["title"] = page.title(nb) or notebook.stem
    exporter = HTMLExporter(
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        extra_loaders=[page.LOADER],
        template_file=page.TEMPLATE,
    )
    body, _ = exporter.from_notebook_node(nb)
    html.write_text(page.add_contents(body))
    return html


def keep_screenshot(html: Path, png: Path) -> Path | None:
    """Check the page in headless Chromium and keep its screenshot; without Chromium say so in one line, no error."""
    from gradsense import browser

    missing = browser.unavailable()
    if missing:
        print(f"{html.name}: no browser check, no {png.name} ({missing})", file=sys.stderr)
        return None
    report = browser.check_page(html, png)
    if not report.ok:
        raise GradsenseError(f"the exported page is broken: {report.summary()}")
    return png


def run_stage(stage: str, root: Path = Path("."), params_file: Path | None = None) -> Path:
    """Execute a stage's notebook into results/<stage>/; on failure remove its outputs and raise a one-line error."""
    import papermill

    root = root.resolve()
    notebook = notebook_for(stage, root)
    parameters = stage_parameters(stage, params_file or root / "params.yaml")
    outputs = [root / "results" / stage, root / "figures" / stage]
    for folder in outputs:
        shutil.rmtree(folder, ignore_errors=True)
    timing_path(root, stage).unlink(missing_ok=True)
    (root / "results" / stage).mkdir(parents=True)
    executed = root / "results" / stage / notebook.name
    start = time.perf_counter()
    os.environ["TQDM_DISABLE"] = "1"  # the kernel inherits it: no progress bars (with their rates) in the notebook
    try:
        papermill.execute_notebook(
            str(notebook),
            str(executed),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(root / "notebooks"),
            progress_bar=False,
            log_output=True,
        )
    except papermill.PapermillExecutionError as exc:
        for folder in outputs:  # nothing half-written is left looking valid
            shutil.rmtree(folder, ignore_errors=True)
        timing_path(root, stage).unlink(missing_ok=True)
        raise GradsenseError(
            f"stage {stage} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}".splitlines()[0]
        ) from None
    if stage in HTML_STAGES:  # the page, and its screenshot where Chromium is (a PNG: never byte-compared)
        keep_screenshot(export_html(executed, executed.with_suffix(".html")), executed.parent / SCREENSHOT)
    strip_clock(executed)
    # The kernel is a reaped child process, so RUSAGE_CHILDREN holds its peak resident memory; the record joins what
    # the notebook itself timed (results/timing/<stage>.json), outside the stage's cached outputs.
    record = {"stage": stage, "wall_s": round(time.perf_counter() - start, 2), "peak_rss_gb": peak_rss_gb(True)}
    save_timing(root, stage, record)
    return executed
