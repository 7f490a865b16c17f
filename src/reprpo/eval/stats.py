"""Statistics over per-run numbers: Δ in percentage points, mean ± 95% CI over seeds, paired
differences vs DPO, transfer Δoos/Δtest, geometric means (DESIGN §6).

Pure functions of plain numbers (no store, no pandas). Conventions:
- accuracies are fractions in [0, 1]; every Δ is in percentage points (pp), 100·(acc − acc_base),
  never a ratio (differs: the earlier reprpo tables printed a ratio labelled "pp");
- a confidence interval is returned as its half width h: the interval is mean ± h, with
  h = t_{(1+level)/2, n−1} · s / √n (Student t, s the sample standard deviation, n − 1 dof);
- non-finite inputs (nan, ±inf: e.g. an undefined transfer ratio) are left out and `n` counts
  only the finite values used, so a caller can show "n of N".
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- Student t quantile


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom: 1 − ½ I_{ν/(ν+t²)}(ν/2, ½) for t ≥ 0."""
    tail = 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t (inverse of `t_cdf`), by bisection to 1e-12.

    t_quantile(0.975, 2) = 4.302653 (closed form for ν=2: t = (2p−1)/√(2p(1−p)) = 0.95/√0.04875);
    t_quantile(0.975, 1) = tan(π(p − ½)) = 12.706205. Our own so that scipy is not a dependency."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if dof <= 0:
        raise ValueError(f"t_quantile: dof must be > 0, got {dof}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:  # bracket
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- per-run quantities


def delta_pp(acc: float, acc_base: float) -> float:
    """Δ = 100·(acc − acc_base), in percentage points. delta_pp(0.62, 0.50) = 12.0 (not 24% or 1.24)."""
    return 100.0 * (acc - acc_base)


def margin_gain(margin: float, margin_base: float) -> float:
    """Reward-margin change adapter − base of the mean margin ℓ̄⁺ − ℓ̄⁻ (nats per token)."""
    return margin - margin_base


def ppl_ratio(ppl: float, ppl_base: float) -> float:
    """Chosen-response perplexity ratio adapter/base; > 1 means the adapter finds good answers less likely."""
    return ppl / ppl_base


def transfer(d_oos: float, d_test: float, *, min_abs_test: float = 1e-9) -> tuple[float, bool]:
    """Transfer = Δoos/Δtest, returned as (value, defined).

    When |Δtest| < min_abs_test (no in-distribution gain to transfer) or either input is not
    finite, the ratio is undefined: returns (nan, False) instead of ±inf.
    transfer(6.0, 12.0) = (0.5, True); transfer(3.0, 0.0) = (nan, False)."""
    if not (math.isfinite(d_oos) and math.isfinite(d_test)) or abs(d_test) < min_abs_test:
        return math.nan, False
    return d_oos / d_test, True


# --------------------------------------------------------------------------- over seeds


def differential_elicitation(acc_oos: float, acc_oos_base: float, acc_oos_target: float) -> float:
    """DE = (acc_oos(method) − acc_oos(base)) / acc_oos(target-tuned), accuracies in [0, 1]
    GENIES (Clymer et al. 2023) "differential elicitation"; target-tuned = the reference method trained on the oos distribution's own train split. NaN when the target-tuned accuracy is 0 or missing."""
    if not (math.isfinite(acc_oos_target) and acc_oos_target > 0):
        return math.nan
    return (acc_oos - acc_oos_base) / acc_oos_target


def rms_calibration_error(margins: Iterable[float], *, seed: int = 0, bins: int = 5, min_bin: int = 20,
                          flip: Iterable[bool] | None = None) -> float:
    """RMS calibration error = √(Σ_b n_b (p̄_b − ȳ_b)² / Σ_b n_b) over bins with n_b ≥ `min_bin`
    GENIES (Clymer et al. 2023), after Hendrycks et al. (2021): each pair's orientation is drawn (fixed `seed`): response A is the chosen one (y = 1) or, flipped, the rejected one (y = 0); p = σ(score_A − score_B), i.e. σ(m) or σ(−m) for margin m = score⁺ − score⁻; `bins` equal-width bins of p on [0, 1]. NaN when no bin has `min_bin` pairs.

    `flip` (one bool per pair) replaces the drawn orientation (for hand-worked tests)."""
    m = np.asarray(list(margins), dtype=float)
    if m.size == 0:
        return math.nan
    f = np.random.default_rng(seed).random(m.size) < 0.5 if flip is None else np.asarray(list(flip), dtype=bool)
    score = np.where(f, -m, m)  # score_A − score_B
    p = 1.0 / (1.0 + np.exp(-score))
    y = (~f).astype(float)
    b = np.minimum((p * bins).astype(int), bins - 1)
    num = den = 0.0
    for k in range(bins):
        sel = b == k
        if sel.sum() >= min_bin:
            num += sel.sum() * (p[sel].mean() - y[sel].mean()) ** 2
            den += sel.sum()
    return math.sqrt(num / den) if den else math.nan


def _finite(values: Iterable[float]) -> np.ndarray:
    a = np.asarray([float(v) for v in values], dtype=float)
    return a[np.isfinite(a)]


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half width h) with mean ± h the Student-t `level` interval over the finite values.

    h = t_{(1+level)/2, n−1} · s/√n, s the sample standard deviation (ddof 1).
    Example: [10, 5, 15] → mean 10, s 5, h = 4.302653 · 5/√3 = 12.4207.
    n = 1 → (value, nan): one seed gives no interval. n = 0 → (nan, nan)."""
    a = _finite(values)
    if a.size == 0:
        return math.nan, math.nan
    m = float(a.mean())
    if a.size == 1:
        return m, math.nan
    s = float(a.std(ddof=1))
    return m, t_quantile(0.5 + level / 2.0, a.size - 1) * s / math.sqrt(a.size)


def geo_mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, lower, upper): mean ± CI of log(values), exponentiated. For ratios such as
    perplexity ratios, whose natural scale is multiplicative. Non-positive values are left out.
    geo_mean_ci([0.5, 2.0]) → geometric mean 1.0 (the arithmetic mean would say 1.25)."""
    a = _finite(values)
    a = a[a > 0]
    m, h = mean_ci(np.log(a), level)
    return math.exp(m), math.exp(m - h), math.exp(m + h)


