"""Oracle validity: the real SGD step (tiny model; one SmolLM2 test), and the summaries, acceptance and faithfulness
numbers the oracle stage reports, on hand-made tables."""

import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from gradsense.errors import GradsenseError
from gradsense.gradients import activation_gradients
from gradsense.scoring import next_token_logprobs, target_text
from gradsense.validity import acceptance, faithfulness, real_step_validity, validity_summary

PROMPTS = ["The cat sat on", "A b"]
TARGETS = ["mat", "cde"]
SOURCES = ["rug", "xy"]
LAYER = 2


@pytest.fixture(scope="module")
def grads(tiny):
    model, tok = tiny
    return activation_gradients(model, tok, PROMPTS, [target_text(t) for t in TARGETS], [LAYER], progress=False).grads[
        0
    ]


def test_real_step_restores_parameters_and_reports_the_top_tokens(tiny, grads):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    summary, tokens = real_step_validity(
        model, tok, PROMPTS, TARGETS, SOURCES, grads, LAYER, 0.01, [1e-3, 1e-2], top_n=20, progress=False
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [p.requires_grad for p in model.parameters()]
    assert len(summary) == 4 and len(tokens) == 4 * 20
    # A small real step on the target's loss raises the target, and so does the virtual step.
    assert (summary["real_dlogp_target"] > 0).all() and summary["virtual_sign_target"].all()
    # The token table holds the 20 most probable next tokens before any step, and the summary's ρ is computed on it.
    old = next_token_logprobs(model, tok, PROMPTS)
    for (i, lr), part in tokens.groupby(["item", "lr"]):
        assert part["token"].tolist() == old[i].topk(20).indices.tolist()
        row = summary[(summary["item"] == i) & (summary["lr"] == lr)].iloc[0]
        assert row["virtual_spearman"] == pytest.approx(spearmanr(part["real"], part["virtual"]).statistic, abs=1e-6)


@pytest.mark.integration
def test_smol_real_step_agrees_with_virtual(smol):
    model, tok = smol
    prompt, target, source = "The capital of France is", "London", "Paris"
    g = activation_gradients(model, tok, [prompt], [target_text(target)], [15], progress=False).grads[0]
    summary, _ = real_step_validity(model, tok, [prompt], [target], [source], g, 15, 0.03, [1e-4], progress=False)
    row = summary.iloc[0]
    assert row["real_dlogp_target"] > 0 and row["virtual_sign_target"]
    assert row["virtual_spearman"] > row["random_spearman"]


def test_validity_summary_means_per_lr_and_step():
    steps = pd.DataFrame(
        {
            "lr": [1e-4, 1e-4, 1e-3],
            "virtual_spearman": [0.8, 0.4, 0.5],
            "random_spearman": [0.1, -0.1, 0.0],
            "virtual_top_agree": [True, False, True],
            "random_top_agree": [False, False, True],
        }
    )
    summary = validity_summary(steps, ["spearman", "top_agree"])
    assert summary[["lr", "step"]].values.tolist() == [
        [1e-4, "virtual"],
        [1e-4, "random"],
        [1e-3, "virtual"],
        [1e-3, "random"],
    ]
    assert summary["spearman"].tolist() == pytest.approx([0.6, 0.0, 0.5, 0.0])
    assert summary["top_agree"].tolist() == [0.5, 0.0, 1.0, 1.0]


def test_acceptance_by_hand():
    shifts = pd.DataFrame(
        {
            "dlogp_target": [2.0, 1.0, -0.5, 1.5],
            "dlogp_source": [-1.0, 0.5, -2.0, -0.1],
            "random_dlogp_target": [0.1, -0.3, 0.0, 0.2],
            "opposite_dlogp_target": [-2.0, -1.0, 0.4, -1.4],
        }
    )
    numbers = acceptance(shifts)
    assert numbers["n_test"] == 4 and numbers["share_target_up"] == 0.75 and numbers["share_source_down"] == 0.75
    assert numbers["mean_dlogp_target"] == pytest.approx(1.0)
    assert numbers["mean_abs_random_dlogp_target"] == pytest.approx(0.15)  # |Δ| of the random step, not Δ (= 0)
    assert numbers["random_over_gradient"] == pytest.approx(0.15)
    assert numbers["mean_opposite_dlogp_target"] == pytest.approx(-1.0)


def test_faithfulness_by_hand():
    shifts = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "domain": ["geo", "geo", "hist"],
            "direction": "correct",
            "to_token": ["Paris", "Rome", "1"],
            "target_first": ["Paris", "Paris", "1"],
            "from_token": ["London", "London", "2"],
            "source_first": ["Rome", "London", "2"],
            "dlogp_target": [1.0, -0.5, 2.0],
        }
    )
    table = faithfulness(shifts).set_index("domain")
    assert table.loc["geo", "n"] == 2 and table.loc["hist", "n"] == 1
    assert table.loc["geo", "to_is_target"] == 0.5 and table.loc["geo", "from_is_source"] == 0.5
    assert table.loc["geo", "target_up"] == 0.5 and table.loc["geo", "median_dlogp_target"] == 0.25
    assert table.loc["hist", ["to_is_target", "from_is_source", "target_up"]].tolist() == [1.0, 1.0, 1.0]


