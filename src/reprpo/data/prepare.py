"""Source -> validated pairs -> tokenised pairs, with the config's lengths; one place for all stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from reprpo.data.pairs import DropReport, PreferencePair
from reprpo.data.tokenize import TokenizedPair, TokenizeReport, tokenize_pairs
from reprpo.errors import DataError


class DataSettings(Protocol):
    """What the data layer reads of `config.DataConfig` (the data layer sits below config)."""

    pairing: str
    strict: bool
    max_length: int
    max_prompt_length: int
    chat_template: bool
    append_eos: bool
    columns: dict[str, str]  # {target: source column} renames (readers.load_pairs)


@dataclass
class Prepared:
    source: str
    pairs: list[PreferencePair]
    tokenized: list[TokenizedPair]
    read_report: DropReport
    token_report: TokenizeReport

    def summary(self) -> str:
        return f"{self.read_report.summary()}; tokenised: {self.token_report.summary()}"


def prepare(source: str, tokenizer, data: DataSettings, *, limit: int = 0) -> Prepared:
    from reprpo.data.readers import load_pairs

    pairs, rep = load_pairs(
        source, pairing=data.pairing, strict=data.strict, tokenizer=tokenizer, limit=limit or None,
        columns=data.columns,
    )
    tok, trep = tokenize_pairs(
        pairs, tokenizer, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
        chat_template=data.chat_template, append_eos=data.append_eos,
    )
    if not tok:
        raise DataError(f"{source}: no pair survives tokenisation ({trep.summary()}). Raise data.max_length.")
    return Prepared(source, pairs, tok, rep, trep)
