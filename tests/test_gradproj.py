"""projgrad / projbp on the tiny Llama: the maths of each projection, per-pair directions,
accumulation = large batch, β = 1 = DPO, hooks that always go away."""

import math
from contextlib import nullcontext

import pytest
import torch

from reprpo.config import RunConfig, apply_overrides
from reprpo.data.layout import Layout
from reprpo.data.pairs import PreferencePair
from reprpo.data.tokenize import collate_pairs, tokenize_pairs
from reprpo.methods.gradproj import (
    lora_modules,
    projbp,
    projected_weight_grad,
    projgrad,
    reference_directions,
    rewrite_grad_output,
)
from reprpo.methods.losses import dpo_loss
from reprpo.model.forward import adapter_disabled, sequence_logps

TEXTS = [
    ("Q: 2+2?", " 4", " 5 or so"),
    ("Say hi to the reader", " hi there", " no"),
    ("x", " a long answer here", " b"),
    ("Name a colour", " blue", " seven!!"),
]
TOP = "model.layers.1.mlp.down_proj"  # no adapted module lies between its output and the loss
LOW = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A width-64 model gains nothing from intra-op threads; on a shared 2-core machine two
    spinning threads made each backward ~100x slower (3 s instead of 30 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(tok, idx):
    pairs = [PreferencePair(*TEXTS[i]) for i in idx]
    return collate_pairs(tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=32)[0], pad_id=tok.pad_token_id)


def _backward(model, batch, method=None, *, scale=1.0):
    """scale · DPO(batch).backward() inside method(model, dirs) (None = plain DPO); grads accumulate."""
    dirs, ref = reference_directions(model, batch)
    with method(model, dirs) if method else nullcontext():
        pol = sequence_logps(model, batch)
        loss = dpo_loss(*pol.chosen_rejected(), *ref.chosen_rejected(), beta=0.1)[0].mean()
        (scale * loss).backward()
    return dirs


def _grads(model, batches, method=None):
    """{param name: grad} of Σ DPO(mb)/len(batches) over micro-batches (fresh .grad)."""
    model.zero_grad(set_to_none=True)
    for b in batches:
        _backward(model, b, method, scale=1 / len(batches))
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert len(out) == 2 * 7 * 2  # A and B of q,k,v,o,gate,up,down in 2 layers
    for n, g in out.items():
        assert torch.isfinite(g).all(), n
    return out


def _B(grads, name):
    return next(g for n, g in grads.items() if n.endswith(f"{name}.lora_B.default.weight"))


def _assert_close(a, b, *, tol=1e-5, keys=None):
    """max |a − b| ≤ tol · max |b| per tensor (grads here range 1e-6 … 0.1; observed errors ~1e-6 of scale)."""
    for n in keys or a:
        err = (a[n] - b[n]).abs().max().item()
        assert err <= tol * b[n].abs().max().item() + 1e-12, (n, err)


def pg(beta):
    return lambda m, d: projgrad(m, d, beta=beta)


def pb(beta, **kw):
    return lambda m, d: projbp(m, d, beta=beta, **kw)


