"""speed.keep_memory: freed memory stays in the process (glibc), so the next step reuses it."""

import subprocess
import sys

import pytest

from reprpo.model.memory import keep_freed_memory

PROBE = r"""
import sys, torch
from reprpo.model.memory import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
x = torch.ones(64 * 2**20)  # 256 MiB, touched
before = rss_mb()
del x
print(before - rss_mb())
"""


def _freed_mb(mode: str) -> float:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not keep_freed_memory(), reason="allocator is not glibc")
def test_freed_block_stays_in_process_only_when_on():
    """A touched 256 MiB tensor: deleting it returns ~256 MiB to the OS by default (mmap),
    and ~0 with the setting on (the pages stay mapped for the next allocation)."""
    assert _freed_mb("off") > 200
    assert _freed_mb("on") < 16


def test_idempotent():
    assert keep_freed_memory() == keep_freed_memory()
