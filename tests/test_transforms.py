"""Activation transforms (DESIGN §5): hand-worked cases per registry entry, then table tests."""

from __future__ import annotations

import pytest
import torch

from reprpo.errors import ConfigError
from reprpo.methods.transforms import (
    TRANSFORMS,
    PCATransform,
    Transform,
    UnembedNullTransform,
    build_transform,
    unembed_basis,
)

FRAMES = ("hra", "ether", "ortho")


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def _make(name: str, *, d: int = 32, k: int | None = 8, seed: int = 0) -> Transform:
    """Any registry entry, with the extra inputs it needs (pca fitted, unembed_null a W_U)."""
    g = torch.Generator().manual_seed(seed)
    if name in ("none", "suppressed"):
        return build_transform(name, d=d)
    if name == "unembed_null":
        return build_transform(name, d=d, k=k, lm_head_weight=torch.randn(100, d, generator=g))
    if name == "sae":
        from reprpo.model.sae import TopKSAE

        return build_transform(name, d=d, sae=TopKSAE(d=d, width=4 * d, k=8, seed=seed))
    t = build_transform(name, d=d, k=k, seed=seed)
    if name == "pca":
        t.fit(torch.randn(64, d, generator=g))
    return t


def _call(t: Transform, h: torch.Tensor, h_prev: torch.Tensor | None = None) -> torch.Tensor:
    if t.needs_prev:
        return t(h, h_prev=h_prev if h_prev is not None else torch.randn_like(h))
    return t(h)


def _orth_err(q: torch.Tensor) -> float:
    return (q.T @ q - torch.eye(q.shape[1])).abs().max().item()


# -- learned frames: hra / ether / ortho ------------------------------------------------------


