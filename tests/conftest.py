"""Shared fixtures: a tiny random Llama + character tokenizer (no download), the GENIES path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GENIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "genies"


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Keep converted/tiny models of the default suite in a temp cache, not the user's.

    Slow tests reuse the real cache (the SmolLM2 conversion is done once per machine)."""
    if os.environ.get("REPRPO_TEST_REAL_CACHE"):
        yield
        return
    old = os.environ.get("REPRPO_CACHE")
    os.environ["REPRPO_CACHE"] = str(tmp_path_factory.mktemp("reprpo-cache"))
    yield
    if old is None:
        os.environ.pop("REPRPO_CACHE", None)
    else:
        os.environ["REPRPO_CACHE"] = old


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): 2-layer Llama, width 64, character tokenizer with a chat template."""
    import torch

    from reprpo.testing import build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def genies_dir():
    if not GENIES.is_dir():
        pytest.skip(f"GENIES data not found at {GENIES}")
    return GENIES
