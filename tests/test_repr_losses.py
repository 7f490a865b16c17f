"""Representation losses of DESIGN §5: values at init, hand-worked examples, gradients, registry.

The hand-worked examples share one 2-d point ("the example"):
    h⁺_ref = (1, 0), h⁻_ref = (0, 0), h⁺_θ = (2, 0), h⁻_θ = (0, 1)
    δ_ref = (1, 0), ‖δ_ref‖ = 1, u = (1, 0);  δ_θ = (2, -1)
    p = ⟨δ_θ, u⟩/‖δ_ref‖ = 2
    o = ‖(2, -1) - 2·(1, 0)‖/1 = ‖(0, -1)‖ = 1
    c = ⟨(2, -1), (1, 0)⟩/(‖(2, -1)‖·1) = 2/√5 = 0.8944272
"""

import inspect
import math

import pytest
import torch

from reprpo.methods.repr_losses import (
    REPR_LOSSES,
    PooledActs,
    innerdpo_term,
    innerpo_term,
    mse_loss,
    preference_geometry,
    prefvec_loss,
    rank_loss,
    rank_token_fn,
)

LN2 = math.log(2.0)
T = torch.tensor


def example() -> PooledActs:
    return PooledActs(
        pi_chosen=T([[2.0, 0.0]]), pi_rejected=T([[0.0, 1.0]]),
        ref_chosen=T([[1.0, 0.0]]), ref_rejected=T([[0.0, 0.0]]),
    )


def at_init(b=4, d=8, seed=0, scale=3.0) -> tuple[PooledActs, torch.Tensor, torch.Tensor]:
    """Policy == reference; the policy tensors are leaves with gradients."""
    g = torch.Generator().manual_seed(seed)
    rc, rr = torch.randn(b, d, generator=g) * scale, torch.randn(b, d, generator=g) * scale
    pc, pr = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    return PooledActs(pc, pr, rc, rr), pc, pr


def perturbed(b=4, d=8, seed=0, degenerate_row=None) -> tuple[PooledActs, torch.Tensor, torch.Tensor]:
    """Policy = reference + noise; optionally one row with δ_ref = 0 (chosen == rejected)."""
    g = torch.Generator().manual_seed(seed)
    rc, rr = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    if degenerate_row is not None:
        rr[degenerate_row] = rc[degenerate_row]
    pc = (rc + 0.1 * torch.randn(b, d, generator=g)).requires_grad_()
    pr = (rr + 0.1 * torch.randn(b, d, generator=g)).requires_grad_()
    return PooledActs(pc, pr, rc, rr), pc, pr


def run_spec(spec, acts):
    if spec.needs_token_fn:  # one "token" per example: pooling is the identity
        acts = [PooledActs(*(spec.token_fn(t) for t in (a.pi_chosen, a.pi_rejected, a.ref_chosen, a.ref_rejected))) for a in acts]
    return spec.fn(acts, **spec.defaults)


# --- geometry -------------------------------------------------------------------------------

def test_geometry_hand_worked():
    p, o, c = preference_geometry(example())
    assert p.tolist() == pytest.approx([2.0])
    assert o.tolist() == pytest.approx([1.0])
    assert c.tolist() == pytest.approx([2 / math.sqrt(5)])


def test_geometry_at_init_is_1_0_1():
    acts, _, _ = at_init()
    p, o, c = preference_geometry(acts)
    assert torch.allclose(p, torch.ones(4), atol=1e-5)
    assert torch.allclose(o, torch.zeros(4), atol=1e-3)  # rounding noise only
    assert torch.allclose(c, torch.ones(4), atol=1e-5)


def test_geometry_degenerate_pair_is_finite():
    """Row 0 has h⁺_ref = h⁻_ref = (1, 1): ‖δ_ref‖ is floored at 1e-6·√2, u = 0, so p = 0, c = 0
    and o = ‖δ_θ‖/floor = 0.5/(1.4142e-6) = 353553 (finite, large). Row 1 is the example."""
    acts = PooledActs(
        pi_chosen=T([[1.5, 1.0], [2.0, 0.0]]), pi_rejected=T([[1.0, 1.0], [0.0, 1.0]]),
        ref_chosen=T([[1.0, 1.0], [1.0, 0.0]]), ref_rejected=T([[1.0, 1.0], [0.0, 0.0]]),
    )
    p, o, c = preference_geometry(acts)
    assert p.tolist() == pytest.approx([0.0, 2.0])
    assert c.tolist() == pytest.approx([0.0, 2 / math.sqrt(5)])
    assert o.tolist() == pytest.approx([0.5 / (1e-6 * math.sqrt(2)), 1.0], rel=1e-4)
    _, m = prefvec_loss([acts], beta_p=1.0, lambda_o=1.0, lambda_c=0.0)
    assert float(m["repr/degenerate"]) == 0.5


