"""Output-level methods (DESIGN §4): a loss over response log-probs of policy and reference.

One kind, `output`; one preset per entry of `OUTPUT_LOSSES`. A new output loss is a function
in `losses.py` and one `OUTPUT_LOSSES.add` line here (its call, init value, search space).
Presets over a representation adapter (`ADAPTER_PRESETS`: bipo, loreft-dpo) name their loss.

BiPO (Cao et al. 2024, eq. 5): with `method.bipo_flip` each step draws d ∈ {−1, +1} and trains
L = −log σ(d·β·ρ) with the policy's vector d·v: for d = −1 that is the DPO loss of the swapped
pair (chosen ↔ rejected) under −v, which is how it is computed here (any output loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from reprpo.config import RunConfig
from reprpo.data.tokenize import PairBatch
from reprpo.methods.base import (
    BETA,
    KINDS,
    LN2,
    LR,
    NO_REFERENCE,
    MethodBase,
    MethodKind,
    Preset,
    RefNeeds,
    SearchSpace,
    logp_metrics,
    lp_kwargs,
    register_preset,
)
from reprpo.methods.losses import cdpo_loss, dpo_loss, hinge_loss, ipo_loss, simpo_loss
from reprpo.model import interventions
from reprpo.model.forward import SeqLogps, adapter_disabled, sequence_logps
from reprpo.model.refcache import RefOut
from reprpo.registry import Registry


@dataclass(frozen=True)
class OutputLoss:
    """call(pol, ref, cfg) -> (loss (b,), metrics) with pol/ref `SeqLogps` (ref None when
    `reference` is False); init(cfg): the loss when policy = reference."""

    call: Callable[[SeqLogps, SeqLogps | None, RunConfig], tuple[torch.Tensor, dict]]
    init: Callable[[RunConfig], float | None]
    space: SearchSpace
    help: str
    reference: bool = True


OUTPUT_LOSSES: Registry[OutputLoss] = Registry("output loss", field="train.method")
OUTPUT_LOSSES.add("dpo", OutputLoss(
    lambda p, r, c: dpo_loss(*p.chosen_rejected(), *r.chosen_rejected(), beta=c.train.beta),
    lambda c: LN2, LR | BETA, "−log σ(βρ) (Rafailov et al. 2023)"))
OUTPUT_LOSSES.add("ipo", OutputLoss(
    lambda p, r, c: ipo_loss(*p.chosen_rejected(mean=True), *r.chosen_rejected(mean=True), beta=c.train.beta),
    lambda c: 1 / (4 * c.train.beta**2), LR | BETA, "(ρ̄ − 1/(2β))² (Azar et al. 2023)"))
OUTPUT_LOSSES.add("cdpo", OutputLoss(
    lambda p, r, c: cdpo_loss(*p.chosen_rejected(), *r.chosen_rejected(), beta=c.train.beta, eps=c.method.cdpo_eps),
    lambda c: LN2, LR | BETA, "DPO with label smoothing ε (Mitchell 2023)"))
OUTPUT_LOSSES.add("hinge", OutputLoss(
    lambda p, r, c: hinge_loss(*p.chosen_rejected(), *r.chosen_rejected(), beta=c.train.beta),
    lambda c: 1.0, LR | BETA, "max(0, 1 − βρ) (SLiC-HF)"))
OUTPUT_LOSSES.add("simpo", OutputLoss(
    lambda p, r, c: simpo_loss(*p.chosen_rejected(mean=True), beta=c.train.beta, gamma=c.method.simpo_gamma),
    lambda c: None, LR | {"train.beta": ("log", 0.5, 10.0), "method.simpo_gamma": ("float", 0.2, 2.0)},
    "−log σ(β(ℓ̄⁺ − ℓ̄⁻) − γ), no reference (Meng et al. 2024)", reference=False))


# preset -> (its output loss, the config values it implies): output losses over a representation adapter
ADAPTER_PRESETS = {
    "bipo": ("dpo", {"train.adapter": "vector", "method.bipo_flip": True, "method.layers": "0.5"},
             "BiPO: a steering vector at one middle block's response tokens, DPO with a random sign d (Cao et al. 2024)"),
    "loreft-dpo": ("dpo", {"train.adapter": "loreft"}, "DPO through a LoReFT adapter at method.layers (Wu et al. 2024)"),
}


def loss_of(name: str) -> OutputLoss:
    """The output loss of preset `name`."""
    return OUTPUT_LOSSES[ADAPTER_PRESETS[name][0] if name in ADAPTER_PRESETS else name]


def swapped(lp: SeqLogps | None) -> SeqLogps | None:
    """The same log-probs with chosen and rejected rows swapped: (2b,) [c; r] -> [r; c]."""
    if lp is None:
        return None
    b = lp.logp_sum.shape[0] // 2
    sw = lambda x: torch.cat([x[b:], x[:b]])
    return SeqLogps(sw(lp.logp_sum), sw(lp.n_tokens))


def bipo_sign() -> float:
    """d ∈ {−1, +1}, uniform, from torch's global RNG (a checkpoint restores it: resume stays exact)."""
    return 1.0 if int(torch.randint(0, 2, ())) else -1.0


class OutputMethod(MethodBase):
    """A registered output loss over response log-probs; the reference from the cache or online."""

    def __init__(self, cfg: RunConfig, spec: OutputLoss):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.lp_kw = lp_kwargs(cfg)
        self.reference = RefNeeds() if spec.reference else NO_REFERENCE
        self.flip = cfg.method.bipo_flip

    @contextmanager
    def step(self, model, batch: PairBatch, *, ref: RefOut | None = None) -> Iterator[RefOut | None]:
        """With bipo_flip: the step's forwards use d·v (d = `bipo_sign()`); `loss` reads d off the adapter."""
        if not self.flip:
            yield ref
            return
        with interventions.signed(model, bipo_sign()):
            yield ref

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None = None):
        pol = sequence_logps(model, batch, **self.lp_kw)
        ref_lp = None
        if self.spec.reference:
            if ref is not None:
                ref_lp = ref.logps
            else:
                with torch.no_grad(), adapter_disabled(model):
                    ref_lp = sequence_logps(model, batch, **self.lp_kw)
        flipped = self.flip and interventions.sign_of(model) < 0  # BiPO's d = −1: the swapped pair
        loss, m = self.spec.call(swapped(pol) if flipped else pol, swapped(ref_lp) if flipped else ref_lp, self.cfg)
        if self.flip:
            m = m | {"bipo/sign": torch.tensor(-1.0 if flipped else 1.0)}
        return loss, m | logp_metrics(pol)


def _build(cfg: RunConfig, model, preset: Preset) -> OutputMethod:
    return OutputMethod(cfg, loss_of(preset.name))


KINDS.add("output", MethodKind(
    "output", _build,
    search_space=lambda cfg: loss_of(cfg.train.method).space,
    init_loss=lambda cfg: loss_of(cfg.train.method).init(cfg),
    help="losses over response log-probs (docs/methods.md)"))
for _name, _spec in OUTPUT_LOSSES.items():
    register_preset(_name, "output", {"train.beta": 2.0} if _name == "simpo" else {}, _spec.help)
for _name, (_loss, _values, _help) in ADAPTER_PRESETS.items():
    register_preset(_name, "output", _values, _help)
