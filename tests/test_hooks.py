"""gradsense.hooks: edits, captures and injections at block outputs, never leaking."""

import pytest
import torch

from gradsense.hooks import capture, edit_block_output, inject
from gradsense.models import blocks


def _our_hooks(model):
    return [f for block in blocks(model) for f in block._forward_hooks.values() if f.__module__ == "gradsense.hooks"]


@pytest.fixture
def no_leak(tiny):
    """Fails the test if any hook registered by gradsense.hooks is left on a block."""
    yield
    assert _our_hooks(tiny[0]) == []


def test_capture_matches_hidden_states_convention(tiny, no_leak):
    model, _ = tiny
    ids = torch.tensor([[3, 4, 5, 6]])
    store = {}
    with capture(model, [0, 2], store):
        out = model(ids, output_hidden_states=True)
    for layer in (0, 2):  # output of block ℓ is hidden_states[ℓ + 1]
        assert torch.allclose(store[layer], out.hidden_states[layer + 1])


def test_edit_changes_output_and_is_removed_after_error(tiny, no_leak):
    model, _ = tiny
    ids = torch.tensor([[3, 4, 5]])
    base = model(ids).logits
    try:
        with edit_block_output(model, 1, lambda h: h * 0):
            assert _our_hooks(model) and not torch.allclose(model(ids).logits, base)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.allclose(model(ids).logits, base)


def test_inject_adds_only_at_positions(tiny, no_leak):
    model, _ = tiny
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    d = model.config.hidden_size
    vectors = torch.randn(2, 1, d)
    positions = torch.tensor([[1], [2]])
    clean, injected = {}, {}
    with capture(model, [1], clean):
        model(ids)
    with inject(model, 1, positions, vectors), capture(model, [1], injected):
        model(ids)
    diff = injected[1] - clean[1]
    assert torch.allclose(diff[0, 1], vectors[0, 0], atol=1e-6) and torch.allclose(diff[1, 2], vectors[1, 0], atol=1e-6)
    diff[0, 1] = 0
    diff[1, 2] = 0
    assert diff.abs().max() < 1e-6


def test_inject_norm_match_scales_to_the_residual(tiny, no_leak):
    model, _ = tiny
    ids = torch.tensor([[3, 4, 5, 6]])
    vectors = torch.stack([torch.randn(model.config.hidden_size) * 100, torch.zeros(model.config.hidden_size)])[None]
    positions = torch.tensor([[1, 2]])
    clean, injected = {}, {}
    with capture(model, [2], clean):
        model(ids)
    with inject(model, 2, positions, vectors, norm_match=True), capture(model, [2], injected):
        model(ids)
    delta = injected[2] - clean[2]
    assert torch.allclose(delta[0, 1].norm(), clean[2][0, 1].norm(), rtol=1e-4)  # direction kept, norm of residual
    assert torch.allclose(delta[0, 1] / delta[0, 1].norm(), vectors[0, 0] / vectors[0, 0].norm(), atol=1e-5)
    assert delta[0, 2].abs().max() == 0  # a zero vector stays zero


def test_inject_nothing_registers_no_hook(tiny, no_leak):
    model, _ = tiny
    ids = torch.tensor([[3, 4, 5, 6]])
    base = model(ids).logits
    with inject(model, 1, torch.tensor([[1]]), None, norm_match=True):
        assert _our_hooks(model) == []
        assert torch.equal(model(ids).logits, base)


def test_inject_adds_once_during_cached_generation(tiny, no_leak):
    """With a KV cache the injected positions are computed once: decode steps see them in the cache, unchanged."""
    model, _ = tiny
    ids = torch.tensor([[3, 4, 5, 6]])
    vectors = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 50
    positions = torch.tensor([[1]])
    options = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with inject(model, 1, positions, vectors):
        cached = model.generate(ids, use_cache=True, **options)
        uncached = model.generate(ids, use_cache=False, **options)
    plain = model.generate(ids, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-4)
    # The injection moved every step's next-token scores (not only the first): it stays in the cache.
    moved = (torch.stack(cached.scores) - torch.stack(plain.scores)).abs().amax(dim=(1, 2))
    assert (moved > 1e-3).all()
