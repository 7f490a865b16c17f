import os
import subprocess
import sys

import pandas as pd
import pytest

from reprpo.cli import main


def _run(args, tmp_path, **kw):
    env = os.environ | {"REPRPO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "reprpo.cli", *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_train_then_eval_round_trip_in_subprocess(tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name: tiny-random}\ndata: {n_train: 8, n_eval: 6}\ntrain: {max_steps: 2, lr: 0.01, progress: false}\n")
    r = _run(["train", "dpo", "--config", str(cfg), "--train.batch_size", "2", "--out", str(run)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| split |" in r.stdout and "| oos |" in r.stdout
    saved = (run / "config.yaml").read_text()
    assert "batch_size: 2" in saved and "name: tiny-random" in saved  # CLI over YAML over defaults

    r = _run(["eval", str(run), "--data.n_eval", "4", "--eval.per_pair_format", "csv", "--out", str(tmp_path / "ev")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    per = pd.read_csv(tmp_path / "ev" / "per_pair.csv")
    assert set(per.split) == {"train", "test", "oos", "rnd"} and set(per.model) == {"base", "adapter"}
    assert len(per) == 4 * 2 * 4
    summ = pd.read_csv(tmp_path / "ev" / "summary.csv")
    assert set(summ.columns) >= {"base_accuracy", "adapter_accuracy", "delta_pp", "ppl_ratio"}


def test_help_documents_every_field(capsys):
    import dataclasses

    from reprpo.config import RunConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    cfg = RunConfig()
    for sec in ("model", "data", "lora", "train", "eval"):
        for f in dataclasses.fields(getattr(cfg, sec)):
            assert f"--{sec}.{f.name}" in text


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--train.lr", "fast"], "train.lr"),
        (["train", "--data.max_prompt_length", "999"], "max_prompt_length"),
        (["train", "--config", "/nonexistent.yaml"], "not found"),
        (["train", "--model.name", "./no/such/model", "--eval.after_train", "false"], "not found"),
        (["data", "inspect", "/no/such/file.jsonl", "--model.name", "tiny-random"], "file.jsonl"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_trace(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("reprpo: error:") and needle in last
    assert "Traceback" not in err


def test_data_inspect_prints_percentiles(capsys):
    assert main(["data", "inspect", "builtin:arith/test", "--model.name", "tiny-random", "--data.max_length", "40", "--data.max_prompt_length", "30"]) == 0
    out = capsys.readouterr().out
    assert "p50" in out and "prompt" in out and "truncated" in out and "max_length=40" in out


def test_shifts_list(capsys):
    assert main(["shifts", "list"]) == 0
    assert "difficulty" in capsys.readouterr().out
