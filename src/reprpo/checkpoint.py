"""Training checkpoints for `reprpo train --resume`: atomic directories of safetensors + JSON.

    OUT/checkpoints/step-N/
        state.safetensors    tensors: adapter/NAME, method/NAME, optim/I/KEY, rng/torch, rng/DEVICE/I, rng/numpy
        rng-R.safetensors    the RNG tensors of process R > 0 (multi-process runs)
        meta.json            the rest: step, data position, scheduler, optimiser groups, python RNG,
                             metrics rows so far, the run's config and the code version

A checkpoint is written to `checkpoints/.tmp-step-N`, every file fsynced, then renamed, so a
killed write leaves no `step-N`. Nothing is unpickled on load: tensors come from safetensors,
the rest from JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from reprpo.errors import TrainingError

STATE, META = "state.safetensors", "meta.json"
# config keys that do not change what training computes: a resumed run may differ in them
NOT_CHECKED = ("out", "train.progress", "train.save_every", "train.keep_checkpoints", "train.report_to")
NOT_CHECKED_SECTIONS = ("eval",)


def code_version() -> str:
    """Package version + a hash of the package's source: any code change makes a new version."""
    from reprpo import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


# -- RNG -----------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG of this process: python, numpy, torch CPU and each accelerator device."""
    import numpy as np

    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        tensors["rng/mps/0"] = torch.mps.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if "rng/mps/0" in tensors and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(tensors["rng/mps/0"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = meta["python"]
    random.setstate((version, tuple(internal), py_gauss))


# -- optimiser -----------------------------------------------------------------------------------
def optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state_dict split into tensors (optim/I/KEY) and JSON (groups, scalars)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{i}/{k}"] = v
            else:
                scalars[f"{i}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, i, k = key.split("/", 2)
            state.setdefault(int(i), {})[k] = v
    for key, v in meta["scalars"].items():
        i, k = key.split("/", 1)
        state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- files ---------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
             and (p / META).is_file() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def begin_checkpoint(out: Path, step: int) -> Path:
    """A fresh temporary directory for step `step`'s checkpoint (main process)."""
    tmp = Path(out) / "checkpoints" / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    """Process `rank` > 0 writes its RNG state into the temporary checkpoint directory."""
    from safetensors.torch import save_file

    tensors, meta = rng_state()
    path = tmp / f"rng-{rank}.safetensors"
    save_file(tensors, str(path), metadata={"json": json.dumps(meta)})
    _fsync(path)


def finish_checkpoint(tmp: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, keep: int) -> Path:
    """Write the main process's files, fsync, rename `.tmp-step-N` -> `step-N`, keep the newest `keep`."""
    from safetensors.torch import save_file

    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"refusing to checkpoint non-finite tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}).")
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp / STATE))
    (tmp / META).write_text(json.dumps(meta))
    for p in tmp.iterdir():
        _fsync(p)
    _fsync(tmp)
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(tmp.parent)
    for old in checkpoints(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path, *, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint; process `rank` > 0 gets its own RNG tensors and state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / STATE))
        if rank:
            rng = path / f"rng-{rank}.safetensors"
            tensors = {k: v for k, v in tensors.items() if not k.startswith("rng/")} | load_file(str(rng))
            with safe_open(str(rng), "pt") as f:
                meta["rng"] = json.loads(f.metadata()["json"])
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise TrainingError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}). Delete it to resume from an "
                            "earlier one, or train without --resume.") from e
    return tensors, meta


def check_matches(meta: dict[str, Any], config: dict[str, Any], *, path: Path) -> None:
    """A checkpoint continues only the run it was written by: same code version, same config
    (`config`: the run's config as dotted keys, `config.to_flat`; keys that change no result
    aside); else a TrainingError naming what differs."""
    now = code_version()
    if meta.get("code_version") != now:
        raise TrainingError(f"{path}: written by reprpo {meta.get('code_version')}, this is {now}: a run is never resumed "
                            "across code versions (the result would mix two codes). Train it again without --resume.")
    def relevant(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in NOT_CHECKED and k.split(".", 1)[0] not in NOT_CHECKED_SECTIONS}
    saved, current = relevant(meta["config"]), relevant(config)
    diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if diff:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in diff[:5])
        raise TrainingError(f"{path}: written with other settings ({shown}{'; ...' if len(diff) > 5 else ''}). Resume with the "
                            "run's own settings (its config.yaml), or train without --resume.")
