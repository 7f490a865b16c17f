"""Report from the results store: tables (markdown + html) and plots, re-rendered on demand.

`render_report(store, out_dir)` reads every finished run of `store.py`'s schema and writes
out_dir/report.md, report.html (PNGs embedded) and the PNGs, following DESIGN §6:
Δ in percentage points, mean ± 95% Student-t CI over seeds, paired differences vs DPO on
matched (shift, seed), transfer Δoos/Δtest, coherence and reward margins.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from reprpo.errors import ReprpoError
from reprpo.eval.stats import (
    Paired,
    delta_pp,
    differential_elicitation,
    fmt_ci,
    geo_mean_ci,
    mean_ci,
    paired_diff,
    rms_calibration_error,
    transfer,
)

REFERENCE = "dpo"  # the baseline every method is paired against
TARGET = "target:"  # method label of compare --target-tuned runs (experiments/compare.py)
SPLIT_ORDER = ("train", "test", "oos", "rnd")
CURVE_KEYS = ("loss", "rewards/margin")
HOW_TO_READ = (
    "**How to read.** Δ = adapter − base accuracy in percentage points (pp), never a ratio. "
    "`±` is the 95% Student-t confidence half-width over seeds (n − 1 dof; `n/a` with one seed); "
    "`seeds` is n. `vs DPO` is the mean of paired differences Δ_method − Δ_dpo over the "
    "(shift, seed) pairs both have (unmatched runs are dropped and counted). Transfer = Δoos/Δtest "
    "per seed, undefined (dropped, counted) when Δtest = 0. Margin gain = adapter − base mean "
    "margin ℓ̄⁺ − ℓ̄⁻ (nats/token). ppl ratio = chosen perplexity adapter/base, geometric mean "
    "over seeds with its 95% interval (> 1: good answers became less likely)."
)


# --------------------------------------------------------------------------- loading


def load_frames(store_path: str | Path) -> dict[str, pd.DataFrame]:
    """The store's tables for runs with status 'done' (one DataFrame per table).

    Keys: runs, split_scores, curves, coherence, pair_scores (run_id, split, model, pair,
    margin); plus `status` (count of every run per status), `superseded` (older done runs of
    the same method, shift and seed, left out: the newest finished one is used) and `targets`
    (the target-tuned runs of `compare --target-tuned`, method "target:M": run_id, method,
    shift, seed and their oos accuracy `acc`; kept out of every other table). Extra columns
    another writer adds (e.g. `owner`) are kept."""
    from reprpo.experiments.store import connect

    p = Path(store_path)
    if not p.is_file():
        raise ReprpoError(f"results store not found: {p}. Run `reprpo compare` first, or pass --store PATH.")
    con = connect(p)
    try:
        q = lambda sql: pd.read_sql_query(sql, con)
        status = q("SELECT status, COUNT(*) AS runs FROM runs GROUP BY status ORDER BY status")
        runs = q("SELECT * FROM runs WHERE status = 'done'")
        done = "(SELECT run_id FROM runs WHERE status = 'done')"
        split_scores = q(f"SELECT * FROM split_scores WHERE run_id IN {done}")
        curves = q(f"SELECT * FROM curves WHERE run_id IN {done}")
        coherence = q(f"SELECT * FROM coherence WHERE run_id IN {done}")
        pair_scores = q(f"SELECT run_id, split, model, pair, margin FROM pair_scores WHERE run_id IN {done}")
    finally:
        con.close()
    runs["_t"] = runs.finished.fillna(runs.created)
    runs = runs.sort_values("_t")
    dup = runs.duplicated(["method", "shift", "seed"], keep="last")
    superseded, runs = runs[dup].drop(columns="_t"), runs[~dup].drop(columns="_t")
    is_target = runs.method.str.startswith(TARGET)
    targets, runs = runs[is_target][["run_id", "method", "shift", "seed"]], runs[~is_target]
    t_oos = split_scores[(split_scores.split == "oos") & (split_scores.model == "adapter")][["run_id", "accuracy"]]
    targets = targets.merge(t_oos, on="run_id").rename(columns={"accuracy": "acc"})
    keep = lambda df: df[df.run_id.isin(runs.run_id)].reset_index(drop=True)
    return {"runs": runs.reset_index(drop=True), "split_scores": keep(split_scores), "curves": keep(curves),
            "coherence": keep(coherence), "pair_scores": keep(pair_scores), "status": status,
            "superseded": superseded.reset_index(drop=True), "targets": targets.reset_index(drop=True)}


def scorer_facts(runs: pd.DataFrame) -> dict[str, tuple[str, bool, bool]]:
    """method -> (scorer name, lm, in_adapter) from each run's config: lm False = the score is
    not the LM's log-prob margin (ppl ratio and generation check n/a); in_adapter False = the
    method's state is not in the saved adapter (a head, a direction: method_state.pt). A method
    this reprpo does not know: ("?", True, True)."""
    import json

    from reprpo.methods.base import KINDS, PRESETS, SCORERS

    out = {}
    for r in runs.itertuples():
        cfg = json.loads(r.config_json)
        name = (cfg.get("eval") or {}).get("scorer") or (KINDS[PRESETS[r.method].kind].scorer if r.method in PRESETS else "")
        sc = SCORERS.get(name) if name in SCORERS else None
        out[r.method] = (name or "?", sc.lm if sc else True, not sc.needs_method if sc else True)
    return out


def _method_order(methods) -> list[str]:
    ms = sorted(set(methods))
    return ([REFERENCE] if REFERENCE in ms else []) + [m for m in ms if m != REFERENCE]


def _split_order(splits) -> list[str]:
    ss = set(splits)
    return [s for s in SPLIT_ORDER if s in ss] + sorted(ss - set(SPLIT_ORDER))


def run_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (run, split): base and adapter accuracy / margin / chosen ppl and the per-run
    Δ pp, margin gain and ppl ratio. Runs scored without an adapter get NaN for those."""
    ss, runs = frames["split_scores"], frames["runs"]
    cols = ["run_id", "method", "shift", "seed", "split", "n", "base_acc", "adapter_acc", "delta_pp",
            "base_margin", "adapter_margin", "margin_gain", "base_ppl", "adapter_ppl", "ppl_ratio"]
    if ss.empty:
        return pd.DataFrame(columns=cols)
    wide = ss.pivot_table(index=["run_id", "split"], columns="model", values=["n", "accuracy", "margin", "chosen_ppl"], aggfunc="first")
    wide.columns = [f"{model}_{v}" for v, model in wide.columns]
    wide = wide.reset_index()
    for c in ("base", "adapter"):
        for v in ("n", "accuracy", "margin", "chosen_ppl"):
            if f"{c}_{v}" not in wide:
                wide[f"{c}_{v}"] = np.nan
    t = wide.merge(runs[["run_id", "method", "shift", "seed"]], on="run_id")
    t["n"] = t.adapter_n.fillna(t.base_n)
    t = t.rename(columns={"base_accuracy": "base_acc", "adapter_accuracy": "adapter_acc", "base_chosen_ppl": "base_ppl", "adapter_chosen_ppl": "adapter_ppl"})
    t["delta_pp"] = delta_pp(t.adapter_acc, t.base_acc)
    t["margin_gain"] = t.adapter_margin - t.base_margin
    t["ppl_ratio"] = t.adapter_ppl / t.base_ppl
    return t[cols]


