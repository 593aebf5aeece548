"""The describer on the tiny Llama: prompt slots, injection, projector, training, checkpoints, parsing, items."""

import json
import re
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch

from gradsense.errors import GradsenseError
from gradsense.hooks import capture
from gradsense.models import tiny_llama
from gradsense.projector import (
    FIELD_LEADS,
    FIELD_TOKENS,
    Describer,
    DescriberConfig,
    Projector,
    TrainConfig,
    adapters_off,
    encode_interpretations,
    injecting,
    interpretation_ids,
    load_describer,
    noise_like,
    placeholder_id,
    read_items,
    read_meta,
    save_checkpoint,
    shuffle_order,
    train_projector,
    write_jsonl,
)

D = 64
LABELS = [f"domain: {d} | from: a | to: b{i}. A push." for i, d in enumerate(["history", "biology", "sport"] * 4)]


def config(**kw) -> DescriberConfig:
    return DescriberConfig(**{"source_layer": 1, "inject_layer": 1, "k": 2, "mlp_hidden": 16, **kw})


def grads(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def describer(model, tok, **kw) -> Describer:
    torch.manual_seed(0)
    cfg = config(**kw)
    return Describer(model, tok, Projector(D, cfg.k, cfg.kind, cfg.mode, cfg.mlp_hidden), cfg)


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
    batch, pos = encode_interpretations(
        tok, config(), [None, "A much longer context passage here."], ["domain: x", "domain: yy"]
    )
    assert (batch.attention_mask[:, -1] == 1).all() and batch.attention_mask[0, 0] == 0
    for row in range(2):
        assert (batch.input_ids[row, pos[row]] == placeholder_id(tok, " ?")).all()
        label = batch.labels[row][batch.labels[row] != -100].tolist()
        assert tok.decode(label[:-1]) == ["domain: x", "domain: yy"][row] and label[-1] == tok.convert_tokens_to_ids(
            "<|im_end|>"
        )
    capped, _ = encode_interpretations(tok, config(), [None], ["domain: history | long"], max_label_tokens=5)
    assert (capped.labels != -100).sum() == 5


def _hidden(model, batch, at, inject=None):
    """Output of block `at`, with an injection hook registered first (hooks run in registration order)."""
    store = {}
    with injecting(model, **inject) if inject else torch.no_grad(), capture(model, [at], store), torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return store[at]


@pytest.mark.parametrize("mode", ["norm", "raw"])
def test_injection_adds_at_the_slots_only(tiny, mode):
    model, tok = tiny
    batch, pos = encode_interpretations(tok, config(), [None, "ctx"])
    vectors = torch.randn(2, 2, D)
    vectors[1] = 0  # a row without injection
    before = _hidden(model, batch, 1)
    spec = {"layer": 1, "positions": pos, "vectors": vectors, "mode": mode}
    after = _hidden(model, batch, 1, spec)
    delta = after - before
    rows = torch.arange(2)[:, None]
    expected = before[rows, pos].norm(dim=-1) if mode == "norm" else vectors.norm(dim=-1)
    torch.testing.assert_close(delta[rows, pos].norm(dim=-1)[0], expected[0], rtol=1e-4, atol=1e-5)
    assert delta[1].abs().max() == 0
    delta[rows, pos] = 0
    assert delta.abs().max() == 0  # nothing else moved at the injection layer
    torch.testing.assert_close(_hidden(model, batch, 0), _hidden(model, batch, 0, spec))


def test_projector_kinds_modes_and_errors():
    g = torch.randn(3, D)
    for kind in ("linear", "mlp"):
        assert Projector(D, 4, kind, "norm", 16)(g).shape == (3, 4, D)
    raw = Projector(D, 2, "linear", "raw")
    torch.testing.assert_close(raw(2 * g), 2 * raw(g))  # raw mode keeps the gradient's magnitude
    norm = Projector(D, 2, "linear", "norm")
    torch.testing.assert_close(norm(5 * g), norm(g))  # norm mode reads only the direction
    with pytest.raises(GradsenseError, match="kind"):
        Projector(D, 2, "conv")
    with pytest.raises(GradsenseError, match="width"):
        norm(torch.randn(2, D + 1))
    model, _ = tiny_llama()
    with pytest.raises(GradsenseError, match="out of range"):
        config(inject_layer=9).check(model)
    with pytest.raises(GradsenseError, match="mode"):
        config(mode="big").check(model)


@pytest.mark.parametrize("mode", ["norm", "raw"])
def test_one_step_lowers_the_loss_through_the_injection(tiny, mode):
    model, tok = tiny
    d = describer(model, tok, mode=mode)
    g = torch.as_tensor(grads(4))
    opt = torch.optim.SGD(d.projector.parameters(), lr=10.0)  # the random tiny model barely reacts
    before = d.loss(d.projector(g), [None] * 4, LABELS[:4])
    before.backward()
    assert d.projector.net.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert d.loss(d.projector(g), [None] * 4, LABELS[:4]) < before


def test_training_is_seeded_and_records_a_curve(tiny):
    model, tok = tiny
    train = TrainConfig(steps=4, batch_size=5, eval_every=2, control_share=0.4)
    runs = [
        train_projector(
            model,
            tok,
            grads(),
            LABELS,
            config(),
            train,
            ["ctx a.", "ctx b."],
            (grads(3, 1), LABELS[:3]),
            progress=False,
        )
        for _ in range(2)
    ]
    curve = runs[0][1]
    assert list(curve["step"]) == [1, 2, 3, 4] and np.isfinite(curve["loss"]).all()
    assert curve["val_loss"].notna().tolist() == [True, True, False, True]
    np.testing.assert_array_equal(curve["loss"], runs[1][1]["loss"])
    with pytest.raises(GradsenseError, match="labels"):
        train_projector(model, tok, grads(3), LABELS[:2], config(), train, progress=False)


def test_checkpoint_roundtrip_and_mismatches(tiny, tmp_path):
    model, tok = tiny
    d, _ = train_projector(
        model, tok, grads(), LABELS, config(mode="raw"), TrainConfig(steps=2, batch_size=4), progress=False
    )
    save_checkpoint(d, tmp_path / "ckpt", model_name="tiny", extra={"heldout_domain": "sport"})
    meta = read_meta(tmp_path / "ckpt")
    assert meta["config"]["source_layer"] == 1 and meta["d_model"] == D and meta["heldout_domain"] == "sport"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    loaded = load_describer(tmp_path / "ckpt", model, tok)
    g = torch.as_tensor(grads(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.projector(g), d.projector(g))
    assert loaded.describe_gradients(grads(3), max_new_tokens=5).equals(
        d.describe_gradients(grads(3), max_new_tokens=5)
    )
    with pytest.raises(GradsenseError, match="another model"):
        load_describer(tmp_path / "ckpt", *tiny_llama(seed=1))
    with pytest.raises(GradsenseError, match="layer 1, not layer 2"):
        load_describer(tmp_path / "ckpt", model, tok, source_layer=2)
    with pytest.raises(GradsenseError, match="missing"):
        load_describer(tmp_path / "nothing", model, tok)
    (tmp_path / "ckpt" / "meta.json").write_text("{broken")
    with pytest.raises(GradsenseError, match="not valid JSON"):
        read_meta(tmp_path / "ckpt")


def test_lora_trains_saves_and_switches_off(tmp_path):
    model, tok = tiny_llama(seed=0)
    base = describer(model, tok)
    batch, _ = encode_interpretations(tok, base.config, [None])
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids).logits
    train = TrainConfig(steps=12, batch_size=4, lr=2e-2, control_share=0.0, context_share=0.0)
    d, curve = train_projector(model, tok, grads(4), LABELS[:4], config(lora_rank=2), train, progress=False)
    assert curve["loss"].iloc[-3:].mean() < curve["loss"].iloc[:3].mean()
    adapted = {name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_" in name}
    assert adapted == {str(d.config.inject_layer + i) for i in range(4 - d.config.inject_layer)}  # blocks J… only
    save_checkpoint(d, tmp_path / "ckpt", model_name="tiny")
    fresh, fresh_tok = tiny_llama(seed=0)
    loaded = load_describer(tmp_path / "ckpt", fresh, fresh_tok)
    g = torch.as_tensor(grads(2))
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded.label_logprobs(loaded.projector(g), [None] * 2, LABELS[:2]),
            d.label_logprobs(d.projector(g), [None] * 2, LABELS[:2]),
            rtol=1e-5,
        )
        with adapters_off(fresh):
            torch.testing.assert_close(fresh(input_ids=batch.input_ids).logits, reference)
        assert not torch.allclose(fresh(input_ids=batch.input_ids).logits, reference)


def test_controls(tiny):
    model, tok = tiny
    d = describer(model, tok)
    none = d.describe_gradients(grads(3), control="none", max_new_tokens=4)
    assert none["description"].nunique() == 1  # without injection every row is the same prompt
    shuffled = d.describe_gradients(grads(5), control="shuffle", seed=3, max_new_tokens=2)
    assert sorted(shuffled["source_row"]) == list(range(5)) and (shuffled["source_row"] != np.arange(5)).all()
    with pytest.raises(GradsenseError, match="unknown control"):
        d.vectors(torch.as_tensor(grads(2)), "loud")
    g = grads(4)
    np.testing.assert_allclose(
        np.linalg.norm(noise_like(g, np.random.default_rng(0)), axis=1), np.linalg.norm(g, axis=1), rtol=1e-5
    )
    order = shuffle_order(7, np.random.default_rng(0))
    assert sorted(order) == list(range(7)) and (order != np.arange(7)).all()


def test_read_items_reports_every_bad_line(tmp_path):
    good = {"id": "a", "prompt": "The capital of France is", "right": "Paris"}
    path = tmp_path / "items.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{not json",
                json.dumps({"id": "b", "prompt": "x"}),
                "",
                json.dumps({**good, "context": 3}),
            ]
        )
        + "\n"
    )
    with pytest.raises(GradsenseError) as err:
        read_items(path)
    message = str(err.value)
    assert (
        "3 malformed" in message
        and "line 2" in message
        and "line 3: missing field 'right'" in message
        and "line 5" in message
    )
    assert "\n" not in message
    path.write_text(json.dumps(good) + "\n")
    assert read_items(path) == [good]
    with pytest.raises(GradsenseError, match="missing"):
        read_items(tmp_path / "none.jsonl")


