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
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from reprpo.config import RunConfig, load_yaml, to_dict, to_flat
from reprpo.data.shifts import check_sources, shift_spec
from reprpo.errors import ConfigError, ReprpoError, TrainingError
from reprpo.experiments import store
from reprpo.progress import bar, write

# keys that change where or how a run reports, never its results: left out of the run_id
NOT_IN_RUN_ID = ("out", "train.progress", "train.save_every", "train.keep_checkpoints", "train.report_to", "train.eval_every",
                 "train.eval_pairs", "eval.after_train", "eval.per_pair_format")


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run_id_of(cfg: RunConfig) -> str:
    """12 hex digits of sha256 over the canonical JSON of the config without NOT_IN_RUN_ID."""
    flat = {k: v for k, v in to_flat(cfg).items() if k not in NOT_IN_RUN_ID}
    text = json.dumps(flat, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_settings(base: RunConfig) -> dict[str, Any]:
    """The fields of `base` that differ from the defaults: what the user set. (A field set to
    its default value is indistinguishable from an unset one, so a preset's value wins there.)"""
    default = to_flat(RunConfig())
    return {k: v for k, v in to_flat(base).items() if k != "out" and v != default[k]}


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
    return [(int(r["step"]), k, float(v)) for r in m.to_dict("records") for k, v in r.items()
            if k != "step" and not (k.startswith("eval/") and math.isnan(v))]  # eval/ columns: blank off eval steps


def coherence_rows(metrics: dict[str, dict[str, float]]) -> list[tuple]:
    return [(model, k, float(v)) for model, d in metrics.items() for k, v in d.items()]


def check_finite(table: str, rows: list[tuple], *, out: Path) -> None:
    """Raise TrainingError on the first NaN / inf score among `rows` (columns of store.COLUMNS[table]).
    Curves are not checked: a key a step did not log is NaN there and is stored as NULL."""
    cols = store.COLUMNS[table]
    for r in rows:
        for c, v in zip(cols, r):
            if isinstance(v, float) and not math.isfinite(v):
                where = ", ".join(f"{k} {x}" for k, x in zip(cols, r) if k in ("split", "model", "pair", "metric"))
                raise TrainingError(f"{out}: non-finite score {c} = {v} in {table} ({where}); the adapter has "
                                    "probably diverged: lower train.lr or check the data. Nothing was written.")


# -- the grid --------------------------------------------------------------------------------
def resumable(cfg: RunConfig) -> str | None:
    """"auto" when the run directory holds a checkpoint of this very run (an earlier attempt was
    killed half-way), else None (start clean). A checkpoint of other code is said and ignored."""
    from reprpo.checkpoint import check_matches, checkpoints, read_checkpoint
    from reprpo.errors import TrainingError

    found = checkpoints(Path(cfg.out))
    if not found:
        return None
    try:
        check_matches(read_checkpoint(found[-1])[1], to_flat(cfg), path=found[-1])
    except TrainingError as e:
        print(f"{cfg.out}: not resuming ({e}); training from the start", file=sys.stderr)
        return None
    return "auto"


def generation_na(cfg: RunConfig) -> bool:
    """True when the method's score is not the LM's own log-prob margin (`Scorer.lm` False: a
    reward head, a probe), so there is no generation of the method to check."""
    from reprpo.methods.presets import scorer_of

    return not scorer_of(cfg).lm


TARGET = "target:"  # store method label of a target-tuned run: "target:dpo"


def target_config(*, method: str, shift: str, seed: int, base: RunConfig, out_root: str | Path,
                  overrides: dict[str, Any] | None = None) -> RunConfig:
    """The target-tuned run of (shift, seed): `method` trained on the shift's oos distribution's
    own train split and scored on that shift's oos split (GENIES's "target-tuned capability",
    the denominator of differential elicitation)."""
    from reprpo.data.shifts import resolve_shift

    s = resolve_shift(shift)
    if not s.oos_train:
        raise ConfigError(f"--target-tuned: shift {shift} names no oos distribution with a train split.")
    data = {"data.train": s.oos_train, "data.eval": {"oos": s.splits["oos"]}}
    return build_run_config(method=method, shift=shift, seed=seed, base=base, out_root=out_root, overrides=(overrides or {}) | data)


def execute_run(cfg: RunConfig, con, *, run_id: str, owner: str):
    """Train, score, generation-check one claimed run and write it to the store (one
    transaction). Scoring happens here, once (train() itself never evaluates).

    Returns (written: False if another process took the run over meanwhile, summary table)."""
    from reprpo.eval.coherence import run_coherence
    from reprpo.eval.scoring import evaluate_run
    from reprpo.train import train

    out = Path(cfg.out)
    t0 = time.time()
    train(cfg, resume=resumable(cfg))  # a killed attempt's checkpoint is continued; else its files are cleared
    t1 = time.time()
    table, per_pair = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
    # the generation check needs a method that generates: a reward head or a probe scores, it
    # does not generate (n/a); steer-mean generates with its vector added (eval/coherence.py)
    coh = {} if generation_na(cfg) else run_coherence(cfg, adapter_dir=out, save=out / "generations.jsonl")
    t2 = time.time()
    scores = {"split_scores": split_rows(table), "pair_scores": pair_rows(per_pair), "coherence": coherence_rows(coh)}
    for name, rows in scores.items():  # SQLite would store NaN as NULL (or refuse it): never write one
        check_finite(name, rows, out=out)
    return store.finish_run(
        con, run_id=run_id, owner=owner, split_rows=scores["split_scores"], pair_rows=scores["pair_scores"],
        curve_rows=curve_rows(out / "metrics.csv"), coherence_rows=scores["coherence"],
        train_seconds=t1 - t0, eval_seconds=t2 - t1,
    ), table


def check_out_root(out: Path) -> None:
    """`--out` must be (or become) a directory we can write run directories into."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory. Pass --out a new or existing directory, or move the file away.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror}). Pass --out a directory in a place you can write.") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the directory is not writable. Fix its permissions or pass --out another directory.")


def _headline(table) -> str:
    parts = []
    for r in table.to_dict("records"):
        parts.append(f"{r['split']} {100 * r['base_accuracy']:.0f}->{100 * r['adapter_accuracy']:.0f}%")
    return ", ".join(parts)


def run_grid(*, methods: list[str], shifts: list[str], seeds: list[int], base: RunConfig,
             store_path: str | Path, out_root: str | Path, overrides: dict[str, dict[str, Any]] | None = None,
             progress: bool = True, fail_fast: bool = False, target_tuned: str | None = None) -> list[str]:
    """Run every (method, shift, seed) not yet done; returns the grid's run_ids in run order.

    overrides: {method: {config key: value}} applied over `base` for that method only.
    Order: seeds outermost, so an interrupted grid has every method for its first seeds.
    A failing run is marked 'failed' (error text stored, prefixed by its kind: see
    `store.error_text`) and the grid goes on, unless `fail_fast`. Config errors (unknown method /
    shift / key) and missing data sources (`check_sources`) are raised before any run starts.

    target_tuned: a method (e.g. "dpo") also trained, per (shift, seed), on the oos
    distribution's own train split (`target_config`); stored as method "target:METHOD", it gives
    the report's differential elicitation.
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
    if target_tuned:
        from reprpo.methods.base import PRESETS

        PRESETS.check(target_tuned, where="--target-tuned")
    grid, checked = [], set()
    for seed in seeds:
        for shift in shifts:
            jobs = [(m, m) for m in methods] + ([(TARGET + target_tuned, target_tuned)] if target_tuned else [])
            for label, method in jobs:
                make = target_config if label.startswith(TARGET) else build_run_config
                cfg = make(method=method, shift=shift, seed=seed, base=base, out_root=out_root, overrides=overrides.get(method))
                if not progress:
                    cfg.train.progress = False
                d = cfg.data
                sources = (d.shift, d.train, tuple(sorted(d.eval.items())))
                if sources not in checked:  # a missing file: error now, not after every run has trained
                    check_sources(d.shift, d.train, d.eval, eval_fraction=d.eval_fraction)
                    checked.add(sources)
                grid.append((label, cfg))

    check_out_root(Path(out_root))
    say = write if progress else (lambda *a, **k: None)  # write: a line that leaves the grid's bar intact
    con = store.connect(store_path)
    owner = store.owner_id()
    counts = {"done": 0, "skipped": 0, "busy": 0, "failed": 0, "recurring": 0}
    ids = []
    pbar = bar(grid, desc="compare", unit="run", enabled=progress)  # counts a run when it is done, skipped or failed
    try:
        for i, (label, cfg) in enumerate(pbar, 1):
            rid = run_id_of(cfg)
            ids.append(rid)
            tag = f"[{i}/{len(grid)}] {label} {cfg.data.shift} seed {cfg.train.seed} ({rid})"
            state = store.claim_run(con, run_id=rid, method=label, shift=cfg.data.shift, seed=cfg.train.seed,
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
                recurs = isinstance(e, ReprpoError)  # bad config / data, diverged, missing model
                kind = store.RECURRING if recurs else store.TRANSIENT
                store.fail_run(con, run_id=rid, owner=owner, error=store.error_text(kind, e, trace=traceback.format_exc()))
                if fail_fast or not isinstance(e, Exception):  # Ctrl-C stops the grid
                    raise
                why = "will recur with these settings: fix the cause first" if recurs else "rerun to retry"
                write(f"{tag}: FAILED ({why}): {type(e).__name__}: {e}", file=sys.stderr)  # even without progress
                counts["failed"] += 1
                counts["recurring"] += recurs
                continue
            if ok:
                say(f"{tag}: done ({_headline(table)})")
                counts["done"] += 1
            else:
                say(f"{tag}: finished, but another process took the run over; its results were kept")
                counts["busy"] += 1
    finally:
        pbar.close()
        con.close()
    if progress or counts["failed"]:
        print(f"{len(grid)} runs: {counts['done']} run now, {counts['skipped']} already done, "
              f"{counts['busy']} running elsewhere, {counts['failed']} failed ({counts['recurring']} will recur "
              f"with these settings) -> {store_path}")
    return ids
