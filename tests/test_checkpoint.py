"""gradsense.checkpoint: a saved describer loads back identical (projector, LoRA), only onto its own model."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from gradsense.checkpoint import load_describer, read_meta, save_checkpoint, variant_configs
from gradsense.errors import GradsenseError
from gradsense.training import TrainConfig, train_projector

from describer_helpers import LABELS, D, config, grads
from tiny_model import tiny_llama


def test_checkpoint_roundtrip_and_mismatches(tiny, tmp_path):
    model, tok = tiny
    d, _ = train_projector(
        model, tok, grads(), LABELS, config(mode="raw"), TrainConfig(steps=2, batch_size=4), progress=False
    )
    save_checkpoint(d, tmp_path / "ckpt", model_name="tiny", extra={"heldout_domain": "sport"})
    meta = read_meta(tmp_path / "ckpt")
    assert meta["config"]["source_layer"] == 1 and meta["d_model"] == D and meta["heldout_domain"] == "sport"
    assert meta["train"]["steps"] == 2  # the training settings travel with the projector
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    loaded = load_describer(tmp_path / "ckpt", model, tok)
    g = torch.as_tensor(grads(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.projector(g), d.projector(g))
    assert loaded.describe_gradients(grads(3), max_new_tokens=5).equals(
        d.describe_gradients(grads(3), max_new_tokens=5)
    )
    with pytest.raises(GradsenseError, match="another model"):
        load_describer(tmp_path / "ckpt", *tiny_llama(seed=1))
    with pytest.raises(GradsenseError, match="layer 1, not layer 2"):
        load_describer(tmp_path / "ckpt", model, tok, source_layer=2)
    with pytest.raises(GradsenseError, match="missing"):
        load_describer(tmp_path / "nothing", model, tok)
    (tmp_path / "ckpt" / "meta.json").write_text("{broken")
    with pytest.raises(GradsenseError, match="not valid JSON"):
        read_meta(tmp_path / "ckpt")


def test_saving_again_replaces_the_checkpoint(tiny, tmp_path):
    model, tok = tiny
    first, _ = train_projector(
        model, tok, grads(), LABELS, config(), TrainConfig(steps=1, batch_size=4), progress=False
    )
    save_checkpoint(first, tmp_path / "ckpt", extra={"run": 1})
    save_checkpoint(first, tmp_path / "ckpt", extra={"run": 2})
    assert read_meta(tmp_path / "ckpt")["run"] == 2 and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_lora_checkpoint_loads_into_a_fresh_model(tmp_path):
    model, tok = tiny_llama(seed=0)
    train = TrainConfig(steps=3, batch_size=4, lr=2e-2, control_share=0.0, context_share=0.0)
    d, _ = train_projector(model, tok, grads(4), LABELS[:4], config(lora_rank=2), train, progress=False)
    save_checkpoint(d, tmp_path / "ckpt", model_name="tiny")
    fresh, fresh_tok = tiny_llama(seed=0)
    loaded = load_describer(tmp_path / "ckpt", fresh, fresh_tok)
    g = torch.as_tensor(grads(2))
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded.label_logprobs(loaded.projector(g), [None] * 2, LABELS[:2]),
            d.label_logprobs(d.projector(g), [None] * 2, LABELS[:2]),
            rtol=1e-5,
        )
    assert any("lora_" in name for name, _ in fresh.named_parameters())


def test_variant_configs_override_recorded_settings():
    meta = {"config": asdict(config()), "train": asdict(TrainConfig(steps=7))}
    cfg, tr = variant_configs(meta, {"mode": "raw", "seed": 3})
    assert cfg.mode == "raw" and tr.seed == 3 and tr.steps == 7 and cfg.k == config().k
    assert variant_configs(meta, {"init": "lens"})[0].init == "lens" and cfg.init == "random"
    old = {**meta, "config": {k: v for k, v in meta["config"].items() if k != "init"}}  # saved before `init` existed
    assert variant_configs(old)[0].init == "random"
    with pytest.raises(GradsenseError, match="unknown describer setting 'colour'"):
        variant_configs(meta, {"colour": "red"})
