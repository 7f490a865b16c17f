"""The forward path: one pass over [chosen; rejected], log-probs at response positions only.

Shapes: b pairs, r = 2b rows, t tokens, d hidden, v vocab, n selected response tokens.
Only this module (and, later, activation capture) knows how a causal LM is laid out.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from reprpo.data.tokenize import PairBatch
from reprpo.model import blocked_attention

INTERVENTION_ATTR = "reprpo_intervention"  # the causal LM's submodule holding a representation adapter (model/interventions.py)


@dataclass
class SeqLogps:
    """Per-row sums of response-token log-probs; rows [0, b) chosen, [b, 2b) rejected."""

    logp_sum: torch.Tensor  # (2b,)
    n_tokens: torch.Tensor  # (2b,)

    @property
    def logp_mean(self) -> torch.Tensor:
        return self.logp_sum / self.n_tokens.clamp(min=1)

    def chosen_rejected(self, *, mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.logp_mean if mean else self.logp_sum
        b = x.shape[0] // 2
        return x[:b], x[b:]


class Policy(torch.nn.Module):
    """The module the training loop hands to `accelerate.prepare`: its forward runs a function
    of the adapted model, so one whole loss (every decoder pass, captured activations, gradient
    hooks) is one call of the DDP / FSDP wrapper. That call is what arms DDP's gradient
    all-reduce and accelerate's autocast; a forward on `.module` or on a submodule skips both,
    and the replicas silently drift apart."""

    def __init__(self, model):
        super().__init__()
        self.module = model  # `module`: base_model and accelerate's unwrap_model look through it
        self._no_split_modules = getattr(base_model(model), "_no_split_modules", None)  # FSDP's auto-wrap: the decoder block class

    def forward(self, fn, *args, **kwargs):
        return fn(self.module, *args, **kwargs)


def through(model, fn, *args, **kwargs):
    """fn(adapted model, *args, **kwargs), run inside the prepared wrapper's forward when
    `model` is the loop's `Policy` (bare, or wrapped by DDP / FSDP), else called directly."""
    inner = model
    while not isinstance(inner, Policy) and hasattr(inner, "module"):
        inner = inner.module
    return model(fn, *args, **kwargs) if isinstance(inner, Policy) else fn(model, *args, **kwargs)


def base_model(model):
    """The transformers CausalLM inside a PEFT / accelerate wrapper (LoRA layers stay injected)."""
    m = model
    while hasattr(m, "module") and not hasattr(m, "get_decoder"):  # DDP
        m = m.module
    if hasattr(m, "get_base_model"):  # PeftModel
        m = m.get_base_model()
    return m


def decoder_and_head(model):
    """(decoder returning the final-normed hidden states, output head)."""
    lm = base_model(model)
    return lm.get_decoder(), lm.get_output_embeddings()


