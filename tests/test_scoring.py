"""gradsense.scoring: teacher-forced batches, padding invariance, bad input."""

import pytest
import torch

from gradsense import GradsenseError
from gradsense.scoring import (
    encode,
    first_visible_id,
    first_visible_token,
    next_token_logprobs,
    score_targets,
    target_logprobs,
    target_text,
)

from tiny_model import CharTokenizer

PROMPTS = ["The capital of France is", "Hi", "A much longer prompt about rivers and seas"]
TARGETS = [" Paris", " 1066", " x"]


def test_labels_mark_target_predicting_positions(tiny):
    _, tokenizer = tiny
    batch = encode(tokenizer, PROMPTS, TARGETS, padding_side="left")
    for row, target in enumerate(TARGETS):
        ids = tokenizer(target, add_special_tokens=False).input_ids
        labelled = batch.labels[row][batch.target_positions[row]].tolist()
        assert labelled == ids
        assert batch.target_positions[row].nonzero()[0].item() == batch.last_prompt[row].item()


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_scores_equal_one_by_one(tiny, side):
    model, tokenizer = tiny
    batched = target_logprobs(model, tokenizer, PROMPTS, TARGETS, batch_size=3)
    single = [target_logprobs(model, tokenizer, [p], [t])[0] for p, t in zip(PROMPTS, TARGETS)]
    assert batched == pytest.approx(single, abs=1e-4)


def test_next_token_logprobs_are_normalised(tiny):
    model, tokenizer = tiny
    logp = next_token_logprobs(model, tokenizer, PROMPTS)
    assert logp.shape == (3, model.config.vocab_size)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3), atol=1e-4)


def test_greedy_and_lengths(tiny):
    model, tokenizer = tiny
    scores = score_targets(model, tokenizer, PROMPTS, TARGETS)
    assert scores["n_tokens"].tolist() == [len(tokenizer(t, add_special_tokens=False).input_ids) for t in TARGETS]
    assert scores["greedy"].dtype == bool and (scores["logp"] < 0).all()


def test_bad_input_names_the_item(tiny):
    _, tokenizer = tiny
    with pytest.raises(GradsenseError, match="item b: empty prompt"):
        encode(tokenizer, ["ok", "  "], [" a", " b"], ids=["a", "b"])
    with pytest.raises(GradsenseError, match="item a: target '' tokenizes to nothing"):
        encode(tokenizer, ["ok"], [""], ids=["a"])
    with pytest.raises(GradsenseError, match="padding_side"):
        encode(tokenizer, ["ok"], padding_side="middle")


def test_target_text_adds_one_space():
    assert target_text("Paris") == " Paris" and target_text(" Paris") == " Paris"


def test_first_visible_token_skips_the_bare_space():
    tokenizer = CharTokenizer()
    # " 1066" is " ", "1", "0", "6", "6" byte by byte: the first visible token is "1", not the space.
    assert first_visible_id(tokenizer, "1066") == tokenizer("1", add_special_tokens=False)["input_ids"][0]
    assert first_visible_token(tokenizer, "1066") == "1" and first_visible_token(tokenizer, " Paris") == "P"
    assert first_visible_token(tokenizer, "   ") == ""
    with pytest.raises(GradsenseError, match="no token that is not whitespace"):
        first_visible_id(tokenizer, "   ")
