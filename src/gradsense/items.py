"""Items on the command line: read `{id, prompt, right, wrong?, context?}` JSONL, check them, take each item's
gradient (target = right) and `describe` it with a trained describer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gradsense.checkpoint import load_describer
from gradsense.decoding import structured_steps
from gradsense.describer import CONTROLS, Describer
from gradsense.errors import GradsenseError
from gradsense.files import read_jsonl
from gradsense.prompt import interpretation_ids
from gradsense.scoring import target_text, tokenize_prompt, tokenize_target

FIELDS = ("id", "description", "domain", "from", "to")  # one output record, in this order
BATCH_SIZE = 16  # descriptions per batch; the CLI shows progress bars for inputs longer than one batch


def read_items(path: str | Path) -> list[dict]:
    """Items from a JSONL file; a line that is not JSON is named by `files.read_jsonl`, and every malformed item is
    reported with its line number in one error."""
    path = Path(path)
    if not path.is_file():
        raise GradsenseError(f"input file {path} is missing")
    records = read_jsonl(path)
    numbers = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]  # as read_jsonl
    problems = [f"line {n}: {problem}" for n, item in zip(numbers, records) if (problem := item_problem(item))]
    if problems:
        raise GradsenseError(f"{path}: {len(problems)} malformed line(s): " + "; ".join(problems))
    if not records:
        raise GradsenseError(f"{path}: no items")
    return records


def item_problem(item: object) -> str | None:
    """Why an item is malformed (None when it is fine)."""
    if not isinstance(item, dict):
        return "not a JSON object"
    for key in ("id", "prompt", "right"):
        if key not in item:
            return f"missing field {key!r}"
    for key in ("prompt", "right"):
        if not isinstance(item[key], str) or not item[key].strip():
            return f"field {key!r} must be a non-empty string"
    for key in ("wrong", "context"):
        if item.get(key) is not None and not isinstance(item[key], str):
            return f"field {key!r} must be a string"
    return None


def check_lengths(describer: Describer, items: Sequence[Mapping], max_new_tokens: int) -> None:
    """Error naming the first item whose gradient pass (prompt + answer) or description (context + question +
    decoding) needs more positions than the model has (`max_position_embeddings`)."""
    limit = getattr(describer.model.config, "max_position_embeddings", None)
    if limit is None:
        return
    tok, decoded = describer.tokenizer, structured_steps(describer.tokenizer, max_new_tokens)
    for item in items:
        name = item["id"]
        gradient = len(tokenize_prompt(tok, item["prompt"], name)) + len(
            tokenize_target(tok, target_text(item["right"]), name)
        )
        described = len(interpretation_ids(tok, describer.config, item.get("context"))[0]) + decoded
        for what, n in (("prompt + answer", gradient), ("context + question + decoding", described)):
            if n > limit:
                raise GradsenseError(
                    f"item {name!r}: {what} is {n:,} tokens, over the model's context window of {limit:,} positions"
                )


def item_gradients(
    describer: Describer, items: Sequence[Mapping], batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """What the describer reads of each item's loss on `right`, from the original model at its source layer: (N, d)
    at the last prompt position, or (N, k, d) at each target-predicting position when `config.read` is "each"."""
    from gradsense.gradients import activation_gradients

    config = describer.config
    with describer.original_model():
        result = activation_gradients(
            describer.model,
            describer.tokenizer,
            [it["prompt"] for it in items],
            [target_text(it["right"]) for it in items],
            [config.source_layer],
            "each" if config.read == "each" else "last",
            batch_size,
            [it["id"] for it in items],
            progress=progress,
            slots=config.k,
        )
    return np.asarray(result.grads[0], dtype=np.float32)


def describe(
    items: Sequence[Mapping],
    checkpoint: str | Path | None = None,
    describer: Describer | None = None,
    control: str = "gradient",
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: int = 0,
    device: str = "auto",
    progress: bool = False,
    faithfulness: bool = False,
) -> list[dict]:
    """Describe the training pressure of each item `{id, prompt, right, wrong?, context?}` (target = right): returns
    `{id, description, domain, from, to}` per item (+ `roundtrip_cosine` with `faithfulness`: the cosine between the
    item's gradient and the gradient of (prompt → the described `to`), `baselines.roundtrip_cosines`). Controls:
    "none", "noise", "shuffle" (see `Describer.vectors`); `progress` shows tqdm bars (stderr)."""
    if control not in CONTROLS:
        raise GradsenseError(f"unknown control {control!r} (choose from {', '.join(CONTROLS)})")
    if control == "shuffle" and len(items) < 2:
        raise GradsenseError("the shuffle control needs at least two items (each gets another item's gradient)")
    for i, item in enumerate(items):
        problem = item_problem(item)
        if problem:
            raise GradsenseError(f"item {item.get('id', i) if isinstance(item, dict) else i}: {problem}")
    describer = describer or load_describer(checkpoint, device=device)
    check_lengths(describer, items, max_new_tokens)
    grads = item_gradients(describer, items, progress=progress)
    table = describer.describe_gradients(
        grads, [it.get("context") for it in items], control, seed, batch_size, max_new_tokens, progress=progress
    )
    # Unparsed fields are null (pandas turns None into NaN, which is not valid JSON).
    rows = table[list(FIELDS[1:])].astype(object).where(table.notna(), None).to_dict("records")
    if faithfulness:
        from gradsense.baselines import roundtrip_cosines
        from gradsense.gradients import last_position

        with describer.original_model():
            cosines = roundtrip_cosines(
                describer.model,
                describer.tokenizer,
                [it["prompt"] for it in items],
                [row["to"] for row in rows],
                last_position(grads),
                describer.config.source_layer,
            )
        for row, cos in zip(rows, cosines):
            row["roundtrip_cosine"] = None if np.isnan(cos) else round(float(cos), 4)
    return [{"id": item["id"], **row} for item, row in zip(items, rows)]


def summary_line(records: Sequence[Mapping], seconds: float) -> str:
    """One line on a finished run: items, seconds, how many of each head field parsed (and, with `--faithfulness`,
    the mean round-trip cosine over the items that have one)."""
    n = len(records)
    parsed = ", ".join(f"{field} {sum(r.get(field) is not None for r in records)}/{n}" for field in FIELDS[2:])
    line = f"{n} items described in {seconds:.1f} s; fields parsed: {parsed}"
    if any("roundtrip_cosine" in r for r in records):
        cosines = [r["roundtrip_cosine"] for r in records if r.get("roundtrip_cosine") is not None]
        mean = f"{np.mean(cosines):.3f}" if cosines else "n/a"
        line += f"; mean round-trip cosine {mean} ({len(cosines)}/{n})"
    return line
