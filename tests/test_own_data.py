"""Own data (issue 13 items 5, 7): data.train alone is evaluated on a held-out slice of itself,
split by prompt, never on the built-in suite; hf:OWNER/NAME[:CONFIG][:SPLIT]; data.columns;
TRL's explicit-prompt conversational format.

Files are written to tmp dirs; the Hub is mocked (`datasets.load_dataset`), nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from reprpo.config import RunConfig, apply_overrides, from_dict
from reprpo.data.pairs import PreferencePair
from reprpo.data.readers import load_pairs
from reprpo.data.shifts import check_sources, data_sources
from reprpo.errors import ConfigError, DataError
from reprpo.model.tiny import build_tiny_tokenizer


def own_file(path: Path, *, prompts: int = 40) -> Path:
    """`prompts` prompts with two pairs each (same chosen, two rejected), as jsonl."""
    rows = [{"prompt": f"Question {i}: {i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {2 * i + j + 1}"}
            for i in range(prompts) for j in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write(path: Path, records: list[dict]) -> Path:
    """Records in the format the suffix names."""
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".parquet":
        pd.DataFrame(records).to_parquet(path)
    else:
        pd.DataFrame(records).to_csv(path, index=False)
    return path


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# --------------------------------------------------------------------------- item 5: no hidden data


def test_train_alone_is_never_scored_on_the_builtin_suite(tmp_path):
    """`--data.train my.jsonl` and nothing else: splits train/test are the two sides of my.jsonl
    split by prompt, no `builtin:` source anywhere; the built-in suite only when named (or with
    no data.train at all).
    today: the default data.shift builtin:difficulty scored builtin:arith/{train,test}, ... as if
    they were the user's."""
    f = str(own_file(tmp_path / "my.jsonl"))
    cfg = from_dict({"data.train": f})
    d = cfg.data
    train_src, splits = data_sources(shift=d.shift, train=d.train, eval_splits=d.eval)  # as train.py calls it
    assert list(splits) == ["train", "test"]
    assert train_src == splits["train"] == f"{f}#holdout=0.1/train"
    assert splits["test"] == f"{f}#holdout=0.1/test"
    # the built-in suite when the user names it, or gives no data at all
    _, named = data_sources(shift="builtin:difficulty", train=f, eval_splits={})
    assert named["oos"].startswith("builtin:") and list(named) == ["train", "test", "oos", "rnd"]
    default = RunConfig().data
    src, splits = data_sources(shift=default.shift, train=default.train, eval_splits=default.eval)
    assert src == "builtin:arith/train" and splits["test"] == "builtin:arith/test"
    # explicit eval data: no hold-out, the whole file is trained on
    assert data_sources(shift="", train=f, eval_splits={"test": f}) == (f, {"test": f})


