"""gradsense.models: loading, errors, block access."""

import shutil

import pytest
import torch

from gradsense import GradsenseError, load_model, models
from gradsense.models import architecture, blocks, check_layer, n_layers, resolve_device


def test_tiny_model_is_frozen_and_has_blocks(tiny):
    model, tokenizer = tiny
    assert n_layers(model) == 4 and len(blocks(model)) == 4
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None
    assert architecture(model)["d_model"] == 64


@pytest.mark.parametrize("layer", [4, -5, 1.5, "2"])
def test_layer_out_of_range_is_an_error(tiny, layer):
    with pytest.raises(GradsenseError, match="layer .* out of range"):
        check_layer(tiny[0], layer)


def test_negative_layer_counts_from_end(tiny):
    assert check_layer(tiny[0], -1) == 3


def test_device_auto_and_errors():
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(GradsenseError, match="device"):
        resolve_device("nonsense")


def test_unknown_model_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GradsenseError, match="unknown model 'no/such-model-xyz'"):
        load_model("no/such-model-xyz")
    with pytest.raises(GradsenseError, match="unknown model './missing-dir'"):
        load_model("./missing-dir")


def test_missing_weights_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSENSE_DATA", str(tmp_path))
    with pytest.raises(GradsenseError, match=f"weights file {tmp_path}/SmolLM2.*missing"):
        load_model()


def test_corrupt_weights_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSENSE_DATA", str(tmp_path))
    (tmp_path / models.DEFAULT_GGUF).write_bytes(b"GGUF not really")
    with pytest.raises(GradsenseError, match=f"weights file {tmp_path}/SmolLM2.*corrupt") as info:
        load_model()
    assert "\n" not in str(info.value)


def test_unreadable_gguf_is_an_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(GradsenseError, match="broken.gguf cannot be read"):
        load_model(str(bad))


def test_local_directory_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"), device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.integration
def test_default_model_loads_from_cache_with_identical_logits(smol, tmp_path, monkeypatch):
    model, tokenizer = smol
    assert (n_layers(model), model.config.hidden_size) == (30, 576)
    # A fresh cache folder forces the GGUF path; its logits must equal the cached safetensors copy's.
    monkeypatch.setenv("GRADSENSE_CACHE", str(tmp_path))
    fresh, _ = load_model(device="cpu")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert (tmp_path / f"{models.DEFAULT_GGUF[:-5]}-{models.DEFAULT_GGUF_SHA256[:16]}" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path)