@dataclass(frozen=True)
class Paired:
    """Mean ± CI of matched differences (method − reference) and how many keys were unmatched."""

    mean: float
    half_width: float
    n: int  # matched keys with a finite difference
    unmatched_method: int  # keys with a method value but no reference value (dropped)
    unmatched_ref: int  # keys with a reference value but no method value (dropped)


def paired_diff(method_values: Mapping[Hashable, float], dpo_values: Mapping[Hashable, float], level: float = 0.95) -> Paired:
    """Mean ± CI of d_k = method_k − dpo_k over keys k = (shift, seed) present in both mappings.

    Pairing on the key removes the between-seed (data order, LoRA init) and between-shift
    variation the two methods share. Keys present in only one mapping are dropped, never
    imputed, and counted in `unmatched_method` / `unmatched_ref`; a matched key whose difference
    is not finite is dropped too (n counts only what was used).
    Example: method {1: 20, 2: 12, 3: 16}, dpo {1: 10, 2: 5, 3: 15, 4: 9} → d = [10, 7, 1],
    mean 6, s = √21, h = 4.302653·√21/√3 = 11.384; unmatched_ref 1."""
    keys = [k for k in method_values if k in dpo_values]
    d = _finite(method_values[k] - dpo_values[k] for k in keys)
    m, h = mean_ci(d, level)
    return Paired(m, h, int(d.size), len(method_values) - len(keys), len(dpo_values) - len(keys))


# --------------------------------------------------------------------------- formatting


def fmt_ci(mean: float, half_width: float, *, digits: int = 1, signed: bool = True) -> str:
    """'+10.0 ± 12.4'; '+10.0 ± n/a' when there is no interval (one seed); '—' when no value."""
    if not math.isfinite(mean):
        return "—"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{m} ± {half_width:.{digits}f}" if math.isfinite(half_width) else f"{m} ± n/a"


# --------------------------------------------------------------------------- paired bootstrap, Holm


