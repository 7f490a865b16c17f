"""SFT and TDPO (added through the registries), the Method interface, registry errors, precedence."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from reprpo.cli import main
from reprpo.config import RunConfig, apply_overrides
from reprpo.errors import ConfigError
from reprpo.methods import build_method, init_loss, preset_names, resolve_config
from reprpo.methods.base import Method
from reprpo.methods.sft import sft_loss
from reprpo.methods.tdpo import response_kl_logps, tdpo_loss, token_kl

LN2 = math.log(2)
TINY = {"model.name": "tiny-random", "data.shift": "builtin:difficulty", "data.n_train": 8, "data.max_length": 64,
        "data.max_prompt_length": 48, "train.batch_size": 2, "train.max_steps": 3, "train.lr": 1e-2,
        "train.progress": False, "eval.after_train": False, "method.k": 4, "method.layers": "0,1",
        "method.modules": "mlp.down_proj:input,self_attn.o_proj:output"}


def test_sft_loss_hand_worked():
    """ℓ̄⁺ = (−1.5, −0.5) -> L = (1.5, 0.5); nll metric 1.0, ppl e¹ = 2.71828."""
    loss, m = sft_loss(torch.tensor([-1.5, -0.5]))
    assert loss.tolist() == [1.5, 0.5]
    assert float(m["sft/nll"]) == 1.0 and float(m["sft/ppl"]) == pytest.approx(math.e)


def test_token_kl_three_tokens_four_words():
    """3 positions, 4-word vocabulary, KL(π_ref ‖ π_θ) = Σ_v p_ref (log p_ref − log p_θ):
    t1 p_ref = (½, ¼, ⅛, ⅛), p_θ uniform: ½ ln2 + 0 + 2·⅛ ln(½) = ¼ ln 2 = 0.173287
    t2 both (½, ¼, ⅛, ⅛): 0
    t3 p_ref uniform, p_θ = (½, ¼, ⅛, ⅛): ¼(ln ½ + 0 + ln 2 + ln 2) = ¼ ln 2 = 0.173287
    D(y) = ½ ln 2 = 0.346574. Logits are log-probabilities plus any constant per row."""
    skew = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    flat = torch.zeros(4)
    ref = torch.stack([skew + 3.0, skew, flat - 1.0])
    pol = torch.stack([flat, skew - 2.0, skew])
    kl = token_kl(ref, pol)
    assert kl.tolist() == pytest.approx([0.25 * LN2, 0.0, 0.25 * LN2], abs=1e-6)
    assert float(kl.sum()) == pytest.approx(0.5 * LN2, abs=1e-6)


def test_response_kl_is_chunk_free_and_matches_token_kl():
    """The chunked, checkpointed path gives token_kl's values and the same gradients for any chunk."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    h_ref = torch.randn(5, 8)
    tgt = torch.tensor([1, 4, 0, 10, 3])
    out = []
    for chunk in (1, 2, 64):
        h = (h_ref + 0.3 * torch.randn(5, 8, generator=torch.Generator().manual_seed(1))).requires_grad_()
        lp, lr, kl = response_kl_logps(head, h, h_ref, tgt, chunk=chunk)
        (lp.sum() + kl.sum()).backward()
        out.append((lp.detach(), lr, kl.detach(), h.grad.clone()))
        want = token_kl(head(h_ref), head(h.detach()))
        assert torch.allclose(kl.detach(), want, atol=1e-6)
        assert torch.allclose(lr, torch.log_softmax(head(h_ref), -1).gather(1, tgt[:, None]).squeeze(1), atol=1e-6)
    for a, b in zip(out, out[1:]):
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


