"""The study archive (experiments/archive.py): done runs and tuning trials as committed text,
read back bit-exactly into a fresh store; damaged files are named, never half-imported."""

from __future__ import annotations

import gzip
import sqlite3

import optuna
import pytest

from reprpo.experiments import archive, store

# values chosen to break a lossy float format: 0.1 + 0.2 is not 0.3 and 1/3 needs 17 digits
ODD = (0.1 + 0.2, 1 / 3, -2.5e-310, 123456789.00000001)


def _run(con, rid: str, *, method="dpo", seed=1, finish=True, error=None):
    owner = store.owner_id()
    assert store.claim_run(con, run_id=rid, method=method, shift="builtin:arc", seed=seed, config_json='{"a": "x,\\ny"}',
                           out_dir=f"runs/{rid}", owner=owner) == "claimed"
    if error:
        store.fail_run(con, run_id=rid, owner=owner, error=error)
        return
    if finish:
        pairs = [("test", "adapter", i, ODD[i % 4], -1.0, 7, 9, ODD[(i + 1) % 4], -0.5, 0.25, 1.5, 1.0) for i in range(5)]
        assert store.finish_run(con, run_id=rid, owner=owner, split_rows=[("test", "adapter", 5, 0.6, ODD[1], 12.5)],
                                pair_rows=pairs, curve_rows=[(1, "loss", ODD[0]), (2, "loss", None)],
                                coherence_rows=[("adapter", "repetition", 0.0)], train_seconds=ODD[3], eval_seconds=2.0)


def _dump(path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(path)
    out = {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in archive.TABLES}
    con.close()
    return out


def test_done_runs_round_trip_bit_exactly_and_failed_ones_stay_out(tmp_path):
    src = tmp_path / "a.sqlite"
    con = store.connect(src)
    _run(con, "r1")
    _run(con, "r2", method="simpo", seed=2)
    _run(con, "r3", error="transient: RuntimeError: boom")
    _run(con, "r4", finish=False)  # still 'running'
    con.close()
    assert archive.export_runs(src, tmp_path / "arch") == 2
    assert archive.archived_runs(tmp_path / "arch") == 2
    assert {p.name for p in (tmp_path / "arch").iterdir()} == {
        "runs.csv", "split_scores.csv", "coherence.csv", "pair_scores.000.csv.gz", "curves.000.csv.gz", "shards.json"}

    dst = tmp_path / "b.sqlite"
    new, had = archive.import_runs(tmp_path / "arch", dst)
    assert sorted(new) == ["r1", "r2"] and had == []
    a, b = _dump(src), _dump(dst)
    assert b["runs"] == [r for r in a["runs"] if r[0] in ("r1", "r2")]
    for t in store.RESULT_TABLES:
        assert b[t] == a[t] and b[t]  # bit-equal floats, NULLs kept
    assert archive.import_runs(tmp_path / "arch", dst) == ([], ["r1", "r2"])  # a second import changes nothing
    assert _dump(dst) == b


def test_a_run_redone_in_the_store_is_not_overwritten_by_the_archive(tmp_path):
    con = store.connect(tmp_path / "a.sqlite")
    _run(con, "r1")
    con.close()
    archive.export_runs(tmp_path / "a.sqlite", tmp_path / "arch")
    con = store.connect(tmp_path / "b.sqlite")
    _run(con, "r1")
    con.execute("UPDATE split_scores SET accuracy = 0.9")
    con.commit()
    con.close()
    assert archive.import_runs(tmp_path / "arch", tmp_path / "b.sqlite") == ([], ["r1"])
    assert _dump(tmp_path / "b.sqlite")["split_scores"][0][4] == 0.9


def test_no_archive_imports_nothing(tmp_path):
    assert archive.import_runs(tmp_path / "none", tmp_path / "b.sqlite") == ([], [])
    assert archive.import_trials(tmp_path / "none", tmp_path / "o.sqlite") == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "split_scores.csv").write_text("run_id,split,model,n,accuracy,margin,chosen_ppl\nr1,test,adapter,five,0.6,0.3,12\n"),
     "split_scores.csv, line 2, column n: 'five' is not a integer"),
    (lambda d: (d / "coherence.csv").write_text("run_id,model,flavour\nr1,adapter,x\n"),
     "coherence.csv: column(s) flavour are not in the store's coherence table"),
    (lambda d: (d / "curves.000.csv.gz").unlink(), "runs.csv is there but curves.000.csv.gz is not"),
    (lambda d: (d / "pair_scores.000.csv.gz").write_bytes(gzip.compress(b"run_id,split\nr1\n")), "pair_scores.000.csv.gz, line 2: 1 cells for 2 columns"),
    (lambda d: (d / "pair_scores.000.csv.gz").write_bytes(gzip.compress(b"run_id,split\n")), "pair_scores.000.csv.gz: 0 rows, but shards.json lists 5"),
    (lambda d: (d / "shards.json").write_text("[1]"), "shards.json: not a listing of shards"),
    (lambda d: (d / "split_scores.csv").write_text("run_id,split,model,n,accuracy,margin,chosen_ppl\nr1,test,adapter,5,nan,0.3,12\n"),
     "column accuracy: 'nan' is not a real"),
])
def test_a_damaged_archive_is_named_and_nothing_is_imported(tmp_path, damage, message):
    con = store.connect(tmp_path / "a.sqlite")
    _run(con, "r1")
    con.close()
    archive.export_runs(tmp_path / "a.sqlite", tmp_path / "arch")
    damage(tmp_path / "arch")
    with pytest.raises(archive.ArchiveError, match=message.replace("(", r"\(").replace(")", r"\)")):
        archive.import_runs(tmp_path / "arch", tmp_path / "b.sqlite")
    assert not (tmp_path / "b.sqlite").exists()  # read and checked before the store is opened