def test_label_faithfulness_and_clarity_by_hand():
    from gradsense.validity import clarity_counts, label_faithfulness

    labelled = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "domain": ["history"] * 4,
            "direction": ["correct"] * 4,
            "split": ["train", "train", "test", "test"],
            "target": ["1789", "bone marrow", "Paris", "1066"],
            "source": ["1788", "liver", "Rome", "1067"],
            "belief": ["1799", "", "Rome", "1066"],
            "dlogp_target": [2.0, 0.7, 0.2, -1.0],
            "label": [
                "domain: history | from: 1799 | to: 1789",
                "domain: history | from: liver | to: Bone Marrow.",
                "domain: history | from: Rome | to: unclear",
                "domain: history | from: 1067 | to: 1",
            ],
        }
    )
    row = label_faithfulness(labelled).iloc[0]
    assert row["n"] == 4 and row["clear"] == 0.75 and row["to_is_target"] == 0.5  # "1" is not 1066
    assert row["from_is_source"] == 0.75 and row["from_is_belief"] == 0.5 and row["from_is_source_or_belief"] == 1.0
    counts = clarity_counts(labelled, 0.5).set_index("split")
    # Item d's step lowered its target, yet its label names an answer: the label decides, the gain gives the reason.
    assert counts.loc["train"].tolist() == [2, 0, 0] and counts.loc["test"].tolist() == [1, 1, 0]


def test_step_position_clarity_and_the_reason_by_hand():
    """Per domain: the share each step makes clear; `clarity_counts` gives the whole-target gain as the reason."""
    from gradsense.validity import clarity_counts, step_position_clarity

    shifts = pd.DataFrame(
        {
            "domain": ["history", "history", "geo"],
            "split": ["train"] * 3,
            "dlogp_target": [0.1, 0.3, 1.0],
            "dlogp_target_each": [2.0, 0.2, 1.1],
            "label": [
                "domain: history | from: a | to: 1066",
                "domain: history | from: a | to: unclear",
                "domain: geo | from: a | to: Paris",
            ],
        }
    )
    table = step_position_clarity(shifts, 0.5).set_index("domain")
    assert table.loc["history", ["n", "clear_last", "clear_each"]].tolist() == [2, 0.0, 0.5]
    assert table.loc["all", ["n", "clear_last", "clear_each"]].tolist() == [3, 1 / 3, 2 / 3]
    assert table.loc["history", "median_gain_each"] == pytest.approx(1.1)
    counts = clarity_counts(shifts, 0.5).set_index("split")
    assert counts.loc["train"].tolist() == [2, 1, 0]  # the unclear item's whole-target gain 0.2 > 0: "raised < 0.5"
    with pytest.raises(GradsenseError, match="step_positions"):
        step_position_clarity(shifts.drop(columns="dlogp_target_each"), 0.5)