def _by_seed(rt: pd.DataFrame, method: str, shift: str | None, split: str, col: str = "delta_pp") -> dict:
    sel = rt[(rt.method == method) & (rt.split == split)]
    if shift is not None:
        sel = sel[sel["shift"] == shift]
    return {(r["shift"], int(r.seed)): float(r[col]) for _, r in sel.iterrows()}


# --------------------------------------------------------------------------- tables


def summary_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (shift, split, method): seeds, accuracies (% , mean over seeds), Δ pp ± CI,
    paired difference vs DPO ± CI (NaN for DPO itself or without DPO runs), margin gain ± CI,
    geometric-mean ppl ratio with its interval."""
    rt = run_table(frames)
    rows = []
    for shift in sorted(rt["shift"].unique()):
        at_shift = rt[rt["shift"] == shift]
        has_ref = REFERENCE in set(at_shift.method)
        for split in _split_order(at_shift.split):
            for method in _method_order(at_shift.method):
                cell = at_shift[(at_shift.split == split) & (at_shift.method == method)]
                if cell.empty:
                    continue
                d, dh = mean_ci(cell.delta_pp)
                g, gh = mean_ci(cell.margin_gain)
                pr, plo, phi = geo_mean_ci(cell.ppl_ratio)
                pd_ = Paired(math.nan, math.nan, 0, 0, 0)
                if has_ref and method != REFERENCE:
                    pd_ = paired_diff(_by_seed(rt, method, shift, split), _by_seed(rt, REFERENCE, shift, split))
                rows.append({
                    "shift": shift, "split": split, "method": method,
                    "seeds": int(np.isfinite(cell.delta_pp).sum()), "n_pairs": float(cell.n.mean()),
                    "base_acc": 100 * float(cell.base_acc.mean()), "adapter_acc": 100 * float(cell.adapter_acc.mean()),
                    "delta_pp": d, "delta_hw": dh,
                    "vs_dpo": pd_.mean, "vs_dpo_hw": pd_.half_width, "vs_dpo_n": pd_.n,
                    "vs_dpo_unmatched": pd_.unmatched_method + pd_.unmatched_ref,
                    "margin_gain": g, "margin_gain_hw": gh, "ppl_ratio": pr, "ppl_lo": plo, "ppl_hi": phi,
                })
    return pd.DataFrame(rows)


def overall_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (method, split): paired difference vs DPO pooled over every shift, keyed by (shift, seed)."""
    rt = run_table(frames)
    rows = []
    if REFERENCE not in set(rt.method):
        return pd.DataFrame(rows)
    for method in _method_order(rt.method):
        if method == REFERENCE:
            continue
        for split in _split_order(rt.split):
            p = paired_diff(_by_seed(rt, method, None, split), _by_seed(rt, REFERENCE, None, split))
            rows.append({"method": method, "split": split, "vs_dpo": p.mean, "vs_dpo_hw": p.half_width, "pairs": p.n,
                         "unmatched": p.unmatched_method + p.unmatched_ref,
                         "shifts": int(rt[(rt.method == method) & (rt.split == split)]["shift"].nunique())})
    return pd.DataFrame(rows)


