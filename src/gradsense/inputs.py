"""A stage's inputs joined: corrections rows that have a gradient and an oracle label, the context passages, the layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradsense.corrections import load_corrections
from gradsense.errors import GradsenseError
from gradsense.files import read_jsonl
from gradsense.gradients import extracted_layer, load_gradients
from gradsense.models import data_dir
from gradsense.paths import Paths
from gradsense.sampling import stratified
from gradsense.teacher import UNCLEAR, parse_label


def read_labels(path: str | Path) -> dict[str, str]:
    """{item id: label} from the oracle stage's labels.jsonl (one-line error naming the first bad record)."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"labels file {path} is missing (run the oracle stage)")
    labels: dict[str, str] = {}
    for number, row in enumerate(read_jsonl(path), start=1):
        if "id" not in row or "label" not in row:
            raise GradsenseError(f"{path}: record {number} is not a JSON object with 'id' and 'label'")
        labels[str(row["id"])] = str(row["label"])
    return labels


def read_contexts(path: str | Path) -> pd.DataFrame:
    """The context passages (columns id, pool = neutral|domain, domain, text)."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"context passages {path} are missing (run `make data`)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != ["id", "pool", "domain", "text"] or not set(table["pool"]) <= {"neutral", "domain"}:
        raise GradsenseError(f"context passages {path} need columns id, pool (neutral|domain), domain, text")
    return table


def join_items(corrections: pd.DataFrame, grad_ids: Sequence[str], labels: Mapping[str, str]) -> pd.DataFrame:
    """Corrections rows that have a gradient, with `row` (their index in the gradient arrays) and `label` (None when
    the oracle labelled no such item), in gradient order."""
    where = {str(i): r for r, i in enumerate(grad_ids)}
    items = corrections[corrections["id"].astype(str).isin(where)].copy()
    if items.empty:
        raise GradsenseError("no corrections row has a gradient (do the corrections and gradients stages match?)")
    items["row"] = [where[str(i)] for i in items["id"]]
    items["label"] = [labels.get(str(i)) for i in items["id"]]
    return items.sort_values("row").reset_index(drop=True)


def training_items(items: pd.DataFrame, heldout_domain: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation pool): items of the train / val split with a clear label (the oracle's step raised the
    target; `unclear` labels are left out), on trained relation templates, in every domain but the held-out one
    (the describer never sees held-out subjects, templates or domain)."""
    labelled = items.dropna(subset=["label"])
    clear = np.array([(parse_label(t)["to"] or "").casefold() != UNCLEAR for t in labelled["label"]], dtype=bool)
    labelled = labelled[clear]
    usable = (labelled["template_split"] == "train") & (labelled["domain"] != heldout_domain)
    return labelled[usable & (labelled["split"] == "train")], labelled[usable & (labelled["split"] == "val")]


def validation_set(pool: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to `n` rows of `pool`, spread over its domains: the first ⌈n / domains⌉ of each (`sampling.stratified`),
    then the first `n` of those in the pool's order."""
    per_domain = -(-n // max(pool["domain"].nunique(), 1))
    return stratified(pool, "domain", per_group=per_domain).head(n)


def contexts_path() -> Path:
    """The context passages shipped in data/ (`data/facts/contexts.csv`)."""
    return data_dir() / "facts" / "contexts.csv"


@dataclass
class StageInputs:
    """What the describer stages read: the gradient arrays (every extracted layer) and the joined items."""

    arrays: dict[str, np.ndarray]
    items: pd.DataFrame

    def vectors(self, key: str, layer: int) -> np.ndarray:
        """`key` ("grads", "acts" or "steering") at one extracted layer (error when it was not extracted)."""
        return self.arrays[key][self.arrays["layers"].index(extracted_layer(self.arrays["layers"], layer))]


def load_stage_inputs(paths: Paths) -> StageInputs:
    """Load gradients, corrections and oracle labels from a run's artifacts and join them (`join_items`)."""
    arrays = load_gradients(paths.gradients)
    items = join_items(load_corrections(paths.corrections), arrays["ids"], read_labels(paths.labels))
    return StageInputs(arrays, items)
