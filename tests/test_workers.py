"""`reprpo compare --workers N`: worker processes claim runs from one store, so every run is
trained exactly once and scores as it would alone; a crashed worker is reported, --fail-fast
stops them all; `--shard K/N` splits a grid between nodes and `--merge` joins their stores."""

import os
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_compare import _base, _counts, _expected

from reprpo.errors import ConfigError, TrainingError
from reprpo.experiments import compare, store

METHODS = ["dpo", "hs-pca-prefvec"]  # x 1 shift x 2 seeds = 4 runs

# The worker the tests start instead of compare.WORKER_COMMAND's: the real `worker_main`, with
# reprpo.train.train wrapped to log each training (run dir, worker) and to wait until every worker
# is up (so each worker gets a run, whatever the machine's load); T_CRASH / T_FAIL make a worker
# die or a training raise, T_NO_CLAIM puts back the failure the atomic claim prevents.
WORKER = r'''
import os, sys, time
from pathlib import Path

import reprpo.train
from reprpo.experiments import compare, store

index = int(sys.argv[2])
log, barrier, n = Path(os.environ["T_LOG"]), Path(os.environ["T_BARRIER"]), int(os.environ["T_WORKERS"])
real_train, real_claim = reprpo.train.train, store.claim_run
(barrier / str(index)).touch()


def train(cfg, **kw):
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(log, "a") as f:
        f.write(f"{Path(cfg.out).name} {index}\n")
    if os.environ.get("T_CRASH") == str(index):
        print("simulated crash", file=sys.stderr, flush=True)
        os._exit(3)
    if os.environ.get("T_FAIL"):
        raise RuntimeError("boom")
    return real_train(cfg, **kw)


def claim_run(con, **kw):  # no atomic claim: whatever the store says, take the run
    real_claim(con, **kw)
    return "claimed"


reprpo.train.train = train
if os.environ.get("T_NO_CLAIM"):
    store.claim_run = claim_run
sys.exit(compare.worker_main(sys.argv[1:]))
'''