def transfer_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (shift, method): Δtest, Δoos (mean over seeds), transfer Δoos/Δtest mean ± CI over the
    seeds where it is defined, how many are, and the ratio of the mean Δs (steadier with few seeds)."""
    rt = run_table(frames)
    rows = []
    for shift in sorted(rt["shift"].unique()):
        for method in _method_order(rt[rt["shift"] == shift].method):
            test, oos = _by_seed(rt, method, shift, "test"), _by_seed(rt, method, shift, "oos")
            keys = [k for k in test if k in oos]
            if not keys:
                continue
            ratios = [transfer(oos[k], test[k]) for k in keys]
            m, h = mean_ci(v for v, ok in ratios if ok)
            dt, do = float(np.mean([test[k] for k in keys])), float(np.mean([oos[k] for k in keys]))
            rows.append({"shift": shift, "method": method, "seeds": len(keys), "d_test": dt, "d_oos": do,
                         "transfer": m, "transfer_hw": h, "defined": sum(ok for _, ok in ratios),
                         "ratio_of_means": transfer(do, dt)[0]})
    return pd.DataFrame(rows)


def coherence_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (shift, method, metric): base and adapter mean over seeds, adapter − base ± CI."""
    co = frames["coherence"]
    if co.empty:
        return pd.DataFrame()
    wide = co.pivot_table(index=["run_id", "metric"], columns="model", values="value", aggfunc="first").reset_index()
    for c in ("base", "adapter"):
        if c not in wide:
            wide[c] = np.nan
    wide = wide.merge(frames["runs"][["run_id", "method", "shift", "seed"]], on="run_id")
    rows = []
    for (shift, method, metric), g in wide.groupby(["shift", "method", "metric"]):
        m, h = mean_ci(g.adapter - g.base)
        rows.append({"shift": shift, "method": method, "metric": metric, "seeds": len(g),
                     "base": float(g.base.mean()), "adapter": float(g.adapter.mean()), "diff": m, "diff_hw": h})
    out = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(_method_order(out.method))}
    return out.sort_values(["shift", "method", "metric"], key=lambda s: s.map(order) if s.name == "method" else s).reset_index(drop=True)


