"""Report from a hand-made results store: expected numbers worked out by hand below.

Store: methods dpo and hs-none-prefvec, shifts builtin:context and builtin:difficulty, seeds
1-3, splits train/test/oos/rnd, base + adapter, curves and coherence. One extra dpo run
(difficulty, seed 3) is `failed` and must be ignored.

Hand-worked cell, shift builtin:context (base accuracy 0.50 everywhere there):
  oos  dpo      adapter 0.60 0.55 0.65 → Δ 10, 5, 15 pp: mean 10, s 5,
                h = t_{.975,2}·s/√3 = 4.302653·5/1.732051 = 12.42  → "+10.0 ± 12.4"
  oos  prefvec  adapter 0.70 0.62 0.66 → Δ 20, 12, 16: mean 16, s 4, h = 9.94 → "+16.0 ± 9.9"
  paired vs dpo: d = 10, 7, 1 → mean 6, s = √21 = 4.583, h = 11.38 → "+6.0 ± 11.4 (n=3)"
  test prefvec  adapter 0.66 0.62 0.70 → Δ 16, 12, 20
  transfer prefvec = 20/16, 12/12, 16/20 = 1.25, 1.00, 0.80 → mean 1.0167, s 0.2255,
                h = 4.302653·0.2255/1.732051 = 0.56 → "1.02 ± 0.56"
Shift builtin:difficulty: dpo has seeds 1, 2 done (3 failed) → prefvec's paired difference
there uses n=2 and counts 1 unmatched seed; dpo's Δtest is 0 at seed 1 → transfer undefined
for 1 of 2 seeds.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from reprpo.experiments.store import SCHEMA

PV = "hs-none-prefvec"
# (shift, split, method) -> adapter accuracy per seed 1..3; base accuracy per (shift, split)
ADAPTER = {
    ("builtin:context", "oos", "dpo"): [0.60, 0.55, 0.65],
    ("builtin:context", "oos", PV): [0.70, 0.62, 0.66],
    ("builtin:context", "test", "dpo"): [0.70, 0.60, 0.65],
    ("builtin:context", "test", PV): [0.66, 0.62, 0.70],
}
BASE = {("builtin:context", s): 0.50 for s in ("train", "test", "oos", "rnd")}
BASE |= {("builtin:difficulty", "train"): 0.55, ("builtin:difficulty", "test"): 0.50,
         ("builtin:difficulty", "oos"): 0.45, ("builtin:difficulty", "rnd"): 0.52}


def _adapter_acc(shift, split, method, seed):
    if (shift, split, method) in ADAPTER:
        return ADAPTER[(shift, split, method)][seed - 1]
    if shift == "builtin:difficulty" and split == "test" and method == "dpo" and seed == 1:
        return BASE[(shift, split)]  # Δtest = 0: transfer undefined
    bump = {"train": 0.20, "test": 0.12, "oos": 0.04, "rnd": 0.01}[split] + (0.03 if method == PV else 0.0)
    return round(BASE[(shift, split)] + bump + 0.01 * seed, 4)


def build_store(path):
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)
    con.execute("ALTER TABLE runs ADD COLUMN owner TEXT")  # columns another writer may add are fine
    for shift in ("builtin:context", "builtin:difficulty"):
        for method in ("dpo", PV):
            for seed in (1, 2, 3):
                failed = shift == "builtin:difficulty" and method == "dpo" and seed == 3
                rid = f"{method}|{shift}|{seed}"
                con.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (rid, method, shift, seed, "failed" if failed else "done", json.dumps({"train": {"seed": seed}}),
                             None, "boom" if failed else None, 1.0, 1000.0 + seed, 1001.0 + seed, "test"))
                for split in ("train", "test", "oos", "rnd"):
                    b, a = BASE[(shift, split)], _adapter_acc(shift, split, method, seed)
                    con.execute("INSERT INTO split_scores VALUES (?,?,?,?,?,?,?)", (rid, split, "base", 100, b, 0.10, 20.0))
                    con.execute("INSERT INTO split_scores VALUES (?,?,?,?,?,?,?)", (rid, split, "adapter", 100, a, 0.10 + a - b, 21.0))
                for step in range(1, 6):
                    loss = (0.693 if method == "dpo" else 1.386) - 0.05 * step * (1 + 0.1 * seed)
                    con.execute("INSERT INTO curves VALUES (?,?,?,?)", (rid, step, "loss", loss))
                    con.execute("INSERT INTO curves VALUES (?,?,?,?)", (rid, step, "rewards/margin", 0.1 * step * seed))
                for model, rep in (("base", 0.10), ("adapter", 0.10 + 0.02 * seed)):
                    con.execute("INSERT INTO coherence VALUES (?,?,?,?)", (rid, model, "repetition", rep))
                    con.execute("INSERT INTO coherence VALUES (?,?,?,?)", (rid, model, "distinct_2", 1.0 - rep))
    con.commit()
    con.close()


@pytest.fixture
def store(tmp_path):
    p = tmp_path / "results.sqlite"
    build_store(p)
    return p


def test_load_frames_keeps_done_runs_only(store):
    from reprpo.experiments.report import load_frames

    f = load_frames(store)
    assert len(f["runs"]) == 11 and set(f["runs"].status) == {"done"}
    assert "owner" in f["runs"]
    assert len(f["split_scores"]) == 11 * 4 * 2
    assert dict(zip(f["status"].status, f["status"].runs)) == {"done": 11, "failed": 1}


def test_summary_table_matches_hand_worked_numbers(store):
    from reprpo.experiments.report import load_frames, summary_table, transfer_table

    f = load_frames(store)
    s = summary_table(f).set_index(["shift", "split", "method"])
    dpo, pv = s.loc[("builtin:context", "oos", "dpo")], s.loc[("builtin:context", "oos", PV)]
    assert dpo.seeds == 3 and dpo.delta_pp == pytest.approx(10.0) and dpo.delta_hw == pytest.approx(12.4207, abs=1e-3)
    assert pv.delta_pp == pytest.approx(16.0) and pv.delta_hw == pytest.approx(9.9366, abs=1e-3)
    assert pv.vs_dpo == pytest.approx(6.0) and pv.vs_dpo_hw == pytest.approx(11.3837, abs=1e-3) and pv.vs_dpo_n == 3
    assert pv.adapter_acc == pytest.approx(66.0) and pv.base_acc == pytest.approx(50.0)
    diff = s.loc[("builtin:difficulty", "oos", PV)]
    assert diff.vs_dpo_n == 2 and diff.vs_dpo_unmatched == 1
    t = transfer_table(f).set_index(["shift", "method"])
    assert t.loc[("builtin:context", PV)].transfer == pytest.approx((1.25 + 1.0 + 0.8) / 3)
    assert t.loc[("builtin:context", PV)].transfer_hw == pytest.approx(0.5601, abs=1e-3)
    assert t.loc[("builtin:difficulty", "dpo")].defined == 1  # Δtest = 0 at seed 1


def test_render_report_writes_markdown_html_and_pngs(store, tmp_path):
    from reprpo.experiments.report import render_report

    out = tmp_path / "rep"
    md = render_report(store, out)
    assert (out / "report.md").read_text() == md
    row = next(line for line in md.splitlines() if line.startswith(f"| oos | {PV} |") and "+16.0" in line)
    assert "+16.0 ± 9.9" in row and "+6.0 ± 11.4 (n=3)" in row and "| 3 |" in row
    assert "| oos | dpo | 3 | 100 | 50.0 | 60.0 | +10.0 ± 12.4 | — |" in md
    assert f"| {PV} | 3 | +16.0 | +16.0 | 1.02 ± 0.56 | 3/3 |" in md  # transfer table, context
    assert "percentage points" in md and "Student-t" in md
    assert "### Coherence" in md and "repetition" in md
    assert "Transfer undefined (Δtest = 0) for dpo @ builtin:difficulty: 1 of 2 seeds" in md
    for png in ("accuracy.png", "transfer.png", "curves.png"):
        assert (out / png).stat().st_size > 5000
        assert f"]({png})" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page


def test_report_cli_prints_markdown(store, tmp_path, capsys):
    from reprpo.cli import main

    assert main(["report", "--store", str(store), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "# reprpo results" in out and "+10.0 ± 12.4" in out
    assert (tmp_path / "r" / "report.html").is_file()


def test_report_missing_store_is_a_clear_error(tmp_path, capsys):
    from reprpo.cli import main

    assert main(["report", "--store", str(tmp_path / "nope.sqlite")]) == 2
    assert "results store not found" in capsys.readouterr().err


def test_report_flags_params_tuned_on_a_reported_shift(store, tmp_path):
    """If the store records where a run's params were tuned (`runs.validated_on`), a run reported
    on that very shift is flagged (DESIGN §6: tuning on a validation shift never reported)."""
    from reprpo.experiments.report import render_report

    con = sqlite3.connect(store)
    con.execute("ALTER TABLE runs ADD COLUMN validated_on TEXT")
    con.execute("UPDATE runs SET validated_on = 'builtin:context' WHERE method = ?", (PV,))
    con.commit()
    con.close()
    md = render_report(store, tmp_path / "rep")
    warn = next(line for line in md.splitlines() if "WARNING" in line)
    assert f"{PV} @ builtin:context" in warn and "difficulty" not in warn
