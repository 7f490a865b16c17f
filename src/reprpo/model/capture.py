"""Activation capture: residual stream (`hs`) and side channels (`side`) at chosen layers.

Shapes: r = 2b rows ([chosen; rejected]), t tokens, d width of the captured tensor.
`hs` captures block outputs H^ℓ (= HF `hidden_states[ℓ+1]` for all but the last block, where HF
applies the final norm; we read the hook output, so never the final norm). `side` captures the
input or output of submodules matched by name *inside the selected blocks only* (differs: the
earlier reprpo code collected every layer whatever the spec).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from reprpo.errors import ConfigError
from reprpo.model.forward import base_model
from reprpo.registry import Registry

# where to read (DESIGN §5 collection points); residual_only transforms need `hs`
COLLECTIONS: Registry[str] = Registry("collection", field="method.collection")
COLLECTIONS.add("hs", "residual stream: block outputs at the layer spec")
COLLECTIONS.add("side", "inputs/outputs of submodules matched by method.modules inside the selected blocks")


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks of a (PEFT-wrapped) causal LM."""
    dec = base_model(model).get_decoder()
    layers = getattr(dec, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n = base_model(model).config.num_hidden_layers
    for m in dec.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ConfigError(f"cannot find the decoder blocks of {type(base_model(model)).__name__}")


def _fraction(x: str) -> Fraction | None:
    """x as an exact fraction if it is written as a decimal ("0.29", "1e-1"), else None (an int).

    Exact, so "0.29" of 100 blocks is 29: in floating point 0.29 * 100 = 28.999… floors to 28."""
    return Fraction(x) if "." in x or "e" in x.lower() else None


def _index(x: str, n: int) -> int:
    """One layer index: int (negative from the end) or a fraction of depth in [0, 1], floor(f·n)."""
    f = _fraction(x)
    if f is not None:
        if not 0 <= f <= 1:
            raise ValueError(f"fraction {x} outside [0, 1]")
        return min(n - 1, math.floor(f * n))  # 0.5 of 30 blocks = block 15; 1.0 = the last block
    i = int(x)
    return i + n if i < 0 else i


def _stop(x: str, n: int) -> int:
    """range's exclusive stop: a fraction gives floor(f·n) (1.0 = n, past the last block); an int
    is negative from the end."""
    if "." in x:  # as before: only a decimal point makes a stop a fraction
        return math.floor(Fraction(x) * n)
    i = int(float(x))
    return i + n if i < 0 else i


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Layer spec -> sorted block indices (DESIGN §3).

    `"10"`, `"-2"`, `"0.5"` (fraction of depth, floor(f·n) in exact arithmetic; differs: earlier
    code read 1.0 as block 1), `"0.25,0.5,0.75"`, `"range(0.3, 0.9, 2)"` / `"range(10, 20, 3)"`
    (start, stop, step)."""
    spec = str(spec).strip()
    out: list[int] = []
    try:
        for m in re.finditer(r"range\(([^)]*)\)|([^,\s]+)", spec):
            if m.group(1) is not None:
                args = [a.strip() for a in m.group(1).split(",")]
                if not 2 <= len(args) <= 3:
                    raise ValueError("range takes start, stop[, step]")
                a, b = _index(args[0], n_layers), _stop(args[1], n_layers)
                step = int(args[2]) if len(args) == 3 else 1
                out += list(range(a, b, step))
            else:
                out.append(_index(m.group(2), n_layers))
    except (ValueError, OverflowError) as e:  # OverflowError: a stop of "inf"
        raise ConfigError(f"method.layers {spec!r}: {e}. Use ints (negative from the end), fractions like 0.5, or range(a, b, step).") from e
    bad = [i for i in out if not 0 <= i < n_layers]
    if not out or bad:
        raise ConfigError(f"method.layers {spec!r} gives {out or 'no layers'}; the model has blocks 0..{n_layers - 1}.")
    return sorted(set(out))


@dataclass(frozen=True)
class CapturePoint:
    key: str  # "hs.12" or "side.12.mlp.down_proj.input"
    layer_idx: int
    module: nn.Module
    what: str  # "output" | "input"


def capture_points(model, *, collection: str, layers: list[int], modules: str = "") -> list[CapturePoint]:
    """Hook targets for a collection at the given blocks.

    side: `modules` is a comma list of `PATTERN:input|output` (regex on the module path inside
    the block, e.g. `mlp.down_proj:input,self_attn.o_proj:input`)."""
    blocks = decoder_layers(model)
    if collection == "hs":
        return [CapturePoint(f"hs.{i}", i, blocks[i], "output") for i in layers]
    COLLECTIONS.check(collection, where="method.collection")
    pats = []
    for item in filter(None, (s.strip() for s in modules.split(","))):
        pat, _, what = item.partition(":")
        what = what or "output"
        if what not in ("input", "output"):
            raise ConfigError(f"method.modules item {item!r}: suffix must be :input or :output.")
        pats.append((re.compile(rf"(?:.*\.)?(?:{pat})"), what))  # matches a path suffix
    if not pats:
        raise ConfigError("method.modules is empty: side channels need e.g. `mlp.down_proj:input`.")
    points = []
    for i in layers:
        for name, mod in blocks[i].named_modules():
            # match the adapted module itself, not PEFT's inner base_layer / lora_A / lora_B
            if not name or any(s in name.split(".") for s in ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B")):
                continue
            for pat, what in pats:
                if pat.fullmatch(name):
                    points.append(CapturePoint(f"side.{i}.{name}.{what}", i, mod, what))
    if not points:
        raise ConfigError(f"method.modules {modules!r} matches no submodule of blocks {layers}.")
    return points


@contextmanager
def capture(points: list[CapturePoint]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect each point's tensor (r, t, d) into the yielded dict during forwards inside the block.

    Keeps the graph (call under no_grad for the reference). Hooks are removed on exit, also on
    exceptions. Only forwards of the calling thread are collected: scoring workers share one
    model (eval/scoring.py), and each worker's hooks see every worker's forwards."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    owner = threading.get_ident()

    def make(p: CapturePoint):
        if p.what == "output":
            def hook(_m, _inp, out):
                if threading.get_ident() == owner:
                    store[p.key] = out[0] if isinstance(out, tuple) else out
            return p.module.register_forward_hook(hook)

        def pre(_m, args, kwargs):
            if threading.get_ident() == owner:
                store[p.key] = args[0] if args else next(iter(kwargs.values()))
        return p.module.register_forward_pre_hook(pre, with_kwargs=True)

    try:
        for p in points:
            handles.append(make(p))
        yield store
    finally:
        for h in handles:
            h.remove()


def pool_weights(h: torch.Tensor, *, response_mask: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean", outlier_quantile: float = 0.0) -> torch.Tensor:
    """Token weights (r, t) summing to 1 per row, read off the raw activations h (r, t, d).

    mean: response tokens (default); last: the last response token; all: every token the row
    sees. outlier_quantile q > 0 drops tokens whose norm exceeds the q-quantile of norms, the
    quantile computed over the row's valid tokens only."""
    if mode == "last":
        pos = torch.arange(h.shape[1], device=h.device)
        last = (response_mask * pos).argmax(1)  # (r,)
        m = torch.nn.functional.one_hot(last, h.shape[1]).float()
    elif mode in ("mean", "all"):
        m = (response_mask if mode == "mean" else attention_mask).float()  # (r, t)
        if outlier_quantile:  # per row, so a pair's pooling does not depend on its batch
            norms = h.detach().float().norm(dim=-1)  # (r, t)
            keep = torch.ones_like(m)
            for i in range(m.shape[0]):
                valid = norms[i][m[i] > 0]
                if valid.numel():
                    keep[i] = (norms[i] <= torch.quantile(valid, outlier_quantile)).float()
            m = m * keep
    else:
        raise ConfigError(f"method.pooling must be mean, last or all, got {mode!r}.")
    return m / m.sum(1, keepdim=True).clamp(min=1)


def pool(h: torch.Tensor, *, response_mask: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean", outlier_quantile: float = 0.0) -> torch.Tensor:
    """(r, t, d) -> (r, d): h̄ = Σ_t w_t H_t with `pool_weights`."""
    w = pool_weights(h, response_mask=response_mask, attention_mask=attention_mask, mode=mode, outlier_quantile=outlier_quantile)
    return torch.einsum("rt,rtd->rd", w.to(h.dtype), h)
