import math

import pytest
import torch

from reprpo.methods.losses import dpo_loss


def test_dpo_hand_worked():
    """Two pairs worked by hand.

    Pair 1: ℓθ⁺=-10, ℓθ⁻=-12, ℓref⁺=-11, ℓref⁻=-11, β=0.5
        ρ = (-10+11) - (-12+11) = 1 - (-1) = 2;  βρ = 1
        L = -log σ(1) = log(1 + e^-1) = 0.3132617
        rewards: chosen 0.5·1 = 0.5, rejected 0.5·(-1) = -0.5, margin 1.0
    Pair 2: ℓθ⁺=-5, ℓθ⁻=-4, ℓref⁺=-5, ℓref⁻=-5, β=0.5
        ρ = 0 - 1 = -1; βρ = -0.5;  L = log(1 + e^0.5) = 0.9740770
        rewards: chosen 0, rejected 0.5, margin -0.5
    Batch: accuracy 0.5, mean margin 0.25.
    """
    loss, m = dpo_loss(
        torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0]),
        torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0]), beta=0.5,
    )
    assert loss.tolist() == pytest.approx([0.3132617, 0.9740770], abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx((0.5 + 0.0) / 2)
    assert float(m["rewards/rejected"]) == pytest.approx((-0.5 + 0.5) / 2)
    assert float(m["rewards/margin"]) == pytest.approx(0.25)
    assert float(m["rewards/accuracy"]) == pytest.approx(0.5)


def test_dpo_is_ln2_when_policy_equals_reference():
    x = torch.randn(5) * 30
    y = torch.randn(5) * 30
    loss, m = dpo_loss(x, y, x.clone(), y.clone(), beta=0.1)
    assert torch.allclose(loss, torch.full((5,), math.log(2)))
    assert float(m["rewards/margin"]) == 0.0


def test_dpo_gradient_direction():
    """dL/dℓθ⁺ = -β σ(-βρ) < 0: raising the chosen log-prob lowers the loss."""
    pc = torch.tensor([-3.0], requires_grad=True)
    loss, _ = dpo_loss(pc, torch.tensor([-3.0]), torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.2)
    loss.sum().backward()
    assert float(pc.grad) == pytest.approx(-0.2 * 0.5)
