"""Representation adapters (`train.adapter loreft | vector`, model/interventions.py): identity at
init, the formulas by hand, BiPO's sign trick, orthonormal R, the positions of every layout and of
generation, save/load, the presets through train + evaluate_run, export, and exact resume."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from reprpo.cli import main
from reprpo.config import ModelConfig, RunConfig, apply_overrides
from reprpo.data.builtin import builtin_pairs
from reprpo.data.tokenize import TokenizedPair, collate_packed, collate_pairs, tokenize_pairs
from reprpo.errors import ConfigError, ReprpoError
from reprpo.methods import build_method, resolve_config
from reprpo.model import interventions
from reprpo.model.forward import adapter_disabled, decoder_and_head, run_decoder, sequence_logps

LN2 = math.log(2)
TINY = {"model.name": "tiny-random", "data.shift": "builtin:difficulty", "data.n_train": 8, "data.max_length": 64,
        "data.max_prompt_length": 48, "train.batch_size": 2, "train.max_steps": 3, "train.lr": 1e-2,
        "train.progress": False, "eval.after_train": False, "method.layers": "0,1"}


@pytest.fixture(scope="module")
def pairs(tiny):
    _, tok = tiny
    tp, _ = tokenize_pairs(builtin_pairs("arith", "train")[:4], tok, max_length=64, max_prompt_length=48)
    return tp


def _adapted(model0, kind: str, *, layers=(0, 1), prompt_last: int = 2, noise: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    m = interventions.attach(copy.deepcopy(model0), kind=kind, layers=list(layers), rank=3, prompt_last=prompt_last)
    if noise:
        with torch.no_grad():
            for p in interventions.find(m).parameters():
                p.add_(noise * torch.randn_like(p))
    return m


def test_loreft_and_vector_hand_worked():
    """d = 3, r = 1, R = (1, 0, 0), W = (0, 1, 0), b = 0.5, h = (2, 3, 4):
    Rh = 2, Wh + b = 3.5, LoReFT(h) = h + Rᵀ(3.5 − 2) = (3.5, 3, 4). vector: h + v, v = (1, −1, 0) -> (3, 2, 4)."""
    f = interventions.LoReFT(3, 1)
    with torch.no_grad():
        f.rot.weight = torch.tensor([[1.0, 0.0, 0.0]])
        f.W.copy_(torch.tensor([[0.0, 1.0, 0.0]]))
        f.b.fill_(0.5)
    h = torch.tensor([[[2.0, 3.0, 4.0]]])  # (1, 1, 3)
    assert (h + f(h)).flatten().tolist() == pytest.approx([3.5, 3.0, 4.0], abs=1e-6)
    v = interventions.AddVector(3)
    with torch.no_grad():
        v.v.copy_(torch.tensor([1.0, -1.0, 0.0]))
    assert (h + v(h)).flatten().tolist() == [3.0, 2.0, 4.0]


def test_position_masks_padded_packed_hand_worked():
    """Prompt (5, 6, 7), chosen (8, 9), rejected (8, 10, 11); k = 2.
    padded rows: response at 3..4 (chosen) and 3..5 (rejected), the prompt's last 2 at 1..2.
    packed row (share_response: the shared 8 read once): prompt 0..2, chosen 3..4, rejected tail 5..6:
    response 3..6, the prompt's last 2 at 1..2 (before the chosen response)."""
    p = TokenizedPair((5, 6, 7), (8, 9), (8, 10, 11), 0)
    pad = collate_pairs([p], pad_id=0)
    assert interventions.position_mask(pad, prompt_last=2).tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert interventions.position_mask(pad, prompt_last=0).tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    packed = collate_packed([p], pad_id=0, share_response=True)
    assert interventions.position_mask(packed, prompt_last=2).tolist() == [[0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("kind", ["loreft", "vector"])
def test_identity_at_init_and_disabled_is_the_base(kind, tiny, pairs):
    """At init (LoReFT: W = R, b = 0; vector: v = 0) the log-probs are the base's bit for bit, in
    the padded and packed layouts; with trained (random) values they differ, adapter_disabled
    gives the base bit for bit, and packed = padded (the positions agree across layouts)."""
    model0, tok = tiny
    pad = collate_pairs(pairs, pad_id=tok.pad_token_id)
    packed = collate_packed(pairs, pad_id=tok.pad_token_id, share_response=True)
    base = sequence_logps(model0, pad).logp_sum
    m = _adapted(model0, kind)
    assert torch.equal(sequence_logps(m, pad).logp_sum, base)
    assert torch.equal(sequence_logps(m, packed).logp_sum, sequence_logps(model0, packed).logp_sum)
    m = _adapted(model0, kind, noise=0.3)
    on = sequence_logps(m, pad).logp_sum
    assert (on - base).abs().max() > 1e-3
    with adapter_disabled(m):
        assert torch.equal(sequence_logps(m, pad).logp_sum, base)
    assert torch.allclose(sequence_logps(m, packed).logp_sum, on, atol=1e-4)


def test_vector_acts_with_a_batch_prefix_loreft_refuses_one_that_takes_its_tokens(tiny, pairs):
    """The vector acts at response tokens only, so a batch prefix (no response tokens; encoded with
    the edit off) is exact; loreft's prompt tokens are refused when a prefix takes them out of
    the rows, and build_layout turns the prefix off for such a model."""
    from reprpo.config import SpeedConfig
    from reprpo.model.layout import build_layout

    model0, tok = tiny
    shared = [TokenizedPair(tuple(range(40, 60)) + p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index) for p in pairs]
    pre = collate_packed(shared, pad_id=tok.pad_token_id, share_prefix=True)
    plain = collate_packed(shared, pad_id=tok.pad_token_id)
    assert pre.prefix_len == 20
    v = _adapted(model0, "vector", noise=0.3)
    assert torch.allclose(sequence_logps(v, pre).logp_sum, sequence_logps(v, plain).logp_sum, atol=1e-4)
    r = _adapted(model0, "loreft", prompt_last=64, noise=0.3)
    with pytest.raises(ConfigError, match="share_prefix"):
        sequence_logps(r, pre)
    speed = SpeedConfig()
    assert build_layout(speed, v, stage="train", device_type="cpu").share_prefix
    assert not build_layout(speed, r, stage="train", device_type="cpu").share_prefix


def test_a_forward_without_positions_is_an_error(tiny, pairs):
    """A forward outside run_decoder / generating never silently runs the base model."""
    model0, tok = tiny
    m = _adapted(model0, "vector")
    with pytest.raises(RuntimeError, match="no token positions"):
        m(input_ids=collate_pairs(pairs, pad_id=tok.pad_token_id).input_ids)


def test_vector_sign_trick_is_exact(tiny, pairs):
    """BiPO with d = −1 and vector v = the DPO loss of the swapped pair (rejected as chosen) with
    −v and d = +1: −log σ(d·βρ(d·v)) with d = −1 is −log σ(β·ρ_swapped(−v)), ρ_swapped = −ρ.
    Checked numerically on the tiny model (reference online, adapter off)."""
    model0, tok = tiny
    cfg = resolve_config(("t", TINY | {"method.layers": "1"}), method="bipo")
    m = _adapted(model0, "vector", layers=(1,), noise=0.5)
    meth = build_method(cfg, m)
    batch = collate_pairs(pairs, pad_id=tok.pad_token_id)
    with interventions.signed(m, -1.0):
        flipped, metrics = meth.loss(m, batch, ref=None)
    assert float(metrics["bipo/sign"]) == -1.0
    assert interventions.sign_of(m) == 1.0  # restored after the step
    swap = collate_pairs([TokenizedPair(p.prompt_ids, p.rejected_ids, p.chosen_ids, p.index) for p in pairs],
                         pad_id=tok.pad_token_id)
    with torch.no_grad():
        interventions.find(m).edits["1"].v.neg_()
    dpo = build_method(resolve_config(("t", TINY | {"method.layers": "1"}), method="dpo"), m)
    plain, _ = dpo.loss(m, swap, ref=None)
    assert torch.allclose(flipped, plain, atol=1e-6)
    assert (flipped - LN2).abs().max() > 1e-3  # a real, non-trivial loss
    with torch.no_grad():
        interventions.find(m).edits["1"].v.neg_()
    unflipped, _ = meth.loss(m, batch, ref=None)
    assert not torch.allclose(unflipped, flipped, atol=1e-4)


def test_bipo_step_draws_the_sign_from_the_seeded_rng(tiny, pairs):
    """The step context draws d from torch's global RNG (restored by checkpoints) and applies it
    to the vector only inside the step; over 40 seeded draws both signs appear."""
    from reprpo.methods.output import bipo_sign

    model0, tok = tiny
    m = _adapted(model0, "vector", layers=(1,))
    meth = build_method(resolve_config(("t", TINY | {"method.layers": "1"}), method="bipo"), m)
    torch.manual_seed(3)
    draws = [bipo_sign() for _ in range(40)]
    torch.manual_seed(3)
    seen = []
    batch = collate_pairs(pairs[:2], pad_id=tok.pad_token_id)
    for _ in range(40):
        with meth.step(m, batch, ref=None):
            seen.append(interventions.sign_of(m))
    assert seen == draws and set(draws) == {-1.0, 1.0} and interventions.sign_of(m) == 1.0


def test_R_stays_orthonormal_after_optimiser_steps(tiny, pairs):
    """R R^T = I_r (‖RRᵀ − I‖ < 1e-5) after 6 AdamW steps at lr 0.05 (weight decay 0.01, the
    default) that move R. torch's default map for a non-square R (householder) failed this: weight
    decay moved diag(original) off ±1 and R became 0."""
    model0, tok = tiny
    m = _adapted(model0, "loreft", layers=(0, 1), prompt_last=4)
    iv = interventions.find(m)
    R0 = iv.edits["0"].R.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)
    batch = collate_pairs(pairs, pad_id=tok.pad_token_id)
    for _ in range(6):
        lp = sequence_logps(m, batch)
        (-lp.logp_sum[: len(pairs)].mean() + lp.logp_sum[len(pairs):].mean()).backward()
        opt.step()
        opt.zero_grad()
    for f in iv.edits.values():
        R = f.R.detach()
        assert torch.linalg.matrix_norm(R @ R.T - torch.eye(R.shape[0])) < 1e-5
    assert (iv.edits["0"].R.detach() - R0).abs().max() > 1e-3


def test_save_load_gives_the_same_scores_also_with_two_workers(tmp_path, pairs):
    """save -> load_model(adapter=DIR) -> the same per-pair scores, bit for bit; scoring with two
    worker threads that share the model (each sets its own batch's positions) gives them too."""
    from reprpo.eval.scoring import score_pairs
    from reprpo.model.loading import load_model

    mc = ModelConfig(name="tiny-random")
    base, tok = load_model(mc)
    m = _adapted(base, "loreft", prompt_last=3, noise=0.3)
    interventions.save(m, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["intervention.safetensors", "intervention_config.json"]
    loaded, _ = load_model(mc, adapter=tmp_path)
    assert interventions.find(loaded).config() == interventions.find(m).config()
    a = score_pairs(m, pairs, pad_id=tok.pad_token_id, batch_size=1, progress=False)
    b = score_pairs(loaded, pairs, pad_id=tok.pad_token_id, batch_size=1, progress=False)
    c = score_pairs(loaded, pairs, pad_id=tok.pad_token_id, batch_size=1, workers=2, progress=False)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)


def test_generation_acts_at_the_generated_tokens(tiny):
    """Greedy generation with a loreft adapter (prompt's last 3 tokens + generated tokens) makes
    the tokens that the teacher-forced forward of [prompt; generation] (run_decoder, the training
    positions) predicts at every step: the positions of generation and training agree."""
    from reprpo.eval.coherence import generate_greedy

    model0, tok = tiny
    m = _adapted(model0, "loreft", prompt_last=3, noise=1.0).eval()
    gen = generate_greedy(m, tok, ["12+7="], max_new_tokens=8, chat_template=False, progress=False)[0]
    with adapter_disabled(m):
        base = generate_greedy(m, tok, ["12+7="], max_new_tokens=8, chat_template=False, progress=False)[0]
    assert gen != base and len(gen) >= 2
    ids = tuple(tok("12+7=", add_special_tokens=True)["input_ids"])
    batch = collate_pairs([TokenizedPair(ids, tuple(gen), tuple(gen), 0)], pad_id=tok.pad_token_id)
    _, head = decoder_and_head(m)
    with torch.no_grad():
        logits = head(run_decoder(m, batch))[0]  # (t, v)
    lp = len(ids)
    assert logits[lp - 1 : lp - 1 + len(gen)].argmax(-1).tolist() == gen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three new presets, 3 steps each through reprpo.train.train on the tiny model."""
    from reprpo.train import train

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for method in ("bipo", "loreft-dpo", "loreft"):
        values = TINY | {"out": str(root / method)}
        if method == "bipo":
            values.pop("method.layers")  # the preset's one middle block
        cfg = resolve_config(("test", values), method=method)
        out[method] = (cfg, train(cfg))
    return out


@pytest.mark.parametrize("method,kind,init", [("bipo", "vector", LN2), ("loreft-dpo", "loreft", LN2), ("loreft", "loreft", 2 * LN2)])
def test_new_presets_train_and_evaluate(runs, method, kind, init):
    """3 steps: step-1 loss = the init value (ln 2 for DPO; 2 ln 2 for prefvec), the adapter saved
    as intervention.{safetensors,_config.json} (no PEFT files), and evaluate_run scores base and
    adapter: the base row is the plain base model's, the adapter moved the margins."""
    from reprpo.eval.scoring import evaluate_run

    cfg, out = runs[method]
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 3 and m.loss.map(math.isfinite).all()
    assert m.loss[0] == pytest.approx(init, abs=1e-5)
    assert (out / "intervention.safetensors").is_file() and not (out / "adapter_config.json").exists()
    c = interventions.is_saved(out) and __import__("json").loads((out / "intervention_config.json").read_text())
    assert c["kind"] == kind and c["layers"] == ([1] if method == "bipo" else [0, 1])
    assert c["prompt_last"] == (0 if kind == "vector" else cfg.method.reft_prompt_last)
    table, per_pair = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
    assert table.adapter_accuracy.map(math.isfinite).all()
    base, adapter = per_pair[per_pair.model == "base"], per_pair[per_pair.model == "adapter"]
    assert (base.margin.to_numpy() != adapter.margin.to_numpy()).any()
    if method == "bipo":
        assert "bipo/sign" in m
    report = __import__("json").loads((out / "train_report.json").read_text())
    assert report["adapter"] == kind and report["layout"] == "shared-prompt"
    assert f"{kind} representation adapter" in (out / "README.md").read_text()


def test_export_copies_the_intervention_and_refuses_merged(runs, tmp_path):
    """`export --adapter` copies the intervention files (loadable, same scores); `--merged` is a
    clear error naming the fix, and writes nothing."""
    from reprpo.eval.scoring import score_pairs
    from reprpo.export import export_run
    from reprpo.model.loading import load_model

    cfg, out = runs["loreft-dpo"]
    with pytest.raises(ReprpoError, match="--adapter OUT"):
        export_run(out, merged=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (dst,) = export_run(out, adapter=tmp_path / "adapter")
    assert {"intervention.safetensors", "intervention_config.json", "README.md", "reprpo.json"} <= {p.name for p in dst.iterdir()}
    a, tok = load_model(cfg.model, adapter=out)
    b, _ = load_model(cfg.model, adapter=dst)
    tp, _ = tokenize_pairs(builtin_pairs("arith", "test")[:3], tok, max_length=64, max_prompt_length=48)
    pd.testing.assert_frame_equal(score_pairs(a, tp, pad_id=tok.pad_token_id, progress=False),
                                  score_pairs(b, tp, pad_id=tok.pad_token_id, progress=False))


def test_generation_check_runs_with_an_intervention(runs):
    """eval/coherence.py's generation check on a loreft run: base and adapter both generate."""
    from reprpo.eval.coherence import run_coherence

    cfg, out = runs["loreft"]
    res = run_coherence(cfg, adapter_dir=out, n_prompts=2, max_new_tokens=6)
    assert set(res) == {"base", "adapter"} and res["adapter"]["mean_length"] >= 0


def test_adapter_config_errors(tiny):
    """bipo_flip without a vector; a gradient-projection method on a representation adapter."""
    from reprpo.train import make_lora, train

    model0, _ = tiny
    with pytest.raises(ConfigError, match="train.adapter vector"):
        make_lora(copy.deepcopy(model0), apply_overrides(RunConfig(), {"method.bipo_flip": True}, where="t"))
    with pytest.raises(ConfigError, match="train.adapter vector"):
        make_lora(copy.deepcopy(model0), resolve_config(("t", TINY | {"train.adapter": "lora"}), method="bipo"))
    with pytest.raises(ConfigError, match="LoRA modules"):
        train(resolve_config(("t", TINY | {"train.adapter": "loreft", "out": "/tmp/reprpo-test-projgrad-loreft"}), method="projgrad"))


ARGS = ["--model.name", "tiny-random", "--data.n_train", "8", "--train.batch_size", "2", "--train.progress", "false",
        "--eval.after_train", "false", "--train.max_steps", "4", "--train.save_every", "2", "--method.layers", "0,1"]


@pytest.mark.parametrize("method", ["loreft", "bipo"])
def test_resume_is_exact_for_a_representation_adapter(method, tmp_path, monkeypatch):
    """Straight 4 steps vs. stopped after step 3 (checkpoint at step 2) and `--resume`: the same
    metrics rows and bit-identical intervention tensors (loreft: R's parametrisation, W, b;
    bipo: v and the RNG the signs come from). Fails when the checkpoint leaves the intervention's
    tensors out (the resumed run restarts them from init)."""
    from test_faults import _interrupted, _rows, _same_tensors

    args = ["train", method, *ARGS]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    _interrupted(monkeypatch, [*args, "--out", str(tmp_path / "b")], after_step=3)
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    ta, tb = (load_file(str(d / "intervention.safetensors")) for d in (a, b))
    assert _rows(a) == _rows(b) and _same_tensors(ta, tb)
