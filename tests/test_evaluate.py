"""Forecast evaluation: metrics against hand-computed values, baselines, walk-forward, report, plots."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FIXTURES

from kronos_kit import metrics as M
from kronos_kit.evaluate import (
    HEADLINE,
    drift_paths,
    evaluate_models,
    forecast_origins,
    garch_vol,
    persistence_paths,
    token_metrics,
    walk_forward,
    write_report,
)
from kronos_kit.model import Kronos

DATA = Path(__file__).parent / "data" / "ashare_5min_sample.csv"
FEATS = ["open", "high", "low", "close", "volume", "amount"]


# ------------------------------------------------------------------------------------ helpers


def synthetic_frame(symbols=("X", "Y"), n=300, seed=0, flat=()) -> pd.DataFrame:
    """Geometric random walks on a shared 5-minute calendar; symbols in ``flat`` never move."""
    rng = np.random.default_rng(seed)
    stamps = pd.date_range("2024-01-02 09:30", periods=n, freq="5min")
    parts = []
    for k, sym in enumerate(symbols):
        steps = np.zeros(n) if sym in flat else rng.normal(0, 0.002, n)
        close = (10 + k) * np.exp(np.cumsum(steps))
        opens = np.r_[close[0], close[:-1]]
        vol = rng.integers(100, 1000, n).astype(float)
        parts.append(pd.DataFrame({
            "symbol": sym, "timestamps": stamps, "open": opens, "high": np.maximum(opens, close) * 1.001,
            "low": np.minimum(opens, close) * 0.999, "close": close, "volume": vol, "amount": vol * close,
        }))
    return pd.concat(parts, ignore_index=True)


def ashare_frame() -> pd.DataFrame:
    df = pd.read_csv(DATA)
    df["symbol"] = "A"
    return df


def oracle(frame: pd.DataFrame, noise: float = 0.0, seed: int = 0):
    """A ForecastFn that looks the future up (perfect when noise=0); multiplicative noise otherwise."""
    by_symbol = {s: g.set_index(pd.to_datetime(g["timestamps"]))[FEATS] for s, g in frame.groupby("symbol")}
    rng = np.random.default_rng(seed)

    def fn(histories, hist_stamps, future_stamps, pred_len, sample_count):
        out = np.stack([by_symbol[h.attrs["symbol"]].loc[pd.DatetimeIndex(f)].to_numpy()
                        for h, f in zip(histories, future_stamps)])
        paths = np.repeat(out[:, None], sample_count, axis=1)
        return paths * np.exp(noise * rng.standard_normal(paths.shape)) if noise else paths

    return fn


def random_walk(seed: int, scale: float = 1.0):
    """Seeded random-walk ForecastFn with the history's log-return std times ``scale``."""
    rng = np.random.default_rng(seed)

    def fn(histories, hist_stamps, future_stamps, pred_len, sample_count):
        out = []
        for h in histories:
            close = h["close"].to_numpy()
            sigma = np.diff(np.log(close)).std() * scale
            path = close[-1] * np.exp(np.cumsum(rng.normal(0, sigma, (sample_count, pred_len)), axis=1))
            p = np.empty((sample_count, pred_len, 6))
            p[..., :4] = path[..., None]
            p[..., 4:] = h[["volume", "amount"]].to_numpy()[-1]
            out.append(p)
        return np.stack(out)

    return fn


# ------------------------------------------------------------------------------ point metrics


def test_crps_of_point_mass_is_absolute_error():
    y = np.array([1.0, -2.0, 5.5])
    x = np.array([3.0, -2.5, 5.5])
    np.testing.assert_allclose(M.crps(x[:, None], y, axis=1), np.abs(x - y))


def test_crps_two_sample_ensemble_by_hand():
    # ensemble {0, 2}: E|X-y| - 1/2 E|X-X'| with E|X-X'| = (0 + 2 + 2 + 0) / 4 = 1
    ens = np.array([[0.0, 2.0]] * 3)
    y = np.array([0.0, 1.0, 3.0])
    np.testing.assert_allclose(M.crps(ens, y, axis=1), [1 - 0.5, 1 - 0.5, 2 - 0.5])


def test_crps_sorting_estimator_equals_pairwise_and_integral():
    rng = np.random.default_rng(3)
    ens = rng.normal(size=(4, 7))
    y = rng.normal(size=4)
    pairwise = np.abs(ens - y[:, None]).mean(1) - 0.5 * np.abs(ens[:, :, None] - ens[:, None, :]).mean((1, 2))
    np.testing.assert_allclose(M.crps(ens, y, axis=1), pairwise, rtol=1e-12)
    # and it is the integral of (F_ens(z) - 1{z >= y})^2 for the empirical CDF
    grid = np.linspace(-8, 8, 400_001)
    for k in range(4):
        F = (ens[k][:, None] <= grid).mean(0)
        integral = np.trapezoid((F - (grid >= y[k])) ** 2, grid)
        assert M.crps(ens[k : k + 1], y[k : k + 1], axis=1)[0] == pytest.approx(integral, abs=1e-4)


