"""Every stage's artifact paths in one place: notebooks, the CLI and `dvc.yaml` (checked by a test) agree on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("model_card", "corrections", "gradients", "oracle", "train", "evaluate", "controls", "ablations", "paper")
RUN_STAGE = "training"  # the foreach stage of dvc.yaml: one describer training per params.yaml `runs:` entry
REPLICATION_STAGE = "replication"  # the foreach stage re-running corrections → evaluate on another model, per entry

# The artifacts one stage hands to later ones, relative to the repository root (the stage's folder is results/<stage>).
ARTIFACTS = {
    "corrections": "results/corrections/corrections.csv",
    "gradients": "results/gradients/gradients.npz",
    "labels": "results/oracle/labels.jsonl",
    "checkpoint": "results/train/checkpoint",
    "descriptions": "results/evaluate/descriptions.csv",
    "decoupling_items": "results/evaluate/decoupling_items.csv",
    "controls": "results/controls/controls.csv",
    "controls_items": "results/controls/controls_items.csv",
    "runs": "results/runs",  # one folder per training@<key> instance (gradsense.runs)
    "replication": "results/replication",  # one project root per replication@<key> instance (gradsense.replication)
}

# Which artifacts each stage reads (its `results/` deps in dvc.yaml; the paper stage reads every stage's folders).
_SCORED = (  # what every stage after evaluate reads
    "corrections",
    "gradients",
    "labels",
    "checkpoint",
    "descriptions",
    "decoupling_items",
)
READS = {
    "model_card": (),
    "corrections": (),
    "gradients": ("corrections",),
    "oracle": ("corrections", "gradients"),
    "train": ("corrections", "gradients", "labels"),
    "evaluate": ("corrections", "gradients", "labels", "checkpoint"),
    "controls": _SCORED,  # the evaluate stage's scored items and decoupling plan
    RUN_STAGE: (*_SCORED, "controls_items"),  # a training run: the evaluate items and the controls subset
    "ablations": (*_SCORED, "controls", "controls_items", "runs"),  # the collector: the runs and the controls table
    "paper": (),
}


def producer(artifact: str) -> str:
    """The stage that writes an artifact (the folder after `results/`; results/runs: the training instances)."""
    folder = ARTIFACTS[artifact].split("/")[1]
    return RUN_STAGE if folder == "runs" else folder


@dataclass(frozen=True)
class Paths:
    """Artifact paths under one repository root (a notebook uses `Paths("..")`, since it runs in `notebooks/`)."""

    root: Path = Path(".")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def results(self, stage: str) -> Path:
        """`results/<stage>`: the stage's tables and data."""
        return self.root / "results" / stage

    def figures(self, stage: str) -> Path:
        """`figures/<stage>`: the stage's PNG + PDF figures."""
        return self.root / "figures" / stage

    def artifact(self, name: str) -> Path:
        """The path of a named artifact (see `ARTIFACTS`)."""
        return self.root / ARTIFACTS[name]

    def __getattr__(self, name: str) -> Path:
        if name in ARTIFACTS:
            return self.artifact(name)
        raise AttributeError(name)
