"""Readers: every source format round-trips, every bad input is a counted drop or a DataError.

Files are written to tmp dirs; the conversational tests use a tiny offline tokenizer with a
hand-written chat template, so the rendered strings can be written out in full.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reprpo.data.pairs import DropReport, PreferencePair, check_pair
from reprpo.data.readers import load_pairs
from reprpo.errors import ConfigError, DataError

GENIES_DIR = Path(__file__).resolve().parents[2] / "shared/data/genies"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
RECORDS = [
    {"prompt": "Q1?", "chosen": "good 1", "rejected": "bad 1"},
    {"prompt": "Q2?", "chosen": "good 2", "rejected": "bad 2", "extra": "ignored"},
    {"prompt": "", "chosen": "good 3", "rejected": "bad 3"},  # empty prompt is allowed
]
EXPECTED = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in RECORDS]


# --------------------------------------------------------------------------- helpers


def write(path: Path, records: list) -> Path:
    """Write records in the format named by the path's suffix."""
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".parquet":
        pd.DataFrame(records).to_parquet(path)
    elif suffix == ".csv":
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        raise AssertionError(suffix)
    return path


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A word-level tokenizer built in memory (no network) with the given chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def assert_all_valid(pairs: list[PreferencePair], report: DropReport) -> None:
    assert pairs and len(pairs) == report.n_pairs
    for p in pairs:
        assert check_pair(p.prompt, p.chosen, p.rejected, where="") is None


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_round_trip(tmp_path, suffix):
    path = write(tmp_path / f"data{suffix}", RECORDS)
    pairs, report = load_pairs(str(path))
    assert pairs == EXPECTED
    assert [p.meta["row"] for p in pairs] == [0, 1, 2]
    assert all(p.meta["source"] == str(path) for p in pairs)
    assert (report.n_rows, report.n_pairs, report.n_dropped) == (3, 3, 0)
    if suffix == ".jsonl":
        assert [p.meta["line"] for p in pairs] == [1, 2, 3]


def test_csv_values_stay_strings(tmp_path):
    """No NA / number parsing: "NA", "1.0", "null" are text like any other."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nNA,1.0,null\n", encoding="utf-8")
    pairs, _ = load_pairs(str(path))
    assert pairs == [PreferencePair("NA", "1.0", "null")]


def test_parquet_missing_values_are_missing_fields(tmp_path):
    df = pd.DataFrame(
        {
            "prompt": ["Q1", "Q2", "Q3"],
            "chosen": ["a", None, "c"],
            "rejected": ["x", "y", float("nan")],
        }
    )
    path = tmp_path / "d.parquet"
    df.to_parquet(path)
    pairs, report = load_pairs(str(path))
    assert pairs == [PreferencePair("Q1", "a", "x")]
    assert report.dropped == {"missing field 'chosen'": 1, "missing field 'rejected'": 1}
    assert report.examples["missing field 'chosen'"] == ["row 1"]


def test_csv_empty_cells_and_missing_columns(tmp_path):
    """CSV cannot tell an empty cell from a missing one: both are "" (an empty response)."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nQ,a,b\nQ,a\nQ,,b\n", encoding="utf-8")
    pairs, report = load_pairs(str(path))
    assert pairs == [PreferencePair("Q", "a", "b")]
    assert report.dropped == {"empty rejected response": 1, "empty chosen response": 1}
    assert report.examples == {
        "empty rejected response": ["row 1"],
        "empty chosen response": ["row 2"],
    }
    path.write_text("prompt,chosen\nQ,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing field 'rejected' \\(e.g. row 0\\)"):
        load_pairs(str(path))


def test_limit_stops_at_n_valid_pairs(tmp_path):
    records = [{"prompt": "p", "chosen": "c"}] + RECORDS  # first row is bad
    path = write(tmp_path / "d.jsonl", records)
    pairs, report = load_pairs(str(path), limit=2)
    assert pairs == EXPECTED[:2]
    assert (report.n_rows, report.n_pairs, report.n_dropped) == (3, 2, 1)