def token_logps(head, h: torch.Tensor, targets: torch.Tensor, *, chunk: int = 2048, softcap: float | None = None) -> torch.Tensor:
    """log softmax(head(h))[targets], computed `chunk` rows at a time (bounded logits memory).

    h: (n, d), targets: (n,) -> (n,) in float32."""
    out = []
    for i in range(0, h.shape[0], chunk):
        logits = head(h[i : i + chunk]).float()  # (c, v)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        tgt = targets[i : i + chunk]
        out.append(logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1))
    if not out:
        return h.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def model_inputs(batch: PairBatch, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Decoder keyword arguments for either layout (packed: additive 4D mask, positions).

    With a batch prefix of h tokens the mask is (R, 1, t, h + t): every row sees the prefix."""
    if not batch.packed:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    neg = torch.finfo(dtype).min
    r, t, _ = batch.allow.shape
    allow = batch.allow
    if batch.prefix_len:
        allow = torch.cat([allow.new_ones(r, t, batch.prefix_len), allow], dim=2)
    mask = torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill(~allow, neg)
    return {"input_ids": batch.input_ids, "attention_mask": mask[:, None], "position_ids": batch.position_ids}


def prefix_supported(model) -> bool:
    """A batch prefix needs a plain KV cache: no sliding-window or hybrid attention layers."""
    cfg = base_model(model).config.get_text_config(decoder=True)
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return not getattr(cfg, "sliding_window", None) and types == {"full_attention"}


@functools.cache
def _cache_arg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_arg(decoder) -> str:
    """The decoder's KV-cache keyword (and output field): `cache` where transformers has it (5.x,
    which deprecates `past_key_values` with a FutureWarning on every call), else `past_key_values`."""
    return _cache_arg_of(type(decoder))


PREFIX_STORE_SIZE = 4  # prefix encodings a no-grad scoring pass keeps (see prefix_kv)


def prefix_kv(decoder, prefix_ids: torch.Tensor, *, store: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of the batch prefix, each (1, kv_heads, h, head_dim).

    `store` (no-grad scoring only) keeps them across batches that share the same prefix: up to
    `PREFIX_STORE_SIZE` prefixes, the least reused dropped first (a set's template header is
    reused by most batches; a batch's own prefix, e.g. of left-cut prompts, rarely)."""
    key = tuple(prefix_ids.tolist()) if store is not None else None
    if key is not None and key in store:
        store[key][1] += 1
        return store[key][0]
    out = decoder(input_ids=prefix_ids[None], use_cache=True)
    cache = out.cache if cache_arg(decoder) == "cache" else out.past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    if key is not None:
        if len(store) >= PREFIX_STORE_SIZE:
            del store[min(store, key=lambda k: store[k][1])]
        store[key] = [kv, 0]  # [keys/values, times reused]
    return kv


@contextmanager
def attention_impl(model, impl: str):
    """Temporarily switch the attention kernel (transformers reads it at every forward)."""
    cfg = base_model(model).config
    old = cfg._attn_implementation
    set_attention(model, impl)
    try:
        yield
    finally:
        cfg._attn_implementation = old


def set_attention(model, impl: str) -> None:
    """Set the attention kernel until changed: eager | sdpa | blocks (`keep`: leave it)."""
    cfg = base_model(model).config
    if impl == "blocks":
        impl = blocked_attention.NAME if blocked_attention.REGISTERED else "sdpa"
    if impl in ("eager", "sdpa", blocked_attention.NAME) and impl != cfg._attn_implementation:
        cfg._attn_implementation = impl


def run_decoder(model, batch: PairBatch, *, prefix_store: dict | None = None) -> torch.Tensor:
    """Final-normed hidden states (R, t, d) of the batch's input rows.

    The shared-prompt layout needs a 4D mask; on CPU, sdpa's backward with an arbitrary float
    mask measured 17% slower than eager attention on W1 (bench/phases.py), while for scoring
    (no graph) sdpa was 1.45x faster than eager: see `model.layout.resolve_packed_attention`.
    A batch prefix is encoded first, once, and its keys/values are given to every row as a
    KV cache (gradients flow back into it); hooks that capture block outputs see the rows last."""
    from transformers import DynamicCache

    decoder, _ = decoder_and_head(model)
    p = next(decoder.parameters())
    iv = getattr(base_model(model), INTERVENTION_ATTR, None)  # a representation adapter acts at this batch's positions
    with attention_impl(model, batch.attention if batch.packed else "keep"):  # the layout's kernel (model/layout.py)
        kw = model_inputs(batch, dtype=p.dtype)
        if batch.prefix_len:
            r = batch.input_ids.shape[0]
            with iv.skipped() if iv is not None else nullcontext():  # the prefix holds no response token
                kv = prefix_kv(decoder, batch.prefix_ids, store=None if torch.is_grad_enabled() else prefix_store)
            kw |= {cache_arg(decoder): DynamicCache([(k.expand(r, -1, -1, -1), v.expand(r, -1, -1, -1)) for k, v in kv]),
                   "use_cache": True}
        with iv.at(batch) if iv is not None else nullcontext():
            return decoder(**kw).last_hidden_state


