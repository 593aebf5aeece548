"""Shared fixtures: a tiny random Llama for unit tests, the real SmolLM2 (session-scoped) for integration tests."""

import pytest

from gradsense.models import load_model

from tiny_model import tiny_llama


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 4-block random Llama with a byte tokenizer; no download."""
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def _smol():
    return load_model(None, device="cpu")


@pytest.fixture
def smol(request, _smol):
    """(model, tokenizer): the real SmolLM2-135M-Instruct from data/ (run `make data` first); integration tests only."""
    if request.node.get_closest_marker("integration") is None:
        pytest.fail("a test that loads the real model needs @pytest.mark.integration (it needs data/)")
    return _smol


@pytest.fixture(autouse=True)
def _no_data_for_unit_tests(request, monkeypatch, tmp_path_factory):
    """Unit tests see no data/ (GRADSENSE_DATA points at an empty folder), so one that needs it must be marked."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("GRADSENSE_DATA", str(tmp_path_factory.mktemp("no-data")))