def test_tdpo_loss_hand_worked():
    """β 0.1, α 0.5; ℓ_θ = (−1, −2), ℓ_ref = (−1.5, −1.5) -> ρ = 0.5 − (−0.5) = 1, u = βρ = 0.1;
    D⁺ = 0.2, D⁻ = 0.6.
    TDPO1: −log σ(0.1 − 0.1·(0.6 − 0.2)) = −log σ(0.06) = 0.663597
    TDPO2: −log σ(0.1 − 0.1·0.5·(0.6 − 0.2)) = −log σ(0.08) = 0.653947; no gradient into D⁺ (sg)."""
    lp = [torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5)]
    for variant, want in ((1, 0.663597), (2, 0.653947)):
        kc, kr = torch.tensor([0.2], requires_grad=True), torch.tensor([0.6], requires_grad=True)
        loss, m = tdpo_loss(*lp, kc, kr, beta=0.1, alpha=0.5, variant=variant)
        assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
        loss.sum().backward()
        assert (kc.grad is None or float(kc.grad) == 0.0) == (variant == 2)
        assert float(kr.grad) > 0  # a larger KL on the rejected response raises the loss
    at_init = tdpo_loss(*[torch.zeros(3)] * 6, beta=0.1, alpha=0.5, variant=2)[0]
    assert at_init.tolist() == pytest.approx([LN2] * 3)


@pytest.mark.parametrize("method", ["sft", "tdpo1", "tdpo2"])
def test_new_methods_train_through_train(method, tmp_path):
    """`train()` on the tiny model: step-1 loss ln 2 for TDPO (ρ = 0, D = 0), the base model's
    chosen NLL −ℓ̄(y⁺) for SFT (logged beside it as logps/chosen_mean); TDPO's KL is 0 at step 1."""
    from reprpo.train import train

    cfg = resolve_config(("test", TINY | {"out": str(tmp_path / method)}), method=method)
    m = pd.read_csv(train(cfg) / "metrics.csv")
    assert len(m) == 3 and m.loss.map(math.isfinite).all()
    if method == "sft":
        assert m.loss[0] == pytest.approx(-m["logps/chosen_mean"][0], abs=1e-5)
        assert m.loss[2] < m.loss[0]
    else:
        assert m.loss[0] == pytest.approx(LN2, abs=1e-5)
        assert m["tdpo/kl_chosen"][0] == pytest.approx(0.0, abs=1e-6) and m["tdpo/kl_chosen"][2] > 0


@pytest.mark.parametrize("method", preset_names())
def test_every_preset_is_a_method_with_its_init_value(method, tiny, tmp_path):
    """Every registered preset builds an object satisfying the Method protocol, and its declared
    value at init agrees with the hand table of DESIGN §4-5 (test_methods.py pins the runs)."""
    from reprpo.train import make_lora

    cfg = resolve_config(("test", TINY), method=method)
    if method == "fpo" or "-sae-" in method:  # a random SAE at block 1 of the tiny model
        from reprpo.model.tiny import build_tiny_sae

        cfg = apply_overrides(cfg, {"method.sae": str(build_tiny_sae(tmp_path / "sae")), "method.layers": "sae"}, where="test")
    model = make_lora(copy.deepcopy(tiny[0]), cfg)
    meth = build_method(cfg, model)
    assert isinstance(meth, Method)
    table = {"dpo": LN2, "cdpo": LN2, "ipo": 25.0, "hinge": 1.0, "projgrad": LN2, "projbp": LN2, "tdpo1": LN2, "fpo": LN2,
             "tdpo2": LN2, "mse": 1.0, "prefvec": 2 * LN2, "rank": LN2, "innerdpo": 2 * LN2, "innerpo": 2 * LN2, "reward": LN2,
             "bipo": LN2, "loreft": 2 * LN2}
    key = method if method in table else method.split("-")[-1]
    assert init_loss(cfg) == (pytest.approx(table[key]) if key in table else None)


