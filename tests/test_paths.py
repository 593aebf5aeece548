"""gradsense.paths is the one place that knows artifact paths: dvc.yaml, the notebooks and the CLI agree with it."""

import re
from pathlib import Path

import yaml

from gradsense.paths import ARTIFACTS, READS, STAGES, Paths, producer

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_is_in_dvc_yaml_in_order_and_runs_its_notebook():
    assert list(DVC) == list(STAGES)
    for stage, spec in DVC.items():
        assert spec["cmd"] == f"gradsense papermill {stage}"
        assert spec["outs"][0] == f"results/{stage}"
        notebooks = [d for d in spec["deps"] if d.startswith("notebooks/")]
        assert len(notebooks) == 1 and re.fullmatch(rf"notebooks/\d\d_{stage}\.ipynb", notebooks[0])


def test_every_stage_depends_on_the_whole_package():
    for stage, spec in DVC.items():
        assert "src/gradsense" in spec["deps"], stage
        assert not [d for d in spec["deps"] if d.startswith("src/") and d != "src/gradsense"], stage


def test_dvc_results_deps_are_exactly_the_artifacts_the_stage_reads():
    for stage, spec in DVC.items():
        deps = {d for d in spec["deps"] if d.startswith("results/")}
        if stage == "paper":  # the paper reads every earlier stage's folder
            assert deps == {f"results/{s}" for s in STAGES if s != "paper"}
            continue
        assert deps == {ARTIFACTS[name] for name in READS[stage]}, stage
        for name in READS[stage]:  # an artifact is read only after the stage that writes it
            assert STAGES.index(producer(name)) < STAGES.index(stage)
            assert f"results/{producer(name)}" in DVC[producer(name)]["outs"]


def test_notebooks_reach_artifacts_only_through_paths():
    for source in sorted((ROOT / "notebooks" / "src").glob("*.py")):
        text = source.read_text()
        assert "../results" not in text and "../figures" not in text, source.name


def test_paths_resolve_under_their_root(tmp_path):
    paths = Paths(tmp_path)
    assert paths.checkpoint == tmp_path / "results" / "train" / "checkpoint"
    assert paths.results("oracle") / "labels.jsonl" == paths.labels
    assert paths.figures("train") == tmp_path / "figures" / "train"


def test_the_cli_default_checkpoint_is_the_train_stage_output():
    from gradsense.checkpoint import DEFAULT_CHECKPOINT

    assert DEFAULT_CHECKPOINT == ROOT / DVC["train"]["outs"][0] / "checkpoint"
    assert DEFAULT_CHECKPOINT == Paths(ROOT).checkpoint
