"""Representation adapters (`train.adapter loreft | vector`): a learned edit of block outputs at
chosen token positions, in place of LoRA's weight update.

    LoReFT(h) = h + Rᵀ(Wh + b − Rh)   R ∈ R^{r×d} orthonormal rows, W ∈ R^{r×d}, b ∈ R^r   (Wu et al. 2024, ReFT, eq. 2)
    vector(h) = h + s·v              v ∈ R^d, s = +1 (−1 inside a BiPO step)            (Cao et al. 2024, BiPO)

Where: the block outputs of `method.layers`, at the response tokens (both rows of a pair) and,
for loreft, the prompt's last `method.reft_prompt_last` tokens. Shapes: R input rows, t tokens, d hidden.
pyreft (0.1.0 on PyPI) is not installed and needs pyvene's IntervenableModel around the model, so
the intervention is written here: a forward hook on each chosen block of the plain transformers model.

The edits are a submodule of the causal LM (`reprpo_intervention`), the only parameters that
require grad, so the optimiser and checkpoints see them as they see LoRA's. Every forward runs
under a position context: `forward.run_decoder` sets the batch's (`at`; the batch-prefix pass
`skipped`), generation sets `generating`; a forward with the edit on and none set is an error,
never a silent base model. Contexts are per thread (scoring workers share one model and each sets
its own batch); `disabled` (the reference, adapter off) and `signed` are model-wide, like PEFT's
`disable_adapter`.
"""

from __future__ import annotations

import functools
import json
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from reprpo.data.tokenize import PairBatch
from reprpo.errors import ConfigError, ModelError
from reprpo.model.forward import INTERVENTION_ATTR, base_model

KINDS = ("loreft", "vector")
FILES = ("intervention.safetensors", "intervention_config.json")


class LoReFT(nn.Module):
    """LoReFT(h) = h + Rᵀ(Wh + b − Rh); `forward` returns the edit Rᵀ(Wh + b − Rh) in float32.
    Wu et al. 2024 (pyreft's LoreftIntervention). Differs: pyreft draws W at random; we start at
    W = R, b = 0, so the edit is exactly 0 at init (policy = reference, as LoRA's B = 0)."""

    def __init__(self, d: int, r: int):
        super().__init__()
        # weight R (r, d), orthonormal rows. matrix_exp, not torch's default for a non-square matrix
        # (householder): that one multiplies by int(diag(original)), which AdamW's weight decay takes
        # from 1 to 0.9995 -> 0, so R became 0 after one step (tests/test_adapters.py catches it)
        self.rot = nn.utils.parametrizations.orthogonal(nn.Linear(d, r, bias=False), orthogonal_map="matrix_exp")
        self.W = nn.Parameter(self.rot.weight.detach().clone())  # (r, d)
        self.b = nn.Parameter(torch.zeros(r))  # (r,)

    @property
    def R(self) -> torch.Tensor:
        return self.rot.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R, x = self.R, h.float()  # (r, d), (R, t, d)
        return (x @ self.W.T + self.b - x @ R.T) @ R  # (R, t, d)


class AddVector(nn.Module):
    """vector(h) = h + v; `forward` returns v (d,). BiPO (Cao et al. 2024): v starts at 0."""

    def __init__(self, d: int):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.v.float()


def response_rows(batch: PairBatch) -> torch.Tensor:
    """(R, t) 1 at every response token of the batch's input rows (chosen and rejected)."""
    m = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    m.index_put_((batch.rows,), batch.response_mask.float(), accumulate=True)
    return m.clamp_(max=1.0)


def response_starts(batch: PairBatch) -> torch.Tensor:
    """(R,) each input row's first response position (padded: its own response; packed: the
    chosen one, right after the shared prompt); t where a row has none (padding)."""
    r, t = batch.input_ids.shape
    resp = batch.response_mask.bool()  # (2b, t)
    first = torch.where(resp.any(1), resp.float().argmax(1), torch.full_like(resp[:, 0], t, dtype=torch.long))  # (2b,)
    return torch.full((r,), t, dtype=torch.long, device=resp.device).scatter_reduce(0, batch.rows, first, "amin")


def prompt_last_rows(batch: PairBatch, k: int) -> torch.Tensor:
    """(R, t) 1 at the k tokens before each input row's first response token."""
    start = response_starts(batch)[:, None]  # (R, 1)
    pos = torch.arange(batch.input_ids.shape[1], device=start.device)
    return ((pos >= start - k) & (pos < start)).float()


