"""gradsense.decoding: batched greedy decoding equals one-by-one, and structured decoding equals HF generate field by
field (every head parses, every value is the model's greedy choice)."""

import re

import numpy as np
import torch

from gradsense.decoding import field_stops, generate, generate_ids, structured_ids, token_classes
from gradsense.prompt import head_ids
from gradsense.teacher import parse_label

from describer_helpers import LABELS, describer, grads, talkative_llama
from tiny_model import tiny_llama


def test_batched_generation_matches_one_by_one():
    model, tok = talkative_llama()
    d = describer(model, tok)
    contexts = [None, "A much longer passage read first.", "Short."]
    vectors = d.projector(torch.as_tensor(grads(3))).detach()
    batched = generate_ids(d, vectors, contexts, max_new_tokens=6)
    single = [generate_ids(d, vectors[i : i + 1], contexts[i : i + 1], max_new_tokens=6)[0] for i in range(3)]
    assert batched == single and len({tuple(row) for row in batched}) > 1
    both = d.label_logprobs(vectors, contexts, LABELS[:3])
    alone = [d.label_logprobs(vectors[i : i + 1], contexts[i : i + 1], LABELS[i : i + 1])[0] for i in range(3)]
    np.testing.assert_allclose(both, alone, rtol=1e-4)


def test_a_bf16_describer_decodes_in_float32_the_same_at_every_batch_size():
    """Training under bfloat16 autocast does not reach decoding: a bf16 describer says, batched or one row at a
    time, exactly what the same describer says in float32."""
    model, tok = talkative_llama()
    d32, d16 = describer(model, tok), describer(model, tok, precision="bf16")
    contexts = [None, "A much longer passage read first.", "Short.", None]
    vectors = d32.projector(torch.as_tensor(grads(4))).detach()
    batched = structured_ids(d16, vectors, contexts, sentence_tokens=2)
    single = [structured_ids(d16, vectors[i : i + 1], contexts[i : i + 1], 2)[0] for i in range(4)]
    assert batched == single == structured_ids(d32, vectors, contexts, sentence_tokens=2)
    texts = d16.describe_gradients(grads(4), contexts, batch_size=3, max_new_tokens=2)["description"].tolist()
    assert texts == d32.describe_gradients(grads(4), contexts, batch_size=4, max_new_tokens=2)["description"].tolist()


def test_structured_decoding_always_yields_a_parsed_head():
    """Structured decoding gives the field names and lets the model say each value: every head parses into three
    non-blank values (the values are the model's) and the sentence budget is respected."""
    model, tok = talkative_llama()
    d = describer(model, tok)
    vectors = d.projector(torch.as_tensor(grads(3))).detach()
    contexts = [None, "A passage.", None]
    heads = generate(d, vectors, contexts, max_new_tokens=0)
    assert d.generate(vectors, contexts, max_new_tokens=0) == heads  # the describer's method is this function
    for head in heads:
        assert re.fullmatch(r"domain:(.*) \| from:(.*) \| to:(.*)", head, re.S) and "\n" not in head, head
        assert parse_label(head)["domain"] is not None
    with_sentence = generate(d, vectors, contexts, max_new_tokens=5)
    assert [s.split("\n")[0] for s in with_sentence] == heads


class Scripted:
    """Makes the tiny model's greedy token the next token of a script, whatever it reads: a forward hook on the
    unembedding that counts the calls of one structured decoding (prefill, then one per said token)."""

    def __init__(self, model, script: list[int | tuple[int, ...]]):
        self.script, self.calls = script, 0
        self.handle = model.lm_head.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        wanted = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        out = out.clone()
        for rank, token in enumerate(wanted if isinstance(wanted, tuple) else (wanted,)):  # in order of preference
            out[:, -1, token] = 1e4 - rank
        return out


def test_decoding_reproduces_a_trained_label_token_for_token():
    """A model that has learnt a label perfectly says it back exactly as training tokenized it: a year's digits
    after a bare space, a multi-word answer, the field names' own stop tokens."""
    model, tok = tiny_llama()
    for label in ["domain: history | from: 1799 | to: 1789", "domain: biology | from: liver | to: bone marrow"]:
        ids, _ = head_ids(tok, label)
        d = describer(model, tok, max_value_tokens=12)
        script = Scripted(model, ids)
        try:
            said = structured_ids(d, None, [None], 0)[0]
        finally:
            script.handle.remove()
        assert said == ids[:-1]  # all but the end of turn, which ends the last value
        assert tok.decode(said) == label and parse_label(tok.decode(said))["to"] == label.split("to: ")[1]


def test_a_value_never_ends_blank_and_never_runs_past_its_limit():
    model, tok = tiny_llama()
    bar = tok("|", add_special_tokens=False)["input_ids"][0]
    x = tok("x", add_special_tokens=False)["input_ids"][0]
    d = describer(model, tok, max_value_tokens=3)
    # The model always prefers to end the value ("|"), else says "x": the stop is refused while the value is
    # blank, so each value is "x" ended at once.
    script = Scripted(model, [*tok("domain:", add_special_tokens=False)["input_ids"]] + [(bar, x)] * 60)
    try:
        head = tok.decode(structured_ids(d, None, [None], 0)[0])
    finally:
        script.handle.remove()
    assert head == "domain:x | from:x | to:x", head
    d = describer(model, tok, max_value_tokens=3)
    script = Scripted(model, [*tok("domain:", add_special_tokens=False)["input_ids"]] + [x] * 60)  # never ends
    try:
        head = tok.decode(structured_ids(d, None, [None], 0)[0])
    finally:
        script.handle.remove()
    assert head == "domain:xxx | from:xxx | to:xxx", head  # every value is cut at its limit


def test_field_stops(tiny):
    _, tok = tiny
    stops = token_classes(tok)
    ids = {text: tok(text, add_special_tokens=False)["input_ids"][-1] for text in ("|", "\n", " ", "a")}
    assert ids["|"] in stops and ids["\n"] in stops and tok.convert_tokens_to_ids("<|im_end|>") == stops[0]
    assert ids["a"] not in stops and ids[" "] not in stops and field_stops(tok) == list(stops)
    assert token_classes(tok) is token_classes(tok)  # one pass per tokenizer
