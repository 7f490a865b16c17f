"""Read preference data from files, the Hugging Face Hub or the built-in suite into `PreferencePair`s.

One entry point, `load_pairs(source)`, where `source` is one of

    builtin:<dist>/<split>          the built-in suite (`reprpo.data.builtin`)
    hf:<owner>/<name>[:<config>][:<split>]
                                    a Hugging Face dataset, as `datasets.load_dataset` takes it.
                                    One part after the id is the split (`hf:org/data:test`); two
                                    are the config, then the split (`hf:org/data:en:test`). The
                                    split defaults to "train", the config to the dataset's
                                    default; an empty part keeps the default (`hf:org/data:en:`).
                                    Colons inside [...] belong to the split (`hf:org/data:train[:10%]`).
    path/to/file.{json,jsonl,parquet,csv}

and any of them may end in a hold-out split by prompt (`holdout_source`):

    <source>#holdout=<F>/test       the pairs whose prompt hashes below F (about a fraction F of
                                    the prompts; every pair of a prompt on the same side)
    <source>#holdout=<F>/train      the others: the training side of the same split

`columns` ({target: source column}, `data.columns`) renames fields of file and dataset records
before they are recognised, e.g. {"prompt": "question", "chosen": "good", "rejected": "bad"}.

Every record (a JSON object, a table row, a dataset row) is recognised by its fields:

    GENIES          {"prompt": str, "responses": {text: score, ...}}
                    preferred = the unique top-scoring response; dispreferred = the others in
                    file order. pairing="first": preferred vs the first dispreferred (GENIES
                    default); pairing="all": one pair per dispreferred.
    strings         {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"chosen": [messages], "rejected": [messages], "prompt"?: [messages]}
                    messages are {"role": str, "content": str}; rendered with the tokenizer's
                    chat template (see `_conversation_pair`).

A record that fails is dropped and counted in the `DropReport` with its reason and location
("row N", 0-based; "line N", 1-based, for .jsonl), or raises `DataError` when `strict=True`.
A source that cannot be read at all, or yields no valid pair, always raises `DataError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from reprpo.data.pairs import DropReport, PreferencePair, keep_or_drop
from reprpo.errors import ConfigError, DataError
from reprpo.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# GENIES records (one preferred, 1-3 dispreferred): which dispreferred responses become pairs.
# name -> (dispreferred in file order) -> the ones kept; one line each (DESIGN §6).
PAIRINGS: Registry[Callable[[list[str]], list[str]]] = Registry("pairing", field="data.pairing")
PAIRINGS.add("first", lambda dispreferred: dispreferred[:1])  # preferred vs the first dispreferred (default)
PAIRINGS.add("all", lambda dispreferred: list(dispreferred))  # one pair per dispreferred response
_SOURCE_HELP = (
    "A source is a path to a .json, .jsonl, .parquet or .csv file, "
    "'hf:<owner>/<name>[:<config>][:<split>]' or 'builtin:<dist>/<split>'."
)
_HF_HELP = (
    "A Hub source is hf:<owner>/<name>[:<config>][:<split>]: with one part after the id it is "
    "the split (hf:org/data:test), with two the config and then the split (hf:org/data:en:test)."
)
# the fields a record is recognised by: the targets `columns` may rename a source column to
COLUMN_TARGETS = ("prompt", "chosen", "rejected", "responses")


class _BadRecord(Exception):
    """Internal: this record cannot give a pair; the message is the drop reason."""


class _Row(NamedTuple):
    """One record as read from a source, before it is recognised."""

    where: str  # "row 3" or "line 4", for messages
    meta: dict[str, Any]  # copied into each pair's meta: source, row (, line)
    record: Any
    error: str | None = None  # set when the record could not even be parsed


# --------------------------------------------------------------------------- hold-out split


class Holdout(NamedTuple):
    """One side of a split of a source by prompt: `test` holds about `fraction` of the prompts."""

    fraction: float
    side: Literal["train", "test"]

    def keeps(self, key: str) -> bool:
        """Whether a pair whose prompt is `key` is on this side: u(key) < fraction is `test`,
        u = the first 8 bytes of sha256(key) / 2⁶⁴ ∈ [0, 1) (ours: seed- and order-independent,
        so every pair of a prompt, in every run and stage, lands on the same side)."""
        u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
        return (u < self.fraction) == (self.side == "test")

    def describe(self) -> str:
        pct = f"{100 * self.fraction:g}%"
        return f"held-out {pct} by prompt" if self.side == "test" else f"without the held-out {pct} by prompt"


def holdout_source(source: str, fraction: float, side: Literal["train", "test"]) -> str:
    """`source#holdout=F/side`: one side of `source` split by prompt (see `Holdout.keeps`)."""
    _check_fraction(fraction, where=source)
    return f"{source}#holdout={fraction!r}/{side}"


def split_holdout(source: str) -> tuple[str, Holdout | None]:
    """`source#holdout=F/side` -> (source, Holdout(F, side)); a source without one -> (source, None)."""
    base, sep, frag = source.rpartition("#")
    if not sep or not frag.startswith("holdout="):
        return source, None
    value, _, side = frag.removeprefix("holdout=").partition("/")
    try:
        fraction = float(value)
    except ValueError:
        fraction = math.nan
    if side not in ("train", "test") or not base:
        raise DataError(f"Bad hold-out source {source!r}: expected SOURCE#holdout=F/test or SOURCE#holdout=F/train.")
    _check_fraction(fraction, where=source)
    return base, Holdout(fraction, side)  # type: ignore[arg-type]


def _check_fraction(fraction: float, *, where: str) -> None:
    if not 0 < fraction < 1:  # NaN fails too
        raise DataError(f"{where}: the hold-out fraction must be in (0, 1), got {fraction}; fix data.eval_fraction.")


# --------------------------------------------------------------------------- entry point


def load_pairs(
    source: str,
    *,
    pairing: str = "first",
    strict: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[PreferencePair], DropReport]:
    """Read `source` into validated preference pairs and a report of what was dropped.

    pairing: for GENIES records, "first" (preferred vs the first dispreferred response in
        file order) or "all" (one pair per dispreferred response).
    strict: raise `DataError` on the first bad record instead of dropping it.
    tokenizer: needed only for conversational records; its chat template renders them.
    limit: keep only the first `limit` valid pairs (reading stops there); of a hold-out
        source, the first `limit` on its side.
    columns: {target: source column} renames of file / dataset fields (not `builtin:`), e.g.
        {"prompt": "question"}. A column missing from the first record is a `DataError`; a
        later record without it is a bad record ("missing column ...").
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing must be one of {tuple(PAIRINGS)}, got {pairing!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}.")
    name, holdout = split_holdout(source)
    if columns and (problem := column_problem(columns)):
        raise DataError(f"{name}: data.columns: {problem}")

    if name.startswith("builtin:"):
        pairs, report = _load_builtin(name, limit=None if holdout else limit)
        if holdout is not None:
            kept = [p for p in pairs if holdout.keeps(p.prompt)][:limit]
            report.n_pairs, report.n_other_side = len(kept), len(pairs) - len(kept)
            pairs = kept
    else:
        rows = _hf_rows(name) if name.startswith("hf:") else _file_rows(name)
        if columns:
            rows = _renamed(rows, columns, source=name)
        report = DropReport(source=name)
        pairs = _collect(
            rows, report=report, pairing=pairing, strict=strict, tokenizer=tokenizer, limit=limit,
            holdout=holdout,
        )
    if not pairs and holdout is not None and report.n_other_side:
        fix = ("raise data.eval_fraction, or pass eval data with --data.eval test=SOURCE"
               if holdout.side == "test" else "lower data.eval_fraction")
        raise DataError(
            f"{source}: the {holdout.describe()} of {name} is empty ({report.summary()}): the "
            f"split puts all pairs of a prompt on one side, so data with few prompts can leave "
            f"a side empty. Fix: {fix}."
        )
    if not pairs:
        raise DataError(
            f"No valid preference pairs in {source} ({report.summary()}). Each record needs "
            "prompt/chosen/rejected strings, chosen/rejected message lists, or GENIES-style "
            "prompt + responses {text: score}."
        )
    return pairs, report


