"""`reprpo study FILE`: plan -> tune -> compare -> report, from one study file (docs/study.md).

A study file (`configs/studies/*.yaml`) names the models, the methods (presets with fixed
overrides; "candidates, keep the top k" groups), a validation shift per method family (kind)
for tuning, the reported shifts, the seeds, the train/eval sizes, the trial budget and a
compute budget in hours. `load_study` validates it (an unknown key, a validation shift that is
also reported, an unknown preset: an error naming the file and the key).

Phases, each resumable after a kill -9 at any point:
- plan: every input checked, then an ETA *measured on this machine* (`measure_speed`: a few
  real train steps and the scoring and generation of a few pairs with the study's model and
  sizes; once runs or trials have finished, scaled by how long they took: `calibrated`),
  refused when over `budget_hours` unless `--yes`;
- tune: `tune.run_tune` per method on its family's validation shift (optuna SQLite study per
  model: trials already finished are not redone); a candidates group keeps its top k presets
  by the best validation objective (`select_kept`);
- compare: `compare.run_grid` over every (method, reported shift, seed) of each model with the
  tuned parameters (one results store per model: runs done are skipped, a killed run redone);
- report: `verdict.render_verdict` when that module exists, else `report.render_report`.

Layout: STUDY_DIR/study.yaml (the file as run), eta.json (measurements, by machine and
settings), and per model STUDY_DIR/MODEL/{tune/, runs/, results.sqlite, report/}. One store per
model because the report groups runs by method, shift and seed, not by model.
"""

from __future__ import annotations

import json
import math
import re
import socket
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reprpo.config import SECTIONS, RunConfig, apply_overrides, load_yaml, to_flat
from reprpo.data.shifts import list_shifts, shift_spec
from reprpo.errors import ConfigError, ReprpoError
from reprpo.progress import write

TOP_KEYS = {
    "name": "study name (default: the file's stem); the study directory is runs/studies/NAME",
    "description": "free text",
    "out": "study directory (default runs/studies/NAME); `--out` overrides",
    "models": "model names / Hub ids / paths, or {name, set: {dotted key: value}} mappings",
    "shifts": "{file: PATH/shifts.json | builtin, reported: [NAME, ...]} (default reported: every shift of the file but the validation ones)",
    "validation": "tuning shift: one NAME for every method family, or {default: NAME, KIND: NAME}; never a reported shift",
    "methods": "presets: NAME, {preset, set, trials}, or {candidates: [NAME, ...], keep: K, name, set, trials}",
    "seeds": "seeds of the compared runs",
    "sizes": "{n_train, n_eval, max_steps, epochs, batch_size} of the compared runs",
    "tune": "{trials (per method), n_train, n_eval, max_steps, epochs, batch_size} (sizes default to `sizes`)",
    "compare": "{target_tuned: METHOD | null}",
    "base": "config sections (model, data, lora, train, method, speed, eval) fixed for every run",
    "budget_hours": "compute budget: a plan whose measured ETA is over it is refused unless --yes",
    "gpu": "keys (models, seeds, sizes, tune, base, budget_hours, compare) replacing the above when a CUDA GPU is visible",
    "archive": "a folder to commit: per model the done runs' tables (CSV) and the tuning trials; read back at the start, "
               "so the study resumes from a fresh checkout (experiments/archive.py); the verdict is written there too",
}
SIZE_KEYS = {"n_train": "data.n_train", "n_eval": "data.n_eval", "max_steps": "train.max_steps", "epochs": "train.epochs",
             "batch_size": "train.batch_size"}
GPU_KEYS = ("models", "seeds", "sizes", "tune", "base", "budget_hours", "compare", "archive")
SET_BY_STUDY = ("data.shift", "data.train", "data.eval", "train.method", "train.seed", "model.name", "out")
TRAINING_FREE = ("probe", "steer")  # method kinds that take no gradient step
NO_GENERATION = ("probe", "reward")  # kinds whose scorer is not the LM's margin: no generation check (compare.generation_na)
EVAL_SPLITS = 4  # train, test, oos, rnd


@dataclass
class Method:
    preset: str
    kind: str
    set: dict[str, Any] = field(default_factory=dict)
    trials: int = 0
    group: str = ""  # the candidates group it belongs to ("" = always compared)


@dataclass
class Group:
    name: str
    members: list[str]
    keep: int


@dataclass
class Model:
    name: str
    set: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name).strip("_.") or "model"


@dataclass
class Study:
    path: Path
    name: str
    out: Path
    models: list[Model]
    reported: list[str]  # shift specs
    validation: dict[str, str]  # method kind (or "default") -> shift spec
    methods: list[Method]
    groups: list[Group]
    seeds: list[int]
    sizes: dict[str, Any]  # dotted keys
    tune_sizes: dict[str, Any]
    base: dict[str, Any]  # dotted keys
    budget_hours: float
    target_tuned: str | None
    profile: str  # cpu | gpu: which keys were used
    raw: dict[str, Any] = field(default_factory=dict)
    archive: Path | None = None  # committed copy of the finished work (experiments/archive.py)

    def validation_of(self, m: Method) -> str:
        return self.validation.get(m.kind) or self.validation["default"]

    def run_base(self, model: Model, sizes: dict[str, Any]) -> dict[str, Any]:
        """The flat settings every run of `model` gets: base < sizes < the model's own set."""
        return self.base | sizes | model.set | {"model.name": model.name}


