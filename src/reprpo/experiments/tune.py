"""Hyper-parameter search on a *validation* shift (optuna, resumable SQLite study).

Objective: the validation shift's oos accuracy gain, 100·(acc_adapter − acc_base) in pp, of one
trained adapter. DESIGN §6: the shift you tune on is never a shift you report (differs: the
earlier reprpo code tuned on the very oos set it reported). The best parameters are saved as a
flat YAML mapping of dotted config keys (`train.lr: 0.0003`), the format
`reprpo compare --params METHOD=FILE` reads, headed by comments that record the validation
shift (`# validated_on: SHIFT`) so that compare/report can refuse or flag reusing it;
`read_params` returns both.

Pruning (optuna MedianPruner) uses a non-test, non-oos number: after training, the adapter's
gain on the validation shift's own `train` split (in-sample) is reported as step 0; a trial
whose in-sample gain is below the median of earlier trials' stops there, before the oos
evaluation is spent on it. (Reporting mid-training would need hooks in `train()`; this keeps
the loop untouched and still saves the oos scoring of hopeless trials.)
"""

from __future__ import annotations

import math
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reprpo import methods
from reprpo.config import RunConfig
from reprpo.data.shifts import shift_spec
from reprpo.errors import ConfigError, TrainingError
from reprpo.methods import resolve_config
from reprpo.progress import bar, write

# --------------------------------------------------------------------------- search spaces
# (kind, low, high) for "log" (log-uniform) / "float" (uniform); ("cat", choices) for categorical.
# Each method kind and registry entry declares its own (methods/*.py); nothing is listed here.


def search_space(method: str) -> dict[str, tuple]:
    """The search space of a preset, from its kind and registry entries (validates the name)."""
    return methods.search_space(resolve_config(method=method))


