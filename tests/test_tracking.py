"""Trackers (`train.report_to`) and evaluation during training (`train.eval_every`), issue 13.
Each test names what the code before it did ("today: ...")."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from reprpo.cli import main

TINY = ["--model.name", "tiny-random", "--data.n_train", "8", "--data.n_eval", "4", "--train.batch_size", "2",
        "--train.progress", "false", "--eval.after_train", "false", "--train.max_steps", "4"]


def test_eval_every_logs_eval_curves_and_changes_no_result(tmp_path):
    """`--train.eval_every 2 --train.eval_pairs 4`: rows of steps 2 and 4 carry eval/SPLIT/accuracy
    and eval/SPLIT/margin for every eval split (blank on the other steps); the adapter is bit
    for bit the one trained without it (scoring takes no gradient, no RNG, and restores train
    mode). The accuracy is the mean of correct over the 4 pairs: one of 0, .25, .5, .75, 1.
    Today: no such option (an unknown-field error)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--lora.dropout", "0.1", "--out", str(a)]) == 0
    assert main(["train", *TINY, "--lora.dropout", "0.1", "--train.eval_every", "2", "--train.eval_pairs", "4", "--out", str(b)]) == 0
    m = pd.read_csv(b / "metrics.csv")
    for split in ("train", "test", "oos", "rnd"):
        acc = m[f"eval/{split}/accuracy"]
        assert acc.isna().tolist() == [True, False, True, False]
        assert set(acc.dropna()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
        assert m[f"eval/{split}/margin"].notna().sum() == 2
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    base = pd.read_csv(a / "metrics.csv")
    assert base.drop(columns="sec_per_step").equals(m[base.columns].drop(columns="sec_per_step"))


def test_compare_keeps_eval_curves_and_generation_texts_in_the_report(tmp_path):
    """In `compare`, the in-training eval rows go to the curves table (blank steps left out) and
    the report plots them; the coherence check's generations are kept as text in
    RUN/generations.jsonl (base and adapter, one line each per prompt) and linked from the
    report. Today: no in-training evaluation; generations are thrown away."""
    import json

    from reprpo.experiments.report import load_frames, plot_curves, render_report

    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "dpo", "--shifts", "difficulty", "--seeds", "1", "--model.name", "tiny-random",
                 "--n-train", "8", "--n-eval", "4", "--steps", "4", "--train.batch_size", "2", "--train.progress", "false",
                 "--train.eval_every", "2", "--train.eval_pairs", "4", "--no-report", "--out", str(out)]) == 0
    con = sqlite3.connect(out / "results.sqlite")
    steps = [s for (s,) in con.execute("SELECT step FROM curves WHERE key = 'eval/test/accuracy' ORDER BY step")]
    con.close()
    assert steps == [2, 4]
    import matplotlib

    matplotlib.use("Agg")
    assert plot_curves(load_frames(out / "results.sqlite"), tmp_path / "curves.png")
    gens_file, = out.glob("*/generations.jsonl")
    gens = [json.loads(line) for line in gens_file.read_text().splitlines()]
    assert [g["model"] for g in gens] == ["base"] * 4 + ["adapter"] * 4
    assert all(isinstance(g["text"], str) and g["prompt"] for g in gens)
    md = render_report(out / "results.sqlite", out / "report")
    assert f"[dpo seed 1](../{gens_file.parent.name}/generations.jsonl)" in md
    assert f'<a href="../{gens_file.parent.name}/generations.jsonl">dpo seed 1</a>' in (out / "report" / "report.html").read_text()


def test_report_to_none_writes_no_tensorboard_and_bad_names_are_refused(tmp_path, capsys):
    """`--train.report_to none`: metrics.csv only (it is always written), no tb/. An unknown
    tracker is a config error naming the field. Today: tb/ always, no such option."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--train.report_to", "none", "--out", str(out)]) == 0
    assert (out / "metrics.csv").is_file() and not (out / "tb").exists()
    assert main(["train", *TINY, "--train.report_to", "tensorboard,mlflow", "--out", str(tmp_path / "x")]) == 2
    assert "train.report_to: unknown tracker(s) 'mlflow'" in capsys.readouterr().err


def test_wandb_missing_is_a_clear_error_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """Without the wandb package, `--train.report_to wandb` says how to install it, before any
    model loads. Today: no such option."""
    import reprpo.model.loading as loading
    import reprpo.train as t

    monkeypatch.setattr(t.importlib.util, "find_spec", lambda name: None if name == "wandb" else importlib.util.find_spec(name))
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["train", *TINY, "--train.report_to", "wandb", "--out", str(tmp_path / "run")]) == 2
    assert "pip install 'reprpo[wandb]'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install 'reprpo[wandb]')")
def test_wandb_offline_run_logs_without_network(tmp_path):
    """`--train.report_to wandb` with no WANDB_MODE: an offline wandb run under OUT/wandb holding
    the metrics (its record file names them), no network, nothing printed by wandb but one line
    of ours. Today: no such option."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "REPRPO_CACHE": os.environ.get("REPRPO_CACHE", str(tmp_path / "cache")), "WANDB_DIR": str(tmp_path / "wandb-home")}
    r = subprocess.run([sys.executable, "-m", "reprpo.cli", "train", *TINY, "--train.report_to", "wandb,csv", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wandb (offline): {out / 'wandb'}" in r.stderr
    assert not [line for line in r.stderr.splitlines() if line.startswith("wandb:")]
    records = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1 and b"rewards/margin" in records[0].read_bytes()
    assert (out / "metrics.csv").is_file() and not (out / "tb").exists()


def test_eval_every_scores_a_slice_of_the_final_eval_pairs(tiny):
    """`train.eval_pairs` (16) above `data.n_eval` (4): the in-training eval scores the 4 pairs
    the final table scores, so its curves and the table agree at the end. Found by a probe:
    16 pairs scored during training vs 4 in the table."""
    from reprpo.config import RunConfig, apply_overrides
    from reprpo.train import TrainingEval

    model, tok = tiny
    cfg = apply_overrides(RunConfig(), {"model.name": "tiny-random", "data.n_eval": 4, "train.eval_every": 1}, where="test")
    ev = TrainingEval(cfg, tok, model, device_type="cpu")
    assert {k: len(v) for k, v in ev.splits.items()} == {"train": 4, "test": 4, "oos": 4, "rnd": 4}