def test_reference_directions_are_unit_per_pair_and_ref_logps_match(lora):
    model, tok = lora
    batch = _batch(tok, [0, 1, 2])
    dirs, ref = reference_directions(model, batch)
    mods = lora_modules(model)
    assert set(dirs) == set(mods) and len(mods) == 14 and TOP in mods
    assert dirs["model.layers.0.self_attn.k_proj"].shape == (3, 32)  # (b, d_out): 2 kv heads × 16
    for u in dirs.values():
        assert torch.allclose(u.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad(), adapter_disabled(model):
        want = sequence_logps(model, batch)
        # u_0 by hand for one module: response-mean of the base layer's output, chosen − rejected
        x = {}
        h = mods[LOW].base_layer.register_forward_hook(lambda m, a, y: x.setdefault("y", y))
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        h.remove()
    m = batch.response_mask.float()[..., None]
    pooled = (x["y"] * m).sum(1) / m.sum(1)
    assert torch.allclose(dirs[LOW][0], torch.nn.functional.normalize(pooled[0] - pooled[3], dim=0), atol=1e-5)
    assert torch.allclose(ref.logp_sum, want.logp_sum, atol=1e-5)


def test_projected_weight_grad_by_hand():
    """One pair, one token per row, o = 2, k = 1: G = g⁺a⁺ᵀ + g⁻a⁻ᵀ = (1,2)·1 + (3,−1)·2 = (7, 0)ᵀ;
    u = (0, 1): uuᵀG = (0, 0)ᵀ, β = 0.5 adds 0.5·(7, 0)ᵀ."""
    g = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]])  # (r=2, t=1, o=2)
    a = torch.tensor([[[1.0]], [[2.0]]])  # (2, 1, k=1)
    u = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(projected_weight_grad(g, a, u, beta=0.0), torch.zeros(2, 1))
    assert torch.allclose(projected_weight_grad(g, a, u, beta=0.5), torch.tensor([[3.5], [0.0]]))
    assert torch.allclose(projected_weight_grad(g, a, torch.tensor([[1.0, 0.0]]), beta=0.0), torch.tensor([[7.0], [0.0]]))


def test_projgrad_beta0_b_columns_lie_in_span_of_batch_directions(lora):
    model, tok = lora
    one = _batch(tok, [1])
    dirs, _ = reference_directions(model, one)
    grads = _grads(model, [one], pg(0.0))
    for name, u in dirs.items():
        G = _B(grads, name)  # (o, k)
        norms = G.norm(dim=0)
        assert norms.max() > 0, name
        for j in range(G.shape[1]):
            if norms[j] > 1e-3 * norms.max():
                assert abs(torch.dot(G[:, j], u[0]) / norms[j]) > 0.999, (name, j)

    four = _batch(tok, [0, 1, 2, 3])
    dirs, _ = reference_directions(model, four)
    grads = _grads(model, [four], pg(0.0))
    for name, u in dirs.items():
        G = _B(grads, name)
        Q = torch.linalg.qr(u.T).Q  # (o, 4) orthonormal basis of span(u_1..u_4)
        assert (G - Q @ (Q.T @ G)).norm() < 1e-4 * G.norm(), name


def test_each_pair_uses_its_own_direction(lora):
    """Regression: the earlier code projected the whole batch on u_0."""
    model, tok = lora
    two = _batch(tok, [0, 1])
    dirs, _ = reference_directions(model, two)
    batch = _grads(model, [two], pg(0.0))
    singles = _grads(model, [_batch(tok, [0]), _batch(tok, [1])], pg(0.0))  # each ½·DPO(pair)
    _assert_close(batch, singles)
    for name, u in dirs.items():
        assert abs(torch.dot(u[0], u[1])) < 0.99, name
        G, u0 = _B(batch, name), u[0][:, None]
        assert (G - u0 @ (u0.T @ G)).norm() > 1e-2 * G.norm(), name


@pytest.mark.parametrize(
    "method",
    [pg(0.0), pg(0.3), pb(0.0), pb(0.2, rectify="leaky", leak=0.1, renorm=True)],
    ids=["projgrad0", "projgrad0.3", "projbp0", "projbp-leaky-renorm"],
)
def test_two_accumulated_microbatches_equal_one_batch(lora, method):
    model, tok = lora
    big = _grads(model, [_batch(tok, [0, 1, 2, 3])], method)
    acc = _grads(model, [_batch(tok, [0, 1]), _batch(tok, [2, 3])], method)
    _assert_close(acc, big)


def test_projgrad_beta1_is_dpo_and_lora_a_is_never_touched(lora):
    model, tok = lora
    batch = _batch(tok, [0, 1, 2])
    dpo = _grads(model, [batch])
    _assert_close(_grads(model, [batch], pg(1.0)), dpo)
    a_names = [n for n in dpo if "lora_A" in n]
    for beta in (0.0, 0.5):
        got = _grads(model, [batch], pg(beta))
        _assert_close(got, dpo, keys=a_names)
        assert not torch.allclose(_B(got, TOP), _B(dpo, TOP), atol=1e-6)