# --------------------------------------------------------------------------- the file
def _err(path: Path, where: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {msg}")


def _mapping(v: Any, path: Path, where: str) -> dict:
    if not isinstance(v, dict):
        raise _err(path, where, f"expected a mapping, got {type(v).__name__} {v!r}.")
    return v


def _known(d: dict, known, path: Path, where: str) -> None:
    for k in d:
        if k not in known:
            raise _err(path, where, f"unknown key {k!r}. Known keys: {', '.join(known)} (docs/study.md).")


def _flat(values: dict, path: Path, where: str) -> dict[str, Any]:
    """Nested sections or dotted keys -> dotted keys, each checked against RunConfig."""
    out: dict[str, Any] = {}
    for k, v in _mapping(values, path, where).items():
        if k in SECTIONS and isinstance(v, dict):
            out |= {f"{k}.{k2}": v2 for k2, v2 in v.items()}
        else:
            out[k] = v
    for k in out:
        if k in SET_BY_STUDY:
            raise _err(path, where, f"{k} is set by the study (models, shifts, seeds, methods): drop it here.")
    apply_overrides(RunConfig(), out, where=f"{path}: {where}")  # unknown keys, bad values: named with the file
    return out


def _sizes(v: Any, path: Path, where: str, *, extra=()) -> dict[str, Any]:
    d = _mapping(v or {}, path, where)
    _known(d, [*SIZE_KEYS, *extra], path, where)
    return _flat({SIZE_KEYS[k]: x for k, x in d.items() if k in SIZE_KEYS}, path, where)


def _spec(name: Any, file: str, path: Path, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise _err(path, where, f"expected a shift name, got {name!r}.")
    name = name.strip()
    if ":" in name or file == "builtin":
        return shift_spec(name)
    return f"{file}:{name}"


def load_study(path: str | Path, *, out: str | Path | None = None, profile: str = "auto") -> Study:
    """Read and validate a study file. profile: cpu | gpu | auto (gpu when CUDA is visible)."""
    from reprpo.registered_names import KINDS, REGISTRY_FIELDS

    path = Path(path)
    raw = load_yaml(path, what="study file", expect="a mapping of study keys (name, models, shifts, methods, ...)")
    _known(raw, TOP_KEYS, path, "top level")
    gpu = _mapping(raw.get("gpu") or {}, path, "gpu")
    _known(gpu, GPU_KEYS, path, "gpu")
    if profile == "auto":
        profile = "gpu" if gpu and _cuda() else "cpu"
    if profile not in ("cpu", "gpu"):
        raise ConfigError(f"--profile {profile!r}: expected cpu, gpu or auto.")
    d = raw | (gpu if profile == "gpu" else {})
    base = _flat(raw.get("base") or {}, path, "base") | (_flat(gpu.get("base") or {}, path, "gpu.base") if profile == "gpu" else {})

    name = str(d.get("name") or path.stem)
    where_out = out or d.get("out") or Path("runs") / "studies" / name

    models = []
    for i, m in enumerate(d.get("models") or ["smollm2-135m-instruct"]):
        if isinstance(m, str):
            models.append(Model(m))
        else:
            m = _mapping(m, path, f"models[{i}]")
            _known(m, ("name", "set"), path, f"models[{i}]")
            if not isinstance(m.get("name"), str):
                raise _err(path, f"models[{i}]", "give the model's name (a reprpo model name, Hub id or path).")
            models.append(Model(m["name"], _flat(m.get("set") or {}, path, f"models[{i}].set")))
    if len({m.slug for m in models}) < len(models):
        raise _err(path, "models", "a model is named twice.")

    sh = d.get("shifts")
    if isinstance(sh, list):
        sh = {"reported": sh}
    sh = _mapping(sh or {}, path, "shifts")
    _known(sh, ("file", "reported"), path, "shifts")
    file = str(sh.get("file") or "builtin")

    val = d.get("validation")
    if val is None:
        raise _err(path, "validation", "missing: name the shift tuning runs on (one for all, or {default: NAME, KIND: NAME}); it is never reported.")
    val = {"default": val} if isinstance(val, str) else dict(_mapping(val, path, "validation"))
    _known(val, ["default", *KINDS], path, "validation")
    validation = {k: _spec(v, file, path, f"validation.{k}") for k, v in val.items()}

    try:
        in_file = [f"{file}:{r['name']}" for r in list_shifts(file)]
    except ConfigError as e:
        raise _err(path, "shifts.file", f"{e} Give a GENIES shifts.json (relative paths: from the current directory) or `builtin`.") from e
    vals = set(validation.values())
    if sh.get("reported") is None:
        reported = [s for s in in_file if s not in vals]
    else:
        if not isinstance(sh["reported"], list):
            raise _err(path, "shifts.reported", "expected a list of shift names.")
        reported = [_spec(s, file, path, "shifts.reported") for s in sh["reported"]]
    for kind, v in validation.items():
        if v in reported:
            raise _err(path, f"validation.{kind}", f"validation shift {v} is also a reported shift (shifts.reported: "
                       f"{', '.join(reported)}): a shift tuned on is never reported (docs/methods.md, Evaluation). "
                       "Drop it from shifts.reported or tune on another shift.")
    if not reported:
        raise _err(path, "shifts.reported", "no shift left to report.")
    if len(set(reported)) < len(reported):
        raise _err(path, "shifts.reported", "a shift is named twice.")

    tune = _mapping(d.get("tune") or {}, path, "tune")
    trials = tune.get("trials", 0)
    if not isinstance(trials, int) or trials < 0:
        raise _err(path, "tune.trials", f"expected a number of trials >= 0 per method, got {trials!r}.")
    sizes = _sizes(d.get("sizes"), path, "sizes")
    tune_sizes = sizes | _sizes(tune, path, "tune", extra=("trials",))

    presets = set(REGISTRY_FIELDS["train.method"])
    kind_of = {p: k for k, (_, names) in KINDS.items() for p in names}

    def preset_entry(p: Any, where: str) -> str:
        if not isinstance(p, str) or p not in presets:
            from reprpo.methods.base import PRESETS

            PRESETS.check(str(p), where=f"{path}: {where}")  # the registry's error, with the names
        return p

    methods, groups = [], []
    if not isinstance(d.get("methods") or [], list):
        raise _err(path, "methods", "expected a list of presets (NAME, {preset, set, trials} or {candidates, keep, ...}).")
    for i, m in enumerate(d.get("methods") or []):
        where = f"methods[{i}]"
        if isinstance(m, str):
            m = {"preset": m}
        m = _mapping(m, path, where)
        t = m.get("trials", trials)
        if not isinstance(t, int) or t < 0:
            raise _err(path, f"{where}.trials", f"expected a number of trials >= 0, got {t!r}.")
        fixed = _flat(m.get("set") or {}, path, f"{where}.set")
        if "candidates" in m:
            _known(m, ("candidates", "keep", "name", "set", "trials"), path, where)
            cands = m["candidates"]
            if not isinstance(cands, list) or len(cands) < 2:
                raise _err(path, f"{where}.candidates", "expected a list of two or more presets.")
            keep = m.get("keep", 1)
            if not isinstance(keep, int) or not 1 <= keep <= len(cands):
                raise _err(path, f"{where}.keep", f"expected 1 <= keep <= {len(cands)} (the candidates), got {keep!r}.")
            if t < 1:
                raise _err(path, f"{where}.trials", "candidates are ranked by tuning: give tune.trials (or trials here) >= 1.")
            gname = str(m.get("name") or f"group{i}")
            groups.append(Group(gname, [preset_entry(c, f"{where}.candidates") for c in cands], keep))
            methods += [Method(c, kind_of[c], fixed, t, gname) for c in cands]
        else:
            _known(m, ("preset", "set", "trials"), path, where)
            p = preset_entry(m.get("preset"), f"{where}.preset")
            methods.append(Method(p, kind_of[p], fixed, t))
    if not methods:
        raise _err(path, "methods", "give at least one method preset.")
    names = [m.preset for m in methods]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise _err(path, "methods", f"{', '.join(dup)} named twice (a preset is one method of the grid).")
    for m in methods:
        if m.trials and m.kind not in validation and "default" not in validation:
            raise _err(path, "validation", f"no validation shift for {m.preset} (kind {m.kind}): add `default:` or `{m.kind}:`.")

    seeds = d.get("seeds") or [1, 2, 3]
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise _err(path, "seeds", f"expected a list of distinct integers, got {seeds!r}.")
    budget = d.get("budget_hours")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0:
        raise _err(path, "budget_hours", f"give the compute budget in hours (> 0), got {budget!r}.")
    comp = _mapping(d.get("compare") or {}, path, "compare")
    _known(comp, ("target_tuned",), path, "compare")
    target = comp.get("target_tuned")
    if target is not None:
        preset_entry(target, "compare.target_tuned")
    archive = d.get("archive")
    if archive is not None and not isinstance(archive, str):
        raise _err(path, "archive", f"expected a folder path, got {archive!r}.")
    return Study(path=path, name=name, out=Path(where_out), models=models, reported=reported, validation=validation,
                 methods=methods, groups=groups, seeds=list(seeds), sizes=sizes, tune_sizes=tune_sizes,
                 base=base, budget_hours=float(budget), target_tuned=target,
                 profile=profile, raw=raw, archive=Path(archive) if archive else None)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_inputs(study: Study) -> None:
    """Every shift resolves and its data exists; every run config resolves (preset values,
    fixed overrides); an SAE a method names exists. Before anything is measured or trained.
    A method with an empty search space (probe-mms) gets 0 trials."""
    from reprpo.data.shifts import check_sources, resolve_shift
    from reprpo.methods import resolve_config

    for s in {*study.reported, *study.validation.values()}:
        resolve_shift(s)
        check_sources(s, "", {})
    for model in study.models:
        for m in study.methods:
            cfg = resolve_config((f"{study.path}: base", study.run_base(model, study.sizes)), (f"{study.path}: {m.preset} set", m.set),
                                 method=m.preset)
            if m.trials and not searchable(study, model, m):
                m.trials = 0  # nothing to search (probe-mms): its preset values, no trials spent
            if cfg.method.sae and not Path(cfg.method.sae).exists():
                raise ConfigError(f"{study.path}: {m.preset}: method.sae {cfg.method.sae} not found; train it first "
                                  f"(`reprpo sae train --out {cfg.method.sae} ...`, README 'FPO') or drop {m.preset}.")


# --------------------------------------------------------------------------- the ETA
@dataclass
class Speed:
    """What `measure_speed` timed on this machine for one model and the study's sizes."""

    s_per_step: float
    ref_s_per_pair: float  # the reference cache (a forward per training pair)
    overhead_s: float  # train(): model load, setup, save
    load_s: float  # a model load before scoring
    pairs_per_s: float  # scoring (one pass: base or adapter)
    gen_s_per_prompt: float  # the generation check, one prompt, one model
    device: str
    measured_in_s: float


def steps_of(sizes: dict[str, Any], *, training_free: bool) -> int:
    if training_free:
        return 0
    d = to_flat(apply_overrides(RunConfig(), sizes, where="sizes"))
    if d["train.max_steps"]:
        return int(d["train.max_steps"])
    n = d["data.n_train"] or 1000  # 0 = all pairs: unknown here
    return math.ceil(d["train.epochs"] * n / (d["train.batch_size"] * d["train.grad_accum"]))


def measure_speed(study: Study, model: Model, *, work: Path) -> Speed:
    """Time 3 real DPO steps (the study's model, sizes and batch; the first reported shift's
    data), then the scoring of a few pairs and the generation of one prompt."""
    import shutil

    import pandas as pd

    from reprpo.data.prepare import prepare
    from reprpo.data.readers import load_pairs
    from reprpo.data.shifts import sources_of
    from reprpo.eval.coherence import MAX_NEW_TOKENS, generation_check
    from reprpo.eval.scoring import score_pairs, scoring_setup
    from reprpo.methods import resolve_config
    from reprpo.model.forward import adapter_disabled
    from reprpo.model.loading import device_type, load_model
    from reprpo.train import train

    t_all = time.time()
    base = study.run_base(model, study.sizes)
    probe = resolve_config(("study", base), method="dpo")
    per_step = probe.train.batch_size * probe.train.grad_accum
    steps = 3
    run = work / "train"
    shutil.rmtree(work, ignore_errors=True)  # a measurement a kill interrupted
    cfg = resolve_config(("study", base), ("timing", {
        "data.shift": study.reported[0], "data.n_train": steps * per_step, "train.max_steps": steps, "train.save_every": 0,
        "eval.after_train": False, "train.progress": False, "train.report_to": "none", "train.eval_every": 0, "out": str(run)}),
        method="dpo")
    t0 = time.time()
    train(cfg)
    wall = time.time() - t0
    rows = pd.read_csv(run / "metrics.csv")
    secs = [float(x) for x in rows.get("sec_per_step", pd.Series(dtype=float)).dropna()]
    rep = json.loads((run / "train_report.json").read_text())
    ref_s = float(rep.get("reference_cache_seconds") or 0.0)
    s_step = statistics.median(secs[1:] or secs) if secs else (wall - ref_s) / steps
    overhead = max(0.0, wall - sum(secs) - ref_s)
    t0 = time.time()
    lm, tok = load_model(cfg.model, adapter=run, device=device_type(cfg.train.device))
    load_s = time.time() - t0
    _, splits = sources_of(cfg.data)
    pairs = prepare(splits["test"], tok, cfg.data, limit=9).tokenized
    prompts, _ = load_pairs(splits["test"], pairing=cfg.data.pairing, tokenizer=tok, limit=1, columns=cfg.data.columns)
    kw = scoring_setup(cfg, lm, device_type=next(lm.parameters()).device.type)
    score = lambda ps: score_pairs(lm, ps, pad_id=tok.pad_token_id, progress=False, **kw)
    with adapter_disabled(lm):
        score(pairs[:1])  # warm-up
        t0 = time.time()
        score(pairs[1:])
        pps = (len(pairs) - 1) / max(time.time() - t0, 1e-6)
        t0 = time.time()
        generation_check(lm, tok, [p.prompt for p in prompts], max_new_tokens=MAX_NEW_TOKENS, chat_template=cfg.data.chat_template,
                         max_prompt_length=cfg.data.max_prompt_length, progress=False)
        gen = time.time() - t0
    shutil.rmtree(run, ignore_errors=True)
    return Speed(s_step, ref_s / max(1, steps * per_step), overhead, load_s, pps, gen, next(lm.parameters()).device.type,
                 time.time() - t_all)


def speed_of(study: Study, model: Model, *, log=write) -> Speed:
    """`measure_speed`, cached in STUDY_DIR/eta.json by host and settings (delete it to re-measure)."""
    import torch

    path = study.out / "eta.json"
    key = json.dumps({"host": socket.gethostname(), "threads": torch.get_num_threads(), "cuda": torch.cuda.device_count(),
                      "model": model.name, "settings": study.run_base(model, study.sizes), "first_shift": study.reported[0]},
                     sort_keys=True, default=str)
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache:
        return Speed(**cache[key])
    log(f"measuring {model.name} on this machine (3 train steps, 8 scored pairs, 1 generation) ...")
    sp = measure_speed(study, model, work=study.out / model.slug / "timing")
    cache[key] = vars(sp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache, indent=1))
    return sp


def run_seconds(sp: Speed, sizes: dict[str, Any], kind: str, *, base: bool = True) -> float:
    """One compared run: training, its reference pass, a model load, 4 splits x n_eval pairs
    scored for the adapter (and the base, with `base`: the base's scores are cached per shift, so
    the plan counts them once per shift), the generation check (N_PROMPTS prompts, base and adapter)."""
    from reprpo.eval.coherence import N_PROMPTS

    d = to_flat(apply_overrides(RunConfig(), sizes, where="sizes"))
    n_eval = d["data.n_eval"] or 100
    gen = 0.0 if kind in NO_GENERATION else 2 * N_PROMPTS * sp.gen_s_per_prompt
    return (steps_of(sizes, training_free=kind in TRAINING_FREE) * sp.s_per_step + (d["data.n_train"] or 1000) * sp.ref_s_per_pair
            + sp.overhead_s + sp.load_s + EVAL_SPLITS * (2 if base else 1) * n_eval / sp.pairs_per_s + gen)


def trial_seconds(sp: Speed, sizes: dict[str, Any], kind: str) -> float:
    """One tuning trial: training, its reference pass, a load, the train and oos splits scored (adapter)."""
    d = to_flat(apply_overrides(RunConfig(), sizes, where="sizes"))
    return (steps_of(sizes, training_free=kind in TRAINING_FREE) * sp.s_per_step + (d["data.n_train"] or 1000) * sp.ref_s_per_pair
            + sp.overhead_s + sp.load_s + 2 * (d["data.n_eval"] or 100) / sp.pairs_per_s)


# --------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    lines: list[str]
    eta_s: float
    runs: int
    trials: int
    runs_left: int
    trials_left: int


def model_dir(study: Study, model: Model) -> Path:
    return study.out / model.slug


def tuned_methods(study: Study) -> list[Method]:
    return [m for m in study.methods if m.trials > 0]


def finished_trials(storage: Path) -> dict[str, list[tuple[float, float] | None]]:
    """study name -> (start, end) unix times of each finished (complete or pruned) trial in an
    optuna storage; None for a trial run on another host (an imported archive: its times are of
    another machine) or without times. {} if there is no storage."""
    if not storage.is_file():
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{storage}"
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    host = socket.gethostname()

    def span(t):
        a, b = t.datetime_start, t.datetime_complete
        ok = a is not None and b is not None and b > a and t.user_attrs.get("host") == host
        return (a.timestamp(), b.timestamp()) if ok else None

    return {name: [span(t) for t in optuna.load_study(study_name=name, storage=url).trials if t.state in done]
            for name in optuna.get_all_study_names(url)}


def done_runs(store_path: Path) -> dict[tuple[str, str, int], tuple[float, float] | None]:
    """(method, shift, seed) of the store's finished runs -> (claim, finish) unix times; None for
    a run computed on another host (`runs.owner` is host:pid:start; an imported archive) or
    without times."""
    if not store_path.is_file():
        return {}
    from reprpo.experiments import store

    host = socket.gethostname()
    con = store.connect(store_path)
    try:
        rows = con.execute("SELECT method, shift, seed, created, finished, owner FROM runs WHERE status = 'done'")
        return {(m, s, int(seed)): ((c, f) if c is not None and f is not None and f > c and (o or "").split(":")[0] == host else None)
                for m, s, seed, c, f, o in rows}
    finally:
        con.close()


def shared_seconds(spans: dict) -> dict:
    """key -> its share of the time it ran: at every moment 1/(spans running then), so a span
    alone gets its length and two at once share the overlap (parallel workers on shared cores
    are not counted twice); the shares sum to the length of the union. None spans stay None."""
    known = {k: v for k, v in spans.items() if v is not None}
    out = dict.fromkeys(spans) | dict.fromkeys(known, 0.0)
    points = sorted({t for v in known.values() for t in v})
    for a, b in zip(points, points[1:]):
        live = [k for k, (c, f) in known.items() if c <= a and f >= b]
        for k in live:
            out[k] += (b - a) / len(live)
    return out


def calibrated(planned: list[tuple[str, float, float | None]], *, what: str = "runs") -> tuple[float, str]:
    """The seconds of the work left, each piece's estimate scaled by how long the finished
    pieces of its group took against their own estimates (runs: per shift, for its sequence
    lengths; trials: per tuning study), else by the factor over every finished piece.
    `planned`: (group, estimate, seconds it took if finished, else None) for every piece."""
    took, est = defaultdict(float), defaultdict(float)
    for group, e, wall in planned:
        if wall is not None:
            took[group] += wall
            est[group] += e
    overall = sum(took.values()) / sum(est.values()) if sum(est.values()) > 0 else 1.0
    left = sum(e * (took[g] / est[g] if est[g] > 0 else overall) for g, e, wall in planned if wall is None)
    n = sum(wall is not None for _, _, wall in planned)
    return left, (f"calibrated on {n} finished {what}, which took {overall:.2f}x their estimates" if n else "")


def compared_labels(study: Study, kept: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """(store label, kind) of the compared methods; a group's members are its first `keep`
    (the kept ones once tuning has chosen them)."""
    out = []
    for m in study.methods:
        if not m.group:
            out.append((m.preset, m.kind))
    for g in study.groups:
        chosen = (kept or {}).get(g.name) or g.members[:g.keep]
        out += [(p, next(m.kind for m in study.methods if m.preset == p)) for p in chosen]
    if study.target_tuned:
        from reprpo.registered_names import KINDS

        out.append(("target:" + study.target_tuned, next(k for k, (_, ns) in KINDS.items() if study.target_tuned in ns)))
    return out


def make_plan(study: Study, *, workers: int = 1, log=write) -> Plan:
    """The plan's lines and its ETA from a measurement on this machine (what is done already in
    the store and the optuna study is not counted again)."""
    check_inputs(study)
    runs_per_model = len(compared_labels(study)) * len(study.reported) * len(study.seeds)
    n_trials = sum(m.trials for m in tuned_methods(study))
    short = lambda s: s.rsplit(":", 1)[-1]
    lines = [f"study {study.name} ({study.path}, profile {study.profile}) -> {study.out}",
             f"  models ({len(study.models)}): {', '.join(m.name for m in study.models)}",
             f"  seeds: {', '.join(map(str, study.seeds))}; sizes: {_sizes_text(study.sizes)}; tuning sizes: {_sizes_text(study.tune_sizes)}",
             "  validation (tuning only, never reported): " + ", ".join(f"{k} {v}" for k, v in study.validation.items()),
             f"  reported shifts ({len(study.reported)}): {', '.join(short(s) for s in study.reported)}"]
    parts = []
    for m in study.methods:
        if not m.group:
            parts.append(m.preset + (f" (tune {m.trials} trials on {short(study.validation_of(m))})" if m.trials else " (preset values)"))
    for g in study.groups:
        trials = next(m.trials for m in study.methods if m.group == g.name)
        parts.append(f"{g.name}: top {g.keep} of {', '.join(g.members)} (tune {trials} trials each)")
    if study.target_tuned:
        parts.append(f"target-tuned {study.target_tuned}")
    lines.append(f"  methods: {'; '.join(parts)}")
    eta, runs_left, trials_left = 0.0, 0, 0
    import torch

    gpus = torch.cuda.device_count()
    for model in study.models:
        sp = speed_of(study, model, log=log)
        mdir = model_dir(study, model)
        fin = finished_trials(mdir / "tune" / "optuna.sqlite")
        took_t = shared_seconds({(name, i): sp_ for name, spans in fin.items() for i, sp_ in enumerate(spans)})
        planned_t = []
        for m in tuned_methods(study):
            name, est = f"{m.preset}@{study.validation_of(m)}", trial_seconds(sp, study.tune_sizes, m.kind)
            walls = [w for (nm, _), w in took_t.items() if nm == name]
            left = max(0, m.trials - len(walls))
            trials_left += left
            planned_t += [(name, est, w) for w in walls if w is not None] + [(name, est, None)] * left
        t_s, t_calibration = calibrated(planned_t, what="trials")
        done = shared_seconds(done_runs(mdir / "results.sqlite"))  # a finished run's share of the time it ran
        sel = mdir / "tune" / "selection.yaml"
        kept = (yaml.safe_load(sel.read_text()) or {}).get("kept") if sel.is_file() else None  # a resumed study: the chosen ones
        planned, based = [], set()  # the first run of a shift scores the base too (cached for the rest)
        for label, kind in compared_labels(study, kept):
            for s in study.reported:
                for seed in study.seeds:
                    key = (label, s, seed)
                    wall = done.get(key) if key in done else None
                    if key in done and wall is None:  # finished elsewhere or without times: neither left nor a calibration point
                        based.add(s)
                        continue
                    runs_left += key not in done
                    planned.append((s, run_seconds(sp, study.sizes, kind, base=s not in based), wall))
                    based.add(s)
        c_s, calibration = calibrated(planned)
        par = min(workers, gpus) if sp.device == "cuda" and gpus else 1
        if not calibration:  # calibrated: the finished runs' shares already hold their parallelism
            c_s /= max(1, par)
        eta += t_s + c_s
        lines.append(f"  {model.name}: measured on this machine ({sp.device}): {sp.s_per_step:.2f} s/step, "
                     f"{sp.pairs_per_s:.2f} pairs/s scored, {sp.gen_s_per_prompt:.1f} s per generation, "
                     f"{sp.load_s + sp.overhead_s:.1f} s load and setup per run (measured in {sp.measured_in_s:.0f} s) "
                     f"-> tuning {t_s / 3600:.2f} h" + (f" ({t_calibration})" if t_calibration and trials_left else "")
                     + f" + compare {c_s / 3600:.2f} h" + (f" ({calibration})" if calibration and runs_left else ""))
    runs = runs_per_model * len(study.models)
    trials = n_trials * len(study.models)
    lines.append(f"ETA {eta / 3600:.2f} h for {runs_left} of {runs} runs (+ tuning {trials_left} of {trials} trials); "
                 f"budget {study.budget_hours:g} h ({'within' if eta / 3600 <= study.budget_hours else 'OVER'})")
    return Plan(lines, eta, runs, trials, runs_left, trials_left)


def _sizes_text(sizes: dict[str, Any]) -> str:
    inv = {v: k for k, v in SIZE_KEYS.items()}
    return ", ".join(f"{inv[k]} {v}" for k, v in sizes.items() if k in inv) or "the config defaults"


# --------------------------------------------------------------------------- the phases
def tune_phase(study: Study, model: Model) -> dict[str, Any]:
    """Tune every method with trials on its family's validation shift; returns {"params":
    {preset: params file}, "kept": {group: presets}, "ranking": {group: [(preset, value)]}}
    and writes it to MODEL/tune/selection.yaml."""
    from reprpo.experiments.tune import run_tune

    mdir = model_dir(study, model)
    params, values = {}, {}
    for m in tuned_methods(study):
        res = run_tune(m.preset, shift=study.validation_of(m), trials=m.trials,
                       base=study.run_base(model, study.tune_sizes) | m.set, storage_path=mdir / "tune" / "optuna.sqlite",
                       out=mdir / "tune", after_trial=lambda: save(study, model, log=lambda *a, **k: None))
        params[m.preset], values[m.preset] = res.params_path, res.best_value
    kept, ranking = select_kept(study, values)
    sel = {"validation": study.validation, "params": {k: str(v) for k, v in params.items()},
           "best_validation_delta_pp": values, "kept": kept, "ranking": ranking}
    (mdir / "tune").mkdir(parents=True, exist_ok=True)
    (mdir / "tune" / "selection.yaml").write_text(yaml.safe_dump(sel, sort_keys=False))
    return sel


def select_kept(study: Study, values: dict[str, float]) -> tuple[dict[str, list[str]], dict[str, list]]:
    """Per candidates group, its `keep` presets with the highest best validation objective
    (ties and NaN: file order)."""
    kept, ranking = {}, {}
    for g in study.groups:
        score = lambda p: values.get(p, -math.inf) if math.isfinite(values.get(p, math.nan)) else -math.inf
        order = sorted(g.members, key=lambda p: (-score(p), g.members.index(p)))
        kept[g.name] = order[:g.keep]
        ranking[g.name] = [[p, float(values.get(p, math.nan))] for p in order]
    return kept, ranking


def compare_phase(study: Study, model: Model, sel: dict[str, Any], *, workers: int = 1) -> list[str]:
    """Every (kept method, reported shift, seed) of `model` with its tuned parameters."""
    from reprpo.config import load_yaml
    from reprpo.experiments.compare import run_grid
    from reprpo.experiments.tune import check_not_reported

    mdir = model_dir(study, model)
    labels = [lab for lab, _ in compared_labels(study, sel["kept"]) if not lab.startswith("target:")]
    by_name = {m.preset: m for m in study.methods}
    overrides = {}
    for lab in labels:
        over = dict(by_name[lab].set)
        if lab in sel["params"]:
            check_not_reported(sel["params"][lab], study.reported)
            over |= load_yaml(sel["params"][lab])
        overrides[lab] = over
    base = apply_overrides(RunConfig(), study.run_base(model, study.sizes), where=f"{study.path}: base")
    return run_grid(methods=labels, shifts=study.reported, seeds=study.seeds, base=base, store_path=mdir / "results.sqlite",
                    out_root=mdir / "runs", overrides={k: v for k, v in overrides.items() if v}, progress=True,
                    target_tuned=study.target_tuned, workers=workers,
                    after_run=lambda: save(study, model, log=lambda *a, **k: None))  # each finished run reaches the archive


def archive_dir(study: Study, model: Model) -> Path | None:
    return study.archive / model.slug if study.archive else None


def input_paths(study: Study) -> list[str]:
    """Settings of the file that name an existing file or folder (an SAE, ...): their content is
    part of what an archived run used, so the archive records their fingerprints."""
    values = list(study.base.values()) + [v for m in study.methods for v in m.set.values()] + \
        [v for model in study.models for v in model.set.values()]
    return sorted({v for v in values if isinstance(v, str) and v and Path(v).exists()})


def restore(study: Study, *, log=write) -> None:
    """Read the archive back: the tuning trials and the done runs the stores lack. Runs whose
    settings name an input (a file the study file points at, e.g. an SAE) that has changed since
    they were archived are not imported: they are redone."""
    from reprpo.experiments.archive import changed_inputs, import_runs, import_trials

    for model in study.models:
        adir = archive_dir(study, model)
        if adir is None or not adir.is_dir():
            continue
        mdir = model_dir(study, model)
        changed = changed_inputs(adir)
        skip = (lambda cj, changed=changed: any(json.dumps(p) in cj for p in changed)) if changed else None
        studies = import_trials(adir, mdir / "tune" / "optuna.sqlite")
        new, had = import_runs(adir, mdir / "results.sqlite", skip=skip)
        log(f"archive {adir}: {len(new)} run(s) imported ({len(had)} already in the store), "
            f"{len(studies)} tuning study(ies) imported")
        if changed:
            log(f"archive {adir}: {', '.join(changed)} differ(s) from what the archived runs read (or is missing): "
                "those runs are not imported and will be redone")


def save(study: Study, model: Model, *, log=write) -> None:
    """Write the model's tuning trials, done runs and input fingerprints to the archive."""
    from reprpo.experiments.archive import export_runs, export_trials, record_inputs

    adir = archive_dir(study, model)
    if adir is None:
        return
    mdir = model_dir(study, model)
    names = export_trials(mdir / "tune" / "optuna.sqlite", adir)
    n = export_runs(mdir / "results.sqlite", adir) if (mdir / "results.sqlite").is_file() else 0
    record_inputs(adir, input_paths(study))
    sel = mdir / "tune" / "selection.yaml"
    if sel.is_file():
        (adir / "selection.yaml").write_text(sel.read_text())
    log(f"archive {adir}: {n} done run(s), {len(names)} tuning study(ies)")


def searchable(study: Study, model: Model, m: Method) -> bool:
    """Does the method have hyper-parameters to search (probe-mms has none: check_inputs sets its trials to 0)?"""
    from reprpo import methods
    from reprpo.methods import resolve_config

    cfg = resolve_config(("study base", study.run_base(model, study.sizes)), ("method set", m.set), method=m.preset)
    return bool(m.group or methods.search_space(cfg))


def tuning_markdown(study: Study, model: Model) -> str:
    """Every tuning trial of `model` (from its optuna storage): per method the trials done of
    those planned, the best validation objective so far, and each trial's values and parameters."""
    import optuna

    from reprpo.experiments.report import _md_table

    storage = model_dir(study, model) / "tune" / "optuna.sqlite"
    url = f"sqlite:///{storage}"
    have = set(optuna.get_all_study_names(url)) if storage.is_file() else set()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    short = lambda sh: sh.rsplit(":", 1)[-1]
    num = lambda v: f"{v:+.1f}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"
    best_rows, trial_rows = [], []
    for m in tuned_methods(study):
        if not searchable(study, model, m):
            best_rows.append([m.preset, "—", "0 (nothing to tune: preset values)", "—", "—"])
            continue
        name = f"{m.preset}@{study.validation_of(m)}"
        trials = optuna.load_study(study_name=name, storage=url).trials if name in have else []
        fin = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
        best = max(done, key=lambda t: t.value) if done else None
        best_rows.append([m.preset, short(study.validation_of(m)), f"{len(fin)}/{m.trials}", num(best.value) if best else "—",
                          ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()) if best else "—"])
        for t in trials:
            oos = t.value if t.state.name == "COMPLETE" else None  # a pruned trial's value is its train Δ (optuna's last report)
            trial_rows.append([m.preset, str(t.number), t.state.name.lower(), num(oos), num(t.user_attrs.get("train_delta_pp")),
                               ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())])
    L = [f"# Tuning: {study.name}, {model.name}", "",
         "Objective: the oos accuracy gain (adapter − base, pp) on the method family's validation shift, never a reported "
         f"shift; tuning sizes: {_sizes_text(study.tune_sizes)}. Pruned trials stopped after their train-split score.", ""]
    L += _md_table(["method", "validation shift", "trials done", "best oos Δ pp", "best parameters"], best_rows) + [""]
    L += ["## Every trial", ""]
    L += _md_table(["method", "trial", "state", "oos Δ pp", "train Δ pp", "parameters"], trial_rows) + [""]
    return "\n".join(L)


