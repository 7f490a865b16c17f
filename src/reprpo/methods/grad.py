"""Gradient methods (DESIGN §5): the DPO loss, with each pair's gradient projected on that
pair's own reference preference direction u_b (projgrad: LoRA-B weight gradients; projbp: the
output gradient of every adapted module). The hooks live in `gradproj.py`; this is the method.
"""

from __future__ import annotations

from contextlib import contextmanager

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
    lp_kwargs,
    register_preset,
)
from reprpo.methods import gradproj
from reprpo.methods.gradproj import projbp, projbp_needs_padded, projgrad
from reprpo.methods.losses import dpo_loss
from reprpo.model.forward import sequence_logps
from reprpo.model.refcache import RefOut


class GradMethod(MethodBase):
    """projgrad / projbp: DPO whose gradient is projected on the reference preference direction.

    With the reference cache, the directions u_b come from it with ℓ_ref (no reference forward
    in the loop); without it, `step` runs one reference pass that gives both and yields them."""

    reference = RefNeeds(directions=True)
    prefix = False  # a batch prefix's tokens belong to every pair; u_b is per pair

    def __init__(self, cfg: RunConfig, *, mode: str):
        super().__init__()
        self.mode, self.beta, self.mc = mode, cfg.train.beta, cfg.method
        self.lp_kw = lp_kwargs(cfg)
        # the shared-prompt layout gives the padded result when the projection is linear in g:
        # always for projgrad; for projbp unless leaky s or renorm
        self.packing = mode == "projgrad" or not projbp_needs_padded(self.mc.projbp_rectify, self.mc.projbp_renorm)

    @contextmanager
    def step(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        if ref is not None and ref.dirs:
            dirs = ref.dirs
        else:
            dirs, ref_lp = gradproj.reference_directions(model, batch)  # one reference pass: u_b and ℓ_ref
            ref = RefOut(ref_lp, dirs=dirs)
        mc, rows = self.mc, batch.row_pair
        ctx = (projgrad(model, dirs, beta=mc.proj_beta, rows=rows) if self.mode == "projgrad" else
               projbp(model, dirs, beta=mc.proj_beta, rectify=mc.projbp_rectify, leak=mc.projbp_leak,
                      renorm=mc.projbp_renorm, rows=rows))
        with ctx:
            yield ref

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
                             init_loss=lambda cfg: LN2, help="DPO with the gradient projected on each pair's reference direction (DESIGN §5)"))
register_preset("projgrad", "grad", help="DPO; each pair's LoRA-B gradient projected on its reference direction u_b")
register_preset("projbp", "grad", help="DPO; each adapted module's output gradient projected on u_b (changes every upstream gradient)")
