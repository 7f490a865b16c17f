"""The verdict of a study (experiments/verdict.py) and its statistics (eval/stats.py): paired
bootstrap, bootstrap p, Holm, the coherence gate, yes / no / can't tell. Numbers by hand below.

Hand-made store: shifts sA, sB; seeds 1, 2; 20 eval pairs per split (oos, test). Every run's
base model is right on pairs 0-9 (accuracy 0.5). Adapters (oos; every adapter is right on all 20
test pairs, so every Δtest difference is 0):
  dpo     right on pairs 0-9   → Δoos 0
  same    = dpo                → d = 0 exactly, interval [0, 0], p = 1
  good    right on all 20      → d = 100·(1 − ½) = +50 pp per seed, per shift, across shifts
  blowup  = good, but its chosen ppl on oos is 500× the base's → incoherent
  worse   right on pairs 0-4   → d = 100·(¼ − ½) = −25 pp; its run (sB, seed 2) failed
target:dpo (target-tuned) oos accuracy 0.8 → DE difference of good = 0.5/0.8 = 0.625.
Bootstrap with B = 500: every replicate of good / blowup / worse keeps its sign (a replicate at 0
needs all 40 resampled pairs of a shift on one side: ½⁴⁰), so p = 2/(B + 1) = 2/501 = 0.003992;
Holm over the 4 methods: sorted 2/501 ×4, ×3, ×2 and 1 → running max 8/501 = 0.015968 for the
three, 1 for same. Answers: good yes, blowup no (incoherent), worse no (−25, p̃ < .05), same can't tell.
"""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest

from reprpo.eval.stats import (
    bootstrap_pvalue,
    holm,
    paired_bootstrap,
    paired_bootstrap_draws,
    percentile_interval,
)
from reprpo.experiments.store import SCHEMA

N, SEEDS, SHIFTS = 20, (1, 2), ("sA", "sB")
OOS_RIGHT = {"dpo": 10, "same": 10, "good": 20, "blowup": 20, "worse": 5}  # adapter right on pairs 0..k−1
B = 500


def _insert_run(con, rid, method, shift, seed, status="done"):
    con.execute("INSERT INTO runs (run_id, method, shift, seed, status, config_json, created, finished) VALUES (?,?,?,?,?,?,?,?)",
                (rid, method, shift, seed, status, json.dumps({"train": {"seed": seed}}), 1000.0 + seed, 1001.0 + seed))


def build_store(path, shifts=SHIFTS):
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)
    for shift in shifts:
        for seed in SEEDS:
            for method, right in OOS_RIGHT.items():
                rid = f"{method}|{shift}|{seed}"
                if method == "worse" and shift == shifts[1] and seed == 2:
                    _insert_run(con, rid, method, shift, seed, status="failed")
                    continue
                _insert_run(con, rid, method, shift, seed)
                for split, k in (("oos", right), ("test", N)):
                    for model, kk in (("base", 10), ("adapter", k)):
                        ppl = 10.0 if model == "base" else 5000.0 if (method == "blowup" and split == "oos") else 11.0
                        con.execute("INSERT INTO split_scores VALUES (?,?,?,?,?,?,?)", (rid, split, model, N, kk / N, 0.1, ppl))
                        for i in range(N):
                            c = 1.0 if i < kk else 0.0
                            con.execute("INSERT INTO pair_scores (run_id, split, model, pair, margin, correct) VALUES (?,?,?,?,?,?)",
                                        (rid, split, model, i, 2 * c - 1, c))
                for model, rep in (("base", 0.1), ("adapter", 0.2)):
                    con.execute("INSERT INTO coherence VALUES (?,?,?,?)", (rid, model, "repetition", rep))
            rid = f"target|{shift}|{seed}"
            _insert_run(con, rid, "target:dpo", shift, seed)
            for model, acc in (("base", 0.5), ("adapter", 0.8)):
                con.execute("INSERT INTO split_scores VALUES (?,?,?,?,?,?,?)", (rid, "oos", model, N, acc, 0.1, 10.0))
    con.commit()
    con.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    p = tmp_path_factory.mktemp("verdict") / "results.sqlite"
    build_store(p)
    return p


