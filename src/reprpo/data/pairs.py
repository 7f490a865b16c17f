"""The one data contract every reader returns: validated (prompt, chosen, rejected) pairs.

Readers never silently drop a row: a row that fails validation is either an error
(`strict=True`) or counted in a `DropReport` with its reason and location.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from reprpo.errors import DataError


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair. `prompt` is fed as is (already formatted); responses follow it."""

    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # source, row, ...


@dataclass
class DropReport:
    """What a reader kept and dropped, by reason; `examples` holds the first few locations."""

    source: str
    n_rows: int = 0  # rows (records) read from the source
    n_pairs: int = 0  # pairs kept
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> ["row 3", ...]
    n_other_side: int = 0  # pairs of a hold-out source left to its other side (not drops)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(where)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        s = f"{self.source}: {self.n_pairs} pairs from {self.n_rows} rows"
        if self.dropped:
            parts = [
                f"{n} {reason} (e.g. {', '.join(self.examples.get(reason, []))})"
                for reason, n in self.dropped.most_common()
            ]
            s += "; dropped " + "; ".join(parts)
        if self.n_other_side:
            s += f"; {self.n_other_side} pairs on the other side of the hold-out"
        return s


def check_pair(
    prompt: Any, chosen: Any, rejected: Any, *, where: str
) -> str | None:
    """Return None if the pair is valid, else the reason it is not (a short phrase).

    Valid: three `str` values, the responses not empty or whitespace-only, chosen != rejected.
    The prompt may be empty (some data has instructions only in the response context), but
    must be a string.
    """
    for name, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if v is None:
            return f"missing field '{name}'"
        if not isinstance(v, str):
            return f"field '{name}' is {type(v).__name__}, not a string"
    if not chosen.strip():
        return "empty chosen response"
    if not rejected.strip():
        return "empty rejected response"
    if chosen == rejected:
        return "chosen == rejected"
    return None


def keep_or_drop(
    report: DropReport,
    pairs: list[PreferencePair],
    *,
    prompt: Any,
    chosen: Any,
    rejected: Any,
    where: str,
    strict: bool,
    meta: dict[str, Any] | None = None,
) -> None:
    """Validate one pair; append it to `pairs` or record the drop (raise when `strict`)."""
    reason = check_pair(prompt, chosen, rejected, where=where)
    if reason is None:
        pairs.append(PreferencePair(prompt, chosen, rejected, dict(meta or {})))
        report.n_pairs += 1
        return
    if strict:
        raise DataError(f"{report.source}, {where}: {reason}. Fix or remove this row, or pass --data.strict false to drop it with a count.")
    report.drop(reason, where)
