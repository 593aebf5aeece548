"""Activation gradients are the exact per-item gradients: batched = loop, = finite differences, at the right site."""

import numpy as np
import pandas as pd
import pytest
import torch

from gradsense.errors import GradsenseError
from gradsense.gradients import (
    activation_gradients,
    correction_gradients,
    resolve_layer,
    resolve_layers,
    slot_gradients,
    target_loss,
)
from gradsense.hooks import edit_block_output
from gradsense.scoring import encode, forward, target_nll, target_text
from gradsense.steering import final_token_activations, steering_vectors

from tiny_model import tiny_llama

# Prompts of different lengths and multi-token targets (the byte tokenizer splits every answer into many tokens).
PROMPTS = ["The capital of France is", "Hi", "The Battle of Hastings took place in", "Cells store energy as", "Zz"]
TARGETS = [target_text(a) for a in ("Paris", "1066", "the year 1066", "ATP", "q")]
IDS = ["a", "b", "c", "d", "e"]


def _cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


def _assert_same(batched: np.ndarray, loop: np.ndarray) -> None:
    assert _cosine(batched, loop).min() >= 0.9999
    rel = np.linalg.norm(batched - loop, axis=-1) / np.linalg.norm(loop, axis=-1)
    assert rel.max() <= 1e-4, rel.max()


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64, for finite differences."""
    model, tokenizer = tiny_llama(seed=0)
    return model.double(), tokenizer


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("position", ["last", "target"])
def test_batched_equals_per_example_loop(tiny, padding_side, position):
    model, tokenizer = tiny
    kw = dict(layers=[1, 3], position=position, ids=IDS, padding_side=padding_side, progress=False)
    batched = activation_gradients(model, tokenizer, PROMPTS, TARGETS, batch_size=8, **kw)
    loop = activation_gradients(model, tokenizer, PROMPTS, TARGETS, batch_size=1, **kw)
    assert batched.grads.shape == (2, len(PROMPTS), model.config.hidden_size) and batched.grads.dtype == np.float32
    assert (np.linalg.norm(batched.grads, axis=-1) > 0).all()
    _assert_same(batched.grads, loop.grads)
    _assert_same(batched.acts, loop.acts)
    np.testing.assert_allclose(batched.loss, loop.loss, rtol=1e-5)
    assert batched.index["id"].tolist() == IDS and (batched.n_target_tokens > 1).any()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_each_position_holds_every_target_position_and_repeats_the_last(tiny, padding_side):
    """position="each": slot j is the gradient at the position predicting target token j (the first slot is the
    "last" gradient, the slots over the target's tokens sum to the "target" gradient), the last one repeated after
    the target ends; batched = loop."""
    model, tokenizer = tiny
    kw = dict(layers=[1, 3], ids=IDS, padding_side=padding_side, progress=False)
    slots = 6
    each = activation_gradients(model, tokenizer, PROMPTS, TARGETS, position="each", slots=slots, **kw)
    loop = activation_gradients(model, tokenizer, PROMPTS, TARGETS, position="each", slots=slots, batch_size=1, **kw)
    last = activation_gradients(model, tokenizer, PROMPTS, TARGETS, position="last", **kw)
    summed = activation_gradients(model, tokenizer, PROMPTS, TARGETS, position="target", **kw)
    assert each.grads.shape == (2, len(PROMPTS), slots, model.config.hidden_size)
    _assert_same(each.grads, loop.grads)
    _assert_same(each.grads[:, :, 0], last.grads)
    n = each.n_target_tokens
    assert (n < slots).any() and (n > 1).any()
    for row, count in enumerate(n):
        used = min(int(count), slots)
        if count <= slots:
            _assert_same(each.grads[:, row, :used].sum(1), summed.grads[:, row])
        np.testing.assert_array_equal(
            each.grads[:, row, used:], np.repeat(each.grads[:, row, used - 1 : used], slots - used, 1)
        )
        assert (np.linalg.norm(each.grads[:, row, :used], axis=-1) > 0).all()
    with pytest.raises(GradsenseError, match="slots"):
        activation_gradients(model, tokenizer, PROMPTS, TARGETS, position="each", slots=0, **kw)


def test_slot_gradients_put_the_last_prompt_position_of_one_block_beside_the_target_positions_of_another(tiny):
    """slot_gradients: the first `last_slots` slots hold the source block's last-position gradient, the rest the
    other block's target positions 2 … slots, as two separate extractions give them."""
    model, tokenizer = tiny
    table = pd.DataFrame({"id": IDS, "prompt": PROMPTS, "target": ["Paris", "1066", "the year 1066", "ATP", "q"]})
    got = slot_gradients(model, tokenizer, table, source=1, digits=3, last_slots=2, slots=4, progress=False)
    kw = dict(position="each", slots=4, progress=False)
    at_1 = correction_gradients(model, tokenizer, table, [1], **kw).grads[0]
    at_3 = correction_gradients(model, tokenizer, table, [3], **kw).grads[0]
    assert got.shape == (len(IDS), 2 + 3, model.config.hidden_size)
    _assert_same(got[:, :2], np.repeat(at_1[:, :1], 2, axis=1))
    _assert_same(got[:, 2:], at_3[:, 1:])
    same = slot_gradients(model, tokenizer, table, source=1, last_slots=2, slots=4, progress=False)
    _assert_same(same[:, 2:], at_1[:, 1:])
    with pytest.raises(GradsenseError, match="slots"):
        slot_gradients(model, tokenizer, table, source=1, slots=1, progress=False)


def test_loss_is_teacher_forced_target_nll(tiny):
    model, tokenizer = tiny
    result = activation_gradients(model, tokenizer, PROMPTS, TARGETS, [2], progress=False)
    batch = encode(tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        expected = target_nll(forward(model, batch).logits, batch.labels).numpy()
    np.testing.assert_allclose(result.loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(result.n_target_tokens, (batch.labels != -100).sum(1).numpy())


@pytest.mark.parametrize("position", ["last", "target"])
@pytest.mark.parametrize("layer", [0, 2])
def test_finite_differences(tiny64, position, layer):
    """(L(h + εu) − L(h − εu)) / 2ε at the site equals g·u for random unit directions u."""
    model, tokenizer = tiny64
    result = activation_gradients(model, tokenizer, PROMPTS, TARGETS, [layer], position=position, progress=False)
    batch = encode(tokenizer, PROMPTS, TARGETS)
    sites = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
    if position == "last":
        sites[torch.arange(len(PROMPTS)), batch.last_prompt] = 1.0
    else:
        sites[batch.target_positions] = 1.0
    rng = np.random.default_rng(0)
    eps = 1e-4
    for _ in range(3):
        u = torch.from_numpy(rng.standard_normal((len(PROMPTS), model.config.hidden_size)))
        u = u / u.norm(dim=-1, keepdim=True)

        def loss_at(step: float) -> np.ndarray:
            with edit_block_output(model, layer, lambda h: h + step * sites[..., None] * u[:, None, :]):
                with torch.no_grad():  # scoring.target_nll rounds to float32; target_loss keeps float64
                    return target_loss(model, batch).numpy()

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        analytic = (result.grads[0].astype(np.float64) * u.numpy()).sum(-1)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-2, atol=1e-6 * np.abs(numeric).max())


def test_layer_is_block_output_hidden_states_plus_one(tiny):
    model, tokenizer = tiny
    layers = list(range(model.config.num_hidden_layers))
    result = activation_gradients(model, tokenizer, PROMPTS, TARGETS, layers, progress=False)
    batch = encode(tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        hidden = forward(model, batch, output_hidden_states=True).hidden_states
    rows = torch.arange(len(PROMPTS))
    for i, layer in enumerate(layers[:-1]):
        np.testing.assert_allclose(result.acts[i], hidden[layer + 1][rows, batch.last_prompt].numpy(), atol=1e-5)
    # HF's last hidden state is after the final norm; ours is the raw output of the last block.
    normed = model.model.norm(torch.from_numpy(result.acts[-1]))
    np.testing.assert_allclose(normed.detach().numpy(), hidden[-1][rows, batch.last_prompt].numpy(), atol=1e-4)


def test_multi_layer_pass_equals_single_layer_calls(tiny):
    model, tokenizer = tiny
    together = activation_gradients(model, tokenizer, PROMPTS, TARGETS, [3, 0, 2], progress=False)
    assert together.layers == [3, 0, 2]
    for layer in (3, 0, 2):
        alone = activation_gradients(model, tokenizer, PROMPTS, TARGETS, [layer], progress=False)
        _assert_same(together.grads[together.at(layer)], alone.grads[0])
        np.testing.assert_allclose(together.acts[together.at(layer)], alone.acts[0], atol=1e-6)


def test_units_are_down_proj_inputs(tiny):
    """The MLP unit gradient is W_downᵀ g (exact for a residual block) and adding units leaves g unchanged."""
    model, tokenizer = tiny
    plain = activation_gradients(model, tokenizer, PROMPTS, TARGETS, [1, 2], progress=False)
    units = activation_gradients(model, tokenizer, PROMPTS, TARGETS, [1, 2], units=True, progress=False)
    np.testing.assert_allclose(units.grads, plain.grads, atol=1e-7)
    for i, layer in enumerate((1, 2)):
        down = model.model.layers[layer].mlp.down_proj.weight.detach().numpy()
        np.testing.assert_allclose(units.unit_grads[i], plain.grads[i] @ down, atol=1e-6)
    d_mlp = model.config.intermediate_size
    assert units.unit_acts.shape == units.unit_input_grad_sq.shape == (2, len(PROMPTS), d_mlp)
    assert (units.unit_input_grad_sq >= 0).all() and units.unit_input_grad_sq.sum() > 0


def test_steering_vector_is_difference_of_last_token_states(tiny):
    model, tokenizer = tiny
    rights, wrongs = [target_text("Paris"), target_text("1066")], [target_text("Rome"), target_text("1492 or so")]
    prompts = PROMPTS[:2]
    steer = steering_vectors(model, tokenizer, prompts, rights, wrongs, [1, 3], progress=False)
    for i, prompt in enumerate(prompts):
        states = []
        for answer in (rights[i], wrongs[i]):
            batch = encode(tokenizer, [prompt], [answer])
            with torch.no_grad():
                states.append(forward(model, batch, output_hidden_states=True).hidden_states[2][0, -1].numpy())
        np.testing.assert_allclose(steer[0, i], states[0] - states[1], atol=1e-5)
    acts = final_token_activations(model, tokenizer, prompts, rights, [1], progress=False)
    assert acts.shape == (1, 2, model.config.hidden_size)


def test_resolve_layers():
    model, _ = tiny_llama(seed=0, n_layers=30, d_model=32)
    assert resolve_layers(model, [0.25, 0.5, 0.75]) == [7, 15, 22]
    assert resolve_layers(model, [3, -1]) == [3, 29]
    for bad in ([], [30], [1.5], [0.5, 15], ["x"]):
        with pytest.raises(GradsenseError):
            resolve_layers(model, bad)
    # one layer (the train stage's source and injection blocks): the same fraction lands at the same depth of any model
    shallow, _ = tiny_llama(seed=0, n_layers=24, d_model=32)
    assert [resolve_layer(m, 0.5) for m in (model, shallow)] == [15, 12] and resolve_layer(model, 22) == 22
    assert resolve_layer(model, None) is None


def test_bad_input_raises_one_clear_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(GradsenseError, match="item b: empty prompt"):
        activation_gradients(model, tokenizer, ["ok", " "], [" x", " y"], [1], ids=["a", "b"], progress=False)
    with pytest.raises(GradsenseError, match="item a: target '' tokenizes to nothing"):
        activation_gradients(model, tokenizer, ["ok", "fine"], ["", " y"], [1], ids=["a", "b"], progress=False)
    with pytest.raises(GradsenseError, match="out of range"):
        activation_gradients(model, tokenizer, ["ok"], [" x"], [4], progress=False)
    with pytest.raises(GradsenseError, match="position"):
        activation_gradients(model, tokenizer, ["ok"], [" x"], [1], position="first", progress=False)
    with pytest.raises(GradsenseError, match="no prompts"):
        activation_gradients(model, tokenizer, [], [], [1], progress=False)
    with pytest.raises(GradsenseError, match="1 prompts but 2 targets"):
        activation_gradients(model, tokenizer, ["ok"], [" x", " y"], [1], progress=False)


def test_non_finite_gradient_names_the_item(tiny):
    model, tokenizer = tiny
    poison = torch.tensor([0.0, 0.0, float("nan")])[:, None, None]  # row 2 only; the others stay finite
    with edit_block_output(model, 2, lambda h: h * (1 + poison)):
        with pytest.raises(GradsenseError, match="item c: non-finite"):
            activation_gradients(model, tokenizer, PROMPTS[:3], TARGETS[:3], [1], ids=IDS[:3], progress=False)


@pytest.mark.integration
def test_real_model_batched_equals_loop_and_finite_differences(smol):
    model, tokenizer = smol
    prompts = ["The capital of France is", "The Battle of Hastings took place in the year", "Insulin is made in the"]
    targets = [target_text(a) for a in ("Paris", "1066", "pancreas")]
    batched = activation_gradients(model, tokenizer, prompts, targets, [7, 15], batch_size=8, progress=False)
    loop = activation_gradients(model, tokenizer, prompts, targets, [7, 15], batch_size=1, progress=False)
    _assert_same(batched.grads, loop.grads)
    right = activation_gradients(model, tokenizer, prompts, targets, [15], padding_side="right", progress=False)
    _assert_same(right.grads[0], batched.grads[1])
    # Central differences in float32 along unit directions half-aligned with g (so g·u is well above the noise).
    batch = encode(tokenizer, prompts, targets)
    g = torch.from_numpy(batched.grads[1]).double()
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.standard_normal(g.shape))
    u = g / g.norm(dim=-1, keepdim=True) + noise / noise.norm(dim=-1, keepdim=True)
    u = (u / u.norm(dim=-1, keepdim=True)).float()
    sites = torch.zeros(batch.input_ids.shape)
    sites[torch.arange(len(prompts)), batch.last_prompt] = 1.0

    def loss_at(step: float) -> np.ndarray:
        with edit_block_output(model, 15, lambda h: h + step * sites[..., None] * u[:, None, :]), torch.no_grad():
            return target_nll(forward(model, batch).logits, batch.labels).double().numpy()

    eps = 0.5  # ‖h‖ ≈ 170 here: a tiny relative step that is still far above float32 rounding of the loss
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    np.testing.assert_allclose((g * u.double()).sum(-1).numpy(), numeric, rtol=1e-2)


def test_correction_gradients_steering_and_npz_round_trip(tiny, tmp_path):
    import pandas as pd

    from gradsense.gradients import correction_gradients, load_gradients, save_gradients
    from gradsense.steering import correction_steering

    model, tokenizer = tiny
    table = pd.DataFrame(
        {
            "id": ["f1-c", "f1-x", "f2-c"],
            "prompt": ["Paris is in", "Paris is in", "Bees make"],
            "target": ["France", "Spain", "honey"],
            "source": ["Spain", "France", "wax"],
        }
    )
    result = correction_gradients(model, tokenizer, table, [1, 2], progress=False)
    steer = correction_steering(model, tokenizer, table, [1, 2], progress=False)
    direct = steering_vectors(
        model,
        tokenizer,
        table["prompt"].tolist(),
        [target_text(a) for a in table["target"]],
        [target_text(a) for a in table["source"]],
        [1, 2],
        progress=False,
    )
    np.testing.assert_allclose(steer, direct, atol=1e-6)
    np.testing.assert_allclose(steer[:, 0], -steer[:, 1], atol=1e-6)  # the same fact in both directions
    path = save_gradients(tmp_path / "g.npz", result, steer)
    loaded = load_gradients(path)
    assert loaded["layers"] == [1, 2] and loaded["ids"].tolist() == table["id"].tolist()
    np.testing.assert_array_equal(loaded["grads"], result.grads)
    assert [p.name for p in tmp_path.iterdir()] == ["g.npz"]
    # Per-position slots pass through: the first slot is the last prompt position, i.e. the "last" gradient.
    each = correction_gradients(model, tokenizer, table, [1, 2], "each", progress=False, slots=3)
    assert each.grads.shape == (2, len(table), 3, model.config.hidden_size)
    np.testing.assert_allclose(each.grads[:, :, 0], result.grads, atol=1e-6)
    with pytest.raises(GradsenseError, match="missing"):
        load_gradients(tmp_path / "none.npz")
    with pytest.raises(GradsenseError, match="lacks columns"):
        correction_gradients(model, tokenizer, table.drop(columns="target"), [1], progress=False)


def test_balanced_subset_keeps_whole_facts_and_order():
    import pandas as pd

    from gradsense.gradients import balanced_subset

    table = pd.DataFrame(
        {
            "id": [f"{f}-{d}" for f in range(12) for d in "cx"],
            "fact_id": [f for f in range(12) for _ in "cx"],
            "domain": [("geo", "bio", "art")[f % 3] for f in range(12) for _ in "cx"],
        }
    )
    subset = balanced_subset(table, 12)
    # 12 rows / (2 rows per fact × 3 domains) = 2 facts per domain, the first in table order: geo 0, 3; bio 1, 4; art
    # 2, 5.
    assert subset["fact_id"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert subset.groupby("fact_id").size().eq(2).all()
    assert subset["id"].tolist() == [i for i in table["id"] if i in set(subset["id"])]
    assert balanced_subset(table, None).equals(table) and len(balanced_subset(table, 100)) == len(table)