@pytest.fixture(scope="module")
def tables(store):
    from reprpo.experiments.verdict import verdict_tables

    return verdict_tables(store, n_boot=B, seed=0)


# --------------------------------------------------------------------------- statistics


def test_paired_bootstrap_identical_methods_is_zero():
    """method = reference on every pair of every seed: every replicate difference is 0 → (0, 0, 0), p = 1."""
    rng = np.random.default_rng(1)
    vals = {s: rng.integers(0, 2, size=30).astype(float) for s in (1, 2, 3)}
    assert paired_bootstrap(vals, vals, n_boot=300, seed=0) == (0.0, 0.0, 0.0)
    assert bootstrap_pvalue(paired_bootstrap_draws(vals, vals, n_boot=300)[1]) == 1.0


def test_paired_bootstrap_right_where_reference_wrong_on_half():
    """Method right on all 20 pairs, reference on pairs 0-9, two seeds: d = 100·(1 − ½) = +50 pp;
    a replicate is 100 × the share of pairs 10-19 drawn, never 0 here (½⁴⁰), so the 95% interval
    excludes 0 and p = 2/(B + 1). Same seed → same draws; another seed → other draws."""
    ref = {s: (np.arange(N) < 10).astype(float) for s in SEEDS}
    meth = {s: np.ones(N) for s in SEEDS}
    d, lo, hi = paired_bootstrap(meth, ref, n_boot=B, seed=0)
    assert d == pytest.approx(50.0) and 0 < lo < 50 < hi <= 100
    _, draws = paired_bootstrap_draws(meth, ref, n_boot=B, seed=0)
    assert bootstrap_pvalue(draws) == pytest.approx(2 / (B + 1))
    assert np.array_equal(draws, paired_bootstrap_draws(meth, ref, n_boot=B, seed=0)[1])
    assert not np.array_equal(draws, paired_bootstrap_draws(meth, ref, n_boot=B, seed=1)[1])


def test_paired_bootstrap_resamples_pairs_within_a_seed():
    """One seed, two pairs, differences (1, 0) → ×100: a replicate draws 2 pairs with replacement:
    100 (both pair 0) w.p. ¼, 50 w.p. ½, 0 w.p. ¼. With B = 4000 the shares are within ±0.03."""
    _, draws = paired_bootstrap_draws({1: [1.0, 0.0]}, {1: [0.0, 0.0]}, n_boot=4000, seed=0)
    assert set(np.unique(draws)) == {0.0, 50.0, 100.0}
    for v, share in ((0.0, 0.25), (50.0, 0.5), (100.0, 0.25)):
        assert abs((draws == v).mean() - share) < 0.03
    assert bootstrap_pvalue(draws) == pytest.approx(0.5, abs=0.06)  # 2·P(d* ≤ 0) = 2·¼


def test_paired_bootstrap_resamples_seeds():
    """Two seeds, constant differences 10 and 30 pp on every pair (pairs add no noise): a replicate
    is the mean of 2 seeds drawn with replacement: 10 w.p. ¼, 20 w.p. ½, 30 w.p. ¼; d = 20."""
    meth, ref = {1: [0.1] * 5, 2: [0.3] * 5}, {1: [0.0] * 5, 2: [0.0] * 5}
    d, draws = paired_bootstrap_draws(meth, ref, n_boot=4000, seed=0)
    assert d == pytest.approx(20.0)
    assert set(np.round(np.unique(draws), 9)) == {10.0, 20.0, 30.0}
    assert abs((np.round(draws) == 20).mean() - 0.5) < 0.03
    assert percentile_interval(draws, 0.95) == pytest.approx((10.0, 30.0))