@pytest.fixture
def workers(tmp_path, monkeypatch):
    """Start the logging WORKER; returns the training log's path. cpu_count 2: each of the two
    workers gets one torch thread, as this test process has (conftest), so scores are bit-equal."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "barrier").mkdir()
    monkeypatch.setattr(compare, "WORKER_COMMAND", [sys.executable, str(script)])
    monkeypatch.setattr(compare, "cpu_count", lambda: 2)
    for k, v in {"T_LOG": tmp_path / "trainings.log", "T_BARRIER": tmp_path / "barrier", "T_WORKERS": 2,
                 "HF_HUB_OFFLINE": 1}.items():
        monkeypatch.setenv(k, str(v))
    return tmp_path / "trainings.log"


def _grid(tmp_path, name, **kw):
    return compare.run_grid(methods=METHODS, shifts=["difficulty"], seeds=[1, 2], base=_base(),
                            store_path=tmp_path / f"{name}.sqlite", out_root=tmp_path / name, progress=True, **kw)


def _trainings(log: Path) -> list[tuple[str, int]]:
    """(run_id, worker) per training a worker started."""
    return [(r, int(w)) for r, w in (line.split() for line in log.read_text().splitlines())] if log.exists() else []


def _check_each_trained_once(log: Path, ids: list[str]) -> None:
    done = _trainings(log)
    assert Counter(r for r, _ in done) == dict.fromkeys(ids, 1), f"trainings per run: {Counter(r for r, _ in done)}"
    assert {w for _, w in done} == {0, 1}  # both workers claimed runs


def _rows(path, table: str) -> list[tuple]:
    con = sqlite3.connect(path)
    rows = sorted(con.execute(f"SELECT * FROM {table} WHERE {'key != ' + repr('sec_per_step') if table == 'curves' else '1'}"))
    con.close()
    return rows


def test_two_workers_train_every_run_once_and_score_as_one(tmp_path, workers, capsys):
    """2 workers, 4 runs: each run trained exactly once (the log of trainings), by both workers
    between them (two owners); the store holds each run once, done, with exactly the rows and
    the very scores (pair scores, splits, curves, generation check) of the same grid run with
    --workers 1. Catches a run trained twice, a lost or doubled row, or a worker whose run
    differs from the run alone (shared RNG or threads)."""
    ids = _grid(tmp_path, "two", workers=2)
    out = capsys.readouterr().out
    _check_each_trained_once(workers, ids)
    path = tmp_path / "two.sqlite"
    con = sqlite3.connect(path)
    runs = con.execute("SELECT run_id, status, owner FROM runs").fetchall()
    con.close()
    assert sorted(r for r, _, _ in runs) == sorted(ids) and {s for _, s, _ in runs} == {"done"}
    assert len({o for _, _, o in runs}) == 2 and store.owner_id() not in {o for _, _, o in runs}
    assert all((tmp_path / "two" / r / "train_report.json").is_file() for r in ids)
    assert "4 runs: 4 run now, 0 already done, 0 running elsewhere, 0 failed" in out, out
    assert all(out.count(f"({r}): done (") == 1 for r in ids), out

    assert _grid(tmp_path, "one", workers=1) == ids
    assert _counts(path) == _counts(tmp_path / "one.sqlite") == _expected(path)
    for table in ("split_scores", "pair_scores", "coherence", "curves"):
        assert _rows(path, table) == _rows(tmp_path / "one.sqlite", table), table

    capsys.readouterr()
    assert _grid(tmp_path, "two", workers=2) == ids  # a rerun: every run skipped once, nothing trained
    assert "4 runs: 0 run now, 4 already done" in capsys.readouterr().out
    assert len(_trainings(workers)) == 4


def test_without_the_atomic_claim_both_workers_train_every_run(tmp_path, workers, monkeypatch):
    """The control of the test above: with claim_run answering 'claimed' whatever the store
    holds (no atomic claim: the state before `store.claim_run`), both workers train every run,
    and the exactly-once check fails. So that check does catch double runs."""
    monkeypatch.setenv("T_NO_CLAIM", "1")
    ids = _grid(tmp_path, "two", workers=2)
    assert Counter(r for r, _ in _trainings(workers)) == dict.fromkeys(ids, 2)
    with pytest.raises(AssertionError, match="trainings per run"):
        _check_each_trained_once(workers, ids)


def test_a_crashed_worker_is_reported_and_its_run_redone(tmp_path, workers, monkeypatch):
    """Worker 1 dies (exit 3) in its first run: the grid does not hide it (a TrainingError with
    the exit code and its log's last lines, after the other worker's runs); its run is 'running'
    under a dead owner (or already redone by worker 0, which reclaims a dead owner's run), and
    a rerun leaves every run done with exact row counts."""
    monkeypatch.setenv("T_CRASH", "1")
    with pytest.raises(TrainingError, match=r"worker 1 \(pid \d+\) exited with code 3(.|\n)*simulated crash") as e:
        _grid(tmp_path, "two", workers=2)
    assert "rerun the same command" in str(e.value)
    path = tmp_path / "two.sqlite"
    con = sqlite3.connect(path)
    left = con.execute("SELECT status, owner FROM runs WHERE status != 'done'").fetchall()
    con.close()
    assert all(s == "running" and not store.owner_alive(o) for s, o in left) and len(left) <= 1, left
    _grid(tmp_path, "two", workers=1)
    assert _counts(path)["done"] == 4 and _counts(path) == _expected(path)


def test_fail_fast_stops_every_worker(tmp_path, workers, monkeypatch):
    """--fail-fast with 2 workers: the first failed run stops both (a TrainingError naming it);
    each stopped worker marks its run failed, and the runs after the first two never start."""
    monkeypatch.setenv("T_FAIL", "1")
    with pytest.raises(TrainingError, match=r"--fail-fast: \[\d/4\] .*RuntimeError: boom"):
        _grid(tmp_path, "two", workers=2, fail_fast=True)
    con = sqlite3.connect(tmp_path / "two.sqlite")
    runs = con.execute("SELECT status, owner FROM runs").fetchall()
    con.close()
    # a worker stopped between its claim and its training has a failed run it never trained;
    # one stopped right after its claim (before the try) leaves it 'running' under a dead owner
    assert all(s == "failed" or (s == "running" and not store.owner_alive(o)) for s, o in runs), runs
    assert 1 <= len(_trainings(workers)) <= len(runs) <= 2, (runs, _trainings(workers))


def test_workers_flag_shards_and_merge(tmp_path, capsys):
    """--workers 0 is refused naming the flag; --shard K/N partitions the grid; three shards in
    two stores (a shard of one run with --workers 4: more workers than runs is fine), merged
    with --merge into a third store, hold the whole grid's rows; a missing shard is named."""
    from reprpo.cli import main

    args = ["compare", "--methods", ",".join(METHODS), "--shifts", "difficulty", "--seeds", "1,2", "--n-train", "8",
            "--n-eval", "6", "--steps", "2", "--model.name", "tiny-random", "--train.batch_size", "2", "--method.k", "4",
            "--train.progress", "false", "--out", str(tmp_path / "runs"), "--no-report"]
    assert main([*args, "--workers", "0"]) == 2
    assert "--workers 0: give how many runs" in capsys.readouterr().err
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(ConfigError, match=f"--shard '{bad}'"):
            compare.parse_shard(bad)
    grid = compare.build_grid(methods=METHODS, shifts=["difficulty"], seeds=[1, 2], base=_base(), out_root=tmp_path)
    shards = [compare.take_shard(grid, (k, 3)) for k in (1, 2, 3)]
    assert sorted(map(id, sum(shards, []))) == sorted(map(id, grid)) and [len(s) for s in shards] == [2, 1, 1]

    a, b, c = (str(tmp_path / f"{x}.sqlite") for x in "abc")
    assert main([*args, "--shard", "1/3", "--store", a]) == 0
    assert main([*args, "--shard", "2/3", "--store", b, "--workers", "4"]) == 0
    assert main([*args, "--shard", "3/3", "--store", a]) == 0
    assert [_counts(p)["done"] for p in (a, b)] == [3, 1]
    capsys.readouterr()
    assert main([*args, "--merge", a, "--store", c]) == 1  # shard 2/3 is missing
    cap = capsys.readouterr()
    assert f"{a}: 3 run(s) copied" in cap.out and "1 run(s) of the grid are done in none of the merged stores" in cap.err
    assert main([*args, "--merge", f"{a},{b}", "--store", c]) == 0
    out = capsys.readouterr().out
    assert f"{a}: 0 run(s) copied, 3 already done" in out and f"{b}: 1 run(s) copied, 0 already done" in out, out
    assert _counts(c)["done"] == 4 and _counts(c) == _expected(c)
    for table in ("runs", "split_scores", "pair_scores", "curves", "coherence"):
        assert _rows(c, table) == sorted(_rows(a, table) + _rows(b, table)), table
    assert main([*args, "--merge", c, "--store", c]) == 2  # refused: merging a store into itself
    assert main([*args, "--merge", str(tmp_path / "nope.sqlite"), "--store", c]) == 2
    assert main([*args, "--merge", a, "--store", c, "--workers", "2"]) == 2
    assert os.path.exists(c)


def test_a_run_failed_in_this_grid_is_not_retried_by_a_sibling(tmp_path):
    """claim_run(failed_since=T): a run that failed at or after T (a sibling worker of the same
    grid failed it) is 'failed' and skipped, so one grid tries a run once; one that failed
    before T (an earlier grid's) is claimed and redone, as without failed_since."""
    import time

    con = store.connect(tmp_path / "s.sqlite")
    run = {"run_id": "r1", "method": "dpo", "shift": "s", "seed": 1, "config_json": "{}", "out_dir": "o"}
    assert store.claim_run(con, **run, owner="a") == "claimed"
    t = time.time()
    store.fail_run(con, run_id="r1", owner="a", error="transient: RuntimeError: x")
    assert store.claim_run(con, **run, owner="b", failed_since=t) == "failed"
    assert store.claim_run(con, **run, owner="b", failed_since=time.time() + 1) == "claimed"
    store.fail_run(con, run_id="r1", owner="b", error="transient: RuntimeError: x")
    assert store.claim_run(con, **run, owner="c") == "claimed"
    con.close()


def test_worker_env_gives_each_worker_its_gpu_and_thread_share(monkeypatch):
    """Worker i gets visible GPU i mod k (the parent's CUDA_VISIBLE_DEVICES names, e.g. 2,5) and
    its thread share in OMP/MKL_NUM_THREADS; a CPU grid asks torch about no GPU at all."""
    envs = [compare.worker_env(i, workers=3, gpus=["2", "5"], threads=4) for i in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5", "2"]
    assert all(e["OMP_NUM_THREADS"] == e["MKL_NUM_THREADS"] == "4" for e in envs)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in compare.worker_env(0, workers=2, gpus=[], threads=1)
    cpu = compare.build_grid(methods=["dpo"], shifts=["difficulty"], seeds=[1], base=_base(**{"train.device": "cpu"}), out_root="x")
    assert compare.visible_gpus(cpu) == []
