"""A study's archive: its finished work as committed text files, read back into a store.

A results store and an optuna study live under runs/, which a fresh checkout does not have. A
study longer than one session therefore keeps its finished work in a folder of plain files
that can be committed (the study file's `archive:` key), and the next session starts by
reading it back:

- `export_runs(store, folder)`: every 'done' run with all its rows, one CSV per store table
  (runs.csv, split_scores.csv, coherence.csv), the long tables in gzipped shards
  (pair_scores.000.csv.gz, ..., curves.000.csv.gz, ...) listed with their row counts in
  shards.json; floats written with `repr` so a re-import is bit-exact. runs.csv is written
  last, so a run listed there always has its rows in the other files (an export killed halfway
  lists fewer runs).
- Shards: runs in the order they finished, a run's rows never split, a new shard once one
  holds SHARD_ROWS rows. A new run only changes the last shard, so git stores the new rows, not
  the whole table again, and no file outgrows what a repository should hold (a study of 162 runs
  has over 100,000 pair rows). An archive from before shards (pair_scores.csv.gz) still imports.
- `import_runs(folder, store)`: the archived runs the store lacks, each with its rows in one
  transaction (`store.copy_runs`); a run already done in the store is left as it is.
- `export_trials` / `import_trials`: the optuna studies of a tuning storage, through optuna's
  own text journal (`JournalFileBackend`) and `optuna.copy_study`; a study the storage
  already has is not imported again.

Run ids are hashes of the resolved settings, so an archived run counts as done only for a grid
whose run has exactly its settings; anything else in the archive is kept but not used.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path

from reprpo.errors import ReprpoError
from reprpo.experiments import store

TABLES = ("runs", *store.RESULT_TABLES)
GZIPPED = ("pair_scores", "curves")  # the long tables: gzipped, in shards
SHARD_ROWS = 16_000  # rows per shard before the next run starts a new one (pair_scores: ~0.8 MB gzipped)
SHARDS = "shards.json"  # {table: {file: rows}} of the long tables' shards
JOURNAL = "tuning.journal"
ARCHIVE_WORKER = "reprpo-archive"  # the worker id of every line of an exported journal


class ArchiveError(ReprpoError):
    """An archive file cannot be read as the table it names."""


def table_file(folder: Path, table: str) -> Path:
    """A short table's file, or a long table's single file in an archive from before shards."""
    return folder / (f"{table}.csv.gz" if table in GZIPPED else f"{table}.csv")


def shard_file(folder: Path, table: str, i: int) -> Path:
    return folder / f"{table}.{i:03d}.csv.gz"


def _shards(counts: list[tuple[str, int]], cap: int) -> list[list[str]]:
    """Runs (in order, with their row counts) cut into consecutive groups: a group is closed once
    it holds `cap` rows or more, so appending runs changes only the last group."""
    groups, rows = [[]], 0
    for rid, n in counts:
        if rows >= cap:
            groups.append([])
            rows = 0
        groups[-1].append(rid)
        rows += n
    return groups if groups[0] else []


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same double
    return str(v)


def _write(path: Path, header: list[str], rows) -> None:
    """Write to PATH.tmp, then rename: a kill leaves the old file or the new one, never half."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow([_cell(v) for v in r])
    data = buf.getvalue().encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)  # mtime 0: same rows, same bytes
    os.replace(tmp, path)