def test_paired_bootstrap_needs_matched_pairs():
    """Pairs are matched by index: unequal lengths, or a named seed one side lacks, are errors;
    by default only seeds both sides have are used; none → (nan, no draws)."""
    with pytest.raises(ValueError, match="matched by pair index"):
        paired_bootstrap({1: [1.0, 0.0]}, {1: [1.0]}, n_boot=10)
    with pytest.raises(ValueError, match="missing from the reference"):
        paired_bootstrap({1: [1.0], 2: [1.0]}, {1: [0.0]}, seeds=[1, 2], n_boot=10)
    assert paired_bootstrap({1: [1.0], 2: [1.0]}, {1: [0.0]}, n_boot=10) == (100.0, 100.0, 100.0)
    d, draws = paired_bootstrap_draws({1: [1.0]}, {2: [0.0]}, n_boot=10)
    assert math.isnan(d) and draws.size == 0 and math.isnan(bootstrap_pvalue(draws))


def test_bootstrap_pvalue_hand_numbers():
    """2·min(1 + #{≤0}, 1 + #{≥0})/(B + 1): [−1, 1, 2, 3] → 2·2/5 = 0.8; [1, 2, 3, 4] → 2·1/5 = 0.4;
    [0, 0] → min(1, 2·3/3) = 1."""
    assert bootstrap_pvalue([-1, 1, 2, 3]) == pytest.approx(0.8)
    assert bootstrap_pvalue([1, 2, 3, 4]) == pytest.approx(0.4)
    assert bootstrap_pvalue([0, 0]) == 1.0


def test_holm_hand_worked():
    """[0.01, 0.04, 0.03]: sorted 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone 0.06:
    [0.03, 0.06, 0.06]. [0.04, 0.01, 0.02, 0.03]: 0.01·4 = 0.04, 0.02·3 = 0.06, 0.03·2 = 0.06,
    0.04·1 → 0.06. Capped at 1: [0.5, 0.6] → [1, 1]. nan is no test: [0.01, nan, 0.02] → m = 2:
    [0.02, nan, 0.02]."""
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.04, 0.01, 0.02, 0.03]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    out = holm([0.01, math.nan, 0.02])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert holm([]) == []


# --------------------------------------------------------------------------- the verdict


def test_per_shift_paired_differences_match_hand_numbers(tables):
    """good +50 won at both shifts, DE difference 0.5/0.8 = 0.625, Δtest difference 0; same 0 [0, 0]
    tied; worse −25 lost (sB: one seed, the other failed); 2 seeds × 20 pairs where both ran."""
    ps = tables["per_shift"].set_index(["method", "shift"])
    for sh in SHIFTS:
        g = ps.loc[("good", sh)]
        assert g.d_oos == pytest.approx(50.0) and g.d_oos_lo > 0 and g.outcome == "won"
        assert g.de_diff == pytest.approx(0.625) and g.de_seeds == 2
        assert (g.d_test, g.d_test_lo, g.d_test_hi) == (0.0, 0.0, 0.0)
        assert g.own_d_oos == pytest.approx(50.0) and g.ref_d_oos == pytest.approx(0.0)
        s = ps.loc[("same", sh)]
        assert (s.d_oos, s.d_oos_lo, s.d_oos_hi, s.p_oos, s.outcome) == (0.0, 0.0, 0.0, 1.0, "tied")
        w = ps.loc[("worse", sh)]
        assert w.d_oos == pytest.approx(-25.0) and w.d_oos_hi < 0 and w.outcome == "lost"
    assert (ps.loc[("good", "sA")].seeds, ps.loc[("good", "sA")].pairs, ps.loc[("good", "sA")].pairs_dropped) == (2, 40, 0)
    assert (ps.loc[("worse", "sB")].seeds, ps.loc[("worse", "sB")].pairs) == (1, 20)


def test_summary_holm_and_answers(tables):
    """p = 2/501 for good, blowup, worse; Holm over 4 methods → 8/501; same: p = 1. Answers: good
    yes, blowup no (incoherent, though it wins), worse no, same can't tell."""
    s = tables["summary"].set_index("method")
    assert list(tables["summary"].method) == ["blowup", "good", "same", "worse"]
    for m in ("good", "blowup", "worse"):
        assert s.loc[m].p_oos == pytest.approx(2 / 501) and s.loc[m].p_holm == pytest.approx(8 / 501)
    assert s.loc["same"].p_holm == 1.0
    assert s.loc["good"].mean_d_oos == pytest.approx(50.0) and s.loc["worse"].mean_d_oos == pytest.approx(-25.0)
    assert s.loc["good"].mean_d_oos_lo > 0 and s.loc["worse"].mean_d_oos_hi < 0
    assert dict(s.answer) == {"good": "yes", "blowup": "no", "worse": "no", "same": "can't tell"}
    assert (s.loc["good"].won, s.loc["good"].lost, s.loc["good"].tied) == (2, 0, 0)
    assert (s.loc["worse"].lost, s.loc["same"].tied) == (2, 2)