def test_rewrite_grad_output_by_hand():
    """u = (1, 0), g = (2, 3) on both rows of one pair (row 0 chosen, row 1 rejected), β = 0.5:
    identity → (2, 1.5) on both; leaky 0.1: chosen has ⟨g,u⟩ = 2 > 0 (wrong sign) → (0.2, 1.5),
    rejected keeps (2, 1.5); renorm scales (2, 1.5) to ‖g‖ = √13: × √13/2.5."""
    u = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[[2.0, 3.0]], [[2.0, 3.0]]])  # (r=2, t=1, o=2)
    ident = rewrite_grad_output(g, u, beta=0.5)
    assert torch.allclose(ident, torch.tensor([[[2.0, 1.5]], [[2.0, 1.5]]]))
    leaky = rewrite_grad_output(g, u, beta=0.5, rectify="leaky", leak=0.1)
    assert torch.allclose(leaky, torch.tensor([[[0.2, 1.5]], [[2.0, 1.5]]]))
    # sign flipped: now the chosen row is right (⟨g,u⟩ = −2 < 0) and the rejected row is leaked
    leaky_neg = rewrite_grad_output(-g, u, beta=0.5, rectify="leaky", leak=0.1)
    assert torch.allclose(leaky_neg, torch.tensor([[[-2.0, -1.5]], [[-0.2, -1.5]]]))
    renorm = rewrite_grad_output(g, u, beta=0.5, renorm=True)
    assert torch.allclose(renorm, torch.tensor([[[2.0, 1.5]], [[2.0, 1.5]]]) * math.sqrt(13) / 2.5)
    assert torch.equal(rewrite_grad_output(torch.zeros(2, 1, 2), u, beta=0.0, renorm=True), torch.zeros(2, 1, 2))
    assert torch.allclose(rewrite_grad_output(g, u, beta=0.0), torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]]]))
    with pytest.raises(ValueError, match="rectify"):
        rewrite_grad_output(g, u, beta=0.0, rectify="relu")


def test_projbp_changes_upstream_grads_and_beta1_is_dpo(lora):
    model, tok = lora
    batch = _batch(tok, [0, 1, 2])
    dpo = _grads(model, [batch])
    _assert_close(_grads(model, [batch], pb(1.0)), dpo)
    bp0 = _grads(model, [batch], pb(0.0))
    low_a = next(n for n in dpo if f"{LOW}.lora_A" in n)
    assert (bp0[low_a] - dpo[low_a]).norm() > 1e-2 * dpo[low_a].norm()
    # nothing adapted lies above TOP, so its LoRA-B gets exactly projgrad's Σ_b u_b u_bᵀ G_b
    assert torch.allclose(_B(bp0, TOP), _B(_grads(model, [batch], pg(0.0)), TOP), atol=1e-7, rtol=1e-5)
    leaky = _grads(model, [batch], pb(0.0, rectify="leaky", leak=0.0))
    assert not torch.allclose(leaky[low_a], bp0[low_a])


def _n_hooks(model):
    fwd = sum(len(m._forward_hooks) for m in model.modules())
    par = sum(len(p._backward_hooks or {}) for p in model.parameters())
    return fwd, par


