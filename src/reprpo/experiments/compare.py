"""`reprpo compare`: train and score every (method, shift, seed) of a grid into the results store.

A run's config = RunConfig defaults < the method preset < the base settings (what the user set:
model, sizes, ...) < per-method overrides (`--params METHOD=FILE.yaml`, e.g. from
`reprpo tune`) < data.shift, train.seed, train.method, out. Its run_id is a hash of that
config minus output-only keys, so the same settings always give the same id and a rerun
skips what is done; a run left 'running' by a killed process or 'failed' is redone.
Several processes may run grids into one store at once (see `reprpo.experiments.store`), all on
one host: `--workers N` starts N of them (`run_workers`). A cluster runs one `--shard K/N` per
node into a local store, then `--merge`s the stores (`merge_grid`; docs/scaling-grids.md).
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

from reprpo.config import SECTIONS, RunConfig, load_yaml, to_dict, to_flat
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


def build_grid(*, methods: list[str], shifts: list[str], seeds: list[int], base: RunConfig, out_root: str | Path,
               overrides: dict[str, dict[str, Any]] | None = None, progress: bool = True,
               target_tuned: str | None = None) -> list[tuple[str, RunConfig]]:
    """The grid's (store method label, run config) pairs in run order (seeds outermost), every
    input checked: unknown method / shift / key, --params of a method not in the grid, missing
    data sources (`check_sources`) raise here, before any run starts."""
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
    return grid


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (1 <= K <= N) -> (K, N): this node's share of the grid is every N-th run from the K-th."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. --shard 2/4 on the second of 4 nodes.")
    return k, n


def take_shard(grid: list, shard: tuple[int, int] | None) -> list:
    """The runs at grid positions K-1, K-1+N, K-1+2N, ... (0-based): N shards partition the grid,
    and each is a mix of methods and seeds (the grid is seed-major)."""
    if shard is None:
        return grid
    k, n = shard
    return grid[k - 1::n]


NOT_RUN_HERE = ("skipped", "busy", "failed-elsewhere")  # claim_and_run events of runs this grid passes: the bar's skip


def claim_and_run(grid: list[tuple[str, RunConfig]], *, con, owner: str, fail_fast: bool, emit,
                  failed_since: float | None = None) -> None:
    """Claim each run of `grid` in order (`store.claim_run`) and train + score the claimed ones
    (`execute_run`); `emit(event)` hears every step: a dict with i (1-based grid position), rid,
    line (the text for the user), event = skipped (done before) | busy (another live owner) |
    failed-elsewhere (a sibling worker failed it in this grid: not retried) | start | done |
    taken (finished, but another process took the run over) | failed (with recurring, and fatal:
    the grid stops, the exception is re-raised after the event)."""
    from reprpo.checkpoint import code_version

    version = code_version()  # of the source this process runs (read once, before any run)
    for i, (label, cfg) in enumerate(grid, 1):
        rid = run_id_of(cfg)
        tag = f"[{i}/{len(grid)}] {label} {cfg.data.shift} seed {cfg.train.seed} ({rid})"
        ev = {"i": i, "rid": rid}
        state = store.claim_run(con, run_id=rid, method=label, shift=cfg.data.shift, seed=cfg.train.seed,
                                config_json=json.dumps(to_dict(cfg), sort_keys=True), out_dir=cfg.out, owner=owner,
                                failed_since=failed_since, code_version=version)
        if state != "claimed":
            event, why = {"done": ("skipped", "done"), "busy": ("busy", "running in another process"),
                          "failed": ("failed-elsewhere", "failed in another worker")}[state]
            emit(ev | {"event": event, "line": f"{tag}: skip ({why})"})
            continue
        emit(ev | {"event": "start", "line": f"{tag}: running -> {cfg.out}"})
        try:
            ok, table = execute_run(cfg, con, run_id=rid, owner=owner)
        except BaseException as e:
            recurs = isinstance(e, ReprpoError)  # bad config / data, diverged, missing model
            kind = store.RECURRING if recurs else store.TRANSIENT
            error = store.error_text(kind, e, trace=traceback.format_exc())
            try:
                store.fail_run(con, run_id=rid, owner=owner, error=error)
            except KeyboardInterrupt:  # a stop (--fail-fast in a sibling, Ctrl-C) landed while marking it: mark it, then stop
                store.fail_run(con, run_id=rid, owner=owner, error=error)
                raise
            fatal = fail_fast or not isinstance(e, Exception)  # Ctrl-C stops the grid
            why = "will recur with these settings: fix the cause first" if recurs else "rerun to retry"
            emit(ev | {"event": "failed", "recurring": recurs, "fatal": fatal,
                       "line": f"{tag}: FAILED ({why}): {type(e).__name__}: {e}"})
            if fatal:
                raise
            continue
        if ok:
            emit(ev | {"event": "done", "line": f"{tag}: done ({_headline(table)})"})
        else:
            emit(ev | {"event": "taken", "line": f"{tag}: finished, but another process took the run over; its results were kept"})


class Tally:
    """The grid's summary counts: every run counted once, by its outcome."""

    KEYS = ("done", "skipped", "busy", "failed", "recurring", "lost")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.KEYS, 0)

    def add(self, event: str, *, recurring: bool = False) -> None:
        key = {"taken": "busy", "failed-elsewhere": "failed"}.get(event, event)
        self.counts[key] += 1
        self.counts["recurring"] += key == "failed" and recurring

    def line(self, n: int, store_path) -> str:
        c = self.counts
        lost = f", {c['lost']} lost with a crashed worker" if c["lost"] else ""
        return (f"{n} runs: {c['done']} run now, {c['skipped']} already done, {c['busy']} running elsewhere, "
                f"{c['failed']} failed ({c['recurring']} will recur with these settings){lost} -> {store_path}")


