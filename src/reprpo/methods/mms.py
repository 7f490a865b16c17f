"""Training-free baselines on the mass-mean preference direction: `probe-mms` and `steer-mean`.

v_ℓ = mean over training pairs of δ_ℓ = h̄⁺_ℓ − h̄⁻_ℓ, the reference model's pooled block-ℓ
outputs (the capture and pooling of the representation methods, `method.pooling`). The layer is
the one of `method.layers` whose v (fitted on the rest) scores a held-out slice of the training
pairs best (`method.probe_holdout`, split by prompt; one layer given: that one); the final v uses
every training pair. No gradient steps: the run's LoRA stays the identity, and v, the layer (and
steer-mean's α) are the run's method_state.pt.

probe-mms (GENIES's best method, Clymer et al. 2023; mass-mean probe, Marks & Tegmark 2023)
scores a pair by ⟨h̄⁺ − h̄⁻, v⟩. steer-mean (activation addition, Turner et al. 2023; CAA, Rimsky
et al. 2024) adds α·v/‖v‖ to block ℓ's output at the response tokens and scores by the usual ℓ̄
margin; α = c·‖v‖ with c from `method.steer_grid`, the best on the held-out slice.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
from contextlib import contextmanager

import torch

from reprpo.config import RunConfig
from reprpo.data.layout import PADDED
from reprpo.data.tokenize import PairBatch, TokenizedPair
from reprpo.errors import ConfigError
from reprpo.methods.base import (
    KINDS,
    SCORERS,
    MethodBase,
    MethodKind,
    RefNeeds,
    Scorer,
    register_preset,
)
from reprpo.methods.scorers import logp_columns, margin_from_logps
from reprpo.model.capture import capture, capture_points, decoder_layers, parse_layers, pool
from reprpo.model.forward import adapter_disabled, sequence_logps
from reprpo.model.refcache import build_ref_cache

CANDIDATE_LAYERS = "0.25,0.375,0.5,0.625,0.75"  # the presets' method.layers: the probe's layer is chosen among them


def mass_mean(delta: torch.Tensor) -> torch.Tensor:
    """v = (1/n) Σ_i δ_i, δ_i = h̄⁺_i − h̄⁻_i: (n, d) -> (d,)
    Mass-mean probe: Marks & Tegmark (2023); GENIES (Clymer et al. 2023) "mms"."""
    return delta.float().mean(0)


def mms_margin(h_chosen: torch.Tensor, h_rejected: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """score = ⟨h̄⁺ − h̄⁻, v⟩ per pair: (b, d), (b, d), (d,) -> (b,)
    GENIES (Clymer et al. 2023): the probe's score difference of the two responses."""
    return (h_chosen.float() - h_rejected.float()) @ v.float()


def accuracy(margin: torch.Tensor) -> float:
    """Share of margins > 0, a tie counting 0.5 (the evaluation's rule)."""
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def holdout_split(pairs: list[TokenizedPair], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit rows, held-out rows) of `pairs`: the pairs of about `fraction` of the distinct prompts
    (ranked by a seeded hash of the prompt tokens) are held out, so no prompt is on both sides."""
    key = lambda p: hashlib.blake2b(f"{seed}:{p.prompt_ids}".encode(), digest_size=8).hexdigest()
    prompts = sorted({key(p) for p in pairs})
    if len(prompts) < 2:
        raise ConfigError("probe-mms / steer-mean: the training data has one distinct prompt; choosing the layer needs a "
                          "held-out slice by prompt. Give more pairs (data.n_train) or one layer (--method.layers 0.5).")
    held = set(prompts[: min(len(prompts) - 1, max(1, math.ceil(fraction * len(prompts))))])
    fit = [i for i, p in enumerate(pairs) if key(p) not in held]
    return fit, [i for i, p in enumerate(pairs) if key(p) in held]


def choose_layer(deltas: dict[int, torch.Tensor], fit: list[int], held: list[int]) -> tuple[int, dict[int, float]]:
    """The layer whose v fitted on `fit` scores the `held` pairs best (ties: the first), and
    each layer's held-out accuracy. deltas: layer -> δ (n, d)."""
    accs = {ly: accuracy(d[held] @ mass_mean(d[fit])) for ly, d in deltas.items()}
    return max(accs, key=lambda ly: (accs[ly], -list(deltas).index(ly))), accs


def response_row_mask(batch: PairBatch) -> torch.Tensor:
    """(R, t) 1 at every response token of the batch's input rows (chosen and rejected)."""
    m = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    m.index_put_((batch.rows,), batch.response_mask.float(), accumulate=True)
    return m.clamp_(max=1.0)