def test_cli_refuses_unknown_registry_value_and_lists_names(tmp_path, capsys):
    """`reprpo train hs-none-prefvec --method.transform pcaa` exited 0 and trained `none` before."""
    rc = main(["train", "hs-none-prefvec", "--method.transform", "pcaa", "--model.name", "tiny-random",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "method.transform" in err and "pcaa" in err and "none, pca, hra, ether" in err
    assert main(["train", "nosuch", "--out", str(tmp_path / "y")]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eval.scorer.*logp_mean"):
        resolve_config(("t", {"eval.scorer": "bogus"}))


def test_user_value_beats_the_preset_and_is_saved(tmp_path):
    """Precedence preset < YAML < CLI: `hs-none-prefvec --method.transform pca` trains pca
    (build_method used to overwrite it with the preset's `none`), and config.yaml says pca."""
    import yaml

    from reprpo.cli import build_config, parser

    y = tmp_path / "c.yaml"
    y.write_text("method: {transform: hra, k: 4}\n")
    args = parser().parse_args(["train", "hs-none-prefvec", "--config", str(y), "--method.transform", "pca"])
    cfg = build_config(args)
    assert cfg.method.transform == "pca" and cfg.method.k == 4 and cfg.method.loss == "prefvec"
    args = parser().parse_args(["train", "hs-none-prefvec", "--config", str(y)])
    assert build_config(args).method.transform == "hra"  # YAML beats the preset
    from reprpo.train import train

    cfg = resolve_config(("test", TINY | {"method.transform": "pca", "train.max_steps": 1, "out": str(tmp_path / "r")}),
                         method="hs-none-prefvec")
    out = train(cfg)
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["transform"] == "pca"
    assert (out / "method_state.pt").is_file()  # the pca basis: pca really trained


def test_custom_scorer_is_evaluated_by_the_same_path(tiny):
    """A scorer registered beside a method (here: a constant-preference toy) is scored by
    evaluate_splits on every split: margin = its score, correct iff margin > 0."""
    from reprpo.data.pairs import PreferencePair
    from reprpo.data.tokenize import tokenize_pairs
    from reprpo.eval.scoring import evaluate_splits
    from reprpo.methods.base import SCORERS, Scorer

    model, tok = tiny
    tp, _ = tokenize_pairs([PreferencePair(f"q{i}", " a" * (i + 1), " b") for i in range(4)], tok, max_length=32,
                           max_prompt_length=16)
    # chosen ' a'·(i+1) is 2(i+1) characters + EOS = 2i + 3 tokens; margin = (tokens − 5)/2:
    # pairs 0..3 -> −1, 0, 1, 2 -> correct 0, 0.5, 1, 1 -> accuracy 0.625
    toy = Scorer("toy_len", lambda model, batch, chunk, prefix_store: {
        "margin": (batch.response_mask[: batch.n_pairs].sum(1).float() - 5.0) / 2}, "test only")
    SCORERS._entries["toy_len"] = toy
    try:
        table, per_pair = evaluate_splits(model, tok, {"s": tp}, batch_size=2, with_adapter=False, scorer=toy)
    finally:
        del SCORERS._entries["toy_len"]
    assert per_pair.margin.tolist() == [-1.0, 0.0, 1.0, 2.0]
    assert per_pair.correct.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert table.base_accuracy[0] == 0.625 and math.isnan(table.base_chosen_ppl[0])


@pytest.mark.parametrize("method", ["sft", "tdpo2"])
def test_tune_works_for_the_new_methods(method, tmp_path):
    """tune draws from the kind's search space with no edit to tune's code."""
    from reprpo.experiments.tune import search_space

    space = search_space(method)
    assert "train.lr" in space and (method == "sft" or "method.tdpo_alpha" in space)
    args = ["tune", method, "--shift", "builtin:context", "--store", str(tmp_path / "o.sqlite"), "--out", str(tmp_path / "t"),
            "--trials", "1", "--model.name", "tiny-random", "--n-train", "4", "--n-eval", "4", "--steps", "1",
            "--train.batch_size", "2"]
    assert main(args) == 0
    assert (tmp_path / "t" / f"best_params_{method}.yaml").is_file()


def test_unchanged_apply_overrides_still_checks_pairing():
    with pytest.raises(ConfigError, match="data.pairing.*first, all"):
        apply_overrides(RunConfig(), {"data.pairing": "some"}, where="t")
