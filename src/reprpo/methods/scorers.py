"""Evaluation scorers (DESIGN §6): how a pair is scored, registered beside the methods.

A scorer maps (model, batch) to per-pair columns with at least `margin` (b,): the pair is
correct iff margin > 0 (ties 0.5). A method names its scorer (`Method.scorer`); `eval.scorer`
overrides it. A new kind of method with its own score (a reward model, a probe) registers one
function here, and evaluate / compare / report score it on every split unchanged.
"""

from __future__ import annotations

import torch

from reprpo.data.tokenize import PairBatch
from reprpo.methods.base import SCORERS, Scorer
from reprpo.model.forward import sequence_logps


def logp_columns(model, batch: PairBatch, *, chunk: int = 2048, prefix_store: dict | None = None) -> dict[str, torch.Tensor]:
    """ℓ and token counts of chosen and rejected, (b,) each (the columns every log-prob scorer shares)."""
    lp = sequence_logps(model, batch, chunk=chunk, prefix_store=prefix_store)
    cs, rs = lp.chosen_rejected()
    b = batch.n_pairs
    return {"chosen_logp_sum": cs, "rejected_logp_sum": rs, "chosen_tokens": lp.n_tokens[:b], "rejected_tokens": lp.n_tokens[b:]}


def margin_from_logps(cols: dict[str, torch.Tensor], *, mean: bool) -> torch.Tensor:
    """ℓ̄⁺ − ℓ̄⁻ (mean) or ℓ⁺ − ℓ⁻ from `logp_columns`."""
    if not mean:
        return cols["chosen_logp_sum"] - cols["rejected_logp_sum"]
    return cols["chosen_logp_sum"] / cols["chosen_tokens"] - cols["rejected_logp_sum"] / cols["rejected_tokens"]


def logp_mean_score(model, batch: PairBatch, *, chunk: int = 2048, prefix_store: dict | None = None) -> dict[str, torch.Tensor]:
    """margin = ℓ̄(y⁺) − ℓ̄(y⁻), mean response-token log-prob (GENIES / open_pref_eval convention)."""
    cols = logp_columns(model, batch, chunk=chunk, prefix_store=prefix_store)
    return cols | {"margin": margin_from_logps(cols, mean=True)}


def logp_sum_score(model, batch: PairBatch, *, chunk: int = 2048, prefix_store: dict | None = None) -> dict[str, torch.Tensor]:
    """margin = ℓ(y⁺) − ℓ(y⁻), summed response log-prob (DESIGN §6: ℓ optional)."""
    cols = logp_columns(model, batch, chunk=chunk, prefix_store=prefix_store)
    return cols | {"margin": margin_from_logps(cols, mean=False)}


SCORERS.add("logp_mean", Scorer("logp_mean", logp_mean_score, "ℓ̄⁺ − ℓ̄⁻ (default)",
                                from_logps=lambda cols: margin_from_logps(cols, mean=True)))
SCORERS.add("logp_sum", Scorer("logp_sum", logp_sum_score, "ℓ⁺ − ℓ⁻", from_logps=lambda cols: margin_from_logps(cols, mean=False)))
