"""gradsense.decoding: batched greedy decoding equals one-by-one, and structured decoding equals HF generate field by
field (every head parses, every value is the model's greedy choice)."""

import re

import numpy as np
import torch

from gradsense.decoding import FIELD_LEADS, FIELD_TOKENS, field_stops, generate, generate_ids, token_classes
from gradsense.teacher import parse_label

from describer_helpers import LABELS, describer, grads, talkative_llama


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


def test_structured_decoding_always_yields_a_parsed_head():
    """Structured decoding gives the field names and lets the model say each value: every field parses, each value
    is greedy (the same tokens as free decoding after the same prefix) and the sentence budget is respected."""
    model, tok = talkative_llama()
    d = describer(model, tok)
    vectors = d.projector(torch.as_tensor(grads(3))).detach()
    contexts = [None, "A passage.", None]
    heads = generate(d, vectors, contexts, max_new_tokens=0)
    assert d.generate(vectors, contexts, max_new_tokens=0) == heads  # the describer's method is this function
    for head in heads:  # every value the model said is the parsed field (an empty value parses as None)
        said = re.fullmatch(r"domain:(.*) \| from:(.*) \| to:(.*)", head, re.S).groups()
        expected = [v.strip() or None for v in said]
        expected[0] = expected[0].lower() if expected[0] else None
        assert [parse_label(head)[k] for k in ("domain", "from", "to")] == expected or "|" in "".join(said), head
    assert all(h.startswith("domain:") and " | from:" in h and " | to:" in h and "\n" not in h for h in heads)
    said = [[] for _ in contexts]  # the reference: each field with HF generate after the head so far
    for lead in FIELD_LEADS:
        said = [row + tok(lead, add_special_tokens=False)["input_ids"] for row in said]
        values = generate_ids(d, vectors, contexts, FIELD_TOKENS, said, field_stops(tok), min_new_tokens=1)
        said = [row + value for row, value in zip(said, values)]
    assert [tok.decode(row, skip_special_tokens=True).strip() for row in said] == heads
    with_sentence = generate(d, vectors, contexts, max_new_tokens=5)
    assert [s.split("\n")[0] for s in with_sentence] == heads


def test_field_stops_and_blank_tokens(tiny):
    _, tok = tiny
    stops, blank = token_classes(tok)
    ids = {text: tok(text, add_special_tokens=False)["input_ids"][-1] for text in ("|", "\n", " ", "a")}
    assert ids["|"] in stops and ids["\n"] in stops and tok.convert_tokens_to_ids("<|im_end|>") == stops[0]
    assert ids["a"] not in stops and ids["a"] not in blank and ids[" "] in blank and ids["\n"] not in blank
    assert token_classes(tok) is token_classes(tok)  # one pass per tokenizer
