"""The verdict of a study: does method X generalise better than the reference (DPO)? (DESIGN §6)

`verdict_tables(store)` computes it from the results store (`store.py`'s schema, read through
`report.load_frames` plus the per-pair `correct` column); `render_verdict(store, out_dir)`
writes verdict.md, forest.png, scatter.png and CSV exports of the per-run tables (csv/).

The statistics, one choice per line (ours; the sources are in `eval/stats.py`):
- per (method, shift, split), d = Δ_method − Δ_ref in pp, paired on seed *and* eval pair: per pair
  v = correct(adapter) − correct(base) of each run, matched by pair index, so d is a difference
  of Δs (= of accuracies when both runs share the base, as in a compare grid);
- its interval: the two-stage paired bootstrap (seeds with replacement, then pairs with
  replacement within each drawn seed, the same pairs for both methods;
  `stats.paired_bootstrap_draws`), percentile interval at `level`; p: `stats.bootstrap_pvalue`;
- per shift: won if the interval lies above 0, lost if below, else tied (per shift, uncorrected);
- DE vs the reference: per seed (Δ_m − Δ_ref)/acc_oos(target-tuned run of that shift and seed),
  i.e. DE_m − DE_ref (GENIES), bootstrapped the same way, the target accuracy held fixed;
- across shifts: the mean over shifts of the per-shift d; its draws are the means of the per-shift
  draws (shifts fixed, resampled independently: inference about *these* shifts, not a population
  of shifts, which 3-6 shifts could not support); percentile interval and bootstrap p;
- Holm–Bonferroni over methods of the across-shift p (the family: every compared method with a p);
- coherence gate: a run is incoherent when its chosen-response perplexity ratio adapter/base
  exceeds `ppl_max` on any split, or its adapter's greedy-generation repetition exceeds
  `repetition_max` and the base's; a (method, shift) cell when any of its runs is, a method when
  any cell is. An incoherent cell's win is not counted; an incoherent method's answer is "no";
  methods whose score is not the LM's margin (a reward head, a probe) have no gate (n/a);
- answer: "yes" if Holm p < α = 1 − level, mean > 0 and coherent; "no" if (Holm p < α and
  mean < 0) or incoherent; "can't tell" otherwise (also with no paired data).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from reprpo.errors import ReprpoError
from reprpo.eval.stats import bootstrap_pvalue, holm, paired_bootstrap_draws, percentile_interval
from reprpo.experiments.report import (
    TARGET,
    _colors,
    _md_table,
    finish_transfer_plot,
    load_frames,
    run_table,
    scorer_facts,
)

SPLITS = ("oos", "test")  # the splits the verdict pairs on
REPETITION_MAX = 0.5  # adapter repetition above this (and above the base's): half its 3-grams repeat, looping text
PPL_MAX = 2.0  # chosen-response perplexity ratio adapter/base above this on any split: good answers 2× less likely


# --------------------------------------------------------------------------- reading


def _read_store(store_path: str | Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, pd.DataFrame]:
    """(load_frames, every run of any status with its columns, per-pair values v = correct(adapter)
    − correct(base) of the done runs on SPLITS: run_id, split, pair, v)."""
    from reprpo.experiments.store import connect

    frames = load_frames(store_path)  # raises the clear "store not found" error
    con = connect(store_path)
    try:
        every = pd.read_sql_query("SELECT * FROM runs", con)
        marks = ", ".join("?" * len(SPLITS))
        pairs = pd.read_sql_query(
            "SELECT run_id, split, model, pair, correct FROM pair_scores "
            f"WHERE split IN ({marks}) AND run_id IN (SELECT run_id FROM runs WHERE status = 'done')", con, params=SPLITS)
    finally:
        con.close()
    pairs = pairs[pairs.run_id.isin(frames["runs"].run_id)]
    if pairs.empty:
        return frames, every, pd.DataFrame(columns=["run_id", "split", "pair", "v"])
    wide = pairs.pivot_table(index=["run_id", "split", "pair"], columns="model", values="correct", aggfunc="first").reset_index()
    for c in ("base", "adapter"):
        if c not in wide:
            wide[c] = np.nan
    wide["v"] = wide.adapter - wide.base  # a pair without both scores is NaN: dropped, counted as unmatched
    return frames, every, wide[["run_id", "split", "pair", "v"]].dropna()


def _cell_seed(seed: int, *key: str) -> int:
    """A stable RNG seed per (method, shift, split): cells are resampled independently, reproducibly."""
    return zlib.crc32("|".join([str(seed), *key]).encode())


def _paired(vals: dict, run_of: dict, *, method: str, ref: str, shift: str, split: str, seeds: list[int],
            n_boot: int, rng_seed: int, divide: dict[int, float] | None = None) -> dict:
    """Match method and reference runs per seed and their pairs by index, then bootstrap.
    `divide`: seed -> denominator (DE's target accuracy); seeds without one are left out."""
    mv, rv, dropped = {}, {}, 0
    for s in seeds:
        a, b = run_of.get((method, shift, s)), run_of.get((ref, shift, s))
        if a is None or b is None or (divide is not None and not divide.get(s, 0) > 0):
            continue
        va, vb = vals.get((a, split)), vals.get((b, split))
        if va is None or vb is None:
            continue
        common = va.index.intersection(vb.index)
        dropped += len(va) + len(vb) - 2 * len(common)
        if len(common):
            f = 1.0 if divide is None else 1.0 / divide[s]
            mv[s], rv[s] = f * va[common].to_numpy(), f * vb[common].to_numpy()
    d, draws = paired_bootstrap_draws(mv, rv, n_boot=n_boot, seed=rng_seed, scale=100.0 if divide is None else 1.0)
    return {"d": d, "draws": draws, "seeds": len(mv), "pairs": sum(len(v) for v in mv.values()), "dropped": dropped}


def _outcome(d: float, lo: float, hi: float) -> str:
    if not math.isfinite(d):
        return "no data"
    return "won" if lo > 0 else "lost" if hi < 0 else "tied"


# --------------------------------------------------------------------------- tables


def coherence_runs(frames: dict[str, pd.DataFrame], *, ppl_max: float, repetition_max: float) -> pd.DataFrame:
    """Per run: the largest chosen ppl ratio adapter/base over splits (and its split), the
    generation repetition of adapter and base, and the gate: incoherent + why ('' when coherent,
    'n/a' for a method whose score is not the LM's margin)."""
    rt = run_table(frames)
    co = frames["coherence"]
    rep = co[co.metric == "repetition"]
    rep = rep.pivot_table(index="run_id", columns="model", values="value", aggfunc="first") if len(rep) else pd.DataFrame()
    facts = scorer_facts(frames["runs"]) if len(frames["runs"]) else {}
    rows = []
    for r in frames["runs"].itertuples():
        mine = rt[(rt.run_id == r.run_id) & np.isfinite(rt.ppl_ratio)]
        worst = mine.loc[mine.ppl_ratio.idxmax()] if len(mine) else None
        ppl, at = (float(worst.ppl_ratio), str(worst.split)) if worst is not None else (math.nan, "")
        ra = float(rep.loc[r.run_id, "adapter"]) if r.run_id in rep.index and "adapter" in rep else math.nan
        rb = float(rep.loc[r.run_id, "base"]) if r.run_id in rep.index and "base" in rep else math.nan
        lm = facts.get(r.method, ("", True, True))[1]
        why = []
        if lm and ppl > ppl_max:
            why.append(f"ppl ratio {ppl:.3g} > {ppl_max:g} on {at}")
        if lm and ra > repetition_max and not ra <= rb:
            why.append(f"repetition {ra:.2f} > {repetition_max:g}" + (f" (base {rb:.2f})" if math.isfinite(rb) else ""))
        rows.append({"run_id": r.run_id, "method": r.method, "shift": r.shift, "seed": int(r.seed),
                     "ppl_ratio_max": ppl, "ppl_split": at, "repetition": ra, "repetition_base": rb,
                     "incoherent": bool(why), "why": "; ".join(why) if lm else "n/a"})
    return pd.DataFrame(rows, columns=["run_id", "method", "shift", "seed", "ppl_ratio_max", "ppl_split", "repetition",
                                       "repetition_base", "incoherent", "why"])


def verdict_tables(store_path: str | Path, *, reference: str = "dpo", level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                   ppl_max: float = PPL_MAX, repetition_max: float = REPETITION_MAX, shifts: list[str] | None = None,
                   methods: list[str] | None = None, seeds: list[int] | None = None) -> dict[str, pd.DataFrame]:
    """d(m, shift, split) = Δ_m − Δ_ref (pp; paired bootstrap over seeds and pairs), won/lost/tied, and per method
    the mean over shifts with Holm-adjusted p, the coherence gate and the answer (module docstring: ours, DESIGN §6).

    Returns {"summary": per method, "per_shift": per (method, shift), "missing": every expected
    (method, shift, seed) without a done run (and target-tuned runs DE lacks), "coherence": the
    gate per run, "settings": thresholds and bootstrap settings (name, value, meaning), "runs":
    every run of the store without config_json, "split_scores": `report.run_table`}. The statistics
    are in the module docstring. `shifts` / `methods` default to every one in the store (methods:
    every non-target method but the reference); `seeds`, the expected seeds, default to every
    seed in the store (a study passes its own, so a partial study lists the seeds it lacks)."""
    frames, every, pairs = _read_store(store_path)
    alpha = 1.0 - level
    grid = every[~every.method.str.startswith(TARGET)]
    shifts = sorted(grid["shift"].unique()) if shifts is None else list(shifts)
    grid = grid[grid["shift"].isin(shifts)]
    methods = sorted(set(grid.method) - {reference}) if methods is None else [m for m in methods if m != reference]
    seeds = sorted(int(s) for s in grid.seed.unique()) if seeds is None else sorted(int(s) for s in seeds)
    runs = frames["runs"][frames["runs"]["shift"].isin(shifts)]
    if reference not in set(runs.method):
        raise ReprpoError(f"{store_path}: no finished runs of the reference method {reference!r} "
                          f"(methods with runs: {', '.join(sorted(set(runs.method))) or 'none'}). "
                          "Run it in the grid (`reprpo compare --methods dpo,...`) or pass another reference.")
    run_of = {(r.method, r.shift, int(r.seed)): r.run_id for r in runs.itertuples()}
    vals = {k: g.set_index("pair").v for k, g in pairs.groupby(["run_id", "split"])}
    tg = frames["targets"]
    target = {(r.shift, int(r.seed)): float(r.acc) for r in tg.itertuples()}
    rt = run_table(frames)
    own = rt.groupby(["method", "shift", "split"]).delta_pp.mean()  # own Δ pp, mean over seeds
    gate = coherence_runs({**frames, "runs": runs}, ppl_max=ppl_max, repetition_max=repetition_max)

    # missing: an expected (method, shift, seed) without a done run, with what the store says of it
    latest = every.assign(_t=every.finished.fillna(every.created)).sort_values("_t").drop_duplicates(["method", "shift", "seed"], keep="last")
    status = {(r.method, r.shift, int(r.seed)): r.status for r in latest.itertuples()}
    expected = [(m, sh, s) for m in [reference, *methods] for sh in shifts for s in seeds]
    if len(tg):  # DE needs the target-tuned run of every (shift, seed)
        label = tg.method.iloc[0]
        expected += [(label, sh, s) for sh in shifts for s in seeds]
        run_of_t = {(label, sh, s) for (sh, s) in target}
    else:
        run_of_t = set()
    missing = pd.DataFrame([{"method": m, "shift": sh, "seed": s, "status": status.get((m, sh, s), "no run")}
                            for m, sh, s in expected if (m, sh, s) not in run_of and (m, sh, s) not in run_of_t],
                           columns=["method", "shift", "seed", "status"])

    rows, draws_of = [], {}
    for m in methods:
        for sh in shifts:
            row = {"method": m, "shift": sh}
            for split, name in (("oos", "d_oos"), ("test", "d_test")):
                c = _paired(vals, run_of, method=m, ref=reference, shift=sh, split=split, seeds=seeds, n_boot=n_boot,
                            rng_seed=_cell_seed(seed, m, sh, split))
                lo, hi = percentile_interval(c["draws"], level)
                row |= {name: c["d"], f"{name}_lo": lo, f"{name}_hi": hi, f"p_{split}": bootstrap_pvalue(c["draws"])}
                draws_of[(m, sh, split)] = c["draws"]
                if split == "oos":
                    row |= {"seeds": c["seeds"], "pairs": c["pairs"], "pairs_dropped": c["dropped"]}
            de = _paired(vals, run_of, method=m, ref=reference, shift=sh, split="oos", seeds=seeds, n_boot=n_boot,
                         rng_seed=_cell_seed(seed, m, sh, "de"), divide={s: target[(sh, s)] for s in seeds if (sh, s) in target})
            lo, hi = percentile_interval(de["draws"], level)
            row |= {"de_diff": de["d"], "de_diff_lo": lo, "de_diff_hi": hi, "de_seeds": de["seeds"]}
            for split in SPLITS:
                row[f"own_d_{split}"] = float(own.get((m, sh, split), math.nan))
                row[f"ref_d_{split}"] = float(own.get((reference, sh, split), math.nan))
            g = gate[(gate.method == m) & (gate["shift"] == sh)]
            row |= {"runs": len(g), "ppl_ratio_max": float(g.ppl_ratio_max.max()) if len(g) else math.nan,
                    "repetition": float(g.repetition.max()) if len(g) else math.nan,
                    "coherent": bool(not g.incoherent.any()) if len(g) else None,
                    "gate": "n/a" if len(g) and (g.why == "n/a").all() else "; ".join(sorted(set(w for w in g.why if w and w != "n/a")))}
            row["outcome"] = _outcome(row["d_oos"], row["d_oos_lo"], row["d_oos_hi"])
            row["counted"] = "won (not counted: incoherent)" if row["outcome"] == "won" and _incoherent(row["coherent"]) else row["outcome"]
            rows.append(row)
    per_shift = pd.DataFrame(rows)

    summary = []
    for m in methods:
        cells = per_shift[(per_shift.method == m)] if len(per_shift) else per_shift
        used = [r.shift for r in cells.itertuples() if math.isfinite(r.d_oos)]
        row = {"method": m, "shifts": len(shifts), "shifts_used": len(used)}
        for split, name in (("oos", "d_oos"), ("test", "d_test")):
            ok = cells[np.isfinite(cells[name])] if len(cells) else cells
            if len(ok):
                d = float(ok[name].mean())
                dr = np.mean([draws_of[(m, sh, split)] for sh in ok["shift"]], axis=0)  # (B,): mean of per-shift draws
                lo, hi = percentile_interval(dr, level)
                p = bootstrap_pvalue(dr)
            else:
                d = lo = hi = p = math.nan
            row |= {f"mean_{name}": d, f"mean_{name}_lo": lo, f"mean_{name}_hi": hi, f"p_{split}": p}
        counted = list(cells.counted) if len(cells) else []
        coh = [bool(c) for c in cells.coherent if c is not None and pd.notna(c)] if len(cells) else []
        row |= {"won": counted.count("won"), "lost": counted.count("lost"), "tied": counted.count("tied"),
                "wins_not_counted": counted.count("won (not counted: incoherent)"),
                "coherent": all(coh) if coh else None}
        miss = missing[missing.method == m]
        row["missing"] = _missing_text(miss)
        summary.append(row)
    summary = pd.DataFrame(summary, columns=None if summary else ["method", "p_oos"])
    if len(summary):
        summary["p_holm"] = holm(summary.p_oos)
        summary["answer"] = [_answer(r.p_holm, r.mean_d_oos, r.coherent, alpha) for r in summary.itertuples()]
    settings = pd.DataFrame([
        ("reference", reference, "every difference is method − reference"),
        ("level", level, "confidence level of every interval"),
        ("alpha", round(alpha, 10), "Holm-adjusted p below this with the sign of the mean decides yes / no"),
        ("n_boot", n_boot, "bootstrap replicates per cell"),
        ("seed", seed, "bootstrap RNG seed (each cell: crc32 of seed, method, shift, split)"),
        ("resampling", "seeds, then pairs within seeds (paired)", "two-stage bootstrap, percentile interval"),
        ("across shifts", "mean of per-shift draws", "shifts fixed, each resampled independently"),
        ("holm family", ", ".join(methods), "across-shift Δoos p-values, one per method"),
        ("ppl_max", ppl_max, "chosen ppl ratio adapter/base above this on any split: incoherent"),
        ("repetition_max", repetition_max, "adapter generation repetition above this (and the base's): incoherent"),
        ("seeds", ", ".join(map(str, seeds)), "expected seeds"),
        ("shifts", ", ".join(shifts), "shifts compared"),
        ("code versions", _versions_text(every[(every.status == "done") & every["shift"].isin(shifts)]),
         "reprpo version + source hash that computed the done runs of these shifts (runs); "
         "unknown: a run from before the store recorded it"),
    ], columns=["name", "value", "meaning"])
    return {"summary": summary, "per_shift": per_shift, "missing": missing, "coherence": gate, "settings": settings,
            "runs": every.drop(columns=["config_json"]).sort_values(["method", "shift", "seed"]).reset_index(drop=True),
            "split_scores": rt, "accuracies": accuracy_table(rt, tg, shifts=shifts, models=[reference, *methods])}


def accuracy_table(rt: pd.DataFrame, targets: pd.DataFrame, *, shifts: list[str], models: list[str]) -> pd.DataFrame:
    """Accuracy (%) per (shift, model, split) over seeds: seeds, acc (the mean), acc_min, acc_max.
    model: "base" (per seed the mean over the runs of `models` at that seed, which share the base
    in a compare grid), each of `models` (its adapter), then each target-tuned label (oos only).
    A seed without a score is not counted."""
    cols = ["shift", "model", "split", "seeds", "acc", "acc_min", "acc_max"]
    rt = rt[rt["shift"].isin(shifts) & rt.method.isin(models)]
    per_seed = [rt.dropna(subset=["base_acc"]).groupby(["shift", "split", "seed"]).base_acc.mean().rename("a").reset_index().assign(model="base")]
    for m in models:
        sel = rt[(rt.method == m)].dropna(subset=["adapter_acc"])
        per_seed.append(sel.groupby(["shift", "split", "seed"]).adapter_acc.mean().rename("a").reset_index().assign(model=m))
    tg = targets[targets["shift"].isin(shifts)].dropna(subset=["acc"])
    for label in dict.fromkeys(tg.method):
        sel = tg[tg.method == label]
        per_seed.append(sel.groupby(["shift", "seed"]).acc.mean().rename("a").reset_index().assign(model=label, split="oos"))
    long = pd.concat(per_seed, ignore_index=True)
    if long.empty:
        return pd.DataFrame(columns=cols)
    rank = {m: i for i, m in enumerate(dict.fromkeys(["base", *models, *tg.method]))}
    g = long.assign(a=100 * long.a).groupby(["shift", "model", "split"]).a
    out = pd.DataFrame({"seeds": g.size(), "acc": g.mean(), "acc_min": g.min(), "acc_max": g.max()}).round(6).reset_index()
    out["_s"], out["_m"] = out["shift"].map({sh: i for i, sh in enumerate(shifts)}), out.model.map(rank)
    return out.sort_values(["_s", "_m", "split"])[cols].reset_index(drop=True)


def _versions_text(runs: pd.DataFrame) -> str:
    """'0.1.0+ab12 (30), unknown (18)': the done runs per recorded code version, most runs first
    (`store.connect` adds the column to older stores, so every store read here has it)."""
    counts = runs["code_version"].fillna("unknown").value_counts()
    return ", ".join(f"{k} ({n})" for k, n in sorted(counts.items(), key=lambda kn: (-kn[1], kn[0]))) or "—"


def _incoherent(c) -> bool:
    """The gate's flag is False (None / nan: no runs to judge)."""
    return c is not None and c == c and not c


def _answer(p_holm: float, mean: float, coherent: bool | None, alpha: float) -> str:
    """yes: Holm p < α, mean > 0, coherent; no: (Holm p < α, mean < 0) or incoherent; else can't tell."""
    significant = math.isfinite(p_holm) and p_holm < alpha
    if _incoherent(coherent) or (significant and mean < 0):
        return "no"
    return "yes" if significant and mean > 0 and coherent else "can't tell"


# --------------------------------------------------------------------------- plots


def plot_forest(per_shift: pd.DataFrame, summary: pd.DataFrame, path: Path, *, reference: str, level: float) -> None:
    """Paired Δoos differences vs the reference, one row per method × shift (its interval), then
    the across-shift mean (diamond); green won, red lost, grey tied; hollow: incoherent."""
    import matplotlib.pyplot as plt

    rows = []
    for m in summary.method:
        for r in per_shift[(per_shift.method == m) & np.isfinite(per_shift.d_oos)].itertuples():
            rows.append((f"{m} · {r.shift}", r.d_oos, r.d_oos_lo, r.d_oos_hi, r.outcome, not _incoherent(r.coherent), "o"))
        s = summary[summary.method == m].iloc[0]
        if math.isfinite(s.mean_d_oos):
            out = _outcome(s.mean_d_oos, s.mean_d_oos_lo, s.mean_d_oos_hi)
            rows.append((f"{m} · mean of {s.shifts_used} shifts", s.mean_d_oos, s.mean_d_oos_lo, s.mean_d_oos_hi, out,
                         not _incoherent(s.coherent), "D"))
    color = {"won": "tab:green", "lost": "tab:red", "tied": "0.45"}
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.32 * max(1, len(rows))))
    for i, (_, d, lo, hi, out, ok, mk) in enumerate(rows):
        y = len(rows) - 1 - i
        c = color.get(out, "0.45")
        ax.errorbar([d], [y], xerr=[[max(0.0, d - lo)], [max(0.0, hi - d)]], fmt=mk, color=c, mfc=c if ok else "white", capsize=3, ms=6 if mk == "D" else 5)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows][::-1], fontsize=8)
    ax.set_xlabel(f"Δoos − Δoos({reference}) (pp), {100 * level:.0f}% paired bootstrap interval")
    ax.set_title(f"Paired differences vs {reference} per shift (green won, red lost, grey tied; hollow: incoherent)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(per_shift: pd.DataFrame, path: Path, *, reference: str) -> None:
    """Own Δoos vs Δtest (pp, mean over seeds) per method and shift, the reference included;
    colour = method, marker = shift, a red cross over an incoherent cell; y = x dashed."""
    import matplotlib.pyplot as plt

    pts = [(r.method, r.shift, r.own_d_test, r.own_d_oos, _incoherent(r.coherent)) for r in per_shift.itertuples()]
    ref = per_shift.drop_duplicates("shift")
    pts += [(reference, r.shift, r.ref_d_test, r.ref_d_oos, False) for r in ref.itertuples()]
    pts = [p for p in pts if math.isfinite(p[2]) and math.isfinite(p[3])]
    methods = [reference] + sorted({p[0] for p in pts} - {reference})
    colors = _colors(methods)
    markers = dict(zip(sorted({p[1] for p in pts}), "osD^vP*X<>"))
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    for m, sh, x, y, bad in pts:
        ax.scatter([x], [y], color=colors[m], marker=markers.get(sh, "o"), s=50, edgecolor="k", lw=0.4)
        if bad:
            ax.scatter([x], [y], color="red", marker="x", s=90, lw=1.5)
    vals = [v for p in pts for v in p[2:4]] + [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    pad = 0.08 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1)
    ax.axhline(0, color="0.6", lw=0.6)
    ax.axvline(0, color="0.6", lw=0.6)
    finish_transfer_plot(fig, ax, path, colors=colors, methods=methods, markers=markers,
                         title="Δoos vs Δtest per method and shift (mean over seeds)",
                         extra=(plt.Line2D([], [], color="red", marker="x", ls="", label="incoherent"),))


# --------------------------------------------------------------------------- rendering


def _ci(d: float, lo: float, hi: float, digits: int = 1) -> str:
    """'+6.0 [+1.2, +10.8]'; '—' without a value."""
    if not math.isfinite(d):
        return "—"
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _f(v: float, fmt: str) -> str:
    return format(v, fmt) if math.isfinite(v) else "—"


def _missing_cells(miss: pd.DataFrame, *by: str) -> dict[tuple, tuple[int, ...]]:
    """(*by, shift, status) -> the sorted seeds missing there, in the order of `miss`."""
    cells: dict[tuple, list[int]] = {}
    for r in miss.to_dict("records"):
        cells.setdefault((*(r[b] for b in by), r["shift"], r["status"]), []).append(int(r["seed"]))
    return {k: tuple(sorted(v)) for k, v in cells.items()}


def shift_labels(specs) -> tuple[str | None, dict[str, str]]:
    """(the one shifts file, {spec: its name}) when every spec is FILE:NAME of one FILE, so a page can
    name the file once; else (None, {spec: spec})."""
    specs = list(dict.fromkeys(specs))
    parts = [s.rsplit(":", 1) for s in specs]
    files = {p[0] for p in parts if len(p) == 2}
    if specs and len(files) == 1 and all(len(p) == 2 and p[1] for p in parts):
        return files.pop(), {s: p[1] for s, p in zip(specs, parts)}
    return None, {s: s for s in specs}


def _missing_text(miss: pd.DataFrame, label: dict[str, str] | None = None) -> str:
    """One method's missing runs, shifts with the same seeds together: 'seeds 2, 3 @ sA, sB (no run); seed 1 @ sC (failed)'."""
    groups: dict[tuple, list[str]] = {}
    for (sh, st), seeds in _missing_cells(miss).items():
        groups.setdefault((st, seeds), []).append((label or {}).get(sh, sh))
    return "; ".join(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} @ {', '.join(shs)} ({st})"
                     for (st, seeds), shs in groups.items())


