"""gradsense.describer on the tiny Llama: injection at the slots, the projector, the loss, LoRA, the controls."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import gradsense.describer as describer_module
from gradsense import controls as ct
from gradsense import decoupling as dc
from gradsense import main_table as mt
from gradsense.describer import (
    Describer,
    Projector,
    adapters_off,
    noise_like,
    prefix_columns,
    shuffle_order,
    untrained_describer,
)
from gradsense.errors import GradsenseError
from gradsense.hooks import capture, inject
from gradsense.prompt import encode_interpretations
from gradsense.training import TrainConfig, train_projector

from describer_helpers import LABELS, D, config, describer, grads, talkative_llama
from tiny_model import tiny_llama


def _hidden(model, batch, at, injection=None):
    """Output of block `at`, with an injection hook registered first (hooks run in registration order)."""
    store = {}
    with inject(model, **injection) if injection else torch.no_grad(), capture(model, [at], store), torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return store[at]


@pytest.mark.parametrize("mode", ["norm", "raw"])
def test_injection_adds_at_the_slots_only(tiny, mode):
    model, tok = tiny
    d = describer(model, tok, mode=mode)
    batch, pos = encode_interpretations(tok, d.config, [None, "ctx"])
    vectors = torch.randn(2, 2, D)
    vectors[1] = 0  # a row without injection
    before = _hidden(model, batch, 1)
    spec = {"layer": 1, "positions": pos, "vectors": vectors, "norm_match": d.norm_match}
    after = _hidden(model, batch, 1, spec)
    delta = after - before
    rows = torch.arange(2)[:, None]
    expected = before[rows, pos].norm(dim=-1) if mode == "norm" else vectors.norm(dim=-1)
    torch.testing.assert_close(delta[rows, pos].norm(dim=-1)[0], expected[0], rtol=1e-4, atol=1e-5)
    assert delta[1].abs().max() == 0
    delta[rows, pos] = 0
    assert delta.abs().max() == 0  # nothing else moved at the injection layer
    torch.testing.assert_close(_hidden(model, batch, 0), _hidden(model, batch, 0, spec))


def test_the_describer_injects_at_its_layer_in_its_mode():
    """The label log-probs see the injection: norm mode ignores the vectors' scale, raw mode does not, and no vectors
    is the same as zero vectors."""
    model, tok = talkative_llama()
    g = torch.as_tensor(grads(2))
    for mode in ("norm", "raw"):
        d = describer(model, tok, mode=mode)
        with torch.no_grad():
            v = d.projector(g)
            small, big, none = (d.label_logprobs(x, [None] * 2, LABELS[:2]) for x in (v, 50 * v, None))
            zero = d.label_logprobs(torch.zeros_like(v), [None] * 2, LABELS[:2])
        np.testing.assert_allclose(none, zero, rtol=1e-6)
        assert np.abs(small - none).min() > 1e-5  # far above float error (~1e-7)
        assert (np.abs(small - big).max() < 1e-5) == (mode == "norm"), (mode, small, big)


@pytest.mark.parametrize("mode", ["norm", "raw"])
def test_a_lens_projector_starts_as_minus_the_gradient_in_every_slot(mode):
    """init "lens": every slot is −g (norm mode: −g/‖g‖; raw mode: −g / the reference norm × the scale), and the
    untrained control of a lens describer starts there too; the random init is far from it."""
    g = torch.randn(3, D)
    lens = Projector(D, 3, "linear", mode, init="lens")
    lens.grad_norm_ref.fill_(2.0)
    unit = g / g.norm(dim=-1, keepdim=True) if mode == "norm" else g / 2.0
    with torch.no_grad():
        torch.testing.assert_close(lens(g), -unit[:, None, :].expand(3, 3, D))
        assert (Projector(D, 3, "linear", mode)(g) + unit[:, None, :]).abs().max() > 0.1
    model, tok = tiny_llama()
    control = untrained_describer(describer(model, tok, init="lens", mode=mode), seed=1)
    with torch.no_grad():
        out = control.projector(g)
    reference = control.projector.grad_norm_ref if mode == "raw" else g.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, -(g / reference)[:, None, :].expand(3, 2, D))


@pytest.mark.parametrize("mode", ["norm", "raw"])
def test_a_per_position_projector_reads_position_j_into_slot_j_alone(mode):
    """(B, k, d) gradients (read "each"): slot j is block j of the same linear map applied to position j only, so
    the lens init starts slot j at −g_j and changing one position moves only its slot."""
    g = torch.randn(3, 4, D)
    lens = Projector(D, 4, "linear", mode, init="lens")
    lens.grad_norm_ref.fill_(2.0)
    unit = g / g.norm(dim=-1, keepdim=True) if mode == "norm" else g / 2.0
    with torch.no_grad():
        torch.testing.assert_close(lens(g), -unit)
        trained = Projector(D, 4, "linear", mode)
        trained.log_scale.fill_(0.3)
        out = trained(g)
        for j in range(4):
            torch.testing.assert_close(out[:, j], trained(g[:, j])[:, j])
        moved = g.clone()
        moved[:, 2] = torch.randn(3, D)
        changed = (trained(moved) - out).abs().amax(dim=(0, 2))
        assert changed[2] > 0.01 and changed[[0, 1, 3]].max() == 0
    with pytest.raises(GradsenseError, match="k = 4"):
        lens(torch.randn(3, 2, D))
    with pytest.raises(GradsenseError, match="k = 4"):
        Projector(D, 4, "mlp", mode, 16)(g)
    model, _ = tiny_llama()
    with pytest.raises(GradsenseError, match="train.read must be one of"):
        config(read="first").check(model)
    with pytest.raises(GradsenseError, match="train.read 'each' needs train.kind 'linear'"):
        config(read="each", kind="mlp").check(model)


def test_projector_kinds_modes_and_errors():
    g = torch.randn(3, D)
    for kind in ("linear", "mlp"):
        assert Projector(D, 4, kind, "norm", 16)(g).shape == (3, 4, D)
    raw = Projector(D, 2, "linear", "raw")
    torch.testing.assert_close(raw(2 * g), 2 * raw(g))  # raw mode keeps the gradient's magnitude
    norm = Projector(D, 2, "linear", "norm")
    torch.testing.assert_close(norm(5 * g), norm(g))  # norm mode reads only the direction
    with pytest.raises(GradsenseError, match="kind"):
        Projector(D, 2, "conv")
    with pytest.raises(GradsenseError, match="width"):
        norm(torch.randn(2, D + 1))
    with pytest.raises(GradsenseError, match="init 'lens' needs kind 'linear'"):
        Projector(D, 2, "mlp", init="lens")
    with pytest.raises(GradsenseError, match="init must be one of"):
        Projector(D, 2, init="zeros")
    model, _ = tiny_llama()
    with pytest.raises(GradsenseError, match="out of range"):
        config(inject_layer=9).check(model)
    with pytest.raises(GradsenseError, match="train.init must be one of"):
        config(init="zeros").check(model)
    with pytest.raises(GradsenseError, match="train.init 'lens' needs train.kind 'linear'"):
        config(init="lens", kind="mlp").check(model)
    with pytest.raises(GradsenseError, match="mode"):
        config(mode="big").check(model)


@pytest.mark.parametrize("mode", ["norm", "raw"])
def test_one_step_lowers_the_loss_through_the_injection(tiny, mode):
    model, tok = tiny
    d = describer(model, tok, mode=mode)
    g = torch.as_tensor(grads(4))
    opt = torch.optim.SGD(d.projector.parameters(), lr=10.0)  # the random tiny model barely reacts
    before = d.loss(d.projector(g), [None] * 4, LABELS[:4])
    before.backward()
    assert d.projector.net.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert d.loss(d.projector(g), [None] * 4, LABELS[:4]) < before


def test_the_cached_prefix_gives_the_loss_and_gradient_of_one_full_pass(monkeypatch):
    """Training runs the columns before the first slot without autograd (a KV cache): the same loss and projector
    gradient as one pass over every column, for rows with and without a passage and labels of different lengths."""
    model, tok = talkative_llama()
    d = describer(model, tok)
    g = torch.as_tensor(grads(4))
    contexts = [None, "a short passage", "a much longer passage about rivers, mountains and old kings", None]

    def loss_and_grad():
        d.projector.zero_grad(set_to_none=True)
        loss = d.loss(d.projector(g), contexts, LABELS[:4])
        loss.backward()
        return loss.detach(), d.projector.net.weight.grad.clone()

    _, positions = encode_interpretations(tok, d.config, contexts, LABELS[:4])
    assert prefix_columns(model, positions, d.projector(g)) == int(positions.min()) > 0
    cached = loss_and_grad()
    monkeypatch.setattr(describer_module, "prefix_columns", lambda *args: 0)
    full = loss_and_grad()
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-4, atol=1e-6)
    assert full[1].abs().sum() > 0


def test_no_cached_prefix_without_gradients_or_with_trained_weights(tiny):
    model, tok = tiny
    d = describer(model, tok)
    _, positions = encode_interpretations(tok, d.config, [None, "ctx"])
    vectors = d.projector(torch.as_tensor(grads(2)))
    with torch.no_grad():
        assert prefix_columns(model, positions, d.projector(torch.as_tensor(grads(2)))) == 0
    assert prefix_columns(model, positions, None) == 0
    weight = next(model.parameters())
    weight.requires_grad_(True)  # a trained model weight (LoRA) changes the prefix's keys and values
    try:
        assert prefix_columns(model, positions, vectors) == 0
    finally:
        weight.requires_grad_(False)


def test_lora_trains_only_blocks_from_the_injection_and_switches_off():
    model, tok = tiny_llama(seed=0)
    base = describer(model, tok)
    batch, _ = encode_interpretations(tok, base.config, [None])
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids).logits
    train = TrainConfig(steps=12, batch_size=4, lr=2e-2, control_share=0.0, context_share=0.0)
    d, curve = train_projector(model, tok, grads(4), LABELS[:4], config(lora_rank=2), train, progress=False)
    assert curve["loss"].iloc[-3:].mean() < curve["loss"].iloc[:3].mean()
    adapted = {name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_" in name}
    assert adapted == {str(d.config.inject_layer + i) for i in range(4 - d.config.inject_layer)}  # blocks J… only
    with torch.no_grad():
        with adapters_off(model):
            torch.testing.assert_close(model(input_ids=batch.input_ids).logits, reference)
        assert not torch.allclose(model(input_ids=batch.input_ids).logits, reference)
        with d.original_model():  # where a LoRA describer's new gradients are taken: the original model
            torch.testing.assert_close(model(input_ids=batch.input_ids).logits, reference)
        assert not torch.allclose(model(input_ids=batch.input_ids).logits, reference)  # adapters back on after it


def test_references_read_the_original_model_of_a_lora_describer():
    from test_evaluate import PASSAGES, items

    model, tok = tiny_llama(seed=0)
    train = TrainConfig(steps=12, batch_size=4, lr=2e-2, control_share=0.0, context_share=0.0)
    d, _ = train_projector(model, tok, grads(4), LABELS[:4], config(lora_rank=2), train, progress=False)
    table = items(2)
    plan = dc.decoupling_plan(table, PASSAGES[PASSAGES["domain"] != "music"], per_pair=1, seed=0)
    args, options = (grads(len(table)), table, table, plan), {"batch_size": 4, "max_new_tokens": 0}
    base, _ = tiny_llama(seed=0)  # the same weights, never adapted
    plain = Describer(base, tok, d.projector, replace(d.config, lora_rank=0), d.meta)
    expected = mt.core_evaluation(plain, *args, **options)
    reference = ct.reference_evaluation(d, *args, **options)
    adapted = mt.core_evaluation(d, *args, **options)
    for want, got, trained in zip(expected, reference, adapted):
        assert got["description"].tolist() == want["description"].tolist()
        assert trained["description"].tolist() != want["description"].tolist()  # the adapters do change the reading


def test_controls(tiny):
    model, tok = tiny
    d = describer(model, tok)
    none = d.describe_gradients(grads(3), control="none", max_new_tokens=4)
    assert none["description"].nunique() == 1  # without injection every row is the same prompt
    shuffled = d.describe_gradients(grads(5), control="shuffle", seed=3, max_new_tokens=2)
    assert sorted(shuffled["source_row"]) == list(range(5)) and (shuffled["source_row"] != np.arange(5)).all()
    with pytest.raises(GradsenseError, match="unknown control"):
        d.vectors(torch.as_tensor(grads(2)), "loud")
    g = grads(4)
    np.testing.assert_allclose(
        np.linalg.norm(noise_like(g, np.random.default_rng(0)), axis=1), np.linalg.norm(g, axis=1), rtol=1e-5
    )
    order = shuffle_order(7, np.random.default_rng(0))
    assert sorted(order) == list(range(7)) and (order != np.arange(7)).all()


def test_untrained_describer_is_a_fresh_seeded_projector_on_the_same_model(tiny):
    model, tok = tiny
    d = describer(model, tok)
    fresh = untrained_describer(d, seed=1)
    assert fresh.model is d.model and fresh.config == d.config
    assert not torch.equal(fresh.projector.net.weight, d.projector.net.weight)
    assert torch.equal(fresh.projector.net.weight, untrained_describer(d, seed=1).projector.net.weight)
    d.meta["trained_domains"] = ["biology", "history"]  # its leakage counts the same passages as the trained one's
    assert untrained_describer(d).meta["trained_domains"] == ["biology", "history"]


def test_domain_logprobs_are_the_decoders_next_token_log_probabilities():
    from gradsense.forced_choice import domain_logprobs
    from gradsense.prompt import FIELD_LEADS, lead_split

    model, tok = talkative_llama()
    d = describer(model, tok)
    g = grads(3)
    domains = ["history", "biology", "sport"]
    batched = domain_logprobs(d, g, domains, batch_size=4)
    # Independently: say "domain:" and then the name one token at a time, reading the next-token distribution.
    lead = tok(FIELD_LEADS[0], add_special_tokens=False)["input_ids"]
    ends, stop = lead_split(tok, FIELD_LEADS[1])
    for i in range(3):
        vectors = d.projector(torch.as_tensor(g[i : i + 1]))
        for j, name in enumerate(domains):
            cont = tok(" " + name, add_special_tokens=False)["input_ids"] + ends[: stop + 1]
            total = 0.0
            for k, token in enumerate(cont):
                batch, pos = encode_interpretations(tok, d.config, [None], prefixes=[lead + cont[:k]])
                with torch.no_grad(), inject(model, d.config.inject_layer, pos, vectors, True):
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0, -1]
                total += float(torch.log_softmax(logits.float(), -1)[token])
            assert batched[i, j] == pytest.approx(total, abs=1e-3)


def test_domain_choice_by_hand():
    from gradsense.forced_choice import domain_choice

    scores = np.array([[-1.0, -2.0, -3.0], [-5.0, -1.0, -1.0], [-9.0, -8.0, -0.5]])
    truth = ["history", "biology", "religion"]  # a tie counts against the item
    assert domain_choice(scores, truth, ["history", "biology", "religion"]).tolist() == [True, False, True]
    with pytest.raises(GradsenseError, match="not among the candidate"):
        domain_choice(scores, ["chess"] * 3, ["history", "biology", "religion"])


def test_closed_domains_never_say_none_beside_a_to_value():
    from gradsense.forced_choice import closed_domains

    domains = ["history", "biology", "none"]
    scores = np.array([[-3.0, -2.0, -0.1], [-3.0, -2.0, -0.1], [-0.5, -2.0, -1.0], [-4.0, -1.0, -0.2]])
    # rows 0 and 3 say no value ("<none>", missing); row 1 names a year; row 2's best domain is history anyway
    said_to = ["<none>", "1789", "Paris", None]
    assert closed_domains(scores, domains, said_to).tolist() == ["none", "biology", "history", "none"]
    assert closed_domains(scores, domains, [None] * 4).tolist() == ["none", "none", "history", "none"]
    assert closed_domains(scores[:, :2], domains[:2], said_to).tolist() == ["biology", "biology", "history", "biology"]
    with pytest.raises(GradsenseError, match="closed domains: scores of shape"):
        closed_domains(scores, domains, said_to[:3])
