"""`reprpo study FILE`: the study file's checks, the keep-top-k rule, a tiny study end to end
(2 methods x 2 shifts x 2 seeds, 2 trials each), the budget refusal, resume after kill -9."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from reprpo.cli import main
from reprpo.errors import ConfigError
from reprpo.experiments.study import load_study, select_kept
from reprpo.experiments.tune import read_params

TINY = Path(__file__).resolve().parents[1] / "configs" / "studies" / "tiny.yaml"
METHODS = {"dpo", "hs-none-prefvec"}
SHIFTS = {"builtin:difficulty", "builtin:encoding"}


def _variant(tmp_path: Path, name: str = "study.yaml", **changes) -> Path:
    """tiny.yaml with top-level keys replaced (None: removed)."""
    d = yaml.safe_load(TINY.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def _runs(store: Path) -> list[tuple]:
    con = sqlite3.connect(store)
    rows = con.execute("SELECT method, shift, seed, status, finished FROM runs ORDER BY run_id").fetchall()
    con.close()
    return rows


def _trials(storage: Path) -> dict[str, int]:
    url = f"sqlite:///{storage}"
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return {s: sum(t.state in done for t in optuna.load_study(study_name=s, storage=url).trials)
            for s in optuna.get_all_study_names(url)}


# -- the file --------------------------------------------------------------------------------
def test_tiny_study_file_reads(tmp_path):
    s = load_study(TINY, out=tmp_path)
    assert [m.name for m in s.models] == ["tiny-random"] and s.seeds == [1, 2]
    assert s.reported == ["builtin:difficulty", "builtin:encoding"] and s.validation == {"default": "builtin:context"}
    assert [m.preset for m in s.methods] == ["dpo", "hs-none-prefvec"] and all(m.trials == 2 for m in s.methods)
    assert s.sizes == {"data.n_train": 8, "data.n_eval": 6, "train.max_steps": 2, "train.batch_size": 2}
    assert s.methods[1].set == {"method.layers": "0.5"}


def test_default_reported_shifts_are_all_but_the_validation_ones(tmp_path):
    s = load_study(_variant(tmp_path, shifts={"file": "builtin"}, validation={"default": "context", "repr": "quality"}))
    assert "builtin:context" not in s.reported and "builtin:quality" not in s.reported and "builtin:difficulty" in s.reported
    assert s.validation_of(s.methods[1]) == "builtin:quality" and s.validation_of(s.methods[0]) == "builtin:context"


def test_genies_study_files_read(genies_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(TINY.parents[2])  # the GENIES path in the files is relative to the repository root
    s = load_study(TINY.parent / "genies-smollm2.yaml", out=tmp_path, profile="cpu")
    assert len(s.reported) >= 6 and len(s.seeds) >= 3 and s.sizes["data.n_train"] >= 128 and s.sizes["data.n_eval"] >= 100
    assert {"dpo", "simpo", "projgrad", "fpo", "probe-mms", "reward"} <= {m.preset for m in s.methods}
    assert s.groups[0].keep == 2 and len(s.groups[0].members) > 2
    assert not set(s.validation.values()) & set(s.reported)
    g = load_study(TINY.parent / "genies-smollm2.yaml", out=tmp_path, profile="gpu")
    assert len(g.models) > 1 and len(g.seeds) > len(s.seeds) and g.base["model.dtype"] == "bfloat16"
    assert s.archive == Path("docs/results/genies-smollm2") and g.archive != s.archive  # a GPU study's runs are not the CPU one's
    big = load_study(TINY.parent / "genies-1b-8b.yaml", out=tmp_path, profile="cpu")
    assert [m.name for m in big.models][0] == "meta-llama/Llama-3.2-1B-Instruct" and len(big.models) == 3


def test_validation_shift_that_is_reported_is_refused(tmp_path):
    p = _variant(tmp_path, validation="difficulty")
    with pytest.raises(ConfigError, match=r"validation shift builtin:difficulty is also a reported shift") as e:
        load_study(p)
    assert str(p) in str(e.value) and "builtin:encoding" in str(e.value)
    p = _variant(tmp_path, validation={"default": "context", "repr": "builtin:encoding"})
    with pytest.raises(ConfigError, match=r"validation\.repr: validation shift builtin:encoding"):
        load_study(p)


@pytest.mark.parametrize(("changes", "message"), [
    ({"seedz": [1]}, r"top level: unknown key 'seedz'"),
    ({"sizes": {"n_trian": 8}}, r"sizes: unknown key 'n_trian'"),
    ({"base": {"train": {"lrr": 1}}}, r"unknown field 'train.lrr'"),
    ({"base": {"data": {"shift": "x"}}}, r"data.shift is set by the study"),
    ({"methods": ["dpo", "no-such-preset"]}, r"unknown method"),
    ({"methods": [{"candidates": ["dpo", "simpo"], "keep": 3}]}, r"keep <= 2"),
    ({"validation": None}, r"validation: missing"),
    ({"budget_hours": None}, r"budget_hours"),
    ({"methods": ["dpo", "dpo"]}, r"dpo named twice"),
    ({"shifts": {"file": "nowhere/shifts.json"}}, r"shifts.file: shifts file not found"),
])
def test_study_file_errors_name_the_file_and_key(tmp_path, changes, message):
    p = _variant(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as e:
        load_study(p)
    assert str(p) in str(e.value)


def test_select_kept_takes_the_top_k_by_validation_gain(tmp_path):
    s = load_study(_variant(tmp_path, methods=[{"candidates": ["hs-none-prefvec", "hs-pca-prefvec", "hs-none-mse"], "keep": 2,
                                                "name": "repr"}, "dpo"]))
    kept, ranking = select_kept(s, {"hs-none-prefvec": 1.0, "hs-pca-prefvec": float("nan"), "hs-none-mse": 3.0})
    assert kept == {"repr": ["hs-none-mse", "hs-none-prefvec"]}
    assert [p for p, _ in ranking["repr"]] == ["hs-none-mse", "hs-none-prefvec", "hs-pca-prefvec"]


def test_plan_eta_is_calibrated_on_the_finished_runs(tmp_path, monkeypatch):
    """The plan scales each run left by how long the finished runs of its shift took against
    their estimates. A measured speed of 1 s/step, 1 pair/s and nothing else makes a run 2 steps
    + 4 splits x 6 pairs = 26 s, and 50 s for the first run of a shift (the base scored too).
    Finished here, one after the other: difficulty dpo 1 in 100 s and hs 1 in 52 s (est. 50 + 26:
    factor 2), encoding dpo 1 in 25 s (est. 50: factor 0.5); encoding hs 1 on another host
    (done, but its time is another machine's: no calibration point). Left: difficulty
    2 x 26 x 2 = 104 s, encoding 2 x 26 x 0.5 = 26 s: 130 s. Overall factor 177 / 126 = 1.40.
    (Uncalibrated, counting the base where it is already cached: 76 + 52 = 128 s.)
    Then the two difficulty runs again, but run at once by two workers on the same cores, both
    from 1000 to 1152 s: each gets half of the 152 s, so the factor is 2 again and the ETA 130 s
    (their full walls would say 304 / 76 = 4: 234 s). With no finished run: 2 x (50 + 3 x 26) = 256 s."""
    from reprpo.experiments import store
    from reprpo.experiments import study as st

    s = load_study(TINY, out=tmp_path / "out")
    sp = st.Speed(s_per_step=1.0, ref_s_per_pair=0.0, overhead_s=0.0, load_s=0.0, pairs_per_s=1.0, gen_s_per_prompt=0.0,
                  device="cpu", measured_in_s=0.0)
    monkeypatch.setattr(st, "speed_of", lambda *a, **k: sp)
    monkeypatch.setattr(st, "finished_trials", lambda _: {f"{m.preset}@builtin:context": [None, None] for m in s.methods})
    assert st.make_plan(s).eta_s == pytest.approx(256.0)

    path = st.model_dir(s, s.models[0]) / "results.sqlite"
    path.parent.mkdir(parents=True)
    con = store.connect(path)
    here = store.owner_id()
    runs = [("dpo", "difficulty", 1000, 1100, here), ("hs-none-prefvec", "difficulty", 1100, 1152, here),
            ("dpo", "encoding", 1152, 1177, here), ("hs-none-prefvec", "encoding", 0, 9000, "elsewhere:1:1")]
    for i, (method, shift, start, end, owner) in enumerate(runs):
        store.claim_run(con, run_id=f"r{i}", method=method, shift=f"builtin:{shift}", seed=1, config_json="{}", out_dir="x",
                        owner=owner)
        con.execute("UPDATE runs SET status = 'done', created = ?, finished = ? WHERE run_id = ?", (start, end, f"r{i}"))
        con.commit()
    plan = st.make_plan(s)
    assert plan.runs_left == 4 and plan.eta_s == pytest.approx(130.0)
    assert "(calibrated on 3 finished runs, which took 1.40x their estimates)" in "\n".join(plan.lines)
    con.execute("UPDATE runs SET created = 1000, finished = 1152 WHERE run_id IN ('r0', 'r1')")
    con.commit()
    con.close()
    assert st.make_plan(s).eta_s == pytest.approx(130.0)


def test_shared_seconds_split_overlaps():
    """Spans a [0, 10] and b [5, 15], c alone [20, 23], d unknown: a gets 5 + 5/2 = 7.5, b 7.5,
    c 3, d None; the shares sum to the union, 18."""
    from reprpo.experiments.study import shared_seconds

    assert shared_seconds({"a": (0, 10), "b": (5, 15), "c": (20, 23), "d": None}) == {"a": 7.5, "b": 7.5, "c": 3.0, "d": None}


def test_plan_tuning_eta_is_calibrated_on_the_finished_trials(tmp_path, monkeypatch):
    """As for runs, with trials: at 1 s/step and 1 pair/s a tiny trial is 2 steps + 2 splits x
    6 pairs = 14 s, plus the 8 compare runs, none done: 256 s (above).
    - dpo's one finished trial took 28 s (factor 2); hs-none-prefvec has none, so it takes the
      factor over all finished trials (2). Left: dpo 1 x 14 x 2 + hs 2 x 14 x 2 = 84 s: 340 s.
    - dpo's two trials took 28 s each (factor 2, none left), hs's one 7 s (factor 0.5): left hs
      1 x 14 x 0.5 = 7 s: 263 s (the overall factor 63 / 42 = 1.5 would say 21 s).
    - A finished trial without times (or from another host) counts as done but calibrates
      nothing: 3 x 14 + 256 = 298 s."""
    from reprpo.experiments import study as st

    s = load_study(TINY, out=tmp_path / "out")
    sp = st.Speed(s_per_step=1.0, ref_s_per_pair=0.0, overhead_s=0.0, load_s=0.0, pairs_per_s=1.0, gen_s_per_prompt=0.0,
                  device="cpu", measured_in_s=0.0)
    monkeypatch.setattr(st, "speed_of", lambda *a, **k: sp)
    monkeypatch.setattr(st, "finished_trials", lambda _: {"dpo@builtin:context": [(0.0, 28.0)]})
    plan = st.make_plan(s)
    assert plan.trials_left == 3 and plan.eta_s == pytest.approx(340.0)
    assert "tuning 0.02 h (calibrated on 1 finished trials, which took 2.00x their estimates)" in "\n".join(plan.lines)
    monkeypatch.setattr(st, "finished_trials", lambda _: {"dpo@builtin:context": [(0.0, 28.0), (28.0, 56.0)],
                                                          "hs-none-prefvec@builtin:context": [(56.0, 63.0)]})
    plan = st.make_plan(s)
    assert plan.trials_left == 1 and plan.eta_s == pytest.approx(263.0)
    monkeypatch.setattr(st, "finished_trials", lambda _: {"dpo@builtin:context": [None]})
    plan = st.make_plan(s)
    assert plan.trials_left == 3 and plan.eta_s == pytest.approx(298.0) and "calibrated" not in "\n".join(plan.lines)


def test_finished_trials_keeps_this_hosts_times_only(tmp_path):
    """Trial 0 ran here (user attr host = this host) from t to t + 30 s; trial 1 carries another
    host (an imported archive's), trial 2 none (from before hosts were recorded): both None."""
    import datetime
    import socket

    from reprpo.experiments.study import finished_trials

    url = f"sqlite:///{tmp_path / 'optuna.sqlite'}"
    study = optuna.create_study(study_name="dpo@x", storage=url)
    t0 = datetime.datetime(2026, 12, 3, 12, 0, 0)
    for host in (socket.gethostname(), "elsewhere", None):
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, state=optuna.trial.TrialState.COMPLETE, value=1.0, datetime_start=t0,
            datetime_complete=t0 + datetime.timedelta(seconds=30), params={}, distributions={},
            user_attrs={} if host is None else {"host": host}, system_attrs={}, intermediate_values={}, trial_id=0))
    (span, other, old), = finished_trials(tmp_path / "optuna.sqlite").values()
    assert span[1] - span[0] == pytest.approx(30.0) and other is None and old is None