@pytest.mark.parametrize("name", FRAMES)
@pytest.mark.parametrize(("d", "k"), [(32, 8), (32, 32), (576, 32)])
def test_frame_orthonormal_at_init_and_after_steps(name, d, k):
    t = build_transform(name, d=d, k=k, seed=1)
    assert t.trainable and t.k == k
    q = t.frame()
    assert q.shape == (d, k) and q.dtype == torch.float32
    assert _orth_err(q) < 1e-5
    opt = torch.optim.SGD(t.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(2)
    h, target = torch.randn(16, d, generator=g), torch.randn(16, k, generator=g)
    before = q.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        ((t(h) - target) ** 2).mean().backward()
        opt.step()
    q = t.frame()
    assert _orth_err(q) < 1e-5
    assert not torch.allclose(q, before)  # the steps did move the frame


@pytest.mark.parametrize("name", ("hra", "ether"))
def test_reflection_vectors_are_independent_at_init(name):
    """differs: the earlier HRA init duplicated vectors, so Gram-Schmidt was degenerate."""
    t = build_transform(name, d=32, k=16, seed=0)
    v = torch.nn.functional.normalize(t.v.detach(), dim=1)  # (m, ·)
    cos = v @ v.T - torch.eye(v.shape[0])
    assert v.shape[0] == (16 if name == "hra" else 4)  # ether: one reflection per block of 8 over d = 32
    assert cos.abs().max() < 0.99
    assert _orth_err(t.frame()) < 1e-5


@pytest.mark.parametrize("name", FRAMES)
def test_frame_seeded(name):
    a, b, c = (build_transform(name, d=16, k=4, seed=s).frame() for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("name", FRAMES)
def test_full_frame_is_a_rotation_so_norm_losses_are_invariant(name):
    """With k = d, ‖T(a) − T(b)‖ = ‖a − b‖ and ⟨T(a), T(b)⟩ = ⟨a, b⟩: every norm or
    inner-product loss is unchanged, so a learned frame only matters with k < d."""
    d = 32
    t = build_transform(name, d=d, k=d, seed=3)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, d, generator=g), torch.randn(5, d, generator=g)
    ta, tb = t(a), t(b)
    torch.testing.assert_close((ta - tb).norm(dim=-1), (a - b).norm(dim=-1), atol=1e-4, rtol=0)
    torch.testing.assert_close((ta * tb).sum(-1), (a * b).sum(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FRAMES)
def test_partial_frame_is_not_a_rotation(name):
    """With k < d, ‖T(h)‖ ≤ ‖h‖; a vector orthogonal to the frame's span maps to 0."""
    d, k = 32, 8
    t = build_transform(name, d=d, k=k, seed=3)
    q = t.frame().detach()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, d, generator=g)
    assert (t(h).norm(dim=-1) < h.norm(dim=-1) - 1e-3).all()
    off = h - (h @ q) @ q.T  # (4, d) orthogonal to span(Q), norm ~ √(d − k)
    assert off.norm(dim=-1).min() > 1.0
    assert t(off).norm(dim=-1).max() < 1e-4


def test_ether_blocks_and_divisibility():
    t = build_transform("ether", d=16, k=12, block_size=4, seed=0)
    # audit fix (issue 11): a k < d frame used to read only the blocks touching the first k
    # columns (q[12:] == 0, a coordinate selection); now one reflection per block over the full
    # width, after a fixed orthonormal mixing M (d, k): every coordinate is read (test_audit.py)
    assert t.v.shape == (4, 4) and t.mix.shape == (16, 12)
    with pytest.raises(ValueError, match="not divisible by block_size=5"):
        build_transform("ether", d=16, k=4, block_size=5)


def test_hra_one_reflection_hand_worked():
    """d = 2, v = (1, 1): H = I − vvᵀ = [[0, −1], [−1, 0]]; k = 1 → Q = (0, −1)ᵀ, T(h) = −h₂."""
    t = build_transform("hra", d=2, k=1)
    with torch.no_grad():
        t.v.copy_(torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(t.frame(), torch.tensor([[0.0], [-1.0]]))
    torch.testing.assert_close(t(torch.tensor([3.0, 5.0])), torch.tensor([-5.0]))


# -- pca --------------------------------------------------------------------------------------


def test_pca_recovers_planted_direction():
    d, n = 48, 200
    g = torch.Generator().manual_seed(0)
    w = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    s = torch.rand(n, 1, generator=g) * 2 + 0.5  # s_i > 0
    deltas = s * w + 0.05 * torch.randn(n, d, generator=g)
    t = build_transform("pca", d=d, k=4).fit(deltas)
    q = t.frame()
    assert q.shape == (d, 4)
    assert q[:, 0].dot(w) > 0.99  # |cos| > 0.99 and points along +w (the mean direction)
    assert _orth_err(q) < 1e-5
    assert not t.trainable and not list(t.parameters()) and not q.requires_grad
    torch.testing.assert_close(t(deltas), deltas @ q)
    # sign convention holds for a flipped input too
    assert build_transform("pca", d=d, k=4).fit(-deltas).frame()[:, 0].dot(w) < -0.99


def test_pca_before_fit_is_a_clear_error_and_state_dict_round_trips():
    t = build_transform("pca", d=8, k=2)
    with pytest.raises(RuntimeError, match=r"before fit\(\)"):
        t(torch.randn(3, 8))
    t.fit(torch.randn(10, 8))
    fresh = PCATransform(d=8, k=2)
    fresh.load_state_dict(t.state_dict())
    h = torch.randn(3, 8)
    torch.testing.assert_close(fresh(h), t(h))
    with pytest.raises(ValueError, match="at least k=2"):
        PCATransform(d=8, k=2).fit(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"shape \(n, d=8\)"):
        PCATransform(d=8, k=2).fit(torch.randn(10, 7))


# -- unembed_null -----------------------------------------------------------------------------


def _hand_built_unembedding() -> tuple[torch.Tensor, torch.Tensor]:
    """W (6, 4) = U diag(10, 1, 0.1, 0) Vᵀ with random orthonormal U, V; returns (W, V)."""
    u, v = _orthogonal(6, 0)[:, :4], _orthogonal(4, 1)
    return u @ torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.0])) @ v.T, v


def test_unembed_null_energy_rule_picks_k():
    """σ² = (100, 1, 0.01, 0), total 101.01: cumulative shares 0.990, 0.9999, 1, 1.
    energy 0.9 → k = 1 (100/101.01 ≥ 0.9); 0.995 → k = 2; 0.99999 → k = 3."""
    w, v = _hand_built_unembedding()
    for energy, k in ((0.9, 1), (0.995, 2), (0.99999, 3)):
        t = build_transform("unembed_null", d=4, lm_head_weight=w, energy=energy)
        assert isinstance(t, UnembedNullTransform) and t.n_removed == k and t.k == 4
    vk, sigma = unembed_basis(w, energy=0.9)
    assert abs(vk[:, 0].dot(v[:, 0]).item()) > 1 - 1e-5  # the top right singular vector
    torch.testing.assert_close(sigma, torch.tensor([10.0, 1.0, 0.1, 0.0]), atol=1e-3, rtol=1e-4)
    assert build_transform("unembed_null", d=4, k=2, lm_head_weight=w).n_removed == 2


