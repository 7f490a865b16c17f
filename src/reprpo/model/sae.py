"""Sparse autoencoders (SAEs) on the residual stream: TopK (trained by `reprpo sae train`) and
JumpReLU / ReLU (loaded), the three file formats, and the checks against a model.

Shapes: `...` any leading dims, d model width, w SAE width (latents), k active latents per token
(TopK), r rows, t tokens.

Formats read by `load_sae(PATH)`:
- ours = EleutherAI sparsify's directory: `cfg.json` + `sae.safetensors` with encoder.weight
  (w, d), encoder.bias (w,), W_dec (w, d), b_dec (d,). `reprpo sae train` adds a `reprpo` entry
  to cfg.json (model, layer, data, token count, quality), which sparsify ignores, so our SAEs
  load in sparsify and its SAEs load here (layer from its `layers.N` directory name).
- sae-lens: `cfg.json` (architecture standard | jumprelu | topk, d_in, d_sae, hook_name, ...)
  + `sae_weights.safetensors` with W_enc (d, w), W_dec (w, d), b_enc, b_dec[, threshold].
- Gemma Scope: `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold), JumpReLU, layer read from
  the path (`.../layer_12/width_16k/...`).
The block an SAE reads is always a block output (`hook_resid_post`, our `hs.N`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprpo.errors import ConfigError

SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
GEMMASCOPE_WEIGHTS = "params.npz"


class SAE(nn.Module):
    """Base: encode (..., d) -> (..., w) features ≥ 0, decode (..., w) -> (..., d), and the
    pooled features of token rows. Weights are float32 buffers or parameters; inputs are cast
    to float32. `layer` is the block whose output it reads (None: the file does not say)."""

    kind: str = ""

    def __init__(self, *, d: int, width: int, layer: int | None = None, source: str = "", meta: dict | None = None):
        super().__init__()
        self.d, self.width, self.layer, self.source = d, width, layer, source
        self.meta = dict(meta or {})

    def encode(self, x: Tensor) -> Tensor:  # (..., d) -> (..., w)
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:  # (..., w) -> (..., d)
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        return self.decode(self.encode(x))

    def pool(self, h: Tensor, weights: Tensor, *, rows: int = 8) -> Tensor:
        """f̄_r = Σ_t w_rt f(h_rt): (r, t, d), (r, t) -> (r, w); `rows` rows at a time (the dense
        (rows, t, w) features are the memory peak)."""
        out = []
        for i in range(0, h.shape[0], rows):
            out.append(torch.einsum("rt,rtw->rw", weights[i : i + rows].float(), self.encode(h[i : i + rows])))
        return torch.cat(out)

    def fingerprint(self) -> str:
        """blake2b of the kind, k and every weight's bytes: the reference cache's key for the SAE."""
        hsh = hashlib.blake2b(digest_size=16)
        hsh.update(f"{self.kind}:{getattr(self, 'k', 0)}:{getattr(self, 'subtract_b_dec', True)}".encode())
        for name, t in sorted(self.state_dict().items()):
            hsh.update(name.encode())
            hsh.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return hsh.hexdigest()

    def describe(self) -> str:
        where = f"block {self.layer}" if self.layer is not None else "block not recorded"
        k = f", k={self.k}" if getattr(self, "k", None) else ""
        return f"{self.kind} SAE d={self.d} w={self.width}{k} ({where}){' from ' + self.source if self.source else ''}"


class TopKSAE(SAE):
    """f = ReLU(TopK_k(W_enc(h − b_dec) + b_enc)), ĥ = W_dec f + b_dec, unit-norm rows of W_dec
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (TopK); weights named as in EleutherAI sparsify.

    encoder: nn.Linear(d, w) (weight (w, d) = W_enc, bias (w,) = b_enc); W_dec (w, d); b_dec (d,).
    `subtract_b_dec` False encodes W_enc h + b_enc (a sae-lens TopK SAE with
    apply_b_dec_to_input false)."""

    kind = "topk"

    def __init__(self, *, d: int, width: int, k: int, layer: int | None = None, source: str = "", meta: dict | None = None,
                 subtract_b_dec: bool = True, seed: int = 0):
        super().__init__(d=d, width=width, layer=layer, source=source, meta=meta)
        if not 1 <= k <= width:
            raise ConfigError(f"TopK SAE: k must be in [1, width={width}]; got {k}.")
        self.k, self.subtract_b_dec = k, subtract_b_dec
        g = torch.Generator().manual_seed(seed)
        w_dec = F.normalize(torch.randn(width, d, generator=g), dim=-1)  # (w, d) unit rows
        self.encoder = nn.Linear(d, width)
        with torch.no_grad():  # encoder = decoderᵀ at init (Gao et al. §2.4), zero bias
            self.encoder.weight.copy_(w_dec)
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(w_dec.clone())
        self.b_dec = nn.Parameter(torch.zeros(d))

    def pre_acts(self, x: Tensor) -> Tensor:  # (..., d) -> (..., w)
        x = x.float()
        return self.encoder(x - self.b_dec if self.subtract_b_dec else x)

    def topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values (..., k) ≥ 0, indices (..., k)) of the active latents."""
        vals, idx = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return F.relu(vals), idx

    def encode(self, x: Tensor) -> Tensor:  # (..., d) -> (..., w)
        vals, idx = self.topk(x)
        return torch.zeros(*vals.shape[:-1], self.width, device=vals.device).scatter(-1, idx, vals)

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        """Σ_j vals_j W_dec[idx_j] + b_dec: (n, k), (n, k) -> (n, d), without the dense (n, w)."""
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec

    def reconstruct(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        vals, idx = self.topk(x)
        return self.decode_sparse(vals.flatten(0, -2), idx.flatten(0, -2)).view(*x.shape[:-1], self.d)

    def pool(self, h: Tensor, weights: Tensor, *, rows: int = 8) -> Tensor:
        """f̄_r = Σ_t w_rt f(h_rt) by scattering the k active values: (r, t, d), (r, t) -> (r, w)."""
        vals, idx = self.topk(h)  # (r, t, k)
        contrib = (vals * weights.float()[..., None]).flatten(1)  # (r, t·k)
        return torch.zeros(h.shape[0], self.width, device=h.device).scatter_add(1, idx.flatten(1), contrib)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def save(self, path: str | Path, *, reprpo: dict | None = None) -> Path:
        """Write `path/cfg.json` + `path/sae.safetensors` (EleutherAI sparsify's layout)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"encoder.weight": self.encoder.weight, "encoder.bias": self.encoder.bias, "W_dec": self.W_dec, "b_dec": self.b_dec}
        save_file({n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}, str(path / SPARSIFY_WEIGHTS))
        cfg = {"d_in": self.d, "num_latents": self.width, "expansion_factor": max(1, self.width // self.d), "k": self.k,
               "activation": "topk", "normalize_decoder": True, "multi_topk": False, "skip_connection": False, "transcode": False,
               "reprpo": {"layer": self.layer, **self.meta, **(reprpo or {})}}
        (path / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return path


class JumpReLUSAE(SAE):
    """f = 1[p > θ]·ReLU(p), p = W_enc(h − a·b_dec) + b_enc, ĥ = W_dec f + b_dec
    Rajamanoharan et al. 2024 (JumpReLU), the Gemma Scope SAEs (Lieberum et al. 2024); θ = 0 is
    the standard ReLU SAE. a = sae-lens's apply_b_dec_to_input (0 for Gemma Scope).

    W_enc (d, w), b_enc (w,), threshold (w,), W_dec (w, d), b_dec (d,): buffers (loaded, never
    trained)."""

    kind = "jumprelu"

    def __init__(self, *, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, threshold: Tensor | None = None,
                 subtract_b_dec: bool = False, layer: int | None = None, source: str = "", meta: dict | None = None):
        d, width = W_enc.shape
        super().__init__(d=d, width=width, layer=layer, source=source, meta=meta)
        self.subtract_b_dec = subtract_b_dec
        if threshold is None:
            self.kind = "relu"
            threshold = torch.zeros(width)
        self.register_buffer("W_enc", W_enc.float().contiguous())
        self.register_buffer("b_enc", b_enc.float().contiguous())
        self.register_buffer("threshold", threshold.float().contiguous())
        self.register_buffer("W_dec", W_dec.float().contiguous())
        self.register_buffer("b_dec", b_dec.float().contiguous())

    def encode(self, x: Tensor) -> Tensor:  # (..., d) -> (..., w)
        x = x.float()
        p = (x - self.b_dec if self.subtract_b_dec else x) @ self.W_enc + self.b_enc
        return (p > self.threshold) * F.relu(p)


# -- loading ---------------------------------------------------------------------------------
def _layer_from_hook(hook: str, where: str) -> int | None:
    """sae-lens hook name -> the block whose output it reads: blocks.N.hook_resid_post -> N,
    blocks.N.hook_resid_pre -> N − 1 (the input of block N)."""
    if not hook:
        return None
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook)
    if not m:
        raise ConfigError(f"method.sae {where}: the SAE reads {hook!r}; reprpo reads the residual stream between blocks "
                          "(blocks.N.hook_resid_post or hook_resid_pre). Use an SAE of the residual stream.")
    n = int(m.group(1))
    if m.group(2) == "pre":
        if n == 0:
            raise ConfigError(f"method.sae {where}: blocks.0.hook_resid_pre is the embeddings, not a block output.")
        return n - 1
    return n


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"method.sae {path}: cannot read it as JSON ({e}).") from e


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is named
        raise ConfigError(f"method.sae {path}: cannot read the weights ({type(e).__name__}: {e}).") from e


def _need(t: dict[str, Tensor], names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in t]
    if missing:
        raise ConfigError(f"method.sae {where}: tensors {missing} are missing (found {sorted(t)}).")


def _load_sparsify(path: Path) -> SAE:
    cfg = _read_json(path / "cfg.json")
    t = _load_safetensors(path / SPARSIFY_WEIGHTS)
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / SPARSIFY_WEIGHTS)
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise ConfigError(f"method.sae {path}: a transcoder / skip-connection sparse coder is not an SAE of one layer's residual stream.")
    if cfg.get("activation", "topk") != "topk":
        raise ConfigError(f"method.sae {path}: activation {cfg.get('activation')!r} is not supported (topk only).")
    w, d = t["encoder.weight"].shape
    ours = cfg.get("reprpo") or {}
    layer = ours.get("layer")
    if layer is None and (m := re.search(r"layers\.(\d+)$", path.name)):  # sparsify names a hookpoint's directory `layers.N`
        layer = int(m.group(1))
    sae = TopKSAE(d=d, width=w, k=int(cfg["k"]), layer=layer, source=str(path), meta={k: v for k, v in ours.items() if k != "layer"})
    sae.load_state_dict({"encoder.weight": t["encoder.weight"].float(), "encoder.bias": t["encoder.bias"].float(),
                         "W_dec": t["W_dec"].float(), "b_dec": t["b_dec"].float()})
    return sae


def _load_saelens(path: Path) -> SAE:
    cfg = _read_json(path / "cfg.json")
    t = _load_safetensors(path / SAELENS_WEIGHTS)
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec"), path / SAELENS_WEIGHTS)
    meta = cfg.get("metadata") or {}
    hook = cfg.get("hook_name") or meta.get("hook_name") or ""
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise ConfigError(f"method.sae {path}: normalize_activations {norm!r} rescales the inputs by a factor reprpo "
                          "does not apply; use an SAE with normalize_activations none (or fold the factor into W_enc).")
    arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn_str") == "topk" else "standard")
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", arch != "jumprelu"))
    layer = _layer_from_hook(hook, str(path))
    info = {"model": cfg.get("model_name") or meta.get("model_name"), "format": "sae-lens"}
    if arch == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not k:
            raise ConfigError(f"method.sae {path}: a topk SAE whose cfg.json gives no k.")
        d, w = t["W_enc"].shape
        sae = TopKSAE(d=d, width=w, k=int(k), layer=layer, source=str(path), meta=info, subtract_b_dec=apply_b_dec)
        sae.load_state_dict({"encoder.weight": t["W_enc"].float().T.contiguous(), "encoder.bias": t["b_enc"].float(),
                             "W_dec": t["W_dec"].float(), "b_dec": t["b_dec"].float()})
        return sae
    if arch == "jumprelu":
        if "threshold" in t:
            thr = t["threshold"]
        elif "log_threshold" in t:
            thr = t["log_threshold"].float().exp()
        else:
            raise ConfigError(f"method.sae {path}: a jumprelu SAE without a threshold tensor (found {sorted(t)}).")
    elif arch == "standard":
        thr = None
    else:
        raise ConfigError(f"method.sae {path}: sae-lens architecture {arch!r} is not supported (standard, jumprelu, topk).")
    return JumpReLUSAE(W_enc=t["W_enc"], b_enc=t["b_enc"], W_dec=t["W_dec"], b_dec=t["b_dec"], threshold=thr,
                       subtract_b_dec=apply_b_dec, layer=layer, source=str(path), meta=info)


def _load_gemmascope(path: Path) -> SAE:
    import numpy as np

    try:
        with np.load(path) as z:
            t = {k: torch.from_numpy(z[k]) for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"method.sae {path}: cannot read it as a Gemma Scope params.npz ({type(e).__name__}: {e}).") from e
    t = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in t.items()}
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path)
    m = re.search(r"layer_(\d+)", str(path))
    return JumpReLUSAE(W_enc=t["W_enc"], b_enc=t["b_enc"], W_dec=t["W_dec"], b_dec=t["b_dec"], threshold=t["threshold"],
                       layer=int(m.group(1)) if m else None, source=str(path), meta={"format": "gemma-scope"})


def load_sae(path: str | Path) -> SAE:
    """An SAE from `path`: our / sparsify directory, sae-lens directory, or Gemma Scope params.npz."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"method.sae {path}: no such file or directory. Train one with `reprpo sae train --out DIR`, "
                          "or give a sae-lens directory or a Gemma Scope params.npz.")
    if p.is_dir() and (p / GEMMASCOPE_WEIGHTS).is_file():
        p = p / GEMMASCOPE_WEIGHTS
    if p.is_file():
        if p.suffix == ".npz":
            return _load_gemmascope(p)
        if p.name in ("cfg.json", SPARSIFY_WEIGHTS, SAELENS_WEIGHTS):
            return load_sae(p.parent)
        raise ConfigError(f"method.sae {path}: not an SAE file (expected a directory, or a Gemma Scope params.npz).")
    if (p / "cfg.json").is_file() and (p / SPARSIFY_WEIGHTS).is_file():
        return _load_sparsify(p)
    if (p / "cfg.json").is_file() and (p / SAELENS_WEIGHTS).is_file():
        return _load_saelens(p)
    raise ConfigError(f"method.sae {path}: no SAE here. Expected cfg.json with {SPARSIFY_WEIGHTS} (reprpo / sparsify), "
                      f"cfg.json with {SAELENS_WEIGHTS} (sae-lens), or {GEMMASCOPE_WEIGHTS} (Gemma Scope).")