def test_bad_arguments_are_config_errors(tmp_path):
    path = write(tmp_path / "d.json", RECORDS)
    with pytest.raises(ConfigError, match="pairing"):
        load_pairs(str(path), pairing="best")
    with pytest.raises(ConfigError, match="limit"):
        load_pairs(str(path), limit=0)


# --------------------------------------------------------------------------- GENIES

GENIES_RECORDS = [
    # preferred in the middle; dispreferred in file order are w1, w2, w3
    {
        "prompt": "P0",
        "responses": {"w1": 0.0, "w2": 0.0, "best": 1.0, "w3": 0.0},
        "instruction": "i",
    },
    {"prompt": "P1", "responses": {"top": 1.0, "v1": 0.0, "v2": 0.0}},
]


def test_genies_first_pairing(tmp_path):
    path = write(tmp_path / "g.json", GENIES_RECORDS)
    pairs, report = load_pairs(str(path))
    assert pairs == [PreferencePair("P0", "best", "w1"), PreferencePair("P1", "top", "v1")]
    assert [p.meta for p in pairs] == [
        {"source": str(path), "row": 0, "rejected_index": 0},
        {"source": str(path), "row": 1, "rejected_index": 0},
    ]
    assert (report.n_rows, report.n_pairs) == (2, 2)


def test_genies_all_pairing(tmp_path):
    path = write(tmp_path / "g.json", GENIES_RECORDS)
    pairs, report = load_pairs(str(path), pairing="all")
    assert pairs == [
        PreferencePair("P0", "best", "w1"),
        PreferencePair("P0", "best", "w2"),
        PreferencePair("P0", "best", "w3"),
        PreferencePair("P1", "top", "v1"),
        PreferencePair("P1", "top", "v2"),
    ]
    assert [(p.meta["row"], p.meta["rejected_index"]) for p in pairs] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
    ]
    assert (report.n_rows, report.n_pairs) == (2, 5)
    pairs, _ = load_pairs(str(path), pairing="all", limit=2)
    assert [p.rejected for p in pairs] == ["w1", "w2"]


def test_genies_scores_need_not_be_0_1(tmp_path):
    path = write(
        tmp_path / "g.json", [{"prompt": "P", "responses": {"a": 2, "b": 10**400, "c": -1}}]
    )
    pairs, _ = load_pairs(str(path), pairing="all")
    assert pairs == [PreferencePair("P", "b", "a"), PreferencePair("P", "b", "c")]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {"prompt": "P", "responses": {"a": 1.0, "b": 1.0, "c": 0.0}},
            "no unique preferred response",
        ),
        ({"prompt": "P", "responses": {"a": 1.0}}, "fewer than two responses"),
        ({"prompt": "P", "responses": {}}, "fewer than two responses"),
        ({"prompt": "P", "responses": {"a": 1.0, "b": "low"}}, "non-numeric score in 'responses'"),
        ({"prompt": "P", "responses": {"a": 1.0, "b": None}}, "non-numeric score in 'responses'"),
        ({"prompt": "P", "responses": {"a": True, "b": 0}}, "non-numeric score in 'responses'"),
        (
            {"prompt": "P", "responses": {"a": 1.0, "b": float("nan")}},
            "non-numeric score in 'responses'",
        ),
        (
            {"prompt": "P", "responses": ["a", "b"]},
            "field 'responses' is not an object mapping response text to score",
        ),
        ({"responses": {"a": 1.0, "b": 0.0}}, "missing field 'prompt'"),
        ({"prompt": 3, "responses": {"a": 1.0, "b": 0.0}}, "field 'prompt' is int, not a string"),
        ({"prompt": "P", "responses": {"a": 1.0, " ": 0.0}}, "empty rejected response"),
    ],
)
def test_genies_bad_records_are_dropped(tmp_path, record, reason):
    path = write(tmp_path / "g.json", [GENIES_RECORDS[1], record])
    pairs, report = load_pairs(str(path))
    assert pairs == [PreferencePair("P1", "top", "v1")]
    assert report.dropped == {reason: 1}
    assert report.examples[reason] == ["row 1"]