def response_states(model, batch: PairBatch, *, prefix_store: dict | None = None):
    """Hidden states that predict each response token: (h (n, d), out_row (n,), targets (n,)).

    n = response tokens over all output rows, in `response_mask.nonzero()` order."""
    hidden = run_decoder(model, batch, prefix_store=prefix_store)  # (R, t, d)
    out_row, pos = batch.response_mask.bool().nonzero(as_tuple=True)  # (n,), (n,)
    in_row = batch.rows[out_row]
    return hidden[in_row, batch.pred_pos[in_row, pos]], out_row, batch.input_ids[in_row, pos]


def softcap_of(model) -> float | None:
    return getattr(base_model(model).config, "final_logit_softcapping", None)


def row_sums(values: torch.Tensor, out_row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Σ over each output row's tokens: values (n,) -> (n_rows,)."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, out_row, values)


def sequence_logps(model, batch: PairBatch, *, chunk: int = 2048, full_logits: bool = False, prefix_store: dict | None = None) -> SeqLogps:
    """ℓ(y|x) = Σ_{t∈response} log π(y_t | x, y_<t) for every output row of the batch.

    Runs the decoder once over the input rows and applies the output head only at the
    positions that predict a response token. `full_logits=True` computes the head at every
    position first (the plain way; for checking and for like-for-like benchmarks)."""
    _, head = decoder_and_head(model)
    hidden = run_decoder(model, batch, prefix_store=prefix_store)  # (R, t, d)
    out_row, pos = batch.response_mask.bool().nonzero(as_tuple=True)  # (n,), (n,)
    in_row = batch.rows[out_row]
    pred = batch.pred_pos[in_row, pos]  # (n,)
    targets = batch.input_ids[in_row, pos]  # (n,)
    softcap = softcap_of(model)
    if full_logits:
        logits = head(hidden).float()  # (R, t, v)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logp_all = torch.log_softmax(logits, dim=-1)
        lp = logp_all[in_row, pred, targets]
    elif batch.packed and batch.n_shared_response:  # a response token both rows share (speed.share_response) gets the head once
        uniq, inv = torch.unique(in_row * batch.input_ids.shape[1] + pos, return_inverse=True)  # (u,), (n,)
        first = torch.zeros_like(uniq).scatter_(0, inv, torch.arange(inv.shape[0], device=inv.device))  # one n-index per u
        lp = token_logps(head, hidden[in_row[first], pred[first]], targets[first], chunk=chunk, softcap=softcap)[inv]
    else:
        lp = token_logps(head, hidden[in_row, pred], targets, chunk=chunk, softcap=softcap)  # (n,)
    return SeqLogps(logp_sum=row_sums(lp, out_row, batch.response_mask.shape[0]), n_tokens=batch.response_mask.sum(1))


@contextmanager
def adapter_disabled(model):
    """Run the base model: the PEFT adapter (or a representation adapter) is off inside the block,
    back on after (also on error)."""
    iv = getattr(base_model(model), INTERVENTION_ATTR, None)
    if iv is not None:
        with iv.disabled():
            yield
        return
    peft = model
    while hasattr(peft, "module") and not hasattr(peft, "disable_adapter"):
        peft = peft.module
    if not hasattr(peft, "disable_adapter"):  # a plain model has no adapter to disable
        yield
        return
    with peft.disable_adapter():
        yield


def model_fingerprint(model) -> str:
    """Hash of the base weights (LoRA tensors and a representation adapter excluded: the reference
    runs with the adapter off)."""
    lm = base_model(model)
    cached = getattr(lm, "_reprpo_fingerprint", None)
    if cached:
        return cached
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(lm.state_dict().items()):
        if "lora_" in name or name.startswith(INTERVENTION_ATTR + "."):
            continue
        h.update(name.replace("base_layer.", "").encode())
        h.update(str((tuple(p.shape), p.dtype)).encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    lm._reprpo_fingerprint = h.hexdigest()
    return lm._reprpo_fingerprint
