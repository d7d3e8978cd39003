"""Path calibration (spread / center / conformal) and the naive baseline paths: invariants and recovery."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kronos_kit import metrics as M
from kronos_kit.calibration import (
    IDENTITY,
    PathCalibration,
    apply_path_calibration,
    conformal_quantile,
    fit_path_calibration,
)
from kronos_kit.config import MIN_DECISION_ORIGINS
from kronos_kit.evaluate.baselines import bootstrap_paths, close_path_bars, fit_garch, garch_paths, random_walk_paths

SIGMA = 0.01


def _world(seed: int, n: int = 160, s: int = 32, h: int = 8, width: float = 0.5, drift: float = 0.0):
    """Realized random-walk closes and model paths whose log-return spread is ``width`` x the truth."""
    rng = np.random.default_rng(seed)
    c0 = 100 * np.exp(rng.normal(0, 0.2, n))
    y = c0[:, None] * np.exp(np.cumsum(rng.normal(0, SIGMA, (n, h)), axis=1))
    steps = drift + rng.normal(0, SIGMA * width, (n, s, h))
    close = c0[:, None, None] * np.exp(np.cumsum(steps, axis=2))
    bars = close_path_bars(np.diff(np.log(np.concatenate([c0[:, None, None].repeat(s, 1), close], 2)), axis=2),
                           np.stack([np.full((n, 6), 1.0), np.column_stack([c0] * 4 + [np.full(n, 5.0)] * 2)], 1))
    bars[..., 1] *= 1.004  # an intrabar range, so high / low differ from max / min of open and close
    bars[..., 2] *= 0.996
    return bars, y, c0


def test_two_times_too_narrow_model_gets_k_near_two():
    bars, y, c0 = _world(0, width=0.5)
    fit = fit_path_calibration(bars, y, c0, methods=("none", "spread"))
    assert fit.calibration.method == "spread"
    assert 1.7 < fit.calibration.scale < 2.3 and abs(fit.calibration.power) <= 0.1
    assert fit.after["coverage_80"] > fit.before["coverage_80"] + 0.2
    assert fit.after["close_crps"] < fit.before["close_crps"]


def test_calibrated_model_is_left_alone_and_width_one_keeps_scale_one():
    bars, y, c0 = _world(1, width=1.0)
    fit = fit_path_calibration(bars, y, c0, methods=("none", "spread"))
    assert fit.calibration.method == "none" or 0.85 < fit.calibration.scale < 1.2


def test_center_shrinks_a_spurious_drift_toward_zero():
    bars, y, c0 = _world(2, width=1.0, drift=0.006)  # the model believes in a drift the data lacks
    fit = fit_path_calibration(bars, y, c0, methods=("spread_center",))
    assert fit.calibration.center <= 0.2
    cal = apply_path_calibration(bars, c0, fit.calibration)
    median_before = np.median(np.log(bars[..., 3] / c0[:, None, None]), axis=1)
    median_after = np.median(np.log(cal[..., 3] / c0[:, None, None]), axis=1)
    assert np.abs(median_after).mean() < 0.3 * np.abs(median_before).mean()


def test_conformal_reaches_nominal_coverage_on_fresh_origins():
    bars, y, c0 = _world(3, n=400, width=0.4)
    fit = fit_path_calibration(bars, y, c0, methods=("conformal",))
    fresh, y2, c2 = _world(4, n=400, width=0.4)
    cov = M.interval_coverage(apply_path_calibration(fresh, c2, fit.calibration)[..., 3:4], y2[..., None])
    before = M.interval_coverage(fresh[..., 3:4], y2[..., None])
    assert before[0.8].mean() < 0.5
    assert 0.72 < cov[0.8].mean() < 0.9 and 0.88 < cov[0.95].mean() <= 1.0


def test_candles_stay_valid_and_only_prices_move():
    bars, y, c0 = _world(5, width=0.5)
    for cal in (PathCalibration("spread", scale=3.0, power=0.3), PathCalibration("spread_center", 0.4, -0.2, 0.3),
                fit_path_calibration(bars, y, c0, methods=("conformal",)).calibration):
        out = apply_path_calibration(bars, c0, cal)
        o, h, lo, c = (out[..., i] for i in range(4))
        assert (h >= np.maximum(o, c) - 1e-9).all() and (lo <= np.minimum(o, c) + 1e-9).all()
        assert (out[..., :4] > 0).all()
        np.testing.assert_array_equal(out[..., 4:], bars[..., 4:])  # volume / amount as sampled
        assert not np.allclose(out[..., 3], bars[..., 3])  # the close moved: the calibration was applied


def test_spread_scales_each_paths_deviation_from_the_median():
    bars, _, c0 = _world(6)
    out = apply_path_calibration(bars, c0, PathCalibration("spread", scale=2.0, power=0.0))
    r = np.log(bars[..., 3] / c0[:, None, None])
    r2 = np.log(out[..., 3] / c0[:, None, None])
    m = np.median(r, axis=1, keepdims=True)
    np.testing.assert_allclose(r2 - m, 2.0 * (r - m), atol=1e-12)
    np.testing.assert_array_equal(apply_path_calibration(bars, c0, IDENTITY), bars)


def test_json_round_trip_and_errors_name_the_field():
    bars, y, c0 = _world(8, width=0.5)
    for method in ("spread", "spread_center", "conformal"):
        cal = fit_path_calibration(bars, y, c0, methods=(method,)).calibration
        back = PathCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
        np.testing.assert_allclose(apply_path_calibration(bars, c0, back), apply_path_calibration(bars, c0, cal))
    with pytest.raises(ValueError, match="center"):
        PathCalibration.from_dict({"method": "spread_center", "center": 1.5}, where="run/calibration.json")
    with pytest.raises(ValueError, match="unknown path-calibration field"):
        PathCalibration.from_dict({"method": "spread", "k": 2})
    with pytest.raises(ValueError, match="method"):
        PathCalibration.from_dict({"method": "magic"})


def test_too_few_origins_or_paths_leave_the_paths_as_sampled():
    bars, y, c0 = _world(9, n=3)
    fit = fit_path_calibration(bars, y, c0)
    assert fit.calibration == IDENTITY and f"needs >= {MIN_DECISION_ORIGINS} validation origins" in fit.rule
    # nine origins are still too few to decide on (the promotion rule's minimum too)
    bars9, y9, c09 = _world(9, n=MIN_DECISION_ORIGINS - 1)
    assert fit_path_calibration(bars9, y9, c09).calibration == IDENTITY
    assert fit_path_calibration(bars[:, :1], y, c0).calibration == IDENTITY


def test_conformal_quantile_has_the_finite_sample_rank():
    scores = np.arange(1.0, 20.0)  # n = 19: the 0.9 quantile is the ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(scores, 0.9) == 18.0
    assert conformal_quantile(scores, 0.1) == 2.0  # floor(20 * 0.1) = 2nd smallest
    assert conformal_quantile(scores, 0.999) == 19.0  # clipped to n


def test_minimum_detectable_effect_shrinks_with_origins_and_matches_power():
    rng = np.random.default_rng(0)
    small = M.minimum_detectable_effect(1 + rng.normal(0, 0.1, 50), np.ones(50), lag=0, hln=False)
    large = M.minimum_detectable_effect(1 + rng.normal(0, 0.1, 800), np.ones(800), lag=0, hln=False)
    assert large < small / 3  # ~1/sqrt(n)
    # at the MDE the DM test rejects in about 80% of fresh samples with the same variance
    n, sd = 100, 0.1
    e = rng.normal(0, 1, n)
    mde = M.minimum_detectable_effect(1 + sd * (e - e.mean()) / e.std(), np.ones(n), lag=0)  # observed sd = sd
    hits = [M.diebold_mariano(1 + mde + rng.normal(0, sd, n), np.ones(n), lag=0).p_value < 0.05 for _ in range(400)]
    assert 0.7 < np.mean(hits) < 0.9


def _history(seed: int, n: int = 30, length: int = 120, sigma: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    close = 50 * np.exp(np.cumsum(rng.normal(0, sigma, (n, length)), axis=1))
    hist = np.repeat(close[..., None], 6, axis=-1)
    hist[..., 4:] = 3.0
    return hist


def test_baseline_paths_have_the_historys_volatility_and_no_drift():
    hist = _history(0)
    rng = np.random.default_rng(1)
    fits = [fit_garch(hist[i, :, 3]) for i in range(len(hist))]
    for paths in (random_walk_paths(hist, 10, 64, rng), bootstrap_paths(hist, 10, 64, rng),
                  garch_paths(fits, hist, 10, 64, rng)):
        r = np.log(paths[..., 3] / hist[:, -1, None, None, 3])
        assert paths.shape == (30, 64, 10, 6)
        assert 0.017 < r[..., 0].std() < 0.023 and 0.017 * np.sqrt(10) < r[..., -1].std() < 0.023 * np.sqrt(10)
        assert abs(r[..., -1].mean()) < 0.01
        assert (paths[..., 1] >= np.maximum(paths[..., 0], paths[..., 3])).all()
        assert (paths[..., 4:] == 3.0).all()


def test_garch_paths_follow_a_volatility_shock():
    hist = _history(2, n=1, length=400)
    fit = fit_garch(hist[0, :, 3])
    calm = garch_paths([fit], hist, 20, 4000, np.random.default_rng(0))
    shocked = type(fit)(fit.omega, 0.1, 0.85, 25 * fit.next_var)
    hot = garch_paths([shocked], hist, 20, 4000, np.random.default_rng(0))
    first = lambda p: np.log(p[0, :, 0, 3] / hist[0, -1, 3]).std()  # noqa: E731
    assert first(hot) > 4 * first(calm)
    assert fit_garch(np.full(50, 10.0)).fallback == "flat history"
