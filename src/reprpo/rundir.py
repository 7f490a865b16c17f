"""Run directories: checked before a model loads, locked while a process writes them, started
clean unless resumed.

The lock is an exclusive `flock` on OUT/.lock, so the kernel frees it when the holder dies
(kill -9 included): a stale lock never blocks a rerun.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reprpo.errors import TrainingError

LOCK = ".lock"
# what `reprpo train` writes: a directory holding config.yaml and one of these is a run directory
MARKER = ".reprpo-run"  # written when a run starts: even a run killed before its first step is ours
RUN_MARKERS = (MARKER, "metrics.csv", "train_report.json", "checkpoints", "adapter_config.json", "tb")
_held: dict[Path, list] = {}  # path -> [file handle, depth]: re-entrant within one process
_created: dict[Path, list[Path]] = {}  # run dir -> the directories this process made for it (removed again if nothing was written)


def check_out_dir(out: Path) -> None:
    """`out` can be a run directory: not a file, creatable and writable (else a clear error)."""
    out = Path(out)
    if not out.exists():  # remember what we make (the run directory and missing parents), deepest first
        _created[out.resolve()] = [p.resolve() for p in (out, *out.parents) if not p.exists()]
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out}: is a file, not a directory. Pass a directory path (new or a run directory).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"--out {out}: cannot write there ({e.strerror or e}). Pass a directory you can write, or fix its permissions.") from e


def is_run_dir(out: Path) -> bool:
    return (out / MARKER).is_file() or ((out / "config.yaml").is_file() and any((out / m).exists() for m in RUN_MARKERS))


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold OUT/.lock exclusively for the block; another process gets a TrainingError at once.
    In a multi-process launch (torchrun / accelerate: RANK set) only process 0 takes it."""
    import fcntl

    key = Path(out).resolve()
    if int(os.environ.get("RANK", "0")) > 0:  # a multi-process run: its process 0 holds the lock for all
        yield
        return
    if key in _held:
        _held[key][1] += 1
    else:
        fh = open(key / LOCK, "a+")  # noqa: SIM115 - held across the block
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise TrainingError(f"--out {out}: in use by {holder}, which is writing this run directory. Wait for it "
                                "to finish, or pass another --out.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        _held[key] = [fh, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            fh = _held.pop(key)[0]
            fh.close()  # releases the flock
            if {p.name for p in key.iterdir()} <= {LOCK, MARKER}:  # failed before writing anything: leave no trace
                for name in (LOCK, MARKER):
                    (key / name).unlink(missing_ok=True)
                for made in _created.pop(key, []):
                    try:
                        made.rmdir()  # only while empty
                    except OSError:
                        break


def start_clean(out: Path) -> bool:
    """Empty a run directory for a fresh run (True if an earlier run was cleared). A non-empty
    directory that is not a run directory is left alone: an error, nothing deleted."""
    out = Path(out)
    entries = [p for p in out.iterdir() if p.name != LOCK]
    if not entries:
        return False
    if not is_run_dir(out):
        raise TrainingError(f"--out {out}: not empty and not a reprpo run directory ({', '.join(sorted(p.name for p in entries)[:5])}); "
                            "nothing was changed. Pass a new or empty directory.")
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return True


def mark_run(out: Path) -> None:
    """Mark `out` as a run directory (before anything else is written into it)."""
    (Path(out) / MARKER).touch()
