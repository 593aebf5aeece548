"""The main result on another model: the stages corrections → evaluate re-run under `results/replication/<key>/`
with `model.name` and smaller sizes from params.yaml's `replication:` entry (dvc.yaml: one `replication@<key>`
instance each), and the paper's table of both models side by side."""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from gradsense.errors import GradsenseError
from gradsense.timing import peak_rss_gb, read_timings, save_timing, timing_path

STAGES = ("corrections", "gradients", "oracle", "train", "evaluate")  # what a replication re-runs, in order
FOLDER = Path("results") / "replication"
ENTRY_KEYS = {"model", "label", "overrides"}

# The table's rows: (part, set, metric, who prefix) of the evaluate stage's headline table (paper.headline_table).
ROWS = (
    ("reading", "test subjects", "domain accuracy", "describer"),
    ("reading", "test subjects", "answer recall", "describer"),
    ("reading", "test subjects", "answer recall", "Backward Lens hit@1"),
    ("reading", "test subjects", "domain accuracy", "linear probe on the training gradients"),
    ("decoupling", "all pairs", "success (reports B)", "describer"),
    ("decoupling", "all pairs", "leakage (reports A)", "describer"),
    ("reading", "new phrasings", "domain accuracy", "describer"),
    ("reading", "new phrasings", "answer recall", "describer"),
)
COLUMNS = ["model", "blocks", "set", "metric", "who", "estimate", "low", "high", "n", "ci"]


def replication_root(root: str | Path, key: str) -> Path:
    """`<root>/results/replication/<key>`: a project root of its own (params.yaml, notebooks/, results/, figures/)."""
    return Path(root) / FOLDER / key