def test_geometry_all_zero_activations_are_finite():
    z = torch.zeros(2, 3)
    p, o, c = preference_geometry(PooledActs(z, z, z, z))
    assert torch.isfinite(torch.stack([p, o, c])).all()


def test_pooled_acts_shape_error():
    with pytest.raises(ValueError, match="four"):
        PooledActs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))


# --- mse ------------------------------------------------------------------------------------

def test_mse_hand_worked():
    """α = 0.5:  ‖h⁻_θ - h⁺_ref‖ = ‖(0,1) - (1,0)‖ = √2;  ‖h⁺_θ - h⁺_ref‖ = ‖(1, 0)‖ = 1
    L = √2/1 + 0.5·1/1 = 1.4142136 + 0.5 = 1.9142136"""
    loss, m = mse_loss([example()], alpha=0.5)
    assert loss.tolist() == pytest.approx([1.9142136])
    assert float(m["repr/mse/rejected"]) == pytest.approx(math.sqrt(2))
    assert float(m["repr/mse/chosen"]) == pytest.approx(0.5)


def test_mse_is_one_at_init_and_pulls_rejected_to_chosen():
    """At init L = ‖h⁻_ref - h⁺_ref‖/‖δ_ref‖ + 0 = 1.
    dL/dh⁻_θ = (h⁻_θ - h⁺_ref)/(‖·‖‖δ_ref‖) = -u/‖δ_ref‖: descent moves h⁻_θ along +u."""
    acts, _, pr = at_init()
    loss, _ = mse_loss([acts], alpha=1.0)
    assert torch.allclose(loss, torch.ones(4))
    loss.sum().backward()
    delta_ref = acts.ref_chosen - acts.ref_rejected
    n = delta_ref.norm(dim=-1)
    along = (pr.grad * delta_ref / n[:, None]).sum(-1)
    assert torch.allclose(along, -1 / n, rtol=1e-4)


# --- prefvec --------------------------------------------------------------------------------

def test_prefvec_hand_worked():
    """β_p = 1, λ_o = 0.5, λ_c = 2 with p = 2, o = 1, c = 2/√5:
    softplus(-1·(2 - 1)) = log(1 + e^-1) = 0.3132617
    λ_o·õ, õ = sqrt(o² + 1e-6) - 1e-3 = 1.0000005 - 0.001 = 0.9990005 -> 0.4995002
    λ_c·(1 - c) = 2·(1 - 0.8944272) = 0.2111456
    L = 0.3132617 + 0.4995002 + 0.2111456 = 1.0239075"""
    loss, m = prefvec_loss([example()], beta_p=1.0, lambda_o=0.5, lambda_c=2.0)
    assert loss.tolist() == pytest.approx([1.0239075], abs=1e-6)
    assert float(m["repr/prefvec/along"]) == pytest.approx(0.3132617, abs=1e-6)
    assert float(m["repr/prefvec/orth"]) == pytest.approx(0.4995002, abs=1e-6)
    assert float(m["repr/prefvec/cos"]) == pytest.approx(0.2111456, abs=1e-6)
    assert float(m["repr/p"]) == pytest.approx(2.0)
    assert float(m["repr/o/0"]) == pytest.approx(1.0)


def test_prefvec_is_ln2_at_init_and_pushes_p_up():
    """At init p = 1: L = softplus(0) = ln 2 (+ λ_o·0 + λ_c·0).
    dL/dh⁺_θ · u = -β_p σ(0)/‖δ_ref‖ = -β_p/(2‖δ_ref‖) (the o term's gradient is ⟂ u, the c
    term's is 0 at its maximum); dL/dh⁻_θ · u = +β_p/(2‖δ_ref‖)."""
    acts, pc, pr = at_init()
    loss, _ = prefvec_loss([acts], beta_p=2.0, lambda_o=1.0, lambda_c=1.0)
    assert torch.allclose(loss, torch.full((4,), LN2), atol=1e-4)
    loss.sum().backward()
    delta_ref = acts.ref_chosen - acts.ref_rejected
    n = delta_ref.norm(dim=-1)
    u = delta_ref / n[:, None]
    assert torch.allclose((pc.grad * u).sum(-1), -1.0 / n, rtol=1e-4)
    assert torch.allclose((pr.grad * u).sum(-1), 1.0 / n, rtol=1e-4)