def de_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (shift, method): differential elicitation per seed, DE = (acc_oos − acc_oos(base)) /
    acc_oos(target-tuned of the same shift and seed), mean ± CI over the seeds that have a
    target-tuned run (`defined` of `seeds`); the mean Δoos and target-tuned oos accuracy beside it."""
    tg = frames["targets"]
    if tg.empty:
        return pd.DataFrame()
    rt = run_table(frames)
    oos = rt[rt.split == "oos"]
    rows = []
    for shift in sorted(oos["shift"].unique()):
        target = {int(r.seed): float(r.acc) for r in tg[tg["shift"] == shift].itertuples()}
        if not target:
            continue
        for method in _method_order(oos[oos["shift"] == shift].method):
            cell = oos[(oos["shift"] == shift) & (oos.method == method)]
            des = [differential_elicitation(r.adapter_acc, r.base_acc, target.get(int(r.seed), math.nan)) for r in cell.itertuples()]
            m, h = mean_ci(des)
            rows.append({"shift": shift, "method": method, "seeds": len(cell), "defined": int(np.isfinite(des).sum()),
                         "de": m, "de_hw": h, "d_oos": float(cell.delta_pp.mean()),
                         "target_acc": 100 * float(np.mean([target[s] for s in cell.seed if s in target] or [math.nan])),
                         "target": tg.method.iloc[0].removeprefix(TARGET)})
    return pd.DataFrame(rows)


def calibration_table(frames: dict[str, pd.DataFrame], *, seed: int = 0) -> pd.DataFrame:
    """Per (shift, split, method): GENIES RMS calibration error of each run's per-pair margins
    (σ(margin) as the probability; orientation drawn with `seed`, the same pairs flipped in every
    run), mean ± CI over the seeds where it is defined, for the adapter and the base model."""
    ps = frames["pair_scores"]
    if ps.empty:
        return pd.DataFrame()
    per_run = []
    for (rid, split, model), g in ps.groupby(["run_id", "split", "model"]):
        per_run.append({"run_id": rid, "split": split, "model": model,
                        "rms": rms_calibration_error(g.sort_values("pair").margin.to_numpy(), seed=seed)})
    pr = pd.DataFrame(per_run).merge(frames["runs"][["run_id", "method", "shift", "seed"]], on="run_id")
    rows = []
    for shift in sorted(pr["shift"].unique()):
        at = pr[pr["shift"] == shift]
        for split in _split_order(at.split):
            for method in _method_order(at.method):
                cell = at[(at.split == split) & (at.method == method)]
                a, ah = mean_ci(cell[cell.model == "adapter"].rms)
                b, _ = mean_ci(cell[cell.model == "base"].rms)
                rows.append({"shift": shift, "split": split, "method": method, "seeds": int((cell.model == "adapter").sum()),
                             "defined": int(np.isfinite(cell[cell.model == "adapter"].rms).sum()), "adapter": a, "adapter_hw": ah, "base": b})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- plots


def _colors(methods: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_accuracy(summary: pd.DataFrame, path: Path) -> None:
    """Accuracy per split: base (grey) and each method's adapter, error bars = 95% CI of Δ; one panel per shift."""
    import matplotlib.pyplot as plt

    shifts = list(dict.fromkeys(summary["shift"]))
    methods = _method_order(summary.method)
    colors = _colors(methods)
    fig, axes = plt.subplots(1, len(shifts), figsize=(max(5.0, 1.2 + 4.2 * len(shifts)), 4.2), squeeze=False, sharey=True)
    for ax, shift in zip(axes[0], shifts):
        s = summary[summary["shift"] == shift]
        splits = _split_order(s.split)
        width = 0.8 / (len(methods) + 1)
        x = np.arange(len(splits))
        base = [s[s.split == sp].base_acc.mean() for sp in splits]
        ax.bar(x - 0.4 + width / 2, base, width, color="0.7", label="base (adapter off)")
        for i, m in enumerate(methods, start=1):
            rows = [s[(s.split == sp) & (s.method == m)] for sp in splits]
            acc = [r.adapter_acc.iloc[0] if len(r) else np.nan for r in rows]
            err = [r.delta_hw.iloc[0] if len(r) and math.isfinite(r.delta_hw.iloc[0]) else 0.0 for r in rows]
            ax.bar(x - 0.4 + width * (i + 0.5), acc, width, yerr=err, capsize=2, color=colors[m], label=m)
        ax.axhline(50, color="k", lw=0.8, ls=":")
        ax.set_xticks(x, splits)
        ax.set_title(f"shift {shift}", fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("preference accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(labels), 4)
    rows = math.ceil(len(labels) / ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle("Accuracy by split (error bars: 95% CI of Δ over seeds; dotted: chance)", fontsize=11)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_transfer(rt: pd.DataFrame, path: Path) -> None:
    """Δoos vs Δtest, one point per run, coloured by method, marker by shift; y = x dashed."""
    import matplotlib.pyplot as plt

    test = rt[rt.split == "test"][["run_id", "method", "shift", "delta_pp"]]
    oos = rt[rt.split == "oos"][["run_id", "delta_pp"]].rename(columns={"delta_pp": "delta_pp_oos"})
    j = test.merge(oos, on="run_id").dropna()
    methods = _method_order(rt.method)
    colors = _colors(methods)
    markers = dict(zip(sorted(rt["shift"].unique()), "osD^vP*X<>"))
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    for (m, sh), g in j.groupby(["method", "shift"]):
        ax.scatter(g.delta_pp, g.delta_pp_oos, color=colors[m], marker=markers.get(sh, "o"), s=45, alpha=0.85, edgecolor="k", lw=0.4)
    vals = np.concatenate([j.delta_pp.to_numpy(), j.delta_pp_oos.to_numpy(), [0.0, 1.0]])
    lo, hi = float(vals.min()), float(vals.max())
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x (full transfer)")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.axvline(0, color="0.6", lw=0.6)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    finish_transfer_plot(fig, ax, path, colors=colors, methods=methods, markers=markers,
                         title="Transfer: one point per run", title_size=11)


def finish_transfer_plot(fig, ax, path: Path, *, colors: dict, methods: list[str], markers: dict, title: str,
                         title_size: int = 10, extra: tuple = ()) -> None:
    """Legend (methods by colour, shifts by marker, `extra` handles, y = x), Δtest / Δoos axis
    labels and title of a Δoos-vs-Δtest plot; saved to `path` and closed."""
    import matplotlib.pyplot as plt

    handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="0.3", marker=mk, ls="", label=f"shift {sh}") for sh, mk in markers.items()]
    handles += [*extra, plt.Line2D([], [], color="k", ls="--", label="y = x")]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.9)
    ax.set_xlabel("Δ test (pp, in distribution)")
    ax.set_ylabel("Δ oos (pp, shifted)")
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(frames: dict[str, pd.DataFrame], path: Path) -> bool:
    """Training loss, reward margin and (with train.eval_every) each eval split's accuracy vs
    step, mean over seeds per method (band: min–max over seeds); rows = metric, columns = shift. Returns False (no file) when the store has no curves."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cu = frames["curves"]
    evals = sorted(k for k in set(cu.key) if k.startswith("eval/") and k.endswith("/accuracy"))  # train.eval_every
    cu = cu[cu.key.isin([*CURVE_KEYS, *evals])].merge(frames["runs"][["run_id", "method", "shift", "seed"]], on="run_id")
    if cu.empty:
        return False
    keys = [k for k in [*CURVE_KEYS, *evals] if k in set(cu.key)]
    shifts = sorted(cu["shift"].unique())
    methods = _method_order(frames["runs"].method)
    colors = _colors(methods)
    fig, axes = plt.subplots(len(keys), len(shifts), figsize=(max(5.0, 4.4 * len(shifts)), 3.0 * len(keys)), squeeze=False, sharex="col")
    for r, key in enumerate(keys):
        for c, shift in enumerate(shifts):
            ax = axes[r][c]
            sel = cu[(cu.key == key) & (cu["shift"] == shift)]
            for m in methods:
                g = sel[sel.method == m].groupby("step").value
                if not len(g):
                    continue
                mean, lo, hi = g.mean(), g.min(), g.max()
                ax.plot(mean.index, mean.to_numpy(), color=colors[m], lw=1.5, label=m)
                ax.fill_between(mean.index, lo.to_numpy(), hi.to_numpy(), color=colors[m], alpha=0.15, lw=0)
            ax.set_title(f"{key} · shift {shift}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if r == len(keys) - 1:
                ax.set_xlabel("optimiser step")
    axes[0][0].legend(fontsize=8, framealpha=0.9)
    fig.suptitle("Training curves: mean over seeds (band: min–max). Loss is each method's own objective; scales differ.", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- rendering


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _num(v: float, fmt: str = ".1f") -> str:
    return format(v, fmt) if isinstance(v, int | float) and math.isfinite(v) else "—"


def _n(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def _warnings(frames, summary: pd.DataFrame, tr: pd.DataFrame) -> list[str]:
    notes = []
    few = summary[summary.seeds < 3][["shift", "method"]].drop_duplicates()
    if len(few):
        notes.append("Fewer than 3 seeds (the protocol asks ≥ 3, docs/methods.md): " + ", ".join(f"{m} @ {s}" for s, m in few.itertuples(index=False)) + ".")
    for shift in sorted(summary["shift"].unique()):
        if REFERENCE not in set(summary[summary["shift"] == shift].method):
            notes.append(f"No {REFERENCE} runs for shift {shift}: no paired difference there.")
    unmatched = summary[summary.vs_dpo_unmatched > 0]
    if len(unmatched):
        cells = unmatched[["shift", "method"]].drop_duplicates()
        notes.append("Paired differences dropped unmatched seeds (a method or DPO seed without its partner) for: "
                     + ", ".join(f"{m} @ {s}" for s, m in cells.itertuples(index=False)) + ".")
    if len(tr) and (tr.defined < tr.seeds).any():
        bad = tr[tr.defined < tr.seeds]
        notes.append("Transfer undefined (Δtest = 0) for " + ", ".join(f"{r.method} @ {r.shift}: {r.seeds - r.defined} of {r.seeds} seeds" for r in bad.itertuples()) + "; those seeds are left out of its mean.")
    sup = frames["superseded"]
    if len(sup):
        notes.append(f"{len(sup)} older finished run(s) of the same method, shift and seed were superseded by the newest one.")
    runs = frames["runs"]
    if "validated_on" in runs:  # a tuned method's params: never report the shift they were tuned on
        leak = runs[runs.validated_on.notna() & (runs.validated_on == runs["shift"])]
        if len(leak):
            cells = leak[["shift", "method"]].drop_duplicates()
            notes.append("WARNING: hyper-parameters tuned on a reported shift (validated_on = shift): "
                         + ", ".join(f"{m} @ {s}" for s, m in cells.itertuples(index=False)) + ". Those numbers are optimistic.")
    return notes


def generation_links(runs: pd.DataFrame, *, shift: str, report_dir: Path | None) -> list[str]:
    """Markdown links to each run's generation texts (`OUT/RUN/generations.jsonl`, written by
    compare's coherence check), relative to the report's folder."""
    links = []
    for r in runs[runs["shift"] == shift].sort_values(["method", "seed"]).itertuples():
        path = Path(str(r.out_dir or "")) / "generations.jsonl"
        if r.out_dir and path.is_file():
            shown = os.path.relpath(path, report_dir) if report_dir else str(path)
            links.append(f"[{r.method} seed {r.seed}]({shown})")
    return links


def render_markdown(frames: dict[str, pd.DataFrame], *, store_path: str | Path, images: dict[str, str],
                    report_dir: Path | None = None) -> str:
    """The report's markdown from loaded frames; `images` maps a title to a PNG file name."""
    summary, overall = summary_table(frames), overall_table(frames)
    tr, co = transfer_table(frames), coherence_table(frames)
    de, cal = de_table(frames), calibration_table(frames)
    facts = scorer_facts(frames["runs"])
    ppl = lambda r: "n/a" if not facts.get(r.method, ("", True, True))[1] else f"{_num(r.ppl_ratio, '.3f')} [{_num(r.ppl_lo, '.3f')}, {_num(r.ppl_hi, '.3f')}]"
    status = ", ".join(f"{r.runs} {r.status}" for r in frames["status"].itertuples()) or "no runs"
    runs = frames["runs"]
    L = ["# reprpo results", "",
         f"Store `{store_path}` · rendered {time.strftime('%Y-%m-%d %H:%M')} · runs: {status} (only `done` runs are used) · "
         f"methods: {', '.join(_method_order(runs.method)) or '—'} · shifts: {', '.join(sorted(runs['shift'].unique())) or '—'}",
         "", HOW_TO_READ, ""]
    if summary.empty:
        L += ["No finished runs with split scores in the store yet.", ""]
        return "\n".join(L)
    if len(overall):
        L += ["## Paired difference vs DPO, all shifts", "",
              "Δ_method − Δ_dpo in pp, paired on (shift, seed) and pooled over shifts.", ""]
        L += _md_table(["method", "split", "shifts", "pairs", "vs DPO pp", "unmatched"],
                       [[r.method, r.split, str(r.shifts), str(r.pairs), fmt_ci(r.vs_dpo, r.vs_dpo_hw), str(r.unmatched)] for r in overall.itertuples()])
        L.append("")
    for shift in summary["shift"].unique():
        s = summary[summary["shift"] == shift]
        L += [f"## Shift `{shift}`", "", "### Accuracy", ""]
        L += _md_table(
            ["split", "method", "seeds", "pairs", "base %", "adapter %", "Δ pp", "vs DPO pp", "margin gain", "ppl ratio"],
            [[r.split, r.method, str(r.seeds), _n(r.n_pairs), _num(r.base_acc), _num(r.adapter_acc),
              fmt_ci(r.delta_pp, r.delta_hw),
              (fmt_ci(r.vs_dpo, r.vs_dpo_hw) + f" (n={r.vs_dpo_n})") if r.vs_dpo_n else "—",
              fmt_ci(r.margin_gain, r.margin_gain_hw, digits=3), ppl(r)] for r in s.itertuples()])
        own = sorted(m for m in set(s.method) if facts.get(m, ("logp_mean",))[0] not in ("logp_mean", "logp_sum", "?"))
        if own:
            not_lm = [m for m in own if not facts[m][1]]
            L += ["", "Scored by their own scorer (base: the zero-shot ℓ̄ margin, as for every method): "
                  + ", ".join(f"{m} (`{facts[m][0]}`)" for m in own) + ". Their margin gain is in that score's units"
                  + (f"; ppl ratio n/a for {', '.join(not_lm)}: the score is not the LM's log-prob margin." if not_lm else ".")]
        t = tr[tr["shift"] == shift] if len(tr) else tr
        if len(t):
            L += ["", "### Transfer Δoos / Δtest", ""]
            L += _md_table(["method", "seeds", "Δtest pp", "Δoos pp", "Δoos/Δtest", "defined", "ratio of means"],
                           [[r.method, str(r.seeds), _num(r.d_test, "+.1f"), _num(r.d_oos, "+.1f"),
                             fmt_ci(r.transfer, r.transfer_hw, digits=2, signed=False), f"{r.defined}/{r.seeds}",
                             _num(r.ratio_of_means, ".2f")] for r in t.itertuples()])
        d = de[de["shift"] == shift] if len(de) else de
        if len(d):
            L += ["", "### Differential elicitation (GENIES)", "",
                  f"DE = (acc_oos − acc_oos(base)) / acc_oos(target-tuned): the target-tuned run is {d.target.iloc[0]} trained on "
                  "the oos distribution's own train split, same seed. ± = 95% CI over seeds.", ""]
            L += _md_table(["method", "seeds", "Δoos pp", "target-tuned oos %", "DE", "defined"],
                           [[r.method, str(r.seeds), _num(r.d_oos, "+.1f"), _num(r.target_acc), fmt_ci(r.de, r.de_hw, digits=3),
                             f"{r.defined}/{r.seeds}"] for r in d.itertuples()])
        elif len(s):
            L += ["", "Differential elicitation: no target-tuned runs for this shift (`reprpo compare --target-tuned`)."]
        k = cal[cal["shift"] == shift] if len(cal) else cal
        if len(k):  # splits where no method's calibration is defined are left out
            k = k[k.split.isin(set(k[(k.defined > 0) | np.isfinite(k.base)].split))]
            if k.empty:
                L += ["", "Calibration (GENIES RMS error): undefined here, no 5-bin bin held 20 pairs; score more pairs (data.n_eval)."]
        if len(k):
            L += ["", "### Calibration (GENIES RMS calibration error)", "",
                  "σ(margin) as the probability that a response is preferred, pair orientation randomised (seed 0), 5 bins, "
                  "bins under 20 pairs skipped (— : no bin had 20). Lower is better; base = the zero-shot ℓ̄ margin.", ""]
            L += _md_table(["split", "method", "seeds", "base", "adapter", "defined"],
                           [[r.split, r.method, str(r.seeds), _num(r.base, ".3f"), fmt_ci(r.adapter, r.adapter_hw, digits=3, signed=False),
                             f"{r.defined}/{r.seeds}"] for r in k.itertuples()])
        c = co[co["shift"] == shift] if len(co) else co
        no_gen = sorted(m for m in set(s.method) if not facts.get(m, ("", True, True))[1])
        if no_gen:
            L += ["", "Generation check n/a for " + ", ".join(no_gen) + ": a reward head or a probe scores responses, "
                  "it does not generate."]
        if len(c):
            L += ["", "### Coherence (greedy generations)", ""]
            L += _md_table(["method", "metric", "seeds", "base", "adapter", "adapter − base"],
                           [[r.method, r.metric, str(r.seeds), _num(r.base, ".3f"), _num(r.adapter, ".3f"),
                             fmt_ci(r.diff, r.diff_hw, digits=3)] for r in c.itertuples()])
            if links := generation_links(runs, shift=shift, report_dir=report_dir):
                L += ["", "Generation texts (base and adapter, JSON lines): " + " · ".join(links)]
        L.append("")
    if images:
        L += ["## Plots", ""] + [f"![{title}]({name})" for title, name in images.items()] + [""]
    notes = _warnings(frames, summary, tr)
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L)