# -- end to end ------------------------------------------------------------------------------
def test_tiny_study_end_to_end_and_budget_refusal(tmp_path, capsys):
    out = tmp_path / "study"
    over = _variant(tmp_path, "over.yaml", budget_hours=1e-7)
    assert main(["study", str(over), "--out", str(out)]) == 2  # refused: the measured ETA is over budget
    err = capsys.readouterr()
    assert "measured on this machine" in err.out and "s/step" in err.out and "over budget_hours 1e-07" in err.err
    assert not (out / "tiny-random" / "results.sqlite").exists()

    tiny = _variant(tmp_path, "tiny.yaml", archive=str(tmp_path / "archive"))
    assert main(["study", str(tiny), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ETA" in text and "for 8 of 8 runs (+ tuning 4 of 4 trials)" in text
    mdir = out / "tiny-random"
    runs = _runs(mdir / "results.sqlite")
    assert len(runs) == 8 and {r[3] for r in runs} == {"done"}
    assert {r[0] for r in runs} == METHODS and {r[1] for r in runs} == SHIFTS and {r[2] for r in runs} == {1, 2}
    assert _trials(mdir / "tune" / "optuna.sqlite") == {"dpo@builtin:context": 2, "hs-none-prefvec@builtin:context": 2}
    for m in METHODS:
        params, meta = read_params(mdir / "tune" / f"best_params_{m}.yaml")
        assert meta["validated_on"] == "builtin:context" and "train.lr" in params
    con = sqlite3.connect(mdir / "results.sqlite")
    lrs = {(m, round(float(__import__("json").loads(c)["train"]["lr"]), 12)) for m, c in con.execute("SELECT method, config_json FROM runs")}
    con.close()
    for m in METHODS:  # the compared runs use the tuned parameters
        tuned = read_params(mdir / "tune" / f"best_params_{m}.yaml")[0]["train.lr"]
        assert {lr for mm, lr in lrs if mm == m} == {round(tuned, 12)}
    report = tmp_path / "archive" / "tiny-random" / "report"
    assert any(report.iterdir()) and (out / "study.yaml").is_file()
    tuning = (report / "tuning.md").read_text()  # every trial, and per method the best so far
    assert "| dpo | context | 2/2 |" in tuning and "| hs-none-prefvec | context | 2/2 |" in tuning and "train.lr=" in tuning

    assert main(["study", str(tiny), "--out", str(out)]) == 0  # again: nothing is redone
    text = capsys.readouterr().out
    assert "for 0 of 8 runs (+ tuning 0 of 4 trials)" in text and text.count("running 0 more") == 2
    assert "8 already done" in text and _runs(mdir / "results.sqlite") == runs
    assert main(["study", "report", str(tiny), "--out", str(out)]) == 0
    verdict = (report / "verdict.md").read_text()

    # a fresh checkout: runs/ (stores, optuna, adapters) is gone, the committed archive is not
    shutil.rmtree(out)
    assert main(["study", str(tiny), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8 run(s) imported (0 already in the store), 2 tuning study(ies) imported" in text
    assert "for 0 of 8 runs (+ tuning 0 of 4 trials)" in text and "8 already done" in text
    assert _runs(mdir / "results.sqlite") == runs and _trials(mdir / "tune" / "optuna.sqlite") == {
        "dpo@builtin:context": 2, "hs-none-prefvec@builtin:context": 2}
    assert (report / "verdict.md").read_text() == verdict


KILLER = """
import os, signal, sys
point, n = os.environ["KILL_AT"].split(":")
import reprpo.experiments.compare as cp
import reprpo.experiments.study as st
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "compare":  # between the phases: tuning done, compare not started
    st.compare_phase = die
else:  # inside compare: the n-th run is claimed, then the process dies
    run, calls = cp.execute_run, [0]
    def execute(*a, **k):
        calls[0] += 1
        if calls[0] == int(n):
            die()
        return run(*a, **k)
    cp.execute_run = execute
from reprpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_study_resumes_after_kill_9_between_phases_and_inside_compare(tmp_path, capsys):
    from reprpo.experiments import archive

    study = _variant(tmp_path, seeds=[1], archive=str(tmp_path / "archive"))
    out = tmp_path / "study"
    mdir = out / "tiny-random"
    adir = tmp_path / "archive" / "tiny-random"
    cmd = [sys.executable, "-c", KILLER, "study", str(study), "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, env=env | {"KILL_AT": "compare:0"}, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-3000:]
    assert _trials(mdir / "tune" / "optuna.sqlite") == {"dpo@builtin:context": 2, "hs-none-prefvec@builtin:context": 2}
    assert not (mdir / "results.sqlite").exists()
    # each finished trial reached the archive before the kill (a kill -9 runs no `finally`)
    assert sorted(archive.import_trials(adir, tmp_path / "copy.sqlite")) == ["dpo@builtin:context", "hs-none-prefvec@builtin:context"]
    assert _trials(tmp_path / "copy.sqlite") == _trials(mdir / "tune" / "optuna.sqlite")
    assert main(["study", "report", str(study), "--out", str(out)]) == 0  # tuned, nothing compared: the tuning table
    assert "no compared run yet" in capsys.readouterr().out and "| dpo | context | 2/2 |" in (adir / "report" / "tuning.md").read_text()

    r = subprocess.run(cmd, env=env | {"KILL_AT": "run:3"}, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-3000:]
    assert r.stdout.count("running 0 more") == 2  # the tuning trials were not redone
    before = _runs(mdir / "results.sqlite")
    assert sorted(x[3] for x in before) == ["done", "done", "running"]
    assert archive.archived_runs(adir) == 2  # and each finished run

    assert main(["study", str(study), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "for 2 of 4 runs (+ tuning 0 of 4 trials)" in text and "2 already done" in text
    after = _runs(mdir / "results.sqlite")
    assert len(after) == 4 and {x[3] for x in after} == {"done"}
    assert {x for x in after if x in before} == {x for x in before if x[3] == "done"}  # done runs kept as they were
    assert _trials(mdir / "tune" / "optuna.sqlite") == {"dpo@builtin:context": 2, "hs-none-prefvec@builtin:context": 2}
