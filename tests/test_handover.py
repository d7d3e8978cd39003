"""The handed-over forecast: ensembles of the model with naive forecasts, tails, and what a run hands over."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kronos_kit import metrics as M
from kronos_kit.calibration import (
    Ensemble,
    Handover,
    TailCalibration,
    apply_path_calibration,
    apply_tails,
    fit_ensemble,
    fit_handover,
    fit_path_calibration,
    slot_counts,
)
from kronos_kit.calibration.ensemble import CloseMembers
from kronos_kit.config import EvalConfig
from kronos_kit.evaluate import HANDED_OVER, calibrate_forecasts, handover_line, walk_forward
from kronos_kit.naive import NAIVE_PATHS, close_path_bars, naive_paths

SIGMA = 0.01
NAMES = ["model", "garch_rw", "bootstrap", "random_walk"]


def _truth(seed: int, n: int, h: int = 8, df: float | None = None):
    """Origins' last closes and realized closes whose log-return at step k has scale SIGMA sqrt(k):
    Gaussian, or Student-t with ``df`` degrees of freedom (unit variance)."""
    rng = np.random.default_rng(seed)
    c0 = 100 * np.exp(rng.normal(0, 0.2, n))
    scale = SIGMA * np.sqrt(np.arange(1, h + 1))
    e = rng.standard_normal((n, h)) if df is None else rng.standard_t(df, (n, h)) / np.sqrt(df / (df - 2))
    return rng, c0, c0[:, None] * np.exp(scale * e)


def _paths(rng, c0, h: int = 8, s: int = 32, width: float = 1.0, bias: float = 0.0, volume: float = 5.0):
    """Random-walk bar paths (N, S, H, 6) from each c0 with log-return scale width * SIGMA sqrt(k), plus ``bias``."""
    n = len(c0)
    steps = rng.normal(bias / h, width * SIGMA, (n, s, h))
    hist = np.stack([np.full((n, 6), 1.0), np.column_stack([c0] * 4 + [np.full(n, volume)] * 2)], 1)
    bars = close_path_bars(steps, hist)
    bars[..., 1] *= 1.003  # an intrabar range, so high / low differ from max / min of open and close
    bars[..., 2] *= 0.997
    return bars


def _valid_candles(paths: np.ndarray) -> bool:
    o, hi, lo, c = (paths[..., i] for i in range(4))
    return bool((hi >= np.maximum(o, c) - 1e-9).all() and (lo <= np.minimum(o, c) + 1e-9).all()
                and (paths[..., :4] > 0).all() and np.isfinite(paths).all())


# ------------------------------------------------------------------------------------------- the ensemble


@pytest.mark.parametrize("method", ["linear_pool", "quantile_average"])
def test_a_perfect_spread_model_with_a_useless_member_keeps_its_weight(method):
    rng, c0, y = _truth(0, 200)
    model = _paths(rng, c0)  # the truth's own distribution
    useless = _paths(rng, c0, width=4.0, bias=0.05)  # four times too wide and drifting
    members = CloseMembers([model[..., 3], useless[..., 3]], y)
    fit = fit_ensemble(method, members, np.arange(200), c0, ["model", "garch_rw"])
    assert fit.model_weight >= 0.9, fit
    # and the other way round: a useless model next to a perfect naive member gives the naive member the weight
    swapped = fit_ensemble(method, CloseMembers([useless[..., 3], model[..., 3]], y), np.arange(200), c0,
                           ["model", "garch_rw"])
    assert swapped.model_weight <= 0.1, swapped


@pytest.mark.parametrize("method", ["linear_pool", "quantile_average"])
def test_a_model_that_is_a_copy_of_a_member_gets_a_split_weight_and_the_same_crps(method):
    rng, c0, y = _truth(1, 120)
    garch = _paths(rng, c0, width=1.3)
    fit = fit_ensemble(method, CloseMembers([garch[..., 3], garch[..., 3]], y), np.arange(120), c0,
                       ["model", "garch_rw"])
    assert fit.weights == [0.5, 0.5]
    combined = fit.combine(garch, {"garch_rw": garch}, c0)
    np.testing.assert_allclose(M.fair_crps(combined[..., 3], y).mean(), M.fair_crps(garch[..., 3], y).mean(),
                               rtol=1e-12)


def test_the_linear_pool_score_is_the_expected_fair_crps_of_the_paths_it_hands_over():
    rng, c0, y = _truth(2, 40)
    stack = [_paths(rng, c0, width=w) for w in (0.5, 1.0, 2.0)]
    members = CloseMembers([p[..., 3] for p in stack], y)
    counts = np.array([[10, 12, 10], [0, 5, 27]])
    predicted = members.pool_scores(counts, np.arange(40))
    for row, score in zip(counts, predicted):
        pool = Ensemble("linear_pool", ["model", "garch_rw", "bootstrap"], list(row / 32))
        # which of its paths a member gives is arbitrary: over every order of the paths, the pool's fair CRPS
        # averages to the score the fit minimizes
        draws = []
        for _ in range(1500):
            order = rng.permutation(32)
            paths = pool.combine(stack[0][:, order], {"garch_rw": stack[1][:, order], "bootstrap": stack[2][:, order]},
                                 c0)
            draws.append(M.fair_crps(paths[..., 3], y).mean())
        assert abs(np.mean(draws) - score) < 4 * np.std(draws) / np.sqrt(len(draws))
    assert predicted[0] < predicted[1]  # the narrow members beat the wide one here, as the realized scores do


@pytest.mark.parametrize("method", ["linear_pool", "quantile_average"])
def test_combinations_keep_valid_candles_and_take_volume_from_the_model(method):
    rng, c0, _ = _truth(3, 30)
    model = _paths(rng, c0, width=0.7, volume=7.0)
    model[..., 4] = rng.uniform(1, 9, model.shape[:3])  # a volume per path: the rule must keep the model's
    members = {"garch_rw": _paths(rng, c0, width=1.5), "bootstrap": _paths(rng, c0, width=1.0)}
    ensemble = Ensemble(method, ["model", "garch_rw", "bootstrap"], [0.375, 0.375, 0.25])
    out = ensemble.combine(model, members, c0)
    assert out.shape == model.shape and _valid_candles(out)
    np.testing.assert_array_equal(out[..., 4:], model[..., 4:])
    assert not np.allclose(out[..., 3], model[..., 3])
    if method == "linear_pool":  # every path is a member's own path: 12 of the model, 12 of garch_rw, 8 of bootstrap
        np.testing.assert_array_equal(out[:, :12, :, :4], model[:, :12, :, :4])
        np.testing.assert_array_equal(out[:, 12:24, :, :4], members["garch_rw"][:, 12:24, :, :4])
    else:  # the combined quantiles are the weighted average of the members' log-return quantiles
        logs = [np.sort(np.log(p[..., 3] / c0[:, None, None]), axis=1) for p in (model, *members.values())]
        expected = sum(w * r for w, r in zip(ensemble.weights, logs))
        np.testing.assert_allclose(np.sort(np.log(out[..., 3] / c0[:, None, None]), axis=1), expected, atol=1e-12)
    assert list(slot_counts([0.3, 0.3, 0.4], 32)) == [10, 9, 13]  # largest remainder, ties to the earlier


# ------------------------------------------------------------------------------------------------ tails


def _tails_world(seed: int, n: int):
    rng, c0, y = _truth(seed, n, df=3)
    return c0, y, _paths(rng, c0, width=0.6)  # Gaussian paths, too narrow, of a Student-t(3) process


def test_student_t_tails_reach_95_coverage_on_fresh_draws():
    c0, y, paths = _tails_world(4, 400)
    path_fit = fit_path_calibration(paths, y, c0)
    fit = fit_handover(paths, {}, y, c0, path_fit=path_fit, methods=(), tails=True)
    assert fit.handover.ensemble.method == "model" and fit.tails["kept"]
    assert fit.handover.tails.tail > 1.3  # fat tails: what lies beyond the 80% ends is stretched
    c2, y2, fresh = _tails_world(5, 2000)
    body = apply_path_calibration(fresh, c2, path_fit.calibration)
    handed = fit.handover.apply(body, c2, {})
    cov_body = M.interval_coverage(body[..., 3:4], y2[..., None])
    cov = M.interval_coverage(handed[..., 3:4], y2[..., None])
    assert cov_body[0.95].mean() < 0.92  # the CRPS-fitted body alone is short in the tails ...
    assert 0.93 <= cov[0.95].mean() <= 0.97 and 0.76 <= cov[0.8].mean() <= 0.84  # ... the tails hold
    # without giving up the CRPS the body calibration bought
    assert M.fair_crps(handed[..., 3], y2).mean() <= 1.01 * M.fair_crps(body[..., 3], y2).mean()
    assert fit.after["coverage_95"] > fit.before["coverage_95"]  # the held-out validation evidence says so too


def test_tails_keep_candles_and_the_median_and_one_is_the_identity():
    c0, y, paths = _tails_world(6, 40)
    for tails in (TailCalibration(body=0.8, tail=3.0), TailCalibration(body=1.25, tail=0.6)):
        out = apply_tails(paths, c0, tails)
        assert _valid_candles(out) and not np.allclose(out[..., 3], paths[..., 3])
        np.testing.assert_array_equal(out[..., 4:], paths[..., 4:])
    # the pivot is the median: it stays where it was (in log-returns; S is even, so it is the mid of two paths)
    same = apply_tails(paths, c0, TailCalibration(body=1.25, tail=3.0))
    log_median = lambda x: np.median(np.log(x[..., 3] / c0[:, None, None]), axis=1)  # noqa: E731
    np.testing.assert_allclose(log_median(same), log_median(paths), atol=1e-12)
    np.testing.assert_array_equal(apply_tails(paths, c0, TailCalibration()), paths)


# ----------------------------------------------------------------------------- fitted on validation only


def _regime_frame(seed: int = 0) -> pd.DataFrame:
    """One daily random walk with 1% vol: train and validation up to row 600, the test split after."""
    rng = np.random.default_rng(seed)
    n = 700
    close = 50 * np.exp(np.cumsum(0.01 * rng.standard_normal(n)))
    opens = np.concatenate([[50.0], close[:-1]])
    return pd.DataFrame({"symbol": "X", "timestamps": pd.bdate_range("2020-01-01", periods=n), "open": opens,
                         "high": np.maximum(opens, close) * 1.002, "low": np.minimum(opens, close) * 0.998,
                         "close": close, "volume": 1e5, "amount": 1e5 * close})


FRAME = _regime_frame()
SWITCH = FRAME["timestamps"].iloc[600]  # where the model stops knowing anything


def informed_until_switch(histories, hist_stamps, future_stamps, pred_len, sample_count):
    """A forecaster that sees the realized moves before SWITCH, up to noise, with a spread off by up to 3x (the
    validation split: worth most of the weight, not all) and knows nothing after it (a spread off by up to 30x
    either way: the test split)."""
    rng = np.random.default_rng(len(histories) + pd.Timestamp(future_stamps[0].iloc[0]).value % 1000)
    hist = np.stack([h.to_numpy(np.float64) for h in histories])
    close = FRAME.set_index("timestamps")["close"]
    steps = np.empty((len(histories), sample_count, pred_len))
    for i, (h, future) in enumerate(zip(histories, future_stamps)):
        if pd.Timestamp(future.iloc[-1]) < SWITCH:
            moves = np.diff(np.log(np.r_[h["close"].iloc[-1], close.loc[pd.DatetimeIndex(future)].to_numpy()]))
            steps[i] = (moves + 0.007 * rng.standard_normal(pred_len))[None] + 0.01 * 3.0 ** rng.uniform(-1, 1) \
                * rng.standard_normal((sample_count, pred_len))
        else:  # no spread calibration can fix a spread whose error differs from origin to origin
            steps[i] = 0.01 * 30.0 ** rng.uniform(-1, 1) * rng.standard_normal((sample_count, pred_len))
    return close_path_bars(steps, hist)


def test_the_handover_is_fitted_on_validation_and_the_test_evaluation_applies_it():
    val, test = FRAME.iloc[420:600], FRAME.iloc[540:]  # test's first 60 rows are history only
    test = test.assign(is_context=np.arange(len(test)) < 60)
    e = EvalConfig(stride=1, pred_len=5, sample_count=32, max_origins=80, val_origins=80)
    kwargs = dict(lookback=60, pred_len=5, stride=1, sample_count=32, max_origins=80, seed=0, progress=False)
    models = {"base": informed_until_switch, "finetuned": informed_until_switch}
    on_val = walk_forward(val, models, baselines=(), **kwargs)
    cal = calibrate_forecasts(on_val, val, dict.fromkeys(models), e, lookback=60, promoted="finetuned")
    handover = Handover.from_dict(cal.handover_choice())
    assert [c["method"] for c in cal.handover["candidates"]] == [
        "model", "linear_pool", "quantile_average", "garch_rw alone", "bootstrap alone", "random_walk alone"]
    assert handover.ensemble.method != "model" and 0.6 <= handover.ensemble.model_weight < 1  # a real mixture
    # what a fit on the test split would say: the model is useless there (so this test can tell the two apart)
    on_test = walk_forward(test, models, **kwargs)
    leaked = fit_handover(on_test.samples["finetuned"], {m: on_test.samples[m] for m in e.ensemble_members},
                          on_test.realized, on_test.last_close,
                          path_fit=fit_path_calibration(on_test.samples["finetuned"], on_test.realized,
                                                        on_test.last_close), methods=e.ensemble_methods)
    assert leaked.handover.ensemble.model_weight <= 0.2
    # the test evaluation hands over exactly the validation fit, applied to the test paths
    from kronos_kit.calibration import PathCalibration

    on_test.calibrate({"finetuned": PathCalibration.from_dict(cal.path_calibration("finetuned"))})
    on_test.hand_over(handover, "finetuned")
    expected = handover.apply(on_test.samples["finetuned"], on_test.last_close,
                              {m: on_test.samples[m] for m in handover.ensemble.naive_members})
    np.testing.assert_array_equal(on_test.samples[HANDED_OVER], expected)
    assert list(on_test.kinds)[:3] == ["base", "finetuned", HANDED_OVER]


def test_naive_members_at_forecast_time_are_drawn_as_the_walk_forward_draws_them():
    frame = _regime_frame(1).iloc[:200]
    result = walk_forward(frame, {"m": informed_until_switch}, lookback=60, pred_len=4, stride=7, sample_count=8,
                          seed=3, progress=False)
    drawn = naive_paths(NAIVE_PATHS, result.history, 4, 8, np.random.default_rng(3))
    for name in NAIVE_PATHS:
        np.testing.assert_array_equal(drawn[name], result.samples[name])
    # a handover draws only the members it weights, from the history, seeded: reproducible
    handover = Handover(Ensemble("linear_pool", NAMES, [0.5, 0.5, 0.0, 0.0]))
    model = result.samples["m"][:1]
    a = handover.forecast(model, result.history[:1], seed=11)
    b = handover.forecast(model, result.history[:1], seed=11)
    np.testing.assert_array_equal(a, b)
    garch = naive_paths(("garch_rw",), result.history[:1], 4, 8, np.random.default_rng(11))["garch_rw"]
    np.testing.assert_array_equal(a[:, 4:, :, :4], garch[:, 4:, :, :4])


# ---------------------------------------------------------------------------------- plain JSON, refusals


def test_handover_json_round_trip_and_bad_values_name_the_field():
    handover = Handover(Ensemble("quantile_average", NAMES, [0.4, 0.3, 0.2, 0.1]),
                        TailCalibration(1.05, 2.0))
    assert Handover.from_dict(json.loads(json.dumps(handover.to_dict()))) == handover
    assert Handover.from_dict({}) == Handover()
    bad = {
        "weights sum": ({"ensemble": {"method": "linear_pool", "members": NAMES[:2], "weights": [0.7, 0.7]}},
                        "weights"),
        "weight negative": ({"ensemble": {"method": "linear_pool", "members": NAMES[:2], "weights": [1.5, -0.5]}},
                            "weights"),
        "weight nan": ({"ensemble": {"method": "linear_pool", "members": NAMES[:2], "weights": [float("nan"), 1]}},
                       "weights"),
        "member unknown": ({"ensemble": {"method": "linear_pool", "members": ["model", "oracle"],
                                         "weights": [0.5, 0.5]}}, "members"),
        "method unknown": ({"ensemble": {"method": "stacking"}}, "method"),
        "tail 1e300": ({"tails": {"tail": 1e300}}, "'tail'"),
        "body 0": ({"tails": {"body": 0.0}}, "'body'"),
        "field unknown": ({"tails": {"k": 2}}, "unknown tail field"),
    }
    for case, (data, words) in bad.items():
        with pytest.raises(ValueError, match=words) as err:
            Handover.from_dict(data, where="run/calibration.json")
        assert "run/calibration.json" in str(err.value), case


# ------------------------------------------------------------------------------ the sentence on the test split


def _rows(verdict: str, change_pct: float, p: float) -> pd.DataFrame:
    base = {"model": HANDED_OVER, "metric": "close_crps", "mde": 0.04, "p_value": p, "verdict": verdict}
    return pd.DataFrame([{**base, "other": "garch_rw", "other_mean": 1.0, "change_pct": change_pct},
                         {**base, "other": "bootstrap", "other_mean": 1.1, "change_pct": -12.0}])


def test_the_handover_line_says_whether_the_model_adds_anything():
    record = {"model": "finetuned", "describe": "linear pool: 20% finetuned, 80% garch_rw",
              "ensemble": {"members": ["model", "garch_rw"], "weights": [0.2, 0.8]}}
    text = handover_line(_rows("better", -3.0, 0.01), record)
    assert "the model adds 3.0% over garch_rw" in text and "p = 0.01" in text and "weight is 20%" in text
    text = handover_line(_rows("no detectable difference", 1.5, 0.4), record, {"coverage_80": 0.79,
                                                                                "coverage_95": 0.94})
    assert "adds nothing detectable over garch_rw" in text and "1.5% higher" in text
    assert "80% naive (80% garch_rw), 20% finetuned" in text and "4.0% or more" in text and "0.79 / 0.94" in text
    text = handover_line(_rows("worse", 6.0, 0.001), record)
    assert "garch_rw is better: its close CRPS is 6.0% lower" in text
    zero = {**record, "ensemble": {"members": ["model", "garch_rw"], "weights": [0.0, 1.0]}}
    text = handover_line(_rows("better", -3.0, 0.01), zero)
    assert "validation gave it weight 0" in text and "100% naive (100% garch_rw)" in text
    assert "3.0% lower than garch_rw's, the best naive forecast on test (significantly, DM p = 0.01" in text



def test_the_handover_line_says_when_the_test_finds_the_model_alone_better():
    """The walk's run: validation gave the model weight 0 and the bottom line said "the model adds nothing", while
    its own test found the handed-over forecast significantly worse than the model alone (3.5%, p = 0.016)."""
    zero = {"model": "finetuned", "describe": "garch_rw alone: finetuned has weight 0",
            "ensemble": {"members": ["model", "garch_rw"], "weights": [0.0, 1.0]}}
    vs_model = {"model": HANDED_OVER, "metric": "close_crps", "mde": 0.04, "other": "finetuned", "other_mean": 0.9}
    worse = pd.concat([_rows("no detectable difference", 2.8, 0.07),
                       pd.DataFrame([{**vs_model, "p_value": 0.0158, "verdict": "worse", "change_pct": 3.52}])])
    text = handover_line(worse, zero)
    assert "On test the handed-over forecast's close CRPS is 3.5% higher than finetuned alone's (significantly, " \
        "DM p = 0.0158): validation's choice did not hold on test" in text and "--model-only" in text
    same = pd.concat([_rows("no detectable difference", 2.8, 0.07),
                      pd.DataFrame([{**vs_model, "p_value": 0.3, "verdict": "no detectable difference",
                                     "change_pct": 1.0}])])
    assert "did not hold" not in handover_line(same, zero)


def test_the_point_forecast_of_a_hand_over_without_the_model_is_not_called_a_combination():
    """`forecast --run` said "the median of the handed-over paths (the model's combined with random_walk)" for a
    hand-over in which the model has weight 0."""
    from kronos_kit.calibration import PathCalibration, describe_point_forecast

    fit = PathCalibration.from_dict({"method": "spread", "scale": 1.5, "power": 0.0, "center": 1.0, "conformal": {}},
                                    where="test")
    alone = Handover(Ensemble("linear_pool", ["model", "garch_rw", "random_walk"], [0.0, 0.0, 1.0]))
    text = describe_point_forecast(fit, alone)
    assert "the naive forecasts alone (random_walk; the model has weight 0)" in text and "combined" not in text
    pooled = Handover(Ensemble("linear_pool", ["model", "random_walk"], [0.5, 0.5]))
    assert "(the model's combined with random_walk)" in describe_point_forecast(fit, pooled)


def test_how_far_to_trust_a_handed_over_forecast_names_the_model_alone_and_every_test(tmp_path):
    """The trust lines of `forecast --run`: the hand-over against the model alone (what --model-only writes) with its
    paired test, and the MAE line says whether a paired test stands behind it (it printed a bare "3.8% higher")."""
    from kronos_kit.evaluate.evidence import test_evidence
    from kronos_kit.runs import save_json

    row = {"model": HANDED_OVER, "metric": "close_crps"}
    save_json(tmp_path / "metrics.json", {
        "n_origins": 200, "bottom_line": "...", "config": {"handed_over": {"model": "finetuned"}},
        "table": {"finetuned": {"close_crps": 80.79, "close_mae": 110.0, "coverage_80": 0.73},
                  "handed_over": {"close_crps": 83.63, "close_mae": 115.3, "coverage_80": 0.75},
                  "persistence": {"close_crps": 111.1, "close_mae": 111.1}, "bootstrap": {"close_crps": 81.32}},
        "paired_comparisons": [{"model": "finetuned", "other": "persistence", "metric": "close_ae",
                                "verdict": "no detectable difference"}],
        "handover_comparisons": [{**row, "other": "bootstrap", "verdict": "no detectable difference"},
                                 {**row, "other": "finetuned", "verdict": "worse"}]})
    handed = "\n".join(test_evidence(tmp_path, HANDED_OVER).lines())
    assert "close CRPS vs finetuned alone (what --model-only writes): 3.5% higher, worse in the run's paired test" \
        in handed
    assert "close MAE vs persistence (no change): 3.8% higher, untested" in handed
    model = "\n".join(test_evidence(tmp_path, "finetuned").lines())
    assert "alone" not in model
    assert "close MAE vs persistence (no change): 1.0% lower, no detectable difference in the run's paired test" \
        in model


def test_plot_handover_shows_the_weights_and_the_coverage_before_and_after():
    from matplotlib.figure import Figure

    from kronos_kit.plots import plot_handover

    frame = _regime_frame(2).iloc[:260]
    result = walk_forward(frame, {"finetuned": informed_until_switch}, lookback=60, pred_len=4, stride=3,
                          sample_count=8, seed=0, progress=False)
    handover = Handover(Ensemble("linear_pool", NAMES, [0.25, 0.75, 0.0, 0.0]))
    result.hand_over(handover, "finetuned")
    fit = {"handover": handover.to_dict(), "before": {"coverage_50": 0.4, "coverage_80": 0.7, "coverage_95": 0.85},
           "after": {"coverage_50": 0.5, "coverage_80": 0.8, "coverage_95": 0.95}}
    fig = plot_handover(fit, result)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    weights, coverage = fig.axes
    assert sorted(round(p.get_width(), 6) for p in weights.patches) == [0.0, 0.0, 0.25, 0.75]
    assert [t.get_text() for t in weights.get_yticklabels()][-1] == "model (finetuned)"
    labels = [t.get_text() for t in coverage.get_legend().get_texts()]
    assert labels == ["model alone (validation, held out)", "handed over (validation, held out)",
                      "finetuned (test)", "handed over (test)"]
    assert [round(p.get_height(), 6) for p in coverage.patches[3:6]] == [0.5, 0.8, 0.95]  # the validation "after"