@pytest.mark.parametrize("method", [pg(0.0), pb(0.0, rectify="leaky")], ids=["projgrad", "projbp"])
def test_hooks_are_removed_after_the_context_and_after_an_error(lora, method):
    model, tok = lora
    batch = _batch(tok, [0, 1])
    before = _n_hooks(model)
    dpo = _grads(model, [batch])
    _grads(model, [batch], method)
    assert _n_hooks(model) == before
    dirs, ref = reference_directions(model, batch)
    with pytest.raises(KeyError, match="boom"):
        with method(model, dirs):
            assert _n_hooks(model) != before
            pol = sequence_logps(model, batch)  # its graph's tensors carry gradient hooks
            raise KeyError("boom")
    assert _n_hooks(model) == before
    # a backward through that graph after the context is plain DPO: no tensor hook still acts
    model.zero_grad(set_to_none=True)
    dpo_loss(*pol.chosen_rejected(), *ref.chosen_rejected(), beta=0.1)[0].mean().backward()
    _assert_close({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, dpo)
    _assert_close(_grads(model, [batch]), dpo)


def test_mismatched_directions_are_refused(lora):
    model, tok = lora
    dirs, _ = reference_directions(model, _batch(tok, [0, 1]))
    with pytest.raises(ValueError, match="reference_directions"):
        with projgrad(model, {k: v for k, v in dirs.items() if k != TOP}, beta=0.0):
            pass
    with pytest.raises(RuntimeError, match="same batch"):
        with projbp(model, dirs, beta=0.0):
            sequence_logps(model, _batch(tok, [0, 1, 2]))
    pol = sequence_logps(model, _batch(tok, [0, 1]))  # graph built outside the context
    with pytest.raises(RuntimeError, match="inside the projgrad context"):
        with projgrad(model, dirs, beta=0.0):
            pol.logp_sum.sum().backward()
    model.zero_grad(set_to_none=True)
    assert _n_hooks(model) == (0, 0)


def _packed(tok, idx, *, share_response=False):
    from reprpo.data.tokenize import collate_packed

    pairs = [PreferencePair(*TEXTS[i]) for i in idx]
    return collate_packed(tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=32)[0], pad_id=tok.pad_token_id,
                          share_response=share_response)


def _grads_layout(model, batch, method):
    """{param: grad} of DPO(batch) inside method(model, dirs, rows) (the batch's own layout)."""
    model.zero_grad(set_to_none=True)
    dirs, ref = reference_directions(model, batch)
    with method(model, dirs, batch.row_pair):
        pol = sequence_logps(model, batch)
        dpo_loss(*pol.chosen_rejected(), *ref.chosen_rejected(), beta=0.1)[0].mean().backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    "method",
    [lambda m, d, r: projgrad(m, d, beta=0.0, rows=r), lambda m, d, r: projgrad(m, d, beta=0.3, rows=r),
     lambda m, d, r: projbp(m, d, beta=0.0, rows=r), lambda m, d, r: projbp(m, d, beta=0.2, rows=r)],
    ids=["projgrad0", "projgrad0.3", "projbp0", "projbp0.2"],
)
def test_shared_prompt_layout_gives_the_padded_gradients(lora, method):
    """Both projections are linear in g per pair, so a shared prompt token carrying g⁺ + g⁻
    is projected as the two padded rows are: every LoRA gradient matches the padded layout,
    for prompts of different lengths in one batch. The directions match too."""
    model, tok = lora
    idx = [0, 1, 2, 3]
    padded = _batch(tok, idx)
    want = _grads_layout(model, padded, method)
    d_pad, _ = reference_directions(model, padded)
    dpo = _grads(model, [padded])
    for share_response in (False, True):  # (" 5 or so" shares " " with " 4": the response tokens too)
        packed = _packed(tok, idx, share_response=share_response)
        assert packed.input_ids.shape[0] == 4 and padded.input_ids.shape[0] == 8
        assert (packed.n_shared_response > 0) == share_response
        d_pack, _ = reference_directions(model, packed)
        for n in d_pad:
            assert torch.allclose(d_pack[n], d_pad[n], atol=1e-5), n
        got = _grads_layout(model, packed, method)
        _assert_close(got, want, tol=1e-4)
        assert not all(torch.allclose(got[n], dpo[n], atol=1e-7) for n in dpo)  # the projection acted


def test_leaky_and_renorm_refuse_the_shared_prompt_layout(lora):
    model, tok = lora
    batch = _packed(tok, [0, 1])
    dirs, _ = reference_directions(model, batch)
    for kw in ({"rectify": "leaky"}, {"renorm": True}):
        with pytest.raises(ValueError, match="padded"):
            with projbp(model, dirs, beta=0.0, rows=batch.row_pair, **kw):
                sequence_logps(model, batch)
    assert _n_hooks(model) == (0, 0)


