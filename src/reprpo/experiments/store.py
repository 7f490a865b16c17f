"""The results store: one SQLite file holding every run of every comparison.

Schema (the contract between `compare`, `report` and `tune`):

runs         one row per (method, shift, seed, settings): run_id is a hash of the resolved
             config minus output paths; status 'running' | 'done' | 'failed'; added later
             (by `connect`): owner (host:pid:start), eval_seconds.
split_scores per run, split and model ('base' | 'adapter'): n, accuracy, margin, chosen_ppl.
pair_scores  per run, split, model and pair: log-prob sums/means, tokens, margin, correct.
curves       per run, step and metric key: the training log (metrics.csv) as rows.
coherence    per run and model: greedy-generation checks (repetition, distinct_n, ...).

WAL mode and a busy timeout let several processes write at once without losing rows; every
write is one `BEGIN IMMEDIATE` transaction (`transaction`), so a run's rows land all or none.

Claiming (`claim_run`): a process marks a run 'running' with `owner` = host:pid:start-time
before training it. A 'done' run is skipped; a 'running' run whose owner is alive is someone
else's; a 'failed' run, or a 'running' one whose owner is dead (a killed process), is redone,
its partial rows deleted first.
"""

from __future__ import annotations

import os
import random
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    shift TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,              -- running | done | failed
    config_json TEXT NOT NULL,         -- resolved RunConfig as JSON
    out_dir TEXT,
    error TEXT,
    train_seconds REAL,
    created REAL NOT NULL,             -- unix time
    finished REAL
);
CREATE TABLE IF NOT EXISTS split_scores (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    split TEXT NOT NULL,               -- train | test | oos | rnd | ...
    model TEXT NOT NULL,               -- base | adapter
    n INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    margin REAL NOT NULL,
    chosen_ppl REAL NOT NULL,
    PRIMARY KEY (run_id, split, model)
);
CREATE TABLE IF NOT EXISTS pair_scores (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    split TEXT NOT NULL,
    model TEXT NOT NULL,
    pair INTEGER NOT NULL,
    chosen_logp_sum REAL, rejected_logp_sum REAL,
    chosen_tokens INTEGER, rejected_tokens INTEGER,
    chosen_logp_mean REAL, rejected_logp_mean REAL,
    margin REAL, margin_sum REAL, correct REAL,
    PRIMARY KEY (run_id, split, model, pair)
);
CREATE TABLE IF NOT EXISTS curves (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    key TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, step, key)
);
CREATE TABLE IF NOT EXISTS coherence (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,               -- base | adapter
    metric TEXT NOT NULL,              -- repetition | distinct_1 | distinct_2 | ...
    value REAL,
    PRIMARY KEY (run_id, model, metric)
);
"""


# columns added after the first schema: (table, column, type); `connect` adds missing ones
ADDED_COLUMNS = (
    ("runs", "owner", "TEXT"),           # host:pid:start of the process that claimed the run
    ("runs", "eval_seconds", "REAL"),    # scoring + generation check
)
RESULT_TABLES = ("split_scores", "pair_scores", "curves", "coherence")
# result columns after run_id, in the order `finish_run` takes row tuples
COLUMNS = {
    "split_scores": ("split", "model", "n", "accuracy", "margin", "chosen_ppl"),
    "pair_scores": ("split", "model", "pair", "chosen_logp_sum", "rejected_logp_sum",
                    "chosen_tokens", "rejected_tokens", "chosen_logp_mean", "rejected_logp_mean",
                    "margin", "margin_sum", "correct"),
    "curves": ("step", "key", "value"),
    "coherence": ("model", "metric", "value"),
}


def _retry_locked(fn, *, path: Path, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError(f"{path}: still locked by another process after {seconds:.0f} s ({e})") from e
            time.sleep(0.02 + 0.08 * random.random())


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (and create) a store; safe for several writer processes."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(p), timeout=60.0)
    con.execute("PRAGMA busy_timeout=60000")
    # switching to WAL (and the first schema write) can report "locked" at once, without waiting
    # on the busy timeout, while another process is creating the same file: retry those
    _retry_locked(lambda: con.execute("PRAGMA journal_mode=WAL"), path=p)
    _retry_locked(lambda: con.executescript(SCHEMA), path=p)
    with transaction(con):  # serialised, so two processes never both add a column
        for table, column, typ in ADDED_COLUMNS:
            have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {typ}")
    return con


@contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` ... COMMIT (ROLLBACK on error): takes the write lock up front, so a
    read-then-write inside cannot race another process."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.rollback()
        raise
    con.commit()


# -- run ownership ---------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, str]:
    """(state, start time in clock ticks since boot) from Linux /proc; ('', '') where unknown.
    The start time is stored with the pid so that a recycled pid is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", ""
    fields = stat.rsplit(")", 1)[1].split()  # fields 3.. (after the command name)
    return fields[0], fields[19]  # field 3 state, field 22 starttime