def sae_layer(sae: SAE, *, d: int, n_layers: int, layers: str) -> int:
    """The block the SAE is used at, checked against the model: its d must be the model's hidden
    size; `layers` "sae" means the SAE's own block, anything else must name that one block."""
    from reprpo.model.capture import parse_layers

    if sae.d != d:
        raise ConfigError(f"method.sae {sae.source or '(given)'}: the SAE reads vectors of width {sae.d}, the model's hidden size "
                          f"is {d}: it was trained on another model. Train one for this model with `reprpo sae train`.")
    if layers.strip() in ("", "sae"):
        if sae.layer is None:
            raise ConfigError(f"method.sae {sae.source}: the file does not say which block the SAE reads; set --method.layers N.")
        if not 0 <= sae.layer < n_layers:
            raise ConfigError(f"method.sae {sae.source}: the SAE reads block {sae.layer}; the model has blocks 0..{n_layers - 1}.")
        return sae.layer
    got = parse_layers(layers, n_layers)
    if len(got) != 1:
        raise ConfigError(f"method.layers {layers!r} gives blocks {got}; an SAE reads one block: use --method.layers sae "
                          "(the SAE's own) or one block.")
    if sae.layer is not None and got[0] != sae.layer:
        raise ConfigError(f"method.layers {layers!r} is block {got[0]}, but the SAE {sae.source} was trained on block {sae.layer}: "
                          f"use --method.layers sae (or {sae.layer}).")
    return got[0]


def sae_capture(model, path: str, layers: str):
    """(capture point of the SAE's block output, the SAE in eval mode, frozen, on the model's
    device) for `method.sae` = path, checked against the model (`sae_layer`)."""
    from reprpo.model.capture import CapturePoint, decoder_layers
    from reprpo.model.forward import base_model

    if not path:
        raise ConfigError("method.sae is empty: fpo and hs-sae-* read SAE features. Train an SAE with "
                          "`reprpo sae train --out DIR` and pass --method.sae DIR (or a sae-lens directory / Gemma Scope params.npz).")
    sae = load_sae(path)
    blocks = decoder_layers(model)
    layer = sae_layer(sae, d=base_model(model).config.hidden_size, n_layers=len(blocks), layers=layers)
    sae.requires_grad_(False)
    sae.eval()
    sae.to(next(model.parameters()).device)
    return CapturePoint(f"hs.{layer}", layer, blocks[layer], "output"), sae