def test_heldout_is_disjoint_by_prompt_deterministic_and_removed_from_training(tmp_path, tok):
    """Hand-worked rule: u(prompt) = first 8 bytes of sha256(prompt) / 2⁶⁴; held out iff u < F.
    u('Q2?') = 0x174ed86fb53c8478 / 2⁶⁴ = 0.0910 < 0.1: held out; u('Q1?') = 0.9432: trained on.
    Both pairs of a prompt land on one side; the sides partition the file; a limit counts
    pairs of its own side; reading again gives the same split.
    today: `SOURCE#holdout=...` was not a source ("Data file not found")."""
    from reprpo.data.prepare import prepare

    assert int.from_bytes(hashlib.sha256(b"Q2?").digest()[:8], "big") == 0x174ED86FB53C8478
    qs = write(tmp_path / "q.json", [{"prompt": p, "chosen": "yes", "rejected": r}
                                     for p in ("Q1?", "Q2?") for r in ("no", "nope")])
    test, rep = load_pairs(f"{qs}#holdout=0.1/test")
    assert [(p.prompt, p.rejected) for p in test] == [("Q2?", "no"), ("Q2?", "nope")]
    assert (rep.n_pairs, rep.n_other_side) == (2, 2) and "2 pairs on the other side of the hold-out" in rep.summary()
    train, _ = load_pairs(f"{qs}#holdout=0.1/train")
    assert {p.prompt for p in train} == {"Q1?"} and len(train) == 2

    f = str(own_file(tmp_path / "my.jsonl"))
    cfg = from_dict({"data.train": f, "data.eval_fraction": 0.25, "data.n_train": 0, "data.n_eval": 0})
    train_src, splits = data_sources(shift=cfg.data.shift, train=cfg.data.train, eval_splits=cfg.data.eval,
                                     eval_fraction=cfg.data.eval_fraction)
    tr = prepare(train_src, tok, cfg.data)
    te = prepare(splits["test"], tok, cfg.data)
    p_tr, p_te = {p.prompt for p in tr.pairs}, {p.prompt for p in te.pairs}
    assert not p_tr & p_te  # disjoint by prompt
    assert len(tr.pairs) + len(te.pairs) == 80 and len(p_tr) + len(p_te) == 40  # a partition
    assert 0 < len(p_te) < 20  # about a quarter of 40 prompts
    assert all(sum(p.prompt == q for p in te.pairs) == 2 for q in p_te)  # both pairs of a prompt
    again, _ = load_pairs(splits["test"])
    assert again == te.pairs
    first3, _ = load_pairs(splits["test"], limit=3)
    assert first3 == te.pairs[:3]


def test_empty_side_and_bad_fraction_are_clear_errors(tmp_path):
    """One prompt: one side of any split is empty -> DataError naming the fix; eval_fraction
    outside (0, 1) is a ConfigError.
    today: data.eval_fraction was an unknown field, and the hold-out source did not exist."""
    one = write(tmp_path / "one.json", [{"prompt": "Q1?", "chosen": "yes", "rejected": r} for r in ("no", "nope")])
    with pytest.raises(DataError, match=r"held-out 10% by prompt of .*one.json is empty.*data.eval_fraction"):
        load_pairs(f"{one}#holdout=0.1/test")
    assert from_dict({"data.eval_fraction": 0.25}).data.eval_fraction == 0.25
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match="data.eval_fraction must be in"):
            from_dict({"data.eval_fraction": bad})


def test_summary_table_names_each_split_source_and_says_when_it_is_heldout():
    """markdown_table: one line per split naming its source (and the hold-out), and a line
    saying the splits are slices of the training data when they are.
    today: the table named no source; builtin splits looked like the user's."""
    from reprpo.eval.scoring import markdown_table

    row = {"n": 23, "base_accuracy": 0.5, "adapter_accuracy": 0.6, "delta_pp": 10.0, "base_margin": 0.1,
           "adapter_margin": 0.2, "ppl_ratio": 1.0}
    t = pd.DataFrame([{"split": "train", "source": "my.json#holdout=0.1/train"} | row | {"n": 100},
                      {"split": "test", "source": "my.json#holdout=0.1/test"} | row])
    md = markdown_table(t)
    assert "- test: my.json (held-out 10% by prompt, 23 pairs)" in md
    assert "- train: my.json (without the held-out 10% by prompt, 100 pairs)" in md
    assert md.startswith("No eval data was given") and "slices of the training data" in md
    assert "| test | 23 | 50.0 | 60.0 | +10.0 |" in md
    named = markdown_table(pd.DataFrame([{"split": "oos", "source": "builtin:arith/test"} | row]))
    assert "- oos: builtin:arith/test (23 pairs)" in named and "No eval data" not in named


