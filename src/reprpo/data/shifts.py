"""Named distribution shifts: train on `train`, score on train / test / oos / rnd.

A shift spec is `builtin:NAME` (the package's generated suite) or `PATH/shifts.json:NAME`
(GENIES layout: PATH/<dist>/train.json and test.json beside the shifts file).

`data_sources` turns a run's data settings into its sources; it is the one rule, so training
and evaluation see the same data. Own data without eval data is split by prompt there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reprpo.data.readers import holdout_source, parse_hf_source, split_holdout
from reprpo.errors import ConfigError, DataError

SPLITS = ("train", "test", "oos", "rnd")
DEFAULT_SHIFT = "builtin:difficulty"  # the data when neither data.shift nor data.train is set
EVAL_FRACTION = 0.1  # the default of data.eval_fraction (config.DataConfig repeats it)


@dataclass(frozen=True)
class Shift:
    name: str
    train: str  # source of the training pairs
    splits: dict[str, str]  # split name -> source to score
    oos_train: str = ""  # the oos distribution's own training split (compare --target-tuned trains on it)


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
        oos_train=src(r["oos"], "train"),
    )


def data_sources(*, shift: str, train: str, eval_splits: dict[str, str],
                 eval_fraction: float = EVAL_FRACTION) -> tuple[str, dict[str, str]]:
    """(training source, eval splits) from the config: explicit values override the shift's.

    - data.shift set (or neither data.shift nor data.train: `DEFAULT_SHIFT`): the shift's
      training data and splits train/test/oos/rnd, each replaced by data.train / data.eval if set.
    - data.train and data.eval, no shift: those.
    - data.train alone: its prompts are split (`readers.holdout_source`): the pairs of about
      `eval_fraction` of them are held out, never trained on, and scored as split `test`; the
      rest are the training data, scored in-sample as split `train`. No built-in data is used.
    """
    if shift or not train:
        s = resolve_shift(shift or DEFAULT_SHIFT)
        return train or s.train, eval_splits or s.splits
    if eval_splits:
        return train, eval_splits
    kept = holdout_source(train, eval_fraction, "train")
    return kept, {"train": kept, "test": holdout_source(train, eval_fraction, "test")}


def sources_of(data) -> tuple[str, dict[str, str]]:
    """`data_sources` of a `config.DataConfig` (its shift, train, eval and eval_fraction)."""
    return data_sources(shift=data.shift, train=data.train, eval_splits=data.eval, eval_fraction=data.eval_fraction)


def check_sources(shift: str, train: str, eval_splits: dict[str, str], *, eval_fraction: float = EVAL_FRACTION) -> None:
    """Check every source a run needs (as `data_sources` resolves them) before any model loads.

    A file must exist, be a readable file and have a suffix a reader knows;
    `builtin:DIST/SPLIT` must name a built-in distribution and split. `hf:` sources are only
    parsed: reading them needs the Hub (or its cache) and can be slow, so they fail when read.
    Raises DataError (ConfigError for an unknown shift) naming the split, the source and the fix.
    """
    train_src, splits = data_sources(shift=shift, train=train, eval_splits=eval_splits, eval_fraction=eval_fraction)
    used = shift or ("" if train else DEFAULT_SHIFT)
    from_shift = f"data.shift {used}" + ("" if shift else " (the default without data.train)")
    needed = [(f"training data ({'data.train' if train else from_shift})", train_src,
               "data.train" if train else "data.shift")]
    for name, src in splits.items():
        if eval_splits:
            needed.append((f"data.eval {name}", src, "data.eval"))
        elif used:
            needed.append((f"eval split {name} of {from_shift}", src, "data.shift"))
        else:  # no shift, no data.eval: both splits are sides of data.train split by prompt
            needed.append((f"eval split {name} (a side of data.train split by prompt)", src, "data.train"))
    seen: set[str] = set()
    for label, src, field in needed:
        base, _ = split_holdout(src)
        if base not in seen:
            seen.add(base)
            _check_source(base, label=label, field=field)


def _check_source(src: str, *, label: str, field: str) -> None:
    if src.startswith("hf:"):
        try:
            parse_hf_source(src)
        except DataError as e:
            raise DataError(f"{label}: {e} Fix {field}.") from e
        return
    if src.startswith("builtin:"):
        from reprpo.data.builtin import DISTRIBUTIONS, SIZES

        dist, sep, split = src.removeprefix("builtin:").partition("/")
        if not (dist and sep and split):
            raise DataError(f"{label}: bad built-in source {src!r}: expected `builtin:DIST/SPLIT`; fix {field}.")
        if dist not in DISTRIBUTIONS:
            raise DataError(f"{label}: {src}: unknown built-in distribution {dist!r}; fix {field}. "
                            f"Known: {', '.join(DISTRIBUTIONS)} (`reprpo shifts list`).")
        if split not in SIZES:
            raise DataError(f"{label}: {src}: unknown split {split!r} of builtin:{dist}; fix {field}. "
                            f"Known splits: {', '.join(SIZES)}.")
        return
    from reprpo.data.readers import READERS

    path = Path(src)
    fix = f"fix the path in {field}" if field != "data.shift" else "add the file or pick another shift"
    if not path.exists():
        where = "" if path.is_absolute() else f" (a relative path, read from the current directory {Path.cwd()})"
        raise DataError(f"{label}: data file {path} not found{where}; {fix}.")
    if path.is_dir():
        raise DataError(f"{label}: {path} is a directory, not a data file; {fix}.")
    if path.suffix.lower() not in READERS:
        raise DataError(f"{label}: {path}: unknown data file type {path.suffix!r}, expected one of "
                        f"{', '.join(READERS)}; convert or rename it.")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{label}: cannot read {path} ({e.strerror}); fix its permissions or {fix}.") from e
