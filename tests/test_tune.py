"""`reprpo tune`: search spaces, the best-params file, and a resumable study on the tiny model."""

from __future__ import annotations

import optuna
import pytest
import yaml

from reprpo.cli import main
from reprpo.errors import ConfigError
from reprpo.experiments.tune import (
    check_not_reported,
    read_params,
    search_space,
    trial_config,
    write_params,
)


def test_search_space_per_family():
    assert set(search_space("dpo")) == {"train.lr", "train.beta"}
    assert "method.proj_beta" in search_space("projgrad")
    assert {"method.lambda_o", "method.beta_p", "method.layers"} <= set(search_space("hs-pca-prefvec"))
    assert "train.beta" in search_space("simpo") and "method.simpo_gamma" in search_space("simpo")
    with pytest.raises(ConfigError, match="unknown method"):
        search_space("nope")


def test_trial_config_precedence(tmp_path):
    """defaults < preset < base < trial params; tune forces the method, out and no after-train eval."""
    cfg = trial_config("hs-pca-prefvec", {"train.lr": "0.5", "lora.r": "4"}, {"train.lr": 3e-4}, out=tmp_path)
    assert cfg.method.transform == "pca" and cfg.lora.r == 4 and cfg.train.lr == 3e-4
    assert cfg.train.method == "hs-pca-prefvec" and not cfg.eval.after_train and cfg.out == str(tmp_path)


def test_params_file_round_trip_and_validation_guard(tmp_path):
    p = tmp_path / "best.yaml"
    write_params(p, {"train.lr": 3e-4, "method.layers": "0.4,0.6,0.8"}, meta={"validated_on": "builtin:context", "method": "x"})
    params, meta = read_params(p)
    assert params == {"train.lr": 3e-4, "method.layers": "0.4,0.6,0.8"}  # flat mapping: comments are not keys
    assert meta["validated_on"] == "builtin:context"
    check_not_reported(p, ["builtin:difficulty"])
    with pytest.raises(ConfigError, match="also a reported shift"):
        check_not_reported(p, ["builtin:difficulty", "builtin:context"])
    with pytest.raises(ConfigError, match="also a reported shift"):
        check_not_reported(p, ["context"])  # bare names mean builtin:NAME, as in compare


TINY = ["--model.name", "tiny-random", "--n-train", "8", "--n-eval", "6", "--steps", "2", "--train.batch_size", "2"]


def test_tune_writes_best_params_and_resumes(tmp_path, capsys):
    store, out = tmp_path / "optuna.sqlite", tmp_path / "tune"
    args = ["tune", "dpo", "--shift", "builtin:context", "--store", str(store), "--out", str(out), *TINY]
    assert main([*args, "--trials", "2"]) == 0
    path = out / "best_params_dpo.yaml"
    params, meta = read_params(path)
    assert set(params) == {"train.lr", "train.beta"} and 1e-5 <= params["train.lr"] <= 1e-3
    assert meta["validated_on"] == "builtin:context"
    assert yaml.safe_load(path.read_text()) == params
    study = optuna.load_study(study_name="dpo@builtin:context", storage=f"sqlite:///{store}")
    assert len(study.trials) == 2 and study.user_attrs["validated_on"] == "builtin:context"
    assert "train_delta_pp" in study.trials[0].user_attrs
    assert not list(out.rglob("adapter_model.safetensors"))  # adapters are deleted after scoring

    assert main([*args, "--trials", "3"]) == 0  # resumes: one more trial, not three
    study = optuna.load_study(study_name="dpo@builtin:context", storage=f"sqlite:///{store}")
    assert len(study.trials) == 3
    assert "2 finished trials, running 1 more" in capsys.readouterr().out


def test_tune_refuses_data_that_replaces_the_validation_shift(tmp_path, capsys):
    rc = main(["tune", "dpo", "--shift", "builtin:context", "--trials", "1", "--store", str(tmp_path / "s.sqlite"),
               "--data.eval", "oos=builtin:arith/test", *TINY])
    assert rc == 2 and "data.eval" in capsys.readouterr().err


def test_compare_refuses_params_tuned_on_a_reported_shift(tmp_path, capsys):
    from reprpo.cli import main
    from reprpo.experiments.tune import write_params

    f = tmp_path / "best.yaml"
    write_params(f, {"train.lr": 1e-4}, meta={"validated_on": "builtin:encoding"})
    rc = main(["compare", "--methods", "dpo", "--shifts", "encoding", "--seeds", "1",
               "--params", f"dpo={f}", "--model.name", "tiny-random", "--out", str(tmp_path / "c")])
    assert rc == 2
    assert "tuned on shift" in capsys.readouterr().err
