"""Tests of differences in kronos_kit.metrics: Newey-West, Diebold-Mariano, block bootstrap, IC t-stats.

Hand-computed values carry their arithmetic in comments so a failure can be checked on paper.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kronos_kit import metrics as M

# d = a - b = (1, -1, 2, -1, 3): the small series used by the hand computations below
LOSS_A = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
LOSS_B = np.full(5, 2.0)


def ar1(phi: float, n: int, rng: np.random.Generator, burn: int = 200) -> np.ndarray:
    e = rng.standard_normal(n + burn)
    x = np.zeros_like(e)
    for t in range(1, len(e)):
        x[t] = phi * x[t - 1] + e[t]
    return x[burn:]


# ------------------------------------------------------------------------------ Newey-West


def test_newey_west_lag_rule():
    # floor(4 (n/100)^(2/9)): 5 -> floor(2.06) = 2, 60 -> floor(3.57) = 3, 100 -> 4, 500 -> floor(5.72) = 5,
    # 1000 -> floor(6.67) = 6
    assert [M.newey_west_lag(n) for n in (5, 60, 100, 500, 1000)] == [2, 3, 4, 5, 6]


def test_andrews_lag_by_hand_and_growth_with_persistence():
    d = LOSS_A - LOSS_B
    # deviations (0.2, -1.8, 1.2, -1.8, 2.2): rho = -8.64 / 12.8 = -0.675
    # a = 4 rho^2 / ((1 - rho)^2 (1 + rho)^2) = 1.8225 / (2.805625 * 0.105625) = 6.1499
    # S = 1.1447 (a * 5)^(1/3) = 1.1447 * 3.1334 = 3.587 -> lag 3
    rho = -0.675
    alpha = 4 * rho**2 / ((1 - rho) ** 2 * (1 + rho) ** 2)
    assert 1.1447 * (alpha * 5) ** (1 / 3) == pytest.approx(3.587, abs=1e-3)
    assert M.andrews_lag(d) == 3
    rng = np.random.default_rng(0)
    lags = [M.andrews_lag(ar1(phi, 120, rng)) for phi in (0.0, 0.5, 0.8)]
    assert lags[0] <= 2 < lags[1] < lags[2]
    assert M.andrews_lag(np.full(10, 1.0)) == 0


def test_newey_west_variance_by_hand():
    d = LOSS_A - LOSS_B
    # mean 0.8; deviations (0.2, -1.8, 1.2, -1.8, 2.2)
    # g0 = (0.04 + 3.24 + 1.44 + 3.24 + 4.84) / 5 = 12.8 / 5 = 2.56
    # g1 = (0.2*-1.8 + -1.8*1.2 + 1.2*-1.8 + -1.8*2.2) / 5 = -8.64 / 5 = -1.728
    # g2 = (0.2*1.2 + -1.8*-1.8 + 1.2*2.2) / 5 = 6.12 / 5 = 1.224
    assert M.newey_west_variance(d, lag=0) == pytest.approx(2.56 / 5)
    assert M.newey_west_variance(d, lag=0) == pytest.approx(d.var() / 5)  # lag 0 is the i.i.d. variance
    # lag 1, Bartlett weight 1 - 1/2: (2.56 + 2 * 0.5 * -1.728) / 5 = 0.832 / 5 = 0.1664
    assert M.newey_west_variance(d, lag=1) == pytest.approx(0.1664)
    # lag 2, weights 2/3 and 1/3: (2.56 + 2 (2/3)(-1.728) + 2 (1/3)(1.224)) / 5 = (2.56 - 2.304 + 0.816) / 5
    assert M.newey_west_variance(d, lag=2) == pytest.approx(1.072 / 5)
    # the default lag for n = 5 is floor(4 * 0.05^(2/9)) = floor(2.07) = 2
    assert M.newey_west_variance(d) == M.newey_west_variance(d, lag=2)
    assert M.newey_west_variance(d, lag=50) == M.newey_west_variance(d, lag=4)  # capped at n - 1
    assert np.isnan(M.newey_west_variance(np.array([1.0])))
    with pytest.raises(ValueError, match="non-finite values at positions \\[1\\]"):
        M.newey_west_variance(np.array([1.0, np.nan, 2.0]))


def test_newey_west_variance_matches_statsmodels_hac():
    sm = pytest.importorskip("statsmodels.api")
    x = ar1(0.6, 80, np.random.default_rng(4)) + 0.3
    for lag in (0, 3, 7):
        fit = sm.OLS(x, np.ones(len(x))).fit(cov_type="HAC", cov_kwds={"maxlags": lag, "use_correction": False})
        assert M.newey_west_variance(x, lag) == pytest.approx(fit.bse[0] ** 2, rel=1e-10)


def test_newey_west_tstat_is_mean_over_hac_se():
    d = LOSS_A - LOSS_B
    assert M.newey_west_tstat(d, lag=1) == pytest.approx(0.8 / math.sqrt(0.1664))
    assert np.isnan(M.newey_west_tstat(np.full(4, 0.3)))  # constant series: no variance, no t


# ---------------------------------------------------------------------------- Diebold-Mariano


def test_diebold_mariano_by_hand():
    # V = 0.1664 (see the Newey-West test), DM = 0.8 / sqrt(0.1664) = 1.96116...
    plain = M.diebold_mariano(LOSS_A, LOSS_B, lag=1, hln=False)
    dm = 0.8 / math.sqrt(0.1664)
    assert plain.statistic == pytest.approx(dm) and dm == pytest.approx(1.96116, abs=1e-5)
    assert plain.p_value == pytest.approx(2 * (1 - stats.norm.cdf(dm)))  # = 0.04986, just under 5%
    assert plain.p_value == pytest.approx(0.04986, abs=1e-5)
    assert (plain.mean_diff, plain.n, plain.lag) == (pytest.approx(0.8), 5, 1)
    assert plain.std_error == pytest.approx(math.sqrt(0.1664))
    assert plain.test == "Diebold-Mariano, Newey-West lag 1, normal"
    # HLN with h = lag + 1 = 2: sqrt((n + 1 - 2h + h(h-1)/n) / n) = sqrt((5 + 1 - 4 + 2/5) / 5) = sqrt(0.48)
    hln = M.diebold_mariano(LOSS_A, LOSS_B, lag=1)
    assert hln.statistic == pytest.approx(dm * math.sqrt(0.48))  # = 1.35877
    assert hln.p_value == pytest.approx(2 * stats.t.sf(dm * math.sqrt(0.48), df=4))  # = 0.246: not significant
    assert hln.test == "Diebold-Mariano, Newey-West lag 1, HLN-corrected t(4)"
    # antisymmetric in the order of the pair
    swapped = M.diebold_mariano(LOSS_B, LOSS_A, lag=1)
    assert swapped.statistic == pytest.approx(-hln.statistic) and swapped.p_value == pytest.approx(hln.p_value)


def test_diebold_mariano_degenerate_cases():
    same = M.diebold_mariano(LOSS_A, LOSS_A)
    assert (same.statistic, same.p_value, same.mean_diff) == (0.0, 1.0, 0.0)
    shifted = M.diebold_mariano(LOSS_A + 1.0, LOSS_A)  # constant gap: certain, infinitely significant
    assert shifted.statistic == np.inf and shifted.p_value == 0.0
    assert np.isnan(M.diebold_mariano(LOSS_A[:2], LOSS_B[:2]).p_value)  # too few pairs to test
    with pytest.raises(ValueError, match="pair up"):
        M.diebold_mariano(LOSS_A, LOSS_B[:4])
    with pytest.raises(ValueError, match="too large"):
        M.diebold_mariano(LOSS_A, LOSS_B, lag=4)


def test_autocorrelated_differences_naive_t_test_is_overconfident():
    # One AR(1) series of loss differences with true mean 0 (phi = 0.8, n = 120): the i.i.d. t-test
    # (lag 0, normal) "finds" a difference at p = 0.0006, DM with the HAC variance does not (p = 0.08).
    d = ar1(0.8, 120, np.random.default_rng(8))
    naive = M.diebold_mariano(d, np.zeros_like(d), lag=0, hln=False)
    dm = M.diebold_mariano(d, np.zeros_like(d))
    assert naive.p_value < 0.05 < dm.p_value
    # the HAC variance is larger by about the long-run factor (1 + phi) / (1 - phi) truncated at the lag
    assert abs(naive.statistic) > 1.5 * abs(dm.statistic)

    # Over many such series under H0 the naive test rejects about half the time (nominal 5%). DM with the
    # fixed Newey-West rule (lag 4) still rejects ~20%: the rule is short for phi = 0.8. With the lag the
    # paired comparisons use (at least Andrews' AR(1) plug-in, ~13 here) it comes down to ~12%.
    rng = np.random.default_rng(0)
    rejections = {"naive": 0, "dm": 0, "dm_auto": 0}
    runs = 300
    for _ in range(runs):
        d = ar1(0.8, 120, rng)
        zeros = np.zeros_like(d)
        lag = max(M.newey_west_lag(120), M.andrews_lag(d))
        rejections["naive"] += M.diebold_mariano(d, zeros, lag=0, hln=False).p_value < 0.05
        rejections["dm"] += M.diebold_mariano(d, zeros).p_value < 0.05
        rejections["dm_auto"] += M.diebold_mariano(d, zeros, lag=lag).p_value < 0.05
    rate = {k: v / runs for k, v in rejections.items()}
    assert rate["naive"] > 0.4
    assert rate["dm"] < 0.7 * rate["naive"]
    assert rate["dm_auto"] < 0.17 and rate["dm_auto"] < rate["naive"] / 3


def test_diebold_mariano_keeps_its_size_on_independent_differences():
    rng = np.random.default_rng(1)
    runs = 400
    rejected = sum(M.diebold_mariano(rng.standard_normal(60), np.zeros(60)).p_value < 0.05 for _ in range(runs))
    assert 0.01 < rejected / runs < 0.09


# -------------------------------------------------------------------------- block bootstrap


def test_moving_block_indices_are_runs_of_consecutive_positions():
    idx = M.moving_block_indices(10, 3, 50, np.random.default_rng(0))
    assert idx.shape == (50, 10) and idx.min() >= 0 and idx.max() <= 9
    # blocks start at 0..7 and run 3 positions: within each block of columns the step is exactly 1
    for start in (0, 3, 6):
        block = idx[:, start : start + 3]
        assert (np.diff(block, axis=1) == 1).all()
    with pytest.raises(ValueError, match="block"):
        M.moving_block_indices(4, 5, 1, np.random.default_rng(0))


def test_block_bootstrap_ci_by_hand():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.full(4, 2.0)
    # block 2 on n = 4: two blocks drawn from starts {0, 1, 2}, i.e. from a-blocks (1,2), (2,3), (3,4) with
    # sums 3, 5, 7. The 9 equally likely resamples have mean(a*) = (s1 + s2) / 4 in
    # {1.5, 2, 2.5, 2, 2.5, 3, 2.5, 3, 3.5}, so skill 1 - mean(a*)/2 takes
    # 0.25 (1/9), 0 (2/9), -0.25 (3/9), -0.5 (2/9), -0.75 (1/9); cumulative from below 1/9, 3/9, 6/9, 8/9, 1.
    ci = M.moving_block_bootstrap_ci(a, b, block=2, n_boot=20000, level=0.95, seed=3)
    assert ci.estimate == pytest.approx(1 - 2.5 / 2)  # -0.25 on the original series
    # 2.5% and 97.5% quantiles fall inside the extreme atoms (1/9 > 2.5% each)
    assert (ci.low, ci.high) == (pytest.approx(-0.75), pytest.approx(0.25))
    # 25% lies inside the -0.5 atom (1/9 .. 3/9), 75% inside the 0 atom (6/9 .. 8/9)
    half = M.moving_block_bootstrap_ci(a, b, block=2, n_boot=20000, level=0.5, seed=3)
    assert (half.low, half.high) == (pytest.approx(-0.5), pytest.approx(0.0))
    assert (half.block, half.n_boot, half.level) == (2, 20000, 0.5)
    # the resampled skills take exactly those 5 values at about the stated frequencies
    idx = M.moving_block_indices(4, 2, 20000, np.random.default_rng(3))
    skills = 1 - a[idx].mean(axis=1) / 2
    values, counts = np.unique(skills, return_counts=True)
    np.testing.assert_allclose(values, [-0.75, -0.5, -0.25, 0.0, 0.25])
    np.testing.assert_allclose(counts / 20000, np.array([1, 2, 3, 2, 1]) / 9, atol=0.01)


def test_block_bootstrap_keeps_pairs_and_is_seeded():
    rng = np.random.default_rng(2)
    b = rng.uniform(1, 2, 40)
    # a = 2b on every origin: every paired resample has skill exactly -1 (unpaired resampling would not)
    ci = M.moving_block_bootstrap_ci(2 * b, b, n_boot=500)
    assert (ci.estimate, ci.low, ci.high) == (pytest.approx(-1), pytest.approx(-1), pytest.approx(-1))
    assert ci.block == round(40 ** (1 / 3)) == 3  # default block
    a = b * rng.uniform(0.8, 1.1, 40)
    assert M.moving_block_bootstrap_ci(a, b, seed=5) == M.moving_block_bootstrap_ci(a, b, seed=5)
    whole = M.moving_block_bootstrap_ci(a, b, block=40)  # one block = the series itself
    assert whole.low == pytest.approx(whole.estimate) and whole.high == pytest.approx(whole.estimate)


def test_block_bootstrap_widens_the_interval_for_autocorrelated_losses():
    # losses whose ratio drifts slowly (AR(1), phi = 0.9): i.i.d. resampling (block 1) is too narrow
    rng = np.random.default_rng(8)
    b = np.full(200, 1.0)
    a = 1.0 + 0.05 * ar1(0.9, 200, rng)
    iid = M.moving_block_bootstrap_ci(a, b, block=1, n_boot=2000)
    blocks = M.moving_block_bootstrap_ci(a, b, block=15, n_boot=2000)
    assert (blocks.high - blocks.low) > 2 * (iid.high - iid.low)


# ---------------------------------------------------------------------------- IC t-statistics


def test_ic_tstat_by_hand_one_symbol():
    pred = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    real = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    # centred p = (-2, -1, 0, 1, 2), r = (-1, -2, 1, 0, 2), both with population std sqrt(2)
    # slope of z_r on z_p = sum(p r) / sum(p^2) = 8 / 10 = 0.8 (= the Pearson IC); sum z_p^2 = 5
    # scores z_p (z_r - 0.8 z_p) = p (r - 0.8 p) / 2 = (-0.6, 0.6, 0, -0.4, 0.4)
    # lag 0: V = mean(s^2) / T = (1.04 / 5) / 5 = 0.0416; se = T sqrt(V) / 5 = sqrt(0.0416); t = 0.8 / 0.20396
    out = M.ic_tstats(pred, real, np.array(["a"] * 5), np.arange(5), lag=0)
    assert M.pearson(pred, real) == pytest.approx(0.8)
    assert out["ic_t"] == pytest.approx(0.8 / math.sqrt(0.0416))  # 3.922
    # ranks of these values are the values themselves
    assert out["rank_ic_t"] == pytest.approx(out["ic_t"])
    assert np.isnan(out["xs_ic_t"])  # one symbol: no cross-section


def test_ic_tstats_panel_and_cross_section():
    rng = np.random.default_rng(6)
    symbols = np.repeat(list("abcdefghij"), 50)
    times = np.tile(np.arange(50), 10)
    pred = rng.normal(size=500)
    real = 0.3 * pred + rng.normal(size=500)
    out = M.ic_tstats(pred, real, symbols, times, lag=2)
    per_date = np.array([M.pearson(pred[times == t], real[times == t]) for t in range(50)])
    assert out["xs_ic_t"] == pytest.approx(M.newey_west_tstat(per_date, lag=2))
    assert out["ic_t"] > 2.5 and out["xs_ic_t"] > 2.5  # a real signal is detected
    noise = M.ic_tstats(rng.normal(size=500), real, symbols, times, lag=2)
    assert abs(noise["ic_t"]) < 2.5
    flat = M.ic_tstats(np.zeros(500), real, symbols, times)  # persistence: no IC, no t
    assert np.isnan(flat["ic_t"]) and np.isnan(flat["rank_ic_t"]) and np.isnan(flat["xs_ic_t"])


def test_block_bootstrap_mean_ci_by_hand():
    # the same 4 values in blocks of 2: resampled means (s1 + s2) / 4 in {1.5, 2, 2.5, 2, 2.5, 3, 2.5, 3, 3.5}
    d = np.array([1.0, 2.0, 3.0, 4.0])
    ci = M.moving_block_mean_ci(d, block=2, n_boot=20000, level=0.95, seed=3)
    assert ci.estimate == 2.5
    assert (ci.low, ci.high) == (pytest.approx(1.5), pytest.approx(3.5))
    half = M.moving_block_mean_ci(d, block=2, n_boot=20000, level=0.5, seed=3)
    assert (half.low, half.high) == (pytest.approx(2.0), pytest.approx(3.0))
    # on a longer series: the percentile interval of block-resampled means, drawn with the seeded generator
    x = np.random.default_rng(5).normal(0, 1, 60)
    ci = M.moving_block_mean_ci(x, block=4, n_boot=500, level=0.9, seed=7)
    means = x[M.moving_block_indices(60, 4, 500, np.random.default_rng(7))].mean(axis=1)
    assert (ci.low, ci.high) == tuple(np.quantile(means, [0.05, 0.95]))
    assert ci.low < x.mean() < ci.high


def test_minimum_detectable_difference_is_the_effect_in_units_of_the_difference():
    rng = np.random.default_rng(0)
    a, b = 2 + rng.normal(0, 0.3, 120), np.full(120, 2.0) + rng.normal(0, 0.1, 120)
    mdd = M.minimum_detectable_difference(a - b, lag=3)
    assert mdd == pytest.approx(M.minimum_detectable_effect(a, b, lag=3) * abs(b.mean()), rel=1e-12)
    # by hand without the HLN correction: (z_0.975 + z_0.8) x the HAC standard error of the mean difference
    se = math.sqrt(M.newey_west_variance(a - b, 3))
    assert M.minimum_detectable_difference(a - b, lag=3, hln=False) == pytest.approx(
        (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * se)
    assert math.isnan(M.minimum_detectable_difference(np.array([1.0, 2.0])))
