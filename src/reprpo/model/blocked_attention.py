"""Attention over a 4D mask that skips, per block of queries, the keys none of them may see.

softmax(q kᵀ·s + m) v, computed for each block of `QUERY_BLOCK` queries over only the key
columns at least one query of the block may attend (ours).

Why: the shared-prompt layout needs an arbitrary 4D mask, and SDPA cannot skip masked work for
one (it does only for `is_causal`). It computes the whole t × (h + t) square: the prompt's
upper triangle and the chosen tokens the rejected tail cannot see. On W2's 128 pairs, 48% of
that square is visible and blocks of 128 queries compute 62% of it (README "Performance").

Exact: a skipped column carries the mask's large negative value for every query of the block,
so its softmax weight is exactly 0 in the dense computation too. Results equal dense SDPA up
to float summation order (tested against it, values and gradients).

Registered with transformers as the attention implementation "reprpo_blocks"; a call without a
4D mask (e.g. encoding a batch prefix) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch

NAME = "reprpo_blocks"
QUERY_BLOCK = 128  # queries per SDPA call; tests set it small to cover many blocks

PLAN_ATTR = "_reprpo_block_plan"  # the plan rides on the mask tensor itself: one mask serves every layer, no module state


def block_plan(mask: torch.Tensor, block: int) -> list[tuple[int, int, slice | torch.Tensor]]:
    """[(q_start, q_end, keys)] for an additive or boolean (R, 1|H, tq, tk) mask.

    `keys` is a slice when a block's visible keys form one run of columns, else an index."""
    allow = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    tq, tk = allow.shape[-2:]
    seen = allow.flatten(0, 1)  # (R·H, tq, tk)
    plan = []
    for s in range(0, tq, block):
        e = min(s + block, tq)
        cols = seen[:, s:e].any(dim=(0, 1)).nonzero().squeeze(1)  # (k,)
        if cols.numel() == 0:  # no query of the block sees anything: keep the dense behaviour
            keys = slice(0, tk)
        elif int(cols[-1] - cols[0]) + 1 == cols.numel():
            keys = slice(int(cols[0]), int(cols[-1]) + 1)
        else:
            keys = cols
        plan.append((s, e, keys))
    return plan


def _plan_for(mask: torch.Tensor, block: int):
    """The mask's plan, built on its first layer and kept on the mask object (so each scoring
    worker's batch has its own, and it dies with the batch)."""
    b, plan = getattr(mask, PLAN_ATTR, (None, None))
    if b == block:
        return plan
    plan = block_plan(mask, block)
    setattr(mask, PLAN_ATTR, (block, plan))
    return plan


def blocked_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Same contract as transformers' `sdpa_attention_forward` (whose signature, with its
    pass-through keyword arguments, the AttentionInterface fixes): query (R, hq, tq, d),
    key/value (R, hkv, tk, d), additive mask (R, 1, tq, tk) -> (R, tq, hq, d), None."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    tq = query.shape[2]
    if attention_mask is None or attention_mask.dim() != 4 or tq <= QUERY_BLOCK or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    outs = []
    for s, e, keys in _plan_for(attention_mask, QUERY_BLOCK):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, keys], value[:, :, keys], attn_mask=attention_mask[:, :, s:e, keys],
            dropout_p=dropout, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> bool:
    """Make "reprpo_blocks" a transformers attention implementation; False if this transformers
    has no AttentionInterface (then the setting falls back to sdpa, see forward.attention_impl)."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, blocked_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks it builds itself (a prefix) are SDPA's
    return True


REGISTERED = register()
