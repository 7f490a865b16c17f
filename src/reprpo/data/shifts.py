"""Named distribution shifts: train on `train`, score on train / test / oos / rnd.

A shift spec is `builtin:NAME` (the package's generated suite) or `PATH/shifts.json:NAME`
(GENIES layout: PATH/<dist>/train.json and test.json beside the shifts file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reprpo.errors import ConfigError

SPLITS = ("train", "test", "oos", "rnd")


@dataclass(frozen=True)
class Shift:
    name: str
    train: str  # source of the training pairs
    splits: dict[str, str]  # split name -> source to score


def shift_spec(name: str) -> str:
    """`difficulty` -> `builtin:difficulty`; specs with a prefix (`builtin:`, `PATH/shifts.json:`) are kept."""
    name = name.strip()
    return name if ":" in name else f"builtin:{name}"


def _genies_shifts(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigError(f"shifts file not found: {path}.")
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON shifts file ({e}).") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path}: expected a JSON list of {{name, train, oos, rnd}} objects.")
    for i, r in enumerate(rows):
        missing = [k for k in ("name", "train", "oos", "rnd") if not isinstance(r.get(k), str)]
        if missing:
            raise ConfigError(f"{path}, entry {i}: missing or non-string field(s) {missing}.")
    return rows


def list_shifts(spec_prefix: str) -> list[dict[str, str]]:
    """All shifts of a source: `builtin` or a shifts.json path."""
    if spec_prefix == "builtin":
        from reprpo.data.builtin import SHIFTS

        return list(SHIFTS)
    return _genies_shifts(Path(spec_prefix))


def resolve_shift(spec: str) -> Shift:
    if ":" not in spec:
        raise ConfigError(f"data.shift {spec!r}: expected `builtin:NAME` or `PATH/shifts.json:NAME`.")
    prefix, name = spec.rsplit(":", 1)
    rows = {r["name"]: r for r in list_shifts(prefix)}
    if name not in rows:
        raise ConfigError(f"data.shift: no shift {name!r} in {prefix}. Known: {', '.join(rows)}.")
    r = rows[name]
    if prefix == "builtin":
        src = lambda dist, split: f"builtin:{dist}/{split}"
    else:
        root = Path(prefix).parent
        src = lambda dist, split: str(root / dist / f"{split}.json")
    return Shift(
        name=name,
        train=src(r["train"], "train"),
        splits={"train": src(r["train"], "train"), "test": src(r["train"], "test"),
                "oos": src(r["oos"], "test"), "rnd": src(r["rnd"], "test")},
    )


def data_sources(*, shift: str, train: str, eval_splits: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(training source, eval splits) from the config: explicit values override the shift's."""
    if shift:
        s = resolve_shift(shift)
        return train or s.train, eval_splits or s.splits
    if not train:
        raise ConfigError("Set data.train (a data source) or data.shift (a named shift).")
    return train, eval_splits or {"train": train}
