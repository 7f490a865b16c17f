"""`reprpo compare`: the grid fills the store, resumes after a kill, shares the store between
processes; run ids; the coherence check's n-gram maths."""

import os
import socket
import sqlite3
import subprocess
import sys

import pytest

from reprpo.config import RunConfig, apply_overrides
from reprpo.errors import ConfigError
from reprpo.eval.coherence import generation_check, ngram_metrics
from reprpo.experiments import store
from reprpo.experiments.compare import build_run_config, run_grid, run_id_of, shift_spec

BASE = {"model.name": "tiny-random", "data.n_train": 8, "data.n_eval": 6, "train.max_steps": 2,
        "train.batch_size": 2, "train.progress": False, "method.k": 4}
METHODS = ["dpo", "hs-pca-prefvec"]
N_SPLITS, N_MODELS, N_EVAL, N_COHERENCE = 4, 2, 6, 4  # splits, base/adapter, pairs, metrics


def _base(**over) -> RunConfig:
    return apply_overrides(RunConfig(), BASE | over, where="test")


def _grid(tmp_path, *, seeds=(1, 2), methods=METHODS, name="results.sqlite", **kw):
    return run_grid(methods=list(methods), shifts=["difficulty"], seeds=list(seeds), base=_base(),
                    store_path=tmp_path / name, out_root=tmp_path / "runs", progress=False, **kw)


def _counts(path) -> dict[str, int]:
    con = sqlite3.connect(path)
    out = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("runs", *store.RESULT_TABLES)}
    out["done"] = con.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
    con.close()
    return out


def _expected(path) -> dict[str, int]:
    """Row counts the store must hold if every run in it is done; curves = the cells of each
    run's metrics.csv (steps x logged keys; keys differ between methods)."""
    import pandas as pd

    con = sqlite3.connect(path)
    out_dirs = [r[0] for r in con.execute("SELECT out_dir FROM runs")]
    con.close()
    n = len(out_dirs)
    curves = 0
    for d in out_dirs:
        m = pd.read_csv(os.path.join(d, "metrics.csv"))
        assert len(m) == 2  # max_steps
        curves += m.size - len(m)  # all but the step column
    return {"runs": n, "done": n, "split_scores": n * N_SPLITS * N_MODELS,
            "pair_scores": n * N_SPLITS * N_MODELS * N_EVAL, "curves": curves,
            "coherence": n * N_MODELS * N_COHERENCE}


def _env():
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# -- the n-gram maths ------------------------------------------------------------------------
def test_ngram_metrics_by_hand():
    """g1 = 1 2 3 1 2 3, g2 = 4 4.
    3-grams: g1 has 123 231 312 123 -> 4, one repeat; g2 none -> repetition 1/4.
    1-grams: 8 in all, distinct {1,2,3,4} -> 4/8. 2-grams: g1 12 23 31 12 23, g2 44 -> 6 in all,
    distinct {12,23,31,44} -> 4/6. mean_length (6 + 2) / 2 = 4."""
    m = ngram_metrics([[1, 2, 3, 1, 2, 3], [4, 4]])
    assert m == pytest.approx({"repetition": 0.25, "distinct_1": 0.5, "distinct_2": 4 / 6, "mean_length": 4.0})
    # repetition is within a generation; distinct-n pools all generations
    m = ngram_metrics([[1, 2, 3], [1, 2, 3]])
    assert m["repetition"] == 0.0 and m["distinct_1"] == 0.5 and m["distinct_2"] == 0.5
    assert ngram_metrics([[7, 7, 7, 7, 7]])["repetition"] == pytest.approx(2 / 3)  # 777 x3, 1 unique
    assert ngram_metrics([[], [5]]) == {"repetition": 0.0, "distinct_1": 1.0, "distinct_2": 0.0, "mean_length": 0.5}


def test_generation_check_is_greedy_and_bounded(tiny):
    model, tok = tiny
    prompts = ["What is 2 + 3?", "List three fruits."]
    a = generation_check(model, tok, prompts, max_new_tokens=8, chat_template=True)
    b = generation_check(model, tok, prompts, max_new_tokens=8, chat_template=False)
    assert set(a) == {"repetition", "distinct_1", "distinct_2", "mean_length"}
    assert 0 <= a["mean_length"] <= 8 and 0 <= a["repetition"] <= 1 and 0 < a["distinct_1"] <= 1
    assert generation_check(model, tok, prompts, max_new_tokens=8, chat_template=True) == a  # greedy
    assert b["mean_length"] <= 8


