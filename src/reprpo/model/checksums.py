"""Checksum manifests of the model conversions reprpo caches (written once, checked on load).

A manifest (MANIFEST) holds size + sha256 of every file; a stamp (VERIFIED) holds each file's
(size, mtime_ns, inode) at the last full check, so a load whose stamp matches only stats files.
`save_on_any_process` writes a conversion from whichever process of a launch makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MANIFEST = "CHECKSUMS.json"  # {relative file name: {"size": bytes, "sha256": hex}}, every file
VERIFIED = "CHECKSUMS.verified.json"  # {relative file name: [size, mtime_ns, inode]} at the last full check


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _write_json(path: Path, obj) -> None:
    """Atomically (tmp file + replace): two processes may stamp the same directory."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_checksums(directory: Path) -> None:
    """Write MANIFEST (size + sha256 of every file) and the VERIFIED stamp in `directory`.

    Called on a finished conversion inside its temporary directory, before the rename (a rename
    keeps inodes and mtimes, so the stamp stays valid)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, VERIFIED))
    manifest = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_json(directory / MANIFEST, manifest)
    _write_json(directory / VERIFIED, {rel: _stat_key(directory / rel) for rel in manifest})


def verify_checksums(directory: Path) -> str | None:
    """None when every file of `directory`'s MANIFEST is intact, else what is wrong (naming the file).

    Sizes are checked always; the full sha256 of a file only when its (size, mtime_ns, inode)
    differ from the VERIFIED stamp, which is then renewed. Timing: a full sha256 of the 538 MB
    SmolLM2 fp32 model.safetensors took 0.56 s here (2 shared cores, file in the page cache),
    so a plain load (stamp matches) only pays a few stat calls."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"cached model {directory} has no checksum manifest (converted by an older reprpo)"
    try:
        stamp = json.loads((directory / VERIFIED).read_text())
    except (OSError, ValueError):
        stamp = {}
    renewed, rehashed = {}, False
    for rel, want in manifest.items():
        path = directory / rel
        try:
            key = _stat_key(path)
        except OSError:
            return f"cached model file {path} is missing"
        if key[0] != want["size"]:
            return f"cached model {path} is corrupt (size {key[0]}, expected {want['size']})"
        if stamp.get(rel) != key:
            if _sha256(path) != want["sha256"]:
                return f"cached model {path} is corrupt (sha256 mismatch)"
            rehashed = True
        renewed[rel] = key
    if rehashed:
        try:
            _write_json(directory / VERIFIED, renewed)
        except OSError:  # a read-only cache: verified, just not stamped; hash again next time
            pass
    return None


def save_on_any_process(model, path: Path) -> None:
    """model.save_pretrained(path) on whichever process calls it. transformers (5.x) writes
    nothing, silently, on a process whose torch.distributed rank is not 0; our conversions are
    per-machine caches that any process of a launch may be the one to make."""
    check = getattr(model, "should_save_on_this_rank", None)
    if check is None:
        model.save_pretrained(path)
        return
    model.should_save_on_this_rank = lambda is_main_process: True  # this instance only
    try:
        model.save_pretrained(path)
    finally:
        del model.should_save_on_this_rank
    if not (path / "config.json").exists():
        from reprpo.errors import ModelError

        raise ModelError(f"saving the model to {path} wrote no config.json; check the disk and try again.")