@pytest.mark.skipif(
    not GENIES_DIR.is_dir(), reason="GENIES data not present (../shared/data/genies)"
)
def test_genies_real_file():
    path = GENIES_DIR / "us_history_textbook/train.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    pairs, report = load_pairs(str(path))
    assert (len(records), report.n_rows, len(pairs), report.n_dropped) == (600, 600, 600, 0)
    for record, pair in zip(records, pairs, strict=True):
        assert pair.prompt == record["prompt"]
        assert record["responses"][pair.chosen] == 1.0
        first_other = next(t for t, s in record["responses"].items() if s != 1.0)
        assert pair.rejected == first_other


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "P", "chosen": "c"}, "missing field 'rejected'"),
        ({"chosen": "c", "rejected": "r"}, "missing field 'prompt'"),
        ({"prompt": "P", "chosen": None, "rejected": "r"}, "missing field 'chosen'"),
        ({"prompt": "P", "chosen": 1, "rejected": "r"}, "field 'chosen' is int, not a string"),
        ({"prompt": ["P"], "chosen": "c", "rejected": "r"}, "field 'prompt' is list, not a string"),
        ({"prompt": "P", "chosen": "", "rejected": "r"}, "empty chosen response"),
        ({"prompt": "P", "chosen": "c", "rejected": " \n\t"}, "empty rejected response"),
        ({"prompt": "P", "chosen": "same", "rejected": "same"}, "chosen == rejected"),
        ([1, 2, 3], "record is list, not an object with fields"),
        ("just text", "record is str, not an object with fields"),
        (None, "record is NoneType, not an object with fields"),
    ],
)
def test_bad_records_are_dropped_or_raise_when_strict(tmp_path, record, reason):
    path = write(tmp_path / "d.json", [RECORDS[0], record, RECORDS[1]])
    pairs, report = load_pairs(str(path))
    assert pairs == EXPECTED[:2]
    assert (report.n_rows, report.n_pairs) == (3, 2)
    assert report.dropped == {reason: 1}
    assert report.examples[reason] == ["row 1"]
    assert reason in report.summary()

    with pytest.raises(DataError) as err:
        load_pairs(str(path), strict=True)
    assert str(path) in str(err.value)
    assert "row 1" in str(err.value)
    assert reason in str(err.value)


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(RECORDS[0]), "{not json", "", json.dumps(RECORDS[1]), "\n"]
    path.write_text("\n".join(lines), encoding="utf-8")
    pairs, report = load_pairs(str(path))
    assert pairs == EXPECTED[:2]
    assert [p.meta["line"] for p in pairs] == [1, 4]  # blank lines skipped, not counted
    assert (report.n_rows, report.dropped) == (3, {"invalid JSON": 1})
    assert report.examples["invalid JSON"] == ["line 2"]
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: invalid JSON"):
        load_pairs(str(path), strict=True)


def test_invalid_utf8_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n\xff\xfe\x00garbage\n")
    pairs, report = load_pairs(str(path))
    assert pairs == EXPECTED[:1]
    assert report.examples["invalid JSON"] == ["line 2"]


def test_json_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": RECORDS}), encoding="utf-8")
    with pytest.raises(DataError, match="list of records") as err:
        load_pairs(str(path))
    assert str(path) in str(err.value)


def test_json_syntax_error_and_jsonl_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": ', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as err:
        load_pairs(str(path))
    assert str(path) in str(err.value)
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    with pytest.raises(DataError, match="rename it to .jsonl"):
        load_pairs(str(path))
    path.write_text("[" * 100_000, encoding="utf-8")  # too deep for the json module
    with pytest.raises(DataError, match="not valid JSON"):
        load_pairs(str(path))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not really parquet PAR1")
    with pytest.raises(DataError, match="as parquet") as err:
        load_pairs(str(path))
    assert str(path) in str(err.value)


def test_missing_file_directory_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        load_pairs(str(tmp_path / "nope.json"))
    assert "nope.json" in str(err.value) and "hf:" in str(err.value)
    with pytest.raises(DataError, match="is a directory"):
        load_pairs(str(tmp_path))
    path = tmp_path / "d.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"Unknown data file type '\.txt'") as err:
        load_pairs(str(path))
    assert str(path) in str(err.value) and ".jsonl" in str(err.value)