def test_mase_by_hand_and_season():
    history = np.array([1.0, 2.0, 4.0, 7.0])[None, :, None]
    # season 1: in-sample naive errors 1, 2, 3 -> scale 2; forecast 5 vs 8 -> |e| 3 -> MASE 1.5
    errs = M.point_errors(np.array([[[5.0]]]), np.array([[[8.0]]]), history, season=1)
    assert errs["mase"][0] == pytest.approx(1.5)
    assert errs["mae"][0] == 3 and errs["rmse"][0] == 3
    assert errs["mape"][0] == pytest.approx(100 * 3 / 8)
    # season 2: x_t - x_{t-2} = 3, 5 -> scale 4
    assert M.point_errors(np.array([[[5.0]]]), np.array([[[8.0]]]), history, season=2)["mase"][0] == 0.75


def test_mape_skips_zero_targets():
    history = np.array([1.0, 2.0, 3.0])[None, :, None]
    errs = M.point_errors(np.array([[[1.0], [3.0]]]), np.array([[[0.0], [2.0]]]), history)
    assert errs["mape"][0] == pytest.approx(50.0)
    assert np.isnan(errs["mape_by_step"][0, 0])


def test_weighted_quantile_loss_by_hand():
    # point forecasts (every quantile = the point): y = (3, -1), yhat = (2, 1)
    # rho_q(1) = q, rho_q(-2) = 2 (1 - q) -> sum 2 - q; WQL_q = 2 (2 - q) / (3 + 1); mean over q -> 0.75
    samples = np.array([[[[2.0]]], [[[1.0]]]])  # (N=2, S=1, H=1, C=1)
    realized = np.array([[[3.0]], [[-1.0]]])
    assert M.weighted_quantile_loss(samples, realized)[0] == pytest.approx(0.75)
    assert M.weighted_quantile_loss(samples, realized, quantiles=(0.5,))[0] == pytest.approx(0.75)
    assert M.weighted_quantile_loss(samples, realized, quantiles=(0.1,))[0] == pytest.approx(2 * 1.9 / 4)


def test_coverage_and_pit_by_hand():
    samples = np.arange(1.0, 11.0)[None, :, None, None]  # 1..10
    realized = np.array([[[5.0]]])
    cov = M.interval_coverage(samples, realized, levels=(0.1, 0.8))
    # 10% interval: quantiles 0.45/0.55 -> 5.05..5.95 misses 5; 80%: 1.9..9.1 covers it
    assert cov[0.1][0, 0] == 0 and cov[0.8][0, 0] == 1
    assert M.pit_values(samples, realized)[0, 0, 0] == pytest.approx(0.5)
    # randomised PIT for a tie lies in [F(y-), F(y)] = [0.4, 0.5]
    pit = M.pit_values(samples, realized, randomize=True, rng=np.random.default_rng(1))[0, 0, 0]
    assert 0.4 <= pit <= 0.5
    np.testing.assert_allclose(M.pit_histogram(np.array([0.05, 0.15, 0.16, 0.95]), bins=10),
                               [0.25, 0.5, 0, 0, 0, 0, 0, 0, 0, 0.25])


def test_calibrated_forecast_covers_at_nominal_rate_on_any_layout():
    rng = np.random.default_rng(7)
    samples = rng.standard_normal((3000, 200, 2, 2))  # (N, S, H, C)
    realized = rng.standard_normal((3000, 2, 2))
    cov = M.interval_coverage(samples, realized)
    for level, hits in cov.items():
        assert abs(hits.mean() - level) < 0.02
    # one channel with the channel axis dropped gives the same numbers (samples stay on axis 1)
    one = M.interval_coverage(samples[..., 1], realized[..., 1])
    for level in cov:
        np.testing.assert_array_equal(one[level], cov[level][:, 1])
    np.testing.assert_allclose(M.crps(samples[..., 1], realized[..., 1]), M.crps(samples, realized)[..., 1])
    hist = M.pit_histogram(M.pit_values(samples, realized))
    assert np.abs(hist - 0.1).max() < 0.01


def test_perfect_forecast_scores_zero_error_and_full_coverage():
    rng = np.random.default_rng(0)
    realized = rng.uniform(1, 2, (5, 4, 6))
    samples = np.repeat(realized[:, None], 3, axis=1)
    history = rng.uniform(1, 2, (5, 10, 6))
    errs = M.point_errors(M.point_forecast(samples), realized, history)
    for key in ("mae", "rmse", "mape", "mase"):
        np.testing.assert_array_equal(errs[key], 0)
    np.testing.assert_array_equal(M.crps(samples, realized), 0)
    np.testing.assert_array_equal(M.weighted_quantile_loss(samples, realized), 0)
    for cov in M.interval_coverage(samples, realized).values():
        np.testing.assert_array_equal(cov, 1)


# ---------------------------------------------------------------------------- finance metrics


def test_directional_accuracy_by_hand():
    pred = np.array([1.0, -1.0, 0.0, 2.0, 1.0])
    real = np.array([1.0, 1.0, 1.0, 0.0, -3.0])
    # origin 4 has no realized move (skipped); hits 1, 0, 0.5 (no call), 0 -> 1.5 / 4
    assert M.directional_accuracy(pred, real) == pytest.approx(0.375)
    assert np.isnan(M.directional_accuracy(pred, np.zeros(5)))


