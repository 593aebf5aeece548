"""gradsense.files: atomic writes leave nothing half-written; JSONL round-trips and names bad lines."""

import json

import pytest

from gradsense.errors import GradsenseError
from gradsense.files import atomic_dir, atomic_path, read_jsonl, writable_parent, write_jsonl, write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text(tmp_path / "t.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_failed_folder_write_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "weights.pt").write_text("x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["meta.json"]


def test_jsonl_round_trip_keeps_unicode_and_key_order_when_asked(tmp_path):
    rows = [{"b": 1, "a": "Zürich"}, {"b": 2.5, "a": "東京"}]
    path = write_jsonl(rows, tmp_path / "sub" / "r.jsonl", sort_keys=False)
    assert path.read_text().splitlines()[0] == '{"b": 1, "a": "Zürich"}'
    assert read_jsonl(path) == rows
    write_jsonl(rows, path)
    assert path.read_text().splitlines()[0] == json.dumps({"a": "Zürich", "b": 1}, ensure_ascii=False)
    with pytest.raises(ValueError):
        write_jsonl([{"x": float("nan")}], tmp_path / "nan.jsonl")
    assert not (tmp_path / "nan.jsonl").exists()


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n\n[1, 2]\n')
    with pytest.raises(GradsenseError, match=r"bad.jsonl:3: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"id": 1}\n{"id": \n')
    with pytest.raises(GradsenseError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(GradsenseError, match="missing"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_writable_parent_refuses_a_folder_that_cannot_be_created(tmp_path):
    blocker = write_text(tmp_path / "file", "x")
    with pytest.raises(GradsenseError, match="cannot create the folder"):
        writable_parent(blocker / "sub" / "out.jsonl")
    with pytest.raises(GradsenseError, match="is a folder"):
        writable_parent(tmp_path)
    assert writable_parent(tmp_path / "a" / "b.txt").parent.is_dir()


def test_atomic_dir_replaces_an_existing_folder(tmp_path):
    for content in ("first", "second"):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "meta.json").write_text(content)
    assert (tmp_path / "ckpt" / "meta.json").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
