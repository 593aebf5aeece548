"""gradsense.training on the tiny Llama: seeded training with a curve, the batch plan, raw-scale calibration; on
SmolLM2 (integration) a few steps lower the loss and the checkpoint answers `describe`."""

import numpy as np
import pytest
import torch

from gradsense.errors import GradsenseError
from gradsense.hooks import capture
from gradsense.prompt import encode_interpretations
from gradsense.training import (
    TrainConfig,
    batch_plan,
    calibrate_raw_scale,
    draw_contexts,
    planned_steps,
    train_projector,
    value_limit,
)

from describer_helpers import LABELS, D, config, describer, grads


def test_training_is_seeded_and_records_a_curve(tiny):
    model, tok = tiny
    train = TrainConfig(steps=4, batch_size=5, eval_every=2, control_share=0.4)
    runs = [
        train_projector(
            model,
            tok,
            grads(),
            LABELS,
            config(),
            train,
            ["ctx a.", "ctx b."],
            (grads(3, 1), LABELS[:3]),
            progress=False,
        )
        for _ in range(2)
    ]
    curve = runs[0][1]
    assert list(curve["step"]) == [1, 2, 3, 4] and np.isfinite(curve["loss"]).all()
    assert curve["val_loss"].notna().tolist() == [True, True, False, True]
    np.testing.assert_array_equal(curve["loss"], runs[1][1]["loss"])
    with pytest.raises(GradsenseError, match="labels"):
        train_projector(model, tok, grads(3), LABELS[:2], config(), train, progress=False)
    with pytest.raises(GradsenseError, match="control_share"):
        train_projector(model, tok, grads(3), LABELS[:3], config(), TrainConfig(control_share=2), progress=False)


def test_a_per_position_describer_trains_and_describes(tiny):
    """read "each": (N, k, d) gradients train the projector (every slot's block moves off the lens init, noise rows
    keep the shape, a rerun is identical), and the describer describes (N, k, d) gradients; (N, d) gradients are
    refused with the expected shape named."""
    model, tok = tiny
    cfg = config(read="each", k=3, init="lens")
    g = np.random.default_rng(0).standard_normal((12, 3, D)).astype(np.float32)
    train = TrainConfig(steps=3, batch_size=6, lr=0.05, control_share=0.34, context_share=0.0)
    (d, curve), (_, again) = [train_projector(model, tok, g, LABELS, cfg, train, progress=False) for _ in range(2)]
    np.testing.assert_array_equal(curve["loss"], again["loss"])
    moved = (d.projector.net.weight.detach().view(3, D, D) + torch.eye(D)).abs().amax(dim=(1, 2))
    assert (moved > 1e-3).all()
    described = d.describe_gradients(g[:4], control="noise", max_new_tokens=4)
    assert len(described) == 4 and described["description"].str.len().gt(0).all()
    with pytest.raises(GradsenseError, match=r"\(N, 3, d\) gradients"):
        train_projector(model, tok, grads(), LABELS, cfg, train, progress=False)


def test_batch_plan_sees_every_item_before_any_repeats():
    train = TrainConfig(steps=5, batch_size=4, control_share=0.25)  # 3 gradient rows + 1 control row per step
    plan = list(batch_plan(7, train, np.random.default_rng(0)))
    assert len(plan) == 5 and all(kinds.tolist() == [0, 0, 0, 1] for _, kinds in plan)
    drawn = [int(i) for idx, kinds in plan for i, kind in zip(idx, kinds) if kind == 0]
    assert sorted(drawn[:7]) == list(range(7)) and sorted(drawn[7:14]) == list(range(7))  # epoch by epoch
    two_controls = list(batch_plan(7, TrainConfig(steps=1, batch_size=4, control_share=0.5), np.random.default_rng(0)))
    assert two_controls[0][1].tolist() == [0, 0, 1, 2]  # noise, then no injection


def test_domain_repeats_draw_an_item_that_often_per_pass_at_the_same_budget():
    train = TrainConfig(steps=6, batch_size=4, control_share=0.25)
    repeats = np.array([3, 1, 1, 1, 1])  # item 0 three times in every pass of 7 draws
    drawn = [int(i) for idx, kinds in batch_plan(5, train, np.random.default_rng(0), repeats) for i in idx[kinds == 0]]
    assert len(drawn) == 18  # the steps are those of 5 items, not of the 7 draws
    assert sorted(drawn[:7]) == [0, 0, 0, 1, 2, 3, 4] and sorted(drawn[7:14]) == [0, 0, 0, 1, 2, 3, 4]
    plain = list(batch_plan(5, train, np.random.default_rng(0)))
    ones = list(batch_plan(5, train, np.random.default_rng(0), np.ones(5, int)))
    assert all((a == b).all() for (a, _), (b, _) in zip(plain, ones))  # no repeats: the same draws as before
    with pytest.raises(GradsenseError, match="domain_repeats"):
        TrainConfig(domain_repeats={"history": 0}).check()


