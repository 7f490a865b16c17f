"""Representation losses over pooled activations (DESIGN §5): each returns (loss (b,), metrics).

Shapes: b batch, d hidden (after any transform T), l collection points (layers/modules).

Inputs are one `PooledActs` per collection point: the response-pooled activations of the
policy and the reference for chosen (⁺) and rejected (⁻), each (b, d). The functions here
return ONLY the representation term, averaged over collection points (DESIGN §3); the caller
adds the DPO term −log σ(βρ) with the weight given by the method's `ReprLossSpec`:

    loss = spec.dpo_weight · dpo_loss(...) + spec.repr_weight · spec.fn(acts, **spec.defaults)

Everything is computed in float32, and reference activations are detached here even if the
caller forgot. Geometry (DESIGN §3), per point and example:
    δ_ref = h⁺_ref − h⁻_ref,  u = δ_ref/‖δ_ref‖ (no gradient),  δ_θ = h⁺_θ − h⁻_θ
    p = ⟨δ_θ, u⟩/‖δ_ref‖ (1 at init),  o = ‖δ_θ − ⟨δ_θ, u⟩u‖/‖δ_ref‖ (0),  c = cos(δ_θ, δ_ref) (1)

Metrics (scalar, detached): `repr/{p,o,c}/{i}` per point i and their means `repr/{p,o,c}`;
`repr/loss/{i}` and `repr/loss`; the loss's parts `repr/{name}/{part}` (mean over points);
`repr/degenerate`, the fraction of (point, example) with ‖δ_ref‖ at its floor (see below).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from reprpo.methods.base import BETA, LAYERS
from reprpo.registry import Registry

Metrics = dict[str, Tensor]
TermFn = Callable[["PooledActs", Tensor, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]

# ‖δ_ref‖ is floored at DELTA_REF_REL_EPS · (‖h⁺_ref‖ + ‖h⁻_ref‖)/2 (scale-aware), and at
# DELTA_REF_ABS_EPS in case the activations themselves are all zero.
DELTA_REF_REL_EPS = 1e-6
DELTA_REF_ABS_EPS = 1e-12
# o is a norm with a kink at 0, where policy == reference: its gradient there is a unit vector
# pointed by rounding noise (a random sideways kick of size λ_o/‖δ_ref‖ at step 1, different
# for every batch layout). Losses use õ = sqrt(o² + ε²) − ε instead: zero gradient at 0,
# = o − ε + O(ε²/o) once o ≫ ε. (differs: DESIGN writes λ_o·o; the metric stays exact o.)
O_SMOOTH_EPS = 1e-3


def smooth_o(o: Tensor) -> Tensor:
    """õ = sqrt(o² + ε²) − ε, ε = O_SMOOTH_EPS (0 at o = 0, smooth, ≈ o for o ≫ ε)."""
    return torch.sqrt(o * o + O_SMOOTH_EPS**2) - O_SMOOTH_EPS


@dataclass
class PooledActs:
    """Pooled activations at one collection point; each (b, d). Ref tensors carry no gradient."""

    pi_chosen: Tensor  # (b, d) h⁺_θ
    pi_rejected: Tensor  # (b, d) h⁻_θ
    ref_chosen: Tensor  # (b, d) h⁺_ref
    ref_rejected: Tensor  # (b, d) h⁻_ref

    def __post_init__(self) -> None:
        shapes = {
            "pi_chosen": tuple(self.pi_chosen.shape),
            "pi_rejected": tuple(self.pi_rejected.shape),
            "ref_chosen": tuple(self.ref_chosen.shape),
            "ref_rejected": tuple(self.ref_rejected.shape),
        }
        if len(set(shapes.values())) != 1 or self.pi_chosen.dim() != 2:
            raise ValueError(f"PooledActs needs four (b, d) tensors of one shape, got {shapes}")


def _f32(a: PooledActs) -> PooledActs:
    """Cast to float32; detach the reference."""
    return PooledActs(
        a.pi_chosen.float(), a.pi_rejected.float(),
        a.ref_chosen.detach().float(), a.ref_rejected.detach().float(),
    )


def _delta_ref_norm(a: PooledActs) -> tuple[Tensor, Tensor]:
    """(max(‖δ_ref‖, floor) (b,), floor (b,)); the pair is degenerate where the two are equal."""
    delta_ref = a.ref_chosen - a.ref_rejected  # (b, d)
    norm = torch.linalg.vector_norm(delta_ref, dim=-1)  # (b,)
    scale = 0.5 * (
        torch.linalg.vector_norm(a.ref_chosen, dim=-1)
        + torch.linalg.vector_norm(a.ref_rejected, dim=-1)
    )  # (b,)
    floor = (DELTA_REF_REL_EPS * scale).clamp_min(DELTA_REF_ABS_EPS)  # (b,)
    return torch.maximum(norm, floor), floor


def preference_geometry(a: PooledActs) -> tuple[Tensor, Tensor, Tensor]:
    """p = ⟨δ_θ,u⟩/‖δ_ref‖,  o = ‖δ_θ − ⟨δ_θ,u⟩u‖/‖δ_ref‖,  c = cos(δ_θ, δ_ref); each (b,)
    DESIGN §3 (ours). u = δ_ref/‖δ_ref‖ carries no gradient.

    Degenerate pairs (δ_ref = 0, e.g. identical chosen and rejected responses): ‖δ_ref‖ is
    floored at 1e-6 × the reference activation norm, so u = 0 and p = 0, c = 0, while
    o = ‖δ_θ‖/floor — 0 while δ_θ = 0 (it stays ≈ 0 for identical inputs) but huge, with
    huge gradients, if the policy separates them. Values and gradients stay finite; the
    fraction of such examples is logged as `repr/degenerate`, and the data layer should drop
    such pairs rather than rely on this guard.
    Note o is a norm, so not smooth at 0: at init its gradient direction is rounding noise
    (magnitude 1/‖δ_ref‖), orthogonal to u.
    """
    a = _f32(a)
    n_ref, floor = _delta_ref_norm(a)  # (b,)
    u = (a.ref_chosen - a.ref_rejected) / n_ref[:, None]  # (b, d), detached
    delta = a.pi_chosen - a.pi_rejected  # (b, d) δ_θ
    along = (delta * u).sum(-1)  # (b,) ⟨δ_θ, u⟩
    p = along / n_ref
    o = torch.linalg.vector_norm(delta - along[:, None] * u, dim=-1) / n_ref
    # cos(δ_θ, δ_ref) = ⟨δ_θ, u⟩/‖δ_θ‖ (u has unit norm unless degenerate, then c = 0)
    c = along / torch.maximum(torch.linalg.vector_norm(delta, dim=-1), floor)
    return p, o, c


def _over_points(name: str, acts: list[PooledActs], term: TermFn) -> tuple[Tensor, Metrics]:
    """Mean over collection points of term(acts_i, p_i, o_i, c_i), plus the shared metrics."""
    if len(acts) == 0:
        raise ValueError(f"{name}: no collection points (acts is empty); check the layer spec")
    losses, metrics, parts_all, degenerate = [], {}, {}, []
    for i, a in enumerate(acts):
        a = _f32(a)
        p, o, c = preference_geometry(a)  # (b,) each
        loss_i, parts = term(a, p, o, c)  # (b,), {part: (b,)}
        losses.append(loss_i)
        n_ref, floor = _delta_ref_norm(a)
        degenerate.append((n_ref <= floor).float())
        for k, v in (("p", p), ("o", o), ("c", c), ("loss", loss_i)):
            metrics[f"repr/{k}/{i}"] = v.detach().mean()
        for k, v in parts.items():
            parts_all.setdefault(k, []).append(v.detach().mean())
    loss = torch.stack(losses).mean(0)  # (l, b) -> (b,)
    for k in ("p", "o", "c", "loss"):
        metrics[f"repr/{k}"] = torch.stack([metrics[f"repr/{k}/{i}"] for i in range(len(acts))]).mean()
    for k, v in parts_all.items():
        metrics[f"repr/{name}/{k}"] = torch.stack(v).mean()
    metrics["repr/degenerate"] = torch.stack(degenerate).mean()
    return loss, metrics


def mse_loss(acts: list[PooledActs], *, alpha: float) -> tuple[Tensor, Metrics]:
    """L = ‖h⁻_θ − h⁺_ref‖/‖δ_ref‖ + α‖h⁺_θ − h⁺_ref‖/‖δ_ref‖   (1 at init)
    Seed README / Circuit Breakers flavour, made scale-free (ours; DESIGN §5 `mse`).
    """
    # "Make rejected look like reference-chosen while chosen stays put." Plain norms, not
    # squared: the second term is not smooth at init (see preference_geometry's note on o).
    # A degenerate pair (δ_ref = 0) scores 0 at init but ‖drift‖/floor (≈ 1e6 × relative drift)
    # once the policy moves at all: watch `repr/degenerate`, drop such pairs upstream.

    def term(a: PooledActs, p: Tensor, o: Tensor, c: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        n_ref, _ = _delta_ref_norm(a)  # (b,)
        rejected = torch.linalg.vector_norm(a.pi_rejected - a.ref_chosen, dim=-1) / n_ref
        chosen = alpha * torch.linalg.vector_norm(a.pi_chosen - a.ref_chosen, dim=-1) / n_ref
        return rejected + chosen, {"rejected": rejected, "chosen": chosen}

    return _over_points("mse", acts, term)


def prefvec_loss(
    acts: list[PooledActs], *, beta_p: float, lambda_o: float, lambda_c: float
) -> tuple[Tensor, Metrics]:
    """L = softplus(−β_p(p − 1)) + λ_o·o + λ_c·(1 − c)   (ln 2 at init)
    Ours (DESIGN §5 `prefvec`): move chosen and rejected apart along the reference
    preference direction, not sideways. The caller adds DPO (on by default).
    """
    # Differs from the earlier reprpo code (mean_h((u·δ)u) with abs() and ×1e5/×1e6 factors):
    # this is bounded below, scale-free, and signed (p < 1 is penalised, p > 1 rewarded).

    def term(a: PooledActs, p: Tensor, o: Tensor, c: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        along = F.softplus(-beta_p * (p - 1.0))
        orth = lambda_o * smooth_o(o)
        cos = lambda_c * (1.0 - c)
        return along + orth + cos, {"along": along, "orth": orth, "cos": cos}

    return _over_points("prefvec", acts, term)


def rank_token_fn(h: Tensor) -> Tensor:
    """q = log_softmax(h) over the hidden dim, per token, in float32: (..., d) -> (..., d)."""
    return torch.log_softmax(h.float(), dim=-1)


def rank_loss(acts: list[PooledActs], *, beta: float, alpha: float) -> tuple[Tensor, Metrics]:
    """L = mean_d softplus(−β r) + α·mean_d (q⁺_θ − q⁺_ref)²,  r = (q⁺_θ − q⁺_ref) − (q⁻_θ − q⁻_ref)
    Seed "Rank" (DESIGN §5 `rank`); ln 2 at init.

    The activations given must ALREADY be q: the caller applies `rank_token_fn` (log_softmax
    over the hidden dimension) to every token and then pools (ReprLossSpec.token_fn says so).
    The p, o, c metrics are then measured in q-space.
    """
    # Differs from the earlier reprpo code, whose −log σ(−βr) pushed r down (rejected up).

    def term(a: PooledActs, p: Tensor, o: Tensor, c: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        chosen_shift = a.pi_chosen - a.ref_chosen  # (b, d)
        r = chosen_shift - (a.pi_rejected - a.ref_rejected)  # (b, d)
        rank = F.softplus(-beta * r).mean(-1)  # (b,)
        anchor = alpha * chosen_shift.pow(2).mean(-1)  # (b,)
        return rank + anchor, {"rank": rank, "anchor": anchor, "r": r.mean(-1)}

    return _over_points("rank", acts, term)


INNERDPO_ALIGNS = ("proj", "proj_orth", "log_proj")


def innerdpo_term(
    acts: list[PooledActs], *, beta_h: float, align: str, eps: float
) -> tuple[Tensor, Metrics]:
    """L_h = −log σ(β_h g),  g = p − 1 | (p − 1) − o | log max(p, ε)  for align proj | proj_orth | log_proj
    Journal, last stage (DESIGN §5 `innerdpo`); ln 2 at init (g = 0). The caller adds −log σ(βρ).
    """
    # log_proj: for p ≤ ε the clamp leaves no gradient, and the term sits at log(1 + ε^−β_h).
    if align not in INNERDPO_ALIGNS:
        raise ValueError(f"innerdpo: align={align!r} is not one of {INNERDPO_ALIGNS}")

    def term(a: PooledActs, p: Tensor, o: Tensor, c: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if align == "proj":
            g = p - 1.0
        elif align == "proj_orth":
            g = (p - 1.0) - smooth_o(o)  # smooth at o = 0, see O_SMOOTH_EPS
        else:
            g = torch.log(p.clamp_min(eps))
        return -F.logsigmoid(beta_h * g), {"g": g}

    return _over_points("innerdpo", acts, term)


def innerpo_term(acts: list[PooledActs], *, beta_h: float) -> tuple[Tensor, Metrics]:
    """L_h = −log σ(β_h [cos(h⁺_θ, h⁺_ref) − cos(h⁻_θ, h⁻_ref)])
    DESIGN §5 `innerpo`. The caller adds −log σ(βρ).

    At init (policy = reference) both cosines are 1, so L_h = −log σ(0) = ln 2, and its
    gradient is ZERO: each cosine is at its maximum. The term only acts once the DPO term has
    moved the activations (it then rewards turning h⁻_θ away from h⁻_ref more than h⁺_θ).
    """

    def term(a: PooledActs, p: Tensor, o: Tensor, c: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cos_chosen = F.cosine_similarity(a.pi_chosen, a.ref_chosen, dim=-1)  # (b,)
        cos_rejected = F.cosine_similarity(a.pi_rejected, a.ref_rejected, dim=-1)  # (b,)
        g = cos_chosen - cos_rejected
        return -F.logsigmoid(beta_h * g), {"cos_chosen": cos_chosen, "cos_rejected": cos_rejected}

    return _over_points("innerpo", acts, term)


@dataclass(frozen=True)
class ReprLossSpec:
    """One representation loss: its function, default hyper-parameters and how it combines.

    Total loss = dpo_weight · (−log σ(βρ)) + repr_weight · fn(acts, **defaults).
    """

    name: str
    fn: Callable[..., tuple[Tensor, Metrics]]  # fn(acts: list[PooledActs], **defaults)
    defaults: Mapping[str, float | str] = field(default_factory=dict)  # fn's keyword args
    dpo_weight: float = 0.0  # weight of the DPO term the caller adds; 0 = off
    dpo_required: bool = False  # the method is defined with the DPO term (weight must be > 0)
    repr_weight: float = 1.0  # weight of fn's term (DESIGN's α for innerdpo/innerpo)
    token_fn: Callable[[Tensor], Tensor] | None = None  # apply per token BEFORE pooling
    init: float = math.log(2)  # fn's value when policy = reference (the hand-worked tests pin it)
    space: Mapping[str, tuple] = field(default_factory=dict)  # tune's search space beyond lr (dotted config keys)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "space", MappingProxyType(dict(self.space)))

    @property
    def needs_token_fn(self) -> bool:
        return self.token_fn is not None


REPR_LOSSES: Registry[ReprLossSpec] = Registry("representation loss", field="method.loss")
REPR_LOSSES.add("mse", ReprLossSpec("mse", mse_loss, {"alpha": 1.0}, init=1.0,
                                    space=LAYERS | {"method.alpha": ("log", 0.1, 10.0)}))
REPR_LOSSES.add("prefvec", ReprLossSpec(
    "prefvec", prefvec_loss, {"beta_p": 1.0, "lambda_o": 1.0, "lambda_c": 0.0}, dpo_weight=1.0,
    space=BETA | LAYERS | {"method.beta_p": ("log", 0.1, 10.0), "method.lambda_o": ("log", 0.01, 10.0)}))
# β 1 and α 1 are ours (DESIGN leaves them open). The earlier code's "α 0.25" weighted a different
# (DPO-retain) term. At small shifts the anchor is second order in the shift while the rank term
# is first order, so α acts as a trust region.
REPR_LOSSES.add("rank", ReprLossSpec(
    "rank", rank_loss, {"beta": 1.0, "alpha": 1.0}, token_fn=rank_token_fn,
    space=LAYERS | {"method.alpha": ("log", 0.1, 10.0), "method.rank_beta": ("log", 0.1, 10.0)}))
REPR_LOSSES.add("innerdpo", ReprLossSpec(
    "innerdpo", innerdpo_term, {"beta_h": 1.0, "align": "proj", "eps": 1e-3}, dpo_weight=1.0, dpo_required=True,
    space=BETA | LAYERS | {"method.repr_weight": ("log", 0.1, 10.0), "method.beta_h": ("log", 0.1, 10.0)}))
REPR_LOSSES.add("innerpo", ReprLossSpec(
    "innerpo", innerpo_term, {"beta_h": 1.0}, dpo_weight=1.0, dpo_required=True,
    space=BETA | LAYERS | {"method.repr_weight": ("log", 0.1, 10.0), "method.beta_h": ("log", 0.1, 10.0)}))