def _merge(base: dict, overrides: Mapping, where: str) -> dict:
    """`base` with `overrides` merged in, key by key; a key `base` does not have is an error (a typo names itself)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if key not in merged:
            raise GradsenseError(f"{where}: unknown setting {key!r} (not in the main params)")
        if isinstance(value, Mapping) and isinstance(merged[key], Mapping):
            merged[key] = _merge(merged[key], value, f"{where}.{key}")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def replication_params(params: Mapping[str, Any], key: str) -> dict:
    """The params of replication `key`: the main params with its model and per-section overrides (`replication.<key>`
    = {model, label?, overrides: {<stage>: {<setting>: value}}}); its own `runs:` and `replication:` are empty."""
    entries = params.get("replication") or {}
    if key not in entries:
        raise GradsenseError(f"no replication {key!r} in params (have: {', '.join(sorted(entries)) or 'none'})")
    entry = entries[key] or {}
    unknown = set(entry) - ENTRY_KEYS
    if unknown or "model" not in entry:
        problem = f"unknown keys {sorted(unknown)}" if unknown else "no model"
        raise GradsenseError(f"replication.{key}: {problem} (expected model, label, overrides)")
    overrides = entry.get("overrides") or {}
    bad = set(overrides) - set(STAGES)
    if bad:
        raise GradsenseError(f"replication.{key}.overrides: {sorted(bad)} are not stages it runs ({', '.join(STAGES)})")
    base = {k: v for k, v in params.items() if k not in ("runs", "replication")}
    merged = _merge(base, {"model": {"name": entry["model"]}, **overrides}, f"replication.{key}")
    return {**merged, "runs": {}, "replication": {}}


def replicate(key: str, root: str | Path = ".", params_file: str | Path | None = None) -> Path:
    """Run the replicated stages for `key` into `results/replication/<key>/`, each stage's notebook by papermill; the
    wall times go to `results/timing/replication_<key>.json`, outside the cached folder. Returns the folder."""
    from gradsense.pipeline import notebook_for, read_params, run_stage

    root = Path(root).resolve()
    params = replication_params(read_params(params_file or root / "params.yaml"), key)
    target = replication_root(root, key)
    shutil.rmtree(target, ignore_errors=True)
    timing_path(root, f"replication_{key}").unlink(missing_ok=True)
    (target / "notebooks").mkdir(parents=True)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in STAGES:
        shutil.copy2(notebook_for(stage, root), target / "notebooks")
    start = time.perf_counter()
    try:  # a failed stage leaves no outputs (run_stage), so the paper's read of the folder names what is missing
        for stage in STAGES:
            print(f"replication {key}: {stage}", flush=True)
            run_stage(stage, target)
    except GradsenseError as exc:
        raise GradsenseError(
            f"replication {key}: {exc} (rerun that stage: gradsense papermill <stage> --root {target})"
        ) from None
    stages = read_timings(target)  # per-stage wall times: moved out of the cached folder
    shutil.rmtree(target / "results" / "timing", ignore_errors=True)
    shutil.rmtree(target / "notebooks")  # the executed copies are under results/<stage>/
    record = {"replication": key, "model": params["model"]["name"], "wall_s": round(time.perf_counter() - start, 2)}
    record.update(peak_rss_gb=peak_rss_gb(True), stages={k: _strip_machine(v) for k, v in stages.items()})
    save_timing(root, f"replication_{key}", record)
    return target


def _strip_machine(record: Mapping) -> dict:
    """A stage's timing record without its machine block (the replication's record holds one)."""
    return {k: v for k, v in record.items() if k != "machine"}


def model_rows(headline: pd.DataFrame, model: str, blocks: int) -> pd.DataFrame:
    """The replication table's rows (ROWS) for one model, read from its headline table; a missing row is an error."""
    rows = []
    for part, set_name, metric, who in ROWS:
        hit = headline[
            (headline["part"] == part)
            & (headline["set"] == set_name)
            & (headline["metric"] == metric)
            & headline["who"].astype(str).str.startswith(who)
        ]
        if hit.empty:
            raise GradsenseError(f"{model}: the headline has no row {set_name} / {metric} / {who}")
        rows.append(hit.iloc[0].to_dict() | {"model": model, "blocks": blocks, "who": who})
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def replication_table(models: Mapping[str, tuple[pd.DataFrame, int]]) -> pd.DataFrame:
    """Every model's rows side by side: {model label: (its headline table, its block count)} → long table COLUMNS."""
    if not models:
        raise GradsenseError("no model to tabulate")
    return pd.concat([model_rows(h, name, n) for name, (h, n) in models.items()], ignore_index=True)


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The replication table for reading: one row per (set, metric, who), one column per model, "est [low, high]"."""
    text = table.assign(
        cell=[
            f"{e:.2f} [{lo:.2f}, {hi:.2f}] n={n:.0f}"
            for e, lo, hi, n in table[["estimate", "low", "high", "n"]].itertuples(index=False)
        ]
    )
    return text.pivot_table(index=["set", "metric", "who"], columns="model", values="cell", aggfunc="first", sort=False)


def replication_metrics(table: pd.DataFrame) -> dict:
    """Every model's estimates as a nested dict for DVC metrics: {model: {set/metric/who: estimate}}."""
    from gradsense.paper import slug

    out: dict[str, dict] = {}
    for r in table.itertuples():
        out.setdefault(slug(r.model), {})[slug(f"{r.set} {r.metric} {r.who}")] = round(float(r.estimate), 4)
    return out


def read_meta(folder: str | Path) -> dict:
    """A replication folder's params (model name, sizes) as it ran."""
    path = Path(folder) / "params.yaml"
    if not path.is_file():
        raise GradsenseError(f"{folder} is not a finished replication (no params.yaml): run `gradsense replicate`")
    return yaml.safe_load(path.read_text())


def checkpoint_blocks(folder: str | Path) -> int:
    """The block count of the model a results folder's describer was trained on (its checkpoint's meta)."""
    meta = Path(folder) / "results" / "train" / "checkpoint" / "meta.json"
    if not meta.is_file():
        raise GradsenseError(f"{meta} is missing: the train stage of {folder} did not finish")
    return int(json.loads(meta.read_text())["fingerprint"]["n_layers"])
