"""Adapters that travel (issue 13.4): a copied run loads elsewhere, its base is fingerprinted,
its README is a real model card, and `reprpo export` writes merged and clean adapter folders.

"Elsewhere" is a fresh REPRPO_CACHE, the training cache deleted, another working directory.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from reprpo.cli import main
from reprpo.config import ModelConfig
from reprpo.errors import ReprpoError
from reprpo.model.loading import load_model
from reprpo.model.tiny import build_tiny_model

# lr 1e-2: two steps move the logits by more than the 1e-5 the merged-model check resolves
TRAIN = ["--data.n_train", "8", "--data.n_eval", "4", "--train.max_steps", "2", "--train.batch_size", "2",
         "--train.lr", "1e-2", "--train.progress", "false"]
IDS = torch.tensor([[1, 40, 41, 42, 13, 20, 5, 50, 51, 2]])  # (1, t) token ids of the tiny vocabulary


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """No Hub look-ups: a name transformers cannot find fails at once instead of retrying for a minute."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _offline):
    """(run dir, argv): a tiny-random run trained (and evaluated) through the CLI, with the argv a
    shell gives, in a cache deleted afterwards. Tests copy it; none changes it."""
    root = tmp_path_factory.mktemp("export")
    run, cache = root / "run", root / "cache-train"
    argv = ["train", "--model.name", "tiny-random", *TRAIN, "--out", str(run)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPRPO_CACHE", str(cache))
        mp.setattr(sys, "argv", ["reprpo", *argv])
        assert main(argv) == 0
    shutil.rmtree(cache)
    return run, argv


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits  # (1, t, v)


def test_copied_run_evaluates_elsewhere(trained, tmp_path, monkeypatch, capsys):
    """adapter_config.json names the base as the user did; a copy evaluates with a fresh cache and
    the card is refreshed from the new RUN/eval.
    today: base_model_name_or_path is the training cache's tiny-random directory (now deleted)."""
    run, argv = trained
    copy = Path(shutil.copytree(run, tmp_path / "elsewhere" / "run"))
    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "cache-new"))
    assert json.loads((copy / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"
    from reprpo.card import write_card

    shutil.rmtree(copy / "eval")
    write_card(copy)
    assert "Not evaluated yet" in (copy / "README.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(copy)]) == 0
    assert "different base model" not in capsys.readouterr().err  # tiny-random rebuilt: the same weights
    card = (copy / "README.md").read_text()
    assert (copy / "eval" / "summary.md").read_text().strip() in card
    assert "reprpo " + shlex.join(argv) in card  # the training command survives the refresh (reprpo.json)


def test_card_holds_method_data_lora_command_and_eval(trained):
    """README.md: preset and formula, data source and counts, steps, seed, LoRA, eval table, command.
    today: it is PEFT's empty template ("[More Information Needed]", base_model a cache path)."""
    run, argv = trained
    card = (run / "README.md").read_text()
    assert "More Information Needed" not in card and "cache-train" not in card
    assert "preset `dpo`" in card and "−log σ(βρ)" in card  # dpo's formula, from its registry entry
    assert "builtin:arith/train: 8 pairs" in card  # the training source and its counts
    assert "steps 2" in card and "seed 1" in card and "LoRA: r 16, alpha 16" in card
    assert (run / "eval" / "summary.md").read_text().strip() in card
    assert "```\nreprpo " + shlex.join(argv) + "\n```" in card


def test_other_base_weights_warn(trained, tmp_path, capsys):
    """An adapter loaded onto other weights warns on stderr, naming both fingerprints and names.
    today: no fingerprint is recorded and the adapter loads onto any base of the right shape, silently."""
    from reprpo.model.refcache import model_fingerprint

    run, _ = trained
    want = json.loads((run / "reprpo.json").read_text())["base_fingerprint"]
    other = tmp_path / "other-base"
    build_tiny_model(other, seed=1)  # same architecture, other weights
    model, _ = load_model(ModelConfig(name=str(other)), adapter=run)
    err = capsys.readouterr().err
    assert "the adapter was trained on a different base model" in err
    assert want in err and model_fingerprint(model) in err and want != model_fingerprint(model)
    assert "'tiny-random'" in err and str(other) in err
    load_model(ModelConfig(name="tiny-random"), adapter=run)  # the base it was trained on: silent
    assert "different base model" not in capsys.readouterr().err


def test_export_merged_matches_base_plus_adapter(trained, tmp_path):
    """--merged OUT loads with AutoModelForCausalLM alone and gives base + adapter's logits.
    today: there is no reprpo.export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reprpo.export import export_run

    run, _ = trained
    out = tmp_path / "merged"
    assert export_run(run, merged=out) == [out]
    merged = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    peft_model, _ = load_model(ModelConfig(name="tiny-random"), adapter=run, device="cpu")
    want = _logits(peft_model)
    with peft_model.disable_adapter():
        base = _logits(peft_model)
    assert (_logits(merged) - want).abs().max() < 1e-5
    assert (want - base).abs().max() > 1e-3  # the adapter moves the logits: the check above can fail
    assert not any(out.glob("adapter_*")) and not (out / "method_state.pt").exists()
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_export_adapter_is_a_clean_peft_folder(trained, tmp_path):
    """--adapter OUT: adapter, config (portable base name), tokenizer, reprpo.json, card; nothing of
    the run's bookkeeping, no method state.
    today: there is no reprpo.export."""
    from reprpo.export import export_run

    run, _ = trained
    out = tmp_path / "adapter"
    export_run(run, adapter=out)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "README.md", "reprpo.json"} <= names
    assert not names & {"config.yaml", "metrics.csv", "train_report.json", "method_state.pt", "eval", "tb", "checkpoints", ".lock"}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"
    mc = ModelConfig(name="tiny-random")
    assert torch.equal(_logits(load_model(mc, adapter=out)[0]), _logits(load_model(mc, adapter=run)[0]))


def test_export_refuses_a_non_empty_directory(trained, tmp_path):
    """A non-empty OUT is an error naming it; nothing is written (not even the other, empty OUT).
    today: there is no reprpo.export."""
    from reprpo.export import export_run

    run, _ = trained
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    for kw in ({"merged": full}, {"adapter": full}, {"adapter": tmp_path / "new", "merged": full}):
        with pytest.raises(ReprpoError, match=f"{full}: exists and is not empty; nothing was written"):
            export_run(run, **kw)
    assert [p.name for p in full.iterdir()] == ["keep.txt"] and (full / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no `new`, no temporary folder


def test_autopeft_loads_a_copied_run_of_a_local_checkpoint(tmp_path, monkeypatch):
    """A local base named by a relative path is recorded as its absolute path: transformers alone
    (AutoPeftModelForCausalLM) loads a copy of the run from another working directory.
    today: "base-ckpt" is recorded as typed, which elsewhere transformers takes for a Hub id."""
    from peft import AutoPeftModelForCausalLM

    from reprpo.model.loading import portable_name

    monkeypatch.chdir(tmp_path)
    build_tiny_model(tmp_path / "base-ckpt")
    assert main(["train", "--model.name", "base-ckpt", *TRAIN, "--eval.after_train", "false", "--out", "run"]) == 0
    (tmp_path / "elsewhere").mkdir()
    copy = Path(shutil.copytree("run", tmp_path / "elsewhere" / "run"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    recorded = json.loads((copy / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "base-ckpt").resolve())
    assert "must exist" in (copy / "README.md").read_text()
    model = AutoPeftModelForCausalLM.from_pretrained(copy)
    ours, _ = load_model(ModelConfig(name=recorded), adapter=copy)
    assert torch.equal(_logits(model), _logits(ours))
    assert [portable_name(n) for n in ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", "tiny-random")] == [
        "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", "tiny-random"]


def test_reprpo_eval_finds_a_relative_local_base_from_another_directory(tmp_path, monkeypatch, capsys):
    """`--model.name base-ckpt` (relative) is kept absolute in the run's config.yaml, so `reprpo
    eval COPY` from another working directory finds the base. today: config.yaml kept
    "base-ckpt", which from elsewhere is no directory (and looks like a Hub id)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    build_tiny_model(tmp_path / "base-ckpt")
    assert main(["train", "--model.name", "base-ckpt", *TRAIN, "--eval.after_train", "false", "--out", "run"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["name"] == str((tmp_path / "base-ckpt").resolve())
    (tmp_path / "elsewhere").mkdir()
    copy = Path(shutil.copytree("run", tmp_path / "elsewhere" / "run"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["--quiet", "eval", str(copy), "--data.n_eval", "4"]) == 0
    assert "| test |" in capsys.readouterr().out