def position_mask(batch: PairBatch, *, prompt_last: int) -> torch.Tensor:
    """(R, t) where the edit acts: response tokens, plus the prompt's last `prompt_last` tokens."""
    m = response_rows(batch)
    return torch.maximum(m, prompt_last_rows(batch, prompt_last)) if prompt_last else m


class _Batch:
    """The positions of one batch's rows forward: a fixed (R, t) mask."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def mask_for(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        if h.shape[:2] != self.mask.shape:
            raise RuntimeError(f"reprpo intervention: a forward of shape {tuple(h.shape[:2])} under the positions of a batch "
                               f"{tuple(self.mask.shape)}; run each forward in its own interventions context.")
        return self.mask


class _Nowhere:
    """A forward the edit leaves alone (the batch-prefix pass: it holds no response token)."""

    def mask_for(self, layer: int, h: torch.Tensor) -> None:
        return None


class _Generation:
    """`generate`: positions from `prompt_len` on are response tokens, the k before it the prompt's
    last; the first call of each block is the prompt pass, a later 1-token call one new token."""

    def __init__(self, prompt_len: int, k: int):
        self.prompt_len, self.k, self.calls = prompt_len, k, {}

    def mask_for(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        first = layer not in self.calls
        self.calls[layer] = self.calls.get(layer, 0) + 1
        if h.shape[1] > 1 or first:  # the prompt pass (or a full recompute): absolute positions
            pos = torch.arange(h.shape[1], device=h.device)
            return (pos >= self.prompt_len - self.k).float().expand(h.shape[0], -1)
        return torch.ones(h.shape[:2], device=h.device)


class Interventions(nn.Module):
    """The edits of a run, one per block of `layers`, hooked on those blocks' outputs."""

    def __init__(self, *, kind: str, layers: list[int], d: int, rank: int, prompt_last: int):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"train.adapter must be one of lora, {', '.join(KINDS)}, got {kind!r}.")
        self.kind, self.layers, self.d, self.rank = kind, list(layers), d, rank
        self.prompt_last = prompt_last if kind == "loreft" else 0  # the vector acts at the response tokens only
        self.edits = nn.ModuleDict({str(i): LoReFT(d, rank) if kind == "loreft" else AddVector(d) for i in self.layers})
        self.sign = 1.0  # BiPO's d, set by `signed` for one step
        self._off = 0  # `disabled` depth
        self._where: dict[int, object] = {}  # thread id -> positions of its current forward
        self._handles: list = []

    def config(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "hidden_size": self.d, "rank": self.rank,
                "prompt_last": self.prompt_last, "format": 1}

    def install(self, blocks: nn.ModuleList) -> None:
        for i in self.layers:  # a partial of the bound method: deepcopy of the model copies it with the module
            self._handles.append(blocks[i].register_forward_hook(functools.partial(Interventions._hook, self, i)))

    def _hook(self, layer: int, _m, _inp, out):
        if self._off:
            return None
        h = out[0] if isinstance(out, tuple) else out  # (R, t, d)
        where = self._where.get(threading.get_ident())
        if where is None:
            raise RuntimeError("reprpo intervention: a forward with the representation adapter on but no token positions set "
                               "(run it through forward.run_decoder, or inside interventions.generating / at).")
        m = where.mask_for(layer, h)
        if m is None:
            return None
        edit = self.edits[str(layer)](h)
        h = h + (m[..., None].to(edit.device) * (self.sign * edit)).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    @contextmanager
    def _set(self, where):
        tid = threading.get_ident()
        old = self._where.get(tid)
        self._where[tid] = where
        try:
            yield
        finally:
            if old is None:
                self._where.pop(tid, None)
            else:
                self._where[tid] = old

    def at(self, batch: PairBatch):
        """This thread's forwards act at `batch`'s response tokens (+ the prompt's last k)."""
        if self.prompt_last and batch.prefix_len and int(response_starts(batch).min()) < self.prompt_last:
            raise ConfigError(f"train.adapter loreft edits the prompt's last {self.prompt_last} tokens, but the batch prefix "
                              "(speed.share_prefix) took some of them out of the rows. Turn it off (--speed.share_prefix false) "
                              "or lower --method.reft_prompt_last.")
        return self._set(_Batch(position_mask(batch, prompt_last=self.prompt_last)))

    def skipped(self):
        """This thread's forwards are left alone (the batch-prefix pass)."""
        return self._set(_Nowhere())

    def generating(self, prompt_len: int):
        """This thread's `generate` acts at the generated tokens (+ the prompt's last k)."""
        return self._set(_Generation(prompt_len, self.prompt_last))

    @contextmanager
    def disabled(self):
        """The base model (every thread): the edit is off inside the block, on again after."""
        self._off += 1
        try:
            yield
        finally:
            self._off -= 1

    @contextmanager
    def signed(self, d: float):
        """The edit times `d` (BiPO's random direction) inside the block."""
        old, self.sign = self.sign, float(d)
        try:
            yield
        finally:
            self.sign = old