def _inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def markdown_to_html(md: str, *, image_dir: Path) -> str:
    """The small subset of markdown the report uses (headings, tables, lists, images, paragraphs)
    as a standalone page; images are embedded as data URIs so the file travels alone."""
    out, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|(---\|)+", r)]
            cells = [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:]) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if m := re.fullmatch(r"(#{1,3}) (.*)", line):
            k = len(m.group(1))
            out.append(f"<h{k}>{_inline(m.group(2))}</h{k}>")
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            data = base64.b64encode((image_dir / m.group(2)).read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("- "):
            out.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "td:first-child,td:nth-child(2),th{text-align:left}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>reprpo results</title><style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"


def render_report(store_path: str | Path, out_dir: str | Path) -> str:
    """Read the store, write out_dir/{report.md, report.html, accuracy.png, transfer.png,
    curves.png} and return the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = load_frames(store_path)
    summary, rt = summary_table(frames), run_table(frames)
    images: dict[str, str] = {}
    if len(summary):
        plot_accuracy(summary, out / "accuracy.png")
        images["Accuracy by split and method"] = "accuracy.png"
        if {"test", "oos"} <= set(rt.split):
            plot_transfer(rt, out / "transfer.png")
            images["Δoos vs Δtest per run"] = "transfer.png"
    if plot_curves(frames, out / "curves.png"):
        images["Training curves"] = "curves.png"
    md = render_markdown(frames, store_path=store_path, images=images, report_dir=out)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(markdown_to_html(md, image_dir=out))
    return md
