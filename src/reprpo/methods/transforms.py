"""Activation transforms T (DESIGN §5): applied per token before pooling, the same T for the
policy and the reference activations.

Shapes: `...` any leading dims (b, t), d hidden, k output dim, n stacked preference
directions, v vocab. Row-vector convention throughout: T(h) = hQ with Q (d, k).

Every transform casts its input to float32 and returns float32. Keep the modules in float32
(do not `.to(bfloat16)` them with the model): an orthogonal parametrisation or a Householder
product loses orthonormality quickly in half precision.

| name         | T(h)                              | out | trainable | state                 |
|--------------|-----------------------------------|-----|-----------|-----------------------|
| none         | h                                 | d   | no        | -                     |
| pca          | hQ, Q = top-k right s.v. of δ_ref | k   | no        | buffer Q, after fit() |
| hra          | hQ, Q = (Π_i H(v_i))[:, :k]       | k   | yes       | v (m, d)              |
| ether        | hQ, Q = blockdiag(H(v_b)) M       | k   | yes       | v (d/bs, bs), buf M   |
| ortho        | hQ, Q = Wᵀ with W Wᵀ = I_k        | k   | yes       | parametrised W (k, d) |
| unembed_null | h − h V_k V_kᵀ                    | d   | no        | buffer V_k (d, k)     |
| suppressed   | relu(h_prev − h)                  | d   | no        | -                     |
| sae          | f(h), an SAE's features           | w   | no        | the SAE (not saved)   |

H(v) = I − 2 v vᵀ/‖v‖² is the Householder reflection along v.
ether's M (d, k) is a fixed, seeded orthonormal mixing, so its frame reads every coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprpo.errors import ConfigError
from reprpo.registry import Registry


class TransformConfigError(ConfigError, ValueError):
    """A bad transform name or size. Also a ValueError, so plain `except ValueError` works."""


class Transform(nn.Module):
    """Base: forward(h (..., d)) -> (..., k) in float32.

    `trainable` says whether the module's parameters are trained with the adapter (the loop
    adds them to the optimiser); `needs_prev` says whether forward also takes the previous
    block's output `h_prev` (only `suppressed`).
    """

    trainable: bool = False
    needs_prev: bool = False
    name: str = ""

    def __init__(self, *, d: int, k: int) -> None:
        super().__init__()
        self.d = d
        self.k = k

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}"

    def pool(self, h: Tensor, weights: Tensor) -> Tensor:
        """Σ_t w_t T(h_t): (r, t, d), (r, t) -> (r, k). A transform with a cheaper route (sae) overrides it."""
        return torch.einsum("rt,rtk->rk", weights.float(), self(h))

    @classmethod
    def build(cls, *, d: int, k: int | None, lm_head_weight: Tensor | None, energy: float, seed: int, block_size: int,
              sae=None) -> Transform:
        """From `build_transform`'s arguments (k already checked where the spec takes k)."""
        if k is not None and k != d:
            raise TransformConfigError(f"transform {cls.name!r} keeps the hidden size; k must be None or d={d}, got k={k!r}.")
        return cls(d=d, k=d)


def _check_k(name: str, d: int, k: int | None, *, required: bool) -> None:
    if k is None:
        if required:
            raise TransformConfigError(f"transform {name!r} needs an output size k (1 <= k <= d={d}); got k=None.")
        return
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise TransformConfigError(f"transform {name!r}: k must be an integer with 1 <= k <= d={d}; got k={k!r}.")


def _householder(x: Tensor, v: Tensor) -> Tensor:
    """x H(v) = x − 2 (x·v) v/‖v‖², for row vectors x (..., d) and one v (d,) (H is symmetric)."""
    return x - (2.0 / v.dot(v).clamp_min(1e-12)) * (x @ v)[..., None] * v


class Identity(Transform):
    """T(h) = h
    ours (the no-transform baseline).
    """

    name = "none"

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., d)
        return h.float()