# -- configs and run ids ---------------------------------------------------------------------
def test_run_id_stable_and_config_layers(tmp_path):
    def cfg(method="dpo", base=None, over=None, root=tmp_path):
        return build_run_config(method=method, shift=shift_spec("difficulty"), seed=1, base=base or _base(),
                                out_root=root, overrides=over)

    a, b = cfg(), cfg(root=tmp_path / "elsewhere")
    assert run_id_of(a) == run_id_of(b) and a.out.endswith(run_id_of(a))  # out is not in the id
    assert run_id_of(cfg(base=_base(**{"train.progress": True}))) == run_id_of(a)
    assert run_id_of(cfg(base=_base(**{"data.n_train": 16}))) != run_id_of(a)
    assert a.data.shift == "builtin:difficulty" and a.data.n_train == 8 and not a.eval.after_train
    # defaults < preset < base < per-method overrides < grid
    assert cfg("simpo").train.beta == 2.0  # the preset's
    assert cfg("simpo", base=_base(**{"train.beta": 0.5})).train.beta == 0.5  # base over preset
    assert cfg("simpo", over={"train.beta": 0.3, "train.seed": 9}).train.beta == 0.3
    assert cfg("simpo", over={"train.seed": 9}).train.seed == 1  # the grid's seed wins
    r = cfg("hs-pca-prefvec", over={"method": {"k": 2}})
    assert (r.method.transform, r.method.k) == ("pca", 2)


def test_bad_grid_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        _grid(tmp_path, methods=["dpo", "nope"])
    with pytest.raises(ConfigError, match="no shift"):
        run_grid(methods=["dpo"], shifts=["builtin:nope"], seeds=[1], base=_base(), store_path=tmp_path / "s.sqlite", out_root=tmp_path)
    with pytest.raises(ConfigError, match="not in --methods"):
        _grid(tmp_path, overrides={"ipo": {"train.beta": 0.2}})
    assert not (tmp_path / "results.sqlite").exists()


