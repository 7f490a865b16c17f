"""Offline reference: ℓ_ref (and pooled reference activations) computed once, cached on disk.

Keyed by a fingerprint of the base weights, the tokenised pairs, the layout and the capture
spec. A cache file whose fingerprint does not match is recomputed, never reused. Training
then runs no reference forward, and evaluation reads base scores from the same cache.
Pooled activations are stored *before* any transform: methods whose transform is linear apply
it to the pooled vector (T(Σ w h) = Σ w T(h)); the others compute the reference online.
SAE methods (fpo, hs-sae-*) store the pooled SAE features f̄ of the reference at the SAE's
block, sparse (the non-zero entries of each row: indices and values, padded to the longest
row), keyed by the SAE's fingerprint as well.
Gradient methods (projgrad, projbp) store their per-pair reference directions u_b at every
LoRA-wrapped module (Σ d_out floats per pair: about 0.6 MB for SmolLM2-135M); the file is
memory-mapped on load, so a large set costs disk, not RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from reprpo.data.layout import PADDED, Layout
from reprpo.data.tokenize import PairBatch, TokenizedPair
from reprpo.model.capture import CapturePoint, capture, pool, pool_weights
from reprpo.model.forward import (  # noqa: F401 (model_fingerprint: re-exported)
    SeqLogps,
    adapter_disabled,
    model_fingerprint,
    sequence_logps,
)
from reprpo.progress import bar


def directions_from_pooled(p: torch.Tensor) -> torch.Tensor:
    """(2b, o) pooled [chosen; rejected] -> u_b = normalise(p⁺ − p⁻), (b, o); 0 where p⁺ = p⁻."""
    b = p.shape[0] // 2
    return F.normalize(p[:b] - p[b:], dim=-1)


@dataclass
class RefOut:
    """Reference quantities for one batch: log-probs (2b,), pooled activations (2b, d),
    gradient-method directions (b, o) and pooled SAE features (2b, w) (dense)."""

    logps: SeqLogps
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    dirs: dict[str, torch.Tensor] = field(default_factory=dict)
    feats: torch.Tensor | None = None


def sparse_rows(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, w) -> (indices (r, M) int32, values (r, M)): each row's non-zero entries, M the most
    in any row, padded with index 0 and value 0 (a padded entry adds nothing when densified)."""
    nnz = (f != 0).sum(1)
    m = max(1, int(nnz.max())) if f.shape[0] else 1
    vals, idx = f.abs().topk(m, dim=1)  # every non-zero entry of a row is among its m largest
    vals = f.gather(1, idx)
    keep = torch.arange(m)[None, :] < nnz[:, None]
    return torch.where(keep, idx, 0).int(), torch.where(keep, vals, 0.0)


