"""The results store: one SQLite file holding every run of every comparison.

Schema (the contract between `compare`, `report` and `tune`):

runs         one row per (method, shift, seed, settings): run_id is a hash of the resolved
             config minus output paths; status 'running' | 'done' | 'failed'.
split_scores per run, split and model ('base' | 'adapter'): n, accuracy, margin, chosen_ppl.
pair_scores  per run, split, model and pair: log-prob sums/means, tokens, margin, correct.
curves       per run, step and metric key: the training log (metrics.csv) as rows.
coherence    per run and model: greedy-generation checks (repetition, distinct_n, ...).

WAL mode and a busy timeout let several processes write at once without losing rows.
"""

from __future__ import annotations

import sqlite3
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


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (and create) a store; safe for several writer processes."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(p), timeout=60.0)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA busy_timeout=60000")
    con.executescript(SCHEMA)
    return con
