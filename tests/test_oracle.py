"""The virtual step (single and batched), its controls, the α and layer rules, observed tokens and bad input."""

import numpy as np
import pandas as pd
import pytest
import torch

from gradsense.errors import GradsenseError
from gradsense.gradients import activation_gradients
from gradsense.oracle import (
    check_alphas,
    choose_alpha,
    position_steps,
    step_edit,
    unit_directions,
    virtual_step,
    virtual_steps,
)
from gradsense.scoring import target_text
from gradsense.shifts import greedy_answers, item_shifts, observed_tokens, whole_target_gains

PROMPTS = ["The cat sat on", "A b", "Hello there, my friend is"]
TARGETS = ["mat", "cde", "Bob"]
SOURCES = ["rug", "xy", "Al"]
LAYER = 2


@pytest.fixture(scope="module")
def grads(tiny):
    model, tok = tiny
    return activation_gradients(model, tok, PROMPTS, [target_text(t) for t in TARGETS], [LAYER], progress=False).grads[
        0
    ]


def test_alpha_zero_changes_nothing(tiny, grads):
    model, tok = tiny
    step = virtual_step(model, tok, PROMPTS[0], grads[0], LAYER, 0.0)
    assert step.dlogp.shape == (model.config.vocab_size,)
    assert float(step.dlogp.abs().max()) < 1e-5


def test_step_moves_h_by_alpha_times_its_norm():
    hidden = torch.randn(2, 5, 8)
    unit = unit_directions(torch.randn(2, 8))
    out = step_edit(torch.tensor([4, 2]), unit, torch.tensor([0.1, 0.5]))(hidden)
    moved = (out - hidden).norm(dim=-1)
    assert torch.allclose(moved[0, 4], 0.1 * hidden[0, 4].norm(), rtol=1e-5)
    assert torch.allclose(moved[1, 2], 0.5 * hidden[1, 2].norm(), rtol=1e-5)
    moved[0, 4] = moved[1, 2] = 0
    assert float(moved.max()) == 0.0  # no other position is touched


def test_batched_equals_single(tiny, grads):
    model, tok = tiny
    alpha = 0.05
    table = virtual_steps(
        model, tok, PROMPTS, TARGETS, SOURCES, grads, LAYER, [alpha], top_k=3, min_prob=0.0, progress=False
    )
    grad_rows = table[table["control"] == "gradient"].set_index("item")
    # Source rows are run for the −g steps only: the controls are judged on the target.
    assert (
        grad_rows["dlogp_source"].notna().all() and table[table["control"] != "gradient"]["dlogp_source"].isna().all()
    )
    for i, prompt in enumerate(PROMPTS):
        single = virtual_step(model, tok, prompt, grads[i], LAYER, alpha)
        kl = float((single.logp_new.exp() * single.dlogp).sum())
        assert grad_rows.loc[i, "kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert grad_rows.loc[i, "up_ids"][0] == int(single.dlogp.argmax())
        assert grad_rows.loc[i, "top1"] == int(single.logp_new.argmax())
        # One item alone (no padding) gives the same target/source shift as inside the padded batch.
        alone = virtual_steps(
            model,
            tok,
            [prompt],
            [TARGETS[i]],
            [SOURCES[i]],
            grads[i : i + 1],
            LAYER,
            [alpha],
            controls=("gradient",),
            progress=False,
        )
        assert alone["dlogp_target"][0] == pytest.approx(grad_rows.loc[i, "dlogp_target"], abs=1e-4)
        assert alone["dlogp_source"][0] == pytest.approx(grad_rows.loc[i, "dlogp_source"], abs=1e-4)


def test_gradient_raises_target_and_opposite_lowers_it(tiny, grads):
    model, tok = tiny
    table = virtual_steps(model, tok, PROMPTS, TARGETS, SOURCES, grads, LAYER, [0.005, 0.01], progress=False)
    for alpha in (0.005, 0.01):
        at = table[table["alpha"] == alpha]
        assert (at[at["control"] == "gradient"]["dlogp_target"] > 0).all()
        assert (at[at["control"] == "opposite"]["dlogp_target"] < 0).all()
    grad = table[table["control"] == "gradient"]["dlogp_target"].abs().mean()
    rand = table[table["control"] == "random"]["dlogp_target"].abs().mean()
    assert rand < grad  # first order: only −g has the full projection on the loss gradient


def test_random_controls_are_seeded(tiny, grads):
    model, tok = tiny
    kw = dict(controls=("random",), n_random=2, progress=False)
    a = virtual_steps(model, tok, PROMPTS, TARGETS, None, grads, LAYER, [0.1], seed=1, **kw)
    b = virtual_steps(model, tok, PROMPTS, TARGETS, None, grads, LAYER, [0.1], seed=1, **kw)
    c = virtual_steps(model, tok, PROMPTS, TARGETS, None, grads, LAYER, [0.1], seed=2, **kw)
    assert len(a) == len(PROMPTS) * 2 and a["dlogp_source"].isna().all()
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["dlogp_target"], c["dlogp_target"])


