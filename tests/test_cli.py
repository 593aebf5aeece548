"""`gradsense describe` end to end on a projector trained (briefly) for the tiny Llama, saved as a model folder."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradsense.items
from gradsense.checkpoint import save_checkpoint
from gradsense.cli import main
from gradsense.describer import DescriberConfig
from gradsense.items import BATCH_SIZE
from gradsense.training import TrainConfig, train_projector

from tiny_model import tiny_llama

ITEMS = [
    {"id": "paris", "prompt": "The capital of France is", "right": "Paris", "wrong": "London"},
    {
        "id": "hastings",
        "prompt": "The Battle of Hastings took place in the year",
        "right": "1066",
        "context": "The cell divides.",
    },
    {"id": 3, "prompt": "Insulin is produced by the", "right": "pancreas"},
]
FIELDS = ("id", "description", "domain", "from", "to")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint whose metadata names a saved tiny model folder, so the CLI loads everything by itself. The model's
    weights are large enough that its greedy tokens depend on what is injected."""
    root = tmp_path_factory.mktemp("cli")
    model, tok = tiny_llama(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    grads = np.random.default_rng(0).standard_normal((6, model.config.hidden_size)).astype(np.float32)
    labels = [f"domain: {d} | from: a | to: b\nA push." for d in ("geography", "history", "biology") * 2]
    config = DescriberConfig(source_layer=1, inject_layer=2, k=2)
    describer, _ = train_projector(
        model, tok, grads, labels, config, TrainConfig(steps=2, batch_size=3), progress=False
    )
    return save_checkpoint(describer, root / "checkpoint", model_name=str(root / "model"))


def write_items(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def run(checkpoint, tmp_path, *flags, items=ITEMS, name="out.jsonl"):
    """Exit code and the output records of `describe --input … --output …` with `flags`."""
    out = tmp_path / name
    args = [
        "describe",
        "--input",
        str(write_items(tmp_path / "in.jsonl", items)),
        "--output",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--max-new-tokens",
        "6",
        *flags,
    ]
    code = main(args)
    strict = {"parse_constant": lambda c: pytest.fail(f"invalid JSON constant {c}")}  # NaN is not JSON
    return code, [json.loads(line, **strict) for line in out.read_text().splitlines()] if out.exists() else None


def test_describe_jsonl_writes_every_field_in_order(checkpoint, tmp_path, capsys):
    code, records = run(checkpoint, tmp_path)
    assert code == 0, capsys.readouterr().err
    assert [r["id"] for r in records] == ["paris", "hastings", 3]
    assert all(tuple(r) == FIELDS and r["description"].startswith("domain:") for r in records)
    assert all(r[k] is None or isinstance(r[k], str) for r in records for k in ("domain", "from", "to"))
    printed = capsys.readouterr()
    assert "3 descriptions written" in printed.out
    assert "describe (" not in printed.err and "activation gradients" not in printed.err  # one batch: no bars
    summary = printed.err.strip().splitlines()[-1]  # on stderr
    assert summary.startswith("3 items described in ") and summary.endswith(
        "fields parsed: domain 3/3, from 3/3, to 3/3"
    )


def test_a_long_input_shows_progress_bars_then_one_summary_line(checkpoint, tmp_path, capsys):
    items = [{"id": i, "prompt": f"Fact number {i} is", "right": "x"} for i in range(BATCH_SIZE + 1)]
    code, records = run(checkpoint, tmp_path, "--faithfulness", items=items)
    assert code == 0 and len(records) == BATCH_SIZE + 1
    err = capsys.readouterr().err
    assert "activation gradients" in err and "describe (gradient)" in err  # more than one batch: tqdm on stderr
    n = len(records)
    parsed = ", ".join(f"{k} {sum(r[k] is not None for r in records)}/{n}" for k in ("domain", "from", "to"))
    cosines = [r["roundtrip_cosine"] for r in records if r["roundtrip_cosine"] is not None]
    tail = f"fields parsed: {parsed}; mean round-trip cosine {np.mean(cosines):.3f} ({len(cosines)}/{n})"
    assert re.fullmatch(rf"{n} items described in \d+\.\d s; " + re.escape(tail), err.strip().splitlines()[-1])


def test_the_injection_reaches_the_model_and_the_controls_change_it(checkpoint, tmp_path):
    _, injected = run(checkpoint, tmp_path, name="injected.jsonl")
    _, again = run(checkpoint, tmp_path, name="again.jsonl")
    _, none = run(checkpoint, tmp_path, "--no-inject", name="none.jsonl")
    _, noise = run(checkpoint, tmp_path, "--noise", name="noise.jsonl")
    _, shuffled = run(checkpoint, tmp_path, "--shuffle", name="shuffle.jsonl")
    text = {
        name: [r["description"] for r in rows]
        for name, rows in {
            "injected": injected,
            "again": again,
            "none": none,
            "noise": noise,
            "shuffle": shuffled,
        }.items()
    }
    assert text["again"] == text["injected"]  # greedy: the same input says the same thing
    assert text["none"] != text["injected"] and text["noise"] != text["injected"]
    assert text["shuffle"] != text["injected"]
    assert text["none"][0] == text["none"][2]  # without injection, two items without context read the same prompt
    assert text["injected"][0] != text["injected"][2]  # with it, their gradients make the difference


def test_faithfulness_adds_the_round_trip_cosine(checkpoint, tmp_path):
    from gradsense.baselines import roundtrip_cosines
    from gradsense.checkpoint import load_describer
    from gradsense.items import item_gradients

    _, plain = run(checkpoint, tmp_path, name="plain.jsonl")
    _, faithful = run(checkpoint, tmp_path, "--faithfulness", name="faithful.jsonl")
    assert [{k: r[k] for k in FIELDS} for r in faithful] == plain  # the same descriptions, one field more
    # The field is the cosine of each item's gradient with the gradient of (prompt → its described `to`).
    describer = load_describer(checkpoint)
    grads = item_gradients(describer, ITEMS)
    want = roundtrip_cosines(
        describer.model, describer.tokenizer, [it["prompt"] for it in ITEMS], [r["to"] for r in plain], grads, 1
    )
    got = [r["roundtrip_cosine"] for r in faithful]
    assert all(g is None for g, w in zip(got, want) if np.isnan(w))
    np.testing.assert_allclose([g for g in got if g is not None], want[~np.isnan(want)], atol=1e-4)


def test_describe_one_prompt_prints_its_description(checkpoint, tmp_path, capsys):
    single = [
        "describe",
        "--prompt",
        ITEMS[0]["prompt"],
        "--right",
        "Paris",
        "--wrong",
        "London",
        "--checkpoint",
        str(checkpoint),
        "--max-new-tokens",
        "6",
    ]
    assert main(single) == 0
    printed = capsys.readouterr().out
    _, records = run(checkpoint, tmp_path, items=ITEMS[:1])
    assert printed == records[0]["description"] + "\n"  # the same item, the same description
    assert main([*single, "--context", "The kettle boiled."]) == 0
    assert capsys.readouterr().out != printed  # the context passage is read


def test_malformed_lines_are_named_and_no_output_is_written(checkpoint, tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text(
        json.dumps(ITEMS[0])
        + "\n"
        + json.dumps({"id": "x", "prompt": "", "right": "a"})
        + "\n"
        + json.dumps({"id": "y", "prompt": "p"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert main(["describe", "--input", str(bad), "--output", str(out), "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "2 malformed line(s)" in err and "line 2: field 'prompt'" in err and "line 3: missing field 'right'" in err
    assert len(err.strip().splitlines()) == 1
    bad.write_text(json.dumps(ITEMS[0]) + "\n{oops\n")
    assert main(["describe", "--input", str(bad), "--output", str(out), "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_an_output_folder_that_cannot_be_made_fails_before_any_computation(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gradsense.items, "describe", lambda *a, **k: pytest.fail("the describer ran"))
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "sub" / "out.jsonl"
    items = str(write_items(tmp_path / "in.jsonl", ITEMS))
    assert main(["describe", "--input", items, "--output", str(out), "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gradsense: error: cannot create the folder of") and str(out) in err
    assert len(err.strip().splitlines()) == 1


def test_a_prompt_longer_than_the_context_window_is_named(checkpoint, tmp_path, capsys):
    long = {"id": "essay", "prompt": "word " * 300, "right": "x"}  # the tiny model has 256 positions
    code, records = run(checkpoint, tmp_path, items=[ITEMS[0], long])
    err = capsys.readouterr().err.splitlines()[-1]  # after the model loader's progress bar
    assert code == 1 and records is None
    assert (
        err
        == "gradsense: error: item 'essay': prompt + answer is 1,502 tokens, over the model's context window of 256 positions"
    )


def test_bad_checkpoints_and_arguments(checkpoint, tmp_path, capsys):
    items = str(write_items(tmp_path / "in.jsonl", ITEMS[:1]))
    out = str(tmp_path / "o.jsonl")
    assert main(["describe", "--input", items, "--output", out, "--checkpoint", str(tmp_path / "none")]) == 1
    assert "missing" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["fingerprint"]["d_model"] = 999  # a projector trained for another model
    (other / "meta.json").write_text(json.dumps(meta))
    (other / "projector.pt").write_bytes((checkpoint / "projector.pt").read_bytes())
    assert main(["describe", "--input", items, "--output", out, "--checkpoint", str(other)]) == 1
    assert "another model" in capsys.readouterr().err
    assert main(["describe", "--prompt", "x", "--checkpoint", str(checkpoint)]) == 1  # no --right
    assert "give either" in capsys.readouterr().err
    assert main(["describe", "--input", items, "--checkpoint", str(checkpoint)]) == 1  # no --output
    assert "give either" in capsys.readouterr().err
    assert (
        main(["describe", "--shuffle", "--prompt", "The sky is", "--right", "blue", "--checkpoint", str(checkpoint)])
        == 1
    )
    assert "at least two" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_console_script_runs(checkpoint):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradsense.cli",
            "describe",
            "--prompt",
            "The sky is",
            "--right",
            "blue",
            "--checkpoint",
            str(checkpoint),
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.startswith("domain:"), done.stderr