def test_all_rows_bad_is_an_error(tmp_path):
    path = write(tmp_path / "d.json", [{"prompt": "P", "chosen": "c"}, {"a": 1}])
    with pytest.raises(DataError, match="No valid preference pairs") as err:
        load_pairs(str(path))
    message = str(err.value)
    assert str(path) in message
    assert "missing field 'rejected'" in message and "row 0" in message
    assert "missing field 'prompt'" in message and "row 1" in message


def test_empty_sources_are_errors(tmp_path):
    for name, text in [
        ("e.json", "[]"),
        ("e.jsonl", "\n\n"),
        ("e.csv", ""),
        ("h.csv", "prompt,chosen,rejected\n"),
    ]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError) as err:
            load_pairs(str(path))
        assert str(path) in str(err.value)


# --------------------------------------------------------------------------- conversational


def test_conversational_explicit_prompt(tmp_path, tok):
    record = {
        "prompt": [msg("system", "Be brief."), msg("user", "Hi?")],
        "chosen": [msg("assistant", "Hello.")],
        "rejected": [msg("assistant", "Go away.")],
    }
    path = write(tmp_path / "c.jsonl", [record])
    pairs, _ = load_pairs(str(path), tokenizer=tok)
    assert pairs == [
        PreferencePair("<|system|>Be brief.\n<|user|>Hi?\n<|assistant|>", "Hello.\n", "Go away.\n")
    ]


def test_conversational_implicit_prompt(tmp_path, tok):
    shared = [msg("user", "A?"), msg("assistant", "B."), msg("user", "C?")]
    record = {
        "chosen": [*shared, msg("assistant", "yes")],
        "rejected": [*shared, msg("assistant", "no")],
    }
    path = write(tmp_path / "c.json", [record])
    pairs, _ = load_pairs(str(path), tokenizer=tok)
    assert pairs == [
        PreferencePair("<|user|>A?\n<|assistant|>B.\n<|user|>C?\n<|assistant|>", "yes\n", "no\n")
    ]


def test_conversational_string_prompt_alongside_messages(tmp_path, tok):
    """ultrafeedback_binarized style: the string prompt repeats the user turn and is ignored;
    with no shared turn it becomes the user turn."""
    records = [
        {
            "prompt": "Q?",
            "chosen": [msg("user", "Q?"), msg("assistant", "a")],
            "rejected": [msg("user", "Q?"), msg("assistant", "b")],
        },
        {"prompt": "Q?", "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
    ]
    path = write(tmp_path / "c.parquet", records)  # nested columns survive parquet
    pairs, _ = load_pairs(str(path), tokenizer=tok)
    assert pairs == [PreferencePair("<|user|>Q?\n<|assistant|>", "a\n", "b\n")] * 2


def test_conversational_needs_a_chat_template(tmp_path):
    record = {
        "chosen": [msg("user", "Q"), msg("assistant", "a")],
        "rejected": [msg("user", "Q"), msg("assistant", "b")],
    }
    path = write(tmp_path / "c.json", [RECORDS[0], record])
    for tokenizer in (None, make_tokenizer(chat_template=None)):
        with pytest.raises(DataError, match="tokenizer with a chat template") as err:
            load_pairs(str(path), tokenizer=tokenizer)
        assert f"{path}, row 1" in str(err.value)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {"chosen": [msg("user", "Q"), msg("assistant", "a")], "rejected": "b"},
            "field 'rejected' is not a list of {role, content} string messages",
        ),
        (
            {"chosen": [msg("user", "Q"), {"role": "assistant"}], "rejected": [msg("user", "Q")]},
            "field 'chosen' is not a list of {role, content} string messages",
        ),
        (
            {"chosen": [msg("user", "Q"), msg("assistant", 5)], "rejected": [msg("user", "Q")]},
            "field 'chosen' is not a list of {role, content} string messages",
        ),
        (
            {"chosen": ["Q", "a"], "rejected": ["Q", "b"]},
            "field 'chosen' is not a list of {role, content} string messages",
        ),
        (
            {
                "prompt": [{"role": 1, "content": "Q"}],
                "chosen": [msg("assistant", "a")],
                "rejected": [msg("assistant", "b")],
            },
            "field 'prompt' is not a list of {role, content} string messages",
        ),
        (
            {
                "chosen": [msg("user", "Q"), msg("assistant", "a")],
                "rejected": [msg("user", "Q"), msg("assistant", "a")],
            },
            "'chosen' does not end in exactly one differing assistant message",
        ),
        (
            {
                "chosen": [msg("user", "Q"), msg("assistant", "a"), msg("user", "more")],
                "rejected": [msg("user", "Q"), msg("assistant", "b")],
            },
            "'chosen' does not end in exactly one differing assistant message",
        ),
        (
            {"chosen": [msg("user", "Q"), msg("assistant", "a")], "rejected": [msg("user", "Q")]},
            "'rejected' does not end in exactly one differing assistant message",
        ),
        (
            {
                "prompt": [msg("user", "Q")],
                "chosen": [msg("assistant", "a"), msg("assistant", "a2")],
                "rejected": [msg("assistant", "b")],
            },
            "'chosen' does not end in exactly one differing assistant message",
        ),
        (
            {"chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
            "conversation has no prompt messages",
        ),
        (
            {
                "prompt": [msg("user", "Q")],
                "chosen": [msg("assistant", "same")],
                "rejected": [msg("assistant", "same")],
            },
            "chosen == rejected",
        ),
    ],
)
def test_conversational_bad_records_are_dropped(tmp_path, tok, record, reason):
    good = {
        "prompt": [msg("user", "Q")],
        "chosen": [msg("assistant", "a")],
        "rejected": [msg("assistant", "b")],
    }
    path = write(tmp_path / "c.json", [good, record])
    pairs, report = load_pairs(str(path), tokenizer=tok)
    assert pairs == [PreferencePair("<|user|>Q\n<|assistant|>", "a\n", "b\n")]
    assert report.dropped == {reason: 1}
    assert report.examples[reason] == ["row 1"]


