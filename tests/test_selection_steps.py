"""The number of training steps is chosen on validation: `train_projector` returns the trainable parameters
(projector, LoRA) of the evaluation with the lowest val_loss, or the last step's with `select_on_val` off."""

import math

import numpy as np
import pytest
import torch

from gradsense import training
from gradsense.describer import lora_state
from gradsense.training import TrainConfig, train_projector, validation_loss

from describer_helpers import LABELS, config, grads, talkative_llama

VAL = (grads(3, 1), LABELS[6:9])
STEPS = 8


def settings(**kw) -> TrainConfig:
    """Raw mode at this lr overfits the tiny model within a few steps: the val_loss turns up before the end (the
    tests check that an earlier step wins, so they notice when it stops doing so)."""
    return TrainConfig(
        **{"steps": STEPS, "batch_size": 4, "lr": 0.05, "control_share": 0.25, "context_share": 0.0, **kw}
    )


def state(describer) -> dict[str, torch.Tensor]:
    """Every tensor training can change: the projector's and the LoRA adapters'."""
    tensors = {f"projector.{n}": t.detach().cpu().clone() for n, t in describer.projector.state_dict().items()}
    return tensors | lora_state(describer.model)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def train_spied(monkeypatch, train: TrainConfig, val=VAL, lora_rank: int = 0):
    """Train on a fresh model, recording the parameters at every evaluation (in curve order)."""
    seen: list[dict[str, torch.Tensor]] = []

    def spy(describer, *args, **kw):
        seen.append(state(describer))
        return validation_loss(describer, *args, **kw)

    monkeypatch.setattr(training, "validation_loss", spy)
    model, tok = talkative_llama()
    cfg = config(mode="raw", lora_rank=lora_rank)
    d, curve = train_projector(model, tok, grads(6), LABELS[:6], cfg, train, val=val, progress=False)
    return d, curve, seen


@pytest.mark.parametrize(("lora_rank", "lr"), [(0, 0.05), (2, 0.3)])
def test_returned_describer_is_the_best_validation_step(monkeypatch, lora_rank, lr):
    d, curve, seen = train_spied(monkeypatch, settings(eval_every=3, lr=lr), lora_rank=lora_rank)
    evals = curve.dropna(subset=["val_loss"]).reset_index(drop=True)
    assert evals["step"].tolist() == [1, 3, 6, 8] and len(seen) == len(evals)
    best = int(evals["val_loss"].idxmin())
    selection = d.meta["selection"]
    assert selection["selected_step"] == evals["step"][best] < STEPS  # an earlier step won: restoring matters
    assert selection["selected_val_loss"] == pytest.approx(evals["val_loss"].min())
    assert_same(state(d), seen[best])  # the snapshot at the best evaluation, LoRA included
    if lora_rank:
        assert any("lora_" in name for name in seen[best])
    monkeypatch.undo()
    again = validation_loss(d, *VAL)
    assert again == pytest.approx(evals["val_loss"].min(), rel=1e-6)
    assert again != pytest.approx(evals["val_loss"].iloc[-1], rel=1e-6)
    assert d.meta["train"]["select_on_val"] is True


def test_without_selection_the_last_step_is_returned(monkeypatch):
    on, curve_on, _ = train_spied(monkeypatch, settings(eval_every=1))
    off, curve_off, seen = train_spied(monkeypatch, settings(eval_every=1, select_on_val=False))
    # Selection changes what is returned, never the run itself.
    np.testing.assert_array_equal(curve_on["loss"], curve_off["loss"])
    np.testing.assert_array_equal(curve_on["val_loss"], curve_off["val_loss"])
    assert off.meta["selection"] == {"selected_step": STEPS, "selected_val_loss": curve_off["val_loss"].iloc[-1]}
    assert on.meta["selection"]["selected_step"] < STEPS
    assert_same(state(off), seen[-1])
    monkeypatch.undo()
    assert validation_loss(off, *VAL) == pytest.approx(curve_off["val_loss"].iloc[-1], rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(state(on).values(), state(off).values()))


def test_without_validation_nothing_changes(monkeypatch):
    plain, curve, seen = train_spied(monkeypatch, settings(), val=None)
    off, _, _ = train_spied(monkeypatch, settings(select_on_val=False))
    assert not seen and curve["val_loss"].map(math.isnan).all()
    assert "selection" not in plain.meta
    assert_same(state(plain), state(off))  # the last step, as before selection existed