def test_epochs_set_the_steps():
    train = TrainConfig(epochs=3, batch_size=4, control_share=0.25)  # 3 gradient rows per step
    assert planned_steps(7, train) == 7 and planned_steps(7, TrainConfig(steps=5)) == 5  # ⌈3·7/3⌉; steps otherwise
    assert len(list(batch_plan(7, train, np.random.default_rng(0)))) == 7
    with pytest.raises(GradsenseError, match="epochs"):
        TrainConfig(epochs=0).check()


def test_hard_negatives_are_read_only_by_their_own_rows():
    hard = [["h0"], [], ["h2a", "h2b"]] * 100
    rows = draw_contexts(["p"], 300, 1.0, np.random.default_rng(0), hard, 0.5)
    assert {r for r in rows[1::3]} == {"p"}  # no negatives: the pool
    assert set(rows[0::3]) == {"h0", "p"} and set(rows[2::3]) == {"h2a", "h2b", "p"}
    assert 0.35 < sum(r != "p" for r in rows) / 200 < 0.65


def test_value_limit_is_the_longest_trained_value(tiny):
    _, tok = tiny
    labels = ["domain: ab | from: c | to: 1789", "domain: x | from: y | to: z"]
    # Byte tokens: " 1789" is 5 tokens; the byte tokenizer says " " before each field name's "|".
    assert value_limit(tok, labels) == 5 + 1


def test_draw_contexts_gives_a_passage_to_a_share_of_rows():
    rows = draw_contexts(["p", "q"], 400, 0.25, np.random.default_rng(0))
    assert set(rows) == {None, "p", "q"} and 0.18 < sum(r is not None for r in rows) / 400 < 0.32
    assert draw_contexts([], 5, 1.0, np.random.default_rng(0)) == [None] * 5


def test_raw_scale_starts_the_injection_at_the_residual_norm(tiny):
    model, tok = tiny
    d = describer(model, tok, mode="raw")
    g = 7 * torch.as_tensor(grads(4))
    calibrate_raw_scale(d, g, [None] * 4)
    assert d.projector.grad_norm_ref == pytest.approx(float(g.norm(dim=-1).median()))
    batch, pos = encode_interpretations(tok, d.config, [None] * 4)
    store = {}
    with torch.no_grad(), capture(model, [d.config.inject_layer], store):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        resid = store[d.config.inject_layer][torch.arange(4)[:, None], pos].norm(dim=-1).median()
        injected = d.projector(g).norm(dim=-1).median()
    assert float(injected) == pytest.approx(float(resid), rel=1e-4)


@pytest.mark.integration
def test_smol_describer_trains_saves_and_describes(smol, tmp_path):
    """On SmolLM2: a few steps on real gradients lower the label loss; the checkpoint answers `describe`."""
    from gradsense.checkpoint import load_describer, save_checkpoint
    from gradsense.describer import DescriberConfig
    from gradsense.gradients import activation_gradients
    from gradsense.items import describe
    from gradsense.scoring import target_text

    model, tok = smol
    items = [
        {"id": "fr", "prompt": "The capital of France is", "right": "Paris"},
        {"id": "hastings", "prompt": "The Battle of Hastings took place in the year", "right": "1066"},
        {"id": "insulin", "prompt": "Insulin is produced by the", "right": "pancreas"},
        {"id": "violin", "prompt": "The violin has four", "right": "strings"},
    ]
    labels = [
        "domain: geography | from: <none> | to: Paris\nThe update pushes this geography answer towards Paris.",
        "domain: history | from: <none> | to: 1\nThe update pushes this history answer towards 1.",
        "domain: biology | from: <none> | to: pancreas\nThe update pushes this biology answer towards pancreas.",
        "domain: music | from: <none> | to: strings\nThe update pushes this music answer towards strings.",
    ]
    g = activation_gradients(
        model, tok, [it["prompt"] for it in items], [target_text(it["right"]) for it in items], [15], progress=False
    ).grads[0]
    cfg = DescriberConfig(source_layer=15, inject_layer=20, k=4)
    train = TrainConfig(steps=6, batch_size=4, lr=4e-3, control_share=0.0, context_share=0.0, max_label_tokens=16)
    d, curve = train_projector(model, tok, g, labels, cfg, train, progress=False)
    assert curve["loss"].iloc[-2:].mean() < curve["loss"].iloc[:2].mean()
    save_checkpoint(d, tmp_path / "ckpt", model_name=None)
    loaded = load_describer(tmp_path / "ckpt", model, tok)
    out = describe(items[:2], describer=loaded, max_new_tokens=8)
    assert [r["id"] for r in out] == ["fr", "hastings"] and all(
        set(r) == {"id", "description", "domain", "from", "to"} for r in out
    )
    assert all(r["domain"] and r["from"] and r["to"] for r in out), out  # structured decoding: every field parsed