class PCATransform(Transform):
    """T(h) = hQ, Q (d, k) = top-k right singular vectors of the stacked δ_ref (n, d), uncentered
    ours (DESIGN §5 `pca`): uncentered, so the mean preference direction (mass-mean probe) leads.

    Frozen. Call `fit(deltas)` once, on reference-pass preference directions over the training
    set, before the first forward. Q is a buffer, so it is saved in the state dict and moved
    with `.to()`; `fitted` is a buffer too, so a loaded state dict counts as fitted.
    Sign convention: column 0 has a positive inner product with mean(deltas); every other
    column has its largest-magnitude entry positive (sklearn's svd_flip), for determinism.
    """

    def __init__(self, *, d: int, k: int) -> None:
        super().__init__(d=d, k=k)
        self.register_buffer("Q", torch.zeros(d, k))  # (d, k)
        self.register_buffer("singular_values", torch.zeros(k))  # (k,)
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, deltas: Tensor) -> PCATransform:  # deltas (n, d)
        if deltas.ndim != 2 or deltas.shape[1] != self.d:
            raise ValueError(f"PCATransform.fit: deltas must have shape (n, d={self.d}); got {tuple(deltas.shape)}.")
        if deltas.shape[0] < self.k:
            raise ValueError(f"PCATransform.fit: need at least k={self.k} preference directions to fit a rank-{self.k} basis; got n={deltas.shape[0]}. Lower k or fit on more pairs.")
        x = deltas.detach().float()
        if not torch.isfinite(x).all():
            raise ValueError("PCATransform.fit: deltas contain NaN or inf (check the reference pass).")
        # torch.linalg.svd on (n, d): exact, and n·d is at most a few thousand × a few thousand.
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        q = vh[: self.k].T.clone()  # (d, k)
        mean = x.mean(0)  # (d,)
        if q[:, 0].dot(mean) < 0:
            q[:, 0] = -q[:, 0]
        if self.k > 1:
            rest = q[:, 1:]
            big = rest.gather(0, rest.abs().argmax(0, keepdim=True))  # (1, k-1)
            q[:, 1:] = rest * torch.where(big < 0, -1.0, 1.0)
        self.Q.copy_(q)
        self.singular_values.copy_(s[: self.k])
        self.fitted.fill_(True)
        return self

    @classmethod
    def build(cls, *, d, k, lm_head_weight, energy, seed, block_size, sae=None) -> PCATransform:
        return cls(d=d, k=k)

    def frame(self) -> Tensor:  # (d, k)
        if not bool(self.fitted):
            raise RuntimeError("PCATransform used before fit(): call transform.fit(deltas) with the reference preference directions δ_ref = h⁺_ref − h⁻_ref, shape (n, d), before training.")
        return self.Q

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., k)
        return h.float() @ self.frame()


class HRATransform(Transform):
    """T(h) = hQ, Q = first k columns of Π_{i=1..m} (I − 2 v_i v_iᵀ/‖v_i‖²)
    Yuan et al. 2024, "Bridging the gap between low-rank and orthogonal adaptation via
    Householder reflection adaptation" (HRA), used here as a learned frame, not a weight update.

    v (m, d) trainable, m = `n_reflections` (default k), each v_i drawn independently from a
    seeded N(0, I). (differs: the earlier reprpo init duplicated vectors, so the frame started
    degenerate; HRA's own paired init that makes the product I is not wanted here, a frame need
    not start at the first k coordinates.) Q is built by reflecting the first k columns of I,
    O(m·d·k), never a d × d product.
    """

    trainable = True

    def __init__(self, *, d: int, k: int, n_reflections: int | None = None, seed: int = 0) -> None:
        super().__init__(d=d, k=k)
        m = k if n_reflections is None else n_reflections
        if m < 1:
            raise TransformConfigError(f"transform 'hra': n_reflections must be >= 1; got {m}.")
        g = torch.Generator().manual_seed(seed)
        self.v = nn.Parameter(torch.randn(m, d, generator=g))  # (m, d)

    def frame(self) -> Tensor:  # (d, k)
        v = self.v.float()
        q = torch.eye(self.d, self.k, device=v.device)  # (d, k)
        # Q = H_1 H_2 ... H_m E_k: apply H_m first. Hq = q − 2 v (vᵀq)/‖v‖² (H symmetric, so
        # reflecting the columns is the same as reflecting rows of qᵀ).
        for i in reversed(range(v.shape[0])):
            q = _householder(q.T, v[i]).T
        return q

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., k)
        return h.float() @ self.frame()

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, n_reflections={self.v.shape[0]}"

    @classmethod
    def build(cls, *, d, k, lm_head_weight, energy, seed, block_size, sae=None) -> HRATransform:
        return cls(d=d, k=k, seed=seed)


