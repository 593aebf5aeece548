"""gradsense.paths is the one place that knows artifact paths: dvc.yaml, the notebooks and the CLI agree with it."""

import re
from pathlib import Path

import yaml

from gradsense.paths import ARTIFACTS, READS, REPLICATION_STAGE, RUN_STAGE, STAGES, Paths, producer
from gradsense.replication import STAGES as REPLICATED

ROOT = Path(__file__).resolve().parents[1]
ALL = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
DVC = {name: spec for name, spec in ALL.items() if name not in (RUN_STAGE, REPLICATION_STAGE)}  # notebook stages
ORDER = [*STAGES[: STAGES.index("ablations")], RUN_STAGE, "ablations", REPLICATION_STAGE, "paper"]


def test_every_stage_is_in_dvc_yaml_in_order_and_runs_its_notebook():
    assert list(ALL) == ORDER
    for stage, spec in DVC.items():
        assert spec["cmd"] == f"gradsense papermill {stage}"
        assert spec["outs"][0] == f"results/{stage}"
        notebooks = [d for d in spec["deps"] if d.startswith("notebooks/")]
        assert len(notebooks) == 1 and re.fullmatch(rf"notebooks/\d\d_{stage}\.ipynb", notebooks[0])


def test_every_stage_depends_on_the_whole_package():
    for stage, spec in ALL.items():
        spec = spec.get("do", spec)
        assert "src/gradsense" in spec["deps"], stage
        assert not [d for d in spec["deps"] if d.startswith("src/") and d != "src/gradsense"], stage


def test_dvc_results_deps_are_exactly_the_artifacts_the_stage_reads():
    for stage, spec in DVC.items():
        deps = {d for d in spec["deps"] if d.startswith("results/")}
        if stage == "paper":  # the paper reads every earlier stage's folder
            assert deps == {f"results/{s}" for s in STAGES if s != "paper"} | {ARTIFACTS["replication"]}
            continue
        assert deps == {ARTIFACTS[name] for name in READS[stage]}, stage
        for name in READS[stage]:  # an artifact is read only after the stage that writes it
            assert ORDER.index(producer(name)) < ORDER.index(stage)
            outs = ALL[producer(name)].get("do", ALL[producer(name)])["outs"]
            assert ARTIFACTS[name].startswith(outs[0].split("/${key}")[0]), name


def test_the_training_instances_read_their_artifacts_and_write_one_folder_each():
    spec = ALL[RUN_STAGE]
    assert spec["foreach"] == "${runs}"  # one instance per params.yaml `runs:` entry
    do = spec["do"]
    assert do["cmd"] == "gradsense run ${key}" and do["outs"] == ["results/runs/${key}"]
    assert {d for d in do["deps"] if d.startswith("results/")} == {ARTIFACTS[n] for n in READS[RUN_STAGE]}
    assert "src/gradsense" in do["deps"] and "runs.${key}" in do["params"]
    assert "runs" in READS["ablations"] and "runs" in DVC["ablations"]["params"]


def test_the_replication_instances_run_the_replicated_notebooks_into_one_folder_each():
    spec = ALL[REPLICATION_STAGE]
    assert spec["foreach"] == "${replication}"  # one instance per params.yaml `replication:` entry
    do = spec["do"]
    assert do["cmd"] == "gradsense replicate ${key}" and do["outs"] == [ARTIFACTS["replication"] + "/${key}"]
    notebooks = sorted(d for d in do["deps"] if d.startswith("notebooks/"))
    assert [re.sub(r"notebooks/\d\d_(\w+)\.ipynb", r"\1", n) for n in notebooks] == list(REPLICATED)
    assert not [d for d in do["deps"] if d.startswith("results/")]  # it computes everything it reports itself
    assert {*REPLICATED, "replication.${key}", "model", "seed"} <= set(do["params"])
    assert "replication" in DVC["paper"]["params"]


def test_wall_times_are_uncached_metrics_outside_every_cached_output():
    for stage, spec in ALL.items():
        do = spec.get("do", spec)
        (metrics,) = do["metrics"]
        (path, options) = next(iter(metrics.items()))
        assert path.startswith("results/timing/") and options == {"cache": False}, stage
        assert not any(path.startswith(out.split("${")[0]) for out in do["outs"] if isinstance(out, str)), stage


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