def test_coherence_gate_500x_ppl_blowup(tables):
    """blowup's chosen ppl ratio on oos is 5000/10 = 500 > 2: every run incoherent, its two wins are
    not counted, its answer is not "yes" though its mean is +50 with Holm p 0.016."""
    s = tables["summary"].set_index("method").loc["blowup"]
    assert s.mean_d_oos == pytest.approx(50.0) and s.p_holm < 0.05
    assert not s.coherent and s.answer == "no" and (s.won, s.wins_not_counted) == (0, 2)
    ps = tables["per_shift"].set_index(["method", "shift"]).loc[("blowup", "sA")]
    assert ps.ppl_ratio_max == pytest.approx(500.0) and ps.counted == "won (not counted: incoherent)"
    assert "ppl ratio 500 > 2 on oos" in ps.gate
    co = tables["coherence"]
    assert co[co.method == "blowup"].incoherent.all() and not co[co.method != "blowup"].incoherent.any()
    assert tables["coherence"].set_index("run_id").loc["good|sA|1"].ppl_ratio_max == pytest.approx(1.1)


def test_repetition_gate(tmp_path):
    """good's adapter repeats 0.9 of its 3-grams at (sA, seed 1) > 0.5 (base 0.1): incoherent, answer
    no. If the base repeats as much (0.95), the adapter made nothing worse: coherent again."""
    from reprpo.experiments.verdict import verdict_tables

    p = tmp_path / "r.sqlite"
    build_store(p)
    con = sqlite3.connect(p)
    con.execute("UPDATE coherence SET value = 0.9 WHERE run_id = 'good|sA|1' AND model = 'adapter'")
    con.commit()
    s = verdict_tables(p, n_boot=50, methods=["good"])
    g = s["per_shift"].set_index("shift")
    assert not g.loc["sA"].coherent and g.loc["sB"].coherent and "repetition 0.90 > 0.5 (base 0.10)" in g.loc["sA"].gate
    assert s["summary"].set_index("method").loc["good"].answer == "no"
    con.execute("UPDATE coherence SET value = 0.95 WHERE run_id = 'good|sA|1' AND model = 'base'")
    con.commit()
    con.close()
    assert verdict_tables(p, n_boot=50, methods=["good"])["summary"].answer.tolist() == ["yes"]


def test_missing_runs_are_reported(tables, store):
    """worse's (sB, seed 2) run failed: listed with its status, in the summary too; a method asked
    for that has no runs is reported missing everywhere and answered "can't tell"."""
    from reprpo.experiments.verdict import verdict_tables

    miss = tables["missing"]
    assert miss.to_dict("records") == [{"method": "worse", "shift": "sB", "seed": 2, "status": "failed"}]
    assert tables["summary"].set_index("method").loc["worse"].missing == "seed 2 @ sB (failed)"
    t = verdict_tables(store, n_boot=50, methods=["good", "ghost"])
    assert len(t["missing"][t["missing"].method == "ghost"]) == 4 and set(t["missing"].status) >= {"no run"}
    ghost = t["summary"].set_index("method").loc["ghost"]
    assert ghost.answer == "can't tell" and ghost.shifts_used == 0 and math.isnan(ghost.p_holm)
    assert t["summary"].set_index("method").loc["good"].p_holm == pytest.approx(2 / 51)  # family of 1 with a p
    # a partial study names its seeds: seed 3 (no run anywhere) is missing for every method and shift,
    # the reference included; the seeds that have runs give the same differences as before
    p = verdict_tables(store, n_boot=50, methods=["good"], seeds=[1, 2, 3])
    m3 = p["missing"][p["missing"].seed == 3]
    assert set(zip(m3.method, m3["shift"])) == {(m, s) for m in ("dpo", "good", "target:dpo") for s in ("sA", "sB")}
    assert set(m3.status) == {"no run"}
    # the summary names them once per group of shifts with the same seeds, not one entry per run
    assert p["summary"].set_index("method").loc["good"].missing == "seed 3 @ sA, sB (no run)"
    q = verdict_tables(store, n_boot=50, methods=["good"])
    assert p["per_shift"].d_oos.tolist() == q["per_shift"].d_oos.tolist()