def test_chat_template_that_does_not_extend_the_prompt(tmp_path):
    """A template that adds text only at the end of a generation prompt: the prompt text is not
    a prefix of the full conversation, so responses cannot be cut out of it."""
    tok = make_tokenizer(CHAT_TEMPLATE + "{% if add_generation_prompt %}<think>{% endif %}")
    records = [
        {
            "prompt": [msg("user", "Q")],
            "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "b")],
        }
    ]
    path = write(tmp_path / "c.json", records)
    with pytest.raises(DataError, match="row 0: chat template does not extend the prompt"):
        load_pairs(str(path), tokenizer=tok, strict=True)


def test_chat_template_error_drops_the_record(tmp_path):
    tok = make_tokenizer(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        + CHAT_TEMPLATE
    )
    records = [
        {
            "prompt": [msg("system", "S")],
            "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "b")],
        },
        {
            "prompt": [msg("user", "Q")],
            "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "b")],
        },
    ]
    pairs, report = load_pairs(str(write(tmp_path / "c.json", records)), tokenizer=tok)
    assert pairs == [PreferencePair("<|user|>Q\n<|assistant|>", "a\n", "b\n")]
    (reason,) = report.dropped
    assert reason.startswith("chat template failed") and "user first" in reason


# --------------------------------------------------------------------------- builtin and hub


def test_builtin_dispatch(monkeypatch):
    calls = []

    def builtin_pairs(dist: str, split: str) -> list[PreferencePair]:
        calls.append((dist, split))
        return EXPECTED

    fake = types.ModuleType("reprpo.data.builtin")
    fake.builtin_pairs = builtin_pairs
    monkeypatch.setitem(sys.modules, "reprpo.data.builtin", fake)
    pairs, report = load_pairs("builtin:us_history/test")
    assert calls == [("us_history", "test")]
    assert pairs == EXPECTED
    assert (report.source, report.n_rows, report.n_pairs) == ("builtin:us_history/test", 3, 3)
    pairs, report = load_pairs("builtin:us_history/test", limit=1)
    assert pairs == EXPECTED[:1] and report.n_pairs == 1
    with pytest.raises(DataError, match="builtin:<dist>/<split>"):
        load_pairs("builtin:us_history")