def test_ic_of_linear_and_rankic_of_monotone_transform():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=50)
    assert M.pearson(pred, 3 * pred - 1) == pytest.approx(1.0)
    assert M.pearson(pred, -2 * pred) == pytest.approx(-1.0)
    mono = np.exp(5 * pred)
    assert M.spearman(pred, mono) == pytest.approx(1.0)
    assert M.pearson(pred, mono) < 0.9  # Pearson is not rank-invariant, RankIC is
    assert np.isnan(M.pearson(np.zeros(5), pred[:5]))


def test_information_coefficients_time_series_and_cross_section():
    rng = np.random.default_rng(1)
    symbols = np.repeat(["a", "b", "c"], 4)
    times = np.tile(np.arange(4), 3)
    pred = rng.normal(size=12)
    real = 2 * pred + 0.5
    ic = M.information_coefficients(pred, real, symbols, times)
    assert ic["ic"] == pytest.approx(1) and ic["rank_ic"] == pytest.approx(1)
    assert ic["xs_ic"] == pytest.approx(1) and ic["xs_dates"] == 4
    two = M.information_coefficients(pred[:8], real[:8], symbols[:8], times[:8])
    assert two["xs_dates"] == 0 and np.isnan(two["xs_ic"])  # fewer than 3 symbols per date


