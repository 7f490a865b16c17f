"""Preference data: readers, validation, the built-in suite, tokenisation."""

from reprpo.data.pairs import DropReport, PreferencePair

__all__ = ["DropReport", "PreferencePair"]