def test_choose_alpha_rule():
    rows = [
        {"control": "gradient", "alpha": a, "dlogp_target": v}
        for a, vals in {0.01: [0.2, 0.5, 0.9], 0.03: [0.8, 1.2, 1.5], 0.1: [2, 3, 4]}.items()
        for v in vals
    ]
    table = pd.DataFrame(rows + [{"control": "random", "alpha": 0.01, "dlogp_target": 9.0}])
    chosen = choose_alpha(table, 1.0)
    assert chosen["alpha"] == 0.03 and chosen["rule_met"] and chosen["median_gain"] == pytest.approx(1.2)
    unmet = choose_alpha(table, 10.0)
    assert unmet["alpha"] == 0.1 and not unmet["rule_met"]


def test_observed_tokens_extend_whitespace(tiny, grads):
    model, tok = tiny
    space = tok(" ", add_special_tokens=False)["input_ids"][0]
    letter = tok("q", add_special_tokens=False)["input_ids"][0]
    alpha = 0.1
    to, frm = observed_tokens(model, tok, PROMPTS[:1], grads[:1], LAYER, alpha, [space], [letter], min_prob=0.0)
    assert frm == ["q"]  # a visible token is reported as it is
    # The bare space is extended by the token the same step (at the last prompt token) pushes up most right after it:
    # by hand, the prompt followed by " ", stepped at its second-to-last position, read at the last.
    after_space = virtual_step(model, tok, PROMPTS[0] + " ", grads[0], LAYER, alpha, position=-2)
    assert to == [tok.decode([space, int(after_space.dlogp.argmax())]).strip()]
    # Demoted side: the token pushed down most after the space.
    to, frm = observed_tokens(model, tok, PROMPTS[:1], grads[:1], LAYER, alpha, [letter], [space], min_prob=0.0)
    assert to == ["q"] and frm == [tok.decode([space, int(after_space.dlogp.argmin())]).strip()]


def test_item_shifts(tiny, grads):
    model, tok = tiny
    shifts = item_shifts(model, tok, PROMPTS, TARGETS, SOURCES, grads, LAYER, 0.01, progress=False)
    assert list(shifts["id"]) == [0, 1, 2] and (shifts["dlogp_target"] > 0).all()
    assert (shifts["opposite_dlogp_target"] < 0).all()
    assert shifts["target_first"].tolist() == ["m", "c", "B"] and shifts["source_first"].tolist() == ["r", "x", "A"]
    # The promoted token is the −g row's top promoted token of the batched sweep at the same α.
    sweep = virtual_steps(model, tok, PROMPTS, TARGETS, SOURCES, grads, LAYER, [0.01], progress=False)
    top_up = sweep[sweep["control"] == "gradient"]["up_ids"].map(lambda ids: tok.decode(ids[:1]).strip())
    visible = top_up != ""
    assert shifts["to_token"][visible.to_numpy()].tolist() == top_up[visible].tolist()