def report_phase(study: Study, model: Model, *, log=write) -> Path:
    """Render the verdict (experiments/verdict.py) when it exists, else the report; with an
    archive, into ARCHIVE/MODEL/report (committed with the tables it is drawn from)."""
    mdir = model_dir(study, model)
    out = (archive_dir(study, model) or mdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.md").write_text(tuning_markdown(study, model))
    try:
        from reprpo.experiments.verdict import render_verdict
    except ImportError:
        from reprpo.experiments.report import render_report

        log("(reprpo.experiments.verdict is not there yet: rendering the plain report instead)")
        text = render_report(mdir / "results.sqlite", out)
    else:
        sel = mdir / "tune" / "selection.yaml"
        kept = (yaml.safe_load(sel.read_text()) or {}).get("kept") if sel.is_file() else None
        labels = [lab for lab, _ in compared_labels(study, kept) if not lab.startswith("target:")]
        ref = "dpo" if "dpo" in labels else labels[0]  # the study's grid only: a store may hold older runs
        text = render_verdict(mdir / "results.sqlite", out, reference=ref, shifts=study.reported, methods=labels, seeds=study.seeds)
    log(text)
    log(f"report for {model.name}: {out}")
    return out


def record(study: Study) -> None:
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "study.yaml").write_text(f"# {study.path} as run (profile {study.profile})\n" + yaml.safe_dump(study.raw, sort_keys=False))


