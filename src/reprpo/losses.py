"""Preference losses over plain tensors: each returns (per-example loss (b,), metrics).

Notation (DESIGN §3): ℓ = summed response-token log-prob; ρ = [ℓ_θ(y⁺) − ℓ_ref(y⁺)] −
[ℓ_θ(y⁻) − ℓ_ref(y⁻)], the implicit reward margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means of implicit rewards (β·log-ratio), their margin and accuracy (margin > 0)."""
    margin = chosen_reward - rejected_reward
    return {
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/margin": margin.mean(),
        "rewards/accuracy": (margin > 0).float().mean(),
    }


def dpo_loss(
    pi_chosen: torch.Tensor,  # (b,) ℓ_θ(y⁺)
    pi_rejected: torch.Tensor,  # (b,) ℓ_θ(y⁻)
    ref_chosen: torch.Tensor,  # (b,) ℓ_ref(y⁺)
    ref_rejected: torch.Tensor,  # (b,) ℓ_ref(y⁻)
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = −log σ(β ρ)
    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7.
    """
    chosen_reward = beta * (pi_chosen - ref_chosen).detach()
    rejected_reward = beta * (pi_rejected - ref_rejected).detach()
    rho = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(beta * rho)  # (b,)
    return loss, reward_metrics(chosen_reward, rejected_reward)