def _p(p: float) -> str:
    return "—" if not math.isfinite(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _yn(c) -> str:
    return "—" if c is None or (isinstance(c, float) and math.isnan(c)) else "yes" if c else "**no**"


def verdict_markdown(t: dict[str, pd.DataFrame], *, store_path: str | Path, images: dict[str, str]) -> str:
    """The verdict page from `verdict_tables`'s output; `images` maps a title to a PNG file name."""
    s, ps, st = t["summary"], t["per_shift"], dict(zip(t["settings"].name, t["settings"].value))
    ref, level = st["reference"], float(st["level"])
    pct = f"{100 * level:.0f}%"
    miss = t["missing"]
    src, label = shift_labels([*ps.get("shift", []), *miss["shift"], *t["coherence"].get("shift", [])])
    names = ", ".join(label.values())
    shifts_text = "built-in shifts: " + names if src == "builtin" else f"shifts of `{src}`: " + names if src else f"shifts: {st['shifts'] or '—'}"
    L = [f"# Verdict: does each method generalise better than {ref}?", "",
         f"Store `{store_path}` · {shifts_text} · seeds: {st['seeds'] or '—'} · "
         f"{st['n_boot']} bootstrap replicates (seed {st['seed']}) · {pct} intervals · α = {st['alpha']:g} (Holm over methods)", ""]
    L += _md_table(["method", f"mean Δoos vs {ref} pp [{pct} CI]", "shifts won/lost/tied", "Holm p", "coherent", "answer"],
                   [[r.method, _ci(r.mean_d_oos, r.mean_d_oos_lo, r.mean_d_oos_hi),
                     f"{r.won}/{r.lost}/{r.tied}" + (f" (+{r.wins_not_counted} won, not counted: incoherent)" if r.wins_not_counted else ""),
                     _p(r.p_holm), _yn(r.coherent), f"**{r.answer}**"] for r in s.itertuples()])
    L += ["", f"**How to read.** Δoos vs {ref} = Δoos(method) − Δoos({ref}) in percentage points, paired on seed and eval pair, "
          f"averaged over the shifts with data; the interval is a two-stage paired bootstrap (seeds, then pairs within seeds), "
          f"mean over shifts of the per-shift draws. Won/lost/tied: the shift's {pct} interval above / below 0 / covering 0 "
          f"(uncorrected). Answer **yes**: Holm-adjusted p < {st['alpha']:g}, mean > 0 and coherent; **no**: adjusted p < "
          f"{st['alpha']:g} with mean < 0, or incoherent; **can't tell** otherwise. Coherent: no run's chosen-response perplexity "
          f"ratio adapter/base above {st['ppl_max']:g} on any split, and no adapter generation repetition above "
          f"{st['repetition_max']:g} (and above the base's); an incoherent shift's win is not counted.", ""]
    if len(s):
        L += ["## Across shifts, details", ""]
        L += _md_table(["method", "shifts used", f"mean Δtest vs {ref} pp [{pct} CI]", "p (Δoos)", "Holm p", "missing runs"],
                       [[r.method, f"{r.shifts_used}/{r.shifts}", _ci(r.mean_d_test, r.mean_d_test_lo, r.mean_d_test_hi),
                         _p(r.p_oos), _p(r.p_holm), _missing_text(miss[miss.method == r.method], label) or "none"]
                        for r in s.itertuples()])
        L.append("")
    for sh in dict.fromkeys(ps["shift"]) if len(ps) else []:
        c = ps[ps["shift"] == sh]
        L += [f"## Shift `{label[sh]}`", "",
              f"{ref}: Δoos {_f(c.ref_d_oos.iloc[0], '+.1f')} pp, Δtest {_f(c.ref_d_test.iloc[0], '+.1f')} pp (mean over seeds). "
              "pairs = matched eval pairs summed over seeds (dropped: in one run only).", ""]
        L += _md_table(["method", "seeds", "pairs (dropped)", "Δoos pp", f"Δoos vs {ref} [{pct}]", "p", f"Δtest vs {ref} [{pct}]",
                        f"DE vs {ref} [{pct}] (seeds)", "max ppl ratio", "repetition", "coherent", "outcome"],
                       [[r.method, str(r.seeds), f"{r.pairs} ({r.pairs_dropped})", _f(r.own_d_oos, "+.1f"),
                         _ci(r.d_oos, r.d_oos_lo, r.d_oos_hi), _p(r.p_oos), _ci(r.d_test, r.d_test_lo, r.d_test_hi),
                         (_ci(r.de_diff, r.de_diff_lo, r.de_diff_hi, 3) + f" ({r.de_seeds})") if r.de_seeds else "— (no target-tuned runs)",
                         _f(r.ppl_ratio_max, ".3g"), _f(r.repetition, ".2f"),
                         "n/a" if r.gate == "n/a" else _yn(r.coherent) + (f" ({r.gate})" if r.gate else ""), r.counted]
                        for r in c.itertuples()])
        L.append("")
        L += _accuracy_md(t["accuracies"], sh)
    co = t["coherence"]
    bad = co[co.incoherent.astype(bool)]
    L += ["## Coherence gate", "",
          f"Thresholds: chosen ppl ratio adapter/base > {st['ppl_max']:g} on any split, or adapter repetition > "
          f"{st['repetition_max']:g} (and above the base's), makes a run incoherent; its (method, shift) cell and its method with it. "
          f"Runs over a threshold: {len(bad)} of {len(co)}.", ""]
    if len(bad):
        L += _md_table(["method", "shift", "seed", "why"], [[r.method, label[r.shift], str(r.seed), r.why] for r in bad.itertuples()])
        L.append("")
    rb = bad[bad.method == ref]
    if len(rb):
        L += [f"The reference {ref} itself crosses a threshold at {', '.join(sorted({label[x] for x in rb['shift']}))}: differences there compare against an incoherent baseline.", ""]
    L += ["## Missing runs", ""]
    if len(miss):
        L += [f"{len(miss)} expected (method, shift, seed) have no finished run; their seeds are left out of that cell's pairing "
              "(a reference seed missing removes that seed from every method's comparison at that shift):", ""]
        groups: dict[tuple, list[str]] = {}  # (shift, seeds, status) -> the methods missing exactly those
        for (m, sh, st), seeds in _missing_cells(miss, "method").items():
            groups.setdefault((sh, seeds, st), []).append(m)
        L += _md_table(["method", "shift", "seed", "status"],
                       [[", ".join(ms), label[sh], ", ".join(map(str, seeds)), st] for (sh, seeds, st), ms in groups.items()])
    else:
        L += ["None: every method has a finished run for every (shift, seed)."]
    L += ["", "## Settings", ""]
    L += _md_table(["setting", "value", "meaning"], [[r.name, str(r.value), r.meaning] for r in t["settings"].itertuples()])
    L.append("")
    if images:
        L += ["## Plots", ""] + [f"![{title}]({name})" for title, name in images.items()] + [""]
    L += ["CSV exports of the per-run tables: `csv/` (runs.csv without config_json, split_scores.csv, verdict_per_shift.csv, "
          "verdict_summary.csv, coherence_runs.csv, missing.csv, accuracies.csv).", ""]
    return "\n".join(L)


def _accuracy_md(acc: pd.DataFrame, shift: str) -> list[str]:
    """A shift's accuracy table: one row per model, one column per split (train, test, oos, rnd
    where scored), the mean over seeds and, when the seeds differ, their range."""
    a = acc[acc["shift"] == shift]
    if a.empty:
        return []
    splits = [x for x in ("train", "test", "oos", "rnd") if x in set(a.split)] + sorted(set(a.split) - {"train", "test", "oos", "rnd"})
    num = lambda v: f"{round(float(v), 1):g}"
    rows = []
    for m, g in a.groupby("model", sort=False):
        cell = {r.split: num(r.acc) + ("" if r.acc_min == r.acc_max else f" ({num(r.acc_min)}–{num(r.acc_max)})") for r in g.itertuples()}
        rows.append([m, str(int(g.seeds.max())), *(cell.get(x, "—") for x in splits)])
    return ["Accuracy (%) on each split, mean over seeds (their range when they differ); base = the model without an adapter:", "",
            *_md_table(["model", "seeds", *splits], rows), ""]


def export_csv(t: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """out/{runs (every run, without config_json), split_scores (per run and split: base and adapter
    accuracy, Δ pp, margin, ppl ratio), verdict_per_shift, verdict_summary, coherence_runs, missing,
    accuracies (per shift, model and split: mean over seeds and range)}.csv."""
    out.mkdir(parents=True, exist_ok=True)
    names = {"runs": "runs", "split_scores": "split_scores", "per_shift": "verdict_per_shift", "summary": "verdict_summary",
             "coherence": "coherence_runs", "missing": "missing", "accuracies": "accuracies"}
    paths = []
    for key, name in names.items():
        p = out / f"{name}.csv"
        t[key].to_csv(p, index=False)
        paths.append(p)
    return paths


def render_verdict(store_path: str | Path, out_dir: str | Path, *, reference: str = "dpo", level: float = 0.95,
                   n_boot: int = 2000, seed: int = 0, ppl_max: float = PPL_MAX, repetition_max: float = REPETITION_MAX,
                   shifts: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None) -> str:
    """Write out_dir/verdict.md, forest.png, scatter.png and csv/*.csv; return the markdown.
    The keywords are `verdict_tables`'s."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = verdict_tables(store_path, reference=reference, level=level, n_boot=n_boot, seed=seed, ppl_max=ppl_max,
                       repetition_max=repetition_max, shifts=shifts, methods=methods, seeds=seeds)
    images = {}
    _, label = shift_labels(t["per_shift"].get("shift", []))
    ps = t["per_shift"].assign(shift=t["per_shift"]["shift"].map(label)) if len(t["per_shift"]) else t["per_shift"]  # plots: short names
    if len(ps) and np.isfinite(ps.d_oos).any():
        plot_forest(ps, t["summary"], out / "forest.png", reference=reference, level=level)
        images[f"Paired Δoos differences vs {reference}"] = "forest.png"
    if len(ps) and (np.isfinite(ps.own_d_oos) & np.isfinite(ps.own_d_test)).any():
        plot_scatter(ps, out / "scatter.png", reference=reference)
        images["Δoos vs Δtest"] = "scatter.png"
    export_csv(t, out / "csv")
    md = verdict_markdown(t, store_path=store_path, images=images)
    (out / "verdict.md").write_text(md)
    return md
