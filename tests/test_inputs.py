"""gradsense.inputs: labels read through files.read_jsonl, items joined to gradients, the train/validation choice."""

import json

import pandas as pd
import pytest

from gradsense.errors import GradsenseError
from gradsense.gradients import extracted_layer
from gradsense.inputs import join_items, read_labels, training_items, validation_set


def test_read_labels_names_the_bad_record(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"id": 1, "label": "domain: x"}) + "\n\n" + json.dumps({"id": "b", "label": "y"}) + "\n")
    assert read_labels(path) == {"1": "domain: x", "b": "y"}
    path.write_text(json.dumps({"id": 1, "label": "x"}) + "\n" + json.dumps({"id": 2}) + "\n")
    with pytest.raises(GradsenseError, match="record 2 is not a JSON object with 'id' and 'label'"):
        read_labels(path)
    path.write_text("{oops\n")
    with pytest.raises(GradsenseError, match="labels.jsonl:1: not valid JSON"):
        read_labels(path)
    with pytest.raises(GradsenseError, match="run the oracle stage"):
        read_labels(tmp_path / "none.jsonl")


def test_join_items_keeps_gradient_order_and_marks_unlabelled():
    corrections = pd.DataFrame({"id": ["a", "b", "c"], "domain": ["x", "y", "x"]})
    items = join_items(corrections, ["c", "a", "z"], {"a": "label a"})
    assert list(items["id"]) == ["c", "a"] and list(items["row"]) == [0, 1]
    assert items["label"].isna().tolist() == [True, False] and items["label"].iloc[1] == "label a"
    with pytest.raises(GradsenseError, match="no corrections row has a gradient"):
        join_items(corrections, ["z"], {})


def test_training_items_hold_out_a_domain_and_templates():
    table = pd.DataFrame(
        {
            "id": list("abcdef"),
            "domain": ["x", "x", "y", "y", "held", "x"],
            "split": ["train", "val", "train", "train", "train", "train"],
            "template_split": ["train", "train", "train", "heldout", "train", "train"],
            "label": ["l", "l", "l", "l", "l", None],
        }
    )
    train, val = training_items(table, "held")
    assert list(train["id"]) == ["a", "c"] and list(val["id"]) == ["b"]


def test_validation_set_spreads_over_domains():
    pool = pd.DataFrame({"id": list("abcdefg"), "domain": ["y", "y", "y", "x", "x", "z", "y"]})
    assert list(validation_set(pool, 4)["id"]) == ["a", "b", "d", "e"]  # ⌈4 / 3⌉ = 2 per domain, first 4
    assert list(validation_set(pool, 3)["id"]) == ["a", "d", "f"]
    assert validation_set(pool.iloc[:0], 3).empty


def test_extracted_layer_rule():
    """The block a stage reads: the one asked for (it must have been extracted), else the middle extracted one."""
    assert extracted_layer([7, 15, 22], None) == 15 and extracted_layer([7, 15, 22], 22) == 22
    assert extracted_layer([7, 15]) == 15 and extracted_layer([3]) == 3
    with pytest.raises(
        GradsenseError, match=r"source layer 9 was not extracted by the gradients stage \(have \[7, 15, 22\]\)"
    ):
        extracted_layer([7, 15, 22], 9)
    with pytest.raises(GradsenseError, match="oracle layer 9 was not extracted"):
        extracted_layer([7, 15, 22], 9, role="oracle")
    with pytest.raises(GradsenseError, match="no extracted gradient layers"):
        extracted_layer([])
