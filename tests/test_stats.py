"""Statistics on hand-worked numbers (each expected value is derived in its docstring)."""

from __future__ import annotations

import math

import pytest

from reprpo.eval.stats import (
    delta_pp,
    fmt_ci,
    geo_mean_ci,
    mean_ci,
    paired_diff,
    t_quantile,
    transfer,
)


def test_delta_is_percentage_points_not_a_ratio():
    """0.62 vs 0.50: 100·(0.62 − 0.50) = 12 pp (a ratio would read 1.24, or "24%")."""
    assert delta_pp(0.62, 0.50) == pytest.approx(12.0)
    assert delta_pp(0.40, 0.50) == pytest.approx(-10.0)


@pytest.mark.parametrize("p, dof, expected", [
    (0.975, 2, 4.302653),   # ν=2 closed form: (2p−1)/√(2p(1−p)) = 0.95/√0.04875
    (0.975, 1, 12.706205),  # ν=1 (Cauchy): tan(π(p − ½)) = tan(0.475π)
    (0.975, 4, 2.776445),
    (0.975, 10, 2.228139),
    (0.95, 5, 2.015048),
    (0.025, 2, -4.302653),  # symmetry
    (0.5, 7, 0.0),
])
def test_t_quantile_matches_tables(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=1e-6)


def test_t_quantile_closed_forms():
    for p in (0.6, 0.9, 0.99):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_mean_ci_three_seeds():
    """[10, 5, 15]: mean 10, s = 5, h = 4.302653·5/√3 = 12.42069."""
    m, h = mean_ci([10.0, 5.0, 15.0])
    assert m == pytest.approx(10.0) and h == pytest.approx(4.302653 * 5 / math.sqrt(3), rel=1e-6)
    assert h == pytest.approx(12.42069, abs=1e-5)


def test_mean_ci_edge_cases():
    """One value: no interval (nan half width); none: nan; nan/inf inputs are left out."""
    assert mean_ci([3.0])[0] == 3.0 and math.isnan(mean_ci([3.0])[1])
    assert all(math.isnan(x) for x in mean_ci([]))
    m, h = mean_ci([10.0, float("nan"), 5.0, 15.0, float("inf")])
    assert (m, round(h, 4)) == (10.0, 12.4207)
    m, h = mean_ci([1.0, 1.0, 1.0])
    assert m == 1.0 and h == 0.0


def test_mean_ci_level():
    """90% with n = 4: t_{0.95,3} = 2.353363; [1, 2, 3, 4]: s = √(5/3) = 1.290994, h = 2.353363·1.290994/2 = 1.519090."""
    m, h = mean_ci([1.0, 2.0, 3.0, 4.0], level=0.90)
    assert m == 2.5 and h == pytest.approx(1.519090, abs=1e-5)


def test_paired_diff_matched_keys_only():
    """method {1: 20, 2: 12, 3: 16}, dpo {1: 10, 2: 5, 3: 15, 4: 9}: d = [10, 7, 1], mean 6,
    s² = (16 + 1 + 25)/2 = 21, h = 4.302653·√21/√3 = 11.38375; key 4 has no method run: dropped, counted."""
    p = paired_diff({("s", 1): 20.0, ("s", 2): 12.0, ("s", 3): 16.0},
                    {("s", 1): 10.0, ("s", 2): 5.0, ("s", 3): 15.0, ("s", 4): 9.0})
    assert p.mean == pytest.approx(6.0) and p.half_width == pytest.approx(11.38375, abs=1e-5)
    assert (p.n, p.unmatched_method, p.unmatched_ref) == (3, 0, 1)


def test_paired_diff_removes_shared_seed_noise():
    """Both methods swing together across seeds (±20) but the method is always 2 pp better:
    unpaired CIs are wide, the paired difference is exactly 2 ± 0."""
    dpo = {1: 10.0, 2: 30.0, 3: 50.0}
    meth = {k: v + 2.0 for k, v in dpo.items()} | {9: 99.0}
    p = paired_diff(meth, dpo)
    assert (p.mean, p.half_width, p.n, p.unmatched_method) == (2.0, 0.0, 3, 1)
    assert mean_ci(dpo.values())[1] > 40


def test_transfer_ratio_and_undefined():
    """Δoos 6, Δtest 12 → 0.5; Δtest = 0 → (nan, False), never ±inf; a negative Δtest is kept (−1)."""
    assert transfer(6.0, 12.0) == (0.5, True)
    v, ok = transfer(3.0, 0.0)
    assert math.isnan(v) and not ok
    assert transfer(3.0, -3.0) == (-1.0, True)
    assert not transfer(float("nan"), 5.0)[1]


def test_geo_mean_of_ratios():
    """ppl ratios 0.5 and 2.0: geometric mean 1 (the arithmetic mean 1.25 would call it a loss)."""
    g, lo, hi = geo_mean_ci([0.5, 2.0])
    assert g == pytest.approx(1.0) and lo < 1 < hi
    g, lo, hi = geo_mean_ci([1.1, 1.1, 1.1])
    assert (g, lo, hi) == pytest.approx((1.1, 1.1, 1.1))


def test_fmt_ci():
    assert fmt_ci(10.0, 12.42069) == "+10.0 ± 12.4"
    assert fmt_ci(10.0, float("nan")) == "+10.0 ± n/a"
    assert fmt_ci(float("nan"), 1.0) == "—"
