"""gradsense.prompt: the interpretation prompt's slots, the left-padded batch and the fixed "no pressure" label."""

from gradsense.prompt import NO_PRESSURE, encode_interpretations, head_ids, interpretation_ids, placeholder_id
from gradsense.teacher import NO_DOMAIN, parse_label

from describer_helpers import config


def test_prompt_has_k_slots_after_the_context(tiny):
    _, tok = tiny
    ids, slots = interpretation_ids(tok, config(k=3), "Some context.")
    assert len(slots) == 3 and slots == list(range(slots[0], slots[0] + 3))
    assert all(ids[s] == placeholder_id(tok, " ?") for s in slots)
    text = tok.decode(ids)
    assert text.index("Some context.") < text.index("feel a training pressure") and text.rstrip().endswith("assistant")
    plain, plain_slots = interpretation_ids(tok, config(k=3))
    assert "Some context." not in tok.decode(plain) and ids[slots[-1] + 1 :] == plain[plain_slots[-1] + 1 :]


def test_batch_is_left_padded_with_labels_in_the_last_columns(tiny):
    _, tok = tiny
    labels = ["domain: x | from: a | to: b\nA sentence.", "domain: yy | from: 1799 | to: 1789"]
    batch, pos = encode_interpretations(tok, config(), [None, "A much longer context passage here."], labels)
    assert (batch.attention_mask[:, -1] == 1).all() and batch.attention_mask[0, 0] == 0
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in range(2):
        assert (batch.input_ids[row, pos[row]] == placeholder_id(tok, " ?")).all()
        # The label columns hold the head (no sentence) and the end of turn; the trained ones are its values and
        # the tokens that end them (the byte tokenizer's " |" of each next field name, then the end of turn).
        ids, trained = head_ids(tok, labels[row])
        assert batch.input_ids[row, -len(ids) :].tolist() == ids and ids[-1] == end
        assert tok.decode(ids[:-1]) == labels[row].split("\n")[0]
        kept = batch.labels[row][batch.labels[row] != -100].tolist()
        assert kept == [t for t, keep in zip(ids, trained) if keep]
    assert tok.decode([t for t, k in zip(*head_ids(tok, labels[1])) if k]) == " yy | 1799 | 1789<|im_end|>"
    capped, _ = encode_interpretations(tok, config(), [None], ["domain: history | from: a | to: b"], max_label_tokens=9)
    assert (capped.labels != -100).sum() == 2  # 9 byte tokens: "domain:" (7, given) and " h" (trained)


def test_prefixes_follow_the_prompt_unlabelled(tiny):
    _, tok = tiny
    plain, _ = encode_interpretations(tok, config(), [None])
    said, _ = encode_interpretations(tok, config(), [None], prefixes=[[5, 6, 7]])
    assert (
        said.input_ids[0, -3:].tolist() == [5, 6, 7] and said.input_ids[0, :-3].tolist() == plain.input_ids[0].tolist()
    )
    assert (said.labels == -100).all()


def test_the_no_pressure_label_parses_as_no_domain():
    parsed = parse_label(NO_PRESSURE)
    assert parsed["domain"] == NO_DOMAIN and "No training pressure" in NO_PRESSURE