def test_hf_rows_use_the_record_logic(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(dataset_id: str, *, split: str):
        calls.append((dataset_id, split))
        return [*RECORDS, {"prompt": "P", "chosen": 3, "rejected": "r"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pairs, report = load_pairs("hf:org/name")
    assert pairs == EXPECTED
    assert pairs[0].meta == {"source": "hf:org/name", "row": 0}
    assert report.dropped == {"field 'chosen' is int, not a string": 1}
    load_pairs("hf:org/name:test[:10]")
    assert calls == [("org/name", "train"), ("org/name", "test[:10]")]


def test_hf_offline_is_a_quick_data_error(monkeypatch):
    """HF_HUB_OFFLINE set after `datasets` was imported must still be honoured (no retries)."""
    datasets = pytest.importorskip("datasets")
    before = datasets.config.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_pairs("hf:reprpo-tests/no-such-dataset-4d1c9")
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "reprpo-tests/no-such-dataset-4d1c9" in message
    assert "offline" in message and "local" in message
    assert datasets.config.HF_HUB_OFFLINE == before  # the context manager restored it


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_pairs("hf:org/name")


# --------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]) | json_values,
            "content": st.sampled_from(["Q", "a", "b", ""]) | json_values,
        }
    ),
    max_size=4,
)
field_values = (
    st.sampled_from(["Q", "a", "b", "", "  "]) | st.text(max_size=8) | json_values | messages
)
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "prompt": field_values,
        "chosen": field_values,
        "rejected": field_values,
        "responses": st.dictionaries(
            st.text(max_size=6), st.integers(0, 2) | st.floats() | json_values, max_size=4
        )
        | json_values,
    },
)
words = st.sampled_from(["Q", "a", "b", "c", " ", ""]) | st.text(max_size=6)
valid_ish = (
    st.fixed_dictionaries({"prompt": words, "chosen": words, "rejected": words})
    | st.fixed_dictionaries(
        {
            "prompt": words,
            "responses": st.dictionaries(words, st.sampled_from([0, 0.0, 1.0, 0.5]), max_size=4),
        }
    )
    | st.fixed_dictionaries(
        {
            "prompt": messages,
            "chosen": messages.map(lambda m: m[-1:]),
            "rejected": messages.map(lambda m: m[-1:]),
        }
    )
)
records = st.lists(valid_ish | near_valid | json_values, max_size=6)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_TOKENIZER = make_tokenizer()


def check_loads_or_data_error(path: Path, *, strict: bool = False, pairing: str = "first") -> None:
    """The property: valid pairs and a consistent report, or a DataError — nothing else."""
    try:
        pairs, report = load_pairs(
            str(path), strict=strict, pairing=pairing, tokenizer=FUZZ_TOKENIZER
        )
    except DataError as e:
        assert str(e)
        event("DataError")
        return
    event("pairs")
    assert_all_valid(pairs, report)
    assert report.n_rows >= 1


@FUZZ
@given(
    data=records,
    suffix=st.sampled_from([".json", ".jsonl"]),
    strict=st.booleans(),
    pairing=st.sampled_from(["first", "all"]),
)
def test_fuzz_json_records(data, suffix, strict, pairing):
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / f"f{suffix}", data)
        check_loads_or_data_error(path, strict=strict, pairing=pairing)


@FUZZ
@given(
    data=json_values | st.text(max_size=40) | st.binary(max_size=60),
    suffix=st.sampled_from([".json", ".jsonl", ".csv", ".parquet"]),
)
def test_fuzz_arbitrary_content(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"f{suffix}"
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_text(json.dumps(data), encoding="utf-8")
        check_loads_or_data_error(path)


cells = st.none() | st.sampled_from(["Q", "a", "b", "", " ", "NA", "nan"]) | st.text(max_size=8)


@FUZZ
@given(
    rows=st.lists(st.tuples(cells, cells, cells), max_size=5),
    header=st.sampled_from(
        [["prompt", "chosen", "rejected"], ["prompt", "chosen", "x"], ["a", "b", "c"]]
    ),
    suffix=st.sampled_from([".csv", ".parquet"]),
)
def test_fuzz_tables(rows, header, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"f{suffix}"
        if suffix == ".csv":
            with path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)
        else:
            pd.DataFrame(rows, columns=header).to_parquet(path)
        check_loads_or_data_error(path)
