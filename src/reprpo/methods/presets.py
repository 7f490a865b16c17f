"""Training methods: presets -> an object that computes the loss of one batch.

Three kinds, one small class each (the loop treats them alike):
- `OutputMethod`: dpo, ipo, cdpo, hinge, simpo — losses over response log-probs (DESIGN §4).
- `ReprMethod`: {hs|side}-{transform}-{loss} — losses over captured, transformed, pooled
  activations of policy vs reference, plus an optional DPO term (DESIGN §5).
- `GradMethod`: projgrad, projbp — the DPO loss with the gradient rewritten (DESIGN §5).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from reprpo.model.capture import (
    CapturePoint,
    capture,
    capture_points,
    decoder_layers,
    parse_layers,
    pool,
    pool_weights,
)
from reprpo.config import RunConfig
from reprpo.data.tokenize import PairBatch, TokenizedPair, collate
from reprpo.errors import ConfigError
from reprpo.model.forward import adapter_disabled, base_model, run_decoder, sequence_logps
from reprpo.methods.losses import cdpo_loss, dpo_loss, hinge_loss, ipo_loss, simpo_loss
from reprpo.model.refcache import RefCache, RefOut

OUTPUT_METHODS = ("dpo", "ipo", "cdpo", "hinge", "simpo")
GRAD_METHODS = ("projgrad", "projbp")
COLLECTIONS = ("hs", "side")
TRANSFORM_NAMES = ("none", "pca", "hra", "ether", "ortho", "unembed_null", "suppressed")
LINEAR_TRANSFORMS = ("none", "pca", "hra", "ether", "ortho", "unembed_null")  # T(Σ w h) = Σ w T(h)
HS_ONLY_TRANSFORMS = ("unembed_null", "suppressed")  # defined on the residual stream only
LOSS_NAMES = ("mse", "prefvec", "rank", "innerdpo", "innerpo")
# defaults a preset brings (applied before YAML and CLI, so both can override them)
PRESET_DEFAULTS: dict[str, dict[str, object]] = {"simpo": {"train.beta": 2.0}}


def preset_names() -> list[str]:
    repr_names = [f"{c}-{t}-{lo}" for c, t, lo in itertools.product(COLLECTIONS, TRANSFORM_NAMES, LOSS_NAMES)
                  if not (c == "side" and t in HS_ONLY_TRANSFORMS)]
    return [*OUTPUT_METHODS, *GRAD_METHODS, *repr_names]


def preset_overrides(name: str) -> dict[str, object]:
    """Config values a preset name implies (e.g. hs-pca-prefvec -> collection/transform/loss)."""
    if name in OUTPUT_METHODS or name in GRAD_METHODS:
        return dict(PRESET_DEFAULTS.get(name, {}))
    parts = name.split("-")
    if name in preset_names():
        return {"method.collection": parts[0], "method.transform": parts[1], "method.loss": parts[2]}
    raise ConfigError(
        f"unknown method {name!r}. Presets: {', '.join([*OUTPUT_METHODS, *GRAD_METHODS])}, and "
        f"{{{'|'.join(COLLECTIONS)}}}-{{{'|'.join(TRANSFORM_NAMES)}}}-{{{'|'.join(LOSS_NAMES)}}}."
    )


def _logp_metrics(pol) -> dict[str, torch.Tensor]:
    pc, pr = pol.chosen_rejected()
    pcm, prm = pol.chosen_rejected(mean=True)
    return {"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean(),
            "logps/chosen_mean": pcm.detach().mean(), "logps/rejected_mean": prm.detach().mean()}


class OutputMethod(nn.Module):
    """dpo / ipo / cdpo / hinge / simpo over response log-probs."""

    supports_packing = True  # works on the shared-prompt layout
    supports_prefix = True  # and with a batch prefix taken out of the rows
    cache_dirs = False  # gradient methods: the reference cache also stores per-pair directions

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.name, self.beta, self.mc = cfg.train.method, cfg.train.beta, cfg.method
        self.lp_kw = {"chunk": cfg.speed.logit_chunk, "full_logits": not cfg.speed.response_logits}
        self.uses_reference = self.name != "simpo"  # so a reference cache helps
        self.cache_points: list[CapturePoint] = []

    def prepare(self, model, data: list[TokenizedPair], *, pad_id: int, cache=None, layout: dict | None = None) -> None:
        pass

    def step(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        return nullcontext()

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        pol = sequence_logps(model, batch, **self.lp_kw)
        if self.name == "simpo":  # reference-free
            pcm, prm = pol.chosen_rejected(mean=True)
            loss, m = simpo_loss(pcm, prm, beta=self.beta, gamma=self.mc.simpo_gamma)
            return loss.mean(), m | _logp_metrics(pol)
        if ref is not None:
            ref = ref.logps
        else:
            with torch.no_grad(), adapter_disabled(model):
                ref = sequence_logps(model, batch, **self.lp_kw)
        if self.name == "ipo":
            loss, m = ipo_loss(*pol.chosen_rejected(mean=True), *ref.chosen_rejected(mean=True), beta=self.beta)
        elif self.name == "cdpo":
            loss, m = cdpo_loss(*pol.chosen_rejected(), *ref.chosen_rejected(), beta=self.beta, eps=self.mc.cdpo_eps)
        elif self.name == "hinge":
            loss, m = hinge_loss(*pol.chosen_rejected(), *ref.chosen_rejected(), beta=self.beta)
        else:
            loss, m = dpo_loss(*pol.chosen_rejected(), *ref.chosen_rejected(), beta=self.beta)
        return loss.mean(), m | _logp_metrics(pol)


class GradMethod(OutputMethod):
    """projgrad / projbp: DPO whose gradient is projected on the reference preference direction.

    With the reference cache, the directions u_b come from it with ℓ_ref (no reference forward
    in the loop); without it, one reference pass per step gives both."""

    supports_prefix = False  # a batch prefix's tokens belong to every pair; u_b is per pair
    cache_dirs = True  # build_ref_cache stores u_b at every LoRA module

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self._ref = None
        self.uses_reference = True

    @property
    def supports_packing(self) -> bool:
        """The shared-prompt layout gives the padded result when the projection is linear in g:
        always for projgrad; for projbp unless leaky s or renorm (gradproj.projbp_needs_padded)."""
        from reprpo.methods.gradproj import projbp_needs_padded

        return self.name == "projgrad" or not projbp_needs_padded(self.mc.projbp_rectify, self.mc.projbp_renorm)

    @contextmanager
    def step(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        from reprpo.methods.gradproj import projbp, projgrad, reference_directions

        if ref is not None and ref.dirs:
            dirs, self._ref = ref.dirs, ref.logps
        else:
            dirs, self._ref = reference_directions(model, batch)  # one reference pass: u_b and ℓ_ref
        mc, rows = self.mc, batch.row_pair
        ctx = (projgrad(model, dirs, beta=mc.proj_beta, rows=rows) if self.name == "projgrad" else
               projbp(model, dirs, beta=mc.proj_beta, rectify=mc.projbp_rectify, leak=mc.projbp_leak,
                      renorm=mc.projbp_renorm, rows=rows))
        try:
            with ctx:
                yield
        finally:
            self._ref = None

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        pol = sequence_logps(model, batch, **self.lp_kw)
        loss, m = dpo_loss(*pol.chosen_rejected(), *self._ref.chosen_rejected(), beta=self.beta)
        return loss.mean(), m | _logp_metrics(pol)


class ReprMethod(nn.Module):
    """Representation preference optimisation: L = w_dpo·DPO + w_repr·loss(T(acts))."""

    supports_packing = True
    cache_dirs = False

    @property
    def supports_prefix(self) -> bool:
        return self.mc.pooling != "all"  # `all` pools over the whole prompt, which a batch prefix takes out of the rows

    def __init__(self, cfg: RunConfig, model):
        super().__init__()
        from reprpo.methods.repr_losses import REPR_LOSSES

        mc = self.mc = cfg.method
        self.beta = cfg.train.beta
        if mc.loss not in REPR_LOSSES:
            raise ConfigError(f"method.loss must be one of {', '.join(REPR_LOSSES)}, got {mc.loss!r}.")
        if mc.transform not in TRANSFORM_NAMES:
            raise ConfigError(f"method.transform must be one of {', '.join(TRANSFORM_NAMES)}, got {mc.transform!r}.")
        self.spec = REPR_LOSSES[mc.loss]
        self.dpo_weight = self.spec.dpo_weight if mc.dpo_weight < 0 else mc.dpo_weight
        if self.spec.dpo_required and self.dpo_weight <= 0:
            raise ConfigError(f"method.loss {mc.loss} is defined with its DPO term: method.dpo_weight must be > 0.")
        self.seed = cfg.train.seed
        self.layers = parse_layers(mc.layers, len(decoder_layers(model)))
        self.points = capture_points(model, collection=mc.collection, layers=self.layers, modules=mc.modules)
        if mc.transform == "suppressed":
            if mc.collection != "hs":
                raise ConfigError("method.transform suppressed reads what a block removed from the residual stream: use collection hs.")
            # H^{ℓ-1} is the input of block ℓ (the embeddings for block 0)
            blocks = decoder_layers(model)
            self.prev_points = [CapturePoint(f"prev.{i}", i, blocks[i], "input") for i in self.layers]
        else:
            self.prev_points = []
        if mc.transform == "unembed_null" and mc.collection != "hs":
            raise ConfigError("method.transform unembed_null lives in the residual stream (lm_head's input space): use collection hs.")
        field_of = {"beta": "rank_beta"}  # loss kwarg -> config field, where the names differ
        self.loss_kwargs = {}
        for arg, default in self.spec.defaults.items():  # config value where there is a field
            self.loss_kwargs[arg] = getattr(mc, field_of.get(arg, arg), default)
        self.transforms = nn.ModuleDict()  # point key (dots -> _) -> Transform; built in prepare()
        self.linear = mc.transform in LINEAR_TRANSFORMS and self.spec.token_fn is None
        self.lp_kw = {"chunk": cfg.speed.logit_chunk, "full_logits": not cfg.speed.response_logits}
        self.uses_reference = True
        self.cache_points = self.points if self.linear else []  # pooled reference activations to cache
        self._fixed_ref: dict[str, torch.Tensor] = {}  # non-linear but fixed T: pooled T(reference), (n, 2, k)
        self._fixed_row: dict[int, int] = {}  # pair index -> row of _fixed_ref

    # -- pooling ------------------------------------------------------------------------------
    def _tkey(self, key: str) -> str:
        return key.replace(".", "_")

    def _pool_raw(self, h: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """Raw activations of the input rows (R, t, d) -> pooled per output row (2b, d)."""
        return pool(h[batch.rows], response_mask=batch.response_mask, attention_mask=batch.pool_mask,
                    mode=self.mc.pooling, outlier_quantile=self.mc.outlier_quantile)

    def _pooled(self, key: str, store: dict[str, torch.Tensor], batch: PairBatch) -> torch.Tensor:
        """T per token (+ the loss's token function), pooled: -> (2b, k).

        A linear T commutes with pooling, so it is applied to the pooled vector (cheaper, and
        what makes cached reference activations usable). Token weights always come from the
        raw activations, so both routes pool the same tokens."""
        t = self.transforms[self._tkey(key)]
        h = store[key]
        if self.linear:
            return t(self._pool_raw(h, batch))
        z = t(h, h_prev=store[f"prev.{key.split('.')[1]}"]) if getattr(t, "needs_prev", False) else t(h)
        if self.spec.token_fn is not None:
            z = self.spec.token_fn(z)
        w = pool_weights(h[batch.rows], response_mask=batch.response_mask, attention_mask=batch.pool_mask,
                         mode=self.mc.pooling, outlier_quantile=self.mc.outlier_quantile)  # (2b, t)
        return torch.einsum("rt,rtk->rk", w, z[batch.rows].float())

    def _acts(self, model, batch: PairBatch, *, logps: bool):
        """One forward with capture; returns ({key: (R, t, d)}, SeqLogps | None)."""
        with capture(self.points + self.prev_points) as store:
            if logps:
                lp = sequence_logps(model, batch, **self.lp_kw)
            else:
                run_decoder(model, batch)
                lp = None
        return dict(store), lp

    # -- setup -------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model, data: list[TokenizedPair], *, pad_id: int, cache: RefCache | None = None,
                batch_size: int = 8, layout: dict | None = None) -> None:
        """Build each point's transform (width read off the reference); fit pca on the reference
        preference directions δ_ref of up to `method.pca_pairs` training pairs (from the
        reference cache when there is one, else from reference passes)."""
        from reprpo.methods.transforms import build_transform

        mc = self.mc
        fit = mc.transform == "pca"
        n = min(len(data), mc.pca_pairs) if fit else min(len(data), 1)
        if fit and n < mc.k:
            raise ConfigError(f"method.transform pca fits a rank-{mc.k} frame (method.k) on {n} training pairs: "
                              f"lower method.k or use more pairs (data.n_train, method.pca_pairs).")
        pooled: dict[str, list[torch.Tensor]] = {p.key: [] for p in self.points}  # (b, 2, d) chunks
        if cache is not None and all(p.key in cache.acts for p in self.points):
            for p in self.points:
                pooled[p.key].append(cache.acts[p.key][:n])
        else:
            for key, v in self._reference_pooled(model, data[:n], pad_id=pad_id, batch_size=batch_size,
                                                 layout={"packed": False}, transformed=False).items():
                pooled[key].append(v.cpu())
        lm = base_model(model).get_output_embeddings().weight if mc.transform == "unembed_null" else None
        k = mc.k if mc.transform in ("pca", "hra", "ether", "ortho") else None
        device = next(model.parameters()).device
        for p in self.points:
            acts = torch.cat(pooled[p.key])  # (n, 2, d)
            t = build_transform(mc.transform, d=acts.shape[-1], k=k, lm_head_weight=lm, energy=mc.energy,
                                seed=self.seed, block_size=mc.ether_block)
            if fit:
                t.fit(acts[:, 0] - acts[:, 1])
            self.transforms[self._tkey(p.key)] = t.to(device)
        if cache is not None and not self.linear and not any(q.requires_grad for q in self.transforms.parameters()):
            self._cache_fixed_reference(model, data, pad_id=pad_id, batch_size=batch_size, layout=layout or {"packed": False})

    @torch.no_grad()
    def _cache_fixed_reference(self, model, data: list[TokenizedPair], *, pad_id: int, batch_size: int, layout: dict) -> None:
        """A non-linear T (suppressed, or a loss's token function) that has nothing to learn
        gives every pair a constant pooled reference value: compute it once here, so training
        steps run no reference forward (kept in memory; the linear case uses the disk cache).
        `layout` is the training batches' collate layout, so at init the policy's pooled values
        equal these bit for bit, as they would with an online reference pass."""
        self._fixed_ref = self._reference_pooled(model, data, pad_id=pad_id, batch_size=batch_size, layout=layout, transformed=True)
        self._fixed_row = {p.index: i for i, p in enumerate(data)}

    @torch.no_grad()
    def _reference_pooled(self, model, data: list[TokenizedPair], *, pad_id: int, batch_size: int, layout: dict,
                          transformed: bool) -> dict[str, torch.Tensor]:
        """Reference passes (adapter off) over `data`: per point, the pooled raw activations or,
        with `transformed`, the pooled T(activations) -> (n, 2, d or k), [chosen, rejected]."""
        device = next(model.parameters()).device
        chunks: dict[str, list[torch.Tensor]] = {p.key: [] for p in self.points}
        for s in range(0, len(data), batch_size):
            batch = collate(data[s : s + batch_size], pad_id=pad_id, **layout).to(device)
            with adapter_disabled(model):
                store, _ = self._acts(model, batch, logps=False)
            for p in self.points:
                v = self._pooled(p.key, store, batch) if transformed else self._pool_raw(store[p.key].float(), batch)  # (2b, ·)
                b = v.shape[0] // 2
                chunks[p.key].append(torch.stack([v[:b], v[b:]], 1))
        return {k: torch.cat(v) for k, v in chunks.items()}

    def step(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        return nullcontext()

    # -- loss --------------------------------------------------------------------------------
    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        from reprpo.methods.repr_losses import PooledActs

        # log-probs ride along both passes (head at response tokens only): the DPO term needs
        # them, and every method logs the same implicit-reward columns
        pol_store, pol = self._acts(model, batch, logps=True)
        have_acts = ref is not None and self.linear and all(p.key in ref.acts for p in self.points)
        if have_acts:  # cached reference: no reference forward at all
            ref_lp = ref.logps
            ref_pooled = {p.key: self.transforms[self._tkey(p.key)](ref.acts[p.key]) for p in self.points}
        elif ref is not None and self._fixed_ref:  # fixed non-linear T, computed in prepare()
            ref_lp = ref.logps
            rows = torch.tensor([self._fixed_row[int(i)] for i in batch.index])
            ref_pooled = {k: torch.cat([v[rows, 0], v[rows, 1]]) for k, v in self._fixed_ref.items()}
        else:
            with torch.no_grad(), adapter_disabled(model):
                ref_store, ref_lp = self._acts(model, batch, logps=ref is None)
                ref_pooled = {p.key: self._pooled(p.key, ref_store, batch) for p in self.points}
            ref_lp = ref.logps if ref is not None else ref_lp
        acts = []
        for p in self.points:
            hp = self._pooled(p.key, pol_store, batch)  # (2b, k)
            hr = ref_pooled[p.key].detach()
            b = hp.shape[0] // 2
            acts.append(PooledActs(hp[:b], hp[b:], hr[:b], hr[b:]))
        term, metrics = self.spec.fn(acts, **self.loss_kwargs)  # (b,)
        total = self.mc.repr_weight * term
        metrics = dict(metrics) | {"loss/repr": term.detach().mean()}
        d, dm = dpo_loss(*pol.chosen_rejected(), *ref_lp.chosen_rejected(), beta=self.beta)
        metrics |= dm | {"loss/dpo": d.detach().mean()}
        if self.dpo_weight > 0:
            total = total + self.dpo_weight * d
        return total.mean(), metrics | _logp_metrics(pol)


def build_method(cfg: RunConfig, model) -> nn.Module:
    """The method object for `cfg.train.method`; a representation preset's name fixes its
    collection / transform / loss fields (written back, so the saved config says them)."""
    name = cfg.train.method
    for key, value in preset_overrides(name).items():
        if key.startswith("method."):
            setattr(cfg.method, key.split(".", 1)[1], value)
    if name in GRAD_METHODS:
        return GradMethod(cfg)
    if name in OUTPUT_METHODS:
        return OutputMethod(cfg)
    return ReprMethod(cfg, model)