def run_grid(*, methods: list[str], shifts: list[str], seeds: list[int], base: RunConfig,
             store_path: str | Path, out_root: str | Path, overrides: dict[str, dict[str, Any]] | None = None,
             progress: bool = True, fail_fast: bool = False, target_tuned: str | None = None,
             workers: int = 1, shard: tuple[int, int] | None = None, after_run=None) -> list[str]:
    """Run every (method, shift, seed) not yet done; returns the grid's run_ids in run order.
    `after_run()`: called after each run that finishes (a study archives its store there).

    overrides: {method: {config key: value}} applied over `base` for that method only.
    Order: seeds outermost, so an interrupted grid has every method for its first seeds.
    A failing run is marked 'failed' (error text stored, prefixed by its kind: see
    `store.error_text`) and the grid goes on, unless `fail_fast`. Config errors (unknown method /
    shift / key) and missing data sources (`check_sources`) are raised before any run starts.

    target_tuned: a method (e.g. "dpo") also trained, per (shift, seed), on the oos
    distribution's own train split (`target_config`); stored as method "target:METHOD", it gives
    the report's differential elicitation.

    workers: runs at once, each worker a process of its own (`run_workers`); 1 = one after
    another in this process. shard: (K, N) keeps only this node's share (`take_shard`).
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give how many runs to train at once, 1 or more "
                          "(1 = one after another in this process).")
    grid = take_shard(build_grid(methods=methods, shifts=shifts, seeds=seeds, base=base, out_root=out_root,
                                 overrides=overrides, progress=progress, target_tuned=target_tuned), shard)
    check_out_root(Path(out_root))
    tally = Tally()
    if min(workers, len(grid)) > 1:  # more workers than runs: one per run
        run_workers(grid, workers=min(workers, len(grid)), store_path=store_path, out_root=Path(out_root),
                    fail_fast=fail_fast, progress=progress, tally=tally, after_run=after_run)
    else:
        say = write if progress else (lambda *a, **k: None)  # write: a line that leaves the grid's bar intact
        con = store.connect(store_path)
        pbar = bar(total=len(grid), desc="compare", unit="run", enabled=progress)  # counts a run when it is done, skipped or failed; its rate is of the runs run

        def emit(ev: dict) -> None:
            if ev["event"] == "failed":
                if ev["fatal"]:
                    return  # the exception goes on up and says it
                write(ev["line"], file=sys.stderr)  # even without progress
            else:
                say(ev["line"])
            if ev["event"] != "start":
                tally.add(ev["event"], recurring=ev.get("recurring", False))
                (pbar.skip if ev["event"] in NOT_RUN_HERE else pbar.update)(1)
            if ev["event"] == "done" and after_run:
                after_run()

        try:
            claim_and_run(grid, con=con, owner=store.owner_id(), fail_fast=fail_fast, emit=emit)
        finally:
            pbar.close()
            con.close()
    if progress or tally.counts["failed"]:
        print(tally.line(len(grid), store_path))
    return [run_id_of(cfg) for _, cfg in grid]


# -- parallel workers ------------------------------------------------------------------------
# Workers are processes, not threads: torch's global RNG (set_seed in train), its thread pool and
# autograd state are per process, so each run in a worker is the run it would be alone.
WORKER_COMMAND = [sys.executable, "-c", "import sys; from reprpo.experiments.compare import worker_main; "
                                        "sys.exit(worker_main(sys.argv[1:]))"]
STOP_SECONDS = 60.0  # after a stop (--fail-fast, Ctrl-C), how long a worker may take to mark its run failed


def visible_gpus(grid: list[tuple[str, RunConfig]]) -> list[str]:
    """The CUDA devices the grid's runs would use (their CUDA_VISIBLE_DEVICES names); [] when no
    run trains on CUDA (`device_type`: cpu, mps, or auto without a GPU)."""
    from reprpo.model.loading import device_type

    if not any(device_type(cfg.train.device) == "cuda" for _, cfg in grid):
        return []
    import torch

    k = torch.cuda.device_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [s.strip() for s in given.split(",") if s.strip()] if given else [str(j) for j in range(k)]
    return names[:k]


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask, e.g. a scheduler's allocation), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_env(index: int, *, workers: int, gpus: list[str], threads: int) -> dict[str, str]:
    """The environment of worker `index` (0-based): its own GPU, GPU index mod len(gpus), when
    there are GPUs; its share of the CPU threads."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