def test_unembed_null_removes_the_read_subspace():
    w, v = _hand_built_unembedding()
    t = build_transform("unembed_null", d=4, k=2, lm_head_weight=w)
    h = torch.randn(5, 4)
    out = t(h)
    assert (out @ v[:, :2]).abs().max() < 1e-4  # V_kᵀ T(h) = 0
    torch.testing.assert_close(out @ v[:, 2:], h @ v[:, 2:], atol=1e-4, rtol=0)  # rest kept
    torch.testing.assert_close(t(out), out, atol=1e-5, rtol=0)  # idempotent
    assert (out @ w.T).abs().max() <= 0.1 * h.norm(dim=-1).max() + 1e-4  # only σ ≤ 0.1 is left
    assert not t.trainable and not list(t.parameters())


def test_unembed_null_random_bf16_weight_chunked():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 16, generator=g).to(torch.bfloat16)
    vk, _ = unembed_basis(w, k=5, chunk=64)  # several chunks
    ref = torch.linalg.svd(w.float(), full_matrices=False).Vh[:5].T
    # same subspace: projectors agree
    torch.testing.assert_close(vk @ vk.T, ref @ ref.T, atol=1e-4, rtol=0)


# -- suppressed -------------------------------------------------------------------------------


def test_suppressed_hand_worked():
    """relu([1, −2, 3] − [0, 1, 5]) = relu([1, −3, −2]) = [1, 0, 0]."""
    t = build_transform("suppressed", d=3)
    assert t.needs_prev and t.k == 3
    out = t(torch.tensor([0.0, 1.0, 5.0]), h_prev=torch.tensor([1.0, -2.0, 3.0]))
    assert torch.equal(out, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="same shape"):
        t(torch.zeros(3), h_prev=torch.zeros(4))


# -- table tests over the registry ------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_shapes_dtype_and_finiteness(name):
    t = _make(name)
    h = torch.randn(2, 5, 32, dtype=torch.bfloat16)  # (b, t, d): applied per token
    out = _call(t, h, torch.randn(2, 5, 32, dtype=torch.bfloat16))
    assert out.shape == (2, 5, t.k) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert f"d=32, k={t.k}" in repr(t)
    assert t.trainable == (name in FRAMES)
    assert t.trainable == any(p.requires_grad for p in t.parameters())


@pytest.mark.parametrize("name", TRANSFORMS)
def test_gradients_flow_to_input_and_parameters(name):
    t = _make(name)
    h = (torch.rand(4, 32) + 1).requires_grad_()  # h_prev − h stays in relu's active region
    h_prev = (torch.rand(4, 32) + 3).requires_grad_()
    _call(t, h, h_prev).pow(2).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    if t.needs_prev:
        assert h_prev.grad is not None and h_prev.grad.abs().sum() > 0
    for p in t.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_none_is_identity():
    h = torch.randn(3, 8)
    assert torch.equal(build_transform("none", d=8)(h), h)


# -- errors -----------------------------------------------------------------------------------


def test_build_transform_errors():
    with pytest.raises(ValueError, match="unknown transform 'svd'.*none, pca, hra, ether, ortho, unembed_null, suppressed"):
        build_transform("svd", d=8)
    with pytest.raises(ConfigError, match="unknown transform"):  # also a ReprpoError for the CLI
        build_transform("svd", d=8)
    for name in ("pca", "hra", "ether", "ortho"):
        with pytest.raises(ValueError, match=r"1 <= k <= d=8; got k=9"):
            build_transform(name, d=8, k=9)
        with pytest.raises(ValueError, match="needs an output size k"):
            build_transform(name, d=8)
    with pytest.raises(ValueError, match="k must be None or d=8"):
        build_transform("none", d=8, k=4)
    with pytest.raises(ValueError, match="needs lm_head_weight"):
        build_transform("unembed_null", d=8)
    with pytest.raises(ValueError, match=r"shape \(v, d=8\)"):
        build_transform("unembed_null", d=8, lm_head_weight=torch.randn(10, 7))
    with pytest.raises(ValueError, match="leaves nothing"):
        build_transform("unembed_null", d=8, k=8, lm_head_weight=torch.randn(10, 8))
