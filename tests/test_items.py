"""gradsense.items: malformed item files are named line by line; items too long for the model are refused before
any gradient; `describe` returns one {id, description, domain, from, to} record per item."""

import json

import numpy as np
import pytest

import gradsense.items as items_module
from gradsense.errors import GradsenseError
from gradsense.items import FIELDS, check_lengths, describe, item_gradients, read_items, summary_line

from describer_helpers import describer

GOOD = {"id": "a", "prompt": "The capital of France is", "right": "Paris"}


def test_read_items_reports_every_malformed_item(tmp_path):
    path = tmp_path / "items.jsonl"
    lines = [GOOD, {"id": "b", "prompt": "x"}, None, {**GOOD, "context": 3}, {**GOOD, "prompt": " "}]
    path.write_text("\n".join("" if item is None else json.dumps(item) for item in lines) + "\n")
    with pytest.raises(GradsenseError) as err:
        read_items(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 3 malformed line(s)") and "\n" not in message
    assert "line 2: missing field 'right'" in message and "line 4: field 'context' must be a string" in message
    assert "line 5: field 'prompt' must be a non-empty string" in message  # numbers count the blank line 3
    path.write_text(json.dumps(GOOD) + "\n\n")
    assert read_items(path) == [GOOD]


def test_read_items_names_a_line_that_is_not_json_and_a_missing_or_empty_file(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(GradsenseError, match=r"items.jsonl:2: not valid JSON"):
        read_items(path)
    path.write_text(json.dumps(GOOD) + "\n[1, 2]\n")
    with pytest.raises(GradsenseError, match=r"items.jsonl:2: expected a JSON object"):
        read_items(path)
    with pytest.raises(GradsenseError, match="input file .* is missing"):
        read_items(tmp_path / "none.jsonl")
    path.write_text("\n")
    with pytest.raises(GradsenseError, match="no items"):
        read_items(path)


def test_items_longer_than_the_context_window_are_refused_before_any_gradient(tiny, monkeypatch):
    model, tok = tiny
    d = describer(model, tok)
    limit = model.config.max_position_embeddings  # 256 positions; the tiny tokenizer has one token per character
    monkeypatch.setattr(items_module, "item_gradients", lambda *a, **k: pytest.fail("gradients were computed"))
    long_prompt = {"id": "long", "prompt": "word " * 60, "right": "x"}
    with pytest.raises(GradsenseError) as err:
        describe([GOOD, long_prompt], describer=d)
    assert str(err.value) == (
        f"item 'long': prompt + answer is {len(tok(long_prompt['prompt'])['input_ids']) + 2} tokens, over the "
        f"model's context window of {limit} positions"
    )
    long_context = {**GOOD, "id": 7, "context": "word " * 45}  # short prompt, but context + question + decoding
    with pytest.raises(GradsenseError, match=r"^item 7: context \+ question \+ decoding is \d+ tokens, over the model"):
        describe([long_context], describer=d, max_new_tokens=8)
    check_lengths(d, [GOOD, {**GOOD, "context": "word " * 5}], max_new_tokens=8)  # short items pass


def test_describe_returns_one_record_per_item_in_field_order(tiny):
    model, tok = tiny
    out = describe(
        [GOOD, {**GOOD, "id": 2, "context": "A passage."}], describer=describer(model, tok), max_new_tokens=3
    )
    assert [r["id"] for r in out] == ["a", 2] and all(tuple(r) == FIELDS for r in out)
    assert all(r["description"].startswith("domain:") for r in out)  # structured decoding
    with pytest.raises(GradsenseError, match="item b: missing field 'right'"):
        describe([{"id": "b", "prompt": "x"}], describer=describer(model, tok))
    with pytest.raises(GradsenseError, match="at least two"):
        describe([GOOD], describer=describer(model, tok), control="shuffle")


def test_a_per_position_describer_reads_each_target_position_of_new_items(tiny):
    """read "each": `item_gradients` gives (N, k, d), slot 0 = the last-position gradient a "last" describer reads,
    and `describe` (with the round trip, taken at the last position) runs on it."""
    model, tok = tiny
    items = [GOOD, {"id": "b", "prompt": "The Battle of Hastings took place in", "right": "1066"}]
    each = describer(model, tok, read="each", k=3)
    per_position = item_gradients(each, items)
    last = item_gradients(describer(model, tok), items)
    assert per_position.shape == (2, 3, last.shape[-1]) and last.ndim == 2
    np.testing.assert_allclose(per_position[:, 0], last, rtol=1e-5, atol=1e-7)
    assert np.abs(per_position[:, 1] - per_position[:, 0]).max() > 0  # a later position is not a copy of the first
    out = describe(items, describer=each, max_new_tokens=3, faithfulness=True)
    assert [r["id"] for r in out] == ["a", "b"] and all(
        np.isfinite(r["roundtrip_cosine"]) or r["to"] is None for r in out
    )


def test_summary_line_counts_parsed_fields():
    records = [
        {"id": 1, "description": "d", "domain": "history", "from": "1799", "to": "1789"},
        {"id": 2, "description": "d", "domain": "biology", "from": None, "to": None},
    ]
    assert summary_line(records, 3.04) == "2 items described in 3.0 s; fields parsed: domain 2/2, from 1/2, to 1/2"
