"""`reward`: a Bradley–Terry reward model on the preference pairs (the classical RLHF baseline).

LoRA on the model plus a scalar head r(x, y) = w·h + c on the final-normed hidden state of the
last response token (`method.reward_pool last`, as TRL's RewardTrainer reads it) or their mean
(`mean`). Trained with `bt_loss`; evaluation scores a pair by r(x, y⁺) − r(x, y⁻) (scorer
`reward`). The head is a parameter of the method, saved in method_state.pt beside the adapter and
loaded back for `reprpo eval`. Shapes: b pairs, R input rows, t tokens, d hidden size.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

from reprpo.config import RunConfig
from reprpo.data.tokenize import PairBatch
from reprpo.methods.base import (
    KINDS,
    LN2,
    LR,
    NO_REFERENCE,
    SCORERS,
    MethodBase,
    MethodKind,
    Scorer,
    register_preset,
)
from reprpo.methods.scorers import logp_columns
from reprpo.model.capture import pool
from reprpo.model.forward import decoder_and_head, run_decoder
from reprpo.model.refcache import RefOut


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, center: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = −log σ(r⁺ − r⁻) + η·(r⁺ + r⁻)², per pair (b,) (its batch mean is TRL's loss)
    Bradley & Terry (1952); Ouyang et al. (2022); TRL RewardTrainer (center_rewards_coefficient η)."""
    margin = r_chosen - r_rejected
    loss = -nn.functional.logsigmoid(margin)
    if center:
        loss = loss + center * (r_chosen + r_rejected) ** 2
    return loss, {"rewards/chosen": r_chosen.detach().mean(), "rewards/rejected": r_rejected.detach().mean(),
                  "rewards/margin": margin.detach().mean(), "rewards/accuracy": (margin.detach() > 0).float().mean()}


@contextmanager
def final_hidden(model):
    """Yields a dict whose "h" is the decoder's final-normed hidden states (R, t, d) of the last
    decoder call inside the block in this thread (with a batch prefix, the rows' call comes last;
    scoring workers share the model, so other threads' calls are not collected)."""
    decoder, _ = decoder_and_head(model)
    store: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(_m, _inp, out):
        if threading.get_ident() == owner:
            store["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = decoder.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class RewardMethod(MethodBase):
    """The Bradley–Terry reward model: the adapter's LoRA plus `head` (d -> 1, zero at init, so
    every reward is 0 and the loss ln 2 at step 1)."""

    reference = NO_REFERENCE

    def __init__(self, cfg: RunConfig, model):
        super().__init__()
        d = decoder_and_head(model)[0].config.hidden_size
        self.head = nn.Linear(d, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.pooling, self.center = cfg.method.reward_pool, cfg.method.center_rewards

    def rewards(self, hidden: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """(R, t, d) final hidden states -> r (2b,) [chosen; rejected]."""
        h = pool(hidden[batch.rows], response_mask=batch.response_mask, attention_mask=batch.pool_mask, mode=self.pooling)  # (2b, d)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1)

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        r = self.rewards(run_decoder(model, batch), batch)
        b = batch.n_pairs
        return bt_loss(r[:b], r[b:], center=self.center)


def reward_score(model, batch: PairBatch, *, chunk: int = 2048, prefix_store: dict | None = None, method: RewardMethod | None = None):
    """margin = r(x, y⁺) − r(x, y⁻) with the run's head; the log-prob columns from the same forward."""
    with final_hidden(model) as store:
        cols = logp_columns(model, batch, chunk=chunk, prefix_store=prefix_store)
    r = method.rewards(store["h"], batch).float()
    b = batch.n_pairs
    return cols | {"margin": r[:b] - r[b:], "reward_chosen": r[:b], "reward_rejected": r[b:]}


SCORERS.add("reward", Scorer("reward", reward_score, "r(x, y⁺) − r(x, y⁻) of the reward head (reward)", needs_method=True,
                             base="logp_mean", lm=False))
KINDS.add("reward", MethodKind(
    "reward", lambda cfg, model, preset: RewardMethod(cfg, model),
    search_space=lambda cfg: dict(LR) | {"method.center_rewards": ("cat", [0.0, 0.01])},
    init_loss=lambda cfg: LN2, help="Bradley–Terry reward model: LoRA + a scalar head, −log σ(r⁺ − r⁻)", scorer="reward"))
register_preset("reward", "reward", help="Bradley–Terry reward model (LoRA + scalar head on the last response token); scored by r⁺ − r⁻")
