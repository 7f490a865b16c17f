"""TDPO: token-level DPO, a sequential KL to the reference inside the DPO margin (DESIGN §5b).

Needs the reference's whole next-token distribution at every response position, which no
log-prob cache holds: the loss runs its own reference pass (adapter off) every step, so it
costs one more forward than cached DPO. Logits are formed `speed.logit_chunk` response tokens at
a time and each chunk is recomputed in the backward (checkpoint), so memory is bounded by
chunk × vocab, never tokens × vocab.

Shapes: b pairs, n response tokens of all 2b output rows, v vocab, d hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from reprpo.config import RunConfig
from reprpo.data.tokenize import PairBatch
from reprpo.methods.base import (
    BETA,
    KINDS,
    LN2,
    LR,
    MethodBase,
    MethodKind,
    Preset,
    RefNeeds,
    logp_metrics,
    register_preset,
)
from reprpo.methods.losses import reward_metrics
from reprpo.model.forward import (
    SeqLogps,
    adapter_disabled,
    decoder_and_head,
    response_states,
    row_sums,
    softcap_of,
)
from reprpo.model.refcache import RefOut


def token_kl(logits_ref: torch.Tensor, logits_pol: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) per position = Σ_v p_ref(v) (log p_ref(v) − log p_θ(v)); (n, v), (n, v) -> (n,)
    Zeng et al. 2024, eq. 4 (sequential KL, per position); float32."""
    lr = torch.log_softmax(logits_ref.float(), dim=-1)
    lp = torch.log_softmax(logits_pol.float(), dim=-1)
    return (lr.exp() * (lr - lp)).sum(-1)


def _chunk_terms(h_pol, h_ref, tgt, weight, softcap):
    """(log p_θ(y_t), log p_ref(y_t), KL_t) for one chunk of positions."""
    zp, zr = h_pol @ weight.T, h_ref @ weight.T  # (c, v)
    if softcap:
        zp, zr = torch.tanh(zp / softcap) * softcap, torch.tanh(zr / softcap) * softcap
    lp, lr = torch.log_softmax(zp.float(), -1), torch.log_softmax(zr.float(), -1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    return lp.gather(1, tgt[:, None]).squeeze(1), lr.gather(1, tgt[:, None]).squeeze(1), kl


def response_kl_logps(head, h_pol: torch.Tensor, h_ref: torch.Tensor, targets: torch.Tensor, *, chunk: int = 2048,
                      softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response token (n,): log π_θ(y_t), log π_ref(y_t), KL(π_ref ‖ π_θ)(·|x, y_<t).

    h_pol (n, d) with grad, h_ref (n, d) without; `chunk` positions at a time, recomputed in the
    backward, so at most chunk × v logits are alive."""
    if head.bias is not None:
        raise ValueError("tdpo: an output head with a bias is not supported")
    out = []
    for i in range(0, h_pol.shape[0], chunk):
        args = (h_pol[i : i + chunk], h_ref[i : i + chunk].detach(), targets[i : i + chunk], head.weight, softcap)
        out.append(checkpoint(_chunk_terms, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_terms(*args))
    if not out:
        z = h_pol.new_zeros(0, dtype=torch.float32)
        return z, z, z
    return tuple(torch.cat(x) for x in zip(*out))


def tdpo_loss(
    pi_chosen: torch.Tensor,  # (b,) ℓ_θ(y⁺)
    pi_rejected: torch.Tensor,  # (b,) ℓ_θ(y⁻)
    ref_chosen: torch.Tensor,  # (b,) ℓ_ref(y⁺)
    ref_rejected: torch.Tensor,  # (b,) ℓ_ref(y⁻)
    kl_chosen: torch.Tensor,  # (b,) D(y⁺) = Σ_t KL(π_ref ‖ π_θ)(·|x, y⁺_<t)
    kl_rejected: torch.Tensor,  # (b,) D(y⁻)
    *,
    beta: float,
    alpha: float,
    variant: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TDPO1: −log σ(u − β(D(y⁻) − D(y⁺))); TDPO2: −log σ(u − βα(D(y⁻) − sg D(y⁺))), u = βρ
    Zeng et al. 2024, "Token-level Direct Preference Optimization", eqs. 18 and 20; signs as the authors' `tdpo_loss`.
    """
    chosen_ratio, rejected_ratio = pi_chosen - ref_chosen, pi_rejected - ref_rejected  # (b,)
    u = beta * (chosen_ratio - rejected_ratio)
    if variant == 1:
        delta = beta * (kl_rejected - kl_chosen)
    elif variant == 2:
        delta = beta * alpha * (kl_rejected - kl_chosen.detach())
    else:
        raise ValueError(f"tdpo variant must be 1 or 2, got {variant}")
    loss = -F.logsigmoid(u - delta)  # (b,); ln 2 at init (ρ = 0, D = 0)
    m = reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    return loss, m | {"tdpo/kl_chosen": kl_chosen.detach().mean(), "tdpo/kl_rejected": kl_rejected.detach().mean()}


class TDPOMethod(MethodBase):
    """tdpo1 / tdpo2: one policy pass and one online reference pass (adapter off) per step."""

    reference = RefNeeds(logps=False, online=True)  # token distributions: computed in the loss, never cached

    def __init__(self, cfg: RunConfig, *, variant: int):
        super().__init__()
        self.variant, self.beta, self.alpha, self.chunk = variant, cfg.train.beta, cfg.method.tdpo_alpha, cfg.speed.logit_chunk

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        _, head = decoder_and_head(model)
        h_pol, out_row, tgt = response_states(model, batch)  # (n, d)
        with torch.no_grad(), adapter_disabled(model):
            h_ref, _, _ = response_states(model, batch)
        lp, lr, kl = response_kl_logps(head, h_pol, h_ref, tgt, chunk=self.chunk, softcap=softcap_of(model))
        r = batch.response_mask.shape[0]
        n_tok = batch.response_mask.sum(1)
        pol, refl = SeqLogps(row_sums(lp, out_row, r), n_tok), SeqLogps(row_sums(lr, out_row, r), n_tok)
        d_c, d_r = row_sums(kl, out_row, r).chunk(2)
        loss, m = tdpo_loss(*pol.chosen_rejected(), *refl.chosen_rejected(), d_c, d_r, beta=self.beta, alpha=self.alpha,
                            variant=self.variant)
        return loss, m | logp_metrics(pol)


def _build(cfg: RunConfig, model, preset: Preset) -> TDPOMethod:
    return TDPOMethod(cfg, variant=int(preset.name[-1]))


KINDS.add("tdpo", MethodKind("tdpo", _build, search_space=lambda cfg: LR | BETA | {"method.tdpo_alpha": ("float", 0.1, 1.0)},
                             init_loss=lambda cfg: LN2, help="token-level DPO with a sequential KL to the reference (online reference pass)"))
register_preset("tdpo1", "tdpo", help="token-level DPO, KL term with gradient on both responses (online reference pass)")
register_preset("tdpo2", "tdpo", help="token-level DPO, α-weighted KL, stop-gradient on the chosen KL (online reference pass)")