class EtherTransform(Transform):
    """T(h) = hQ, Q = blockdiag(H(v_1), …, H(v_{d/bs})) M, H(v) = I − 2 v vᵀ/‖v‖², M (d, k) fixed orthonormal
    Bini et al. 2024, "ETHER: Efficient finetuning of large-scale models with hyperplane
    reflections" (block-diagonal variant), used here as a learned frame.

    d must be divisible by `block_size` (a clear error otherwise; 576, 896, 2048, 4096 all
    divide by 8). v (d/bs, bs) trainable, one seeded N(0, I) reflection vector per block over
    the full width; M is a seeded Haar-random orthonormal (d, k) buffer (QR of a Gaussian,
    column signs fixed; not trained, saved in the state dict). QᵀQ = MᵀBᵀBM = I_k; with k = d,
    Q is orthogonal (d × d), so norm and inner-product losses are invariant to it.
    (differs: the earlier version took the first k columns of the block-diagonal matrix, so with
    k < d it read only coordinates [0, ⌈k/bs⌉·bs) and, when bs divides k, its span was fixed:
    a coordinate selection. Here every coordinate is read and span(Q) = B·span(M) moves with v.)
    """

    trainable = True

    def __init__(self, *, d: int, k: int, block_size: int = 8, seed: int = 0) -> None:
        super().__init__(d=d, k=k)
        if block_size < 1 or d % block_size:
            divisors = [b for b in (2, 4, 8, 16, 32, 64) if d % b == 0]
            raise TransformConfigError(f"transform 'ether': hidden size d={d} is not divisible by block_size={block_size}; choose one of {divisors or [1]}.")
        self.block_size = block_size
        g = torch.Generator().manual_seed(seed)
        self.v = nn.Parameter(torch.randn(d // block_size, block_size, generator=g))  # (nb, bs), nb = d/bs
        m, r = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))  # (d, k), (k, k)
        m = m * torch.where(r.diagonal() < 0, -1.0, 1.0).to(m)  # sign fix: Haar-distributed, deterministic
        self.register_buffer("mix", m.float().contiguous())  # (d, k), fixed

    def frame(self) -> Tensor:  # (d, k)
        v = self.v.float()  # (nb, bs)
        nb, bs = v.shape
        m = self.mix.float().unflatten(0, (nb, bs))  # (nb, bs, k): block b's rows of M
        # H(v_b) M_b = M_b − 2 v_b (v_bᵀ M_b)/‖v_b‖², per block
        coef = 2.0 * (v[..., None] * m).sum(1, keepdim=True) / (v * v).sum(-1)[:, None, None].clamp_min(1e-12)  # (nb, 1, k)
        return (m - v[..., None] * coef).flatten(0, 1)  # (d, k)

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., k)
        return h.float() @ self.frame()

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, block_size={self.block_size}"

    @classmethod
    def build(cls, *, d, k, lm_head_weight, energy, seed, block_size, sae=None) -> EtherTransform:
        return cls(d=d, k=k, block_size=block_size, seed=seed)


class OrthoTransform(Transform):
    """T(h) = hQ, Q = Wᵀ (d, k) with W (k, d) orthogonally parametrised (W Wᵀ = I_k)
    torch.nn.utils.parametrizations.orthogonal (Lezcano-Casado 2019), fp32.

    The weight starts as a seeded random orthogonal matrix (nn.init.orthogonal_).
    """

    trainable = True

    def __init__(self, *, d: int, k: int, seed: int = 0) -> None:
        super().__init__(d=d, k=k)
        lin = nn.Linear(d, k, bias=False, dtype=torch.float32)
        with torch.no_grad():
            nn.init.orthogonal_(lin.weight, generator=torch.Generator().manual_seed(seed))
        self.lin = nn.utils.parametrizations.orthogonal(lin)

    def frame(self) -> Tensor:  # (d, k)
        return self.lin.weight.float().T

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., k)
        return h.float() @ self.frame()

    @classmethod
    def build(cls, *, d, k, lm_head_weight, energy, seed, block_size, sae=None) -> OrthoTransform:
        return cls(d=d, k=k, seed=seed)


