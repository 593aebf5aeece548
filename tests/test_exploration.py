"""`gradsense.exploration.explore` on the tiny random Llama: the step, the controls, the round trip, bad input."""

import json

import numpy as np
import pytest
import torch

from gradsense.baselines import roundtrip_cosines
from gradsense.errors import GradsenseError
from gradsense.exploration import (
    ANSWER_COLUMNS,
    CONTROL_ROWS,
    DEFAULT_ALPHA,
    HEAD_COLUMNS,
    SHIFT_COLUMNS,
    _shifts,
    explore,
    oracle_setting,
)
from gradsense.items import item_gradients
from gradsense.oracle import VirtualStep, virtual_step

from describer_helpers import describer, talkative_llama

PROMPT, RIGHT, WRONG = "The Battle of Hastings took place in the year", "1066", "1067"


@pytest.fixture(scope="module")
def tiny_describer():
    model, tok = talkative_llama()
    return describer(model, tok)


@pytest.fixture(scope="module")
def found(tiny_describer):
    return explore(tiny_describer, PROMPT, RIGHT, WRONG, top_k=4, alpha=0.01, sentence_tokens=4)


def test_the_step_along_minus_g_raises_the_right_answer(found):
    assert found.right_dlogp > 0  # first order: −g lowers the loss on `right`
    assert found.wrong_dlogp is not None and np.isfinite(found.wrong_dlogp)
    assert list(found.answers.columns) == list(ANSWER_COLUMNS)
    assert list(found.answers.index) == ["right", "wrong"] and found.answers.loc["wrong", "text"] == WRONG
    assert (found.alpha, found.layer, found.source_layer) == (0.01, 1, 1)


def test_token_shifts_are_the_virtual_steps_top_k(tiny_describer, found):
    shifts = found.shifts
    assert list(shifts.columns) == list(SHIFT_COLUMNS)
    up, down = shifts[shifts["direction"] == "up"], shifts[shifts["direction"] == "down"]
    assert len(up) == len(down) == 4
    assert (up["dlogp"] > 0).all() and (down["dlogp"] < 0).all()
    assert up["dlogp"].is_monotonic_decreasing and down["dlogp"].is_monotonic_increasing
    assert ((shifts["p_old"] >= 0.001) | (shifts["p_new"] >= 0.001)).all()  # the default min_prob
    # The same numbers as the oracle's own virtual step on the item's gradient.
    g = item_gradients(tiny_describer, [{"id": 0, "prompt": PROMPT, "right": RIGHT}])[0]
    step = virtual_step(tiny_describer.model, tiny_describer.tokenizer, PROMPT, g, 1, 0.01)
    assert np.allclose(shifts["dlogp"], step.dlogp[shifts["token_id"].tolist()].numpy(), atol=1e-5)


def test_a_pushed_up_token_rises_and_a_pushed_down_token_falls(tiny):
    # Four eligible tokens, only one of which rises: "up" lists just that one, "down" the three that fall.
    logp_old = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0]))
    logp_new = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.09, 0.01]))
    step = VirtualStep(logp_new - logp_old, logp_old, logp_new, alpha=0.1, layer=1)
    shifts = _shifts(tiny[1], step, top_k=3, min_prob=0.05)
    assert shifts["token_id"].tolist() == [0, 1, 2, 3] and shifts["direction"].tolist() == ["up"] + ["down"] * 3
    assert shifts["p_new"].tolist() == pytest.approx([0.7, 0.1, 0.1, 0.09])


def test_every_control_gives_a_head(found):
    heads = found.heads
    assert tuple(heads.index) == CONTROL_ROWS and list(heads.columns) == list(HEAD_COLUMNS)
    assert all(d.startswith("domain:") for d in heads["description"])  # structured decoding: the head always parses
    assert heads.loc["none", "injected"] == "nothing" and "capital of France" in heads.loc["shuffled", "injected"]
    assert found.head == {k: heads.loc["gradient", k] for k in ("domain", "from", "to")}
    assert heads.loc["gradient", "description"] != heads.loc["shuffled", "description"]  # another gradient


def test_the_round_trip_is_the_baselines_cosine(tiny_describer, found):
    g = item_gradients(tiny_describer, [{"id": 0, "prompt": PROMPT, "right": RIGHT}])
    want = roundtrip_cosines(
        tiny_describer.model,
        tiny_describer.tokenizer,
        [PROMPT],
        [found.head["to"]],
        g,
        tiny_describer.config.source_layer,
    )[0]
    assert found.roundtrip_cosine == pytest.approx(want, abs=1e-5)


def test_a_step_at_another_layer_and_blank_optional_fields(tiny_describer):
    found = explore(tiny_describer, "The sky is", "blue", wrong=" ", context="", layer=2, top_k=2, sentence_tokens=0)
    assert (found.layer, found.source_layer, found.alpha) == (2, 1, DEFAULT_ALPHA)
    assert found.wrong is None and found.context is None and found.wrong_dlogp is None
    assert list(found.answers.index) == ["right"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "", "right": "Paris"}, "explore: field 'prompt' must be a non-empty string"),
        ({"prompt": "The capital of France is", "right": "  "}, "explore: field 'right' must be a non-empty string"),
        ({"prompt": "x", "right": "y", "other": {"prompt": "z"}}, "explore (other correction): missing field 'right'"),
        ({"prompt": "x", "right": "y", "top_k": 0}, "explore: top_k must be a positive integer, not 0"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_describer, kwargs, message):
    with pytest.raises(GradsenseError) as err:
        explore(tiny_describer, **kwargs)
    assert str(err.value) == message and "\n" not in str(err.value)


def test_oracle_setting_reads_the_runs_alpha(tmp_path):
    assert oracle_setting(tmp_path) == (DEFAULT_ALPHA, None)
    (tmp_path / "results" / "oracle").mkdir(parents=True)
    (tmp_path / "results" / "oracle" / "alpha.json").write_text(json.dumps({"alpha": 0.1, "layer": 15}))
    assert oracle_setting(tmp_path) == (0.1, 15)
