"""Findings of the independent audit, each pinned by a hand-worked test.

1. `ether` with k < d read only the first ⌈k/bs⌉ blocks of coordinates (a coordinate selection).
2. Layer fractions were floored in floating point ("0.29" of 100 blocks gave block 28).
3. The summary table's Δ must be percentage points, 100·(acc_adapter − acc_base), not a ratio.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from reprpo.eval import scoring
from reprpo.methods.transforms import build_transform
from reprpo.model.capture import parse_layers


def _orth_err(q: torch.Tensor) -> float:
    return (q.T @ q - torch.eye(q.shape[1])).abs().max().item()


# -- 1. ether mixes every coordinate --------------------------------------------------------------


@pytest.mark.parametrize(("d", "k", "bs"), [(32, 8, 8), (16, 12, 4), (576, 32, 8)])
def test_ether_partial_frame_reads_every_coordinate(d, k, bs):
    """Coordinates past ⌈k/bs⌉·bs (8, 12, 32 here) carry weight: every row of Q (d, k) is non-zero,
    and h supported only on those coordinates has T(h) ≠ 0. (The old frame had Q[⌈k/bs⌉·bs:] ≡ 0.)"""
    t = build_transform("ether", d=d, k=k, block_size=bs, seed=0)
    q = t.frame().detach()
    cut = math.ceil(k / bs) * bs
    assert q[cut:].abs().max() > 0.01, f"no weight on coordinates {cut}..{d - 1}"
    assert q.abs().sum(1).min() > 1e-3  # every coordinate is read
    h = torch.zeros(d)
    h[cut:] = torch.randn(d - cut, generator=torch.Generator().manual_seed(1))
    assert t(h).norm() > 1e-2
    assert _orth_err(q) < 1e-5


def test_ether_hand_worked():
    """d = 4, k = 1, bs = 2, M = (½, ½, ½, ½)ᵀ, v_1 = (1, 1), v_2 = (1, 0).
    H(1, 1) = I − vvᵀ = [[0, −1], [−1, 0]] maps (½, ½) to (−½, −½); H(1, 0) = diag(−1, 1) maps
    (½, ½) to (−½, ½). So Q = (−½, −½, −½, ½)ᵀ (QᵀQ = 1) and T(1, 2, 3, 4) = (−1 − 2 − 3 + 4)/2 = −1."""
    t = build_transform("ether", d=4, k=1, block_size=2, seed=0)
    with torch.no_grad():
        t.mix.copy_(torch.full((4, 1), 0.5))
        t.v.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(t.frame(), torch.tensor([[-0.5], [-0.5], [-0.5], [0.5]]))
    torch.testing.assert_close(t(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-1.0]))


def test_ether_orthonormal_trainable_seeded_and_its_span_moves():
    """d = 32, k = 8, bs = 8: v is (4, 8), one reflection per block over the full width; M is a
    buffer, not a parameter. QᵀQ = I_8 at init and after 3 SGD steps; every block's v gets a
    gradient; the projector QQᵀ moves (the old frame's span was fixed to coordinates 0..7 since
    bs divides k); same seed gives the same frame, another seed another."""
    d, k = 32, 8
    t = build_transform("ether", d=d, k=k, block_size=8, seed=1)
    assert t.v.shape == (4, 8)
    assert [n for n, _ in t.named_parameters()] == ["v"] and "mix" in t.state_dict()
    q0 = t.frame().detach().clone()
    assert _orth_err(q0) < 1e-5
    g = torch.Generator().manual_seed(2)
    h, target = torch.randn(16, d, generator=g), torch.randn(16, k, generator=g)
    opt = torch.optim.SGD(t.parameters(), lr=0.5)
    for i in range(3):
        opt.zero_grad()
        ((t(h) - target) ** 2).mean().backward()
        if i == 0:
            assert (t.v.grad.abs().sum(1) > 0).all(), "a block got no gradient"
        opt.step()
    q1 = t.frame().detach()
    assert _orth_err(q1) < 1e-5
    assert (q1 @ q1.T - q0 @ q0.T).abs().max() > 1e-3  # span(Q) moved, not just rotated inside
    a, b, c = (build_transform("ether", d=d, k=k, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.frame(), b.frame()) and torch.equal(a.mix, b.mix)
    assert not torch.allclose(a.frame(), c.frame())


def test_ether_full_frame_is_orthogonal():
    """k = d = 16: Q is square with QᵀQ = QQᵀ = I, so ‖T(a) − T(b)‖ = ‖a − b‖ and ⟨T(a), T(b)⟩ = ⟨a, b⟩."""
    t = build_transform("ether", d=16, k=16, block_size=4, seed=3)
    q = t.frame().detach()
    torch.testing.assert_close(q @ q.T, torch.eye(16), atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    torch.testing.assert_close((t(a) - t(b)).norm(dim=-1), (a - b).norm(dim=-1), atol=1e-4, rtol=0)
    torch.testing.assert_close((t(a) * t(b)).sum(-1), (a * b).sum(-1), atol=1e-4, rtol=0)


# -- 2. exact layer fractions ---------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "n", "want"), [
    ("0.29", 100, [29]),  # floor(29/100 · 100) = 29; in floats 0.29 * 100 = 28.999999999999996 -> 28
    ("0.58", 100, [58]),  # floats: 0.58 * 100 = 57.99999999999999 -> 57
    ("0.5", 30, [15]),  # 1/2 · 30 = 15
    ("range(0.29, 0.32)", 100, [29, 30, 31]),  # start 29, exclusive stop floor(32/100 · 100) = 32
    ("range(0.57, 0.6)", 100, [57, 58, 59]),  # floats: start 0.57 * 100 = 56.99999999999999 -> 56
    ("1.0", 100, [99]),  # 1.0 = the last block
    ("-1", 100, [99]),  # ints negative from the end
    ("range(0.5, 1.0)", 4, [2, 3]),  # stop 1.0 -> 4, past the last block
])
def test_layer_fractions_are_exact(spec, n, want):
    assert parse_layers(spec, n) == want


# -- 3. summary Δ in percentage points ------------------------------------------------------------

# mean log-probs (ℓ̄⁺, ℓ̄⁻) of 4 pairs, 2 tokens each
_A = ([-1.0, -2.0, -1.0, -2.0], [-2.0, -1.0, -2.0, -1.0])  # correct 1, 0, 1, 0: acc 0.5, margin 0, ppl e^1.5
_B = ([-1.0, -1.0, -1.0, -2.0], [-2.0, -2.0, -2.0, -1.0])  # correct 1, 1, 1, 0: acc 0.75, margin 0.5, ppl e^1.25
_CASES = {("test", "base"): _A, ("test", "adapter"): _B, ("oos", "base"): _B, ("oos", "adapter"): _A}


def test_summary_delta_is_percentage_points(monkeypatch):
    """split test: base acc 0.5 -> adapter 0.75, so Δ = 100·(0.75 − 0.5) = +25.0 pp (a ratio would
    be 1.5); chosen ppl e^1.25/e^1.5 = e^−0.25 = 0.7788008. split oos: the reverse, Δ = −25.0 pp,
    ppl ratio e^0.25 = 1.2840254. Margins: test 0 -> 0.5, oos 0.5 -> 0.
    Scores are faked per (split, adapter on/off); evaluate_splits and markdown_table are real."""
    state = {"model": "adapter"}

    @contextmanager
    def fake_disabled(model):
        state["model"] = "base"
        try:
            yield
        finally:
            state["model"] = "adapter"

    def fake_score_pairs(model, pairs, **_kw):
        chosen, rejected = _CASES[(pairs[0], state["model"])]
        return scoring.finish_scores(pd.DataFrame({
            "pair": range(4), "chosen_logp_sum": [2 * c for c in chosen], "rejected_logp_sum": [2 * r for r in rejected],
            "chosen_tokens": [2] * 4, "rejected_tokens": [2] * 4}))

    monkeypatch.setattr(scoring, "adapter_disabled", fake_disabled)
    monkeypatch.setattr(scoring, "score_pairs", fake_score_pairs)
    splits = {"test": ["test"] * 4, "oos": ["oos"] * 4}
    table, per_pair = scoring.evaluate_splits(None, SimpleNamespace(pad_token_id=0), splits, batch_size=2)
    r = table.set_index("split")
    assert r.loc["test", "base_accuracy"] == 0.5 and r.loc["test", "adapter_accuracy"] == 0.75
    assert r.loc["test", "delta_pp"] == pytest.approx(25.0)
    assert r.loc["oos", "delta_pp"] == pytest.approx(-25.0)
    for split in ("test", "oos"):
        row = r.loc[split]
        assert row.delta_pp == pytest.approx(100 * (row.adapter_accuracy - row.base_accuracy))
        assert row.ppl_ratio == pytest.approx(row.adapter_chosen_ppl / row.base_chosen_ppl)
    assert r.loc["test", "ppl_ratio"] == pytest.approx(math.exp(-0.25)) == pytest.approx(0.7788008)
    assert r.loc["oos", "ppl_ratio"] == pytest.approx(math.exp(0.25)) == pytest.approx(1.2840254)
    assert len(per_pair) == 16
    md = scoring.markdown_table(table)
    assert "Δ pp" in md
    assert "| test | 4 | 50.0 | 75.0 | +25.0 | +0.000 | +0.500 | 0.779 |" in md
    assert "| oos | 4 | 75.0 | 50.0 | -25.0 | +0.500 | +0.000 | 1.284 |" in md