def test_realized_vol_by_hand_and_perfect_r2():
    assert M.realized_vol(np.array([11.0, 12.1]), 10.0) == pytest.approx(2 * math.log(1.1) ** 2)
    real = np.array([1.0, 2.0, 4.0])
    assert M.vol_errors(real, real) == {"mae": 0.0, "r2": 1.0, "n": 3}
    # R^2 = 1 - SSE/SST: predicting the realized mean everywhere gives 0
    assert M.vol_errors(np.full(3, real.mean()), real)["r2"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------- baselines


def test_persistence_baseline_values():
    history = np.arange(2 * 3 * 6, dtype=float).reshape(2, 3, 6)
    paths = persistence_paths(history, pred_len=4)
    assert paths.shape == (2, 1, 4, 6)
    for n in range(2):
        last = history[n, -1]
        np.testing.assert_array_equal(paths[n, 0, :, :4], last[3])
        np.testing.assert_array_equal(paths[n, 0, :, 4], last[4])
        np.testing.assert_array_equal(paths[n, 0, :, 5], last[5])


def test_drift_baseline_follows_history_drift_and_is_seeded():
    close = 10 * np.exp(0.01 * np.arange(50))  # constant log return 0.01, zero std
    history = np.zeros((1, 50, 6))
    history[0, :, :4] = close[:, None]
    history[0, :, 4:] = 7.0
    paths = drift_paths(history, 5, 3, np.random.default_rng(0))
    np.testing.assert_allclose(paths[0, :, :, 3], np.broadcast_to(close[-1] * np.exp(0.01 * np.arange(1, 6)), (3, 5)))
    np.testing.assert_allclose(paths[0, :, 0, 0], close[-1])  # first open = last close
    rng_hist = np.random.default_rng(5).uniform(1, 2, (2, 30, 6))
    a = drift_paths(rng_hist, 4, 8, np.random.default_rng(0))
    b = drift_paths(rng_hist, 4, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert (a[..., 1] >= a[..., 2]).all()


def test_garch_baseline_on_synthetic_garch_series():
    rng = np.random.default_rng(0)
    n, omega, alpha, beta = 600, 0.05, 0.1, 0.85
    var, r = omega / (1 - alpha - beta), np.empty(n)
    for t in range(n):
        r[t] = math.sqrt(var) * rng.standard_normal()
        var = omega + alpha * r[t] ** 2 + beta * var
    close = 20 * np.exp(np.cumsum(r / 100))
    vol, reason = garch_vol(close, pred_len=24)
    assert reason is None
    assert np.isfinite(vol) and vol > 0
    # unconditional daily-scale check: 24 steps of variance ~ 1 (in 100x units) -> ~24e-4
    assert 0.3 * 24e-4 < vol < 3 * 24e-4
    flat_vol, flat_reason = garch_vol(np.full(100, 5.0), pred_len=24)
    assert flat_reason == "flat history" and flat_vol == 0


# ---------------------------------------------------------------------------------- origins


def test_origins_respect_context_stride_and_targets():
    frame = synthetic_frame(n=100)
    frame["is_context"] = frame.groupby("symbol").cumcount() < 30
    o = forecast_origins(frame, lookback=10, pred_len=5, stride=7)
    for _, g in o.groupby("symbol"):
        assert g["pos"].iloc[0] == 29  # first target is the first non-context row
        assert (np.diff(g["pos"]) == 7).all()
        assert g["pos"].iloc[-1] + 5 <= 99
    # without is_context the history limit binds instead
    assert forecast_origins(frame.drop(columns="is_context"), lookback=10, pred_len=5, stride=7)["pos"].min() == 9


def test_max_origins_keeps_cross_sections_whole():
    frame = synthetic_frame(("a", "b", "c"), n=120)
    full = forecast_origins(frame, lookback=20, pred_len=4, stride=3)
    thin = forecast_origins(frame, lookback=20, pred_len=4, stride=3, max_origins=20)
    assert len(full) > 20 >= len(thin) > 0
    assert (thin.groupby("origin_time")["symbol"].nunique() == 3).all()
    assert thin["origin_time"].iloc[0] == full["origin_time"].iloc[0]  # evenly spread, first kept


# ------------------------------------------------------------------------------- walk-forward


def test_walk_forward_synthetic_two_symbols(tmp_path):
    frame = synthetic_frame(n=160)
    frame["is_context"] = frame.groupby("symbol").cumcount() < 40
    calls = []

    def recording(histories, hist_stamps, future_stamps, pred_len, sample_count):
        calls.append((histories, hist_stamps, future_stamps))
        return oracle(frame)(histories, hist_stamps, future_stamps, pred_len, sample_count)

    result = walk_forward(frame, {"oracle": recording, "rw": random_walk(0)}, lookback=32, pred_len=6, stride=5,
                          sample_count=4, baselines=("persistence", "drift"), progress=False, batch_size=8)
    n = result.n_origins
    assert n == 2 * len(range(39, 160 - 6, 5))
    assert sum(len(c[0]) for c in calls) == n and max(len(c[0]) for c in calls) <= 8
    # the model saw exactly lookback bars ending at the origin, and the next pred_len stamps
    h, hs, fs = calls[0][0][0], calls[0][1][0], calls[0][2][0]
    assert list(h.columns) == FEATS and len(h) == 32 and h.attrs["symbol"] == "X"
    np.testing.assert_array_equal(h.to_numpy(), result.history[0])
    assert fs.iloc[0] - hs.iloc[-1] == pd.Timedelta("5min") and len(fs) == 6
    assert not frame.loc[frame.timestamps.isin(fs) & (frame.symbol == "X"), "is_context"].any()
    # every entry scored on the same origins; the oracle is perfect
    t = result.table
    assert (t["n_origins"] == n).all()
    errors = ["close_mae", "close_rmse", "close_mape", "close_mase", "close_crps", "close_wql"]
    assert t.loc["oracle", errors].eq(0).all()
    assert t.loc["oracle", ["coverage_50", "coverage_80", "coverage_95", "directional_accuracy"]].eq(1).all()
    assert t.loc["oracle", "ic"] == pytest.approx(1) and t.loc["oracle", "vol_r2"] == pytest.approx(1)
    # persistence forecasts no change: it has no direction (once counted as 0.5) and no IC
    assert t.loc["rw", "close_mae"] > 0 and np.isnan(t.loc["persistence", "directional_accuracy"])
    np.testing.assert_allclose(result.samples["persistence"][:, 0, :, 3], result.last_close[:, None].repeat(6, 1))
    # recomputable from the stored arrays
    mean_table = result.rescore(point="mean")
    assert mean_table.loc["oracle", "close_mae"] == 0
    assert result.config["point"] == "mean"


def test_walk_forward_rejects_bad_shapes_and_names():
    frame = synthetic_frame(n=60)
    bad = lambda h, hs, fs, p, s: np.zeros((len(h), s, p, 5))  # noqa: E731
    with pytest.raises(ValueError, match="shape"):
        walk_forward(frame, {"bad": bad}, lookback=10, pred_len=3, stride=10, sample_count=2, baselines=(),
                     progress=False)
    with pytest.raises(ValueError, match="reserved"):
        walk_forward(frame, {"drift": bad}, lookback=10, pred_len=3, stride=10, sample_count=2, progress=False)


def test_garch_fallbacks_are_counted_and_cross_section_reported():
    frame = synthetic_frame(("a", "b", "c", "flat"), n=90, flat=("flat",))
    result = walk_forward(frame, {"rw": random_walk(1)}, lookback=40, pred_len=8, stride=20, sample_count=4,
                          progress=False)
    per_symbol = len(range(39, 90 - 8, 20))
    assert result.garch_fallbacks["total"] == per_symbol == result.garch_fallbacks["flat history"]
    assert np.isfinite(result.vol_pred["garch"]).all() and (result.vol_pred["garch"] >= 0).all()
    assert result.table.loc["rw", "xs_dates"] == per_symbol
    assert np.isfinite(result.table.loc["rw", "xs_rank_ic"])


def check_forecasts_file(path: Path, result) -> None:
    """forecasts.parquet: a row per (path model, origin, step); the finetuned rows match the result's arrays."""
    forecasts = pd.read_parquet(path)
    assert len(forecasts) == len(result.samples) * result.n_origins * result.config["pred_len"]
    one = forecasts[forecasts["model"] == "finetuned"]
    assert np.allclose(one["close_median"].to_numpy(), result.point("finetuned", "median")[..., 3].reshape(-1))
    assert np.allclose(one["realized_close"].to_numpy(), result.realized[..., 3].reshape(-1))
    assert (one["close_q0.05"] <= one["close_q0.95"]).all()


def test_walk_forward_on_ashare_sample_writes_report(tmp_path):
    frame = ashare_frame()
    frame["is_context"] = np.arange(len(frame)) < 200
    models = {"base": random_walk(0, scale=3.0), "finetuned": oracle(frame, noise=0.002, seed=1)}
    result = walk_forward(frame, models, lookback=128, pred_len=12, stride=60, sample_count=16, max_origins=30,
                          seed=0, progress=False)
    assert result.n_origins == 30
    assert result.origin_pos.min() >= 199
    t = result.table
    assert list(t.index) == ["base", "finetuned", "persistence", "drift", "random_walk", "garch_rw", "bootstrap",
                             "garch"]
    assert t.loc["finetuned", "close_crps"] < t.loc["base", "close_crps"]
    assert t.loc["garch", "vol_mae"] > 0 and np.isnan(t.loc["garch", "close_mae"])
    assert np.isnan(t.loc["persistence", "coverage_80"])  # a single path has no interval

    tokens = {"base": {"s1_accuracy": 0.2, "s1_perplexity": 50.0, "s2_accuracy": 0.1, "s2_perplexity": 90.0},
              "finetuned": {"s1_accuracy": 0.25, "s1_perplexity": 40.0, "s2_accuracy": 0.1, "s2_perplexity": 99.0}}
    paths = write_report(result, tmp_path / "run", tokens=tokens)
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"metrics.json", "metrics_table.csv", "report.md",
                                                              "forecasts.parquet"}
    check_forecasts_file(paths["forecasts"], result)
    payload = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert payload["table"]["finetuned"]["n_origins"] == 30
    assert payload["table"]["persistence"]["coverage_80"] is None  # NaN as null
    csv = pd.read_csv(paths["table"], index_col="model")  # the naive probabilistic baselines, scored like a model
    for name in ("random_walk", "garch_rw", "bootstrap"):
        assert np.isfinite(csv.loc[name, ["close_crps", "close_wql", "coverage_50", "coverage_80", "coverage_95",
                                          "close_mae"]].to_numpy(float)).all()
    assert len(payload["scores"]["finetuned"]["by_step"]["mae"]["close"]) == 12
    report = paths["report"].read_text()
    for word in ("base", "finetuned", "persistence", "garch"):
        assert word in report
    n_headline = len([c for c, _, _ in HEADLINE if not c.startswith("xs_")])
    ft_base = [s for s in report.splitlines() if s.startswith("- Finetuned") and " vs base " in s]
    assert len(ft_base) == n_headline + 4  # every headline and token metric, wins and losses alike
    crps_line = next(s for s in ft_base if "close CRPS" in s)
    ft, bs = t.loc["finetuned", "close_crps"], t.loc["base", "close_crps"]
    assert f"{ft:.4g} vs base {bs:.4g}: {abs(ft - bs) / bs * 100:.1f}% lower. Paired test: **" in crps_line
    assert any(" vs persistence " in s for s in report.splitlines())
    assert "- Finetuned s1 perplexity 40 vs base 50: 20.0% lower." in report  # untested: described, not judged
    assert "- Finetuned s2 next-token accuracy 0.1 vs base 0.1: equal." in report
    assert payload["token_metrics"]["finetuned"]["s2_perplexity"] == 99.0
    assert pd.read_csv(paths["table"], index_col=0).shape == t.shape


# ------------------------------------------------------------------------------ token metrics


class StandInTokenizer(torch.nn.Module):
    """s1 = floor of the close, s2 = floor of the volume: integer tokens a test can reason about."""

    def encode(self, x, half=False):
        assert half
        return x[..., 3].long(), x[..., 4].long()


class StandInModel(torch.nn.Module):
    """Same call signature as Kronos; ``mode`` picks uniform logits or 'copy the current token'."""

    def __init__(self, mode: str, vocab: int = 8):
        super().__init__()
        self.mode, self.vocab = mode, vocab
        self.proj = torch.nn.Linear(1, 1)
        self.seen: list[tuple[bool, bool, tuple[int, ...]]] = []

    score_next_tokens = Kronos.score_next_tokens  # the real scorer, over this stand-in's forward

    def forward(self, s1, s2, stamp, use_teacher_forcing=False, s1_targets=None):
        assert use_teacher_forcing and s1_targets.shape == s1.shape
        self.seen.append((self.training, torch.is_grad_enabled(), tuple(s1.shape)))
        if self.mode == "uniform":
            z = torch.zeros(*s1.shape, self.vocab)
            return z, z.clone()
        big = 10.0
        return (torch.nn.functional.one_hot(s1, self.vocab).float() * big,
                torch.nn.functional.one_hot(s2, self.vocab).float() * big)


def token_batches():
    # close tokens 0,0,1,1,2,2,3,3 (next == current on 4 of 7 transitions); volume tokens constant 5
    x = torch.zeros(2, 8, 6)
    x[..., 3] = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], dtype=torch.float32)
    x[..., 4] = 5.0
    return [{"x": x, "stamp": torch.zeros(2, 8, 5)}] * 3