def find(model) -> Interventions | None:
    """The model's representation adapter, or None (a LoRA run or the plain base)."""
    return getattr(base_model(model), INTERVENTION_ATTR, None)


def attach(model, *, kind: str, layers: list[int], rank: int = 4, prompt_last: int = 0):
    """Freeze `model` and hook a fresh (identity) adapter of `kind` on blocks `layers`; returns `model`."""
    from reprpo.model.capture import decoder_layers

    lm = base_model(model)
    if find(model) is not None:
        raise ModelError("the model already holds a representation adapter; load the base model again.")
    for p in lm.parameters():
        p.requires_grad_(False)
    d = lm.config.get_text_config(decoder=True).hidden_size
    blocks = decoder_layers(model)
    iv = Interventions(kind=kind, layers=layers, d=d, rank=rank, prompt_last=prompt_last)
    iv.to(next(lm.parameters()).device)
    setattr(lm, INTERVENTION_ATTR, iv)  # a submodule: named_parameters, .to() and checkpoints see it
    iv.install(blocks)
    return model


def from_config(model, cfg):
    """`attach` as a run config says (train.adapter, method.layers, method.reft_rank / reft_prompt_last)."""
    from reprpo.model.capture import decoder_layers, parse_layers

    if cfg.method.layers.strip() == "sae":
        raise ConfigError(f"train.adapter {cfg.train.adapter} edits the blocks of method.layers; 'sae' names no blocks. Give e.g. 0.5.")
    layers = parse_layers(cfg.method.layers, len(decoder_layers(model)))
    return attach(model, kind=cfg.train.adapter, layers=layers, rank=cfg.method.reft_rank, prompt_last=cfg.method.reft_prompt_last)


def save(model, out: str | Path) -> None:
    """OUT/intervention.safetensors (the adapter's state dict) + OUT/intervention_config.json."""
    from safetensors.torch import save_file

    iv = find(model)
    out = Path(out)
    save_file({k: v.detach().contiguous().cpu() for k, v in iv.state_dict().items()}, str(out / FILES[0]))
    (out / FILES[1]).write_text(json.dumps(iv.config(), indent=2) + "\n")


def is_saved(directory: str | Path) -> bool:
    return (Path(directory) / FILES[1]).is_file()


def load(model, directory: str | Path):
    """The adapter saved in `directory` attached to `model` (its base); returns `model`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        c = json.loads((directory / FILES[1]).read_text())
        state = load_file(str(directory / FILES[0]))
    except (OSError, ValueError) as e:
        raise ModelError(f"{directory}: the representation adapter is unreadable ({type(e).__name__}: {e}); train the run again.") from e
    d = base_model(model).config.get_text_config(decoder=True).hidden_size
    if c["hidden_size"] != d:
        raise ModelError(f"{directory}: the adapter was trained on a model of width {c['hidden_size']}, this base has {d}. "
                         "Load the base it was trained on (--model.name).")
    attach(model, kind=c["kind"], layers=c["layers"], rank=c["rank"], prompt_last=c["prompt_last"])
    find(model).load_state_dict(state)
    return model


def generating(model, prompt_len: int):
    """The context `generate` runs in (eval/coherence.py): a no-op without a representation adapter."""
    iv = find(model)
    return iv.generating(prompt_len) if iv is not None else nullcontext()


def signed(model, d: float):
    iv = find(model)
    if iv is None or iv.kind != "vector":
        raise ConfigError("method.bipo_flip flips the learned vector: it needs --train.adapter vector.")
    return iv.signed(d)


def sign_of(model) -> float:
    """The sign the adapter is applied with now (1.0 without an adapter)."""
    iv = find(model)
    return iv.sign if iv is not None else 1.0


def prefix_ok(model) -> bool:
    """A batch prefix is exact for the model's adapter: not when loreft edits prompt tokens."""
    iv = find(model)
    return iv is None or not iv.prompt_last