def test_train_then_evaluate_use_the_same_split(tmp_path, capsys):
    """train() (unchanged train.py) trains on the training side only; evaluate_run scores
    train/test = the two sides and writes the sources into summary.{md,csv}.
    today: evaluation scored builtin:arith/* and training used every pair."""
    from reprpo.eval.scoring import evaluate_run
    from reprpo.train import train

    f = str(own_file(tmp_path / "my.jsonl"))
    cfg = apply_overrides(RunConfig(), {
        "model.name": "tiny-random", "data.train": f, "data.n_train": 0, "data.n_eval": 0,
        "data.max_length": 32, "data.max_prompt_length": 24, "train.batch_size": 8, "train.max_steps": 1,
        "train.progress": False, "eval.after_train": False, "out": str(tmp_path / "run")}, where="test")
    out = train(cfg)
    printed = capsys.readouterr().out
    train_line = next(line for line in printed.splitlines() if line.startswith("train data:"))
    held_out = len(load_pairs(f"{f}#holdout=0.1/test")[0])
    assert held_out > 0 and f"{held_out} pairs on the other side of the hold-out" in train_line
    table, per_pair = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
    assert table["split"].tolist() == ["train", "test"]
    assert table["source"].tolist() == [f"{f}#holdout=0.1/train", f"{f}#holdout=0.1/test"]
    assert table["n"].tolist() == [80 - held_out, held_out]
    md = (out / "eval" / "summary.md").read_text()
    assert f"- test: {f} (held-out 10% by prompt, {held_out} pairs)" in md and "No eval data" in md
    assert "source" in pd.read_csv(out / "eval" / "summary.csv")


def test_check_sources_sees_through_the_holdout_and_parses_hf(tmp_path):
    """check_sources checks the file behind a hold-out side, and an hf: source's grammar.
    today: hf: sources were not checked at all."""
    f = str(own_file(tmp_path / "my.jsonl"))
    check_sources("", f, {})
    with pytest.raises(DataError, match=r"training data \(data.train\).*not found"):
        check_sources("", str(tmp_path / "nope.jsonl"), {})
    with pytest.raises(DataError, match=r"data.eval test: Bad Hub source .*hf:<owner>/<name>\[:<config>\]\[:<split>\].*Fix data.eval"):
        check_sources("", f, {"test": "hf:org/name:cfg:test:extra"})


# --------------------------------------------------------------------------- item 7: hf, columns, TRL


@pytest.mark.parametrize(("source", "expected"), [
    ("hf:org/name", ("org/name", None, "train")),
    ("hf:org/name:test", ("org/name", None, "test")),
    ("hf:org/name:en:test", ("org/name", "en", "test")),
    ("hf:org/name:en:", ("org/name", "en", "train")),
    ("hf:org/name:train[:10%]", ("org/name", None, "train[:10%]")),
    ("hf:org/name:en:train[10:20]", ("org/name", "en", "train[10:20]")),
])
def test_hf_grammar(source, expected):
    """hf:ID[:CONFIG][:SPLIT]: one part after the id is the split, two are config and split;
    colons inside [...] belong to the split.
    today: there was no config; `hf:org/name:en:test` asked for split 'en:test'."""
    from reprpo.data.readers import parse_hf_source

    assert parse_hf_source(source) == expected


