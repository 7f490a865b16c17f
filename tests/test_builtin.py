"""The built-in preference suite: deterministic, valid, disjoint splits, correct answers.

Fast and model-free. The answer checks re-derive every chosen answer from the prompt text
alone (parse the prompt, compute the truth) and check the rejected answer is wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from reprpo.data.builtin import (
    DISTRIBUTIONS,
    SHIFTS,
    SIZES,
    _no_carry,
    builtin_pairs,
    describe,
    number_words,
    split_of,
)
from reprpo.data.pairs import PreferencePair, check_pair
from reprpo.errors import DataError

GENIES_SHIFTS = Path(__file__).resolve().parents[2] / "shared/data/genies/shifts.json"
ALL = [(d, s) for d in DISTRIBUTIONS for s in SIZES]


def _pairs(dist: str) -> list[PreferencePair]:
    return builtin_pairs(dist, "train") + builtin_pairs(dist, "test")


# ---------------------------------------------------------------------------------------
# Contract: determinism, sizes, validity, disjoint splits


@pytest.mark.parametrize("dist,split", ALL)
def test_deterministic_and_sized(dist: str, split: str) -> None:
    a, b = builtin_pairs(dist, split), builtin_pairs(dist, split)
    assert a == b
    assert [p.meta for p in a] == [p.meta for p in b]
    assert len(a) == SIZES[split]


def test_pinned_first_pair() -> None:
    """Seeds come from crc32, not hash(): the first pair is the same on every machine."""
    p = builtin_pairs("arith", "train")[0]
    assert (p.prompt, p.chosen, p.rejected) == ("Compute 73 - 35.", "73 - 35 = 38", "73 - 35 = 83")
    assert p.meta == {"source": "builtin:arith/train", "row": 0}


@pytest.mark.parametrize("dist,split", ALL)
def test_pairs_valid(dist: str, split: str) -> None:
    pairs = builtin_pairs(dist, split)
    for i, p in enumerate(pairs):
        assert isinstance(p, PreferencePair)
        assert check_pair(p.prompt, p.chosen, p.rejected, where=f"row {i}") is None
        assert p.prompt.strip() and p.chosen.strip() and p.rejected.strip()
        assert p.chosen != p.rejected
        assert p.meta == {"source": f"builtin:{dist}/{split}", "row": i}
        assert split_of(p.prompt) == split


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_train_test_disjoint_and_unique(dist: str) -> None:
    train = [p.prompt for p in builtin_pairs(dist, "train")]
    test = [p.prompt for p in builtin_pairs(dist, "test")]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_length_is_no_giveaway(dist: str) -> None:
    """'Pick the longer response' must be no better than a coin on any distribution."""
    pairs = _pairs(dist)
    longer = sum(
        (len(p.chosen) > len(p.rejected)) + 0.5 * (len(p.chosen) == len(p.rejected)) for p in pairs
    ) / len(pairs)
    assert 0.35 <= longer <= 0.65, longer


# ---------------------------------------------------------------------------------------
# Shifts, errors, describe


def test_shifts_name_existing_distributions() -> None:
    keys = {"name", "train", "oos", "rnd"}
    if GENIES_SHIFTS.exists():  # same keys as the GENIES file, when it is around
        keys = set(json.loads(GENIES_SHIFTS.read_text())[0])
    names = [s["name"] for s in SHIFTS]
    assert len(names) == len(set(names))
    assert {"context", "difficulty", "encoding", "quality"} <= set(names)
    for s in SHIFTS:
        assert set(s) == keys
        assert {s["train"], s["oos"], s["rnd"]} <= set(DISTRIBUTIONS)
        assert s["train"] != s["oos"]
        assert s["rnd"] not in (s["train"], s["oos"])


def test_at_least_six_distributions_with_descriptions() -> None:
    assert len(DISTRIBUTIONS) >= 6
    for name, d in DISTRIBUTIONS.items():
        assert d.name == name
        assert d.description and "\n" not in d.description


def test_unknown_distribution_raises_with_valid_names() -> None:
    with pytest.raises(DataError) as e:
        builtin_pairs("arithmetic", "train")
    assert "arithmetic" in str(e.value)
    for name in DISTRIBUTIONS:
        assert name in str(e.value)


def test_unknown_split_raises_with_valid_splits() -> None:
    with pytest.raises(DataError) as e:
        builtin_pairs("arith", "validation")
    assert "validation" in str(e.value)
    for split in SIZES:
        assert split in str(e.value)


def test_describe_lists_everything() -> None:
    text = describe()
    for name in DISTRIBUTIONS:
        assert name in text
    for s in SHIFTS:
        assert s["name"] in text


# ---------------------------------------------------------------------------------------
# Hand-worked helpers


def test_number_words() -> None:
    assert number_words(0) == "zero"
    assert number_words(13) == "thirteen"
    assert number_words(40) == "forty"
    assert number_words(42) == "forty-two"
    assert number_words(100) == "one hundred"
    assert number_words(198) == "one hundred ninety-eight"
    assert number_words(1005) == "one thousand five"
    with pytest.raises(ValueError):
        number_words(10000)


def test_no_carry_slip() -> None:
    assert _no_carry(47, 38, "+") == 75  # 7+8=15 -> 5 (carry dropped), 4+3=7; truth 85
    assert _no_carry(52, 27, "-") == 35  # 2-7 -> 5 (borrow dropped), 5-2=3; truth 25
    assert _no_carry(12, 34, "+") == 46  # no carry needed: the truth


# ---------------------------------------------------------------------------------------
# Every generator's answers, re-derived from the prompt


def _last_int(s: str) -> int:
    return int(re.findall(r"\d+", s)[-1])


def _eval(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


@pytest.mark.parametrize("dist,digits", [("arith", (1, 2)), ("arith_hard", (3,))])
def test_arith_answers(dist: str, digits: tuple[int, ...]) -> None:
    for p in _pairs(dist):
        a, op, b = re.fullmatch(r"\D*?(\d+) ([+-]) (\d+)\D*", p.prompt).groups()
        assert len(a) in digits and len(b) in digits
        truth = _eval(int(a), op, int(b))
        assert p.chosen == f"{a} {op} {b} = {truth}"
        assert p.rejected.startswith(f"{a} {op} {b} = ")
        assert _last_int(p.rejected) != truth


def test_arith_words_answers() -> None:
    value = {number_words(n): n for n in range(200)}
    word = r"([a-z]+(?:-[a-z]+)?)"
    for p in _pairs("arith_words"):
        text = p.prompt.lower()
        if m := re.search(rf"{word} (plus|minus) {word}\?", text):
            a, op, b = value[m[1]], m[2], value[m[3]]
        elif m := re.search(rf"(?:add|sum of) {word} and {word}", text):
            a, op, b = value[m[1]], "plus", value[m[2]]
        else:  # "subtract B from A", "take B away from A"
            m = re.search(rf"(?:subtract|take) {word} (?:away )?from {word}", text)
            a, op, b = value[m[2]], "minus", value[m[1]]
        sign = "+" if op == "plus" else "-"
        assert p.chosen == f"{a} {sign} {b} = {_eval(a, sign, b)}"
        assert _last_int(p.rejected) != _eval(a, sign, b)


def test_arith_story_answers() -> None:
    for p in _pairs("arith_story"):
        a, b = map(int, re.findall(r"\d+", p.prompt))
        op = "-" if any(w in p.prompt for w in ("gives", "takes", "lost")) else "+"
        truth, wrong = _eval(a, op, b), _last_int(p.rejected)
        assert p.chosen.startswith(f"{a} {op} {b} = {truth}, so ")
        assert p.rejected.startswith(f"{a} {op} {b} = {wrong}, so ")
        assert wrong != truth
        # after "a op b = ", the same sentence with only the result changed
        rest_c, rest_r = p.chosen.split(" = ", 1)[1], p.rejected.split(" = ", 1)[1]
        assert re.sub(rf"\b{truth}\b", "#", rest_c) == re.sub(rf"\b{wrong}\b", "#", rest_r)


def test_compare_answers() -> None:
    for p in _pairs("compare"):
        a, b = map(int, re.findall(r"\d+", p.prompt))
        want = max(a, b) if "larger" in p.prompt else min(a, b)
        assert _last_int(p.chosen) == want
        assert _last_int(p.rejected) == a + b - want


def test_spelling_answers() -> None:
    index = {"first": 0, "second": 1, "third": 2}
    for p in _pairs("spelling"):
        pos = re.search(r"(first|second|third)", p.prompt)[1]
        word = re.search(r"['\"](\w+)['\"]", p.prompt)[1]
        i = index[pos]
        assert p.chosen == f"The {pos} letter of '{word}' is '{word[i]}'."
        assert p.rejected == f"The {pos} letter of '{word}' is '{word[i + 1]}'."  # one too far
        assert word[i] != word[i + 1]


def test_quality_lists_answers() -> None:
    for p in _pairs("quality_lists"):
        k = {"three": 3, "four": 4, "five": 5}[re.search(r"(three|four|five)", p.prompt)[1]]
        excluded = re.search(r"(?:other than|but not|not|apart from) (\w+)", p.prompt)[1]
        good = re.split(r", | and ", p.chosen.rstrip(".").lower())
        bad = re.split(r", | and ", p.rejected.rstrip(".").lower())
        assert len(good) == len(set(good)) == k and excluded.lower() not in good
        assert len(bad) == k and len(set(bad)) < k  # degenerate: an item repeats


def test_quality_count_answers() -> None:
    for p in _pairs("quality_count"):
        nums = [int(x) for x in re.findall(r"\d+", p.prompt)]
        if re.search(r"in \d+s from", p.prompt):  # "Count up in 4s from 10 to 30."
            k, a, b = nums
        else:  # "Count from 10 to 30 in steps of 4.", "..., adding 4 each time."
            a, b, k = nums
        step = k if b > a else -k
        assert p.chosen == ", ".join(map(str, range(a, b + step, step)))
        bad = list(map(int, p.rejected.split(", ")))
        assert len(bad) == len(p.chosen.split(", ")) and len(set(bad)) < len(bad)
