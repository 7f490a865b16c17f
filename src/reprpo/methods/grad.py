"""Gradient methods (DESIGN §5): the DPO loss, with each pair's gradient projected on that
pair's own reference preference direction u_b (projgrad: LoRA-B weight gradients, or with
`method.project update` the optimiser's LoRA-B update; projbp: the output gradient of every
adapted module). The hooks and projections live in `gradproj.py`; this is the method.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from reprpo.config import RunConfig
from reprpo.data.tokenize import PairBatch
from reprpo.errors import ConfigError
from reprpo.methods import gradproj
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
from reprpo.methods.gradproj import (
    lora_B_weights,
    projbp,
    projbp_needs_padded,
    project_updates,
    projgrad,
)
from reprpo.methods.losses import dpo_loss
from reprpo.model.forward import sequence_logps, through
from reprpo.model.refcache import RefOut


class GradMethod(MethodBase):
    """projgrad  G ← Σ_b [u_b u_bᵀ G_b + β(I − u_b u_bᵀ)G_b] on each LoRA-B gradient (per pair);
    ours (DESIGN §5). `method.project update`: ΔB ← PΔB + β(I − P)ΔB on each LoRA-B update of an
    optimiser step, P the orthogonal projector on span{u_b} of all that step's pairs, β = proj_beta.
    projbp  g ← s(⟨g,u_b⟩)u_b + β(g − ⟨g,u_b⟩u_b) on each adapted module's output gradient.

    With the reference cache, the directions u_b come from it with ℓ_ref (no reference forward
    in the loop); without it, `step` runs one reference pass that gives both and yields them.

    Which projgrad mode is the default: `grad`. It is the per-pair rule DESIGN §5 defines, and
    linear in each pair's G_b, so gradient accumulation, multi-process all-reduce and the
    shared-prompt layout all give the large-batch gradient exactly; W3 measured it at 1.12× DPO's
    step time. Its cost: AdamW then rescales each coordinate, so the applied update leaves
    span{u_b} (about 60% of the first update's norm lies outside on the tiny test model, 57%
    measured before; tests/test_project_update.py pins it), against the seed's intent that the weight
    change stay in the preference subspace.

    `update` gives that intent instead: the gradients stay DPO's (no gradient hooks); `step`
    snapshots every LoRA-B weight B₀ on the window's first micro-batch and records the window's
    directions; `after_step` (once per real optimiser step, after all micro-batches) sets
    B ← B₀ + PΔB + β(I − P)ΔB with ΔB = B − B₀, so with β = 0 the applied update lies in the span.
    ΔB includes AdamW's decoupled weight decay, projected with it. LoRA-A is left as AdamW moved
    it: its columns live in the module's input space, where u_b (an output-space direction)
    means nothing. AdamW's moment buffers keep the unprojected history: the moments are those of
    DPO's gradients, and only the step taken from them is projected. The span is that of the
    step's pairs (under multi-process training, every process's: the directions are gathered),
    not a per-pair rule, so it depends on the batch composition (n pairs span at most n axes)."""

    reference = RefNeeds(directions=True)
    prefix = False  # a batch prefix's tokens belong to every pair; u_b is per pair

    def __init__(self, cfg: RunConfig, *, mode: str):
        super().__init__()
        self.mode, self.beta, self.mc = mode, cfg.train.beta, cfg.method
        self.project = cfg.method.project
        if self.project == "update" and mode != "projgrad":
            raise ConfigError(f"method.project=update projects the optimiser's LoRA-B update and exists for projgrad only; "
                              f"{mode} rewrites output gradients: set method.project grad (or train.method projgrad).")
        self.lp_kw = lp_kwargs(cfg)
        # the shared-prompt layout gives the padded result when the projection is linear in g:
        # always for projgrad (update mode: the gradient is DPO's); for projbp unless leaky s or renorm
        self.packing = mode == "projgrad" or not projbp_needs_padded(self.mc.projbp_rectify, self.mc.projbp_renorm)
        # `update` mode only. The protocol keeps no state between `step` and `loss`; this is state
        # between `step` and `after_step` instead: the directions of the optimiser step's window
        # (all its micro-batches) and LoRA-B before the step, both cleared by after_step. Plain
        # attributes, not buffers: they are not part of state_dict.
        self._window_dirs: dict[str, list[Tensor]] = {}  # name -> [(b, o)] per micro-batch
        self._b_before: dict[str, Tensor] | None = None  # name -> B₀ (o, k) float32

    @contextmanager
    def step(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        if ref is not None and ref.dirs:
            dirs = ref.dirs
        else:
            dirs, ref_lp = through(model, gradproj.reference_directions, batch)  # one reference pass: u_b and ℓ_ref
            ref = RefOut(ref_lp, dirs=dirs)
        mc, rows = self.mc, batch.row_pair
        if self.project == "update":
            self._record(model, dirs)
            ctx = nullcontext()  # DPO's gradients; after_step projects the update
        elif self.mode == "projgrad":
            ctx = projgrad(model, dirs, beta=mc.proj_beta, rows=rows)
        else:
            ctx = projbp(model, dirs, beta=mc.proj_beta, rectify=mc.projbp_rectify, leak=mc.projbp_leak,
                         renorm=mc.projbp_renorm, rows=rows)
        with ctx:
            yield ref

    @torch.no_grad()
    def _record(self, model, dirs: dict[str, Tensor]) -> None:
        """Keep this micro-batch's directions; on the window's first, snapshot LoRA-B (it cannot
        change within a window: the optimiser steps once per window)."""
        weights = lora_B_weights(model, dirs)
        if self._b_before is None:
            self._b_before = {n: w.detach().float().clone() for n, w in weights.items()}
        for n in weights:
            self._window_dirs.setdefault(n, []).append(dirs[n].detach().float())

    def after_step(self, model, optimizer) -> None:
        """`update` mode: project this optimiser step's LoRA-B update on span{u_b} of its pairs."""
        if self.project != "update" or self._b_before is None:
            return
        before, window = self._b_before, self._window_dirs
        self._b_before, self._window_dirs = None, {}
        dirs = {n: torch.cat([d.to(before[n].device) for d in ds]) for n, ds in window.items()}  # (Σ b, o)
        project_updates(model, before, dirs, beta=self.mc.proj_beta)

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        if ref is None:
            raise ValueError(f"{self.mode}: loss() needs the reference that step() yields: "
                             "`with method.step(model, batch, ref=ref) as ref: method.loss(model, batch, ref=ref)`.")
        pol = sequence_logps(model, batch, **self.lp_kw)
        loss, m = dpo_loss(*pol.chosen_rejected(), *ref.logps.chosen_rejected(), beta=self.beta)
        return loss, m | logp_metrics(pol)


def _build(cfg: RunConfig, model, preset: Preset) -> GradMethod:
    return GradMethod(cfg, mode=preset.name)


KINDS.add("grad", MethodKind("grad", _build, search_space=lambda cfg: LR | BETA | {"method.proj_beta": ("float", 0.0, 0.5)},
                             init_loss=lambda cfg: LN2, help="DPO with the gradient projected on each pair's reference direction (docs/methods.md)"))
register_preset("projgrad", "grad", help="DPO; each pair's LoRA-B gradient projected on its reference direction u_b")
register_preset("projbp", "grad", help="DPO; each adapted module's output gradient projected on u_b (changes every upstream gradient)")