def test_write_jsonl_replaces_atomically(tmp_path):
    out = write_jsonl([{"id": 1}, {"id": 2}], tmp_path / "sub" / "out.jsonl")
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1, 2]
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]


def test_batched_generation_matches_one_by_one():
    model, tok = tiny_llama(seed=3)
    with (
        torch.no_grad()
    ):  # larger weights, so that greedy tokens depend on the input (the default init babbles one token)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    d = describer(model, tok)
    g = grads(3)
    contexts = [None, "A much longer passage read first.", "Short."]
    vectors = d.projector(torch.as_tensor(g)).detach()
    batched = d.generate_ids(vectors, contexts, max_new_tokens=6)
    single = [d.generate_ids(vectors[i : i + 1], contexts[i : i + 1], max_new_tokens=6)[0] for i in range(3)]
    assert batched == single and len({tuple(row) for row in batched}) > 1
    both = d.label_logprobs(vectors, contexts, LABELS[:3])
    alone = [d.label_logprobs(vectors[i : i + 1], contexts[i : i + 1], LABELS[i : i + 1])[0] for i in range(3)]
    np.testing.assert_allclose(both, alone, rtol=1e-4)


@pytest.mark.integration
def test_smol_describer_trains_saves_and_describes(smol, tmp_path):
    """On SmolLM2: a few steps on real gradients lower the label loss; the checkpoint answers `describe`."""
    from gradsense.gradients import activation_gradients
    from gradsense.projector import describe
    from gradsense.scoring import target_text

    model, tok = smol
    items = [
        {"id": "fr", "prompt": "The capital of France is", "right": "Paris"},
        {"id": "hastings", "prompt": "The Battle of Hastings took place in the year", "right": "1066"},
        {"id": "insulin", "prompt": "Insulin is produced by the", "right": "pancreas"},
        {"id": "violin", "prompt": "The violin has four", "right": "strings"},
    ]
    labels = [
        "domain: geography | from: <none> | to: Paris\nThe update pushes this geography answer towards Paris.",
        "domain: history | from: <none> | to: 1\nThe update pushes this history answer towards 1.",
        "domain: biology | from: <none> | to: pancreas\nThe update pushes this biology answer towards pancreas.",
        "domain: music | from: <none> | to: strings\nThe update pushes this music answer towards strings.",
    ]
    g = activation_gradients(
        model, tok, [it["prompt"] for it in items], [target_text(it["right"]) for it in items], [15], progress=False
    ).grads[0]
    config = DescriberConfig(source_layer=15, inject_layer=20, k=4)
    train = TrainConfig(steps=6, batch_size=4, lr=4e-3, control_share=0.0, context_share=0.0, max_label_tokens=16)
    d, curve = train_projector(model, tok, g, labels, config, train, progress=False)
    assert curve["loss"].iloc[-2:].mean() < curve["loss"].iloc[:2].mean()
    save_checkpoint(d, tmp_path / "ckpt", model_name=None)
    loaded = load_describer(tmp_path / "ckpt", model, tok)
    out = describe(items[:2], describer=loaded, max_new_tokens=8)
    assert [r["id"] for r in out] == ["fr", "hastings"] and all(
        set(r) == {"id", "description", "domain", "from", "to"} for r in out
    )
    assert all(r["domain"] and r["from"] and r["to"] for r in out), out  # structured decoding: every field parsed


