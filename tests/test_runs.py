"""gradsense.runs: a training's spec from params.yaml, its files written and read back, and the presets' runs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from gradsense import GradsenseError
from gradsense import main_table as mt
from gradsense.runs import REFERENCE, RunSpec, read_run, run_instances, run_specs, write_run

ROOT = Path(__file__).resolve().parents[1]


def test_a_spec_splits_its_role_label_and_the_settings_it_changes():
    spec = RunSpec.parse("steering", {"role": "variant", "label": "on steering", "epochs": 1, "train_on": "steering"})
    assert (spec.role, spec.label, spec.train_on, spec.fold) == ("variant", "on steering", "steering", None)
    assert spec.overrides == {"epochs": 1}  # what variant_configs applies to the checkpoint's settings
    assert RunSpec.parse("seed_3", {"role": "seed", "seed": 3}).label == "seed 3"
    assert RunSpec.parse("budget", {"role": "reference", "epochs": 1}).label == REFERENCE
    assert RunSpec.parse("fold_music", {"role": "fold", "fold": "music"}).label == "held-out domain fold: music"


@pytest.mark.parametrize(
    ("key", "entry", "message"),
    [
        ("Raw-1", {"role": "variant", "label": "x"}, "lower-case letters"),
        ("raw", {"label": "x"}, "needs role"),
        ("raw", {"role": "variant"}, "needs a label"),
        ("seed_1", {"role": "seed"}, "sets seed"),
        ("fold", {"role": "fold"}, "names its held-out domain"),
        ("raw", {"role": "variant", "label": "x", "fold": "music"}, "names its held-out domain"),
        ("raw", {"role": "variant", "label": "x", "train_on": "noise"}, "train_on must be one of"),
    ],
)
def test_a_bad_entry_is_a_one_line_error_naming_the_run(key, entry, message):
    with pytest.raises(GradsenseError, match=message) as error:
        RunSpec.parse(key, entry)
    assert key in str(error.value) and "\n" not in str(error.value)


def test_at_most_one_reference():
    with pytest.raises(GradsenseError, match="at most one run has role reference"):
        run_specs({"a": {"role": "reference"}, "b": {"role": "reference", "epochs": 2}})


@pytest.mark.parametrize("preset", ["params.yaml", "params-ci.yaml"])
def test_every_preset_run_parses_and_labels_are_unique(preset):
    specs = run_specs(yaml.safe_load((ROOT / preset).read_text())["runs"])
    labels = [s.label for s in specs.values()]
    assert len(set(labels)) == len(labels) and {s.role for s in specs.values()} >= {"seed", "variant", "fold"}


def _scored(n: int, seed: int) -> pd.DataFrame:
    """A frame shaped like a scored run: ids, 0/1 outcomes with a missing value, text with an empty `to`."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": [f"i{k}" for k in range(n)],
            "domain_ok": rng.random(n) < 0.6,
            "answer_ok": rng.random(n) < 0.4,
            "from_ok": [np.nan if k % 4 == 0 else float(k % 2) for k in range(n)],
            "pressure": rng.random(n) < 0.9,
            "reported_to": [None if k % 5 == 0 else f"{1700 + k}" for k in range(n)],
            "trip": rng.normal(size=n) / 3,
        }
    )


def test_written_frames_read_back_to_the_same_rates(tmp_path):
    """Frames go through CSV between the training instance and the collector: the rates must not move."""
    spec = RunSpec.parse("raw", {"role": "variant", "label": "raw", "mode": "raw"})
    frames = {"test": _scored(40, 0), "selection": _scored(12, 1)}
    folder = write_run(tmp_path, spec, frames)
    assert json.loads((folder / "run.json").read_text())["spec"]["overrides"] == {"mode": "raw"}
    back = read_run(tmp_path, spec)
    assert set(back) == set(frames)
    for name, frame in frames.items():
        for column in ("domain_ok", "answer_ok", "from_ok", "pressure", "trip"):
            assert np.allclose(back[name][column].astype(float), frame[column].astype(float), equal_nan=True, rtol=0)
        assert back[name]["reported_to"].fillna("").tolist() == frame["reported_to"].fillna("").tolist()  # "1701"
        assert back[name]["id"].tolist() == frame["id"].tolist()
    assert mt.core_rates(back["test"], None, 50, 0) == mt.core_rates(frames["test"], None, 50, 0)


def test_a_missing_or_stale_run_is_a_one_line_error(tmp_path):
    spec = RunSpec.parse("raw", {"role": "variant", "label": "raw", "mode": "raw"})
    with pytest.raises(GradsenseError, match="run 'raw' has no results.*gradsense run raw"):
        read_run(tmp_path, spec)
    write_run(tmp_path, spec, {"test": _scored(3, 0)})
    changed = RunSpec.parse("raw", {"role": "variant", "label": "raw", "mode": "norm"})
    with pytest.raises(GradsenseError, match="trained with other settings than runs.raw"):
        read_run(tmp_path, changed)


def test_run_names_an_unknown_run_before_loading_anything(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"runs": {"seed_1": {"role": "seed", "seed": 1}}}))
    with pytest.raises(GradsenseError, match="no run nope in the params file's runs: \\(have seed_1\\)"):
        run_instances(["nope"], tmp_path)


def test_the_gpu_preset_has_the_full_presets_keys():
    full, gpu = (yaml.safe_load((ROOT / p).read_text()) for p in ("params.yaml", "params-gpu.yaml"))
    assert {k: set(v) if isinstance(v, dict) else None for k, v in full.items() if k != "runs"} == {
        k: set(v) if isinstance(v, dict) else None for k, v in gpu.items() if k != "runs"
    }
    assert set(gpu["runs"]) == set(full["runs"]) and gpu["train"]["lora_rank"] > 0
    run_specs(gpu["runs"])  # every run parses
