"""Checkpoints: a trained projector (+ LoRA tensors) and its metadata in one folder, written atomically, loaded back
only onto the model it was trained for."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from gradsense.describer import Describer, DescriberConfig, add_lora, fingerprint, lora_state, new_projector
from gradsense.errors import GradsenseError
from gradsense.files import atomic_dir
from gradsense.models import REPO_ROOT
from gradsense.paths import Paths
from gradsense.training import TrainConfig

DEFAULT_CHECKPOINT = Paths(REPO_ROOT).checkpoint  # where the train stage writes it (the CLI's default)
FORMAT = "gradsense-projector/1"


def save_checkpoint(
    describer: Describer, directory: str | Path, model_name: str | None = None, extra: dict | None = None
) -> Path:
    """Write `projector.pt` (projector + LoRA tensors) and `meta.json` (model fingerprint, layers, settings) into
    `directory`, atomically (a temporary folder renamed into place)."""
    meta = {
        "format": FORMAT,
        "model_name": model_name,
        "fingerprint": fingerprint(describer.model),
        "d_model": describer.projector.d_model,
        "config": asdict(describer.config),
        **describer.meta,
        **(extra or {}),
    }
    with atomic_dir(directory) as tmp:
        state = {"projector": describer.projector.state_dict(), "lora": lora_state(describer.model)}
        torch.save(state, tmp / "projector.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=float) + "\n")
    return Path(directory)


def read_meta(directory: str | Path) -> dict:
    """The metadata of a checkpoint folder (one-line error when missing or unreadable)."""
    directory = Path(directory)
    meta_file, weights = directory / "meta.json", directory / "projector.pt"
    if not meta_file.is_file() or not weights.is_file():
        raise GradsenseError(
            f"checkpoint {directory} is missing (need meta.json and projector.pt; run `dvc repro train`)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise GradsenseError(
            f"checkpoint {directory}: meta.json is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    if meta.get("format") != FORMAT:
        raise GradsenseError(f"checkpoint {directory}: unknown format {meta.get('format')!r}")
    return meta


def load_describer(
    directory: str | Path | None = None,
    model: nn.Module | None = None,
    tokenizer=None,
    device: str = "auto",
    source_layer: int | None = None,
) -> Describer:
    """Rebuild a describer from a checkpoint: the model named in its metadata (or the one given, which must match the
    fingerprint), the projector and any LoRA adapters (inserted into the model in place)."""
    directory = Path(directory) if directory is not None else DEFAULT_CHECKPOINT
    meta = read_meta(directory)
    if model is None:
        from gradsense.models import load_model

        model, tokenizer = load_model(meta.get("model_name"), device=device)
    found, expected = fingerprint(model), meta["fingerprint"]
    if found != expected:
        diff = ", ".join(
            f"{k}={expected.get(k)} (model has {found.get(k)})" for k in expected if found.get(k) != expected.get(k)
        )
        raise GradsenseError(f"checkpoint {directory} was trained for another model: {diff}")
    config = DescriberConfig(**meta["config"])
    if source_layer is not None and source_layer != config.source_layer:
        raise GradsenseError(
            f"checkpoint {directory} reads gradients of layer {config.source_layer}, not layer {source_layer}"
        )
    state = torch.load(directory / "projector.pt", map_location="cpu", weights_only=True)
    projector = new_projector(meta["d_model"], config)
    projector.load_state_dict(state["projector"])
    projector.requires_grad_(False)
    if config.lora_rank > 0 and not any("lora_" in n for n, _ in model.named_parameters()):
        add_lora(model, config.lora_rank, config.lora_alpha, config.inject_layer)
    if state["lora"]:
        missing = set(state["lora"]) - set(model.state_dict())
        if missing:
            raise GradsenseError(f"checkpoint {directory}: LoRA tensors do not fit the model ({len(missing)} missing)")
        model.load_state_dict(state["lora"], strict=False)
        for _, p in model.named_parameters():
            p.requires_grad_(False)
    return Describer(model, tokenizer, projector, config, meta)


def variant_configs(meta: Mapping, overrides: Mapping | None = None) -> tuple[DescriberConfig, TrainConfig]:
    """The describer and training settings recorded in a checkpoint's metadata, with `overrides` (an ablation or
    another seed) replacing some of them; an unknown setting is an error."""
    config, train = dict(meta["config"]), dict(meta.get("train", {}))
    for key, value in (overrides or {}).items():
        if key in config:
            config[key] = value
        elif key in train:
            train[key] = value
        else:
            raise GradsenseError(f"unknown describer setting {key!r} (have {sorted(config) + sorted(train)})")
    return DescriberConfig(**config), TrainConfig(**train)