def test_structured_decoding_always_yields_a_parsed_head():
    """Structured decoding gives the field names and lets the model say each value: every field parses, each value
    is greedy (the same tokens as free decoding after the same prefix) and the sentence budget is respected."""
    from gradsense.teacher import parse_label

    model, tok = tiny_llama(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    d = describer(model, tok)
    vectors = d.projector(torch.as_tensor(grads(3))).detach()
    contexts = [None, "A passage.", None]
    heads = d.generate(vectors, contexts, max_new_tokens=0)
    for head in heads:  # every value the model said is the parsed field (an empty value parses as None)
        said = re.fullmatch(r"domain:(.*) \| from:(.*) \| to:(.*)", head, re.S).groups()
        expected = [v.strip() or None for v in said]
        expected[0] = expected[0].lower() if expected[0] else None
        assert [parse_label(head)[k] for k in ("domain", "from", "to")] == expected or "|" in "".join(said), head
    assert all(h.startswith("domain:") and " | from:" in h and " | to:" in h and "\n" not in h for h in heads)
    said = [[] for _ in contexts]  # the reference: each field with HF generate after the head so far
    for lead in FIELD_LEADS:
        said = [row + tok(lead, add_special_tokens=False)["input_ids"] for row in said]
        values = d.generate_ids(vectors, contexts, FIELD_TOKENS, said, d.field_stops(), min_new_tokens=1)
        said = [row + value for row, value in zip(said, values)]
    assert [tok.decode(row, skip_special_tokens=True).strip() for row in said] == heads
    with_sentence = d.generate(vectors, contexts, max_new_tokens=5)
    assert [s.split("\n")[0] for s in with_sentence] == heads


def test_training_items_variant_configs_and_untrained_projector(tiny):
    from gradsense.projector import training_items, untrained_describer, variant_configs

    table = pd.DataFrame(
        {
            "id": list("abcdef"),
            "domain": ["x", "x", "y", "y", "held", "x"],
            "split": ["train", "val", "train", "train", "train", "train"],
            "template_split": ["train", "train", "train", "heldout", "train", "train"],
            "label": ["l", "l", "l", "l", "l", None],
        }
    )
    train, val = training_items(table, "held")
    assert list(train["id"]) == ["a", "c"] and list(val["id"]) == ["b"]
    meta = {"config": asdict(config()), "train": asdict(TrainConfig(steps=7))}
    cfg, tr = variant_configs(meta, {"mode": "raw", "seed": 3})
    assert cfg.mode == "raw" and tr.seed == 3 and tr.steps == 7 and cfg.k == config().k
    with pytest.raises(GradsenseError, match="unknown describer setting 'colour'"):
        variant_configs(meta, {"colour": "red"})
    model, tok = tiny
    d = describer(model, tok)
    fresh = untrained_describer(d, seed=1)
    assert fresh.model is d.model and fresh.config == d.config
    assert not torch.equal(fresh.projector.net.weight, d.projector.net.weight)
    assert torch.equal(fresh.projector.net.weight, untrained_describer(d, seed=1).projector.net.weight)