def test_hf_config_reaches_load_dataset_and_bad_grammar_is_named(monkeypatch):
    """today: load_dataset('org/name', split='en:test'); four parts were read as a split."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(dataset_id, name=None, *, split):
        calls.append((dataset_id, name, split))
        return [{"prompt": "Q", "chosen": "a", "rejected": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    load_pairs("hf:org/name:en:test")
    load_pairs("hf:org/name:test")
    assert calls == [("org/name", "en", "test"), ("org/name", None, "test")]
    with pytest.raises(DataError, match=r"one part after the id it is the split.*two the config"):
        load_pairs("hf:org/name:en:test:more")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_columns_rename_file_fields(tmp_path, suffix):
    """--data.columns prompt=question,chosen=good,rejected=bad reads any file format; the
    rename is simultaneous (chosen=rejected,rejected=chosen swaps).
    today: load_pairs had no `columns`, and DataConfig no such field."""
    from reprpo.data.prepare import prepare

    records = [{"question": f"Q{i}?", "good": f"good {i}", "bad": f"bad {i}", "id": str(i)} for i in range(3)]
    path = str(write(tmp_path / f"d{suffix}", records))
    cfg = from_dict({"data.columns": "prompt=question,chosen=good,rejected=bad"})
    assert cfg.data.columns == {"prompt": "question", "chosen": "good", "rejected": "bad"}
    prep = prepare(path, build_tiny_tokenizer(), cfg.data)
    assert prep.pairs == [PreferencePair(f"Q{i}?", f"good {i}", f"bad {i}") for i in range(3)]
    swapped, _ = load_pairs(path, columns={"prompt": "question", "chosen": "bad", "rejected": "good"})
    assert swapped[0] == PreferencePair("Q0?", "bad 0", "good 0")
    plain = write(tmp_path / f"p{suffix}", [{"prompt": "P", "chosen": "c", "rejected": "r"}])
    assert load_pairs(str(plain), columns={"chosen": "rejected", "rejected": "chosen"})[0] == [PreferencePair("P", "r", "c")]


def test_column_errors_name_the_file_row_and_column(tmp_path):
    """Unknown target: DataError (ConfigError from the config) naming the column, with the
    reversed-order hint; a source column missing from the first record: DataError naming file,
    row and column; missing from a later record: that record is dropped with the reason.
    today: load_pairs(columns=...) was a TypeError; data.columns an unknown field."""
    path = str(write(tmp_path / "d.jsonl", [{"question": "Q?", "good": "a", "bad": "b"}, {"good": "a", "bad": "b"}]))
    with pytest.raises(DataError, match=r"d.jsonl: data.columns: unknown target column 'question'.*prompt=question"):
        load_pairs(path, columns={"question": "prompt"})
    with pytest.raises(ConfigError, match=r"data.columns: unknown target column 'answer'"):
        from_dict({"data.columns": "answer=good"})
    with pytest.raises(ConfigError, match=r"'good' is renamed to both chosen and rejected"):
        from_dict({"data.columns": "chosen=good,rejected=good"})
    with pytest.raises(DataError, match=r"d.jsonl, line 1: .*no column 'text'.*'question', 'good', 'bad'"):
        load_pairs(path, columns={"prompt": "text"})
    pairs, rep = load_pairs(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert pairs == [PreferencePair("Q?", "a", "b")]
    assert rep.dropped == {"missing column 'question' (renamed to 'prompt' by data.columns)": 1}
    assert rep.examples[next(iter(rep.dropped))] == ["line 2"]
    table = str(write(tmp_path / "t.csv", [{"q": "Q?", "chosen": "a", "rejected": "b"}]))
    with pytest.raises(DataError, match=r"t.csv, row 0: .*no column 'question'"):
        load_pairs(table, columns={"prompt": "question"})


def test_trl_explicit_prompt_conversations_from_the_hub(monkeypatch, tok):
    """TRL's explicit-prompt conversational preference format (prompt = messages, chosen /
    rejected = one assistant message each), from hf:OWNER/NAME:CONFIG:SPLIT with renamed
    columns, rendered with the chat template `<|role|>content<|end|>\\n`. The hold-out hashes
    the prompt messages, so another chat template gives the same split.
    today: 'hf:trl-lib/ex:conv:test' asked for split 'conv:test', and there were no columns."""
    datasets = pytest.importorskip("datasets")
    rows = [{"question": [msg("system", "Be brief."), msg("user", f"Sky {i}?")],
             "good": [msg("assistant", "Blue.")], "bad": [msg("assistant", "Green.")]} for i in range(30)]
    monkeypatch.setattr(datasets, "load_dataset", lambda dataset_id, name=None, *, split: datasets.Dataset.from_list(rows))
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    pairs, rep = load_pairs("hf:trl-lib/ex:conv:test", tokenizer=tok, columns=columns)
    assert rep.n_pairs == 30 and not rep.dropped
    assert pairs[0] == PreferencePair("<|system|>Be brief.<|end|>\n<|user|>Sky 0?<|end|>\n<|assistant|>",
                                      "Blue.<|end|>\n", "Green.<|end|>\n")
    other = build_tiny_tokenizer()
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    side = [load_pairs("hf:trl-lib/ex:conv:test#holdout=0.3/test", tokenizer=t, columns=columns)[0] for t in (tok, other)]
    assert 0 < len(side[0]) < 30
    assert [p.meta["row"] for p in side[0]] == [p.meta["row"] for p in side[1]]
