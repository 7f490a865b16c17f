"""Allocator setting for CPU runs: keep freed memory in the process for reuse (glibc only).

A training step allocates and frees gigabytes of activations. By default glibc hands large
freed blocks back to the OS (munmap / heap trimming), so the next step page-faults and zeroes
the same memory again. On W1 that was about a tenth of the step (bench/results/). This asks
glibc to serve large blocks from the heap and never trim it: peak RSS stays at its high-water
mark instead of falling between steps. The setting is process-wide; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
_state = {"applied": None}


def keep_freed_memory() -> bool:
    """Apply the setting once; True if this process's allocator (glibc) accepted it."""
    if _state["applied"] is not None:
        return _state["applied"]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has no mallopt)
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            big = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)  # older glibc caps at 32 MiB
            ok = bool(big) and bool(mallopt(M_TRIM_THRESHOLD, -1)) and bool(mallopt(M_TOP_PAD, 64 << 20))  # -1: never trim
    _state["applied"] = ok
    return ok


def enable_gradient_checkpointing(model, *, attention: str | None = None) -> None:
    """`train.gradient_checkpointing`: every decoder block recomputes its activations in the
    backward instead of keeping them. Non-reentrant (torch's recommended mode; exact with hooks
    and with inputs passed by keyword), and the embedding output made to require grad (PEFT's
    fix: a frozen embedding otherwise gives the first checkpointed block inputs without grad).
    transformers drops a KV cache inside a checkpointed block, so a batch prefix (which rides
    on one) is turned off by the loop when this is on. The backward recomputes a block with the
    attention kernel set at that time, not the one the forward ran under: `attention` (the
    training layout's kernel) becomes the model's kernel for as long as it trains."""
    from reprpo.errors import ConfigError
    from reprpo.model.forward import base_model, set_attention

    lm = base_model(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(lm).__name__} does not support it in transformers; "
                          "set --train.gradient_checkpointing false.")
    kw = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name warns there
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    lm.enable_input_require_grads()
    if attention is not None:
        set_attention(model, attention)


def compile_blocks(model) -> int:
    """`speed.compile`: torch.compile each decoder block's `forward` (dynamic shapes: batches
    differ in length). `forward`, not the module: the hooks that capture a block's output run
    outside the compiled code, as they do uncompiled. Returns the number of blocks compiled."""
    import torch

    from reprpo.model.capture import decoder_layers

    blocks = decoder_layers(model)
    for blk in blocks:
        blk.forward = torch.compile(blk.forward, dynamic=True)
    return len(blocks)