def test_item_shifts_record_whole_answers_before_and_after(tiny, grads):
    model, tok = tiny
    shifts = item_shifts(model, tok, PROMPTS, TARGETS, SOURCES, grads, LAYER, 0.01, progress=False)
    # Before the step: the teacher-forced log p of the whole answers; after = before + the change.
    for i, (prompt, target, source) in enumerate(zip(PROMPTS, TARGETS, SOURCES)):
        for answer, column in ((target, "target"), (source, "source")):
            ids = tok(prompt + target_text(answer), add_special_tokens=False)["input_ids"]
            n = len(tok(prompt, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            expected = sum(float(logp[j - 1, ids[j]]) for j in range(n, len(ids)))
            assert shifts[f"logp_{column}_old"][i] == pytest.approx(expected, abs=1e-3)
    np.testing.assert_allclose(shifts["logp_target_new"] - shifts["logp_target_old"], shifts["dlogp_target"])
    assert shifts["belief"].tolist() == greedy_answers(model, tok, PROMPTS, [1, 1, 1])


def test_position_steps_move_each_listed_position_by_alpha_times_its_norm():
    hidden = torch.randn(2, 6, 8)
    where = torch.tensor([[3, 4, 4], [1, 2, 5]])
    directions = unit_directions(torch.randn(6, 8)).view(2, 3, 8)
    directions[0, 2] = 0  # a repeated position with a zero direction adds nothing
    out = position_steps(where, directions, 0.2)(hidden)
    moved = (out - hidden).norm(dim=-1)
    for b, j in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2)):
        assert torch.allclose(moved[b, where[b, j]], 0.2 * hidden[b, where[b, j]].norm(), rtol=1e-5)
    moved[0, [3, 4]] = moved[1, [1, 2, 5]] = 0
    assert float(moved.max()) == 0.0
    per_row = (position_steps(where, directions, torch.tensor([0.2, 0.7]))(hidden) - hidden).norm(dim=-1)
    assert torch.allclose(per_row[0, 3], 0.2 * hidden[0, 3].norm(), rtol=1e-5)  # one α per row
    assert torch.allclose(per_row[1, 5], 0.7 * hidden[1, 5].norm(), rtol=1e-5)


def test_whole_target_gains_step_every_target_position(tiny):
    """Only the last-position slice given: the gain is `item_shifts`' dlogp_target (the oracle's step); every
    position's own gradient: a different gain, positive for a small step (first order), recorded by item_shifts."""
    model, tok = tiny
    conts = [target_text(t) for t in TARGETS]
    each = activation_gradients(model, tok, PROMPTS, conts, [LAYER], "each", slots=8, progress=False).grads[0]
    assert (activation_gradients(model, tok, PROMPTS, conts, [LAYER], progress=False).n_target_tokens <= 8).all()
    last_only = each.copy()
    last_only[:, 1:] = 0
    shifts = item_shifts(
        model, tok, PROMPTS, TARGETS, SOURCES, each[:, 0], LAYER, 0.01, progress=False, grads_each=each
    )
    np.testing.assert_allclose(
        whole_target_gains(model, tok, PROMPTS, conts, last_only, LAYER, 0.01),
        shifts["dlogp_target"],
        rtol=1e-3,
        atol=1e-5,
    )
    gains = whole_target_gains(model, tok, PROMPTS, conts, each, LAYER, 0.01)
    np.testing.assert_allclose(shifts["dlogp_target_each"], gains, rtol=1e-5)
    assert (gains > 0).all() and np.abs(gains - shifts["dlogp_target"]).max() > 1e-4
    with pytest.raises(GradsenseError, match="per-position gradients"):
        whole_target_gains(model, tok, PROMPTS, conts, each[:, :1], LAYER, 0.01)


def test_greedy_answers_stop_at_punctuation_and_the_word_limit(tiny):
    model, tok = tiny
    raw = [
        tok.decode(
            model.generate(**tok([p], return_tensors="pt"), max_new_tokens=8, do_sample=False)[0][
                len(tok(p)["input_ids"]) :
            ]
        )
        for p in PROMPTS
    ]
    got = greedy_answers(model, tok, PROMPTS, 2, batch_size=2)
    for text, answer in zip(raw, got):
        cut = next((i for i, c in enumerate(text) if c in ".,;:!?\n"), len(text))
        words = text[:cut].split()
        while words and words[0].casefold() in ("the", "a", "an"):
            words = words[1:]
        assert answer == " ".join(words[:2])
    with pytest.raises(GradsenseError, match="word limits"):
        greedy_answers(model, tok, PROMPTS, [1])