def test_smoothed_drift_has_no_random_kick_at_init():
    """õ = sqrt(o² + ε²) - ε: 0 and flat at o = 0, so rounding noise in δ_θ ⟂ u gives no
    gradient; o itself (the metric) stays exact."""
    from reprpo.methods.repr_losses import smooth_o

    assert float(smooth_o(torch.tensor(0.0))) == 0.0
    o = torch.tensor(1e-7, requires_grad=True)
    smooth_o(o).backward()
    assert abs(float(o.grad)) < 1e-3
    assert float(smooth_o(torch.tensor(2.0))) == pytest.approx(2.0 - 1e-3, abs=1e-6)


def test_multi_point_average():
    """Point 0 is the example (1.0239075 with β_p 1, λ_o 0.5, λ_c 2), point 1 is at init (ln 2).
    L = (1.0239075 + 0.6931472)/2 = 0.8585274;  repr/p = (2 + 1)/2 = 1.5."""
    init = PooledActs(T([[1.0, 0.0]]), T([[0.0, 0.0]]), T([[1.0, 0.0]]), T([[0.0, 0.0]]))
    loss, m = prefvec_loss([example(), init], beta_p=1.0, lambda_o=0.5, lambda_c=2.0)
    assert loss.tolist() == pytest.approx([0.8585274], abs=1e-6)
    assert float(m["repr/loss/0"]) == pytest.approx(1.0239075, abs=1e-6)
    assert float(m["repr/loss/1"]) == pytest.approx(LN2)
    assert float(m["repr/p/0"]) == pytest.approx(2.0)
    assert float(m["repr/p/1"]) == pytest.approx(1.0)
    assert float(m["repr/p"]) == pytest.approx(1.5)
    assert float(m["repr/o"]) == pytest.approx(0.5)
    assert float(m["repr/c"]) == pytest.approx((2 / math.sqrt(5) + 1) / 2)


# --- rank -----------------------------------------------------------------------------------

def test_rank_token_fn():
    """log_softmax((0, 0)) = (-ln 2, -ln 2), computed in float32 even from bf16."""
    q = rank_token_fn(torch.zeros(3, 2, dtype=torch.bfloat16))
    assert q.dtype == torch.float32
    assert torch.allclose(q, torch.full((3, 2), -LN2))


def test_rank_hand_worked():
    """β = 2, α = 2; q given directly (already log-softmaxed and pooled):
    q⁺_ref = (-1, -2), q⁻_ref = (-2, -1), q⁺_θ = (-0.5, -2), q⁻_θ = (-2, -1.5)
    Δ⁺ = (0.5, 0), Δ⁻ = (0, -0.5), r = Δ⁺ - Δ⁻ = (0.5, 0.5), βr = (1, 1)
    mean_d softplus(-βr) = 0.3132617;  α·mean_d Δ⁺² = 2·(0.25 + 0)/2 = 0.25
    L = 0.5632617.  Geometry in q-space: δ_ref = (1, -1), δ_θ = (1.5, -0.5),
    p = ⟨δ_θ, δ_ref⟩/‖δ_ref‖² = 2/2 = 1, o = ‖(0.5, 0.5)‖/√2 = 0.5, c = 2/(√2·√2.5) = 2/√5."""
    acts = PooledActs(T([[-0.5, -2.0]]), T([[-2.0, -1.5]]), T([[-1.0, -2.0]]), T([[-2.0, -1.0]]))
    loss, m = rank_loss([acts], beta=2.0, alpha=2.0)
    assert loss.tolist() == pytest.approx([0.5632617], abs=1e-6)
    assert float(m["repr/rank/rank"]) == pytest.approx(0.3132617, abs=1e-6)
    assert float(m["repr/rank/anchor"]) == pytest.approx(0.25)
    assert float(m["repr/rank/r"]) == pytest.approx(0.5)
    assert [float(m[k]) for k in ("repr/p", "repr/o", "repr/c")] == pytest.approx([1.0, 0.5, 2 / math.sqrt(5)])