def dense_rows(idx: torch.Tensor, vals: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `sparse_rows`: (r, M), (r, M) -> (r, w)."""
    return torch.zeros(idx.shape[0], width, dtype=vals.dtype).scatter_add(1, idx.long(), vals)


@dataclass
class RefCache:
    fingerprint: str
    pair_index: torch.Tensor  # (n,) TokenizedPair.index of each cached pair
    logp_sum: torch.Tensor  # (n, 2) chosen, rejected
    n_tokens: torch.Tensor  # (n, 2)
    acts: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> (n, 2, d)
    dirs: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA module name -> u (n, o)
    feats: dict[str, torch.Tensor] = field(default_factory=dict)  # SAE features: idx, val (n, 2, M); width (1,)
    _row: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._row = {int(i): r for r, i in enumerate(self.pair_index.tolist())}

    def lookup(self, batch: PairBatch) -> RefOut:
        rows = torch.tensor([self._row[int(i)] for i in batch.index.tolist()])
        dev = batch.input_ids.device
        two = lambda x: torch.cat([x[rows, 0], x[rows, 1]]).to(dev)  # (2b, ...) chosen then rejected
        feats = None
        if self.feats:
            feats = dense_rows(torch.cat([self.feats["idx"][rows, 0], self.feats["idx"][rows, 1]]),
                               torch.cat([self.feats["val"][rows, 0], self.feats["val"][rows, 1]]), int(self.feats["width"])).to(dev)
        return RefOut(SeqLogps(two(self.logp_sum), two(self.n_tokens)), {k: two(v) for k, v in self.acts.items()},
                      {k: v[rows].to(dev) for k, v in self.dirs.items()}, feats)

    def features(self) -> torch.Tensor:
        """Every cached pair's pooled reference SAE features, dense: (n, 2, w)."""
        n, _, m = self.feats["idx"].shape
        f = dense_rows(self.feats["idx"].reshape(n * 2, m), self.feats["val"].reshape(n * 2, m), int(self.feats["width"]))
        return f.view(n, 2, -1)


def data_fingerprint(pairs: list[TokenizedPair]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in pairs:
        h.update(json.dumps([p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()


def content_digest(d: dict) -> str:
    """blake2b over every tensor of a cache file: the file is read through mmap, which checks
    no CRC, so a flipped byte would otherwise be read as a reference value."""
    h = hashlib.blake2b(digest_size=16)
    tensors = [("pair_index", d["pair_index"]), ("logp_sum", d["logp_sum"]), ("n_tokens", d["n_tokens"])]
    tensors += [(f"acts/{k}", v) for k, v in sorted(d["acts"].items())] + [(f"dirs/{k}", v) for k, v in sorted(d.get("dirs", {}).items())]
    tensors += [(f"feats/{k}", v) for k, v in sorted(d.get("feats", {}).items())]
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_root() -> Path:
    from reprpo.model.loading import cache_dir

    return cache_dir() / "ref"


@torch.no_grad()
def build_ref_cache(
    model,
    pairs: list[TokenizedPair],
    *,
    pad_id: int,
    layout: Layout = PADDED,
    batch_size: int = 8,
    points: list[CapturePoint] | None = None,
    pooling: str = "mean",
    outlier_quantile: float = 0.0,
    chunk: int = 2048,
    use_disk: bool = True,
    directions: dict[str, torch.nn.Module] | None = None,
    features: tuple[CapturePoint, torch.nn.Module] | None = None,
    progress: bool = True,
    desc: str = "reference cache",
) -> RefCache:
    """Reference log-probs (and pooled activations at `points`, and projgrad/projbp directions
    at the `directions` modules, name -> LoRA-wrapped module, and the pooled features of the SAE
    `features` = (point, SAE) at its block) of every pair, from disk when a
    cache with the same fingerprint exists, else computed (adapter off) and saved. `layout` is
    the training (or scoring) batches' layout, so the cached numerics are the policy's at init.
    A bar `desc` counts the pairs while they are computed (`progress=False`: none)."""
    points = points or []
    directions = directions or {}
    dir_points = [CapturePoint(f"dir.{n}", -1, m, "output") for n, m in sorted(directions.items())]
    feat_point, sae = features if features is not None else (None, None)
    feat_points = [CapturePoint("feat." + feat_point.key, feat_point.layer_idx, feat_point.module, feat_point.what)] if sae is not None else []
    layout = layout.for_pairs(pairs)
    spec = {"model": model_fingerprint(model), "data": data_fingerprint(pairs), **layout.fingerprint(), "points": [p.key for p in points], "pooling": pooling, "outlier_quantile": outlier_quantile,
            "directions": sorted(directions)}
    if sae is not None:  # older caches (no SAE) keep their fingerprint
        spec["sae"] = {"point": feat_point.key, "fingerprint": sae.fingerprint()}
    dev = next(model.parameters()).device.type
    if torch.is_autocast_enabled(dev):  # train.mixed_precision: the policy at init is computed so too
        spec["autocast"] = str(torch.get_autocast_dtype(dev))
    fp = hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = cache_root() / f"{fp}.pt"
    if use_disk and path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if d.get("fingerprint") == fp and d["pair_index"].tolist() == [p.index for p in pairs]:
                if d.get("digest") == content_digest(d):
                    return RefCache(fp, d["pair_index"], d["logp_sum"], d["n_tokens"], d["acts"], d.get("dirs", {}), d.get("feats", {}))
                why = "corrupt (content digest mismatch)" if "digest" in d else "without a content digest (an older reprpo's)"
                print(f"reprpo: reference cache {path} is {why}; recomputing it", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - a broken cache file is recomputed
            print(f"reprpo: reference cache {path} is unreadable ({type(e).__name__}); recomputing it", file=sys.stderr)
    device = next(model.parameters()).device
    n = len(pairs)
    logp = torch.zeros(n, 2)
    ntok = torch.zeros(n, 2, dtype=torch.long)
    acts: dict[str, torch.Tensor] = {}
    dirs: dict[str, torch.Tensor] = {}
    feat_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch: sparse (2b, M_batch) idx, val
    prefix_store: dict = {}  # a template header shared by the batches is encoded once
    was_training = model.training
    model.eval()
    try:
        with bar(total=n, desc=desc, unit="pair", enabled=progress) as pbar:
            for s in range(0, n, batch_size):
                chunk_pairs = pairs[s : s + batch_size]
                batch = layout.collate(chunk_pairs, pad_id=pad_id).to(device)
                b = len(chunk_pairs)
                with adapter_disabled(model), capture(points + dir_points + feat_points) as store:  # with a batch prefix, the rows' call comes last
                    lp = sequence_logps(model, batch, chunk=chunk, prefix_store=prefix_store)
                logp[s : s + b] = torch.stack(lp.chosen_rejected(), 1).float().cpu()
                ntok[s : s + b] = torch.stack([lp.n_tokens[:b], lp.n_tokens[b:]], 1).cpu()
                for p in points:
                    h = pool(store[p.key].float()[batch.rows], response_mask=batch.response_mask,
                             attention_mask=batch.pool_mask, mode=pooling, outlier_quantile=outlier_quantile)  # (2b, d)
                    if p.key not in acts:
                        acts[p.key] = torch.zeros(n, 2, h.shape[-1])
                    acts[p.key][s : s + b] = torch.stack([h[:b], h[b:]], 1).cpu()
                for p in dir_points:
                    u = directions_from_pooled(pool(store[p.key].float()[batch.rows], response_mask=batch.response_mask,
                                                    attention_mask=batch.pool_mask))  # (b, o): response means, chosen − rejected
                    name = p.key[len("dir."):]
                    if name not in dirs:
                        dirs[name] = torch.zeros(n, u.shape[-1])
                    dirs[name][s : s + b] = u.cpu()
                for p in feat_points:
                    h = store[p.key][batch.rows]
                    w = pool_weights(h, response_mask=batch.response_mask, attention_mask=batch.pool_mask, mode=pooling,
                                     outlier_quantile=outlier_quantile)
                    feat_rows.append(sparse_rows(sae.pool(h, w).cpu()))  # (2b, M) each
                pbar.update(b)
    finally:
        model.train(was_training)
    feats: dict[str, torch.Tensor] = {}
    if feat_rows:
        m = max(i.shape[1] for i, _ in feat_rows)
        pad = lambda x: torch.nn.functional.pad(x, (0, m - x.shape[1]))
        idx = torch.cat([torch.stack(pad(i).chunk(2), 1) for i, _ in feat_rows])  # (n, 2, M): [chosen, rejected]
        val = torch.cat([torch.stack(pad(v).chunk(2), 1) for _, v in feat_rows])
        feats = {"idx": idx, "val": val, "width": torch.tensor([sae.width])}
    cache = RefCache(fp, torch.tensor([p.index for p in pairs]), logp, ntok, acts, dirs, feats)
    if use_disk:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        d = {"fingerprint": fp, "spec": spec, "pair_index": cache.pair_index, "logp_sum": logp, "n_tokens": ntok,
             "acts": acts, "dirs": dirs, "feats": feats}
        torch.save(d | {"digest": content_digest(d)}, tmp)
        tmp.replace(path)
    return cache