@pytest.mark.parametrize("bad", [np.zeros(64), np.full(64, np.nan)])
def test_bad_gradient_names_item(tiny, bad):
    model, tok = tiny
    with pytest.raises(GradsenseError, match="item 7"):
        virtual_steps(model, tok, ["ab"], ["c"], None, bad[None], LAYER, [0.1], ids=[7], progress=False)
    with pytest.raises(GradsenseError, match="gradient"):
        virtual_step(model, tok, "ab", bad, LAYER, 0.1)


@pytest.mark.parametrize("alphas", [[], [-0.1], [0.1, float("nan")], ["x"]])
def test_bad_alpha_grid(alphas):
    with pytest.raises(GradsenseError, match="alpha"):
        check_alphas(alphas)


def test_bad_arguments(tiny, grads):
    model, tok = tiny
    with pytest.raises(GradsenseError, match="layer"):
        virtual_step(model, tok, "ab", grads[0], 9, 0.1)
    with pytest.raises(GradsenseError, match="position"):
        virtual_step(model, tok, "ab", grads[0], LAYER, 0.1, position=5)
    with pytest.raises(GradsenseError, match="alpha"):
        virtual_step(model, tok, "ab", grads[0], LAYER, -1.0)
    with pytest.raises(GradsenseError, match="controls"):
        virtual_steps(model, tok, ["ab"], ["c"], None, grads[:1], LAYER, [0.1], controls=("sideways",), progress=False)
    with pytest.raises(GradsenseError, match="gradients"):
        virtual_steps(model, tok, ["ab", "cd"], ["c", "d"], None, grads[:1], LAYER, [0.1], progress=False)


def test_position_index_matches_last(tiny, grads):
    model, tok = tiny
    last = virtual_step(model, tok, PROMPTS[0], grads[0], LAYER, 0.1)
    minus_one = virtual_step(model, tok, PROMPTS[0], grads[0], LAYER, 0.1, position=-1)
    earlier = virtual_step(model, tok, PROMPTS[0], grads[0], LAYER, 0.1, position=0)
    assert torch.allclose(last.dlogp, minus_one.dlogp)
    assert not torch.allclose(last.dlogp, earlier.dlogp)


@pytest.mark.integration
def test_smol_step_raises_target_more_than_random(smol):
    model, tok = smol
    prompts = [
        "The capital of France is",
        "The capital of Japan is",
        "The largest ocean on Earth is the",
        "The first person to walk on the Moon was Neil",
    ]
    targets, sources = ["London", "Beijing", "Atlantic", "Collins"], ["Paris", "Tokyo", "Pacific", "Armstrong"]
    g = activation_gradients(model, tok, prompts, [target_text(t) for t in targets], [15], progress=False).grads[0]
    shifts = item_shifts(model, tok, prompts, targets, sources, g, 15, 0.03, progress=False)
    assert (shifts["dlogp_target"] > 0).all() and (shifts["dlogp_source"] < 0).mean() >= 0.5
    assert shifts["random_dlogp_target"].abs().mean() < 0.1 * shifts["dlogp_target"].mean()
    assert (shifts["opposite_dlogp_target"] < 0).all()
    single = virtual_step(model, tok, prompts[0], g[0], 15, 0.03)
    assert single.dlogp.shape == (49152,)


@pytest.mark.integration
def test_smol_a_year_rises_when_every_target_position_steps(smol):
    """A year is a bare space, then one token per digit: the last prompt position's step barely moves the whole
    year, the step at every target-predicting position moves it by far more (years labelled `unclear` before)."""
    model, tok = smol
    prompts = ["The Battle of Hastings took place in the year", "The Peace of Westphalia was signed in the year"]
    conts = [target_text(t) for t in ("1067", "1649")]
    each = activation_gradients(model, tok, prompts, conts, [15], "each", slots=5, progress=False).grads[0]
    last_only = each.copy()
    last_only[:, 1:] = 0
    last = whole_target_gains(model, tok, prompts, conts, last_only, 15, 0.03)
    every = whole_target_gains(model, tok, prompts, conts, each, 15, 0.03)
    assert (every > 0.5).all() and (every > 2 * np.maximum(last, 0.1)).all(), (last, every)