@contextmanager
def added_at(model, layer: int, vec: torch.Tensor, mask_of):
    """Inside the block, block `layer`'s output h (R, t, d) becomes h + mask[..., None]·vec, with
    mask = mask_of(h) ((R, t) or (t,); None: leave this call alone). Only the calling thread's
    forwards are touched: scoring workers share the model."""
    owner = threading.get_ident()

    def hook(_m, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        mask = mask_of(h) if threading.get_ident() == owner else None
        if mask is None:
            return None
        h = h + mask[..., None].to(h.dtype) * vec.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def steered(model, layer: int, vec: torch.Tensor, batch: PairBatch):
    """Inside the block, block `layer`'s output is h + vec at the batch's response tokens
    (a batch-prefix pass, which holds none, is left alone)."""
    mask = response_row_mask(batch)
    return added_at(model, layer, vec, lambda h: mask if h.shape[:2] == mask.shape else None)


class MassMeanProbe(MethodBase):
    """probe-mms: fitted in `prepare` from the reference's pooled activations (no training)."""

    trains = False

    def __init__(self, cfg: RunConfig, model):
        super().__init__()
        mc = self.mc = cfg.method
        if mc.collection != "hs":
            raise ConfigError(f"{cfg.train.method} reads block outputs: method.collection must be hs, got {mc.collection!r}.")
        if mc.layers.strip() == "sae":
            raise ConfigError(f"{cfg.train.method}: method.layers sae is for SAE methods; give blocks, e.g. {CANDIDATE_LAYERS}.")
        self.layers = parse_layers(mc.layers, len(decoder_layers(model)))
        self.points = capture_points(model, collection="hs", layers=self.layers)
        self.reference = RefNeeds(logps=False, points=tuple(self.points))
        self.seed, self.name = cfg.train.seed, cfg.train.method
        self.register_buffer("v", torch.zeros(0))
        self.register_buffer("layer", torch.tensor(self.layers[0]))
        self.register_buffer("held_accuracy", torch.zeros(0))  # per candidate layer, in self.layers order

    def load_state_dict(self, state, strict: bool = True):
        for k, t in state.items():
            if not hasattr(self, k):
                raise KeyError(f"{self.name}: unexpected key {k!r} in method state")
            setattr(self, k, t.clone())
        return self

    def _deltas(self, model, data: list[TokenizedPair], *, pad_id: int, cache, layout) -> dict[int, torch.Tensor]:
        """layer -> δ (n, d) of the reference, rows in `data` order (from the cache, else one pass)."""
        if cache is None or not all(p.key in cache.acts for p in self.points):
            cache = build_ref_cache(model, data, pad_id=pad_id, layout=layout or PADDED, points=self.points, pooling=self.mc.pooling,
                                    outlier_quantile=self.mc.outlier_quantile, use_disk=False, progress=False)
        rows = [cache._row[p.index] for p in data]
        return {pt.layer_idx: (cache.acts[pt.key][rows, 0] - cache.acts[pt.key][rows, 1]).float() for pt in self.points}

    @torch.no_grad()
    def prepare(self, model, data, *, pad_id: int, cache=None, layout=None) -> None:
        deltas = self._deltas(model, data, pad_id=pad_id, cache=cache, layout=layout)
        if len(self.layers) == 1:
            layer, accs = self.layers[0], {}
            self.fit, self.held = list(range(len(data))), []
        else:
            self.fit, self.held = holdout_split(data, self.mc.probe_holdout, self.seed)
            layer, accs = choose_layer(deltas, self.fit, self.held)
            shown = ", ".join(f"{ly}: {100 * a:.0f}%" for ly, a in accs.items())
            print(f"{self.name}: block {layer} chosen (held-out probe accuracy by block, {len(self.held)} pairs: {shown})", file=sys.stderr)
        self.layer = torch.tensor(layer)
        self.v = mass_mean(deltas[layer])
        self.held_accuracy = torch.tensor([accs.get(ly, float("nan")) for ly in self.layers])

    def loss(self, model, batch, *, ref=None):
        raise RuntimeError(f"{self.name} is training-free: the loop takes no gradient steps for it")

    def point(self, model):
        return capture_points(model, collection="hs", layers=[int(self.layer)])[0]


def mms_score(model, batch: PairBatch, *, chunk: int = 2048, prefix_store: dict | None = None, method: MassMeanProbe | None = None):
    """margin = ⟨h̄⁺ − h̄⁻, v⟩ at the run's block; the log-prob columns from the same forward."""
    point = method.point(model)
    with capture([point]) as store:
        cols = logp_columns(model, batch, chunk=chunk, prefix_store=prefix_store)
    h = pool(store[point.key].float()[batch.rows], response_mask=batch.response_mask, attention_mask=batch.pool_mask,
             mode=method.mc.pooling, outlier_quantile=method.mc.outlier_quantile)
    b = batch.n_pairs
    return cols | {"margin": mms_margin(h[:b], h[b:], method.v.to(h.device))}


class SteerMean(MassMeanProbe):
    """steer-mean: the probe's layer and v, then α chosen on the held-out slice by ℓ̄ accuracy."""

    def __init__(self, cfg: RunConfig, model):
        super().__init__(cfg, model)
        self.grid = sorted({float(x) for x in cfg.method.steer_grid.split(",") if x.strip()}, key=lambda c: (abs(c), -c))
        self.steer_pairs, self.batch_size = cfg.method.steer_pairs, cfg.train.batch_size
        self.register_buffer("alpha", torch.tensor(0.0))
        self.register_buffer("held_accuracy_alpha", torch.zeros(0))  # per multiple of |v|, in self.grid order

    def generating(self, model, prompt_len: int):
        """The context `generate` runs in: α·v/‖v‖ added at the generated tokens (eval/coherence.py)."""
        return steered_generation(model, int(self.layer), self.vector().to(next(model.parameters()).device), prompt_len)

    def vector(self) -> torch.Tensor:
        """α·v/‖v‖ (0 where v = 0)."""
        n = self.v.norm()
        return self.v * 0 if n == 0 else self.alpha * self.v / n

    @torch.no_grad()
    def prepare(self, model, data, *, pad_id: int, cache=None, layout=None) -> None:
        super().prepare(model, data, pad_id=pad_id, cache=cache, layout=layout)
        held = (self.held or list(range(len(data))))[: self.steer_pairs]  # one layer given: a slice of the training pairs
        pairs = [data[i] for i in held]
        lay = (layout or PADDED).for_pairs(pairs)
        device = next(model.parameters()).device
        accs = []
        was_training = model.training
        model.eval()
        try:
            for c in self.grid:
                self.alpha = torch.tensor(c * float(self.v.norm()))
                margins = []
                for s in range(0, len(pairs), self.batch_size):
                    batch = lay.collate(pairs[s : s + self.batch_size], pad_id=pad_id).to(device)
                    with adapter_disabled(model), steered(model, int(self.layer), self.vector().to(device), batch):
                        lp = sequence_logps(model, batch)
                    margins.append(lp.chosen_rejected(mean=True)[0] - lp.chosen_rejected(mean=True)[1])
                accs.append(accuracy(torch.cat(margins)))
        finally:
            model.train(was_training)
        best = max(range(len(self.grid)), key=lambda i: (accs[i], -i))  # ties: the smallest |c| (0 first)
        self.alpha = torch.tensor(self.grid[best] * float(self.v.norm()))
        self.held_accuracy_alpha = torch.tensor(accs)
        shown = ", ".join(f"{c:g}: {100 * a:.0f}%" for c, a in zip(self.grid, accs))
        print(f"{self.name}: alpha = {self.grid[best]:g} x |v| = {float(self.alpha):.4g} at block {int(self.layer)} "
              f"(held-out ℓ̄ accuracy by multiple, {len(pairs)} pairs: {shown})", file=sys.stderr)


def steered_generation(model, layer: int, vec: torch.Tensor, prompt_len: int):
    """Inside the block, block `layer`'s output is h + vec at every position from `prompt_len` on
    (the generated tokens: the prompt pass is left alone; with a KV cache each later call feeds
    one new token). The response tokens of `steered`, for `generate`."""
    seen = {"calls": 0}

    def mask_of(h):
        first, seen["calls"] = seen["calls"] == 0, seen["calls"] + 1
        if h.shape[1] > 1 or first:  # the prompt pass (or a full recompute): positions from prompt_len on
            return (torch.arange(h.shape[1], device=h.device) >= prompt_len).float()
        return torch.ones(1, device=h.device)  # one new token

    return added_at(model, layer, vec, mask_of)


def steer_score(model, batch: PairBatch, *, chunk: int = 2048, prefix_store: dict | None = None, method: SteerMean | None = None):
    """margin = ℓ̄⁺ − ℓ̄⁻ with α·v/‖v‖ added to the run's block output at the response tokens."""
    with steered(model, int(method.layer), method.vector().to(batch.input_ids.device), batch):
        cols = logp_columns(model, batch, chunk=chunk, prefix_store=prefix_store)
    return cols | {"margin": margin_from_logps(cols, mean=True)}


SCORERS.add("mms", Scorer("mms", mms_score, "⟨h̄⁺ − h̄⁻, v⟩ of the mass-mean probe (probe-mms)", needs_method=True,
                          base="logp_mean", lm=False))
SCORERS.add("steer", Scorer("steer", steer_score, "ℓ̄⁺ − ℓ̄⁻ with α·v/‖v‖ added at the response tokens (steer-mean)",
                            needs_method=True, base="logp_mean"))
_LAYERS = {"method.layers": CANDIDATE_LAYERS, "method.collection": "hs"}
KINDS.add("probe", MethodKind("probe", lambda cfg, model, preset: MassMeanProbe(cfg, model), search_space=lambda cfg: {},
                              init_loss=lambda cfg: None, help="training-free mass-mean probe on the reference's hidden states",
                              scorer="mms"))
KINDS.add("steer", MethodKind("steer", lambda cfg, model, preset: SteerMean(cfg, model),
                              search_space=lambda cfg: {"method.steer_grid": ("cat", ["0,1,2,4,8", "0,0.5,1,2", "0,4,8,16"])},
                              init_loss=lambda cfg: None, help="training-free activation addition of the mass-mean direction",
                              scorer="steer"))
register_preset("probe-mms", "probe", _LAYERS, help="⟨h̄⁺ − h̄⁻, v⟩, v = mean reference δ at the best held-out block (training-free; GENIES)")
register_preset("steer-mean", "steer", _LAYERS, help="add α·v/‖v‖ at the response tokens of the probe's block, α chosen on held-out pairs (training-free)")
