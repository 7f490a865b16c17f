"""`reprpo compare`: train and score every (method, shift, seed) of a grid into the results store.

A run's config = RunConfig defaults < the method preset < the base settings (what the user set:
model, sizes, ...) < per-method overrides (`--params METHOD=FILE.yaml`, e.g. from
`reprpo tune`) < data.shift, train.seed, train.method, out. Its run_id is a hash of that
config minus output-only keys, so the same settings always give the same id and a rerun
skips what is done; a run left 'running' by a killed process or 'failed' is redone.
Several processes may run grids into one store at once (see `reprpo.experiments.store`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from reprpo.config import SECTIONS, RunConfig, load_yaml, to_dict
from reprpo.data.shifts import shift_spec
from reprpo.errors import ConfigError
from reprpo.experiments import store

# keys that change where or how a run reports, never its results: left out of the run_id
NOT_IN_RUN_ID = ("out", "train.progress", "eval.after_train", "eval.per_pair_format")


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _flat(cfg: RunConfig) -> dict[str, Any]:
    """{'train.lr': 1e-4, ..., 'out': ''}."""
    out: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        if k in SECTIONS:
            out |= {f"{k}.{k2}": v2 for k2, v2 in v.items()}
        else:
            out[k] = v
    return out


def run_id_of(cfg: RunConfig) -> str:
    """12 hex digits of sha256 over the canonical JSON of the config without NOT_IN_RUN_ID."""
    flat = {k: v for k, v in _flat(cfg).items() if k not in NOT_IN_RUN_ID}
    text = json.dumps(flat, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_settings(base: RunConfig) -> dict[str, Any]:
    """The fields of `base` that differ from the defaults: what the user set. (A field set to
    its default value is indistinguishable from an unset one, so a preset's value wins there.)"""
    default = _flat(RunConfig())
    return {k: v for k, v in _flat(base).items() if k != "out" and v != default[k]}


def load_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """`METHOD=FILE.yaml` items -> {method: {config key: value}} (dotted or nested YAML keys)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--params {item!r}: expected METHOD=FILE.yaml.")
        method, path = (s.strip() for s in item.split("=", 1))
        out[method] = load_yaml(path)
    return out


def build_run_config(*, method: str, shift: str, seed: int, base: RunConfig, out_root: str | Path,
                     overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < preset(method) < base settings < overrides < shift / seed / method / out."""
    from reprpo.methods import resolve_config

    fixed = {"data.shift": shift, "train.seed": seed, "eval.after_train": False}
    cfg = resolve_config(("base config", base_settings(base)), (f"--params {method}", overrides or {}), ("compare grid", fixed),
                         method=method)
    cfg.out = str(Path(out_root) / run_id_of(cfg))
    return cfg


# -- results -> store rows -------------------------------------------------------------------
def split_rows(table) -> list[tuple]:
    """evaluate_run's summary table -> (split, model, n, accuracy, margin, chosen_ppl) rows."""
    rows = []
    for r in table.to_dict("records"):
        for model in ("base", "adapter"):
            rows.append((r["split"], model, int(r["n"]), float(r[f"{model}_accuracy"]),
                         float(r[f"{model}_margin"]), float(r[f"{model}_chosen_ppl"])))
    return rows


def pair_rows(per_pair) -> list[tuple]:
    cols = store.COLUMNS["pair_scores"]
    ints = {"pair", "chosen_tokens", "rejected_tokens"}
    return [tuple(str(r[c]) if c in ("split", "model") else int(r[c]) if c in ints else float(r[c]) for c in cols)
            for r in per_pair[list(cols)].to_dict("records")]


def curve_rows(metrics_csv: Path) -> list[tuple]:
    """metrics.csv (one row per step) -> long (step, key, value) rows."""
    import pandas as pd

    if not metrics_csv.is_file():
        return []
    m = pd.read_csv(metrics_csv)
    return [(int(r["step"]), k, float(v)) for r in m.to_dict("records") for k, v in r.items() if k != "step"]


def coherence_rows(metrics: dict[str, dict[str, float]]) -> list[tuple]:
    return [(model, k, float(v)) for model, d in metrics.items() for k, v in d.items()]


# -- the grid --------------------------------------------------------------------------------
def execute_run(cfg: RunConfig, con, *, run_id: str, owner: str):
    """Train, score, generation-check one claimed run and write it to the store (one
    transaction). Scoring happens here, once (train() itself never evaluates).

    Returns (written: False if another process took the run over meanwhile, summary table)."""
    from reprpo.eval.coherence import run_coherence
    from reprpo.eval.scoring import evaluate_run
    from reprpo.train import train

    out = Path(cfg.out)
    if out.exists():  # a killed attempt's files (TensorBoard events would pile up)
        shutil.rmtree(out)
    t0 = time.time()
    train(cfg)
    t1 = time.time()
    table, per_pair = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
    coh = run_coherence(cfg, adapter_dir=out)
    t2 = time.time()
    return store.finish_run(
        con, run_id=run_id, owner=owner, split_rows=split_rows(table), pair_rows=pair_rows(per_pair),
        curve_rows=curve_rows(out / "metrics.csv"), coherence_rows=coherence_rows(coh),
        train_seconds=t1 - t0, eval_seconds=t2 - t1,
    ), table


def _headline(table) -> str:
    parts = []
    for r in table.to_dict("records"):
        parts.append(f"{r['split']} {100 * r['base_accuracy']:.0f}->{100 * r['adapter_accuracy']:.0f}%")
    return ", ".join(parts)


def run_grid(*, methods: list[str], shifts: list[str], seeds: list[int], base: RunConfig,
             store_path: str | Path, out_root: str | Path, overrides: dict[str, dict[str, Any]] | None = None,
             progress: bool = True, fail_fast: bool = False) -> list[str]:
    """Run every (method, shift, seed) not yet done; returns the grid's run_ids in run order.

    overrides: {method: {config key: value}} applied over `base` for that method only.
    Order: seeds outermost, so an interrupted grid has every method for its first seeds.
    A failing run is marked 'failed' (error text stored) and the grid goes on, unless
    `fail_fast`. Config errors (unknown method / shift / key) are raised before any run starts.
    """
    for name, values in (("--methods", methods), ("--shifts", shifts), ("--seeds", seeds)):
        if not values:
            raise ConfigError(f"{name}: give at least one value (comma-separated).")
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(methods))
    if unknown:
        raise ConfigError(f"--params given for {', '.join(unknown)}, which is not in --methods ({', '.join(methods)}).")
    from reprpo.data.shifts import resolve_shift

    shifts = [shift_spec(s) for s in shifts]
    for s in shifts:
        resolve_shift(s)  # unknown shift: error now, not after hours of runs
    grid = []
    for seed in seeds:
        for shift in shifts:
            for method in methods:
                cfg = build_run_config(method=method, shift=shift, seed=seed, base=base, out_root=out_root,
                                       overrides=overrides.get(method))
                if not progress:
                    cfg.train.progress = False
                grid.append(cfg)

    say = print if progress else (lambda *a, **k: None)
    con = store.connect(store_path)
    owner = store.owner_id()
    counts = {"done": 0, "skipped": 0, "busy": 0, "failed": 0}
    ids = []
    try:
        for i, cfg in enumerate(grid, 1):
            rid = run_id_of(cfg)
            ids.append(rid)
            tag = f"[{i}/{len(grid)}] {cfg.train.method} {cfg.data.shift} seed {cfg.train.seed} ({rid})"
            state = store.claim_run(con, run_id=rid, method=cfg.train.method, shift=cfg.data.shift, seed=cfg.train.seed,
                                    config_json=json.dumps(to_dict(cfg), sort_keys=True), out_dir=cfg.out, owner=owner)
            if state == "done":
                say(f"{tag}: skip (done)")
                counts["skipped"] += 1
                continue
            if state == "busy":
                say(f"{tag}: skip (running in another process)")
                counts["busy"] += 1
                continue
            say(f"{tag}: running -> {cfg.out}")
            try:
                ok, table = execute_run(cfg, con, run_id=rid, owner=owner)
            except BaseException as e:
                store.fail_run(con, run_id=rid, owner=owner, error=traceback.format_exc()[-4000:])
                if fail_fast or not isinstance(e, Exception):  # Ctrl-C stops the grid
                    raise
                print(f"{tag}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)  # even without progress
                counts["failed"] += 1
                continue
            if ok:
                say(f"{tag}: done ({_headline(table)})")
                counts["done"] += 1
            else:
                say(f"{tag}: finished, but another process took the run over; its results were kept")
                counts["busy"] += 1
    finally:
        con.close()
    if progress or counts["failed"]:
        print(f"{len(grid)} runs: {counts['done']} run now, {counts['skipped']} already done, "
              f"{counts['busy']} running elsewhere, {counts['failed']} failed -> {store_path}")
    return ids