def suggest(trial, space: dict[str, tuple]) -> dict[str, Any]:
    """Draw one value per dotted key from an optuna trial."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if spec[0] == "log":
            out[key] = trial.suggest_float(key, spec[1], spec[2], log=True)
        elif spec[0] == "float":
            out[key] = trial.suggest_float(key, spec[1], spec[2])
        elif spec[0] == "cat":
            out[key] = trial.suggest_categorical(key, spec[1])
        else:
            raise ValueError(f"search space {key}: unknown kind {spec[0]!r}")
    return out


# --------------------------------------------------------------------------- best-params file


def write_params(path: Path, params: dict[str, Any], *, meta: dict[str, Any]) -> None:
    """`# key: value` comment lines (meta; `validated_on` first), then the flat YAML params."""
    head = [f"# {k}: {v}" for k, v in meta.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head) + "\n" + yaml.safe_dump(dict(params), sort_keys=False))


def read_params(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(params, meta) of a best-params file: the flat mapping, and its `# key: value` comments."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file not found: {p}.")
    text = p.read_text()
    meta = dict(re.findall(r"^#\s*([A-Za-z_]+):\s*(.*?)\s*$", text, flags=re.M))
    try:
        params = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}).") from e
    if not isinstance(params, dict):
        raise ConfigError(f"{p}: expected a flat mapping of dotted config keys (train.lr: 0.0003).")
    return params, meta


def check_not_reported(params_path: str | Path, reported_shifts: list[str]) -> None:
    """Refuse tuned params whose validation shift is among the shifts to be reported."""
    _, meta = read_params(params_path)
    v = meta.get("validated_on")
    if v and shift_spec(v) in {shift_spec(s) for s in reported_shifts}:
        raise ConfigError(f"{params_path} was tuned on shift {v!r}, which is also a reported shift: tune on a "
                          "validation shift that is not reported (docs/methods.md, Evaluation), or drop it from the reported shifts.")


# --------------------------------------------------------------------------- one trial


class _Scorer:
    """Scores an adapter on the validation shift's splits; base (adapter off) scores are computed
    once per split and reused across trials (same model, data and tokenisation)."""

    def __init__(self):
        self._base: dict[tuple, dict[str, float]] = {}
        self._splits: dict[tuple, list] = {}

    def _pairs(self, cfg: RunConfig, tok, split: str):
        from reprpo.data.prepare import prepare
        from reprpo.data.shifts import data_sources

        d = cfg.data
        key = (cfg.model.name, d.shift, split, d.n_eval, d.max_length, d.max_prompt_length, d.pairing, d.chat_template, d.append_eos)
        if key not in self._splits:
            _, sources = data_sources(shift=d.shift, train="", eval_splits={})
            self._splits[key] = prepare(sources[split], tok, d, limit=d.n_eval).tokenized
        return key, self._splits[key]

    def gain(self, model, tok, cfg: RunConfig, split: str, *, method=None) -> dict[str, float]:
        """{'base': acc, 'adapter': acc, 'delta_pp': Δ} on one split (`method`: the run's method
        object, for a scorer that reads it: `eval.scoring.run_method`)."""
        from reprpo.eval.scoring import base_scorer, score_pairs, scoring_setup, summarize
        from reprpo.eval.stats import delta_pp
        from reprpo.model.forward import adapter_disabled

        key, pairs = self._pairs(cfg, tok, split)
        kw = scoring_setup(cfg, model, device_type=next(model.parameters()).device.type)  # evaluate_run's layout and batch size
        base_kw = kw | {"scorer": base_scorer(kw["scorer"])}  # a reward head or probe: the base is the zero-shot ℓ̄ margin
        key = (*key, base_kw["scorer"].name)
        if key not in self._base:
            with adapter_disabled(model):
                self._base[key] = summarize(score_pairs(model, pairs, pad_id=tok.pad_token_id, desc=f"score {split} (base)",
                                                        progress=cfg.train.progress, **base_kw))
        ad = summarize(score_pairs(model, pairs, pad_id=tok.pad_token_id, desc=f"score {split} (adapter)", progress=cfg.train.progress,
                                   method=method, **kw))
        b = self._base[key]["accuracy"]
        return {"base": b, "adapter": ad["accuracy"], "delta_pp": delta_pp(ad["accuracy"], b)}


@dataclass
class TuneResult:
    study: str
    storage: str
    n_trials: int  # finished (complete + pruned) trials in the study
    best_value: float  # oos Δ pp of the best trial
    best_params: dict[str, Any]
    params_path: Path


def trial_config(method: str, base: dict[str, Any], params: dict[str, Any], *, out: Path) -> RunConfig:
    """defaults < preset(method) < tune's defaults < base options < trial params."""
    return resolve_config(("tune", {"train.progress": False}), ("base config", base), ("trial params", params),
                          ("tune", {"eval.after_train": False, "out": str(out)}), method=method)