def unembed_basis(lm_head_weight: Tensor, *, k: int | None = None, energy: float = 0.9, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """(V_k (d, k), σ (d,)): top right singular vectors of W_U (v, d) and all singular values.

    Computed as eigh of the Gram WᵀW (d × d), accumulated over row chunks in float32 and
    decomposed in float64: O(v·d²) with a d × d eigenproblem, much cheaper than an SVD of the
    (v, d) matrix and no float32 copy of the whole W (which can be bf16 and 128k × 4096).
    Squaring the matrix only costs precision in the small singular values, which we drop.
    If k is None, k = the smallest count whose cumulative σ² share reaches `energy`.
    """
    w = lm_head_weight.detach()
    d = w.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], chunk):
        c = w[i : i + chunk].float()
        gram += c.T @ c
    evals, evecs = torch.linalg.eigh(gram.double())  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    if k is None:
        if not 0 < energy <= 1:
            raise TransformConfigError(f"transform 'unembed_null': energy must be in (0, 1]; got {energy}.")
        share = evals.cumsum(0) / evals.sum().clamp_min(1e-300)
        k = int((share < energy - 1e-12).sum().item()) + 1
        k = min(k, d)
    return evecs[:, :k].float(), evals.sqrt().float()


class UnembedNullTransform(Transform):
    """T(h) = h − h V_k V_kᵀ, V_k the top-k right singular vectors of W_U = UΣVᵀ (lm_head)
    seed "SVD" (ours): the part of the state the unembedding does not read.

    Output dim is d (`self.k == d`); `n_removed` is the number of removed directions, chosen
    by the σ² energy rule unless given. Frozen buffers. See `unembed_basis` for how V_k is
    computed (eigh of WᵀW, not a full SVD).
    """

    def __init__(self, *, lm_head_weight: Tensor, k: int | None = None, energy: float = 0.9) -> None:
        d = lm_head_weight.shape[1]
        super().__init__(d=d, k=d)
        vk, sigma = unembed_basis(lm_head_weight, k=k, energy=energy)
        if vk.shape[1] >= d:
            raise TransformConfigError(f"transform 'unembed_null': removing k={vk.shape[1]} of d={d} directions leaves nothing; lower k or energy (got energy={energy}).")
        self.n_removed = vk.shape[1]
        self.register_buffer("V", vk.contiguous())  # (d, n_removed)
        self.register_buffer("singular_values", sigma)  # (d,)

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., d)
        h = h.float()
        return h - (h @ self.V) @ self.V.T

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, n_removed={self.n_removed}"

    @classmethod
    def build(cls, *, d, k, lm_head_weight, energy, seed, block_size, sae=None) -> UnembedNullTransform:
        if lm_head_weight is None:
            raise TransformConfigError("transform 'unembed_null' needs lm_head_weight (the unembedding W_U, shape (v, d)).")
        if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != d:
            raise TransformConfigError(f"transform 'unembed_null': lm_head_weight must have shape (v, d={d}); got {tuple(lm_head_weight.shape)}.")
        _check_k("unembed_null", d, k, required=False)
        return cls(lm_head_weight=lm_head_weight, k=k, energy=energy)


class SuppressedTransform(Transform):
    """T(h, h_prev) = relu(h_prev − h) = relu(H^{ℓ−1} − H^ℓ): what block ℓ removed
    journal (ours).

    Calling convention: `forward(h, *, h_prev)`, both (..., d): h is block ℓ's output
    (`hidden_states[ℓ + 1]`), h_prev block ℓ−1's (`hidden_states[ℓ]`; the embeddings for ℓ = 0).
    `needs_prev` is True so callers know to collect block ℓ−1 too. No parameters.
    """

    needs_prev = True
    name = "suppressed"

    def forward(self, h: Tensor, *, h_prev: Tensor) -> Tensor:  # (..., d), (..., d) -> (..., d)
        if h_prev.shape != h.shape:
            raise ValueError(f"suppressed: h_prev {tuple(h_prev.shape)} and h {tuple(h.shape)} must have the same shape.")
        return F.relu(h_prev.float() - h.float())


