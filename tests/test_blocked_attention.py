"""Blocked attention (speed.packed_attention=blocks): SDPA per query block over its visible keys."""

import pytest
import torch

from reprpo.data.pairs import PreferencePair
from reprpo.data.tokenize import collate_packed, tokenize_pairs
from reprpo.model import blocked_attention as ba
from reprpo.model.forward import model_inputs
from reprpo.model.layout import resolve_packed_attention


def _one_pair_mask() -> torch.Tensor:
    """Packed row of one pair: prompt p0 p1 | chosen c0 c1 | rejected r0 r1 (nothing shared).

    Query -> visible keys: p0 {0}; p1 {0,1}; c0 {0,1,2}; c1 {0..3}; r0 {0,1,4}; r1 {0,1,4,5}."""
    allow = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    allow[4:, 2:4] = False
    return torch.zeros(1, 1, 6, 6).masked_fill(~allow, torch.finfo(torch.float32).min)


def test_block_plan_hand_worked():
    """Blocks of 2 queries: [p0 p1] see keys 0..1 (a run), [c0 c1] keys 0..3 (a run), and
    [r0 r1] keys {0, 1, 4, 5} (not a run: an index; c0 c1 are skipped). Blocks of 4: [p0..c1]
    see 0..3; [r0 r1] as before. One block of 6: all six keys."""
    m = _one_pair_mask()
    plan = ba.block_plan(m, 2)
    assert [(s, e) for s, e, _ in plan] == [(0, 2), (2, 4), (4, 6)]
    assert plan[0][2] == slice(0, 2) and plan[1][2] == slice(0, 4)
    assert plan[2][2].tolist() == [0, 1, 4, 5]
    plan4 = ba.block_plan(m, 4)
    assert plan4[0][2] == slice(0, 4) and plan4[1][2].tolist() == [0, 1, 4, 5]
    assert ba.block_plan(m, 6) == [(0, 6, slice(0, 6))]
    assert ba.block_plan(m > -1, 2)[2][2].tolist() == [0, 1, 4, 5]  # a boolean mask reads the same


class _Attn(torch.nn.Module):
    num_key_value_groups = 2


def _packed_mask(tok) -> torch.Tensor:
    """The float mask of a real shared-prompt batch: three pairs, shared response tokens, a
    batch prefix (every row sees it: the leading columns)."""
    head = "### Instruction: answer\n"
    ps = [PreferencePair(head + "Q: 2+2?", " the answer is 4", " the answer is 5"),
          PreferencePair(head + "x", " hi there", " no"),
          PreferencePair(head + "Say hi to the nice reader", " a long answer here", " a long answer there")]
    tp = tokenize_pairs(ps, tok, max_length=128, max_prompt_length=64)[0]
    batch = collate_packed(tp, pad_id=tok.pad_token_id, share_prefix=True, share_response=True)
    assert batch.prefix_len > 0 and batch.n_shared_response > 0
    return model_inputs(batch, dtype=torch.float32)["attention_mask"]  # (3, 1, t, h + t)


@pytest.mark.parametrize("block", [1, 4, 16])
def test_blocked_equals_dense_sdpa_values_and_grads(tiny, monkeypatch, block):
    """Every query block over only its visible keys == dense SDPA with the full mask, for a
    real packed mask with grouped-query heads (4 query heads, 2 key/value heads): outputs to
    1e-5 and gradients of q, k, v to 1e-5."""
    _, tok = tiny
    mask = _packed_mask(tok)
    r, _, t, tk = mask.shape
    monkeypatch.setattr(ba, "QUERY_BLOCK", block)
    torch.manual_seed(0)
    q0, k0, v0 = torch.randn(r, 4, t, 8), torch.randn(r, 2, tk, 8), torch.randn(r, 2, tk, 8)
    w = torch.randn(r, t, 4, 8)
    outs, grads = [], []
    for fn in ("dense", "blocked"):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        if fn == "dense":
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3).transpose(1, 2)
        else:
            o, _ = ba.blocked_attention_forward(_Attn(), q, k, v, mask, scaling=0.3)
        (o * w).sum().backward()
        outs.append(o.detach())
        grads.append([x.grad for x in (q, k, v)])
    assert outs[1].shape == (r, t, 4, 8)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_blocked_plan_cache_follows_the_mask(monkeypatch):
    """The plan is reused while the same mask object comes back (every layer), and rebuilt
    for a new mask: a stale plan would attend the wrong keys."""
    monkeypatch.setattr(ba, "QUERY_BLOCK", 2)
    m1 = _one_pair_mask()
    m2 = torch.zeros(1, 1, 6, 6).masked_fill(~torch.tril(torch.ones(6, 6, dtype=torch.bool)), torch.finfo(torch.float32).min)
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    for m in (m1, m2, m1):
        want = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, 6, 4), v.expand(1, 2, 6, 4),
                                                                attn_mask=m).transpose(1, 2)
        got, _ = ba.blocked_attention_forward(_Attn(), q, k, v, m)
        assert torch.allclose(got, want, atol=1e-6)


def test_auto_kernel_per_stage():
    assert resolve_packed_attention("auto", training=False, device_type="cpu") == "blocks"
    assert resolve_packed_attention("auto", training=True, device_type="cpu") == "eager"
    assert resolve_packed_attention("auto", training=False, device_type="cuda") == "keep"
    assert resolve_packed_attention("sdpa", training=False, device_type="cpu") == "sdpa"
