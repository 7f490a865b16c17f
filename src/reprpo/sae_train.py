"""`reprpo sae train`: a TopK SAE on the residual stream at one block, from preference data.

Activations are streamed: pairs are run through the model up to the block (the forward stops
there), the valid tokens of a batch go into a buffer of `buffer_tokens`, which is shuffled and
cut into optimiser batches, so memory is bounded whatever the budget. Tokens: the prompt and
chosen response of each pair and the rejected response (the prompt once), position 0 left out
(the first token's state is an outlier of large norm that no SAE is asked to reconstruct, as in
sparsify). Every 20th pair is held out for the quality numbers.

Why our own trainer (not EleutherAI sparsify, which installs with our pins and works on CPU):
its AuxK term reaches only the decoder (the fused encoder's backward drops the pre-activation
gradient), so it cannot revive a dead latent's encoder; we keep its file layout (model/sae.py).

Quality, on held-out tokens: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², mean L0 (active latents per
token), dead fraction (latents that fired on none of the last `dead_tokens` training tokens),
and ΔCE = CE(next token | block output replaced by its reconstruction) − CE(clean).
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from reprpo.config import SAETrainConfig
from reprpo.data.tokenize import collate_pairs
from reprpo.errors import ConfigError, DataError
from reprpo.model.capture import decoder_layers, parse_layers
from reprpo.model.forward import base_model, decoder_and_head, token_logps
from reprpo.model.sae import TopKSAE
from reprpo.progress import bar, write


@dataclass
class FitStats:
    steps: int = 0
    tokens: int = 0
    fvu: float = float("nan")  # of the last optimiser batch
    aux: float = 0.0
    dead_fraction: float = 0.0
    history: list[dict] = field(default_factory=list)


def init_b_dec(sae: TopKSAE, x: torch.Tensor) -> None:
    """b_dec ← the mean of the first activations (sparsify's choice; Gao et al. use the geometric median)."""
    with torch.no_grad():
        sae.b_dec.copy_(x.float().mean(0))


def sae_step(sae: TopKSAE, x: torch.Tensor, *, dead: torch.Tensor | None, aux_k: int, aux_alpha: float) -> tuple[torch.Tensor, dict]:
    """One batch's loss: FVU + α·AuxK.

    FVU = ‖x − x̂‖² / ‖x − x̄‖² over the batch (n, d); AuxK = ‖e − ê‖² / ‖x − x̄‖², e = x − x̂
    (no gradient), ê = W_dec TopK_{k_aux}(pre-activations of the dead latents) (Gao et al. 2024,
    A.2). Returns (loss, {fvu, aux, indices (n, k) of the fired latents, fired (n, k) bool})."""
    x = x.float()
    pre = sae.pre_acts(x)  # (n, w)
    vals, idx = pre.topk(sae.k, dim=-1, sorted=False)
    vals = F.relu(vals)
    x_hat = sae.decode_sparse(vals, idx)
    e = x - x_hat
    var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    fvu = e.pow(2).sum() / var
    loss = fvu
    aux = x.new_zeros(())
    if dead is not None and aux_alpha > 0 and (n_dead := int(dead.sum())) > 0:
        ka = min(aux_k, n_dead)
        av, ai = pre.masked_fill(~dead, -torch.inf).topk(ka, dim=-1, sorted=False)
        e_hat = F.embedding_bag(ai, sae.W_dec, per_sample_weights=F.relu(av), mode="sum")  # residual: no b_dec
        aux = (e_hat - e.detach()).pow(2).sum() / var
        loss = loss + aux_alpha * aux
    return loss, {"fvu": fvu.detach(), "aux": aux.detach(), "indices": idx, "fired": vals > 0}


def fit_sae(sae: TopKSAE, batches: Iterable[torch.Tensor], *, lr: float, aux_k: int, aux_alpha: float, dead_tokens: int,
            clip: float = 1.0, total_tokens: int | None = None, progress: bool = True, log_every: int = 0) -> FitStats:
    """Train `sae` on activation batches (n, d) with Adam, gradient clipping, the decoder-parallel
    gradient removed and decoder rows renormalised after each step (Gao et al.). b_dec is set
    from the first batch. Stops when `batches` ends or `total_tokens` are used."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    last_fired = torch.zeros(sae.width, dtype=torch.long)  # token count when each latent last fired
    st = FitStats()
    with bar(total=total_tokens, desc="sae train", unit="tok", enabled=progress) as pbar:
        for x in batches:
            if st.steps == 0:
                init_b_dec(sae, x)
            dead = (st.tokens - last_fired) >= dead_tokens
            loss, m = sae_step(sae, x, dead=dead.to(x.device), aux_k=aux_k, aux_alpha=aux_alpha)
            if not torch.isfinite(loss):
                raise ConfigError(f"sae train: the loss became {float(loss)} at step {st.steps + 1}; lower --lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():  # remove the gradient component parallel to each decoder row
                g, w = sae.W_dec.grad, sae.W_dec
                g.sub_((g * w).sum(-1, keepdim=True) * w)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
            opt.step()
            sae.normalize_decoder()
            st.tokens += x.shape[0]
            st.steps += 1
            fired = m["indices"][m["fired"]].unique().cpu()
            last_fired[fired] = st.tokens
            st.fvu, st.aux = float(m["fvu"]), float(m["aux"])
            st.dead_fraction = float(((st.tokens - last_fired) >= dead_tokens).float().mean()) if st.tokens >= dead_tokens else 0.0
            if log_every and st.steps % log_every == 0:
                st.history.append({"step": st.steps, "tokens": st.tokens, "fvu": st.fvu, "aux": st.aux, "dead": st.dead_fraction})
            pbar.update(x.shape[0])
            if total_tokens is not None and st.tokens >= total_tokens:
                break
    return st


# -- activations from a model ----------------------------------------------------------------
class _Stop(Exception):
    """Raised by the capture hook: nothing after the SAE's block is needed."""


def _rows(pairs, pad_id: int):
    """`collate_pairs`' padded rows [prompt + chosen; prompt + rejected] and the mask of tokens to
    keep: chosen rows every real position ≥ 1, rejected rows their response only (a prompt counts once)."""
    batch = collate_pairs(pairs, pad_id=pad_id)
    b = batch.n_pairs
    keep = batch.response_mask.bool().clone()
    keep[:b] = batch.attention_mask[:b].bool()
    keep[:, 0] = False
    return batch.input_ids, batch.attention_mask, keep


@torch.no_grad()
def block_activations(model, pairs, *, layer: int, pad_id: int, batch_size: int = 8) -> Iterator[torch.Tensor]:
    """Yield the block output at `layer` of the kept tokens, (n, d) float32 per forward batch."""
    lm = base_model(model)
    block = decoder_layers(model)[layer]
    device = next(model.parameters()).device
    store = {}

    def hook(_m, _inp, out):
        store["h"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        for s in range(0, len(pairs), batch_size):
            ids, attn, keep = _rows(pairs[s : s + batch_size], pad_id)
            try:
                lm(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
            except _Stop:
                pass
            yield store.pop("h")[keep.to(device)].float()
    finally:
        handle.remove()


def shuffled_batches(stream: Iterable[torch.Tensor], *, batch_tokens: int, buffer_tokens: int, seed: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of (n_i, d) into shuffled batches of `batch_tokens`, `buffer_tokens` at a time."""
    g = torch.Generator().manual_seed(seed)
    buf, n = [], 0

    def drain():
        x = torch.cat(buf)
        x = x[torch.randperm(x.shape[0], generator=g)]
        full = (x.shape[0] // batch_tokens) * batch_tokens
        for i in range(0, full, batch_tokens):
            yield x[i : i + batch_tokens]
        return x[full:]

    for a in stream:
        buf.append(a)
        n += a.shape[0]
        if n >= buffer_tokens:
            rest = yield from drain()
            buf, n = [rest], rest.shape[0]
    if n:
        rest = yield from drain()
        if rest.shape[0] >= max(1, batch_tokens // 4):  # a last short batch, if not tiny
            yield rest


@torch.no_grad()
def sae_quality(model, sae: TopKSAE, pairs, *, layer: int, pad_id: int, batch_size: int = 8, max_tokens: int = 20000) -> dict:
    """FVU, mean L0 and ΔCE on held-out pairs (the kept tokens of `_rows`, up to `max_tokens`).

    ΔCE: the block output at kept positions is replaced by x̂ and the next-token cross-entropy
    over the kept positions' predictions is compared with the clean one."""
    dec, head = decoder_and_head(model)
    block = decoder_layers(model)[layer]
    device = next(model.parameters()).device
    sse = sst = 0.0
    s1 = torch.zeros(sae.d, dtype=torch.float64)
    n_tok = l0 = 0
    ce = {"clean": 0.0, "sae": 0.0}
    n_ce = 0
    xs = []
    state = {"replace": False, "keep": None}

    def hook(_m, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        if not state["replace"]:
            xs.append(h[state["keep"]].float())
            return None
        h = h.clone()
        h[state["keep"]] = sae.reconstruct(h[state["keep"]].float()).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = block.register_forward_hook(hook)
    try:
        for s in range(0, len(pairs), batch_size):
            if n_tok >= max_tokens:
                break
            ids, attn, keep = _rows(pairs[s : s + batch_size], pad_id)
            ids, attn, keep = ids.to(device), attn.to(device), keep.to(device)
            # predictions made at kept positions of the next token, where that token is real
            tgt = ids[:, 1:]
            pred = keep[:, :-1] & attn[:, 1:].bool()
            for mode in ("clean", "sae"):
                state["replace"], state["keep"] = mode == "sae", keep
                hs = dec(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state  # final-normed
                ce[mode] -= float(token_logps(head, hs[:, :-1][pred], tgt[pred]).sum())  # the head at predicted positions only
            n_ce += int(pred.sum())
            x = xs.pop()
            xs.clear()
            vals, idx = sae.topk(x)
            x_hat = sae.decode_sparse(vals, idx)
            sse += float((x - x_hat).pow(2).sum())
            sst += float(x.pow(2).sum())
            s1 += x.double().sum(0).cpu()
            l0 += int((vals > 0).sum())
            n_tok += x.shape[0]
    finally:
        handle.remove()
    if not n_tok:
        raise DataError("sae train: no held-out tokens to measure the SAE on (more data, or a smaller --eval-tokens).")
    var = sst - float((s1 * s1).sum()) / n_tok  # Σ‖x − x̄‖²
    return {"fvu": sse / max(var, 1e-12), "l0": l0 / n_tok, "ce_clean": ce["clean"] / n_ce, "ce_sae": ce["sae"] / n_ce,
            "delta_ce": (ce["sae"] - ce["clean"]) / n_ce, "eval_tokens": n_tok}


def expand_sources(spec: str) -> list[str]:
    """A comma list of sources; an item with * or ? is a glob (sorted; an empty match is an error)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise DataError(f"sae train --data {item}: the pattern matches no file.")
            out += found
        else:
            out.append(item)
    return out


def train_sae(model_cfg, data_cfg, sc: SAETrainConfig, *, out: str, sources: str = "") -> dict:
    """Load the model, read the sources (default: the shift's training split, plus the built-in
    suite's training splits when that holds fewer tokens than the budget), train, measure, save."""
    from pathlib import Path

    from reprpo.data.builtin import DISTRIBUTIONS
    from reprpo.data.prepare import prepare
    from reprpo.data.shifts import check_sources, sources_of
    from reprpo.model.loading import load_model

    sc.check()
    outp = Path(out)
    if outp.exists() and not outp.is_dir():
        raise ConfigError(f"sae train --out {out}: is a file; give a directory.")
    if outp.is_dir() and any(outp.iterdir()) and not (outp / "cfg.json").is_file():
        raise ConfigError(f"sae train --out {out}: a non-empty directory that holds no SAE; nothing in it is touched. Choose another --out.")
    srcs = expand_sources(sources) if sources else [sources_of(data_cfg)[0]]
    for s in srcs:
        check_sources("", s, {"_": s})
    model, tok = load_model(model_cfg)
    model.eval()
    n_layers = len(decoder_layers(model))
    got = parse_layers(sc.layers, n_layers)
    if len(got) != 1:
        raise ConfigError(f"sae train --layers {sc.layers!r} gives blocks {got}: an SAE reads one block.")
    layer = got[0]
    d = base_model(model).config.hidden_size
    sc = sc.resolved(d)

    def read(src_list):
        pairs, seen = [], []
        for s in src_list:
            prep = prepare(s, tok, data_cfg, limit=data_cfg.n_train if not sources else 0)
            pairs += prep.tokenized
            seen.append({"source": s, "pairs": len(prep.tokenized)})
        return pairs, seen

    pairs, seen = read(srcs)
    n_tokens = lambda ps: sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) - 1 for p in ps)
    if not sources and n_tokens(pairs) < sc.tokens:  # too small: add the built-in suite's training splits
        more, more_seen = read([f"builtin:{name}/train" for name in DISTRIBUTIONS if f"builtin:{name}/train" not in srcs])
        pairs += more
        seen += more_seen
        write(f"sae train: the training split holds fewer tokens than --tokens {sc.tokens}; added the built-in suite's training splits")
    held = pairs[::20]
    train_pairs = [p for i, p in enumerate(pairs) if i % 20]
    per_epoch = n_tokens(train_pairs)
    if not train_pairs or not held:
        raise DataError(f"sae train: {len(pairs)} pairs are too few (every 20th is held out); give more data.")
    epochs = max(1, math.ceil(sc.tokens / max(per_epoch, 1)))
    write(f"sae train: block {layer}, d={d}, width={sc.expansion * d}, k={sc.k}, lr={sc.lr:.3g}; {len(train_pairs)} pairs "
          f"(~{per_epoch} tokens) x {epochs} epoch(s) for a budget of {sc.tokens} tokens; {len(held)} pairs held out")
    torch.manual_seed(sc.seed)
    sae = TopKSAE(d=d, width=sc.expansion * d, k=sc.k, layer=layer, seed=sc.seed).to(next(model.parameters()).device)

    def stream():
        g = torch.Generator().manual_seed(sc.seed)
        chunk = 64 * sc.forward_batch  # pairs sorted by length within chunks of a random order: less padding
        for _ in range(epochs):
            order = torch.randperm(len(train_pairs), generator=g).tolist()
            order = [i for c in range(0, len(order), chunk) for i in sorted(order[c : c + chunk], key=lambda i: train_pairs[i].length)]
            yield from block_activations(model, [train_pairs[i] for i in order], layer=layer, pad_id=tok.pad_token_id,
                                         batch_size=sc.forward_batch)

    t0 = time.time()
    st = fit_sae(sae, shuffled_batches(stream(), batch_tokens=sc.batch_tokens, buffer_tokens=sc.buffer_tokens, seed=sc.seed),
                 lr=sc.lr, aux_k=sc.aux_k, aux_alpha=sc.aux_alpha, dead_tokens=sc.dead_tokens, clip=sc.clip,
                 total_tokens=sc.tokens, progress=sc.progress, log_every=max(1, (sc.tokens // sc.batch_tokens) // 20))
    train_s = time.time() - t0
    q = sae_quality(model, sae, held, layer=layer, pad_id=tok.pad_token_id, batch_size=sc.forward_batch, max_tokens=sc.eval_tokens)
    quality = {**q, "dead_fraction": st.dead_fraction, "dead_window_tokens": sc.dead_tokens}
    rec = {"model": model_cfg.name, "layer": layer, "d": d, "width": sae.width, "k": sae.k, "tokens": st.tokens, "steps": st.steps,
           "train_seconds": round(train_s, 1), "data": seen, "held_out_pairs": len(held), "options": asdict(sc),
           "quality": quality, "history": st.history,
           "data_settings": {k: getattr(data_cfg, k) for k in ("max_length", "max_prompt_length", "chat_template")}}
    sae.save(outp, reprpo=rec)
    return rec