def worker_main(argv: list[str]) -> int:
    """One worker of `run_workers`, in a process of its own: `JOB.json INDEX`. Claims and runs the
    job's grid in order (`claim_and_run`), telling the parent each event as one JSON line on
    stdout; everything else it prints goes to its log (its stderr)."""
    job_path, index = argv
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the parent's pipe: protocol lines only
    os.dup2(2, 1)  # any other print (a library's) goes to the worker's log, not into the protocol
    job = json.loads(Path(job_path).read_text())
    import torch

    from reprpo import progress as prog
    from reprpo.config import from_dict

    torch.set_num_threads(job["threads"])
    prog.set_quiet(True)  # the parent shows the one bar over the grid
    prog.quiet_third_party_warnings()
    grid = []
    for r in job["runs"]:
        cfg = from_dict(r["config"], where=f"{job_path}: run {r['rid']}")
        if run_id_of(cfg) != r["rid"]:
            sent = {f"{k}.{k2}" if k in SECTIONS else k: v2
                    for k, v in r["config"].items() for k2, v2 in (v.items() if k in SECTIONS else [(k, v)])}
            changed = sorted(k for k, v in to_flat(cfg).items() if sent.get(k, v) != v)
            raise ConfigError(f"{job_path}: run {r['rid']} comes back as {run_id_of(cfg)} in worker {index} "
                              f"(changed: {', '.join(changed) or '?'}); please report this.")
        grid.append((r["label"], cfg))

    def emit(ev: dict) -> None:
        proto.write(json.dumps(ev | {"worker": int(index), "pid": os.getpid()}) + "\n")

    con = store.connect(job["store"])
    try:
        claim_and_run(grid, con=con, owner=store.owner_id(), fail_fast=job["fail_fast"], emit=emit,
                      failed_since=job["started"])
    except KeyboardInterrupt:
        print(f"worker {index}: stopped", file=sys.stderr)
        return 130
    finally:
        con.close()
    return 0


