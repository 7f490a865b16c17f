"""The method interface and the registries every method kind is built from.

A *method kind* (output losses, representation losses, gradient projection, SFT, TDPO, ...) is
one class that satisfies `Method`, registered in `KINDS` with its factory; a *preset* is a name
a user types (`dpo`, `hs-pca-prefvec`, `tdpo2`) registered in `PRESETS` with its kind and the
config values it implies. The training loop, the reference cache, evaluation and `tune` ask a
method only what `Method` declares (CONTRIBUTING.md has the recipe for a new kind).

Shapes: b pairs, R input rows, t tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from reprpo.config import RunConfig
from reprpo.data.layout import Layout
from reprpo.data.tokenize import PairBatch, TokenizedPair
from reprpo.model.capture import CapturePoint
from reprpo.model.refcache import RefCache, RefOut
from reprpo.registry import Registry

Metrics = dict[str, torch.Tensor]
LN2 = math.log(2)
# search space of tune: dotted config key -> ("log" | "float", low, high) or ("cat", choices)
SearchSpace = dict[str, tuple]


@dataclass(frozen=True)
class RefNeeds:
    """What a method needs of the reference model (adapter off), so the loop can cache it once.

    logps: ℓ_ref of chosen and rejected · points: pooled reference activations at these capture
    points (only sound for a transform that is linear, T(Σ w h) = Σ w T(h)) · directions: per-pair
    reference directions u_b at every LoRA module (gradient methods) · online: the loss also runs
    its own reference pass every step that no cache replaces (e.g. TDPO's token distributions) ·
    features: (capture point, SAE): pooled reference SAE features at the SAE's block (fpo, hs-sae-*)."""

    logps: bool = True
    points: tuple[CapturePoint, ...] = ()
    directions: bool = False
    online: bool = False
    features: tuple | None = None

    @property
    def cached(self) -> bool:
        """Whether there is anything for the offline reference cache to hold."""
        return self.logps or bool(self.points) or self.directions or self.features is not None


NO_REFERENCE = RefNeeds(logps=False)


@runtime_checkable
class Method(Protocol):
    """Everything the loop, the reference cache and evaluation may ask of a method.

    A method keeps no state between `step` and `loss`: what one step's context computes (e.g. a
    gradient method's online reference pass) is yielded by `step` and handed to `loss` as `ref`.
    """

    reference: RefNeeds  # reference data to cache (NO_REFERENCE: none)
    trains: bool  # False: training-free (probe-mms, steer-mean): `prepare` fits it, no gradient steps
    packing: bool  # its loss is exact on the shared-prompt layout
    prefix: bool  # ... and with a batch prefix taken out of the rows

    def prepare(self, model, data: list[TokenizedPair], *, pad_id: int, cache: RefCache | None, layout: Layout) -> None:
        """Once before training: fit frames, size transforms, precompute fixed references."""

    def step(self, model, batch: PairBatch, *, ref: RefOut | None) -> AbstractContextManager[RefOut | None]:
        """The context the forward and backward of one micro-batch run in (gradient hooks);
        yields the reference to pass to `loss` (the cached one, or one computed here)."""

    def loss(self, model, batch: PairBatch, *, ref: RefOut | None) -> tuple[torch.Tensor, Metrics]:
        """(per-pair loss (b,), scalar metrics). `ref` None: compute the reference online."""

    def after_step(self, model, optimizer) -> None:
        """Called after every optimiser step (e.g. to project the applied update)."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the adapter (learned frames), optimised with it."""

    def state_dict(self) -> dict[str, Any]:
        """Saved beside the adapter as method_state.pt when not empty (frames, pca bases), and
        in every checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        """Restore `state_dict()` on resume (after `prepare`, which sized what it holds)."""


class MethodBase(nn.Module):
    """Defaults for the optional parts of `Method` (an nn.Module, so state_dict covers buffers)."""

    reference: RefNeeds = RefNeeds()
    trains: bool = True
    packing: bool = True
    prefix: bool = True

    def prepare(self, model, data, *, pad_id: int, cache=None, layout: Layout | None = None) -> None:
        pass

    @contextmanager
    def step(self, model, batch: PairBatch, *, ref: RefOut | None = None) -> Iterator[RefOut | None]:
        yield ref

    def after_step(self, model, optimizer) -> None:
        pass

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


@dataclass(frozen=True)
class MethodKind:
    """A kind of method: its factory, tune's search space and its loss at initialisation.

    build(cfg, model, preset) -> Method · search_space(cfg) -> SearchSpace ·
    init_loss(cfg) -> the step-1 loss when policy = reference (LoRA B = 0), or None where it
    depends on the data (simpo, sft: the base model's own numbers) · scorer: how evaluation
    scores its adapters (a `SCORERS` name; `eval.scorer` overrides it)."""

    name: str
    build: Callable[[RunConfig, Any, Preset], Method]
    search_space: Callable[[RunConfig], SearchSpace]
    init_loss: Callable[[RunConfig], float | None]
    help: str
    scorer: str = "logp_mean"


@dataclass(frozen=True)
class Preset:
    """A method name a user types: its kind, and the config values it implies (applied before
    YAML and the command line, so both can override them)."""

    name: str
    kind: str
    values: dict[str, object] = field(default_factory=dict)
    help: str = ""


@dataclass(frozen=True)
class Scorer:
    """How evaluation scores a pair: fn(model, batch, *, chunk, prefix_store) -> per-pair
    columns (with `method=` too when `needs_method`), which must include `margin` (b,) (score⁺ − score⁻; correct iff > 0, ties 0.5) and
    the log-prob columns of `logp_columns`. The default, `logp_mean`, is ℓ̄⁺ − ℓ̄⁻ (DESIGN §6).

    from_logps: for a scorer that is a function of log-prob sums and token counts, that function
    (cols -> margin), so the base model's scores can come from the offline reference cache; None
    for any other scorer. needs_method: fn reads the run's method object (a reward head, a probe
    direction), rebuilt from the run's config and method_state.pt. base: the scorer of the base
    model's row (adapter off) when it is not this one: a reward head or a probe means nothing on
    the untrained model, so their base is the zero-shot ℓ̄ margin, the same for every method.
    lm: the margin is the language model's own log-prob margin, so the chosen-perplexity ratio
    and the generation check say something about the method (False: the report prints n/a)."""

    name: str
    fn: Callable[..., dict[str, torch.Tensor]]
    help: str
    from_logps: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    needs_method: bool = False
    base: str | None = None
    lm: bool = True


KINDS: Registry[MethodKind] = Registry("method kind")
PRESETS: Registry[Preset] = Registry("method", field="train.method")
SCORERS: Registry[Scorer] = Registry("scorer", field="eval.scorer")


def register_preset(name: str, kind: str, values: dict[str, object] | None = None, help: str = "") -> Preset:  # noqa: A002
    return PRESETS.add(name, Preset(name, kind, dict(values or {}), help))


def logp_metrics(pol) -> Metrics:
    """The log-prob columns every method logs (policy sums and per-token means)."""
    pc, pr = pol.chosen_rejected()
    pcm, prm = pol.chosen_rejected(mean=True)
    return {"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean(),
            "logps/chosen_mean": pcm.detach().mean(), "logps/rejected_mean": prm.detach().mean()}


def lp_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """sequence_logps keyword arguments from `speed`."""
    return {"chunk": cfg.speed.logit_chunk, "full_logits": not cfg.speed.response_logits}


# search-space pieces shared by the kinds (tune draws from the union a kind returns)
LR: SearchSpace = {"train.lr": ("log", 1e-5, 1e-3)}
BETA: SearchSpace = {"train.beta": ("log", 0.01, 1.0)}
LAYERS: SearchSpace = {"method.layers": ("cat", ["0.3", "0.5", "0.7", "0.4,0.6,0.8"])}