def _load_builtin(source: str, *, limit: int | None) -> tuple[list[PreferencePair], DropReport]:
    """`builtin:<dist>/<split>`: the built-in suite, already validated by its own module."""
    dist, sep, split = source.removeprefix("builtin:").partition("/")
    if not (dist and sep and split):
        raise DataError(f"Bad built-in source {source!r}: expected 'builtin:<dist>/<split>'.")
    from reprpo.data.builtin import builtin_pairs  # lazy: pulls in the built-in suite

    pairs = builtin_pairs(dist, split)[:limit]
    return pairs, DropReport(source=source, n_rows=len(pairs), n_pairs=len(pairs))


# --------------------------------------------------------------------------- records -> pairs


def _collect(
    rows: Iterable[_Row],
    *,
    report: DropReport,
    pairing: str,
    strict: bool,
    tokenizer: PreTrainedTokenizerBase | None,
    limit: int | None,
    holdout: Holdout | None = None,
) -> list[PreferencePair]:
    """Turn rows into pairs, counting every row read and every drop in `report`; with a
    `holdout`, pairs on its other side are only counted (`report.n_other_side`)."""
    pairs: list[PreferencePair] = []
    for row in rows:
        report.n_rows += 1
        if row.error is not None:
            _drop(report, row.error, where=row.where, strict=strict)
            continue
        kind = _record_kind(row.record)
        if kind == "conversation" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{report.source}, {row.where}: conversational data (chosen/rejected are lists of "
                "messages) needs a model tokenizer with a chat template to render it. Pass "
                "tokenizer=AutoTokenizer.from_pretrained(<model>) for a chat model, or convert "
                "the data to prompt/chosen/rejected strings."
            )
        try:
            if kind == "genies":
                candidates = _genies_pairs(row.record, pairing=pairing)
            elif kind == "conversation":
                candidates = [_conversation_pair(row.record, tokenizer=tokenizer)]
            else:
                candidates = [_string_pair(row.record)]
        except _BadRecord as e:
            _drop(report, str(e), where=row.where, strict=strict)
            continue
        for prompt, chosen, rejected, extra in candidates:
            key = extra.pop(_PROMPT_KEY, prompt)  # what the hold-out hashes: the prompt as written
            if holdout is not None and isinstance(key, str) and not holdout.keeps(key):
                report.n_other_side += 1
                continue
            keep_or_drop(
                report,
                pairs,
                prompt=prompt,
                chosen=chosen,
                rejected=rejected,
                where=row.where,
                strict=strict,
                meta={**row.meta, **extra},
            )
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs


