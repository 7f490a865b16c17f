"""Faults must never become results (issue 12): checkpoint/resume, the non-finite guard, locked
and clean run directories. Each test names what the code before it did ("today: ...")."""

from __future__ import annotations

import copy
import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reprpo.cli import main
from reprpo.config import RunConfig, apply_overrides
from reprpo.data.pairs import PreferencePair
from reprpo.data.tokenize import tokenize_pairs
from reprpo.errors import DataError, ReprpoError, TrainingError
from reprpo.experiments import store
from reprpo.model import checksums, loading

TINY = ["--model.name", "tiny-random", "--data.n_train", "8", "--train.batch_size", "2", "--train.progress", "false",
        "--eval.after_train", "false"]
# 8 pairs / batch 2 = 4 steps an epoch: 6 steps cross an epoch; dropout makes the torch RNG matter
RUN = TINY + ["--train.max_steps", "6", "--lora.dropout", "0.1"]
WALL_CLOCK = ("sec_per_step",)  # the one column a rerun cannot repeat

# a subprocess that runs `reprpo train ...` and SIGKILLs itself right after metrics row KILL_AT is written
KILLER = """
import os, signal, sys
import reprpo.train as t
kill_at = int(os.environ["KILL_AT"])
write = t.MetricsLog.write
def write_then_die(self, row):
    write(self, row)
    if int(row["step"]) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
t.MetricsLog.write = write_then_die
from reprpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(tmp_path):
    return os.environ | {"REPRPO_CACHE": os.environ.get("REPRPO_CACHE", str(tmp_path / "cache")), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}  # as in-process tests (conftest)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as fh:
        return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in csv.DictReader(fh)]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _interrupted(monkeypatch, argv: list[str], *, after_step: int) -> None:
    """Run `reprpo ARGV` and interrupt it (Ctrl-C) right after metrics row `after_step` is
    written: what a crash leaves, in-process (the kill -9 test does it for real)."""
    import reprpo.train as t

    write = t.MetricsLog.write

    def write_then_stop(self, row):
        write(self, row)
        if row["step"] == after_step:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(t.MetricsLog, "write", write_then_stop)
        assert main(argv) == 130


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps without interruption (checkpoints on, as in the resumed runs)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *RUN, "--train.save_every", "3", "--out", str(out)]) == 0
    return out


def test_kill9_then_resume_repeats_the_run_exactly(straight, tmp_path):
    """Train 6 steps straight vs. train with a checkpoint every 3 steps, kill -9 after step 5
    (so steps 4-5 of metrics.csv are lost work), `--resume`: the same metrics.csv rows (but for
    wall-clock seconds) and bit-identical adapter tensors. Today: no checkpoint, no --resume
    (the killed run is lost; argparse rejects --resume)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", KILLER, "train", *RUN, "--train.save_every", "3", "--out", str(out)]
    killed = subprocess.run(cmd, env=_env(tmp_path) | {"KILL_AT": "5"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(_rows(out)) == 5 and not (out / "adapter_model.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]  # no half-written step dir
    resumed = subprocess.run([sys.executable, "-m", "reprpo.cli", "train", "--resume", str(out)], env=_env(tmp_path),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 3" in resumed.stdout
    assert _rows(out) == _rows(straight)
    assert _same_tensors(_adapter(out), _adapter(straight))


def test_resume_at_an_epoch_boundary_and_pruning(straight, tmp_path, monkeypatch):
    """A checkpoint on the step that ends epoch 1 (step 4): resuming draws epoch 2's order as
    the straight run did. keep_checkpoints 1 keeps only the newest. Today: no checkpoints."""
    out = tmp_path / "run"
    _interrupted(monkeypatch, ["train", *RUN, "--train.save_every", "2", "--train.keep_checkpoints", "1", "--out", str(out)],
                 after_step=5)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]
    assert main(["train", *RUN, "--train.save_every", "2", "--out", str(out), "--resume"]) == 0
    assert _rows(out) == _rows(straight)
    assert _same_tensors(_adapter(out), _adapter(straight))


@pytest.mark.parametrize("method", ["hs-ether-prefvec", "hs-pca-prefvec", "projgrad"])
def test_resume_is_exact_for_methods_with_state(method, tmp_path, monkeypatch):
    """Learned frames (ether: trainable method parameters with their own optimiser state), a
    fitted pca basis, a gradient-hooking method: stopped after step 3 (checkpoint at step 2)
    and resumed, each equals its straight run bit for bit (adapter and method_state.pt).
    Today: no checkpoints."""
    args = ["train", method, *TINY, "--train.max_steps", "4", "--method.k", "4", "--train.save_every", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    _interrupted(monkeypatch, [*args, "--out", str(tmp_path / "b")], after_step=3)
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert _rows(a) == _rows(b) and _same_tensors(_adapter(a), _adapter(b))
    if (a / "method_state.pt").exists():
        sa, sb = (torch.load(d / "method_state.pt") for d in (a, b))
        assert sa and _same_tensors(sa, sb)


def test_two_process_kill9_then_resume_is_exact(tmp_path):
    """The same with 2 processes (torchrun, gloo on CPU): process 0 is killed -9 after step 3,
    each process's RNG comes back from the checkpoint (rng-1.safetensors for process 1), and
    the resumed run equals the uninterrupted 2-process run bit for bit. Today: no checkpoints;
    and a lock taken by every process would refuse process 1 (only process 0 takes it)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    args = ["train", *TINY, "--data.n_train", "16", "--train.max_steps", "4", "--train.save_every", "2", "--lora.dropout", "0.1"]
    env = _env(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run([*torchrun, "-m", "reprpo.cli", *args, "--out", str(a)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    r = subprocess.run([*torchrun, str(killer), *args, "--out", str(b)], env=env | {"KILL_AT": "3"}, capture_output=True, text=True)
    assert r.returncode != 0 and sorted(p.name for p in (b / "checkpoints" / "step-2").iterdir()) == \
        ["meta.json", "rng-1.safetensors", "state.safetensors"]
    r = subprocess.run([*torchrun, "-m", "reprpo.cli", "train", "--resume", str(b)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at step 2" in r.stdout
    assert _rows(a) == _rows(b) and _same_tensors(_adapter(a), _adapter(b))


def test_resume_refuses_other_settings_or_code(straight, tmp_path, capsys):
    """A checkpoint continues only its own run: another lr, or a checkpoint written by another
    code version, is a clear error naming what differs, before the model loads. Today: no
    --resume."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    assert main(["train", "--resume", str(out), "--train.lr", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: checkpoint 0.0001, now 0.001" in err
    meta = out / "checkpoints" / "step-6" / "meta.json"
    m = json.loads(meta.read_text())
    m["code_version"] = "0.0.1+000000000000"
    meta.write_text(json.dumps(m))
    assert main(["train", "--resume", str(out)]) == 2
    assert "written by reprpo 0.0.1+000000000000" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "has no config.yaml, so it is not a reprpo run directory" in capsys.readouterr().err
    shutil.rmtree(out / "checkpoints")
    assert main(["train", "--resume", str(out)]) == 2
    assert "no checkpoint there" in capsys.readouterr().err


def _nan_losses(monkeypatch, calls: set[int]):
    """Make the method's loss NaN on the given (1-based) calls."""
    import reprpo.train as t

    real = t.build_method
    n = {"calls": 0}

    def build(cfg, model):
        m = real(cfg, model)
        loss = m.loss

        def nan_loss(model, batch, *, ref=None):
            n["calls"] += 1
            per_pair, metrics = loss(model, batch, ref=ref)
            return (per_pair * float("nan") if n["calls"] in calls else per_pair), metrics

        m.loss = nan_loss
        return m

    monkeypatch.setattr(t, "build_method", build)


def test_one_nan_step_is_skipped_and_counted(monkeypatch, tmp_path, capsys):
    """A method that returns NaN at step 2 only: that step makes no update (the adapter after
    step 2 equals the one after step 1, so the run matches a run that never saw the NaN batch's
    update), it is counted in metrics.csv and train_report.json, and the run finishes finite.
    Today: the NaN gradient is applied and every later tensor is NaN."""
    _nan_losses(monkeypatch, {2})
    out = tmp_path / "run"
    assert main(["train", *TINY, "--train.max_steps", "4", "--out", str(out)]) == 0
    assert "step 2: loss nan" in capsys.readouterr().err
    rows = _rows(out)
    assert [r["bad_steps"] for r in rows] == ["0", "1", "1", "1"]
    assert json.loads((out / "train_report.json").read_text())["bad_steps"] == 1
    assert all(torch.isfinite(v).all() for v in _adapter(out).values())


def test_nan_steps_in_a_row_stop_with_the_reason(monkeypatch, tmp_path, capsys):
    """NaN from step 2 on: steps 2, 3, 4 make no update and at the 3rd in a row training stops,
    naming the step, the last finite metrics and the last good checkpoint; no adapter is saved.
    Today: exit 0 with an all-NaN adapter."""
    _nan_losses(monkeypatch, set(range(2, 100)))
    out = tmp_path / "run"
    assert main(["train", *TINY, "--train.max_steps", "8", "--train.save_every", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "step 4: loss or gradient norm not finite for 3 steps in a row" in err
    assert "Last finite metrics: step 1: loss 0.6931" in err
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step-1'}" in err
    assert not (out / "adapter_model.safetensors").exists()


def test_huge_lr_is_stopped_not_reported(tmp_path):
    """`--train.lr 1e30` (the probe): exit 2 with the non-finite message, no adapter. Today:
    exit 0 with an all-NaN adapter, scored as a real result."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "reprpo.cli", "train", *TINY, "--train.max_steps", "8", "--train.lr", "1e30",
                        "--out", str(out)], env=_env(tmp_path), capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not finite for 3 steps in a row" in r.stderr and "Lower --train.lr" in r.stderr
    assert not (out / "adapter_model.safetensors").exists()


def test_a_second_train_on_a_locked_out_is_refused(tmp_path):
    """While one process writes a run directory, a second `train --out` on it gets a clear
    error at once (before loading anything). Today: both train and interleave metrics.csv."""
    from reprpo.rundir import run_lock

    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        r = subprocess.run([sys.executable, "-m", "reprpo.cli", "train", *TINY, "--train.max_steps", "1", "--out", str(out)],
                           env=_env(tmp_path), capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--out {out}: in use by pid {os.getpid()}" in r.stderr
    assert not (out / "metrics.csv").exists()


def test_rerun_starts_clean_and_never_deletes_foreign_files(tmp_path, capsys):
    """A rerun into a run directory clears the earlier run (no stale eval/ beside the new
    adapter, one TensorBoard event file); a non-empty directory that is not a run directory is
    an error and nothing in it is touched. Today: stale eval/ and event files stay; foreign
    directories are written into."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--train.max_steps", "1", "--eval.after_train", "true", "--out", str(out)]) == 0
    assert (out / "eval").is_dir()
    assert main(["train", *TINY, "--train.max_steps", "2", "--out", str(out)]) == 0
    assert not (out / "eval").exists() and len(list((out / "tb").iterdir())) == 1 and len(_rows(out)) == 2
    assert "held an earlier run; cleared" in capsys.readouterr().out
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["train", *TINY, "--train.max_steps", "1", "--out", str(other)]) == 2
    assert "not empty and not a reprpo run directory" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir() if p.name != ".lock") == ["notes.txt"]


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    """`train --out FILE`: a clear error naming the path. Today: a raw FileExistsError."""
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", *TINY, "--out", str(f)]) == 2
    assert f"--out {f}: is a file" in capsys.readouterr().err


# -- cached models and scores -----------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty REPRPO_CACHE of this test's own (the conftest one is shared by a session)."""
    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fresh_state():
    from reprpo.model.tiny import build_tiny_model

    return build_tiny_model(seed=0)[0].state_dict()


def _assert_loads_like_fresh():
    model, _ = loading.load_model_and_tokenizer("tiny-random")
    want = _fresh_state()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_truncated_cached_model_is_named_and_rebuilt(cache, capsys):
    """Old code: the truncated model.safetensors was returned as is and loading it failed with
    "not cached locally and the Hub was unreachable" (a misleading ModelError)."""
    out = loading.resolve_model("tiny-random")
    f = os.path.join(out, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    capsys.readouterr()
    assert loading.resolve_model("tiny-random") == out
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt" in err and f"size {size // 2}, expected {size}" in err
    assert "reconverting from" in err
    assert os.path.getsize(f) == size
    _assert_loads_like_fresh()


def test_same_size_corruption_is_detected_and_rebuilt(cache, capsys):
    """Old code: garbage of the same size loaded silently (here: NaN/garbage weights that score
    NaN); nothing checked the bytes."""
    out = loading.resolve_model("tiny-random")
    f = os.path.join(out, "model.safetensors")
    size = os.path.getsize(f)
    before = os.stat(f)
    with open(f, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\xff" * 4096)  # 0xffffffff is a NaN in fp32
    after = os.stat(f)
    if after.st_mtime_ns == before.st_mtime_ns:  # a coarse filesystem clock: a real rewrite moves it later
        os.utime(f, ns=(after.st_atime_ns, after.st_mtime_ns + 1_000_000))
    assert os.path.getsize(f) == size
    capsys.readouterr()
    loading.resolve_model("tiny-random")
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt (sha256 mismatch)" in err
    _assert_loads_like_fresh()


def test_manifestless_old_conversion_is_rebuilt(cache, capsys):
    """Old code: any directory with a config.json was trusted; one made by an older version (no
    checksum manifest) was used unverified. Here its weights are zeroed, so trusting it shows."""
    from reprpo.model.tiny import build_tiny_model

    out = cache / "models" / "tiny-random"
    model, tok = build_tiny_model(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert not (out / checksums.MANIFEST).exists()
    capsys.readouterr()
    loading.resolve_model("tiny-random")
    assert "no checksum manifest" in capsys.readouterr().err
    manifest = json.loads((out / checksums.MANIFEST).read_text())
    assert {"config.json", "model.safetensors"} <= manifest.keys()
    _assert_loads_like_fresh()


def test_verified_stamp_skips_rehash(cache, monkeypatch):
    """Old code had no checksums at all. The common load checks sizes only: the full sha256 runs
    again only when a file's (size, mtime_ns, inode) differ from the last verified stamp."""
    loading.resolve_model("tiny-random")  # built, manifest + stamp written
    calls = []
    real = checksums._sha256
    monkeypatch.setattr(checksums, "_sha256", lambda p: calls.append(p.name) or real(p))
    loading.resolve_model("tiny-random")
    assert calls == []
    f = cache / "models" / "tiny-random" / "config.json"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same bytes
    loading.resolve_model("tiny-random")
    assert calls == ["config.json"]
    loading.resolve_model("tiny-random")  # re-stamped
    assert calls == ["config.json"]


def test_corrupt_reference_cache_is_named_and_recomputed(tiny, tmp_path, monkeypatch, capsys):
    """A reference-cache file whose bytes were changed in place (same size, still a valid zip:
    the tensor data is read through mmap, which checks no CRC) is detected by its content
    digest, named, and recomputed. Today: the flipped values are used as reference log-probs."""
    import reprpo.model.refcache as rc
    from reprpo.data.layout import Layout

    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "c"))
    model, tok = tiny
    pairs, _ = tokenize_pairs([PreferencePair(f"q{i}?", f" yes {i}", f" no {i}") for i in range(5)], tok,
                              max_length=32, max_prompt_length=16)
    a = rc.build_ref_cache(model, pairs, pad_id=tok.pad_token_id, layout=Layout(packed=True))
    path, = (tmp_path / "c" / "ref").glob("*.pt")
    raw = path.read_bytes()
    at = raw.find(a.logp_sum.numpy().tobytes())
    assert at > 0
    flipped = (a.logp_sum + 1.0).numpy().tobytes()
    path.write_bytes(raw[:at] + flipped + raw[at + len(flipped):])
    assert len(path.read_bytes()) == len(raw)
    b = rc.build_ref_cache(model, pairs, pad_id=tok.pad_token_id, layout=Layout(packed=True))
    assert f"reference cache {path} is corrupt (content digest mismatch); recomputing" in capsys.readouterr().err
    assert torch.equal(a.logp_sum, b.logp_sum)
    c = rc.build_ref_cache(model, pairs, pad_id=tok.pad_token_id, layout=Layout(packed=True))  # rewritten, intact
    assert torch.equal(a.logp_sum, c.logp_sum) and "corrupt" not in capsys.readouterr().err


def test_nan_weights_raise_training_error_naming_the_split(tiny):
    """Old code: NaN margins counted as "not correct" and gave accuracy 0.0, which looks real."""
    from reprpo.eval.scoring import evaluate_splits

    model, tok = tiny
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    tp, _ = tokenize_pairs([PreferencePair(f"q{i}", " yes", " no") for i in range(3)], tok, max_length=32,
                           max_prompt_length=16)
    with pytest.raises(TrainingError, match=r"split 'held_out'.*base.*3 of 3 pairs.*corrupt model checkpoint"):
        evaluate_splits(bad, tok, {"held_out": tp}, batch_size=2, with_adapter=False)
    table, _ = evaluate_splits(model, tok, {"held_out": tp}, batch_size=2, with_adapter=False)  # finite: fine
    assert table.n[0] == 3


# -- what a run is given: data sources, the results store, --out, compare's failures ----------------
BASE = {"model.name": "tiny-random", "data.n_train": 8, "data.n_eval": 6, "train.max_steps": 2,
        "train.batch_size": 2, "train.progress": False}
CLI = ["compare", "--methods", "dpo", "--shifts", "difficulty", "--model.name", "tiny-random",
       "--n-train", "8", "--n-eval", "6", "--steps", "2", "--train.batch_size", "2",
       "--train.progress", "false", "--no-report"]


def _no_training(monkeypatch) -> list:
    """Replace train() by one that records the call and fails: no test here should get that far."""
    import reprpo.train

    calls: list = []

    def train(cfg, **kw):
        calls.append(cfg.out)
        raise RuntimeError("train() was called")

    monkeypatch.setattr(reprpo.train, "train", train)
    return calls


# -- 1. data sources -------------------------------------------------------------------------
def test_bad_sources_fail_the_grid_before_any_run(tmp_path, monkeypatch):
    """today: check_sources does not exist, and run_grid trains every run and only then (in
    scoring) finds a missing eval file, marking each run failed instead of raising."""
    from reprpo.data.shifts import check_sources
    from reprpo.experiments.compare import run_grid

    check_sources("builtin:difficulty", "", {})  # the shift's sources are all there
    check_sources("", "hf:someone/some-data", {"oos": "hf:someone/other:test"})  # hf: not checked offline
    with pytest.raises(DataError, match=r"training data.*builtin:nope/train.*arith"):
        check_sources("", "builtin:nope/train", {})
    with pytest.raises(DataError, match=r"data\.eval oos.*builtin:arith/dev.*train, test"):
        check_sources("builtin:difficulty", "", {"oos": "builtin:arith/dev"})
    with pytest.raises(DataError, match=r"training data.*is a directory"):
        check_sources("builtin:difficulty", str(tmp_path), {})
    # a GENIES layout missing one distribution's test file: the split, the path and the fix
    (tmp_path / "shifts.json").write_text(json.dumps([{"name": "s", "train": "a", "oos": "b", "rnd": "c"}]))
    for dist, split in (("a", "train"), ("a", "test"), ("b", "test")):
        (tmp_path / dist).mkdir(exist_ok=True)
        (tmp_path / dist / f"{split}.json").write_text("[]")
    with pytest.raises(DataError, match=r"rnd.*c/test\.json.*not found"):
        check_sources(f"{tmp_path / 'shifts.json'}:s", "", {})

    # in the grid: the second method's override names a missing eval file; nothing may train
    calls = _no_training(monkeypatch)
    missing = tmp_path / "no" / "oos.jsonl"
    with pytest.raises(DataError, match=rf"data\.eval oos.*{missing}"):
        run_grid(methods=["dpo", "ipo"], shifts=["difficulty"], seeds=[1, 2], base=apply_overrides(RunConfig(), BASE, where="test"),
                 store_path=tmp_path / "s.sqlite", out_root=tmp_path / "runs", progress=False,
                 overrides={"ipo": {"data.eval": {"train": "builtin:arith/train", "oos": str(missing)}}})
    assert calls == [] and not (tmp_path / "s.sqlite").exists()


# -- 2. the results store --------------------------------------------------------------------
def test_store_refuses_files_that_are_not_a_reprpo_store(tmp_path):
    """today: random bytes raise a raw sqlite3.DatabaseError; a foreign database (or one with
    another `runs` table) silently gets our tables added; no application_id is set."""
    def refused(path, needle):
        with pytest.raises(ReprpoError, match=needle) as e:
            store.connect(path)
        assert str(path) in str(e.value) and "--store" in str(e.value)

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(os.urandom(8192))
    before = junk.read_bytes()
    refused(junk, "not an SQLite database")
    assert junk.read_bytes() == before

    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    refused(foreign, "not a reprpo results store")
    con = sqlite3.connect(foreign)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["users"]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] != "wal"  # left as it was
    con.close()

    other_runs = tmp_path / "other_runs.sqlite"
    con = sqlite3.connect(other_runs)
    con.execute("CREATE TABLE runs (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    refused(other_runs, "not a reprpo results store")

    marked = tmp_path / "marked.sqlite"
    con = sqlite3.connect(marked)
    con.executescript(store.SCHEMA + "PRAGMA application_id = 7;")  # our tables, another app's mark
    con.close()
    refused(marked, "application_id 7")

    refused(tmp_path, "is a directory")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file" / "results.sqlite", "cannot create")

    # new stores are marked; a store made before the mark (our tables, application_id 0) is
    # accepted and marked
    new = tmp_path / "new" / "results.sqlite"
    store.connect(new).close()
    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.executescript(store.SCHEMA)
    con.close()
    store.connect(old).close()
    for p in (new, old):
        con = sqlite3.connect(p)
        assert con.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
        con.close()
    store.connect(new).close()  # and opens again


# -- 3. compare --out --------------------------------------------------------------------------
def test_compare_out_that_is_a_file_fails_before_any_run(tmp_path, monkeypatch, capsys):
    """today: the grid starts; with a real train() the run dir's mkdir raises a raw
    FileExistsError (here: train() is reached and the run is marked failed, rc 1)."""
    from reprpo.cli import main

    calls = _no_training(monkeypatch)
    out = tmp_path / "taken"
    out.write_text("not a directory")
    assert main([*CLI, "--seeds", "1", "--out", str(out), "--store", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("reprpo: error:") and str(out) in err and "--out" in err
    assert calls == []


def _unwritable(tmp_path) -> Path:
    """A directory this process cannot create or write: chmod 0o500 for a user; for root (who
    ignores permissions, as in CI) a path in sysfs, where mkdir fails even for root."""
    if os.geteuid() != 0:
        out = tmp_path / "locked"
        out.mkdir()
        out.chmod(0o500)
        return out
    out = Path("/sys/reprpo-test-out")
    try:
        out.mkdir()
    except OSError:
        return out
    out.rmdir()
    pytest.skip("no directory here that root cannot write")


@pytest.mark.parametrize("command", ["compare", "train"])
def test_out_unwritable_fails_before_any_run(command, tmp_path, monkeypatch, capsys):
    """today: compare starts the grid and train() meets a raw PermissionError / OSError when it
    makes the run directory (here, with train() replaced, compare marks the run failed, rc 1)."""
    from reprpo.cli import main

    calls = _no_training(monkeypatch)
    out = _unwritable(tmp_path)
    argv = [*CLI, "--seeds", "1", "--store", str(tmp_path / "s.sqlite")] if command == "compare" else ["train", *TINY]
    try:
        assert main([*argv, "--out", str(out)]) == 2
    finally:
        if out.is_relative_to(tmp_path):
            out.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("reprpo: error:") and f"--out {out}" in err
    assert calls == []


# -- 4. failure reasons --------------------------------------------------------------------------
def test_compare_tells_recurring_failures_from_transient_ones(tmp_path, monkeypatch, capsys):
    """Seed 1: training diverges (TrainingError), seed 2: a crash (RuntimeError), seed 3: an
    adapter pair margin is NaN, seed 4: a split accuracy is NaN.
    today: every failure says "rerun to retry"; seed 3 is stored as 'done' with a NULL margin;
    seed 4 fails with an SQLite IntegrityError (NOT NULL constraint)."""
    import pandas as pd

    import reprpo.eval.coherence
    import reprpo.eval.scoring
    import reprpo.train
    from reprpo.cli import main

    def train(cfg, **kw):
        if cfg.train.seed == 1:
            raise TrainingError("loss is nan at step 1: lower train.lr")
        if cfg.train.seed == 2:
            raise RuntimeError("CUDA error: unspecified launch failure")
        os.makedirs(cfg.out, exist_ok=True)
        return cfg.out

    def evaluate_run(cfg, *, adapter_dir, out):
        acc = float("nan") if cfg.train.seed == 4 else 0.5
        table = pd.DataFrame([{"split": "test", "n": 1, "base_accuracy": 0.5, "adapter_accuracy": acc,
                               "base_margin": 0.1, "adapter_margin": 0.2, "base_chosen_ppl": 3.0, "adapter_chosen_ppl": 3.0}])
        margin = float("nan") if cfg.train.seed == 3 else 0.2
        per_pair = pd.DataFrame([{"split": "test", "model": model, "pair": 0, "chosen_logp_sum": -3.0,
                                  "rejected_logp_sum": -4.0, "chosen_tokens": 3, "rejected_tokens": 3,
                                  "chosen_logp_mean": -1.0, "rejected_logp_mean": -1.2, "margin": m,
                                  "margin_sum": 1.0, "correct": 1.0} for model, m in (("base", 0.2), ("adapter", margin))])
        return table, per_pair

    monkeypatch.setattr(reprpo.train, "train", train)
    monkeypatch.setattr(reprpo.eval.scoring, "evaluate_run", evaluate_run)
    monkeypatch.setattr(reprpo.eval.coherence, "run_coherence", lambda cfg, *, adapter_dir, **kw: {"base": {"repetition": 0.0}, "adapter": {"repetition": 0.0}})
    out = tmp_path / "cmp"
    assert main([*CLI, "--seeds", "1,2,3,4", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    lines = {s: next(line for line in err.splitlines() if f"seed {s} " in line and "FAILED" in line) for s in (1, 2, 3, 4)}
    for s in (1, 3, 4):
        assert "FAILED (will recur with these settings: fix" in lines[s], err
    assert "non-finite" in lines[3] and "non-finite" in lines[4] and "lower train.lr" in lines[1]
    assert "will recur" not in lines[2] and "rerun to retry" in lines[2], err
    assert "3 run(s) failed with errors that will recur with these settings" in err, err
    assert "1 run(s) failed otherwise" in err and "Rerun the same command to retry" in err, err

    con = sqlite3.connect(out / "results.sqlite")
    rows = dict(con.execute("SELECT seed, status || ' ' || error FROM runs"))
    assert all(rows[s].startswith("failed recurring: ") for s in (1, 3, 4)), rows
    assert rows[2].startswith("failed transient: RuntimeError: CUDA error"), rows
    assert "IntegrityError" not in rows[4] and "split_scores" in rows[4] and "pair_scores" in rows[3]
    assert con.execute("SELECT COUNT(*) FROM pair_scores").fetchone()[0] == 0  # nothing non-finite written
    assert con.execute("SELECT COUNT(*) FROM split_scores").fetchone()[0] == 0
    con.close()


def test_compare_marks_a_diverged_run_failed_with_the_reason(tmp_path, capsys):
    """End to end, no mocks: `compare --train.lr 1e30` trains, the guard stops the run, and the
    store holds it as failed with the non-finite reason (no scores). Today: the run fails later
    with an SQLite IntegrityError and the message says "rerun to retry"."""
    out = tmp_path / "cmp"
    assert main([*CLI, "--seeds", "1", "--out", str(out), "--train.lr", "1e30", "--steps", "2"]) == 1
    err = capsys.readouterr().err
    # step 1's update makes step 2's loss NaN: a run never ends on a non-finite step
    assert "FAILED (will recur with these settings" in err and "not finite for 1 steps in a row (up to the last step)" in err
    con = sqlite3.connect(out / "results.sqlite")
    (status, error), = con.execute("SELECT status, error FROM runs").fetchall()
    assert status == "failed" and error.startswith("recurring: TrainingError: step ") and "Lower --train.lr" in error
    assert con.execute("SELECT COUNT(*) FROM split_scores").fetchone()[0] == 0
    con.close()


def test_compare_resumes_a_half_done_run_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    """A grid run interrupted after step 3 (checkpoint at step 2) is continued from step 2 by
    the rerun, and its stored results equal those of an uninterrupted grid (curves but for
    wall-clock seconds). Today: the run directory is deleted and the run trained again."""
    args = [*CLI, "--seeds", "1", "--steps", "4", "--train.save_every", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    _interrupted(monkeypatch, [*args, "--out", str(tmp_path / "b")], after_step=3)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "resumed at step 2" in capsys.readouterr().out

    def results(d):
        con = sqlite3.connect(d / "results.sqlite")
        got = {tb: con.execute(f"SELECT * FROM {tb} ORDER BY 2, 3, 4").fetchall() for tb in ("split_scores", "pair_scores")}
        got["curves"] = con.execute("SELECT step, key, value FROM curves WHERE key != 'sec_per_step' ORDER BY 1, 2").fetchall()
        con.close()
        return got

    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    assert a["split_scores"] and a == b


def test_tune_records_a_diverged_trial_and_goes_on(tmp_path, monkeypatch, capsys):
    """A trial whose training diverges (TrainingError from the non-finite guard) is a failed
    trial with its reason; the study goes on. Today: no guard (a NaN adapter is scored as a
    real objective value), and an error raised in training ends the whole study."""
    import optuna

    import reprpo.train

    real, calls = reprpo.train.train, []

    def first_diverges(cfg, **kw):
        calls.append(cfg.out)
        if len(calls) == 1:
            raise TrainingError("step 2: loss or gradient norm not finite for 3 steps in a row; no adapter saved")
        return real(cfg, **kw)

    monkeypatch.setattr(reprpo.train, "train", first_diverges)
    store_path = tmp_path / "optuna.sqlite"
    assert main(["tune", "dpo", "--shift", "builtin:context", "--store", str(store_path), "--out", str(tmp_path / "tune"),
                 "--trials", "2", "--model.name", "tiny-random", "--n-train", "8", "--n-eval", "6", "--steps", "2",
                 "--train.batch_size", "2"]) == 0
    assert "trial 0: failed, training diverged" in capsys.readouterr().out
    study = optuna.load_study(study_name="dpo@builtin:context", storage=f"sqlite:///{store_path}")
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"] and "not finite" in study.trials[0].user_attrs["error"]


# -- config values and truncated pairs --------------------------------------------------------------
class _ModelLoaded(Exception):
    """Raised by the patched loader: validation let the config through to model loading."""


@pytest.mark.parametrize("field, value", [
    ("train.max_steps", "-1"),
    ("train.epochs", "0"),
    ("train.epochs", "-1"),
    ("train.lr", "nan"),
    ("train.lr", "inf"),
    ("train.beta", "0"),
    ("train.beta", "-0.1"),
    ("train.beta", "nan"),
    ("train.beta", "inf"),
    ("method.cdpo_eps", "nan"),  # generic: every float field finite
    ("method.dpo_weight", "-inf"),
    ("method.energy", "nan"),
    ("lora.alpha", "nan"),
    ("train.save_every", "-1"),
    ("train.keep_checkpoints", "0"),
    ("train.max_bad_steps", "-1"),
    ("train.log_every", "0"),
    ("data.n_train", "-1"),
    ("data.n_eval", "-1"),
    ("lora.alpha", "0"),
    ("lora.dropout", "1"),
    ("lora.dropout", "-0.1"),
    ("train.weight_decay", "-0.01"),
    ("train.max_grad_norm", "-1"),
    ("method.outlier_quantile", "1"),
    ("method.outlier_quantile", "-0.1"),
])
def test_bad_config_value_exits_2_naming_the_field_before_the_model_loads(field, value, capsys, monkeypatch, tmp_path):
    """Today's code accepted every one of these values (e.g. lr=nan passed `lr <= 0`) and went on to load the model."""
    import reprpo.model.loading as loading
    from reprpo.cli import main

    def no_load(*a, **k):
        raise _ModelLoaded(f"{field}={value} reached model loading")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", no_load)
    rc = main(["train", "--model.name", "tiny-random", f"--out={tmp_path / 'run'}", f"--{field}={value}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert field in err and value.lstrip("-") in err
    assert not (tmp_path / "run").exists()


def test_pairs_cut_to_the_same_tokens_are_dropped_with_a_count():
    """Today's code kept a pair whose chosen and rejected responses truncation cut to the same tokens (zero gradient, tied score)."""
    from reprpo.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    pairs = [
        PreferencePair("Q:", "abcdefX", "abcdefY"),  # differ only after the 3-token budget
        PreferencePair("Q:", "xbc", "ybc"),  # differ inside it: kept
        PreferencePair("Q:", "abc", "abcd"),  # rejected cut to chosen (append_eos off below)
    ]
    plen = len(tok("Q:")["input_ids"])  # character-level: 2, plus any BOS
    out, rep = tokenize_pairs(pairs, tok, max_length=plen + 3, max_prompt_length=plen, append_eos=False)
    assert [p.index for p in out] == [1]
    assert rep.n_pairs == 3 and rep.n_kept == 1
    (reason, n), = rep.dropped.items()
    assert n == 2 and "identical after truncation" in reason and "data.max_length" in reason
    assert f"2 ({reason})" in rep.summary()

    # texts that differ but tokenise alike (unknown chars -> <unk>) are identical before
    # truncation: their own reason. Equal texts are the readers' drop (check_pair): not counted again.
    out, rep = tokenize_pairs([PreferencePair("Q:", "é", "ü"), PreferencePair("Q:", "abcdefX", "abcdefX")],
                              tok, max_length=plen + 3, max_prompt_length=plen)
    assert [p.index for p in out] == [1]
    (reason, n), = rep.dropped.items()
    assert n == 1 and "tokenise identically" in reason


# -- found by a user-level probe after the first round ----------------------------------------------
def test_a_run_killed_before_its_first_step_can_be_rerun(tmp_path, monkeypatch):
    """A run stopped after config.yaml and tb/ exist but before any step is still a run
    directory (OUT/.reprpo-run): the same command reruns into it. Found by a probe: the rerun
    said "not empty and not a reprpo run directory (config.yaml, tb)"."""
    import reprpo.train as t

    out = tmp_path / "run"

    def stop(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(t, "progress_bar", stop)
        assert main(["train", *TINY, "--train.max_steps", "1", "--out", str(out)]) == 130
    assert (out / "config.yaml").is_file() and not (out / "metrics.csv").exists()
    assert main(["train", *TINY, "--train.max_steps", "1", "--out", str(out)]) == 0


def test_an_lr_that_overflows_the_optimiser_is_a_clear_error(tmp_path, capsys):
    """`--train.lr 1e38` is finite but overflows float32 inside AdamW: a clear error naming the
    lr, not torch's RuntimeError traceback. Found by a probe."""
    assert main(["train", *TINY, "--train.max_steps", "2", "--train.lr", "1e38", "--out", str(tmp_path / "r")]) == 2
    assert "--train.lr 1e+38 is too large" in capsys.readouterr().err


def test_eval_out_that_is_a_file_and_inspect_of_a_missing_file_fail_first(tmp_path, monkeypatch, capsys):
    """`reprpo eval RUN --out FILE` is refused before scoring; `reprpo data inspect MISSING`
    says so before any tokenizer (or model conversion) loads. Found by a probe: a raw
    FileExistsError after every split was scored; a 25 s SmolLM2 conversion first."""
    import reprpo.model.loading as loading

    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.max_steps", "1", "--out", str(run)]) == 0
    f = tmp_path / "afile"
    f.write_text("x")
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(loading, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    assert main(["eval", str(run), "--out", str(f)]) == 2
    assert f"--out {f}: is a file" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "nofile.jsonl")]) == 2
    assert "nofile.jsonl not found" in capsys.readouterr().err


def test_an_empty_held_out_split_fails_before_training(tmp_path, capsys):
    """A file so small that `data.eval_fraction` holds out no prompt: the error comes before
    training, and no adapter is written. Found by a probe: it trained, saved, then failed."""
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"}) for i in range(3)))
    out = tmp_path / "run"
    assert main(["train", "--model.name", "tiny-random", "--data.train", str(data), "--data.eval_fraction", "0.01",
                 "--train.max_steps", "1", "--train.batch_size", "2", "--train.progress", "false", "--out", str(out)]) == 2
    assert "eval_fraction" in capsys.readouterr().err
    assert not (out / "metrics.csv").exists() and not (out / "adapter_model.safetensors").exists()


def test_tune_needs_a_trial(tmp_path, capsys):
    """`tune --trials 0` is refused (it rewrote best_params from an old study). Found by a probe."""
    assert main(["tune", "dpo", "--shift", "builtin:context", "--trials", "0", "--out", str(tmp_path / "t")]) == 2
    assert "--trials 0" in capsys.readouterr().err


def test_a_train_that_fails_before_writing_leaves_no_directory(tmp_path, monkeypatch, capsys):
    """Without --out, a run that fails before it writes anything (here: the model is missing)
    leaves no `runs/METHOD-TIMESTAMP` behind. Found while testing: every such failure left an
    empty run directory holding only the lock."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model.name", "./no/such/model", "--eval.after_train", "false"]) == 2
    assert "not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