class SAETransform(Transform):
    """T(h) = f(h), the features of a sparse autoencoder at the block (TopK or JumpReLU)
    DESIGN §5 `sae`; the SAE from `method.sae` (model/sae.py).

    Non-linear and fixed: the pooled reference features come from the reference cache. The
    SAE is held outside the module tree (not trained, not saved in method_state.pt); `pool`
    scatters a TopK SAE's k active values instead of forming the dense (r, t, w) features."""

    name = "sae"

    def __init__(self, *, sae) -> None:
        super().__init__(d=sae.d, k=sae.width)
        object.__setattr__(self, "sae", sae)

    def _on(self, h: Tensor):
        if self.sae.b_dec.device != h.device:
            self.sae.to(h.device)
        return self.sae

    def forward(self, h: Tensor) -> Tensor:  # (..., d) -> (..., w)
        return self._on(h).encode(h)

    def pool(self, h: Tensor, weights: Tensor) -> Tensor:  # (r, t, d), (r, t) -> (r, w)
        return self._on(h).pool(h, weights)

    @classmethod
    def build(cls, *, d, k, lm_head_weight, energy, seed, block_size, sae=None) -> SAETransform:
        if sae is None:
            raise TransformConfigError("transform 'sae' needs an SAE: set --method.sae PATH (`reprpo sae train` makes one).")
        if sae.d != d:
            raise TransformConfigError(f"transform 'sae': the SAE reads width {sae.d}, the activations have width {d}.")
        return cls(sae=sae)


@dataclass(frozen=True)
class TransformSpec:
    """A registered transform and what the method needs to know about it.

    linear: T(Σ w h) = Σ w T(h), so T applies to pooled (and cached) activations · residual_only:
    defined on the residual stream (collection hs) only · takes_k: method.k is its output size ·
    needs_fit: fit() on reference preference directions before training · trainable: its
    parameters train with the adapter · needs_prev: reads the previous block's output too ·
    needs_sae: built from `method.sae`, at the SAE's own block (whose pooled reference features
    the reference cache holds)."""

    cls: type[Transform]
    help: str
    linear: bool = True
    residual_only: bool = False
    takes_k: bool = False
    needs_fit: bool = False
    trainable: bool = False
    needs_prev: bool = False
    needs_sae: bool = False


TRANSFORMS: Registry[TransformSpec] = Registry("transform", field="method.transform")
TRANSFORMS.add("none", TransformSpec(Identity, "h"))
TRANSFORMS.add("pca", TransformSpec(PCATransform, "hQ, Q = top-k right singular vectors of δ_ref (frozen)", takes_k=True, needs_fit=True))
TRANSFORMS.add("hra", TransformSpec(HRATransform, "learned Householder frame", takes_k=True, trainable=True))
TRANSFORMS.add("ether", TransformSpec(EtherTransform, "learned frame of Householder reflections", takes_k=True, trainable=True))
TRANSFORMS.add("ortho", TransformSpec(OrthoTransform, "learned orthonormal frame (torch parametrisation)", takes_k=True, trainable=True))
TRANSFORMS.add("unembed_null", TransformSpec(UnembedNullTransform, "h − hV_kV_kᵀ: what lm_head does not read", residual_only=True))
TRANSFORMS.add("suppressed", TransformSpec(SuppressedTransform, "relu(H^{ℓ−1} − H^ℓ): what block ℓ removed", linear=False,
                                           residual_only=True, needs_prev=True))
TRANSFORMS.add("sae", TransformSpec(SAETransform, "f(h): the features of the SAE at method.sae (frozen, non-linear)", linear=False,
                                    residual_only=True, needs_sae=True))


def build_transform(
    name: str,
    *,
    d: int,
    k: int | None = None,
    lm_head_weight: Tensor | None = None,
    energy: float = 0.9,
    seed: int = 0,
    block_size: int = 8,
    sae=None,
) -> Transform:
    """The transform `name` for hidden size d.

    k is the output dim for pca/hra/ether/ortho (required there), the number of removed
    directions for unembed_null (None: energy rule), and must be None or d for none/suppressed.
    unembed_null needs `lm_head_weight` (v, d), sae an `sae` (model/sae.py). pca must be `fit()`
    before its first forward.
    """
    if name not in TRANSFORMS:
        raise TransformConfigError(f"unknown transform {name!r}; choose one of: {', '.join(TRANSFORMS)}.")
    spec = TRANSFORMS[name]
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise TransformConfigError(f"transform {name!r}: hidden size d must be a positive integer; got {d!r}.")
    if spec.takes_k:
        _check_k(name, d, k, required=True)
    return spec.cls.build(d=d, k=k, lm_head_weight=lm_head_weight, energy=energy, seed=seed, block_size=block_size, sae=sae)