# `extra` key of a candidate pair: the text `Holdout.keeps` hashes when the pair's prompt is
# rendered (conversations: the prompt messages, so the split does not depend on the template)
_PROMPT_KEY = "_prompt_key"


def _drop(report: DropReport, reason: str, *, where: str, strict: bool) -> None:
    """Count a dropped record, or raise when strict (same message as `keep_or_drop`)."""
    if strict:
        raise DataError(
            f"{report.source}, {where}: {reason}. Fix or remove this row, or pass "
            "--data.strict false to drop it with a count."
        )
    report.drop(reason, where)


def _record_kind(record: Any) -> Literal["genies", "conversation", "strings"]:
    """Which record format this is; "strings" also catches anything malformed."""
    if not isinstance(record, dict):
        return "strings"
    if _get(record, "responses") is not None:
        return "genies"
    if isinstance(_get(record, "chosen"), list) or isinstance(_get(record, "rejected"), list):
        return "conversation"
    return "strings"


def _get(record: dict, key: str) -> Any:
    """record[key], with absent, None and NaN (pandas / parquet missing values) all as None."""
    value = record.get(key)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _string_pair(record: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """prompt/chosen/rejected fields, as they are: `check_pair` validates them."""
    if not isinstance(record, dict):
        raise _BadRecord(f"record is {type(record).__name__}, not an object with fields")
    return _get(record, "prompt"), _get(record, "chosen"), _get(record, "rejected"), {}


def _genies_pairs(record: dict, *, pairing: str) -> list[tuple[Any, Any, Any, dict[str, Any]]]:
    """GENIES: preferred = unique argmax of `responses` scores, vs dispreferred in file order.

    `rejected_index` in meta is the position among the dispreferred responses (0 = first).
    """
    prompt = _get(record, "prompt")
    if prompt is None:
        raise _BadRecord("missing field 'prompt'")
    if not isinstance(prompt, str):
        raise _BadRecord(f"field 'prompt' is {type(prompt).__name__}, not a string")
    responses = record["responses"]
    if not isinstance(responses, dict):
        raise _BadRecord("field 'responses' is not an object mapping response text to score")
    if len(responses) < 2:
        raise _BadRecord("fewer than two responses")
    if not all(_is_score(s) for s in responses.values()):
        raise _BadRecord("non-numeric score in 'responses'")
    best = max(responses.values())
    preferred = [text for text, score in responses.items() if score == best]
    if len(preferred) != 1:
        raise _BadRecord("no unique preferred response")
    dispreferred = PAIRINGS[pairing]([text for text, score in responses.items() if score != best])
    return [
        (prompt, preferred[0], text, {"rejected_index": j}) for j, text in enumerate(dispreferred)
    ]


def _is_score(value: Any) -> bool:
    """A usable score: a finite int or float (not bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)  # isfinite overflows on huge ints


def _conversation_pair(
    record: dict, *, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str, str, dict[str, Any]]:
    """Render a conversational record with the chat template.

    Explicit prompt (`prompt` is a message list): chosen and rejected are each exactly one
    assistant message. Implicit prompt: the prompt is the longest common prefix of chosen and
    rejected, and each must end in exactly one differing assistant message. A string `prompt`
    next to message lists (e.g. ultrafeedback_binarized) duplicates the first user turn and is
    ignored, unless chosen and rejected share no prefix: then it is that user turn.

    prompt = template(prompt_msgs, add_generation_prompt=True)
    response = template(prompt_msgs + [response_msg]) with the prompt text removed from its start.
    """
    chosen = _messages(_get(record, "chosen"), field="chosen")
    rejected = _messages(_get(record, "rejected"), field="rejected")
    prompt = _get(record, "prompt")
    if isinstance(prompt, list):
        prompt_msgs = _messages(prompt, field="prompt")
        chosen_tail, rejected_tail = chosen, rejected
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt_msgs, chosen_tail, rejected_tail = chosen[:n], chosen[n:], rejected[n:]
        if not prompt_msgs and isinstance(prompt, str):
            prompt_msgs = [{"role": "user", "content": prompt}]
    for name, tail in (("chosen", chosen_tail), ("rejected", rejected_tail)):
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            raise _BadRecord(f"'{name}' does not end in exactly one differing assistant message")
    if not prompt_msgs:
        raise _BadRecord("conversation has no prompt messages")

    prompt_text = _apply_template(tokenizer, prompt_msgs, add_generation_prompt=True)
    responses = []
    for tail in (chosen_tail, rejected_tail):
        full = _apply_template(tokenizer, prompt_msgs + tail, add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise _BadRecord("chat template does not extend the prompt")
        responses.append(full[len(prompt_text) :])
    key = json.dumps([[m["role"], m["content"]] for m in prompt_msgs], ensure_ascii=False)
    return prompt_text, responses[0], responses[1], {_PROMPT_KEY: key}


def _messages(value: Any, *, field: str) -> list[dict[str, Any]]:
    """Check `value` is a list of {"role": str, "content": str} messages."""
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok:
        raise _BadRecord(f"field '{field}' is not a list of {{role, content}} string messages")
    return value


def _apply_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
) -> str:
    """The chat template as text; a template that rejects this conversation drops the record."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raise_exception, role-order checks, ...: a per-record problem
        raise _BadRecord(f"chat template failed ({type(e).__name__}: {str(e)[:80]})") from e
    if not isinstance(text, str):
        raise _BadRecord(f"chat template returned {type(text).__name__}, not text")
    return text


# --------------------------------------------------------------------------- column renames


def column_problem(columns: dict[str, str]) -> str | None:
    """What is wrong with a {target: source column} mapping (None if nothing): unknown targets,
    empty source names, one source column given to two targets."""
    for target, src in columns.items():
        if target not in COLUMN_TARGETS:
            hint = f" (written the other way round? use {src}={target})" if src in COLUMN_TARGETS else ""
            return (f"unknown target column {target!r}{hint}; targets are {', '.join(COLUMN_TARGETS)}, "
                    "given as TARGET=SOURCE_COLUMN, e.g. prompt=question,chosen=good,rejected=bad.")
        if not src:
            return f"no source column given for {target!r}; write {target}=SOURCE_COLUMN."
    sources = list(columns.values())
    for src in sources:
        if sources.count(src) > 1:
            both = " and ".join(t for t, s in columns.items() if s == src)
            return f"source column {src!r} is renamed to both {both}; each target needs its own column."
    return None


def _renamed(rows: Iterable[_Row], columns: dict[str, str], *, source: str) -> Iterator[_Row]:
    """Rows with each record's `columns` sources renamed to their targets (sources removed, so
    `chosen=rejected,rejected=chosen` swaps). A column missing from the first record (a typo, a
    table without it) raises `DataError`; missing from a later one, that record is bad."""
    first = True
    for row in rows:
        if row.error is None and isinstance(row.record, dict):
            missing = [(t, s) for t, s in columns.items() if s not in row.record]
            if missing and first:
                target, src = missing[0]
                have = ", ".join(map(repr, row.record)) or "none"
                raise DataError(
                    f"{source}, {row.where}: data.columns renames column {src!r} to {target!r}, but "
                    f"the record has no column {src!r} (its columns: {have}). Fix --data.columns "
                    "(TARGET=SOURCE_COLUMN, e.g. prompt=question) or the data."
                )
            first = False
            if missing:
                target, src = missing[0]
                yield row._replace(record=None, error=f"missing column '{src}' (renamed to '{target}' by data.columns)")
                continue
            record = {k: v for k, v in row.record.items() if k not in columns.values()}
            record |= {t: row.record[s] for t, s in columns.items()}
            row = row._replace(record=record)
        yield row


# --------------------------------------------------------------------------- files


def _file_rows(source: str) -> Iterator[_Row]:
    """Rows of a local file, chosen by suffix. Unreadable files raise `DataError` here."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"Data file not found: {source}. {_SOURCE_HELP}")
    if path.is_dir():
        raise DataError(f"{source} is a directory; give a data file inside it. {_SOURCE_HELP}")
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise DataError(
            f"Unknown data file type {path.suffix!r} for {source}: expected one of "
            f"{', '.join(READERS)}. Convert it or rename it to the right suffix."
        )
    return READERS[suffix](path, source=source)


def _indexed_rows(records: Iterable[Any], *, source: str) -> Iterator[_Row]:
    for i, record in enumerate(records):
        yield _Row(where=f"row {i}", meta={"source": source, "row": i}, record=record)


def _read_json(path: Path, *, source: str) -> list[Any]:
    """A .json file holding one list of records."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            data = json.load(f)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; deep nesting is a RecursionError
    except (ValueError, RecursionError) as e:
        hint = (
            " If it has one line per record, rename it to .jsonl." if "Extra data" in str(e) else ""
        )
        raise DataError(f"{source} is not valid JSON ({e}).{hint}") from e
    except OSError as e:
        raise DataError(f"Cannot read {source}: {e}") from e
    if not isinstance(data, list):
        raise DataError(
            f"{source} holds a JSON {type(data).__name__}, but a JSON list of records is expected "
            '([{"prompt": ..., "chosen": ..., "rejected": ...}, ...]).'
        )
    return data


def _jsonl_rows(path: Path, *, source: str) -> Iterator[_Row]:
    """A .jsonl file: one record per line, read lazily; blank lines are skipped.

    A line that is not valid JSON is a bad record ("invalid JSON"), not a bad file.
    """
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"Cannot read {source}: {e}") from e
    with f:
        i = 0
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where, meta = f"line {line_no}", {"source": source, "row": i, "line": line_no}
            i += 1
            try:
                record = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
            except (ValueError, RecursionError):
                yield _Row(where=where, meta=meta, record=None, error="invalid JSON")
                continue
            yield _Row(where=where, meta=meta, record=record)