def test_reference_without_runs_is_a_clear_error(store):
    from reprpo.errors import ReprpoError
    from reprpo.experiments.verdict import verdict_tables

    with pytest.raises(ReprpoError, match="no finished runs of the reference method 'ipo'"):
        verdict_tables(store, reference="ipo", n_boot=10)


def test_render_verdict_writes_markdown_plots_and_csv(store, tmp_path):
    from reprpo.experiments.verdict import render_verdict

    out = tmp_path / "v"
    md = render_verdict(store, out, reference="dpo", n_boot=B)
    assert (out / "verdict.md").read_text() == md
    lines = md.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[first].startswith("| method | mean Δoos vs dpo pp [95% CI] | shifts won/lost/tied | Holm p | coherent | answer |")
    good = next(line for line in lines[first:] if line.startswith("| good |"))
    assert "+50.0 [" in good and "| 2/0/0 |" in good and "0.016" in good and "**yes**" in good
    blow = next(line for line in lines[first:] if line.startswith("| blowup |"))
    assert "0/0/0 (+2 won, not counted: incoherent)" in blow and "**no**" in blow
    for needle in ("## Shift `sA`", "## Coherence gate", "> 2 on any split", "## Missing runs", "| worse | sB | 2 | failed |",
                   "| code versions | unknown (23) |",  # the hand-made store records none: 5 × 2 × 2 − 1 failed + 4 target
                   "| n_boot | 500 |", "| seeds | 1, 2 |", "forest.png", "scatter.png", "0.625"):
        assert needle in md, needle
    for png in ("forest.png", "scatter.png"):
        assert (out / png).stat().st_size > 5000
    import pandas as pd

    runs = pd.read_csv(out / "csv" / "runs.csv")
    assert "config_json" not in runs and len(runs) == 2 * 2 * 6  # 5 methods + target, one failed included
    assert len(pd.read_csv(out / "csv" / "verdict_per_shift.csv")) == 4 * 2
    assert {"split_scores.csv", "verdict_summary.csv", "coherence_runs.csv", "missing.csv"} <= {p.name for p in (out / "csv").iterdir()}


def test_accuracies_per_shift_are_the_mean_over_seeds_with_their_range(tmp_path):
    """The accuracy (%) of the base, the reference, each method and the target-tuned run, per
    shift and split, mean over seeds (min–max when the seeds differ). The hand-made store, with
    dpo's seed-2 oos accuracy on sA set to 0.6 and the base's sA seed-2 oos accuracy set to 0.7
    in every run but the target-tuned one: sA oos base (50 + 70)/2 = 60 (50–70), dpo
    (50 + 60)/2 = 55 (50–60), good 100, worse 25; sB worse has 1 seed (its seed 2 failed);
    target:dpo 80 on oos and nothing on test; test: base 50, every adapter 100."""
    from reprpo.experiments.verdict import render_verdict

    p = tmp_path / "results.sqlite"
    build_store(p)
    con = sqlite3.connect(p)
    con.execute("UPDATE split_scores SET accuracy = 0.6 WHERE run_id = 'dpo|sA|2' AND split = 'oos' AND model = 'adapter'")
    con.execute("UPDATE split_scores SET accuracy = 0.7 WHERE run_id LIKE '%|sA|2' AND run_id NOT LIKE 'target%' "
                "AND split = 'oos' AND model = 'base'")
    con.commit()
    con.close()
    md = render_verdict(p, tmp_path / "v", n_boot=50)
    import pandas as pd

    a = pd.read_csv(tmp_path / "v" / "csv" / "accuracies.csv").set_index(["shift", "model", "split"])
    got = lambda *k: tuple(a.loc[k, ["seeds", "acc", "acc_min", "acc_max"]])
    assert got("sA", "dpo", "oos") == (2, 55.0, 50.0, 60.0) and got("sA", "base", "oos") == (2, 60.0, 50.0, 70.0)
    assert got("sA", "good", "oos") == (2, 100.0, 100.0, 100.0) and got("sA", "worse", "oos") == (2, 25.0, 25.0, 25.0)
    assert got("sB", "worse", "oos") == (1, 25.0, 25.0, 25.0) and got("sA", "target:dpo", "oos") == (2, 80.0, 80.0, 80.0)
    assert ("sA", "target:dpo", "test") not in a.index and got("sB", "base", "test") == (2, 50.0, 50.0, 50.0)
    sa = md[md.index("## Shift `sA`"):md.index("## Shift `sB`")]
    for row in ("| model | seeds | test | oos |", "| base | 2 | 50 | 60 (50–70) |", "| dpo | 2 | 100 | 55 (50–60) |",
                "| worse | 2 | 100 | 25 |", "| target:dpo | 2 | — | 80 |"):
        assert row in sa, row
    assert sa.index("| base | 2 |") < sa.index("| dpo | 2 | 100 |") < sa.index("| good | 2 | 100 |") < sa.index("| target:dpo |")
    assert "| worse | 1 | 100 | 25 |" in md[md.index("## Shift `sB`"):]