def test_rank_is_ln2_at_init_and_raises_chosen():
    """r = 0: L = mean_d softplus(0) + 0 = ln 2.  dL/dq⁺_θ = -β σ(0)/d = -β/(2d) per dim."""
    acts, pc, _ = at_init(d=8)
    acts = PooledActs(*(rank_token_fn(t) for t in (acts.pi_chosen, acts.pi_rejected, acts.ref_chosen, acts.ref_rejected)))
    acts.pi_chosen.retain_grad()
    loss, _ = rank_loss([acts], beta=1.0, alpha=1.0)
    assert torch.allclose(loss, torch.full((4,), LN2))
    loss.sum().backward()
    assert torch.allclose(acts.pi_chosen.grad, torch.full((4, 8), -1.0 / 16))


# --- innerdpo -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "align, expected",
    [
        # β_h = 0.5, p = 2, o = 1
        ("proj", 0.4740770),  # g = p - 1 = 1: softplus(-0.5) = log(1 + e^-0.5)
        # g = (p - 1) - õ = 1 - 0.9990005 = 0.0009995: softplus(-0.5·0.0009995) = 0.6928973
        ("proj_orth", 0.6928973),
        ("log_proj", 0.5348000),  # g = log 2: softplus(-0.5 log 2) = log(1 + 2^-0.5) = log 1.7071068
    ],
)
def test_innerdpo_hand_worked(align, expected):
    loss, m = innerdpo_term([example()], beta_h=0.5, align=align, eps=1e-3)
    assert loss.tolist() == pytest.approx([expected], abs=1e-6)
    assert "repr/innerdpo/g" in m


def test_innerdpo_log_proj_below_eps():
    """h⁺_θ = (0, 0), h⁻_θ = (1, 0): δ_θ = (-1, 0), p = -1 ≤ ε = 0.5, so g = log 0.5.
    L = -log σ(2·log 0.5) = log(1 + 0.5^-2) = log 5 = 1.6094379, with no gradient (clamped)."""
    pc = T([[0.0, 0.0]]).requires_grad_()
    acts = PooledActs(pc, T([[1.0, 0.0]]), T([[1.0, 0.0]]), T([[0.0, 0.0]]))
    loss, _ = innerdpo_term([acts], beta_h=2.0, align="log_proj", eps=0.5)
    assert loss.tolist() == pytest.approx([math.log(5)])
    loss.sum().backward()
    assert torch.count_nonzero(pc.grad) == 0


@pytest.mark.parametrize("align", ["proj", "proj_orth", "log_proj"])
def test_innerdpo_is_ln2_at_init_and_pushes_p_up(align):
    """g = 0 at init for every align.  dL/dh⁺_θ · u = -β_h σ(0) dg/dp /‖δ_ref‖ = -β_h/(2‖δ_ref‖)
    (dg/dp = 1, also 1/p = 1 for log_proj; the o part of proj_orth is ⟂ u)."""
    acts, pc, _ = at_init()
    loss, _ = innerdpo_term([acts], beta_h=1.0, align=align, eps=1e-3)
    assert torch.allclose(loss, torch.full((4,), LN2), atol=1e-4)
    loss.sum().backward()
    delta_ref = acts.ref_chosen - acts.ref_rejected
    n = delta_ref.norm(dim=-1)
    assert torch.allclose((pc.grad * delta_ref / n[:, None]).sum(-1), -0.5 / n, rtol=1e-4)


def test_innerdpo_bad_align():
    with pytest.raises(ValueError, match="align"):
        innerdpo_term([example()], beta_h=1.0, align="projection", eps=1e-3)


# --- innerpo --------------------------------------------------------------------------------

def test_innerpo_hand_worked():
    """β_h = 2.  h⁺_ref = (1, 0), h⁺_θ = (1, 1): cos = 1/√2 = 0.7071068
                 h⁻_ref = (0, 1), h⁻_θ = (0, 2): cos = 1
    g = 0.7071068 - 1 = -0.2928932;  L = softplus(-2g) = log(1 + e^0.5857864) = 1.0283340"""
    acts = PooledActs(T([[1.0, 1.0]]), T([[0.0, 2.0]]), T([[1.0, 0.0]]), T([[0.0, 1.0]]))
    loss, m = innerpo_term([acts], beta_h=2.0)
    assert loss.tolist() == pytest.approx([1.0283340], abs=1e-6)
    assert float(m["repr/innerpo/cos_chosen"]) == pytest.approx(1 / math.sqrt(2))
    assert float(m["repr/innerpo/cos_rejected"]) == pytest.approx(1.0)