def test_cached_directions_equal_online_ones(lora, tmp_path, monkeypatch):
    """build_ref_cache(directions=...) stores u_b per pair and module; a batch's lookup equals
    reference_directions on that batch (padded and shared-prompt layouts). On disk they come
    back memory-mapped and equal; another module set is another cache file."""
    import reprpo.model.refcache as rc
    from reprpo.data.tokenize import collate
    from reprpo.model.refcache import build_ref_cache

    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "c"))
    model, tok = lora
    pairs = tokenize_pairs([PreferencePair(*t) for t in TEXTS], tok, max_length=64, max_prompt_length=32)[0]
    for packed in (False, True):
        cache = build_ref_cache(model, pairs, pad_id=tok.pad_token_id, layout=Layout(packed=packed), batch_size=3,
                                directions=lora_modules(model))
        with monkeypatch.context() as mp:
            mp.setattr(rc, "sequence_logps", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
            again = build_ref_cache(model, pairs, pad_id=tok.pad_token_id, layout=Layout(packed=packed), batch_size=3,
                                    directions=lora_modules(model))
            assert all(torch.equal(again.dirs[n], cache.dirs[n]) for n in cache.dirs)
            with pytest.raises(AssertionError, match="recomputed"):
                build_ref_cache(model, pairs, pad_id=tok.pad_token_id, layout=Layout(packed=packed), batch_size=3,
                                directions={TOP: lora_modules(model)[TOP]})
        assert set(cache.dirs) == set(lora_modules(model)) and cache.dirs[TOP].shape[0] == 4
        batch = collate([pairs[i] for i in (3, 1)], pad_id=tok.pad_token_id, packed=packed)
        got = cache.lookup(batch)
        want, ref = reference_directions(model, batch)
        for n in want:
            assert torch.allclose(got.dirs[n], want[n], atol=1e-5), (packed, n)
        assert torch.allclose(got.logps.logp_sum, ref.logp_sum, atol=1e-4)


@pytest.mark.parametrize("name", ["projgrad", "projbp"])
def test_method_with_cached_directions_and_shared_layout_gives_the_padded_gradients(lora, name, tmp_path, monkeypatch):
    """GradMethod as train() runs it: directions and ℓ_ref from the reference cache, the
    shared-prompt layout with shared response tokens -> the gradients of the padded layout with
    an online reference pass."""
    from reprpo.data.layout import Layout
    from reprpo.data.tokenize import collate
    from reprpo.methods.presets import build_method
    from reprpo.model.refcache import build_ref_cache

    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path))
    model, tok = lora
    cfg = apply_overrides(RunConfig(), {"train.method": name, "method.proj_beta": 0.2}, where="t")
    method = build_method(cfg, model)
    assert method.packing and not method.prefix and method.reference.directions
    pairs = tokenize_pairs([PreferencePair(*t) for t in TEXTS], tok, max_length=64, max_prompt_length=32)[0]
    lay = {"packed": True, "share_response": True}
    cache = build_ref_cache(model, pairs, pad_id=tok.pad_token_id, batch_size=3, directions=lora_modules(model), layout=Layout(**lay))

    def grads(batch, ref):
        model.zero_grad(set_to_none=True)
        with method.step(model, batch, ref=ref) as ref:
            loss, _ = method.loss(model, batch, ref=ref)
            loss.mean().backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    sel = [pairs[i] for i in (2, 0, 3)]
    shared = collate(sel, pad_id=tok.pad_token_id, **lay)
    assert shared.n_shared_response > 0
    direct = pg(0.2) if name == "projgrad" else pb(0.2)  # the padded layout, online directions, no method object
    want = _grads(model, [collate(sel, pad_id=tok.pad_token_id, packed=False)], direct)
    _assert_close(grads(shared, cache.lookup(shared)), want, tol=1e-4)
    leaky = build_method(apply_overrides(cfg, {"method.projbp_rectify": "leaky"}, where="t"), model)
    assert leaky.packing == (name == "projgrad")
