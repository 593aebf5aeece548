"""gradsense.pipeline: params → notebook parameters, papermill execution, clean failure."""

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from gradsense import GradsenseError
from gradsense.pipeline import notebook_for, run_stage, stage_parameters
from gradsense.runs import ROLES

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, body: str, section: dict) -> Path:
    (tmp_path / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("seed = 1\nmodel_name = None\ndevice = 'cpu'\nx = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "notebooks" / "07_demo.ipynb")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"seed": 5, "model": {"name": "m", "device": "cpu"}, "demo": section})
    )
    return tmp_path


def test_stage_parameters_merge_shared_and_section(tmp_path):
    root = _project(tmp_path, "", {"x": 3})
    assert stage_parameters("demo", root / "params.yaml") == {"seed": 5, "model_name": "m", "device": "cpu", "x": 3}
    with pytest.raises(GradsenseError, match="no section 'other'"):
        stage_parameters("other", root / "params.yaml")
    with pytest.raises(GradsenseError, match="unknown stage 'other'"):
        notebook_for("other", root)


def test_stage_parameters_give_the_collector_its_runs(tmp_path):
    params = {"seed": 0, "ablations": {"n_boot": 9}, "runs": {"seed_1": {"role": "seed", "seed": 1}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    merged = stage_parameters("ablations", tmp_path / "params.yaml")
    assert merged["n_boot"] == 9 and merged["runs"] == params["runs"]


def test_run_stage_passes_params_and_writes_outputs(tmp_path):
    body = (
        "import json, pathlib\npathlib.Path('../results/demo/out.json').write_text(json.dumps([seed, model_name, x]))"
    )
    root = _project(tmp_path, body, {"x": 3})
    executed = run_stage("demo", root)
    assert executed.is_file()
    assert json.loads((root / "results" / "demo" / "out.json").read_text()) == [5, "m", 3]
    # the clock goes to results/timing/demo.json, with the machine; the executed notebook keeps no clock reading
    timing = json.loads((root / "results" / "timing" / "demo.json").read_text())
    notebook = nbformat.read(executed, as_version=4)
    assert timing["wall_s"] > 0 and timing["machine"]["cpus"] >= 1 and timing["stage"] == "demo"
    assert "duration" not in notebook.metadata["papermill"] and notebook.metadata["papermill"]["parameters"]["x"] == 3
    assert not [c for c in notebook.cells if {"start_time", "duration"} & set(c.metadata.get("papermill", {}))]
    first = executed.read_bytes()
    run_stage("demo", root)  # the same stage again: the same executed notebook, byte for byte
    assert executed.read_bytes() == first


def test_failed_stage_leaves_no_outputs_and_one_line_error(tmp_path):
    body = "import pathlib\npathlib.Path('../results/demo/half.csv').write_text('x')\nraise ValueError('bad\\nthing')"
    root = _project(tmp_path, body, {"x": 3})
    with pytest.raises(GradsenseError, match="stage demo failed.*ValueError: bad$"):
        run_stage("demo", root)
    assert not (root / "results" / "demo").exists()


def _notebook_stages() -> dict:
    return {k: v for k, v in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items() if "foreach" not in v}


def test_every_dvc_stage_is_a_papermill_notebook_with_parameters_cell():
    for name, stage in _notebook_stages().items():
        assert stage["cmd"] == f"gradsense papermill {name}"
        notebook = notebook_for(name, ROOT)
        assert f"notebooks/{notebook.name}" in stage["deps"]
        cells = nbformat.read(notebook, as_version=4).cells
        assert any("parameters" in c.metadata.get("tags", []) for c in cells), notebook


def test_notebook_defaults_equal_the_ci_preset():
    """The `parameters` cell of each stage's notebook is the `ci` preset, so nbval runs exactly that preset."""
    ci = yaml.safe_load((ROOT / "params-ci.yaml").read_text())
    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    ci_roles, full_roles = ({k: v["role"] for k, v in p["runs"].items()} for p in (ci, full))
    assert set(full_roles.values()) == set(ROLES) and set(ci_roles.values()) == set(ROLES) - {"reference"}
    assert all(ci_roles[k] == full_roles[k] for k in ci_roles.keys() & full_roles.keys())
    for name in _notebook_stages():
        assert set(ci[name] or {}) == set(full[name] or {}), f"{name}: params.yaml and params-ci.yaml keys differ"
        cell = next(
            c
            for c in nbformat.read(notebook_for(name, ROOT), as_version=4).cells
            if "parameters" in c.metadata.get("tags", [])
        )
        defaults: dict = {}
        exec(cell.source, {}, defaults)  # the parameters cell holds plain assignments
        expected = stage_parameters(name, ROOT / "params-ci.yaml")
        assert {k: defaults.get(k) for k in expected} == expected, name
