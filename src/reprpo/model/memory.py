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