def test_token_metrics_uniform_model_has_perplexity_equal_vocab():
    model = StandInModel("uniform", vocab=8)
    out = token_metrics(model, StandInTokenizer(), token_batches())
    assert out["s1_perplexity"] == pytest.approx(8.0) and out["s2_perplexity"] == pytest.approx(8.0)
    assert out["n_tokens"] == 3 * 2 * 7 and out["n_batches"] == 3
    # argmax of uniform logits is token 0; s1 targets are 0,1,1,2,2,3,3 -> 1 of 7
    assert out["s1_accuracy"] == pytest.approx(1 / 7) and out["s2_accuracy"] == 0


def test_token_metrics_uses_shifted_causal_inputs_in_eval_mode():
    model = StandInModel("copy")
    model.train()
    out = token_metrics(model, StandInTokenizer(), token_batches())
    # copying the current token is right only where the next one repeats it: inputs [0,0,1,1,2,2,3] vs
    # targets [0,1,1,2,2,3,3] -> 4 of 7 (an unshifted, leaking call would score 7 of 7)
    assert out["s1_accuracy"] == pytest.approx(4 / 7)
    assert out["s2_accuracy"] == 1.0
    assert all(seen == (False, False, (2, 7)) for seen in model.seen)  # eval, no grad, inputs [:, :-1]
    assert model.training  # mode restored


