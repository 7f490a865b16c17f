"""SFT: supervised fine-tuning on the chosen responses; no reference, no rejected term.

GENIES's fine-tuning baseline and FPO's SFT row (DESIGN §5b).
"""

from __future__ import annotations

import torch

from reprpo.config import RunConfig
from reprpo.data.tokenize import PairBatch
from reprpo.methods.base import (
    KINDS,
    LR,
    NO_REFERENCE,
    MethodBase,
    MethodKind,
    logp_metrics,
    lp_kwargs,
    register_preset,
)
from reprpo.model.forward import sequence_logps
from reprpo.model.refcache import RefOut


def sft_loss(pi_chosen_mean: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = −ℓ̄_θ(y⁺), the per-token negative log-likelihood of the chosen response
    GENIES (Clymer et al. 2023) fine-tuning baseline; FPO (Yin et al. 2024) Table 2 "SFT"."""
    loss = -pi_chosen_mean  # (b,)
    return loss, {"sft/nll": loss.detach().mean(), "sft/ppl": torch.exp(loss.detach().mean())}


class SFTMethod(MethodBase):
    """Trains on y⁺ only; the rejected responses are still run, so the log columns match the other methods."""

    reference = NO_REFERENCE

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.lp_kw = lp_kwargs(cfg)

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        pol = sequence_logps(model, batch, **self.lp_kw)
        loss, m = sft_loss(pol.chosen_rejected(mean=True)[0])
        return loss, m | logp_metrics(pol)


KINDS.add("sft", MethodKind("sft", lambda cfg, model, preset: SFTMethod(cfg), search_space=lambda cfg: dict(LR),
                            init_loss=lambda cfg: None, help="negative log-likelihood of the chosen response"))
register_preset("sft", "sft", help="−ℓ̄_θ(y⁺): supervised fine-tuning on chosen (no reference)")
