"""Baselines for the describer (normalized answers, majority answer, same-template partners, Backward Lens hit@1)
and the round-trip cosine, on hand-made frames and the tiny model."""

import numpy as np
import pandas as pd
import pytest
import torch

from gradsense.baselines import (
    lens_hits,
    majority_answers,
    normalize_answer,
    paired_roundtrip,
    roundtrip_cosines,
    same_template_partners,
)
from gradsense.errors import GradsenseError
from gradsense.gradients import activation_gradients
from gradsense.scoring import target_text

LAYER = 2
ITEMS = pd.DataFrame(
    {
        "id": ["a", "b", "c", "d", "e"],
        "relation": ["{} lives in", "{} lives in", "{} lives in", "{} is made by", "{} plays"],
        "prompt": ["Ann lives in", "Bob lives in", "Cy lives in", "The car is made by", "Dee plays"],
        "target": ["Paris", "Rome", "Oslo", "Ford", "chess"],
        "domain": ["geo", "geo", "geo", "cars", "games"],
    }
)


@pytest.fixture(scope="module")
def true_grads(tiny):
    model, tok = tiny
    return activation_gradients(
        model, tok, ITEMS["prompt"].tolist(), [target_text(t) for t in ITEMS["target"]], [LAYER], progress=False
    ).grads[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The  U.S.! ", "the us"),
        ("São-Paulo", "sãopaulo"),
        ("STRASSE\tStraße", "strasse strasse"),
        ("1,066", "1066"),
        ("...", ""),
        (None, ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_majority_answers_counts_breaks_ties_and_skips_unseen():
    train = pd.DataFrame(
        {
            "relation": ["r1", "r1", "r1", "r2", "r2", "r3", "r3"],
            "target": ["Paris", "Rome", "Paris", "Zurich", "amsterdam", "x", "x"],
        }
    )
    items = pd.DataFrame({"relation": ["r2", "r1", "unseen", "r3"]})
    # r2 is a 1-1 tie: "amsterdam" < "zurich" once normalized (raw order would put "Zurich" first).
    assert majority_answers(train, items) == ["amsterdam", "Paris", None, "x"]


def test_majority_answers_needs_columns():
    with pytest.raises(GradsenseError, match="target"):
        majority_answers(pd.DataFrame({"relation": ["r"]}), pd.DataFrame({"relation": ["r"]}))


def test_partners_share_the_template_but_not_the_answer():
    items = pd.DataFrame(
        {
            "relation": ["r", "r", "r", "r", "s", "s", "t"],
            "target": ["Paris", "paris!", "Rome", "Oslo", "x", "X", "y"],
        }
    )
    for seed in range(20):
        partners = same_template_partners(items, seed)
        # Rows 0 and 1 have the same normalized answer, so neither may pick the other; s has one answer; t is alone.
        assert partners[0] in (2, 3) and partners[1] in (2, 3)
        assert partners[2] in (0, 1, 3) and partners[3] in (0, 1, 2)
        assert partners[4:].tolist() == [-1, -1, -1]
    assert np.array_equal(same_template_partners(items, 3), same_template_partners(items, 3))


def test_partners_are_positions_not_index_labels():
    items = pd.DataFrame({"relation": ["r", "r"], "target": ["a", "b"]}, index=[10, 20])
    assert same_template_partners(items).tolist() == [1, 0]


def test_lens_hits_match_a_hand_readout(tiny, true_grads):
    model, tok = tiny
    emb = model.get_input_embeddings().weight.detach().numpy()
    m, s = tok.convert_tokens_to_ids(["m", "s"])
    # −g = the embedding of "m": with tied weights and a unit RMSNorm gain the logit of "m" is ‖e_m‖², the top one.
    grads = np.concatenate([-emb[[m, m, s]], true_grads[:2]])
    targets = ["mat", "sat", "  sun", "Paris", "Rome"]
    with torch.no_grad():
        top = model.lm_head(model.model.norm(torch.tensor(-grads))).argmax(-1).numpy()
    first = np.array([m, s, s, tok.convert_tokens_to_ids("P"), tok.convert_tokens_to_ids("R")])
    hits = lens_hits(model, tok, grads, targets)
    assert hits.dtype == bool
    assert hits.tolist() == (top == first).tolist()
    assert hits[:3].tolist() == [True, False, True]


def test_lens_hits_bad_shape(tiny, true_grads):
    model, tok = tiny
    with pytest.raises(GradsenseError, match="lens_hits"):
        lens_hits(model, tok, true_grads, ["a"])


def test_roundtrip_of_the_target_is_one_and_blank_answers_are_nan(tiny, true_grads):
    model, tok = tiny
    prompts = ITEMS["prompt"].tolist()
    answers = ["Paris", None, "", "   ", "chess"]
    cos = roundtrip_cosines(model, tok, prompts, answers, true_grads, LAYER, batch_size=2)
    assert cos[[0, 4]] == pytest.approx([1.0, 1.0], abs=1e-4)
    assert np.isnan(cos[1:4]).all()
    # Another answer implies another gradient: compare with a direct computation for that one item.
    other = roundtrip_cosines(model, tok, prompts[:1], ["Rome"], true_grads[:1], LAYER)
    g = activation_gradients(model, tok, prompts[:1], [" Rome"], [LAYER], progress=False).grads[0][0]
    t = true_grads[0]
    assert other[0] == pytest.approx(float(g @ t / np.linalg.norm(g) / np.linalg.norm(t)), abs=1e-5)
    assert other[0] < 0.999


def test_roundtrip_all_blank_is_all_nan(tiny, true_grads):
    model, tok = tiny
    cos = roundtrip_cosines(model, tok, ["A b", "C d"], [None, float("nan")], true_grads[:2], LAYER)
    assert np.isnan(cos).all() and cos.shape == (2,)


def test_roundtrip_bad_row_count(tiny, true_grads):
    model, tok = tiny
    prompts = ITEMS["prompt"].tolist()
    with pytest.raises(GradsenseError, match="true_grads"):
        roundtrip_cosines(model, tok, prompts, ITEMS["target"].tolist(), true_grads[:3], LAYER)
    with pytest.raises(GradsenseError, match="answers"):
        roundtrip_cosines(model, tok, prompts, ["Paris"], true_grads, LAYER)


def test_paired_roundtrip(tiny, true_grads):
    model, tok = tiny
    described = ["Paris", "Oslo", None, "Ford", "go"]
    table = paired_roundtrip(model, tok, ITEMS, described, true_grads, LAYER, seed=1)
    assert table.columns.tolist() == ["id", "cos_described", "cos_partner", "cos_target"]
    assert table["id"].tolist() == ["a", "b", "c", "d", "e"]
    assert table["cos_target"].to_numpy() == pytest.approx(np.ones(5), abs=1e-4)
    # Items a and d were described by their own target; c was not described.
    assert table["cos_described"].to_numpy()[[0, 3]] == pytest.approx([1.0, 1.0], abs=1e-4)
    assert np.isnan(table.loc[2, "cos_described"])
    # Only the three "lives in" items have partners, and a partner's answer differs from the target.
    partner = table["cos_partner"].to_numpy()
    assert np.isfinite(partner[:3]).all() and np.isnan(partner[3:]).all()
    assert (partner[:3] < 0.999).all()
    # b was described as "Oslo", the target of c: the same cosine as the direct round trip of that answer.
    direct = roundtrip_cosines(model, tok, ["Bob lives in"], ["Oslo"], true_grads[1:2], LAYER)
    assert table.loc[1, "cos_described"] == pytest.approx(direct[0], abs=1e-5)


def test_paired_roundtrip_bad_input(tiny, true_grads):
    model, tok = tiny
    with pytest.raises(GradsenseError, match="described"):
        paired_roundtrip(model, tok, ITEMS, ["Paris"], true_grads, LAYER)
    with pytest.raises(GradsenseError, match="relation"):
        paired_roundtrip(model, tok, ITEMS.drop(columns="relation"), ITEMS["target"], true_grads, LAYER)