def _read_events(index: int, stream, q) -> None:
    for line in stream:
        try:
            q.put((index, json.loads(line)))
        except ValueError:  # not ours (the worker sends only JSON lines here)
            continue
    q.put((index, None))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + s for s in text.rstrip().splitlines()[-lines:]) or "    (empty)"


def run_workers(grid: list[tuple[str, RunConfig]], *, workers: int, store_path: str | Path, out_root: Path,
                fail_fast: bool, progress: bool, tally: Tally, after_run=None) -> None:
    """Train `grid` with `workers` processes sharing one store: each claims runs in grid order
    (`store.claim_run`, atomic) and skips those done or held by a live owner, so no run is
    trained twice. One bar over the grid here, counted from the workers' events; a run counts
    once: when a worker finishes or fails it, or when every worker has passed it (skipped).

    A worker that dies leaves its run 'running' under a dead owner (a rerun redoes it); the
    others go on, and then a TrainingError names its exit code and its log's last lines.
    --fail-fast and Ctrl-C stop every worker (SIGINT: each marks its run failed)."""
    import queue
    import signal
    import subprocess
    import threading

    say = write if progress else (lambda *a, **k: None)
    store.connect(store_path).close()  # create / check the store once, before the workers race for it
    gpus = visible_gpus(grid)
    if gpus and workers > len(gpus):
        write(f"--workers {workers}: {len(gpus)} GPU(s) visible, so workers share them (worker i on GPU i mod {len(gpus)})",
              file=sys.stderr)
    threads = max(1, cpu_count() // workers)
    logs_dir = out_root / "workers"
    logs_dir.mkdir(exist_ok=True)
    job_path = logs_dir / f"job-{os.getpid()}.json"
    started = time.time()  # a run failed since then failed in a sibling: not retried in this grid
    job_path.write_text(json.dumps({"store": str(Path(store_path).resolve()), "fail_fast": fail_fast, "threads": threads,
                                    "started": started, "runs": [{"label": label, "rid": run_id_of(cfg), "config": to_dict(cfg)}
                                                                 for label, cfg in grid]}))
    q: queue.Queue = queue.Queue()
    procs, logs = [], []
    try:
        for w in range(workers):
            logs.append(logs_dir / f"{os.getpid()}-worker-{w}.log")
            with open(logs[w], "w") as log:
                # a session of its own: a terminal's Ctrl-C reaches only this process, which stops each worker once
                procs.append(subprocess.Popen([*WORKER_COMMAND, str(job_path), str(w)], stdout=subprocess.PIPE, stderr=log,
                                              env=worker_env(w, workers=workers, gpus=gpus, threads=threads),
                                              text=True, start_new_session=True))
            threading.Thread(target=_read_events, args=(w, procs[w].stdout, q), daemon=True).start()
        on_gpu = f"; GPUs {','.join(gpus[w % len(gpus)] for w in range(workers))}" if gpus else ""
        say(f"compare: {len(grid)} runs, {workers} worker processes ({threads} CPU thread(s) each{on_gpu}), "
            f"logs {logs_dir}/{os.getpid()}-worker-*.log")
        pbar = bar(total=len(grid), desc="compare", unit="run", enabled=progress)
        heard: dict[int, set[int]] = {i: set() for i in range(1, len(grid) + 1)}  # workers that passed run i
        started_by: dict[int, int] = {}
        passed: dict[int, dict] = {}  # i -> a skip event (counted if no worker runs it)
        settled: set[int] = set()
        fatal, stop_at, interrupted = None, None, False
        open_streams = set(range(workers))

        def settle(i: int, event: str, *, line: str = "", recurring: bool = False) -> None:
            settled.add(i)
            tally.add(event, recurring=recurring)
            (pbar.skip if event in NOT_RUN_HERE else pbar.update)(1)
            if event == "failed":
                write(line, file=sys.stderr)
            elif line:
                say(line)
            if event == "done" and after_run:
                after_run()

        def check_passed(i: int) -> None:
            if i in settled or len(heard[i]) < workers:
                return
            if i in started_by:  # started, never finished: its worker died
                settle(i, "lost", line=f"[{i}/{len(grid)}] {grid[i - 1][0]}: lost (worker {started_by[i]} died running it)")
            elif i in passed:
                settle(i, passed[i]["event"], line=passed[i]["line"])

        def stop() -> None:
            nonlocal stop_at
            if stop_at is None:
                stop_at = time.monotonic() + STOP_SECONDS
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)

        with pbar:
            while open_streams:
                try:
                    try:
                        w, ev = q.get(timeout=0.2)
                    except queue.Empty:
                        if stop_at is not None and time.monotonic() > stop_at:
                            for p in procs:
                                if p.poll() is None:
                                    p.kill()  # its run stays 'running' with a dead owner: redone on rerun
                        continue
                    if ev is None:  # the worker closed its pipe: it has exited (or is exiting)
                        open_streams.discard(w)
                        procs[w].wait()
                        for i in heard:
                            heard[i].add(w)
                            check_passed(i)
                        continue
                    i, event = ev["i"], ev["event"]
                    if event == "start":
                        started_by[i] = w
                        say(f"{ev['line']} (worker {w})")
                        continue
                    heard[i].add(w)
                    if event in ("done", "taken", "failed") and i not in settled:
                        started_by.pop(i, None)
                        settle(i, event, line=ev["line"], recurring=ev.get("recurring", False))
                        if event == "failed" and ev.get("fatal") and fatal is None and not interrupted:
                            fatal = (w, ev)
                            stop()
                    elif event in ("skipped", "busy", "failed-elsewhere"):
                        # what this worker saw; a sibling may be running it: counted once all have passed it
                        if i not in passed or event == "skipped":
                            passed[i] = ev
                        check_passed(i)
                except KeyboardInterrupt:
                    if interrupted:  # a second Ctrl-C: do not wait
                        for p in procs:
                            if p.poll() is None:
                                p.kill()
                        raise
                    interrupted = True
                    write(f"compare: stopping {workers} workers (Ctrl-C again to kill them)", file=sys.stderr)
                    stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout:
                p.stdout.close()
        job_path.unlink(missing_ok=True)
    if interrupted:
        raise KeyboardInterrupt
    if fatal is not None:
        w, ev = fatal
        raise TrainingError(f"--fail-fast: {ev['line']} (worker {w}); every worker was stopped. "
                            f"The error is in {store_path} (runs.error) and {logs[w]}.")
    crashed = [(w, p.returncode) for w, p in enumerate(procs) if p.returncode != 0]
    if crashed:
        print(tally.line(len(grid), store_path))
        parts = []
        for w, rc in crashed:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            parts.append(f"worker {w} (pid {procs[w].pid}) {how}. Last lines of {logs[w]}:\n{_tail(logs[w])}")
        raise TrainingError("\n".join(parts) + "\nA run a dead worker was training is left 'running' under its dead owner; "
                            "rerun the same command to redo it.")


def merge_grid(grid: list[tuple[str, RunConfig]], *, sources: list[str], store_path: str | Path) -> list[str]:
    """Copy the grid's done runs (with their rows) from other stores (e.g. one per node, each
    filled by `--shard K/N`) into `store_path`; returns the grid's run_ids still not done there."""
    dest = Path(store_path).resolve()
    ids = [run_id_of(cfg) for _, cfg in grid]
    for s in sources:
        if not Path(s).is_file():
            raise ConfigError(f"--merge {s}: no such file. Give the results stores to merge (comma-separated).")
        if Path(s).resolve() == dest:
            raise ConfigError(f"--merge {s}: that is --store itself. Merge other stores into it.")
    con = store.connect(store_path)
    try:
        for s in sources:
            src = store.connect(s)
            try:
                copied, kept = store.copy_runs(src, con, ids)
            finally:
                src.close()
            print(f"{s}: {len(copied)} run(s) copied, {len(kept)} already done in {store_path}")
        statuses = store.run_statuses(con, ids)
    finally:
        con.close()
    return [r for r in ids if statuses.get(r) != "done"]
