"""The results store: one SQLite file holding every run of every comparison.

Schema (the contract between `compare`, `report` and `tune`):

runs         one row per (method, shift, seed, settings): run_id is a hash of the resolved
             config minus output paths; status 'running' | 'done' | 'failed'; error (of a
             failed run) starts with its kind, 'recurring: ' (a ReprpoError: bad config or
             data, non-finite training, a missing model; the same settings fail again) or
             'transient: ' (anything else; a rerun may pass), then `Type: message` and the
             traceback (`error_text`; stores from before the prefix hold the bare traceback);
             added later (by `connect`): owner (host:pid:start), eval_seconds, code_version
             (`checkpoint.code_version()` of the process that ran it; NULL in runs from before).
split_scores per run, split and model ('base' | 'adapter'): n, accuracy, margin, chosen_ppl.
pair_scores  per run, split, model and pair: log-prob sums/means, tokens, margin, correct.
curves       per run, step and metric key: the training log (metrics.csv) as rows.
coherence    per run and model: greedy-generation checks (repetition, distinct_n, ...).

A store is marked with `PRAGMA application_id = APPLICATION_ID`. `connect` creates and marks
a new (empty) file, marks a store made before the mark (application_id 0 and our `runs` table
with its columns), and refuses anything else (another program's database, a corrupt file) with
a `StoreError` instead of adding our tables to it.

WAL mode and a busy timeout let several processes write at once without losing rows; every
write is one `BEGIN IMMEDIATE` transaction (`transaction`), so a run's rows land all or none.
WAL needs every process on one host and the file on a local disk (sqlite.org/wal.html: "WAL
does not work over a network filesystem"): a store is never shared between nodes; one store
per node (`compare --shard`) and `copy_runs` (`compare --merge`) instead (docs/scaling-grids.md).

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
from functools import cache
from pathlib import Path

from reprpo.errors import ReprpoError

APPLICATION_ID = 0x72707230  # "rpr0": PRAGMA application_id of every reprpo results store

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
    ("runs", "code_version", "TEXT"),    # reprpo version + source hash of the process that ran it
)
RECURRING, TRANSIENT = "recurring", "transient"  # the kinds of a failed run's runs.error
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


class StoreError(ReprpoError):
    """The results store cannot be opened, or the file is not a reprpo results store."""


_FIX = "Move it away, or pass --store NEW.sqlite for a new store."


@cache
def _schema_columns() -> dict[str, tuple[str, ...]]:
    """{table: columns} of SCHEMA (the first schema, without ADDED_COLUMNS)."""
    con = sqlite3.connect(":memory:")
    con.executescript(SCHEMA)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {t: tuple(r[1] for r in con.execute(f"PRAGMA table_info({t})")) for t in tables}
    con.close()
    return out


def _check_path(p: Path) -> None:
    """A store path must be a file (or nothing yet) in a folder we can write (SQLite puts
    PATH-wal and PATH-shm beside it)."""
    if p.is_dir():
        raise StoreError(f"results store {p} is a directory. Pass --store DIR/results.sqlite (a file) instead.")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise StoreError(f"results store {p}: cannot create its folder {p.parent} ({why}). "
                         "Pass --store PATH in a folder you can write.") from e
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise StoreError(f"results store {p}: its folder {p.parent} is not writable (SQLite writes "
                         f"{p.name}-wal and -shm beside it). Fix its permissions or pass --store PATH elsewhere.")
    if p.exists() and not os.access(p, os.R_OK | os.W_OK):
        raise StoreError(f"results store {p} is not readable and writable. Fix its permissions or pass --store PATH elsewhere.")


def _check_ours(con: sqlite3.Connection, p: Path) -> str:
    """'ours' (marked), 'old' (our tables, unmarked: an earlier version's) or 'new' (empty);
    raises StoreError for anything else. Reads only."""
    app = con.execute("PRAGMA application_id").fetchone()[0]
    if app == APPLICATION_ID:
        return "ours"
    if app != 0:
        raise StoreError(f"{p} is an SQLite database of another program (application_id {app}), "
                         f"not a reprpo results store. {_FIX}")
    tables = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    if not tables:
        return "new"
    have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
    missing = [c for c in _schema_columns()["runs"] if c not in have]
    if "runs" not in tables or missing:
        what = f"its runs table lacks {', '.join(missing)}" if "runs" in tables else "it has no runs table"
        raise StoreError(f"{p} is not a reprpo results store: it holds tables {', '.join(tables)} and {what}. {_FIX}")
    return "old"


def _init(con: sqlite3.Connection, p: Path) -> None:
    """In one write transaction: check the file is ours, create what is missing, mark it."""
    with transaction(con):  # serialised, so two processes never both add a column
        ours = _check_ours(con, p) == "ours"
        # one statement at a time (executescript would commit first); no ';' inside SCHEMA's statements
        for statement in filter(str.strip, SCHEMA.split(";")):
            con.execute(statement)
        if not ours:
            con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        for table, column, typ in ADDED_COLUMNS:
            have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {typ}")


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (and create) a store; safe for several writer processes. Raises StoreError for a
    path that cannot hold a store or a file that is not one (left as it was)."""
    p = Path(path)
    _check_path(p)
    con = sqlite3.connect(str(p), timeout=60.0)
    try:
        con.execute("PRAGMA busy_timeout=60000")
        _retry_locked(lambda: _check_ours(con, p), path=p)  # before WAL: a foreign file stays untouched
        # switching to WAL (and the first schema write) can report "locked" at once, without waiting
        # on the busy timeout, while another process is creating the same file: retry those
        _retry_locked(lambda: con.execute("PRAGMA journal_mode=WAL"), path=p)
        _retry_locked(lambda: _init(con, p), path=p)
    except sqlite3.DatabaseError as e:
        con.close()
        name = getattr(e, "sqlite_errorname", "")
        if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            raise StoreError(f"{p} is not an SQLite database, or is corrupt ({e}). {_FIX}") from e
        if name in ("SQLITE_BUSY", "SQLITE_LOCKED") or "locked" in str(e):
            raise  # _retry_locked's message names the file
        raise StoreError(f"results store {p}: cannot open it ({name or type(e).__name__}: {e}). {_FIX}") from e
    except BaseException:
        con.close()
        raise
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
              config_json: str, out_dir: str, owner: str, failed_since: float | None = None,
              code_version: str | None = None) -> str:
    """Atomically take a run: 'claimed' (now ours, partial rows of an earlier attempt deleted),
    'done' (finished before; skip) or 'busy' (running in another live process; skip).
    With `failed_since` (unix time), a run that failed at or after it is 'failed' (skip): a
    sibling worker of the same grid failed it, and one grid tries a run once. `code_version` is
    recorded with a claimed run."""
    with transaction(con):
        row = con.execute("SELECT status, owner, finished FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is not None:
            status, prev, finished = row
            if status == "done":
                return "done"
            if status == "running" and prev != owner and owner_alive(prev):
                return "busy"
            if status == "failed" and failed_since is not None and (finished or 0) >= failed_since:
                return "failed"
        delete_run_rows(con, run_id)
        con.execute(
            "INSERT OR REPLACE INTO runs (run_id, method, shift, seed, status, config_json, out_dir, "
            "error, train_seconds, eval_seconds, created, finished, owner, code_version) "
            "VALUES (?, ?, ?, ?, 'running', ?, ?, NULL, NULL, NULL, ?, NULL, ?, ?)",
            (run_id, method, shift, seed, config_json, out_dir, time.time(), owner, code_version),
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


def error_text(kind: str, exc: BaseException, *, trace: str) -> str:
    """runs.error of a failed run: `KIND: Type: message`, a blank line, the traceback's tail."""
    assert kind in (RECURRING, TRANSIENT), kind
    return f"{kind}: {type(exc).__name__}: {exc}\n\n{trace[-4000:]}"


def error_kind(error: str | None) -> str:
    """RECURRING or TRANSIENT; an error stored before the prefix counts as TRANSIENT (rerun)."""
    return RECURRING if (error or "").startswith(f"{RECURRING}: ") else TRANSIENT


def error_headline(error: str | None) -> str:
    """The `Type: message` line of a stored error (the last line of a bare traceback)."""
    text = (error or "").strip()
    for prefix in (f"{RECURRING}: ", f"{TRANSIENT}: "):
        if text.startswith(prefix):
            return text.removeprefix(prefix).splitlines()[0]
    return text.splitlines()[-1] if text else ""


def copy_runs(src: sqlite3.Connection, dst: sqlite3.Connection, run_ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """Copy the 'done' runs among `run_ids` from store `src` into store `dst`, each run with its
    result rows in one transaction (the columns both stores have); a run already done in `dst`
    is left as it is, a failed or half-written one there is replaced.
    Returns (copied, already done in dst)."""
    ids = list(run_ids)
    status = run_statuses(src, ids)
    done = [r for r in ids if status.get(r) == "done"]
    have = {t: {r[1] for r in dst.execute(f"PRAGMA table_info({t})")} for t in ("runs", *RESULT_TABLES)}
    copied, kept = [], []
    for rid in done:
        with transaction(dst):
            row = dst.execute("SELECT status FROM runs WHERE run_id = ?", (rid,)).fetchone()
            if row is not None and row[0] == "done":
                kept.append(rid)
                continue
            delete_run_rows(dst, rid)
            for table in ("runs", *RESULT_TABLES):
                cur = src.execute(f"SELECT * FROM {table} WHERE run_id = ?", (rid,))
                names = [d[0] for d in cur.description]
                keep = [j for j, c in enumerate(names) if c in have[table]]
                cols, marks = ", ".join(names[j] for j in keep), ", ".join("?" * len(keep))
                dst.executemany(f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({marks})",
                                [tuple(r[j] for j in keep) for r in cur.fetchall()])
        copied.append(rid)
    return copied, kept


# -- reads -----------------------------------------------------------------------------------
def run_statuses(con: sqlite3.Connection, run_ids: Iterable[str]) -> dict[str, str]:
    """{run_id: status} of the given runs that are in the store."""
    ids = list(run_ids)
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    return dict(con.execute(f"SELECT run_id, status FROM runs WHERE run_id IN ({marks})", ids).fetchall())


def failed_runs(con: sqlite3.Connection, run_ids: Iterable[str]) -> dict[str, str]:
    """{run_id: error} of the given runs whose status is 'failed'."""
    ids = list(run_ids)
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    rows = con.execute(f"SELECT run_id, error FROM runs WHERE status = 'failed' AND run_id IN ({marks})", ids)
    return {r: e or "" for r, e in rows.fetchall()}
