"""Preference losses over plain tensors: each returns (per-example loss (b,), metrics).

Notation (DESIGN §3): ℓ = summed response-token log-prob; ρ = [ℓ_θ(y⁺) − ℓ_ref(y⁺)] −
[ℓ_θ(y⁻) − ℓ_ref(y⁻)], the implicit reward margin; ℓ̄ = ℓ/|y| (per-token mean), ρ̄ the same
margin built from ℓ̄. The output-level baselines of DESIGN §4 live here; the representation
losses of §5 live in `reprpo.methods.repr_losses`.
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


def ipo_loss(
    pi_chosen_mean: torch.Tensor,  # (b,) ℓ̄_θ(y⁺)
    pi_rejected_mean: torch.Tensor,  # (b,) ℓ̄_θ(y⁻)
    ref_chosen_mean: torch.Tensor,  # (b,) ℓ̄_ref(y⁺)
    ref_rejected_mean: torch.Tensor,  # (b,) ℓ̄_ref(y⁻)
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = (ρ̄ − 1/(2β))²
    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (IPO, sampled loss; their τ is our β).
    """
    # The paper writes the margin with summed log-probs; DESIGN §4 (like TRL's "ipo") uses
    # per-token means, so the 1/(2β) target does not depend on response length.
    chosen_ratio = pi_chosen_mean - ref_chosen_mean  # (b,)
    rejected_ratio = pi_rejected_mean - ref_rejected_mean  # (b,)
    rho_bar = chosen_ratio - rejected_ratio  # (b,)
    loss = (rho_bar - 1.0 / (2.0 * beta)) ** 2  # (b,); 1/(4β²) at init
    return loss, reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def cdpo_loss(
    pi_chosen: torch.Tensor,  # (b,) ℓ_θ(y⁺)
    pi_rejected: torch.Tensor,  # (b,) ℓ_θ(y⁻)
    ref_chosen: torch.Tensor,  # (b,) ℓ_ref(y⁺)
    ref_rejected: torch.Tensor,  # (b,) ℓ_ref(y⁻)
    *,
    beta: float,
    eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = −(1−ε) log σ(βρ) − ε log σ(−βρ)
    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (conservative
    DPO: DPO with the preference label flipped with probability ε, i.e. label smoothing).
    """
    # This is TRL's label_smoothing / "cDPO", not the unbiased rDPO of Chowdhury et al. 2024
    # (which subtracts the flipped term and divides by 1 − 2ε). ln 2 at init for every ε.
    chosen_ratio = pi_chosen - ref_chosen  # (b,)
    rejected_ratio = pi_rejected - ref_rejected  # (b,)
    logits = beta * (chosen_ratio - rejected_ratio)  # (b,) βρ
    loss = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)  # (b,)
    return loss, reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def hinge_loss(
    pi_chosen: torch.Tensor,  # (b,) ℓ_θ(y⁺)
    pi_rejected: torch.Tensor,  # (b,) ℓ_θ(y⁻)
    ref_chosen: torch.Tensor,  # (b,) ℓ_ref(y⁺)
    ref_rejected: torch.Tensor,  # (b,) ℓ_ref(y⁻)
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = max(0, 1 − βρ)
    Zhao et al. 2023, "SLiC-HF" (rank-calibration hinge), with the reference-normalised margin
    ρ as in TRL's loss_type="hinge".
    """
    # SLiC itself uses the policy log-prob difference with no reference; the margin is 1/β in
    # units of ρ. Loss 1 at init; zero gradient once βρ ≥ 1.
    chosen_ratio = pi_chosen - ref_chosen  # (b,)
    rejected_ratio = pi_rejected - ref_rejected  # (b,)
    loss = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))  # (b,)
    return loss, reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(
    pi_chosen_mean: torch.Tensor,  # (b,) ℓ̄_θ(y⁺)
    pi_rejected_mean: torch.Tensor,  # (b,) ℓ̄_θ(y⁻)
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = −log σ(β(ℓ̄_θ(y⁺) − ℓ̄_θ(y⁻)) − γ)
    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6. No reference model.
    """
    # γ is the margin itself, as in the paper (TRL instead takes γ/β as "simpo_gamma").
    # When ℓ̄⁺ = ℓ̄⁻ the loss is −log σ(−γ) = log(1 + e^γ), not ln 2.
    loss = -F.logsigmoid(beta * (pi_chosen_mean - pi_rejected_mean) - gamma)  # (b,)
    return loss, reward_metrics(beta * pi_chosen_mean.detach(), beta * pi_rejected_mean.detach())
