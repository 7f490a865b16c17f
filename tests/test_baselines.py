"""Output-level baselines of DESIGN §4: values at init and hand-worked examples."""

import math

import pytest
import torch

from reprpo.methods.losses import cdpo_loss, dpo_loss, hinge_loss, ipo_loss, simpo_loss

LN2 = math.log(2.0)


def _logps(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 30, torch.randn(n, generator=g) * 30


def test_ipo_hand_worked():
    """β = 0.25, so the target margin is 1/(2β) = 2.

    Pair 1: ℓ̄θ⁺=-1.0, ℓ̄θ⁻=-1.5, ℓ̄ref⁺=-1.25, ℓ̄ref⁻=-1.25
        ρ̄ = (-1 + 1.25) - (-1.5 + 1.25) = 0.25 + 0.25 = 0.5;  L = (0.5 - 2)² = 2.25
        rewards: chosen 0.25·0.25 = 0.0625, rejected 0.25·(-0.25) = -0.0625
    Pair 2: ℓ̄θ⁺=-1.0, ℓ̄θ⁻=-3.0, ℓ̄ref⁺=-1.0, ℓ̄ref⁻=-1.0
        ρ̄ = 0 - (-2) = 2 = target;  L = 0.   rewards: chosen 0, rejected -0.5
    Batch: margins 0.125 and 0.5 -> mean 0.3125, accuracy 1.
    """
    loss, m = ipo_loss(
        torch.tensor([-1.0, -1.0]), torch.tensor([-1.5, -3.0]),
        torch.tensor([-1.25, -1.0]), torch.tensor([-1.25, -1.0]), beta=0.25,
    )
    assert loss.tolist() == pytest.approx([2.25, 0.0], abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx((0.0625 + 0.0) / 2)
    assert float(m["rewards/rejected"]) == pytest.approx((-0.0625 - 0.5) / 2)
    assert float(m["rewards/margin"]) == pytest.approx(0.3125)
    assert float(m["rewards/accuracy"]) == 1.0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_is_quarter_beta_squared_at_init(beta):
    """ρ̄ = 0 at init: L = (0 - 1/(2β))² = 1/(4β²) (25 for β = 0.1)."""
    x, y = _logps()
    loss, _ = ipo_loss(x, y, x.clone(), y.clone(), beta=beta)
    assert torch.allclose(loss, torch.full((5,), 1 / (4 * beta**2)))


def test_ipo_gradient_pushes_margin_to_target():
    """dL/dℓ̄θ⁺ = 2(ρ̄ - 1/(2β)): -2/(2β) = -1/β at init (raise chosen), 0 at the target."""
    pc = torch.tensor([-2.0, 3.0], requires_grad=True)  # pair 2 sits at ρ̄ = 5 = 1/(2·0.1)
    loss, _ = ipo_loss(pc, torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.1)
    loss.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-10.0, 0.0])


def test_cdpo_hand_worked():
    """β = 0.5, ε = 0.1.

    Pair 1: ρ = 2 (ℓθ⁺=-10, ℓθ⁻=-12, ℓref⁺=ℓref⁻=-11), βρ = 1
        L = 0.9·softplus(-1) + 0.1·softplus(1)
          = 0.9·0.3132617 + 0.1·1.3132617 = 0.2819355 + 0.1313262 = 0.4132617
        (check: softplus(x) - softplus(-x) = x, so L = softplus(-1) + 0.1·1)
    Pair 2: ρ = -2 (swap θ⁺/θ⁻), βρ = -1
        L = 0.9·1.3132617 + 0.1·0.3132617 = 1.1819355 + 0.0313262 = 1.2132617
    """
    loss, m = cdpo_loss(
        torch.tensor([-10.0, -12.0]), torch.tensor([-12.0, -10.0]),
        torch.tensor([-11.0, -11.0]), torch.tensor([-11.0, -11.0]), beta=0.5, eps=0.1,
    )
    assert loss.tolist() == pytest.approx([0.4132617, 1.2132617], abs=1e-6)
    assert float(m["rewards/accuracy"]) == 0.5


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_cdpo_is_ln2_at_init(eps):
    """-(1-ε) log ½ - ε log ½ = ln 2 for every ε."""
    x, y = _logps()
    loss, m = cdpo_loss(x, y, x.clone(), y.clone(), beta=0.1, eps=eps)
    assert torch.allclose(loss, torch.full((5,), LN2))
    assert float(m["rewards/margin"]) == 0.0


