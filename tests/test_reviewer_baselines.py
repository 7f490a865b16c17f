"""The baselines a reviewer asks for (reward, probe-mms, steer-mean) and the GENIES metrics
(differential elicitation, RMS calibration error): hand-worked numbers, then the tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from reprpo.eval.stats import differential_elicitation, rms_calibration_error
from reprpo.methods import build_method, resolve_config
from reprpo.methods.mms import (
    accuracy,
    choose_layer,
    holdout_split,
    mass_mean,
    mms_margin,
    response_row_mask,
    steered,
)
from reprpo.methods.reward import bt_loss

LN2 = math.log(2)
TINY = {"model.name": "tiny-random", "data.shift": "builtin:difficulty", "data.n_train": 16, "data.n_eval": 8,
        "data.max_length": 64, "data.max_prompt_length": 48, "train.batch_size": 4, "train.max_steps": 3, "train.lr": 1e-2,
        "train.progress": False, "eval.after_train": False}


# --------------------------------------------------------------------------- hand-worked formulas


def test_bt_loss_hand_worked():
    """r⁺ = (1, 0, 1), r⁻ = (0, 0, 2):
    L = −log σ(1) = log(1 + e⁻¹) = 0.313262, −log σ(0) = ln 2 = 0.693147, −log σ(−1) = 1.313262.
    With η = 0.01 the third pair adds 0.01·(1 + 2)² = 0.09 -> 1.403262 (the first 0.01, the second 0)."""
    loss, m = bt_loss(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 2.0]))
    assert loss.tolist() == pytest.approx([0.313262, LN2, 1.313262], abs=1e-6)
    assert float(m["rewards/accuracy"]) == pytest.approx(1 / 3) and float(m["rewards/margin"]) == pytest.approx(0.0)
    loss, _ = bt_loss(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 2.0]), center=0.01)
    assert loss.tolist() == pytest.approx([0.323262, LN2, 1.403262], abs=1e-6)


def test_mass_mean_probe_hand_worked():
    """δ = h̄⁺ − h̄⁻ of two training pairs: (1, 0) and (3, 2) -> v = (2, 1).
    Test pairs: h̄⁺ = (1, 1), h̄⁻ = (0, 2): δ = (1, −1), ⟨δ, v⟩ = 2 − 1 = 1 (correct);
    h̄⁺ = (0, 0), h̄⁻ = (1, 0): ⟨(−1, 0), v⟩ = −2 (wrong); equal responses: 0 (a tie, 0.5).
    Accuracy (1 + 0 + 0.5) / 3 = 0.5."""
    v = mass_mean(torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
    assert v.tolist() == [2.0, 1.0]
    s = mms_margin(torch.tensor([[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]]), torch.tensor([[0.0, 2.0], [1.0, 0.0], [5.0, 5.0]]), v)
    assert s.tolist() == [1.0, -2.0, 0.0]
    assert accuracy(s) == 0.5


def test_choose_layer_by_held_out_accuracy():
    """Layer 3: the fit pairs' δ point along +x and the held-out δ too (held accuracy 1);
    layer 7: fitted along +x but held-out δ point along −x (accuracy 0). Layer 3 is chosen."""
    fit, held = [0, 1], [2, 3]
    d3 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0], [0.5, -1.0]])
    d7 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-2.0, 1.0]])
    layer, accs = choose_layer({7: d7, 3: d3}, fit, held)
    assert layer == 3 and accs == {7: 0.0, 3: 1.0}


def test_holdout_split_by_prompt_is_seeded_and_disjoint():
    """No prompt on both sides; about the fraction of prompts held out; another seed, another split."""
    from reprpo.data.tokenize import TokenizedPair

    pairs = [TokenizedPair((1, i // 2), (5,), (6,), i) for i in range(40)]  # 20 prompts, two pairs each
    fit, held = holdout_split(pairs, 0.25, seed=1)
    assert sorted(fit + held) == list(range(40)) and len(held) == 10
    assert not {tuple(pairs[i].prompt_ids) for i in fit} & {tuple(pairs[i].prompt_ids) for i in held}
    assert holdout_split(pairs, 0.25, seed=1) == (fit, held) and holdout_split(pairs, 0.25, seed=2)[1] != held


def test_differential_elicitation_hand_worked():
    """(0.70 − 0.55) / 0.75 = 0.2; a method below the base: (0.50 − 0.55) / 0.75 = −0.0667;
    no target-tuned accuracy (NaN or 0): undefined."""
    assert differential_elicitation(0.70, 0.55, 0.75) == pytest.approx(0.2)
    assert differential_elicitation(0.50, 0.55, 0.75) == pytest.approx(-0.05 / 0.75)
    assert math.isnan(differential_elicitation(0.7, 0.5, math.nan)) and math.isnan(differential_elicitation(0.7, 0.5, 0.0))


def test_rms_calibration_error_hand_worked():
    """45 pairs, orientation given (flip = A is the rejected response, y = 0):
    - 12 unflipped with m = ln 3 (p = σ(ln 3) = 0.75, y = 1) and 8 flipped with m = −ln 3
      (p = σ(ln 3) = 0.75, y = 0): bin [0.6, 0.8), p̄ = 0.75, ȳ = 0.6, gap 0.15;
    - 10 flipped with m = ln 3 (p = 0.25, y = 0) and 10 unflipped with m = −ln 3 (p = 0.25, y = 1):
      bin [0.2, 0.4), p̄ = 0.25, ȳ = 0.5, gap −0.25;
    - 5 with m = 0 (p = 0.5): a bin of 5 < 20 pairs, skipped.
    RMS = √((20·0.15² + 20·0.25²) / 40) = √0.0425 = 0.206155."""
    l3 = math.log(3)
    margins = [l3] * 12 + [-l3] * 8 + [l3] * 10 + [-l3] * 10 + [0.0] * 5
    flip = [False] * 12 + [True] * 8 + [True] * 10 + [False] * 10 + [False] * 5
    assert rms_calibration_error(margins, flip=flip) == pytest.approx(math.sqrt(0.0425), abs=1e-9)
    assert math.isnan(rms_calibration_error(margins[:19], flip=flip[:19]))  # no bin of 20
    # the drawn orientation is fixed by the seed; a perfectly calibrated scorer has error ~0
    rng = torch.Generator().manual_seed(0)
    p = torch.rand(4000, generator=rng)
    y = torch.rand(4000, generator=rng) < p  # chosen is right with probability p = σ(m)
    m = torch.where(y, torch.logit(p), -torch.logit(p))  # margin of the pair as chosen/rejected
    e1, e2 = rms_calibration_error(m.tolist(), seed=3), rms_calibration_error(m.tolist(), seed=3)
    assert e1 == e2 and e1 < 0.03
    assert rms_calibration_error((4 * m).tolist(), seed=3) > 0.1  # over-confident: 4x the margins


# --------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny_data(tiny):
    from reprpo.data.builtin import builtin_pairs
    from reprpo.data.tokenize import collate_pairs, tokenize_pairs

    model, tok = tiny
    tp, _ = tokenize_pairs(builtin_pairs("arith", "train")[:16], tok, max_length=64, max_prompt_length=48)
    return tp, collate_pairs(tp[:4], pad_id=tok.pad_token_id)


def test_reward_head_starts_at_zero_and_scores_r_difference(tiny, tiny_data):
    """At init every reward is 0: loss ln 2 and margin 0; after the head is set, the scorer's
    margin is r⁺ − r⁻ = w·(h⁺ − h⁻) of the final hidden states at the last response token."""
    from reprpo.methods.reward import final_hidden, reward_score
    from reprpo.model.capture import pool
    from reprpo.model.forward import run_decoder
    from reprpo.train import make_lora

    cfg = resolve_config(("t", TINY), method="reward")
    model = make_lora(copy.deepcopy(tiny[0]), cfg)
    meth = build_method(cfg, model)
    tp, batch = tiny_data
    loss, _ = meth.loss(model, batch)
    assert loss.tolist() == pytest.approx([LN2] * 4, abs=1e-7)
    torch.manual_seed(0)
    with torch.no_grad():
        meth.head.weight.normal_()
        meth.head.bias.fill_(3.0)  # cancels in r⁺ − r⁻
    cols = reward_score(model, batch, method=meth)
    with torch.no_grad():
        h = run_decoder(model, batch)
        hp = pool(h[batch.rows], response_mask=batch.response_mask, attention_mask=batch.pool_mask, mode="last")
        r = hp @ meth.head.weight[0]
        with final_hidden(model) as st:
            run_decoder(model, batch)
    assert torch.allclose(st["h"], h)
    assert cols["margin"].tolist() == pytest.approx((r[:4] - r[4:]).tolist(), abs=1e-5)
    assert "chosen_logp_sum" in cols  # the log-prob columns come from the same forward


def test_steered_adds_the_vector_at_response_tokens_only(tiny, tiny_data):
    """Block 0's output with the hook = without it + vec at every response token of each input
    row (chosen and rejected rows alike), unchanged elsewhere; a zero vector changes no score."""
    from reprpo.model.capture import capture, capture_points
    from reprpo.model.forward import sequence_logps

    model, _ = tiny
    _, batch = tiny_data
    pt = capture_points(model, collection="hs", layers=[0])
    vec = torch.arange(model.config.hidden_size, dtype=torch.float32) / 10
    with torch.no_grad():
        with capture(pt) as plain:
            lp0 = sequence_logps(model, batch)
        with steered(model, 0, vec, batch), capture(pt) as st:
            sequence_logps(model, batch)
        with steered(model, 0, vec * 0, batch):
            lp_zero = sequence_logps(model, batch)
    mask = response_row_mask(batch)
    assert mask.sum() == batch.response_mask.sum()  # padded layout: each response lives in its own row
    diff = st["hs.0"] - plain["hs.0"]
    assert torch.allclose(diff, mask[..., None] * vec, atol=1e-5)
    assert torch.equal(lp_zero.logp_sum, lp0.logp_sum)


@pytest.mark.parametrize("method", ["probe-mms", "steer-mean", "reward"])
def test_baseline_trains_or_fits_and_evaluate_scores_it(method, tmp_path):
    """Through `train` and `evaluate_run`, like any method: the base row is the zero-shot ℓ̄
    margin (the same for every method), the adapter row the method's own scorer; the
    method_state.pt (head / direction) is saved and read back; training-free runs take no step."""
    import json

    from reprpo.eval.scoring import evaluate_run
    from reprpo.train import train

    cfg = resolve_config(("t", TINY | {"method.probe_holdout": 0.5, "method.steer_pairs": 4}), method=method)
    cfg.out = str(tmp_path / method)
    out = train(cfg)
    rep = json.loads((out / "train_report.json").read_text())
    assert (out / "method_state.pt").is_file()
    assert rep["training_free"] == (method != "reward") and rep["steps"] == (0 if method != "reward" else 3)
    table, per_pair = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
    dpo = resolve_config(("t", TINY), method="dpo")
    dpo.out = str(tmp_path / "dpo")
    base_dpo, _ = evaluate_run(dpo, adapter_dir=None, out=tmp_path / "dpo-eval")
    assert table.base_accuracy.tolist() == base_dpo.base_accuracy.tolist()  # zero-shot base
    if method == "reward":
        assert "reward_chosen" in per_pair and math.isnan(table.ppl_ratio[0])  # reward: ppl ratio n/a
    elif method == "probe-mms":
        state = torch.load(out / "method_state.pt")
        assert state["v"].norm() > 0 and math.isnan(table.ppl_ratio[0])
    else:
        assert math.isfinite(table.ppl_ratio[0])
    assert "n/a" in (out / "eval" / "summary.md").read_text() or method == "steer-mean"


def test_probe_layer_given_alone_is_used_without_selection(tiny, tiny_data):
    """method.layers with one block: that block, v = the mean δ over every training pair."""
    from reprpo.model.refcache import build_ref_cache
    from reprpo.train import make_lora

    cfg = resolve_config(("t", TINY | {"method.layers": "1"}), method="probe-mms")
    model = make_lora(copy.deepcopy(tiny[0]), cfg)
    meth = build_method(cfg, model)
    tp, _ = tiny_data
    meth.prepare(model, tp, pad_id=tiny[1].pad_token_id)
    c = build_ref_cache(model, tp, pad_id=tiny[1].pad_token_id, points=meth.points, use_disk=False, progress=False)
    assert int(meth.layer) == 1
    assert torch.allclose(meth.v, (c.acts["hs.1"][:, 0] - c.acts["hs.1"][:, 1]).mean(0), atol=1e-6)


def test_compare_with_target_tuned_reports_de_calibration_and_na(tmp_path):
    """An end-to-end compare on the tiny model: dpo, probe-mms and reward on one shift, two
    seeds, with `--target-tuned`: the store holds a "target:dpo" run per seed (trained on the
    oos distribution's train split, scored on the shift's oos split); the report gives a DE
    column that equals the formula on the stored accuracies, a calibration table, and n/a for
    the ppl ratio and the generation check of the methods whose score is their own."""
    import sqlite3

    from reprpo.config import RunConfig, apply_overrides
    from reprpo.experiments.compare import run_grid
    from reprpo.experiments.report import de_table, load_frames, render_report

    base = apply_overrides(RunConfig(), {k: v for k, v in TINY.items() if k != "data.shift"} | {"train.max_steps": 2}, where="test")
    store_path = tmp_path / "s.sqlite"
    run_grid(methods=["dpo", "probe-mms", "reward", "steer-mean"], shifts=["difficulty"], seeds=[1, 2], base=base, store_path=store_path,
             out_root=tmp_path / "runs", progress=False, fail_fast=True, target_tuned="dpo")
    con = sqlite3.connect(store_path)
    rows = con.execute("SELECT method, config_json FROM runs WHERE status = 'done' ORDER BY method").fetchall()
    con.close()
    assert sorted(m for m, _ in rows) == sorted(["dpo", "probe-mms", "reward", "steer-mean", "target:dpo"] * 2)
    tcfg = next(c for m, c in rows if m == "target:dpo")
    assert "builtin:arith_hard/train" in tcfg and '"oos": "builtin:arith_hard/test"' in tcfg  # the oos distribution's own train split
    frames = load_frames(store_path)
    assert "target:dpo" not in set(frames["runs"].method)  # kept out of the method tables
    de = de_table(frames)
    ss = frames["split_scores"].merge(frames["runs"][["run_id", "method", "seed"]], on="run_id")
    acc = lambda m, s, model: float(ss[(ss.method == m) & (ss.seed == s) & (ss.split == "oos") & (ss.model == model)].accuracy.iloc[0])
    tgt = {int(r.seed): r.acc for r in frames["targets"].itertuples()}
    for method in ("dpo", "probe-mms", "reward"):
        want = [(acc(method, s, "adapter") - acc(method, s, "base")) / tgt[s] for s in (1, 2)]
        got = de[de.method == method].iloc[0]
        assert got.de == pytest.approx(sum(want) / 2) and got.defined == 2
    md = render_report(store_path, tmp_path / "report")
    assert "Differential elicitation" in md and "Calibration" in md
    assert "Generation check n/a for probe-mms, reward:" in md
    assert set(frames["coherence"].merge(frames["runs"], on="run_id").method) == {"dpo", "steer-mean"}  # steer-mean generates steered
    reward_rows = [line for line in md.splitlines() if line.startswith("| test | reward |")]
    assert reward_rows and reward_rows[0].rstrip(" |").endswith("n/a")


def test_steered_generation_adds_the_vector_at_generated_tokens_only(tiny):
    """A prompt pass of 8 tokens with prompt_len 5: block 0's output + vec at positions 5..7
    only; a later one-token call (KV cache): + vec. A zero vector leaves greedy generation as it was."""
    from reprpo.methods.mms import steered_generation
    from reprpo.model.capture import capture, capture_points

    model, tok = tiny
    pt = capture_points(model, collection="hs", layers=[0])
    vec = torch.ones(model.config.hidden_size)
    x = torch.arange(3, 11)[None]
    with torch.no_grad():
        with capture(pt) as plain:
            model(input_ids=x)
        with steered_generation(model, 0, vec, 5), capture(pt) as st:
            model(input_ids=x)
            model(input_ids=x[:, :1])  # the second call: one new token
            one = st["hs.0"]
        with capture(pt) as plain1:
            model(input_ids=x[:, :1])
    mask = (torch.arange(8) >= 5).float()
    assert torch.allclose(one, plain1["hs.0"] + vec, atol=1e-5)
    with torch.no_grad(), steered_generation(model, 0, vec, 5), capture(pt) as st:
        model(input_ids=x)
    assert torch.allclose(st["hs.0"] - plain["hs.0"], mask[None, :, None] * vec, atol=1e-5)
    with torch.no_grad():
        y0 = model.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with steered_generation(model, 0, vec * 0, x.shape[1]):
            y1 = model.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(y0, y1)


@pytest.mark.parametrize("method", ["reward", "probe-mms", "steer-mean"])
def test_scorers_that_hook_the_model_are_exact_with_two_scoring_workers(method, tiny, tiny_data):
    """Scoring workers share one model, so every worker's forward passes every hook: each hook
    must act on (and collect) its own thread's forward only. Two workers give the one-worker
    margins (before, the reward / probe hooks read the other thread's hidden states: a shape
    error or wrong margins)."""
    from reprpo.eval.scoring import score_pairs
    from reprpo.methods.presets import scorer_of
    from reprpo.train import make_lora

    cfg = resolve_config(("t", TINY | {"method.probe_holdout": 0.5, "method.steer_pairs": 4, "method.layers": "0"}), method=method)
    model = make_lora(copy.deepcopy(tiny[0]), cfg)
    meth = build_method(cfg, model)
    tp, _ = tiny_data
    meth.prepare(model, tp, pad_id=tiny[1].pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in meth.parameters():  # the reward head: non-zero, so its margins differ per pair
            p.normal_()
        if method == "steer-mean":
            meth.alpha = torch.tensor(2.0)
    model.eval()
    kw = dict(pad_id=tiny[1].pad_token_id, batch_size=1, scorer=scorer_of(cfg), method=meth, progress=False)
    with torch.inference_mode():
        one = score_pairs(model, tp, workers=1, **kw)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(3):
            two = score_pairs(model, tp, workers=2, **kw)
            assert two.margin.tolist() == pytest.approx(one.margin.tolist(), abs=1e-5)
    finally:
        torch.set_num_threads(old)