def export_runs(store_path: str | Path, folder: str | Path) -> int:
    """Write every 'done' run of the store (and its rows) to FOLDER; returns how many."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    con = store.connect(store_path)
    try:
        done = "SELECT run_id FROM runs WHERE status = 'done'"
        order = [r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'done' ORDER BY finished, run_id")]
        listing = {}
        for table in GZIPPED:
            n = dict(con.execute(f"SELECT run_id, COUNT(*) FROM {table} WHERE run_id IN ({done}) GROUP BY run_id"))
            listing[table] = {}
            for i, ids in enumerate(_shards([(r, n.get(r, 0)) for r in order], SHARD_ROWS)):
                cur = con.execute(f"SELECT * FROM {table} WHERE run_id IN ({', '.join('?' * len(ids))}) ORDER BY rowid", ids)
                rows = cur.fetchall()
                path = shard_file(folder, table, i)
                _write(path, [d[0] for d in cur.description], rows)
                listing[table][path.name] = len(rows)
        tmp = folder / (SHARDS + ".tmp")
        tmp.write_text(json.dumps(listing, indent=1) + "\n")
        os.replace(tmp, folder / SHARDS)
        for table in ("split_scores", "coherence", "runs"):  # runs last: see the module docstring
            where = "status = 'done'" if table == "runs" else f"run_id IN ({done})"
            cur = con.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY rowid")
            _write(table_file(folder, table), [d[0] for d in cur.description], cur)
        for table in GZIPPED:  # what shards.json no longer lists: an older single file, surplus shards
            for p in [table_file(folder, table), *folder.glob(f"{table}.[0-9][0-9][0-9].csv.gz")]:
                if p.is_file() and p.name not in listing[table]:
                    p.unlink()
        return len(order)
    finally:
        con.close()


def _types(con: sqlite3.Connection, table: str) -> dict[str, str]:
    return {r[1]: r[2].upper() for r in con.execute(f"PRAGMA table_info({table})")}


def _value(text: str, typ: str, *, path: Path, line: int, column: str):
    if text == "":
        return None
    try:
        if typ == "INTEGER":
            return int(text)
        if typ == "REAL":
            v = float(text)
            if not math.isfinite(v):
                raise ValueError("not finite")
            return v
    except ValueError as e:
        raise ArchiveError(f"{path}, line {line}, column {column}: {text!r} is not a {typ.lower()} ({e}). "
                           "The archive is damaged: restore it from git (git checkout -- FOLDER).") from e
    return text


def _read(path: Path, table: str, con: sqlite3.Connection) -> tuple[list[str], list[tuple]]:
    types = _types(con, table)
    opener = (lambda: gzip.open(path, "rt", newline="", encoding="utf-8")) if path.suffix == ".gz" \
        else (lambda: open(path, newline="", encoding="utf-8"))
    try:
        with opener() as f:
            rows = list(csv.reader(io.StringIO(f.read())))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{path}: cannot read it ({e}). Restore it from git, or delete the archive folder to start over.") from e
    if not rows:
        raise ArchiveError(f"{path}: empty (no header row). Restore it from git, or delete the archive folder to start over.")
    header, body = rows[0], rows[1:]
    unknown = [c for c in header if c not in types]
    if unknown or "run_id" not in header:
        raise ArchiveError(f"{path}: column(s) {', '.join(unknown) or '(no run_id)'} are not in the store's {table} table "
                           f"({', '.join(types)}). This is not an archive of this reprpo version's store.")
    out = []
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise ArchiveError(f"{path}, line {i}: {len(r)} cells for {len(header)} columns. Restore it from git.")
        out.append(tuple(_value(t, types[c], path=path, line=i, column=c) for t, c in zip(r, header)))
    return header, out


def archived_runs(folder: str | Path) -> int:
    """How many runs the archive lists (0 if it has none)."""
    p = table_file(Path(folder), "runs")
    if not p.is_file():
        return 0
    with open(p, newline="", encoding="utf-8") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _files(folder: Path) -> list[tuple[str, Path, int | None]]:
    """(table, file, rows listed or None) of every file to import, runs first; a long table from
    shards.json, or its single file in an archive from before shards."""
    listing = None
    if (folder / SHARDS).is_file():
        try:
            listing = json.loads((folder / SHARDS).read_text())
            assert isinstance(listing, dict) and all(isinstance(listing.get(t), dict) for t in GZIPPED)
        except (ValueError, AssertionError) as e:
            raise ArchiveError(f"{folder / SHARDS}: not a listing of shards ({e or 'wrong shape'}). Restore the folder from git.") from e
    out = [(t, table_file(folder, t), None) for t in TABLES if t not in GZIPPED]
    for table in GZIPPED:
        if listing is None:
            out.append((table, table_file(folder, table), None))
        else:
            out += [(table, folder / name, int(n)) for name, n in listing[table].items()]
    return out


def import_runs(folder: str | Path, store_path: str | Path, *, skip=None) -> tuple[list[str], list[str]]:
    """Copy the archive's runs into the store; returns (imported, already done in the store).
    An archive without runs.csv imports nothing. `skip(config_json) -> bool`: runs to leave out
    (their settings read an input that has changed since: they are redone)."""
    folder = Path(folder)
    if not table_file(folder, "runs").is_file():
        return [], []
    with tempfile.TemporaryDirectory(prefix="reprpo-archive-") as tmp:
        src = store.connect(Path(tmp) / "archive.sqlite")
        try:
            for table, path, want in _files(folder):
                if not path.is_file():
                    raise ArchiveError(f"{folder}: runs.csv is there but {path.name} is not. Restore the folder from git.")
                header, rows = _read(path, table, src)
                if want is not None and len(rows) != want:
                    raise ArchiveError(f"{path}: {len(rows)} rows, but {SHARDS} lists {want}. Restore the folder from git.")
                if table == "runs":
                    bad = [r for r in rows if r[header.index("status")] != "done"]
                    if bad:
                        raise ArchiveError(f"{path}: run {bad[0][header.index('run_id')]} has status "
                                           f"{bad[0][header.index('status')]!r}; an archive holds done runs only.")
                with store.transaction(src):
                    src.executemany(f"INSERT INTO {table} ({', '.join(header)}) VALUES ({', '.join('?' * len(header))})", rows)
            ids = [rid for rid, cj in src.execute("SELECT run_id, config_json FROM runs") if not (skip and skip(cj))]
            dst = store.connect(store_path)
            try:
                return store.copy_runs(src, dst, ids)
            finally:
                dst.close()
        finally:
            src.close()


# -- inputs read by path -------------------------------------------------------------------
def fingerprint(path: str | Path) -> str:
    """sha256 over a file, or over a folder's files (relative names and bytes, sorted)."""
    import hashlib

    p, h = Path(path), hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


