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
    """Read, validate and tokenise a source. `limit` > 0: the first `limit` pairs that survive
    both reading and tokenisation (rows are read until that many survive or the source ends), so
    pairs dropped for their length (chosen and rejected cut to the same tokens) do not leave a
    run with fewer pairs than asked; the reports count exactly the rows behind those pairs."""
    from reprpo.data.readers import load_pairs

    def run(n: int | None):
        pairs, rep = load_pairs(source, pairing=data.pairing, strict=data.strict, tokenizer=tokenizer, limit=n,
                                columns=data.columns)
        tok, trep = tokenize_pairs(pairs, tokenizer, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                                   chat_template=data.chat_template, append_eos=data.append_eos)
        return pairs, rep, tok, trep

    n = limit or None
    pairs, rep, tok, trep = run(n)
    while n is not None and len(tok) < limit and len(pairs) == n:  # short, and the source has more rows
        n = max(n + 1, 2 * n)
        pairs, rep, tok, trep = run(n)
    if limit and len(tok) > limit:  # read again up to the last pair kept: exact reports
        pairs, rep, tok, trep = run(tok[limit - 1].index + 1)
    if not tok:
        raise DataError(f"{source}: no pair survives tokenisation ({trep.summary()}). Raise data.max_length.")
    return Prepared(source, pairs, tok, rep, trep)