def test_shifts_of_one_file_are_named_once(tmp_path):
    """Every shift FILE:NAME of one FILE: the page names the file once in its header and the shifts by
    name everywhere else (headings, missing runs, plots); the settings table keeps the full specs."""
    from reprpo.experiments.verdict import render_verdict, shift_labels

    assert shift_labels(["d/shifts.json:sA", "d/shifts.json:sB"]) == ("d/shifts.json", {"d/shifts.json:sA": "sA", "d/shifts.json:sB": "sB"})
    for mixed in (["a.json:sA", "b.json:sB"], ["a.json:sA", "sB"], ["sA", "sB"], []):
        assert shift_labels(mixed) == (None, {s: s for s in mixed}), mixed
    store = tmp_path / "results.sqlite"
    build_store(store, shifts=("d/shifts.json:sA", "d/shifts.json:sB"))
    md = render_verdict(store, tmp_path / "v", n_boot=B)
    assert "shifts of `d/shifts.json`: sA, sB ·" in md
    for needle in ("## Shift `sA`", "## Shift `sB`", "| worse | sB | 2 | failed |", "seed 2 @ sB (failed)",
                   "| shifts | d/shifts.json:sA, d/shifts.json:sB |"):
        assert needle in md, needle
    assert md.count("d/shifts.json:") == 2  # the settings row only
    good = next(line for line in md.splitlines() if line.startswith("| good |"))
    assert "+50.0 [" in good and "**yes**" in good
    built = tmp_path / "builtin.sqlite"
    build_store(built, shifts=("builtin:sA", "builtin:sB"))
    assert "built-in shifts: sA, sB ·" in render_verdict(built, tmp_path / "b", n_boot=20)


def test_the_code_versions_of_the_runs_are_named(tmp_path):
    """Runs that recorded the source that computed them are counted per version, the rest as
    unknown: 23 done runs, 10 of them marked v1 and 3 v2 → 'unknown (10), v1 (10), v2 (3)' (most first, ties by name)."""
    from reprpo.experiments import store as st
    from reprpo.experiments.verdict import verdict_tables

    path = tmp_path / "results.sqlite"
    build_store(path)
    con = st.connect(path)  # adds the code_version column
    done = [r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'done' ORDER BY run_id")]
    assert len(done) == 23
    con.executemany("UPDATE runs SET code_version = ? WHERE run_id = ?", [("v1", r) for r in done[:10]] + [("v2", r) for r in done[10:13]])
    con.commit()
    con.close()
    settings = verdict_tables(path, n_boot=20)["settings"].set_index("name").value
    assert settings["code versions"] == "unknown (10), v1 (10), v2 (3)"  # most runs first, ties by name