def _read_parquet(path: Path, *, source: str) -> list[dict[str, Any]]:
    """A .parquet file, via pyarrow rather than pandas: nested columns (message lists, dicts)
    come back as plain Python lists and dicts instead of numpy object arrays, nulls as None."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for a corrupt or foreign file
        raise DataError(
            f"Cannot read {source} as parquet ({type(e).__name__}: {e}). Check the file is a "
            "complete parquet table, e.g. pandas.read_parquet(path) / DataFrame.to_parquet."
        ) from e


def _read_csv(path: Path, *, source: str) -> list[dict[str, Any]]:
    """A .csv file with a header row; every value stays a string (no NA / number parsing)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # ParserError, EmptyDataError, UnicodeDecodeError, ...
        raise DataError(
            f"Cannot read {source} as CSV ({type(e).__name__}: {e}). Expected UTF-8 text with a "
            "header row naming the columns prompt, chosen, rejected."
        ) from e
    return df.to_dict("records")  # short rows give NaN, which `_get` treats as missing


# --------------------------------------------------------------------------- Hugging Face Hub


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """`hf:ID[:CONFIG][:SPLIT]` -> (dataset id, config or None, split, default "train").

    One part after the id is the split, two are the config then the split; colons inside
    [...] (split slices such as `train[:10%]`) do not separate parts.
    """
    parts, depth, cur = [], 0, ""
    for ch in source.removeprefix("hf:"):
        depth += (ch == "[") - (ch == "]")
        if ch == ":" and depth <= 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if not parts[0] or len(parts) > 3:
        raise DataError(f"Bad Hub source {source!r}. {_HF_HELP}")
    config, split = (parts[1], parts[2]) if len(parts) == 3 else (None, parts[1] if len(parts) == 2 else "")
    return parts[0], config or None, split or "train"