def test_tuning_trials_round_trip_through_the_journal(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.sqlite'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(study_name="dpo@arc", storage=url, direction="maximize")
    s.set_user_attr("validated_on", "arc")
    s.optimize(lambda t: t.suggest_float("train.lr", 1e-5, 1e-2, log=True) * 1000, n_trials=3)
    archive.export_trials(tmp_path / "o.sqlite", tmp_path / "arch")
    assert (tmp_path / "arch" / archive.JOURNAL).is_file()

    assert archive.import_trials(tmp_path / "arch", tmp_path / "p.sqlite") == ["dpo@arc"]
    back = optuna.load_study(study_name="dpo@arc", storage=f"sqlite:///{tmp_path / 'p.sqlite'}")
    assert [(t.params, t.value, t.state) for t in back.trials] == [(t.params, t.value, t.state) for t in s.trials]
    assert back.user_attrs == {"validated_on": "arc"} and back.direction == optuna.study.StudyDirection.MAXIMIZE
    assert archive.import_trials(tmp_path / "arch", tmp_path / "p.sqlite") == []  # already there: not copied twice
    assert len(optuna.load_study(study_name="dpo@arc", storage=f"sqlite:///{tmp_path / 'p.sqlite'}").trials) == 3


def test_the_journal_is_the_same_bytes_when_the_trials_are_the_same(tmp_path):
    """optuna's journal names a random worker id on every line; the archive writes one fixed id,
    so saving unchanged trials again leaves the committed file byte-identical (no git diff)."""
    url = f"sqlite:///{tmp_path / 'o.sqlite'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(study_name="dpo@arc", storage=url, direction="maximize")
    s.optimize(lambda t: t.suggest_float("train.lr", 1e-5, 1e-2, log=True), n_trials=2)
    j = tmp_path / "arch" / archive.JOURNAL
    archive.export_trials(tmp_path / "o.sqlite", tmp_path / "arch")
    first = j.read_bytes()
    archive.export_trials(tmp_path / "o.sqlite", tmp_path / "arch")
    assert j.read_bytes() == first
    assert archive.import_trials(tmp_path / "arch", tmp_path / "p.sqlite") == ["dpo@arc"]  # still a valid journal
    back = optuna.load_study(study_name="dpo@arc", storage=f"sqlite:///{tmp_path / 'p.sqlite'}")
    assert [t.params for t in back.trials] == [t.params for t in s.trials]


def test_runs_that_read_a_changed_input_are_left_out(tmp_path, monkeypatch):
    """An archived run names an SAE folder by path; once the folder's bytes change, the run is
    not imported (it will be redone), the others are."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "w.bin").write_bytes(b"\x00" * 8)
    con = store.connect(tmp_path / "a.sqlite")
    _run(con, "r1")
    _run(con, "r2", method="fpo")
    con.execute("UPDATE runs SET config_json = ? WHERE run_id = 'r2'", ('{"method": {"sae": "sae"}}',))
    con.commit()
    con.close()
    archive.export_runs(tmp_path / "a.sqlite", tmp_path / "arch")
    archive.record_inputs(tmp_path / "arch", ["sae", "not-there"])
    assert archive.changed_inputs(tmp_path / "arch") == []
    (tmp_path / "sae" / "w.bin").write_bytes(b"\x00" * 7 + b"\x01")
    changed = archive.changed_inputs(tmp_path / "arch")
    assert changed == ["sae"]
    skip = lambda cj: any(f'"{p}"' in cj for p in changed)
    assert archive.import_runs(tmp_path / "arch", tmp_path / "b.sqlite", skip=skip) == (["r1"], [])


def test_long_tables_are_sharded_and_a_new_run_changes_only_the_last_shard(tmp_path, monkeypatch):
    """SHARD_ROWS 12 with 5 pair rows per run: shards close at 15 rows, so 4 runs are
    pair_scores.000 (r1, r2, r3) and .001 (r4); a 5th run rewrites .001 only, .000 keeps its bytes,
    and every row still round-trips bit-exactly."""
    monkeypatch.setattr(archive, "SHARD_ROWS", 12)
    src, arch = tmp_path / "a.sqlite", tmp_path / "arch"
    con = store.connect(src)
    for i in range(1, 5):
        _run(con, f"r{i}", seed=i)
    archive.export_runs(src, arch)
    import json

    listing = json.loads((arch / "shards.json").read_text())
    assert listing["pair_scores"] == {"pair_scores.000.csv.gz": 15, "pair_scores.001.csv.gz": 5}
    first = (arch / "pair_scores.000.csv.gz").read_bytes()
    _run(con, "r5", seed=5)
    con.close()
    archive.export_runs(src, arch)
    assert (arch / "pair_scores.000.csv.gz").read_bytes() == first
    assert json.loads((arch / "shards.json").read_text())["pair_scores"] == {"pair_scores.000.csv.gz": 15, "pair_scores.001.csv.gz": 10}
    dst = tmp_path / "b.sqlite"
    assert sorted(archive.import_runs(arch, dst)[0]) == [f"r{i}" for i in range(1, 6)]
    assert _dump(dst) == _dump(src)


def test_an_archive_from_before_shards_imports_and_is_rewritten_in_shards(tmp_path):
    """The old layout (one pair_scores.csv.gz and curves.csv.gz, no shards.json) imports as it is;
    the next export writes shards and removes the single files, so no row is listed twice."""
    src, arch = tmp_path / "a.sqlite", tmp_path / "arch"
    con = store.connect(src)
    _run(con, "r1")
    _run(con, "r2", seed=2)
    con.close()
    archive.export_runs(src, arch)
    for t in archive.GZIPPED:  # turn it into the old layout
        (arch / f"{t}.000.csv.gz").rename(arch / f"{t}.csv.gz")
    (arch / "shards.json").unlink()
    dst = tmp_path / "b.sqlite"
    assert sorted(archive.import_runs(arch, dst)[0]) == ["r1", "r2"]
    assert _dump(dst) == _dump(src)
    archive.export_runs(dst, arch)
    assert not (arch / "pair_scores.csv.gz").exists() and not (arch / "curves.csv.gz").exists()
    assert (arch / "pair_scores.000.csv.gz").is_file() and (arch / "shards.json").is_file()
    third = tmp_path / "c.sqlite"
    archive.import_runs(arch, third)
    assert _dump(third) == _dump(src)
