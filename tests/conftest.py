"""Shared fixtures: a tiny random Llama for unit tests, the real SmolLM2 (session-scoped) for integration tests."""

import pytest

from gradsense.models import load_model, tiny_llama


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 4-block random Llama with a byte tokenizer; no download."""
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer): the real SmolLM2-135M-Instruct from data/ (run `make data` first)."""
    return load_model(None, device="cpu")