def test_innerpo_is_ln2_at_init_with_zero_gradient():
    """cos = 1 for both: L = -log σ(0) = ln 2. Each cosine is at its maximum, so dL/dh_θ = 0:
    the term does nothing until the DPO term has moved the activations."""
    acts, pc, pr = at_init()
    loss, _ = innerpo_term([acts], beta_h=1.0)
    assert torch.allclose(loss, torch.full((4,), LN2))
    loss.sum().backward()
    assert pc.grad.abs().max() < 1e-6 and pr.grad.abs().max() < 1e-6


# --- all losses -----------------------------------------------------------------------------

INIT_VALUE = {"mse": 1.0, "prefvec": LN2, "rank": LN2, "innerdpo": LN2, "innerpo": LN2}


def test_registry_names_and_fields():
    assert set(REPR_LOSSES) == set(INIT_VALUE)
    assert {n for n, s in REPR_LOSSES.items() if s.needs_token_fn} == {"rank"}
    assert {n for n, s in REPR_LOSSES.items() if s.dpo_weight > 0} == {"prefvec", "innerdpo", "innerpo"}
    assert {n for n, s in REPR_LOSSES.items() if s.dpo_required} == {"innerdpo", "innerpo"}
    with pytest.raises(TypeError):
        REPR_LOSSES["mse"].defaults["alpha"] = 2.0  # read-only


@pytest.mark.parametrize("name", sorted(REPR_LOSSES))
def test_registry_defaults_match_signature(name):
    spec = REPR_LOSSES[name]
    params = inspect.signature(spec.fn).parameters
    kw = {k for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    assert kw == set(spec.defaults), f"{name}: defaults {set(spec.defaults)} vs keyword args {kw}"
    assert spec.name == name


@pytest.mark.parametrize("name", sorted(REPR_LOSSES))
def test_registry_value_at_init(name):
    acts, _, _ = at_init()
    loss, _ = run_spec(REPR_LOSSES[name], [acts, at_init(seed=1)[0]])
    assert torch.allclose(loss, torch.full((4,), INIT_VALUE[name]), atol=1e-4)


@pytest.mark.parametrize("name", sorted(REPR_LOSSES))
def test_registry_finite_shapes_metrics_grads(name):
    """Two points, one example with δ_ref = 0; refs passed with requires_grad get no gradient."""
    spec = REPR_LOSSES[name]
    a0, pc0, pr0 = perturbed(degenerate_row=1)
    a1, pc1, pr1 = perturbed(seed=1)
    a1.ref_chosen.requires_grad_()
    loss, m = run_spec(spec, [a0, a1])
    assert loss.shape == (4,) and loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    for k in ("repr/p", "repr/o", "repr/c", "repr/loss", "repr/p/0", "repr/o/1", "repr/c/1", "repr/degenerate"):
        assert k in m, k
    for k, v in m.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k
    assert float(m["repr/degenerate"]) == pytest.approx(1 / 8)
    loss.mean().backward()
    for t in (pc0, pr0, pc1, pr1):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert a1.ref_chosen.grad is None


@pytest.mark.parametrize("name", sorted(REPR_LOSSES))
def test_registry_exactly_degenerate_at_init_has_finite_grads(name):
    acts, pc, pr = at_init()
    rr = acts.ref_rejected.clone()
    rr[0] = acts.ref_chosen[0]
    pr = rr.clone().requires_grad_()
    loss, _ = run_spec(REPR_LOSSES[name], [PooledActs(pc, pr, acts.ref_chosen, rr)])
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("name", ["mse", "prefvec", "innerdpo", "innerpo"])
def test_scale_free(name):
    """Multiplying every activation by 1000 changes nothing (rank is not: log_softmax is not
    scale-invariant)."""
    acts, _, _ = perturbed()
    big = PooledActs(*(1000 * t.detach() for t in (acts.pi_chosen, acts.pi_rejected, acts.ref_chosen, acts.ref_rejected)))
    spec = REPR_LOSSES[name]
    assert torch.allclose(spec.fn([acts], **spec.defaults)[0], spec.fn([big], **spec.defaults)[0], rtol=1e-4)


def test_bf16_inputs_compute_in_float32():
    acts, _, _ = perturbed()
    half = PooledActs(*(t.detach().bfloat16() for t in (acts.pi_chosen, acts.pi_rejected, acts.ref_chosen, acts.ref_rejected)))
    loss, _ = prefvec_loss([half], beta_p=1.0, lambda_o=1.0, lambda_c=0.0)
    assert loss.dtype == torch.float32


def test_empty_points_error():
    with pytest.raises(ValueError, match="no collection points"):
        mse_loss([], alpha=1.0)