def test_connect_adds_new_columns_to_an_old_store(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(store.SCHEMA)  # the first schema: no owner / eval_seconds / code_version
    con.close()
    con = store.connect(path)
    store.connect(path).close()  # a second connect finds them and adds nothing
    cols = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
    con.close()
    assert {"owner", "eval_seconds", "code_version"} <= cols


# -- the grid and the store ------------------------------------------------------------------
def test_grid_fills_store_and_rerun_skips(tmp_path, capsys):
    ids = _grid(tmp_path)
    assert len(ids) == len(set(ids)) == 4
    c = _counts(tmp_path / "results.sqlite")
    assert c["runs"] == 4 and c["curves"] > 0 and c == _expected(tmp_path / "results.sqlite")
    con = sqlite3.connect(tmp_path / "results.sqlite")
    n = con.execute("SELECT SUM(n) FROM split_scores").fetchone()[0]
    assert n == c["pair_scores"]  # every scored pair is in pair_scores
    assert con.execute("SELECT COUNT(*) FROM runs WHERE train_seconds > 0 AND eval_seconds > 0 AND finished > created").fetchone()[0] == 4
    from reprpo.checkpoint import code_version  # each run names the source that computed it

    assert con.execute("SELECT DISTINCT code_version FROM runs").fetchall() == [(code_version(),)]
    finished = con.execute("SELECT run_id, finished FROM runs ORDER BY run_id").fetchall()
    assert {r[0] for r in con.execute("SELECT DISTINCT method FROM runs")} == set(METHODS)
    capsys.readouterr()

    assert _grid(tmp_path) == ids
    assert _counts(tmp_path / "results.sqlite") == c
    assert con.execute("SELECT run_id, finished FROM runs ORDER BY run_id").fetchall() == finished
    con.close()

    # with progress: the 4 skipped runs are counted but are not in the rate (nothing was run)
    run_grid(methods=METHODS, shifts=["difficulty"], seeds=[1, 2], base=_base(), store_path=tmp_path / "results.sqlite",
             out_root=tmp_path / "runs", progress=True)
    last = [x for x in capsys.readouterr().err.splitlines() if x.startswith("compare:")][-1]
    assert last.startswith("compare: 4/4 (100%), ? run/s, ETA ?, done in"), last


def test_killed_and_failed_runs_are_redone_without_duplicates(tmp_path, monkeypatch):
    import reprpo.train

    real_train, calls = reprpo.train.train, []

    def flaky(cfg, **kw):
        calls.append(cfg.out)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_train(cfg, **kw)

    monkeypatch.setattr(reprpo.train, "train", flaky)
    ids = _grid(tmp_path)
    path = tmp_path / "results.sqlite"
    con = sqlite3.connect(path)
    status = dict(con.execute("SELECT run_id, status FROM runs"))
    assert sorted(status.values()) == ["done", "done", "done", "failed"]
    failed = next(r for r, s in status.items() if s == "failed")
    assert "simulated crash" in con.execute("SELECT error FROM runs WHERE run_id = ?", (failed,)).fetchone()[0]

    # a killed process: 'running', its owner dead (our pid with another start time = a recycled
    # pid), some rows already written; and a live process's running run, which must be left alone
    dead = f"{socket.gethostname()}:{os.getpid()}:1"
    con.execute("UPDATE runs SET status = 'running', owner = ? WHERE run_id = ?", (dead, failed))
    con.execute("INSERT INTO pair_scores (run_id, split, model, pair, correct) VALUES (?, 'test', 'base', 999, 1)", (failed,))
    con.execute("INSERT INTO curves VALUES (?, 99, 'loss', 1.0)", (failed,))
    con.commit()
    assert not store.owner_alive(dead)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = store.owner_id(sleeper.pid)
        assert store.owner_alive(live)
        other = ids[0]
        con.execute("UPDATE runs SET status = 'running', owner = ? WHERE run_id = ?", (live, other))
        con.commit()
        monkeypatch.setattr(reprpo.train, "train", real_train)
        calls.clear()
        _grid(tmp_path)
        status = dict(con.execute("SELECT run_id, status FROM runs"))
        assert status[failed] == "done" and status[other] == "running"  # busy: skipped
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not store.owner_alive(live)
    _grid(tmp_path)  # its owner is gone now: redone
    con.close()
    assert _counts(path)["done"] == 4 and _counts(path) == _expected(path)


def test_fail_fast_stops_the_grid(tmp_path, monkeypatch):
    import reprpo.train

    def boom(cfg, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(reprpo.train, "train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _grid(tmp_path, fail_fast=True)
    con = sqlite3.connect(tmp_path / "results.sqlite")
    assert con.execute("SELECT status FROM runs").fetchall() == [("failed",)]
    con.close()


def test_cli_compare_two_processes_share_one_store(tmp_path):
    """The CLI round trip, twice at once: two processes, disjoint 2-run grids, one store file.
    All 4 runs and all their rows land; --params reaches the config; a rerun adds nothing."""
    from reprpo.cli import main

    out = tmp_path / "cmp"
    params = tmp_path / "dpo.yaml"
    params.write_text("train.lr: 0.01\n")
    args = ["compare", "--methods", "dpo", "--shifts", "difficulty", "--n-train", "8", "--n-eval", "6",
            "--steps", "2", "--model.name", "tiny-random", "--train.batch_size", "2", "--train.progress", "false",
            "--out", str(out), "--params", f"dpo={params}"]
    procs = [subprocess.Popen([sys.executable, "-m", "reprpo.cli", *args, "--seeds", seeds, "--no-report"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seeds in ("1,2", "3,4")]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    log = "\n".join(o[-3000:] for o in outs)
    assert all("dpo builtin:difficulty seed" in o and "2 run now" in o for o in outs), log
    path = out / "results.sqlite"
    c = _counts(path)
    assert c["done"] == 4 and c == _expected(path), log
    con = sqlite3.connect(path)
    assert sorted(r[0] for r in con.execute("SELECT seed FROM runs")) == [1, 2, 3, 4]
    assert len({r[0] for r in con.execute("SELECT owner FROM runs")}) == 2
    assert all('"lr": 0.01' in j and '"n_train": 8' in j for (j,) in con.execute("SELECT config_json FROM runs"))
    con.close()
    assert main([*args, "--seeds", "1,2,3,4"]) == 0  # in-process rerun: all skipped (then the report)
    assert _counts(path) == c


def test_store_open_retries_an_immediate_lock_and_names_the_file(tmp_path):
    """Switching a new store to WAL can fail at once with "database is locked" while another
    process creates the same file (seen 1 in 10 runs of the two-process test): it is retried;
    other errors are not, and a lock that outlasts the wait names the file."""
    from reprpo.experiments.store import _retry_locked

    tries = []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert _retry_locked(flaky, path=tmp_path / "s.sqlite") == "ok" and len(tries) == 3
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _retry_locked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("no such table: x")), path=tmp_path)
    with pytest.raises(sqlite3.OperationalError, match="s.sqlite: still locked"):
        _retry_locked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")),
                      path=tmp_path / "s.sqlite", seconds=0.2)