def owner_id(pid: int | None = None) -> str:
    """`host:pid:start` of this process (or of `pid` on this host)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_proc_stat(pid)[1]}"


def owner_alive(owner: str | None) -> bool:
    """Is the process named by `owner` still running? Other hosts' processes count as alive
    (we cannot look); ours are checked by pid and start time."""
    if not owner:
        return False
    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    state, now = _proc_stat(pid)
    return state != "Z" and (not start or not now or start == now)  # a zombie is dead


# -- writes ----------------------------------------------------------------------------------
def delete_run_rows(con: sqlite3.Connection, run_id: str) -> None:
    """Remove a run's result rows (call inside `transaction`)."""
    for table in RESULT_TABLES:
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))


def claim_run(con: sqlite3.Connection, *, run_id: str, method: str, shift: str, seed: int,
              config_json: str, out_dir: str, owner: str) -> str:
    """Atomically take a run: 'claimed' (now ours, partial rows of an earlier attempt deleted),
    'done' (finished before; skip) or 'busy' (running in another live process; skip)."""
    with transaction(con):
        row = con.execute("SELECT status, owner FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is not None:
            status, prev = row
            if status == "done":
                return "done"
            if status == "running" and prev != owner and owner_alive(prev):
                return "busy"
        delete_run_rows(con, run_id)
        con.execute(
            "INSERT OR REPLACE INTO runs (run_id, method, shift, seed, status, config_json, out_dir, "
            "error, train_seconds, eval_seconds, created, finished, owner) "
            "VALUES (?, ?, ?, ?, 'running', ?, ?, NULL, NULL, NULL, ?, NULL, ?)",
            (run_id, method, shift, seed, config_json, out_dir, time.time(), owner),
        )
    return "claimed"


def finish_run(
    con: sqlite3.Connection, *, run_id: str, owner: str,
    split_rows: Iterable[tuple], pair_rows: Iterable[tuple], curve_rows: Iterable[tuple],
    coherence_rows: Iterable[tuple], train_seconds: float, eval_seconds: float,
) -> bool:
    """In one transaction: write a run's results and mark it 'done'. Rows are tuples in table
    column order without run_id. False (nothing written) if `owner` no longer holds the run."""
    with transaction(con):
        row = con.execute("SELECT status, owner FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None or row != ("running", owner):
            return False
        delete_run_rows(con, run_id)
        for table, rows in (("split_scores", split_rows), ("pair_scores", pair_rows),
                            ("curves", curve_rows), ("coherence", coherence_rows)):
            cols = ", ".join(("run_id",) + COLUMNS[table])
            marks = ", ".join("?" * (len(COLUMNS[table]) + 1))
            con.executemany(f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({marks})",
                            [(run_id, *r) for r in rows])
        con.execute(
            "UPDATE runs SET status = 'done', error = NULL, train_seconds = ?, eval_seconds = ?, "
            "finished = ? WHERE run_id = ?", (train_seconds, eval_seconds, time.time(), run_id),
        )
    return True


def fail_run(con: sqlite3.Connection, *, run_id: str, owner: str, error: str) -> None:
    """Mark our run 'failed' with the error text (its partial rows go when it is redone)."""
    with transaction(con):
        con.execute("UPDATE runs SET status = 'failed', error = ?, finished = ? WHERE run_id = ? AND owner = ?",
                    (error, time.time(), run_id, owner))


# -- reads -----------------------------------------------------------------------------------
def run_statuses(con: sqlite3.Connection, run_ids: Iterable[str]) -> dict[str, str]:
    """{run_id: status} of the given runs that are in the store."""
    ids = list(run_ids)
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    return dict(con.execute(f"SELECT run_id, status FROM runs WHERE run_id IN ({marks})", ids).fetchall())