def run_study(study: Study, *, yes: bool = False, plan_only: bool = False, report_only: bool = False, workers: int = 1,
              log=write) -> int:
    """plan (refused over budget unless `yes`) -> tune -> compare -> report, for every model.
    Returns the number of failed compared runs (0 = all done)."""
    from reprpo.experiments import store

    restore(study, log=log)
    if report_only:
        for model in study.models:
            save(study, model, log=log)  # the tuning trials too, when compare has not started
            out = (archive_dir(study, model) or model_dir(study, model)) / "report"
            out.mkdir(parents=True, exist_ok=True)
            (out / "tuning.md").write_text(tuning_markdown(study, model))
            log(f"tuning so far: {out / 'tuning.md'}")
            if not (model_dir(study, model) / "results.sqlite").is_file():
                if (model_dir(study, model) / "tune" / "optuna.sqlite").is_file():
                    log(f"{model.name}: no compared run yet (tuning comes first), so no verdict yet.")
                    continue
                raise ConfigError(f"study {study.name}: no results store for {model.name} at {model_dir(study, model)}; run `reprpo study {study.path}` first.")
            report_phase(study, model, log=log)
        return 0
    plan = make_plan(study, workers=workers, log=log)
    for line in plan.lines:
        log(line)
    if plan_only:
        return 0
    if plan.eta_s / 3600 > study.budget_hours and not yes:
        raise ReprpoError(f"study {study.name}: the measured ETA {plan.eta_s / 3600:.2f} h ({plan.runs_left} runs, "
                          f"{plan.trials_left} tuning trials) is over budget_hours {study.budget_hours:g} of {study.path}. "
                          "Shrink the study (sizes, seeds, shifts, trials), raise budget_hours, or pass --yes to run it anyway.")
    record(study)
    selections = {}
    for model in study.models:
        log(f"== tune ({model.name})")
        try:
            selections[model.slug] = tune_phase(study, model)
        finally:
            save(study, model, log=log)
        for g, ks in selections[model.slug]["kept"].items():
            log(f"{g}: kept {', '.join(ks)} (ranking on the validation shift: "
                f"{', '.join(f'{p} {v:+.1f} pp' for p, v in selections[model.slug]['ranking'][g])})")
    failed = 0
    for model in study.models:
        log(f"== compare ({model.name})")
        try:
            ids = compare_phase(study, model, selections[model.slug], workers=workers)
        finally:
            save(study, model, log=log)
        con = store.connect(model_dir(study, model) / "results.sqlite")
        try:
            failed += len(store.failed_runs(con, ids))
        finally:
            con.close()
    for model in study.models:
        log(f"== report ({model.name})")
        try:
            report_phase(study, model, log=log)
        except Exception as e:  # the runs are safe in the store
            write(f"reprpo: report failed ({type(e).__name__}: {e}); rerun `reprpo study report {study.path}`")
    if failed:
        write(f"{failed} run(s) failed; errors in the results stores (runs.error). Rerun `reprpo study {study.path}` to retry them.")
    return failed
