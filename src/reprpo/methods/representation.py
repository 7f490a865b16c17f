"""Representation methods (DESIGN §5): {collection}-{transform}-{loss} over pooled activations.

Where to read comes from `COLLECTIONS` (model/capture.py), how to look from `TRANSFORMS`
(transforms.py, with capability flags), what to ask from `REPR_LOSSES` (repr_losses.py). The
presets are every combination the flags allow; a new transform or loss is picked up as presets,
CLI help and tune search space by its one registration line.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from reprpo.config import RunConfig
from reprpo.data.layout import PADDED, Layout
from reprpo.data.tokenize import PairBatch, TokenizedPair
from reprpo.errors import ConfigError
from reprpo.methods.base import (
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
from reprpo.methods.losses import dpo_loss
from reprpo.methods.repr_losses import REPR_LOSSES, PooledActs
from reprpo.methods.transforms import TRANSFORMS, build_transform
from reprpo.model.capture import (
    COLLECTIONS,
    CapturePoint,
    capture,
    capture_points,
    decoder_layers,
    parse_layers,
    pool,
    pool_weights,
)
from reprpo.model.forward import adapter_disabled, base_model, run_decoder, sequence_logps
from reprpo.model.refcache import RefCache, RefOut
from reprpo.model.sae import sae_capture
from reprpo.progress import bar


class ReprMethod(MethodBase):
    """Representation preference optimisation: L = w_dpo·DPO + w_repr·loss(T(acts)).
    DESIGN §5; collection × transform × loss, each from its registry."""

    def __init__(self, cfg: RunConfig, model):
        super().__init__()
        mc = self.mc = cfg.method
        self.beta = cfg.train.beta
        self.spec = REPR_LOSSES[REPR_LOSSES.check(mc.loss, where="method.loss")]
        tspec = TRANSFORMS[TRANSFORMS.check(mc.transform, where="method.transform")]
        COLLECTIONS.check(mc.collection, where="method.collection")
        self.prefix = mc.pooling != "all"  # `all` pools over the whole prompt, which a batch prefix takes out of the rows
        self.dpo_weight = self.spec.dpo_weight if mc.dpo_weight < 0 else mc.dpo_weight
        if self.spec.dpo_required and self.dpo_weight <= 0:
            raise ConfigError(f"method.loss {mc.loss} is defined with its DPO term: method.dpo_weight must be > 0.")
        self.seed = cfg.train.seed
        self.sae = None  # the SAE of the sae transform (held outside the module tree: frozen, not saved)
        if tspec.needs_sae:  # the SAE's own block, checked against the model
            point, sae = sae_capture(model, mc.sae, mc.layers)
            object.__setattr__(self, "sae", sae)
            self.layers = [point.layer_idx]
        elif mc.layers.strip() == "sae":
            raise ConfigError(f"method.layers sae means the block of method.sae, which only fpo and the sae transform read; "
                              f"method.transform is {mc.transform}: give blocks, e.g. --method.layers 0.5.")
        else:
            self.layers = parse_layers(mc.layers, len(decoder_layers(model)))
        self.points = capture_points(model, collection=mc.collection, layers=self.layers, modules=mc.modules)
        if tspec.residual_only and mc.collection != "hs":
            raise ConfigError(f"method.transform {mc.transform} is defined on the residual stream ({tspec.help}): use method.collection hs.")
        if tspec.needs_prev:  # H^{ℓ-1} is the input of block ℓ (the embeddings for block 0)
            blocks = decoder_layers(model)
            self.prev_points = [CapturePoint(f"prev.{i}", i, blocks[i], "input") for i in self.layers]
        else:
            self.prev_points = []
        field_of = {"beta": "rank_beta"}  # loss kwarg -> config field, where the names differ
        self.loss_kwargs = {}
        for arg, default in self.spec.defaults.items():  # config value where there is a field
            self.loss_kwargs[arg] = getattr(mc, field_of.get(arg, arg), default)
        self.transforms = nn.ModuleDict()  # point key (dots -> _) -> Transform; built in prepare()
        self.tspec = tspec
        self.linear = tspec.linear and self.spec.token_fn is None
        self.lp_kw = lp_kwargs(cfg)
        self.progress = cfg.train.progress  # bars over the reference passes of prepare()
        self.reference = RefNeeds(points=tuple(self.points) if self.linear else ())  # pooled reference activations to cache
        if self.sae is not None and self.spec.token_fn is None:  # pooled reference SAE features to cache
            self.reference = RefNeeds(features=(self.points[0], self.sae))
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
        w = pool_weights(h[batch.rows], response_mask=batch.response_mask, attention_mask=batch.pool_mask,
                         mode=self.mc.pooling, outlier_quantile=self.mc.outlier_quantile)  # (2b, t)
        if self.spec.token_fn is None and not getattr(t, "needs_prev", False):
            return t.pool(h[batch.rows], w)  # (a TopK SAE scatters its k values: no dense (2b, t, w))
        z = t(h, h_prev=store[f"prev.{key.split('.')[1]}"]) if getattr(t, "needs_prev", False) else t(h)
        if self.spec.token_fn is not None:
            z = self.spec.token_fn(z)
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
                layout: Layout = PADDED, batch_size: int = 8) -> None:
        """Build each point's transform (width read off the reference); fit pca on the reference
        preference directions δ_ref of up to `method.pca_pairs` training pairs (from the
        reference cache when there is one, else from reference passes)."""
        mc = self.mc
        fit = self.tspec.needs_fit
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
                                                 layout=PADDED, transformed=False).items():
                pooled[key].append(v.cpu())
        lm = base_model(model).get_output_embeddings().weight if mc.transform == "unembed_null" else None
        k = mc.k if self.tspec.takes_k else None
        device = next(model.parameters()).device
        for p in self.points:
            acts = torch.cat(pooled[p.key])  # (n, 2, d)
            t = build_transform(mc.transform, d=acts.shape[-1], k=k, lm_head_weight=lm, energy=mc.energy,
                                seed=self.seed, block_size=mc.ether_block, sae=self.sae)
            if fit:
                t.fit(acts[:, 0] - acts[:, 1])
            self.transforms[self._tkey(p.key)] = t.to(device)
        if self.sae is not None:
            self.sae.to(device)
        if cache is not None and cache.feats and self.reference.features is not None:
            pass  # sae: the pooled reference features are in the cache
        elif cache is not None and not self.linear and not any(q.requires_grad for q in self.transforms.parameters()):
            self._cache_fixed_reference(model, data, pad_id=pad_id, batch_size=batch_size, layout=layout)

    @torch.no_grad()
    def _cache_fixed_reference(self, model, data: list[TokenizedPair], *, pad_id: int, batch_size: int, layout: Layout) -> None:
        """A non-linear T (suppressed, or a loss's token function) that has nothing to learn
        gives every pair a constant pooled reference value: compute it once here, so training
        steps run no reference forward (kept in memory; the linear case uses the disk cache).
        `layout` is the training batches' collate layout, so at init the policy's pooled values
        equal these bit for bit, as they would with an online reference pass."""
        self._fixed_ref = self._reference_pooled(model, data, pad_id=pad_id, batch_size=batch_size, layout=layout, transformed=True)
        self._fixed_row = {p.index: i for i, p in enumerate(data)}

    @torch.no_grad()
    def _reference_pooled(self, model, data: list[TokenizedPair], *, pad_id: int, batch_size: int, layout: Layout,
                          transformed: bool) -> dict[str, torch.Tensor]:
        """Reference passes (adapter off) over `data`: per point, the pooled raw activations or,
        with `transformed`, the pooled T(activations) -> (n, 2, d or k), [chosen, rejected]."""
        device = next(model.parameters()).device
        chunks: dict[str, list[torch.Tensor]] = {p.key: [] for p in self.points}
        layout = layout.for_pairs(data)
        desc = "reference activations" + (" (transformed)" if transformed else " (pca fit)" if self.tspec.needs_fit else "")
        with bar(total=len(data), desc=desc, unit="pair", enabled=self.progress and len(data) > batch_size) as pbar:  # one batch: no bar
            for s in range(0, len(data), batch_size):
                batch = layout.collate(data[s : s + batch_size], pad_id=pad_id).to(device)
                with adapter_disabled(model):
                    store, _ = self._acts(model, batch, logps=False)
                for p in self.points:
                    v = self._pooled(p.key, store, batch) if transformed else self._pool_raw(store[p.key].float(), batch)  # (2b, ·)
                    b = v.shape[0] // 2
                    chunks[p.key].append(torch.stack([v[:b], v[b:]], 1))
                pbar.update(batch.n_pairs)
        return {k: torch.cat(v) for k, v in chunks.items()}

    # -- loss --------------------------------------------------------------------------------
    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        # log-probs ride along both passes (head at response tokens only): the DPO term needs
        # them, and every method logs the same implicit-reward columns
        pol_store, pol = self._acts(model, batch, logps=True)
        have_acts = ref is not None and self.linear and all(p.key in ref.acts for p in self.points)
        if have_acts:  # cached reference: no reference forward at all
            ref_lp = ref.logps
            ref_pooled = {p.key: self.transforms[self._tkey(p.key)](ref.acts[p.key]) for p in self.points}
        elif ref is not None and ref.feats is not None and self.reference.features is not None:  # sae: cached features
            ref_lp = ref.logps
            ref_pooled = {self.points[0].key: ref.feats}
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
        return total, metrics | logp_metrics(pol)  # (b,)


def repr_preset_names() -> list[str]:
    """Every {collection}-{transform}-{loss} the registries' flags allow, in registration order."""
    return [f"{c}-{t}-{lo}" for c, t, lo in itertools.product(COLLECTIONS, TRANSFORMS, REPR_LOSSES)
            if not (c != "hs" and TRANSFORMS[t].residual_only)]


def _build(cfg: RunConfig, model, preset: Preset) -> ReprMethod:
    return ReprMethod(cfg, model)


def _init_loss(cfg: RunConfig) -> float:
    """repr_weight · (the loss's value at init) + dpo_weight · ln 2."""
    spec = REPR_LOSSES[cfg.method.loss]
    w = spec.dpo_weight if cfg.method.dpo_weight < 0 else cfg.method.dpo_weight
    return cfg.method.repr_weight * spec.init + (w * LN2 if w > 0 else 0.0)


KINDS.add("repr", MethodKind("repr", _build, search_space=lambda cfg: LR | dict(REPR_LOSSES[cfg.method.loss].space),
                             init_loss=_init_loss, help="losses over captured, transformed, pooled activations (docs/methods.md)"))
for _name in repr_preset_names():
    _c, _t, _lo = _name.split("-")
    _values = {"method.collection": _c, "method.transform": _t, "method.loss": _lo}
    if TRANSFORMS[_t].needs_sae:
        _values["method.layers"] = "sae"
    register_preset(_name, "repr", _values, f"{_lo} on {_t}-transformed {_c} activations")
register_preset("loreft", "repr", {"method.collection": "hs", "method.transform": "none", "method.loss": "prefvec",
                                   "train.adapter": "loreft"},
                "hs-none-prefvec through a LoReFT adapter at method.layers (Wu et al. 2024) instead of LoRA")