# ----------------------------------------------------------------------------------- plots


def test_plots_return_figures():
    from matplotlib.figure import Figure

    from kronos_kit.plots.forecast import (
        plot_coverage,
        plot_error_by_horizon,
        plot_fan_chart,
        plot_pit_histogram,
        plot_return_scatter,
    )

    frame = synthetic_frame(n=120)
    result = walk_forward(frame, {"base": random_walk(0), "finetuned": random_walk(1, 0.5)}, lookback=30,
                          pred_len=6, stride=10, sample_count=20, baselines=("persistence", "drift"), progress=False)
    figs = [
        plot_fan_chart(result, 0, "finetuned", history_bars=20),
        plot_error_by_horizon(result),
        plot_coverage(result),
        plot_return_scatter(result, "base"),
        plot_pit_histogram(result, "finetuned"),
    ]
    for fig in figs:
        assert isinstance(fig, Figure) and fig.axes
        fig.canvas.draw()
    lines = figs[1].axes[0].get_lines()
    assert len(lines) == 4  # base, finetuned, persistence, drift
    np.testing.assert_allclose(lines[0].get_ydata(), result.scores["base"]["by_step"]["mae"]["close"])
    assert "IC" in figs[3].axes[0].get_title()
    cov_labels = [ln.get_label() for ln in figs[2].axes[0].get_lines()]
    assert "persistence" not in cov_labels and "drift" in cov_labels


# ------------------------------------------------------------- real models (fixture checkpoints)

FIXTURE_CONTEXT = 40  # the max_context the reference fixture was generated with


