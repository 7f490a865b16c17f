"""FPO: DPO with a sparse-autoencoder feature constraint, reference side offline (DESIGN §5b).

The policy is kept near the reference on a few SAE features of one residual-stream block
rather than on every hidden dimension or every vocabulary token (TDPO). The reference's pooled
features come from the offline reference cache (model/refcache.py, keyed by the SAE's
fingerprint), so training runs no reference forward; with `speed.ref_cache false` they are
computed online, and the two are equal (tests/test_fpo.py).

Shapes: b pairs, r = 2b rows ([chosen; rejected]), w SAE width, K features in S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reprpo.config import RunConfig
from reprpo.data.layout import PADDED, Layout
from reprpo.data.tokenize import PairBatch, TokenizedPair
from reprpo.errors import ConfigError
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
    lp_kwargs,
    register_preset,
)
from reprpo.methods.losses import reward_metrics
from reprpo.model.capture import capture, pool_weights
from reprpo.model.forward import adapter_disabled, sequence_logps
from reprpo.model.refcache import RefCache, RefOut
from reprpo.model.sae import sae_capture
from reprpo.progress import bar

SELECT = ("reference", "policy", "global")


def select_features(f_pol: torch.Tensor, f_ref: torch.Tensor, *, k: int, select: str, global_idx: torch.Tensor | None = None) -> torch.Tensor:
    """S per row, (r, K) indices: the K largest of f̄_ref (`reference`), of f̄_θ (`policy`, no
    gradient; the authors' code), or one fixed set for every row (`global`)."""
    if select == "reference":
        return f_ref.topk(k, dim=-1).indices
    if select == "policy":
        return f_pol.detach().topk(k, dim=-1).indices
    if select == "global":
        return global_idx.to(f_pol.device)[None, :].expand(f_pol.shape[0], -1)
    raise ConfigError(f"method.sae_select {select!r}: choose one of {', '.join(SELECT)}.")


def feature_mse(f_pol: torch.Tensor, f_ref: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """MSE(y) = mean_{i∈S(y)} (f̄_θ(y)_i − f̄_ref(y)_i)²: (r, w), (r, w), (r, K) -> (r,)
    Yin et al. 2024 (FPO), eq. of the feature-level constraint; authors' code `fpo_get_batch_logps`."""
    return (f_pol.float().gather(1, idx) - f_ref.detach().float().gather(1, idx)).pow(2).mean(1)


def fpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             mse_chosen: torch.Tensor, mse_rejected: torch.Tensor, *, beta: float = 0.1, alpha: float = 0.5):
    """L = −log σ(β[(m⁺ − m⁻) − α(MSE⁻ − sg MSE⁺)]), m(y) = ℓ̄_θ(y) − ℓ̄_ref(y) (mean log-probs)
    Yin et al. 2024, "Direct Preference Optimization Using Sparse Feature-Level Constraints" (arXiv 2411.07618), authors' code FeatureAlignment `FPOModel.loss`.

    All inputs (b,); ℓ̄ are per-token means. ln 2 at init (m = 0, MSE = 0)."""
    m_c, m_r = pi_chosen - ref_chosen.detach(), pi_rejected - ref_rejected.detach()
    logits = (m_c - m_r) - alpha * (mse_rejected - mse_chosen.detach())
    loss = -F.logsigmoid(beta * logits)
    m = reward_metrics(beta * m_c.detach(), beta * m_r.detach())
    return loss, m | {"fpo/mse_chosen": mse_chosen.detach().mean(), "fpo/mse_rejected": mse_rejected.detach().mean()}


class FPOMethod(MethodBase):
    """fpo: policy pass with capture at the SAE's block; reference ℓ̄ and f̄ from the cache.

    The SAE is frozen and kept outside the module tree, so it is neither trained nor written
    into method_state.pt / checkpoints (`method.sae` names it; the cache key holds its fingerprint)."""

    def __init__(self, cfg: RunConfig, model):
        super().__init__()
        mc = cfg.method
        self.point, sae = sae_capture(model, mc.sae, mc.layers)
        object.__setattr__(self, "sae", sae)
        if mc.sae_select not in SELECT:
            raise ConfigError(f"method.sae_select {mc.sae_select!r}: choose one of {', '.join(SELECT)}.")
        if not 1 <= mc.sae_features <= sae.width:
            raise ConfigError(f"method.sae_features {mc.sae_features}: must be in [1, {sae.width}] (the SAE's width).")
        self.k, self.select, self.alpha, self.beta = mc.sae_features, mc.sae_select, mc.fpo_alpha, cfg.train.beta
        self.pooling, self.outlier_quantile = mc.pooling, mc.outlier_quantile
        self.prefix = mc.pooling != "all"  # `all` pools over the prompt, which a batch prefix takes out of the rows
        self.lp_kw = lp_kwargs(cfg)
        self.progress = cfg.train.progress
        self.reference = RefNeeds(logps=True, features=(self.point, sae))
        self.global_idx: torch.Tensor | None = None

    def _pooled(self, h: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """f̄ over the output rows' pooled tokens: (R, t, d) input rows -> (2b, w).

        Read at the SAE's own block output (the authors' code reads `hidden_states[-1]`, after
        the final norm, which is not what the SAEs it loads were trained on). (differs: their
        mean divides the masked sum by the padded length; ours is the response-token mean.)"""
        h = h[batch.rows]
        w = pool_weights(h, response_mask=batch.response_mask, attention_mask=batch.pool_mask, mode=self.pooling,
                         outlier_quantile=self.outlier_quantile)
        if self.sae.b_dec.device != h.device:
            self.sae.to(h.device)
        return self.sae.pool(h, w)

    @torch.no_grad()
    def prepare(self, model, data: list[TokenizedPair], *, pad_id: int, cache: RefCache | None = None,
                layout: Layout = PADDED, batch_size: int = 8) -> None:
        """`global`: S = the K features with the largest mean f̄_ref over the training pairs (chosen
        and rejected), from the cache when it holds them, else from reference passes."""
        self.sae.to(next(model.parameters()).device)
        if self.select != "global":
            return
        if cache is not None and cache.feats:
            mean = cache.features().mean((0, 1))
        else:
            total, n = None, 0
            layout = layout.for_pairs(data)
            device = next(model.parameters()).device
            with bar(total=len(data), desc="reference SAE features", unit="pair", enabled=self.progress and len(data) > batch_size) as pbar:
                for s in range(0, len(data), batch_size):
                    batch = layout.collate(data[s : s + batch_size], pad_id=pad_id).to(device)
                    with adapter_disabled(model), capture([self.point]) as store:
                        sequence_logps(model, batch, **self.lp_kw)
                    f = self._pooled(store[self.point.key], batch).sum(0).cpu()
                    total = f if total is None else total + f
                    n += 2 * batch.n_pairs
                    pbar.update(batch.n_pairs)
            mean = total / n
        self.global_idx = mean.topk(self.k).indices

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        with capture([self.point]) as store:
            pol = sequence_logps(model, batch, **self.lp_kw)
        f_pol = self._pooled(store[self.point.key], batch)
        if ref is not None and ref.feats is not None:  # offline: no reference forward
            ref_lp, f_ref = ref.logps, ref.feats
        else:
            with torch.no_grad(), adapter_disabled(model), capture([self.point]) as rstore:
                lp = sequence_logps(model, batch, **self.lp_kw)
            f_ref = self._pooled(rstore[self.point.key], batch)
            ref_lp = ref.logps if ref is not None else lp
        idx = select_features(f_pol, f_ref, k=self.k, select=self.select, global_idx=self.global_idx)
        mse_c, mse_r = feature_mse(f_pol, f_ref, idx).chunk(2)
        loss, m = fpo_loss(*pol.chosen_rejected(mean=True), *ref_lp.chosen_rejected(mean=True), mse_c, mse_r,
                           beta=self.beta, alpha=self.alpha)
        return loss, m | logp_metrics(pol)


def _build(cfg: RunConfig, model, preset: Preset) -> FPOMethod:
    return FPOMethod(cfg, model)


KINDS.add("fpo", MethodKind("fpo", _build, search_space=lambda cfg: LR | BETA | {"method.fpo_alpha": ("log", 0.05, 5.0)},
                            init_loss=lambda cfg: LN2,
                            help="DPO on mean log-probs with an SAE-feature constraint to the reference, reference features offline (docs/methods.md)"))
register_preset("fpo", "fpo", {"method.layers": "sae"}, help="SAE-feature-constrained preference optimisation (Yin et al. 2024), needs --method.sae")