def paired_bootstrap_draws(method_values: Mapping[Hashable, Iterable[float]], ref_values: Mapping[Hashable, Iterable[float]], *,
                           seeds: Iterable[Hashable] | None = None, n_boot: int = 2000, seed: int = 0,
                           scale: float = 100.0) -> tuple[float, np.ndarray]:
    """d = (1/S) Σ_s scale·mean_i (x_{s,i} − r_{s,i}); B draws of d* from the two-stage (cluster) bootstrap
    Ours, after Davison & Hinkley (1997) §3.8 (two-stage resampling of clustered data): draw S seeds with replacement, then within every drawn seed its n_s pairs with replacement, the *same* pair indices for method and reference (paired).

    method_values / ref_values: seed -> per-pair values matched by position (pair index), e.g.
    correct (0, ½, 1) or correct − the base model's correct of the same pair (then d is a
    difference of Δs). `seeds`: the seeds to use (default: those in both, sorted); a seed in one
    mapping only is an error here: the caller matches and reports. `scale` 100 gives pp.
    Returns (d, draws (B,)); (nan, empty) without seeds. A seed drawn twice in one replicate gets
    two independent within-seed resamples. Deterministic for a fixed `seed`."""
    keys = sorted(k for k in method_values if k in ref_values) if seeds is None else list(seeds)
    x = []
    for k in keys:
        if k not in method_values or k not in ref_values:
            raise ValueError(f"paired_bootstrap: seed {k!r} is missing from the {'method' if k not in method_values else 'reference'} values")
        m, r = np.asarray(list(method_values[k]), dtype=float), np.asarray(list(ref_values[k]), dtype=float)
        if m.shape != r.shape or m.size == 0:
            raise ValueError(f"paired_bootstrap: seed {k!r} has {m.size} method and {r.size} reference values; "
                             "pass the same (non-empty) pairs for both, matched by pair index")
        x.append(scale * (m - r))  # (n_s,)
    if not x:
        return math.nan, np.empty(0)
    point = float(np.mean([xs.mean() for xs in x]))
    rng = np.random.default_rng(seed)
    n_seeds = len(x)
    pick = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # (B, S): the seeds of each replicate
    total = np.zeros(n_boot)
    for j in range(n_seeds):
        for s, xs in enumerate(x):
            rows = np.flatnonzero(pick[:, j] == s)
            if rows.size:
                idx = rng.integers(0, xs.size, size=(rows.size, xs.size))  # the same pairs for both: xs is m − r
                total[rows] += xs[idx].mean(axis=1)
    return point, total / n_seeds


def percentile_interval(draws: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """(lo, hi) = the (1 − level)/2 and (1 + level)/2 quantiles of the bootstrap draws (linear interpolation)
    Efron & Tibshirani (1993) §13.3, the percentile interval. (nan, nan) without draws."""
    a = _finite(draws)
    if a.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(a, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def paired_bootstrap(method_correct: Mapping[Hashable, Iterable[float]], ref_correct: Mapping[Hashable, Iterable[float]], *,
                     seeds: Iterable[Hashable] | None = None, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                     scale: float = 100.0) -> tuple[float, float, float]:
    """(d, lo, hi): d = mean over seeds of the per-seed accuracy difference method − reference (pp), with the
    percentile `level` interval of `paired_bootstrap_draws` (seeds, then pairs within seeds, resampled; paired).

    Identical methods → (0, 0, 0). Method right on all 4 pairs of one seed, reference right on
    pairs 0, 1 only → d = 100·(1 − ½) = +50 pp; a replicate is 100·(share of pairs 2, 3 drawn)."""
    d, draws = paired_bootstrap_draws(method_correct, ref_correct, seeds=seeds, n_boot=n_boot, seed=seed, scale=scale)
    return (d, *percentile_interval(draws, level))


def bootstrap_pvalue(draws: Iterable[float]) -> float:
    """p = min(1, 2·min(1 + #{d* ≤ 0}, 1 + #{d* ≥ 0}) / (B + 1)), two-sided, for H0: d = 0
    Ours: the percentile-interval test inversion (the smallest α whose 1 − α percentile interval excludes 0), with the +1 correction ((1 + #)/(B + 1): the observed value counts as a draw; Davison & Hinkley 1997, ch. 4) so that p > 0.

    draws [−1, 1, 2, 3]: #≤0 = 1, #≥0 = 3 → 2·2/5 = 0.8; B draws all > 0 → 2/(B + 1);
    all draws 0 → 1. nan without draws."""
    a = _finite(draws)
    if a.size == 0:
        return math.nan
    tail = min(int((a <= 0).sum()), int((a >= 0).sum())) + 1
    return min(1.0, 2.0 * tail / (a.size + 1))


def holm(pvalues: Iterable[float]) -> list[float]:
    """p̃_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j)) over the m p-values sorted ascending (step-down)
    Holm (1979), "A simple sequentially rejective multiple test procedure"; rejects p̃ < α with family-wise error ≤ α.

    Returned in the input's order. Non-finite p-values are no test: nan out, not counted in m.
    [0.01, 0.04, 0.03] → sorted 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → max(0.06, 0.04) = 0.06:
    [0.03, 0.06, 0.06]."""
    p = [float(v) for v in pvalues]
    ok = sorted((v, i) for i, v in enumerate(p) if math.isfinite(v))
    out = [math.nan] * len(p)
    m, run = len(ok), 0.0
    for j, (v, i) in enumerate(ok):
        run = max(run, min(1.0, (m - j) * v))
        out[i] = run
    return out