def test_cdpo_with_eps_zero_is_dpo():
    x, y = _logps(seed=1)
    rx, ry = _logps(seed=2)
    assert torch.allclose(cdpo_loss(x, y, rx, ry, beta=0.1, eps=0.0)[0], dpo_loss(x, y, rx, ry, beta=0.1)[0])


def test_hinge_hand_worked():
    """β = 0.5, ℓref⁺ = ℓref⁻ = 0 so ρ = ℓθ⁺ - ℓθ⁻.

    ρ = 2  -> max(0, 1 - 1)   = 0
    ρ = 1  -> max(0, 1 - 0.5) = 0.5
    ρ = -1 -> max(0, 1 + 0.5) = 1.5
    Gradient dL/dℓθ⁺ = -β where 1 - βρ > 0, else 0: [0, -0.5, -0.5].
    """
    pc = torch.tensor([2.0, 1.0, -1.0], requires_grad=True)
    z = torch.zeros(3)
    loss, m = hinge_loss(pc, z, z, z, beta=0.5)
    assert loss.tolist() == pytest.approx([0.0, 0.5, 1.5])
    assert float(m["rewards/accuracy"]) == pytest.approx(2 / 3)
    loss.sum().backward()
    assert pc.grad.tolist() == pytest.approx([0.0, -0.5, -0.5])


def test_hinge_is_one_at_init():
    x, y = _logps()
    loss, _ = hinge_loss(x, y, x.clone(), y.clone(), beta=0.1)
    assert torch.allclose(loss, torch.ones(5))


def test_simpo_hand_worked():
    """β = 2, γ = 1, no reference.

    Pair 1: ℓ̄θ⁺=-1, ℓ̄θ⁻=-2:  β(ℓ̄⁺ - ℓ̄⁻) - γ = 2·1 - 1 = 1;  L = softplus(-1) = 0.3132617
    Pair 2: ℓ̄θ⁺=-2, ℓ̄θ⁻=-2:  0 - 1 = -1;  L = softplus(1) = 1.3132617
    Rewards β·ℓ̄: chosen (-2 - 4)/2 = -3, rejected (-4 - 4)/2 = -4, margins 2 and 0 (mean 1),
    accuracy 0.5 (a tie is not > 0).
    """
    loss, m = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=2.0, gamma=1.0)
    assert loss.tolist() == pytest.approx([0.3132617, 1.3132617], abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(-3.0)
    assert float(m["rewards/rejected"]) == pytest.approx(-4.0)
    assert float(m["rewards/margin"]) == pytest.approx(1.0)
    assert float(m["rewards/accuracy"]) == 0.5


def test_simpo_at_equal_scores_is_softplus_gamma():
    """ℓ̄⁺ = ℓ̄⁻: L = -log σ(-γ) = log(1 + e^γ); ln 2 only when γ = 0."""
    x = torch.randn(4)
    assert torch.allclose(simpo_loss(x, x.clone(), beta=2.0, gamma=1.0)[0], torch.full((4,), math.log(1 + math.e)))
    assert torch.allclose(simpo_loss(x, x.clone(), beta=2.0, gamma=0.0)[0], torch.full((4,), LN2))


def test_simpo_gradient_direction():
    """dL/dℓ̄⁺ = -β σ(-(β·0 - γ)) = -2 σ(1) = -1.4621172 < 0."""
    pc = torch.tensor([-1.0], requires_grad=True)
    loss, _ = simpo_loss(pc, torch.tensor([-1.0]), beta=2.0, gamma=1.0)
    loss.sum().backward()
    assert float(pc.grad) == pytest.approx(-2 * torch.sigmoid(torch.tensor(1.0)).item())
