"""`gradsense describe` end to end on a projector trained (briefly) for the tiny Llama, saved as a model folder."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gradsense.cli import main
from gradsense.models import tiny_llama
from gradsense.projector import DescriberConfig, TrainConfig, save_checkpoint, train_projector

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
FIELDS = {"id", "description", "domain", "from", "to"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint whose metadata names a saved tiny model folder, so the CLI loads everything by itself."""
    root = tmp_path_factory.mktemp("cli")
    model, tok = tiny_llama(seed=0)
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


def test_describe_jsonl_writes_every_field(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code = main(
        [
            "describe",
            "--input",
            str(write_items(tmp_path / "in.jsonl", ITEMS)),
            "--output",
            str(out),
            "--checkpoint",
            str(checkpoint),
            "--max-new-tokens",
            "6",
        ]
    )
    assert code == 0, capsys.readouterr().err
    strict = {"parse_constant": lambda c: pytest.fail(f"invalid JSON constant {c}")}  # NaN is not JSON
    records = [json.loads(line, **strict) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["paris", "hastings", 3]
    assert all(set(r) == FIELDS and isinstance(r["description"], str) for r in records)
    # a tiny untrained describer rarely writes the head: its unparsed fields are null, never NaN
    assert all(r[k] is None or isinstance(r[k], str) for r in records for k in ("domain", "from", "to"))
    assert "3 descriptions written" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--no-inject", "--noise", "--shuffle"])
def test_describe_controls(checkpoint, tmp_path, flag):
    out = tmp_path / "out.jsonl"
    args = [
        "describe",
        "--input",
        str(write_items(tmp_path / "in.jsonl", ITEMS)),
        "--output",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--max-new-tokens",
        "4",
        flag,
    ]
    assert main(args) == 0 and len(out.read_text().splitlines()) == len(ITEMS)


def test_describe_one_prompt_prints_the_description(checkpoint, capsys):
    code = main(
        [
            "describe",
            "--prompt",
            "The capital of France is",
            "--right",
            "Paris",
            "--wrong",
            "London",
            "--context",
            "The kettle boiled.",
            "--checkpoint",
            str(checkpoint),
            "--max-new-tokens",
            "4",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and captured.out.endswith("\n") and "error" not in captured.err


def test_malformed_lines_are_named_and_no_output_is_written(checkpoint, tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text(json.dumps(ITEMS[0]) + "\n{oops\n" + json.dumps({"id": "x", "prompt": "", "right": "a"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["describe", "--input", str(bad), "--output", str(out), "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "line 2" in err and "line 3" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_bad_checkpoints_and_arguments(checkpoint, tmp_path, capsys):
    items = str(write_items(tmp_path / "in.jsonl", ITEMS[:1]))
    assert (
        main(
            [
                "describe",
                "--input",
                items,
                "--output",
                str(tmp_path / "o.jsonl"),
                "--checkpoint",
                str(tmp_path / "none"),
            ]
        )
        == 1
    )
    assert "missing" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["fingerprint"]["d_model"] = 999  # a projector trained for another model
    (other / "meta.json").write_text(json.dumps(meta))
    (other / "projector.pt").write_bytes((checkpoint / "projector.pt").read_bytes())
    assert main(["describe", "--input", items, "--output", str(tmp_path / "o.jsonl"), "--checkpoint", str(other)]) == 1
    assert "another model" in capsys.readouterr().err
    assert main(["describe", "--prompt", "x", "--checkpoint", str(checkpoint)]) == 1  # no --right
    assert (
        main(["describe", "--shuffle", "--prompt", "The sky is", "--right", "blue", "--checkpoint", str(checkpoint)])
        == 1
    )
    assert "at least two" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_console_script_runs(checkpoint, tmp_path):
    gradsense = [sys.executable, "-m", "gradsense.cli"]
    done = subprocess.run(
        [
            *gradsense,
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
    assert done.returncode == 0, done.stderr