@pytest.fixture(scope="module")
def fixture_pair():
    from kronos_kit.model import Kronos, KronosTokenizer

    return Kronos.from_pretrained(FIXTURES / "predictor"), KronosTokenizer.from_pretrained(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def ashare_splits():
    from kronos_kit.data import load_ohlcv, split

    return split(load_ohlcv(DATA, symbol="A"), lookback=32, predict=8)


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """A 'finetuned' stand-in: a copy with seeded multiplicative noise on every weight."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
    return out


def test_evaluate_models_fixture_checkpoints_end_to_end(fixture_pair, ashare_splits, tmp_path):
    from torch.utils.data import DataLoader

    from kronos_kit.data import WindowDataset

    model, tokenizer = fixture_pair
    tuned = perturbed(model)
    models = {"base": (model, tokenizer), "finetuned": (tuned, tokenizer)}
    kw = dict(lookback=32, pred_len=8, stride=25, sample_count=4, max_origins=6, max_context=FIXTURE_CONTEXT,
              seed=0, progress=False)
    result = evaluate_models(ashare_splits, models, **kw)  # the Splits: its test part is used
    t = result.table
    assert list(t.index) == ["base", "finetuned", "persistence", "drift", "random_walk", "garch_rw", "bootstrap",
                             "garch"]
    assert result.n_origins == 6 and (t["n_origins"] == 6).all()
    assert t.loc["base", "n_samples"] == t.loc["finetuned", "n_samples"] == 4
    # origins lie in the test split: histories may use its context rows, targets may not
    test = ashare_splits.test
    n_context = int(test["is_context"].sum())
    assert result.origin_pos.min() >= n_context - 1
    for name in ("base", "finetuned"):
        paths = result.samples[name]
        assert paths.shape == (6, 4, 8, 6) and np.isfinite(paths).all()
        # price-unit paths near the history (de-normalised), not z-scores
        assert np.abs(result.point(name)[..., 3] / result.last_close[:, None] - 1).max() < 0.2
        assert np.isfinite(t.loc[name, ["close_mae", "close_crps", "coverage_80", "vol_mae"]].astype(float)).all()
    assert not np.array_equal(result.samples["base"], result.samples["finetuned"])
    assert result.config["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "seed": 0, "calibrated": False,
                                         "max_context": {"base": 40, "finetuned": 40},
                                         "device": {"base": "cpu", "finetuned": "cpu"}}
    # seeded: the same call gives the same paths, and a plain test frame works like the Splits
    again = evaluate_models(test, {"base": (model, tokenizer)}, baselines=(), **kw)
    np.testing.assert_array_equal(again.samples["base"], result.samples["base"])
    # the config section passed whole gives the same evaluation
    from kronos_kit.config import EvalConfig

    section = EvalConfig(stride=25, pred_len=8, sample_count=4, max_origins=6, max_context=FIXTURE_CONTEXT)
    whole = evaluate_models(test, {"base": (model, tokenizer)}, section, lookback=32, seed=0, baselines=(),
                            progress=False)
    np.testing.assert_array_equal(whole.samples["base"], result.samples["base"])
    assert whole.config["sampling"]["max_context"] == {"base": FIXTURE_CONTEXT}
    with pytest.raises(ValueError, match="either evaluation"):
        evaluate_models(test, {"base": (model, tokenizer)}, section, lookback=32, pred_len=8)

    # token-level metrics of both models on the test windows (real checkpoints, causal path)
    windows = WindowDataset(test, lookback=32, predict=8)
    model.train()
    tokens = {}
    for name, m in (("base", model), ("finetuned", tuned)):
        batches = itertools.islice(DataLoader(windows, batch_size=16), 3)
        tokens[name] = token_metrics(m, tokenizer, batches)
    assert model.training and not tokenizer.training  # modes restored (the tokenizer was in eval)
    model.eval()
    # the fixture weights are random (not trained), so its perplexity lands above the vocabulary size
    # (2**4 = 16; about 37 on these windows): only the range and consistency are checked
    # only targets inside the test split count: the first windows' look-back reaches into validation
    in_test = sum(int(b["in_split"][:, 1:].sum()) for b in itertools.islice(DataLoader(windows, batch_size=16), 3))
    for out in tokens.values():
        assert out["n_batches"] == 3 and out["n_tokens"] == in_test < 3 * 16 * (32 + 8)
        for key in ("s1", "s2"):
            assert 0 <= out[f"{key}_accuracy"] <= 1
            assert np.isfinite(out[f"{key}_nll"]) and out[f"{key}_nll"] > 0
            assert out[f"{key}_perplexity"] == pytest.approx(math.exp(out[f"{key}_nll"]))
    assert tokens["base"]["s1_nll"] != tokens["finetuned"]["s1_nll"]

    paths = write_report(result, tmp_path / "run", tokens=tokens)
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"metrics.json", "metrics_table.csv", "report.md",
                                                              "forecasts.parquet"}
    check_forecasts_file(paths["forecasts"], result)
    payload = json.loads(paths["json"].read_text())
    assert payload["config"]["sampling"]["max_context"]["finetuned"] == 40
    assert payload["table"]["finetuned"]["n_samples"] == 4
    assert payload["token_metrics"]["base"]["s1_perplexity"] == pytest.approx(tokens["base"]["s1_perplexity"])
    report = paths["report"].read_text()
    assert "### finetuned vs base" in report and "## Token-level metrics" in report
    assert pd.read_csv(paths["table"], index_col=0).index.tolist() == t.index.tolist()


def test_evaluate_models_rejects_bad_entries(fixture_pair):
    with pytest.raises(TypeError, match="pair"):
        evaluate_models(ashare_frame(), {"base": fixture_pair[0]}, lookback=32, pred_len=4, stride=50,
                        sample_count=2, progress=False)
    with pytest.raises(TypeError, match="Splits"):
        evaluate_models([1, 2], {"base": fixture_pair}, lookback=32, pred_len=4, stride=50, sample_count=2)


@pytest.fixture(scope="module")
def fixture_predictor(fixture_pair):
    from kronos_kit.forecast import KronosPredictor

    return KronosPredictor(*fixture_pair, max_context=FIXTURE_CONTEXT)


def test_plot_forecast_draws_median_bands_and_realized(fixture_predictor):
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    from kronos_kit.plots import plot_forecast

    bars = pd.read_csv(DATA, parse_dates=["timestamps"])
    hist, fut = bars.iloc[1000:1032], bars.iloc[1032:1040]
    fc = fixture_predictor.predict_paths(hist[FEATS], hist["timestamps"], fut["timestamps"], 8, sample_count=12,
                                         verbose=False, seed=1)
    fig = plot_forecast(hist, fc, realized=fut, history_bars=20, label="base")
    assert isinstance(fig, Figure)
    fig.canvas.draw()
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    median = lines["base median"]
    # the fan starts at the last history close, then follows Forecast.median() step by step
    assert median.get_ydata()[0] == hist["close"].iloc[-1]
    np.testing.assert_allclose(median.get_ydata()[1:], fc.median()["close"].to_numpy())
    np.testing.assert_allclose(median.get_xdata(), np.arange(0, 9))
    np.testing.assert_allclose(lines["realized close"].get_ydata()[1:], fut["close"].to_numpy())
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert sorted(c.get_label() for c in bands) == ["50% band", "90% band"]
    assert "2024" in "".join(t.get_text() for t in ax.get_xticklabels())  # ticks read as bar times

    # no realized future, another channel and a single band level
    fig2 = plot_forecast(hist, fc, channel="volume", levels=(0.8,), history_bars=None)
    ax2 = fig2.axes[0]
    assert not [ln for ln in ax2.get_lines() if ln.get_label().startswith("realized")]
    np.testing.assert_allclose(ax2.get_lines()[1].get_ydata()[1:], fc.median()["volume"].to_numpy())
    assert [c.get_label() for c in ax2.collections if isinstance(c, PolyCollection)] == ["80% band"]
    with pytest.raises(ValueError, match="channel"):
        plot_forecast(hist, fc, channel="vwap")


def test_forecast_explorer_builds_and_forecasts_without_kernel(fixture_predictor, fixture_pair):
    import ipywidgets

    from kronos_kit.widgets import forecast_explorer

    frame = ashare_frame()
    models = {"base": fixture_predictor, "tuned": (perturbed(fixture_pair[0]), fixture_pair[1])}
    box = forecast_explorer(models, frame, lookback=32, pred_len=8, max_context=20, sample_count=6)
    assert isinstance(box, ipywidgets.VBox)
    assert fixture_predictor.max_context == FIXTURE_CONTEXT  # the caller's predictor is left alone
    controls = {type(w).__name__ + ":" + str(w.description): w for w in box.children[0].children
                + box.children[2].children + box.children[3].children[:1] + (box.children[1],)}
    origin = controls["IntSlider:origin bar"]
    assert (origin.min, origin.max, origin.value) == (31, len(frame) - 1, len(frame) - 1 - 8)
    assert set(controls) >= {"Dropdown:symbol", "Dropdown:model", "FloatSlider:temperature", "FloatSlider:top-p",
                             "IntSlider:sample paths", "Button:Forecast"}
    figure, status = box.children[-1], box.children[3].children[1]
    assert not figure.outputs  # nothing forecast until asked

    assert controls["Dropdown:model"].value == "all (side by side)"

    forecasts = box.run()  # both models side by side
    assert sorted(forecasts) == ["base", "tuned"] and forecasts["base"].paths.shape == (1, 6, 8, 6)
    assert len(figure.outputs) == 1 and "image/png" in figure.outputs[0]["data"]
    assert "2 model(s)" in status.value and "8 realized bars" in status.value and "tuned close CRPS" in status.value

    # started at a run's calibration: its sampling on the sliders, each model's path calibration applied
    from kronos_kit.runs import SamplingCalibration

    wide = {"method": "spread", "scale": 3.0, "power": 0.0, "center": 1.0, "conformal": {}}
    cal = SamplingCalibration(temperature=0.8, top_p=0.95, model="base", paths={"base": {"path_calibration": wide}})
    calibrated_box = forecast_explorer(models, frame, lookback=32, pred_len=8, max_context=20, sample_count=6,
                                       calibration=cal)
    sliders = {w.description: w for w in calibrated_box.children[2].children}
    start = (sliders["temperature"].value, sliders["top-p"].value, sliders["calibrated paths"].value)
    assert start == (0.8, 0.95, True)
    done = calibrated_box.run()
    sliders["calibrated paths"].value = False
    raw = calibrated_box.run()
    spread = [np.ptp(np.log(f["base"].paths[0, :, -1, 3])) for f in (done, raw)]
    assert spread[0] == pytest.approx(3 * spread[1], rel=1e-3)  # paths come in float32
    np.testing.assert_allclose(done["tuned"].paths, raw["tuned"].paths)  # no fit for "tuned": as sampled

    # a run that hands over an ensemble of "base": offered as "handed over", described with its weights
    cal.handover = {"handover": {"ensemble": {"method": "linear_pool", "members": ["model", "garch_rw"],
                                              "weights": [0.5, 0.5]}, "tails": {}}}
    handed_box = forecast_explorer(models, frame, lookback=32, pred_len=8, max_context=20, sample_count=6,
                                   calibration=cal)
    menu = handed_box.children[0].children[1]
    assert "handed over" in menu.options
    menu.value = "handed over"
    handed = handed_box.run()["handed over"].paths
    np.testing.assert_allclose(handed[0, :3, :, :4], done["base"].paths[0, :3, :, :4])  # half the model's paths
    assert not np.allclose(handed[0, 3:, :, 3], done["base"].paths[0, 3:, :, 3])  # half GARCH paths
    assert "handed over: linear pool: 50% base, 50% garch_rw" in handed_box.children[3].children[1].value

    controls["Dropdown:model"].value = "base"
    origin.value = origin.max  # past the end of the data: no realized path, still forecasts
    assert "settings changed" in status.value
    controls["Button:Forecast"].click()  # the button's handler, as a click in a notebook runs it
    assert status.value.startswith("1 model(s)") and "no realized bars" in status.value
    assert len(figure.outputs) == 1