def _hf_rows(source: str) -> Iterator[_Row]:
    """`hf:<owner>/<name>[:<config>][:<split>]` via `datasets.load_dataset`; every failure is a `DataError`."""
    dataset_id, config, split = parse_hf_source(source)
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"Reading {source} needs the `datasets` package: pip install datasets "
            "(or pip install 'reprpo[hub]'), or use a local .json/.jsonl/.parquet/.csv file."
        ) from e
    try:
        with _hub_offline_from_env():
            if config is None:
                ds = datasets.load_dataset(dataset_id, split=split)
            else:
                ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # offline, not found, bad config or split, auth, corrupt cache: all one story
        offline = " (HF_HUB_OFFLINE is set)" if _env_offline() else ""
        cfg = f", config {config!r}" if config else ""
        raise DataError(
            f"Could not load Hugging Face dataset {dataset_id!r}{cfg}, split {split!r} "
            f"({type(e).__name__}: {e}). The machine may be offline{offline}, or the id, config "
            f"or split may be wrong. {_HF_HELP} Check the id on huggingface.co, or download the "
            "data where there is network and pass a local .json/.jsonl/.parquet/.csv file instead."
        ) from e
    return _indexed_rows(ds, source=source)


def _env_offline() -> bool:
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@contextlib.contextmanager
def _hub_offline_from_env() -> Iterator[None]:
    """Honour HF_HUB_OFFLINE as set *now*.

    `datasets` and `huggingface_hub` read it once, at import; set later (a notebook, a test)
    it would be ignored and a missing dataset would retry the network for ~25 s. While inside,
    their module-level flags follow the environment; they are restored on exit.
    """
    if not _env_offline():
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        datasets.config.HF_HUB_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


# file suffix -> rows of a local file (each reader raises DataError naming the file and row)
READERS: Registry[Callable[..., Iterator[_Row]]] = Registry("data file reader")
READERS.add(".json", lambda path, *, source: _indexed_rows(_read_json(path, source=source), source=source))
READERS.add(".jsonl", _jsonl_rows)
READERS.add(".parquet", lambda path, *, source: _indexed_rows(_read_parquet(path, source=source), source=source))
READERS.add(".csv", lambda path, *, source: _indexed_rows(_read_csv(path, source=source), source=source))
