"""A named registry: one per kind of thing (method kinds and presets, losses, transforms,
pairings, scorers). Entries carry their own capability flags; the CLI help, `tune`'s search
space and the table tests read them from here, so adding an entry is one registration line.

    LOSSES = Registry("output loss", field="train.method")
    LOSSES.add("dpo", OutputLoss(...))
    LOSSES["dpo"]          # unknown name -> ConfigError naming the field and every registered name
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from reprpo.errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """name -> entry, in registration order. A read-only Mapping to its users; `add` registers."""

    def __init__(self, what: str, *, field: str = "") -> None:
        self.what = what  # e.g. "transform"
        self.field = field  # the config field whose values name entries, e.g. "method.transform"
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice.")
        if not name or any(c in name for c in " ,:"):
            raise ValueError(f"{self.what} name {name!r}: no spaces, commas or colons.")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, default=None):
        return self._entries.get(name, default)

    def unknown(self, name: object) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{where}unknown {self.what} {name!r}; registered: {', '.join(self._entries)}."

    def check(self, name: str, *, where: str = "") -> str:
        """`name` if registered, else a ConfigError listing the registered names."""
        if name not in self._entries:
            msg = self.unknown(name)
            raise ConfigError(f"{where}: {msg}" if where and where != self.field else msg)
        return name

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"