def run_tune(method: str, *, shift: str, trials: int, base: dict[str, Any] | None = None,
             storage_path: str | Path = "runs/tune/optuna.sqlite", study_name: str = "",
             out: str | Path = "runs/tune", keep_adapters: bool = False, log=write, after_trial=None) -> TuneResult:
    """Run trials until the study holds `trials` finished ones (a rerun resumes), save the best
    params to out/best_params_{method}.yaml and return them. A progress bar counts the trials
    (each trial's own bars follow its `train.progress`, false unless the base config sets it).
    `after_trial()`: called after each finished trial (a study archives its trials there)."""
    import optuna

    from reprpo.eval.scoring import run_method
    from reprpo.model.loading import device_type, load_model
    from reprpo.train import train

    base = dict(base or {})
    shift = shift_spec(shift)
    for key in ("data.train", "data.eval"):
        if base.get(key):
            raise ConfigError(f"tune: {key} would replace the validation shift's data; tune scores the shift's own "
                              "train and oos splits. Pick the validation shift with --shift.")
    if base.get("train.method") not in (None, method):
        raise ConfigError(f"tune: --train.method {base['train.method']!r} disagrees with METHOD {method!r}.")
    if base.get("data.shift") is not None and shift_spec(str(base["data.shift"])) != shift:
        raise ConfigError(f"tune: --data.shift {base['data.shift']!r} disagrees with --shift {shift!r}; pass --shift only.")
    base["data.shift"] = shift
    space = methods.search_space(trial_config(method, base, {}, out=Path(out)))  # fails on a bad base option before any trial
    from reprpo.data.shifts import resolve_shift

    resolve_shift(shift)

    out = Path(out)
    storage_path = Path(storage_path)
    storage_path.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{storage_path}"
    study_name = study_name or f"{method}@{shift}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    attrs = study.user_attrs
    if attrs and (attrs.get("method"), attrs.get("validated_on")) != (method, shift):
        raise ConfigError(f"study {study_name!r} in {storage_path} tunes {attrs.get('method')} on {attrs.get('validated_on')}, "
                          f"not {method} on {shift}: pass another --study name.")
    study.set_user_attr("method", method)
    study.set_user_attr("validated_on", shift)
    finished = lambda: [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    todo = max(0, trials - len(finished()))
    study.sampler = optuna.samplers.TPESampler(seed=len(study.trials))  # a resumed study draws new points
    log(f"study {study_name!r} ({storage}): {len(finished())} finished trials, running {todo} more; "
        f"objective = oos Δ pp on validation shift {shift}")
    scorer = _Scorer()

    def objective(trial) -> float:
        trial.set_user_attr("host", socket.gethostname())  # a study's plan times only this host's trials
        params = suggest(trial, space)
        tdir = out / "trials" / re.sub(r"[^A-Za-z0-9_.-]+", "_", study_name) / f"trial-{trial.number:04d}"
        cfg = trial_config(method, base, params, out=tdir)
        try:
            adapter = train(cfg)
        except TrainingError as e:  # diverged (non-finite): a failed trial, the study goes on
            trial.set_user_attr("error", str(e))
            log(f"trial {trial.number}: failed, training diverged {params}: {str(e).split(';')[0]}")
            raise
        try:
            model, tok = load_model(cfg.model, adapter=adapter, device=device_type(cfg.train.device))
            meth = run_method(cfg, model, adapter)  # a reward head or probe direction (None for most methods)
            tr = scorer.gain(model, tok, cfg, "train", method=meth)
            trial.set_user_attr("train_delta_pp", tr["delta_pp"])
            trial.set_user_attr("out", str(tdir))
            trial.report(tr["delta_pp"], step=0)
            if trial.should_prune():
                log(f"trial {trial.number}: pruned (train Δ {tr['delta_pp']:+.1f} pp below the median) {params}")
                raise optuna.TrialPruned()
            oos = scorer.gain(model, tok, cfg, "oos", method=meth)
            trial.set_user_attr("oos_base_acc", oos["base"])
            trial.set_user_attr("oos_adapter_acc", oos["adapter"])
            log(f"trial {trial.number}: oos Δ {oos['delta_pp']:+.1f} pp (train Δ {tr['delta_pp']:+.1f}) {params}")
            return oos["delta_pp"]
        finally:
            if not keep_adapters:
                for f in ("adapter_model.safetensors", "adapter_model.bin", "method_state.pt"):
                    (Path(adapter) / f).unlink(missing_ok=True)
                shutil.rmtree(Path(adapter) / "tb", ignore_errors=True)

    if todo:
        with bar(total=todo, desc=f"tune {method}", unit="trial") as pbar:
            study.optimize(objective, n_trials=todo, catch=(TrainingError,), callbacks=[lambda _study, _trial: pbar.update(1)]
                           + ([lambda _study, _trial: after_trial()] if after_trial else []))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ConfigError(f"study {study_name!r}: no completed trial (all pruned or failed); run more --trials.")
    best = study.best_trial
    path = out / f"best_params_{method}.yaml"
    meta = {"validated_on": shift, "method": method, "study": study_name, "storage": storage,
            "objective": f"oos accuracy gain (adapter - base) on the validation shift = {best.value:+.2f} pp, trial {best.number}",
            "trials": f"{len(done)} complete, {len(finished()) - len(done)} pruned",
            "base": " ".join(f"{k}={v}" for k, v in base.items()),
            "note": "never report the validation shift; use with reprpo compare --params METHOD=FILE"}
    write_params(path, best.params, meta=meta)
    log(f"best: oos Δ {best.value:+.2f} pp (trial {best.number}) {best.params}\nsaved to {path}")
    return TuneResult(study_name, storage, len(finished()), float(best.value) if math.isfinite(best.value) else math.nan, dict(best.params), path)