INPUTS = "inputs.json"  # {path: sha256} of the files the archived runs' settings name (an SAE, ...)


def changed_inputs(folder: str | Path) -> list[str]:
    """Recorded input paths whose content differs now (missing ones count as changed)."""
    p = Path(folder) / INPUTS
    if not p.is_file():
        return []
    rec = json.loads(p.read_text())
    return [k for k, v in rec.items() if not Path(k).exists() or fingerprint(k) != v]


def record_inputs(folder: str | Path, paths) -> dict[str, str]:
    """Write FOLDER/inputs.json for the given existing paths (merged with earlier records of paths
    not given now)."""
    p = Path(folder) / INPUTS
    rec = json.loads(p.read_text()) if p.is_file() else {}
    rec |= {str(k): fingerprint(k) for k in paths if Path(k).exists()}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return rec


# -- tuning trials ---------------------------------------------------------------------------
def _journal(path: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def export_trials(storage_path: str | Path, folder: str | Path) -> list[str]:
    """Every study of the optuna SQLite storage, copied to FOLDER/tuning.journal (replaced)."""
    import optuna

    storage_path, folder = Path(storage_path), Path(folder)
    if not storage_path.is_file():
        return []
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{storage_path}"
    names = optuna.get_all_study_names(url)
    tmp = folder / (JOURNAL + ".tmp")
    tmp.unlink(missing_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = _journal(tmp)
    for name in names:
        optuna.copy_study(from_study_name=name, from_storage=url, to_storage=journal)
    # optuna writes a random worker id on every line: one fixed id keeps unchanged trials the same bytes
    lines = [json.loads(line) for line in tmp.read_text().splitlines() if line.strip()]
    tmp.write_text("".join(json.dumps({**d, "worker_id": ARCHIVE_WORKER}, separators=(",", ":")) + "\n" for d in lines))
    os.replace(tmp, folder / JOURNAL)
    return names


def import_trials(folder: str | Path, storage_path: str | Path) -> list[str]:
    """The archived studies that the optuna storage lacks, copied into it; returns their names."""
    import optuna

    path = Path(folder) / JOURNAL
    if not path.is_file():
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        journal = _journal(path)
        names = optuna.get_all_study_names(journal)
    except Exception as e:  # optuna's own errors for a damaged log
        raise ArchiveError(f"{path}: not a readable optuna journal ({type(e).__name__}: {e}). Restore it from git.") from e
    storage_path = Path(storage_path)
    storage_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{storage_path}"
    have = set(optuna.get_all_study_names(url))
    new = [n for n in names if n not in have]
    for name in new:
        optuna.copy_study(from_study_name=name, from_storage=journal, to_storage=url)
    return new
