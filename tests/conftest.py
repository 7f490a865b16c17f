"""Shared fixtures: a tiny random Llama + character tokenizer (no download), the GENIES path."""

from __future__ import annotations

from pathlib import Path

import pytest

GENIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "genies"


def pytest_configure(config):
    """One torch thread: the tiny models gain nothing from two, and on a shared 2-core
    machine two threads per process thrash (observed: 3 s instead of 30 ms per backward)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _test_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reprpo-cache")


@pytest.fixture(autouse=True)
def _cache(request, monkeypatch, _test_cache):
    """Default tests keep their tiny models in a temp cache, not the user's. Slow tests use the
    real cache, so the SmolLM2 conversion happens once per machine, not once per run."""
    if "slow" not in request.node.keywords:
        monkeypatch.setenv("REPRPO_CACHE", str(_test_cache))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): 2-layer Llama, width 64, character tokenizer with a chat template."""
    import torch

    from reprpo.model.tiny import build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def genies_dir():
    if not GENIES.is_dir():
        pytest.skip(f"GENIES data not found at {GENIES}")
    return GENIES


@pytest.fixture(scope="module")
def lora(tiny):
    """(LoRA model (r 4) with random small B so policy != reference, tokenizer); per test module."""


    from reprpo.config import RunConfig, apply_overrides

    model0, tok = tiny
    cfg = apply_overrides(RunConfig(), {"lora.r": 4}, where="t")
    return random_lora(model0, cfg), tok


def random_lora(model0, cfg):
    """A LoRA (seed 0) on a copy of `model0` with LoRA-B ~ N(0, 0.02²), so policy != reference
    and LoRA-A gets gradients; in train mode."""
    import copy

    import torch

    from reprpo.train import make_lora

    torch.manual_seed(0)
    model = make_lora(copy.deepcopy(model0), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model
