"""Forecaster edge cases: argument checks, greedy temperature, exact top-k, long horizons, column
case, and `forecast_frame` (the tidy forecast of the bars after each symbol's data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA

import kronos_kit.forecast as forecast
from kronos_kit.data import FEATURE_COLUMNS, load_ohlcv
from kronos_kit.forecast import (
    GREEDY_TEMPERATURE,
    KronosPredictor,
    Sampler,
    filter_logits,
    forecast_frame,
    future_timestamps,
    generate_tokens,
)
from kronos_kit.model import Kronos, KronosTokenizer

FEATURES = list(FEATURE_COLUMNS)


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return pd.read_csv(DATA / "ashare_5min_sample.csv", parse_dates=["timestamps"])


@pytest.fixture(scope="module")
def tiny() -> KronosPredictor:
    return KronosPredictor(Kronos.from_preset("tiny", seed=3), KronosTokenizer.from_preset("tiny", seed=4),
                           max_context=8)


def window(bars, a, b, n):
    hist, fut = bars.iloc[a:b], bars.iloc[b : b + n]
    return hist[FEATURES], hist["timestamps"], fut["timestamps"]


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pred_len": 0}, "pred_len must be an integer >= 1"),
        ({"pred_len": 2.5}, "pred_len must be an integer >= 1"),
        ({"sample_count": 0}, "sample_count must be an integer >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 1.5}, "top_k must be an integer >= 0"),
        ({"T": -0.5}, "temperature must be a finite number >= 0"),
        ({"T": float("nan")}, "temperature must be a finite number >= 0"),
        ({"T": float("inf")}, "temperature must be a finite number >= 0"),
        ({"sliding": "fast"}, "sliding must be 'exact' or 'approx'"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_bad_arguments_are_refused_before_any_work(tiny, bars, monkeypatch, kwargs, match):
    def no_work(*args, **kw):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(tiny.tokenizer, "encode", no_work)
    monkeypatch.setattr(forecast, "generate_tokens", no_work)
    hist, x_ts, y_ts = window(bars, 0, 20, 4)
    call = {"pred_len": 4, **kwargs}
    if call["pred_len"] != 4:
        y_ts = bars["timestamps"].iloc[20 : 20 + max(1, int(call["pred_len"]))]
    with pytest.raises(ValueError, match=match):
        tiny.predict_paths(hist, x_ts, y_ts, verbose=False, **call)


def test_zero_and_tiny_temperatures_are_greedy(tiny, bars):
    hist, x_ts, y_ts = window(bars, 0, 20, 6)
    top1 = tiny.predict_paths(hist, x_ts, y_ts, 6, top_k=1, sample_count=2, verbose=False, seed=0).paths
    assert np.array_equal(top1[0, 0], top1[0, 1])  # top-1 is deterministic
    for temperature in (0.0, GREEDY_TEMPERATURE, 1e-40):  # 1e-40 overflowed the logits to inf before
        out = tiny.predict_paths(hist, x_ts, y_ts, 6, T=temperature, sample_count=2, verbose=False, seed=5).paths
        np.testing.assert_array_equal(out, top1)


def test_greedy_sampler_takes_the_argmax_without_overflow():
    logits = torch.tensor([[3e3, 0.0, -1e3], [0.0, 1.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    assert Sampler(temperature=1e-38)(logits, gen).tolist() == [0, 1]  # ties: the first index, as argmax
    assert Sampler(temperature=0)(logits, gen).tolist() == [0, 1]
    assert not Sampler(temperature=2 * GREEDY_TEMPERATURE).greedy


def test_top_k_keeps_exactly_k_tokens_on_ties():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    one = filter_logits(logits, top_k=1)
    assert torch.isfinite(one).tolist() == [[False, True, False, False], [True, False, False, False]]
    two = filter_logits(logits, top_k=2)
    assert torch.isfinite(two).tolist() == [[False, True, True, False], [True, True, False, False]]
    three = filter_logits(logits, top_k=3)
    assert torch.isfinite(three).sum(-1).tolist() == [3, 3]
    # no tie: unchanged behaviour (the k largest)
    assert torch.isfinite(filter_logits(torch.tensor([[0.1, 0.4, 0.3]]), top_k=2)).tolist() == [[False, True, True]]
    # sampling with top_k=1 over a tie never draws the second token
    draws = {int(Sampler(top_k=1, top_p=1.0)(torch.zeros(1, 4), torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {0}


# ------------------------------------------------------------------ horizons past max_context


@pytest.mark.parametrize("use_cache,sliding", [(True, "exact"), (True, "approx"), (False, "exact")])
def test_horizon_longer_than_max_context_is_forecast(tiny, bars, use_cache, sliding):
    hist, x_ts, _ = window(bars, 0, 20, 0)
    future = bars["timestamps"].iloc[20:40]
    opts = {"top_k": 1, "verbose": False, "use_cache": use_cache, "sliding": sliding}
    long = tiny.predict_paths(hist, x_ts, future, 20, **opts)
    assert long.paths.shape == (1, 1, 20, len(FEATURES)) and np.isfinite(long.paths).all()
    assert list(long.mean().index) == list(future)
    # bars are decoded in windows of max_context tokens counted back from the last bar: a horizon
    # shorter by a multiple of max_context decodes its bars in the same windows
    short = tiny.predict_paths(hist, x_ts, future[:12], 12, **opts)
    np.testing.assert_allclose(long.paths[0, 0, :12], short.paths[0, 0], rtol=1e-5, atol=1e-6)


def test_generation_past_max_context_from_a_short_history_matches_uncached():
    model = Kronos.from_preset("tiny", seed=3)
    gen = torch.Generator().manual_seed(0)
    s1, s2 = torch.randint(0, 64, (2, 3), generator=gen), torch.randint(0, 64, (2, 3), generator=gen)
    stamps = torch.randint(0, 7, (2, 3 + 30, 5), generator=gen).float()
    runs = [generate_tokens(model, s1, s2, stamps, 30, max_context=8, sample_count=2,
                            sampler=Sampler(temperature=1.2, top_k=5), use_cache=use_cache,
                            generator=torch.Generator().manual_seed(7))
            for use_cache in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ------------------------------------------------------------------ column names


def test_column_names_in_any_letter_case(tiny, bars):
    hist, x_ts, y_ts = window(bars, 0, 20, 4)
    expected = tiny.predict(hist, x_ts, y_ts, 4, top_k=1, verbose=False)
    shouted = hist.rename(columns={"open": "Open", "high": "HIGH", "close": "Close", "volume": "Volume",
                                   "amount": "AMOUNT"})
    pd.testing.assert_frame_equal(tiny.predict(shouted, x_ts, y_ts, 4, top_k=1, verbose=False), expected)
    # without volume and amount, as today: the reference's fill
    prices = hist[["open", "high", "low", "close"]]
    filled = tiny.predict(prices, x_ts, y_ts, 4, top_k=1, verbose=False)
    upper = prices.rename(columns=str.upper)
    pd.testing.assert_frame_equal(tiny.predict(upper, x_ts, y_ts, 4, top_k=1, verbose=False), filled)


def test_two_columns_differing_only_in_case_are_refused(tiny, bars):
    hist, x_ts, y_ts = window(bars, 0, 20, 4)
    with pytest.raises(ValueError, match=r"'close' and 'Close'"):
        tiny.predict(hist.assign(Close=hist["close"]), x_ts, y_ts, 4, verbose=False)


# ------------------------------------------------------------------ future timestamps


def test_future_timestamps_continue_at_the_modal_interval():
    ts = pd.Series(pd.to_datetime(["2024-01-02 09:30", "2024-01-02 09:35", "2024-01-02 09:40",
                                   "2024-01-02 09:50", "2024-01-02 09:55"]))
    out = future_timestamps(ts, 3)
    assert list(out) == list(pd.to_datetime(["2024-01-02 10:00", "2024-01-02 10:05", "2024-01-02 10:10"]))


def test_daily_bars_without_weekends_skip_weekends():
    weekdays = pd.Series(pd.bdate_range("2024-03-04", "2024-03-15"))  # Mon..Fri, two weeks
    out = future_timestamps(weekdays, 3)  # after Friday 15th: Mon 18th, Tue 19th, Wed 20th
    assert list(out) == list(pd.to_datetime(["2024-03-18", "2024-03-19", "2024-03-20"]))
    every_day = pd.Series(pd.date_range("2024-03-04", "2024-03-15", freq="D", tz="UTC"))  # crypto trades weekends
    assert list(future_timestamps(every_day, 2)) == list(pd.date_range("2024-03-16", periods=2, freq="D", tz="UTC"))


def test_future_timestamps_need_two_bars():
    with pytest.raises(ValueError, match="at least 2"):
        future_timestamps(pd.Series(pd.to_datetime(["2024-01-02"])), 3)


# ------------------------------------------------------------------ forecast_frame


@pytest.fixture(scope="module")
def two_symbols(bars) -> pd.DataFrame:
    a = bars.iloc[:40].assign(symbol="AAA")
    b = bars.iloc[100:130].assign(symbol="BBB")
    b[["open", "high", "low", "close"]] *= 2
    return load_ohlcv(pd.concat([b, a], ignore_index=True))


def test_forecast_frame_is_tidy_ordered_and_seeded(tiny, two_symbols):
    out = forecast_frame(tiny, two_symbols, horizon=5, sample_count=6, quantiles=(0.9, 0.1, 0.5), seed=3)
    assert len(out) == 2 * 5
    assert list(out.columns[:3]) == ["symbol", "timestamp", "step"]
    expected = [f"{c}_{s}" for c in FEATURES for s in ("mean", "median", "q0.1", "q0.5", "q0.9")]
    assert list(out.columns[3:]) == expected
    assert out["symbol"].tolist() == ["AAA"] * 5 + ["BBB"] * 5
    assert out["step"].tolist() == [1, 2, 3, 4, 5] * 2
    for sym, part in out.groupby("symbol"):  # the bars right after each symbol's data, 5 minutes apart
        last = two_symbols.loc[two_symbols["symbol"] == sym, "timestamps"].iloc[-1]
        assert list(part["timestamp"]) == [last + pd.Timedelta(minutes=5 * k) for k in range(1, 6)]
    for c in FEATURES:
        lo, mid, hi = out[f"{c}_q0.1"], out[f"{c}_q0.5"], out[f"{c}_q0.9"]
        assert (lo <= mid + 1e-9).all() and (mid <= hi + 1e-9).all()
        np.testing.assert_allclose(mid, out[f"{c}_median"])
    assert (out[[f"{c}_q0.9" for c in FEATURES]].to_numpy() > out[[f"{c}_q0.1" for c in FEATURES]].to_numpy()).any()
    again = forecast_frame(tiny, two_symbols, horizon=5, sample_count=6, quantiles=(0.9, 0.1, 0.5), seed=3)
    pd.testing.assert_frame_equal(out, again)
    other = forecast_frame(tiny, two_symbols, horizon=5, sample_count=6, quantiles=(0.9, 0.1, 0.5), seed=4)
    assert not np.allclose(out["close_mean"], other["close_mean"])


def test_forecast_frame_uses_predict_paths_on_each_symbols_last_bars(tiny, two_symbols):
    out = forecast_frame(tiny, two_symbols, horizon=3, sample_count=4, seed=1, lookback=12)
    part = two_symbols[two_symbols["symbol"] == "BBB"].iloc[-12:]
    fc = tiny.predict_paths(part[FEATURES], part["timestamps"], future_timestamps(part["timestamps"], 3), 3,
                            sample_count=4, verbose=False, seed=1)
    bbb = out[out["symbol"] == "BBB"]
    np.testing.assert_allclose(bbb["close_mean"], fc.mean()["close"], rtol=1e-6)
    np.testing.assert_allclose(bbb["volume_q0.9"], fc.quantile(0.9)["volume"], rtol=1e-6)
    # a symbol's forecast does not depend on the other symbols in the frame
    alone = forecast_frame(tiny, two_symbols[two_symbols["symbol"] == "BBB"].reset_index(drop=True), horizon=3,
                           sample_count=4, seed=1, lookback=12)
    pd.testing.assert_frame_equal(alone.reset_index(drop=True), bbb.reset_index(drop=True))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"horizon": 0}, "horizon must be an integer >= 1"),
        ({"quantiles": (0.1, 1.2)}, r"quantiles must be in \[0, 1\]"),
        ({"quantiles": (0.1, 0.1)}, "quantiles must be distinct"),
        ({"lookback": 1}, "lookback must be an integer >= 2"),
    ],
)
def test_forecast_frame_refuses_bad_arguments(tiny, two_symbols, kwargs, match):
    with pytest.raises(ValueError, match=match):
        forecast_frame(tiny, two_symbols, **{"horizon": 3, "sample_count": 2, **kwargs})


def test_forecast_frame_wants_the_canonical_frame(tiny, bars):
    with pytest.raises(ValueError, match="symbol"):
        forecast_frame(tiny, bars.iloc[:30], horizon=2)


class BrokenCandles:
    """A stand-in predictor whose sampled bars break the candle rule, as Kronos's can: it decodes each channel
    on its own (the issue's median candle had its low above its close and its high below its open)."""

    max_context = 512

    def predict_paths(self, df, x_timestamp, y_timestamp, pred_len, *, sample_count, seed, **kwargs):
        rng = np.random.default_rng(seed)
        last = float(df["close"].iloc[-1])
        paths = last * (1 + 0.01 * rng.standard_normal((1, sample_count, pred_len, 6)))  # channels independent
        paths[..., 4:] = rng.normal(0, 1000, (1, sample_count, pred_len, 2))  # and volumes below 0
        return forecast.Forecast(paths, [pd.DatetimeIndex(y_timestamp)])


def test_forecast_frame_rows_are_valid_candles(two_symbols):
    out = forecast_frame(BrokenCandles(), two_symbols, horizon=6, sample_count=16, quantiles=(0.05, 0.5, 0.95))
    for stat in ("mean", "median", "q0.05", "q0.5", "q0.95"):
        o, h, lo, c = (out[f"{k}_{stat}"] for k in ("open", "high", "low", "close"))
        assert (lo <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all(), stat
        assert (out[f"volume_{stat}"] >= 0).all() and (out[f"amount_{stat}"] >= 0).all(), stat
    candles = out.attrs["forecast"]["candles"]
    assert candles["repaired_share"] > 0.5 and "low = min(low, open, close)" in candles["rule"]
    # the close is never touched: its quantiles stay those of the sampled closes
    raw = BrokenCandles().predict_paths(two_symbols[two_symbols.symbol == "AAA"], None,
                                        future_timestamps(two_symbols.loc[two_symbols.symbol == "AAA", "timestamps"],
                                                          6), 6, sample_count=16, seed=0)
    np.testing.assert_allclose(out.loc[out.symbol == "AAA", "close_q0.05"], raw.quantile(0.05)["close"])
    assert out.attrs["forecast"]["point_forecast"] == "the median of the sample paths, bar by bar"


def test_handed_over_rows_are_valid_candles_too(two_symbols):
    """The hand-over (ensemble with a naive forecast, then the tails) comes before the candle repair: every row of
    the handed-over forecast is a valid candle, and the settings name both."""
    from kronos_kit.calibration import Ensemble, Handover, TailCalibration

    handover = Handover(Ensemble("quantile_average", ["model", "random_walk"], [0.5, 0.5]), TailCalibration(1.2, 1.5))
    out = forecast_frame(BrokenCandles(), two_symbols, horizon=6, sample_count=16, quantiles=(0.05, 0.95),
                         handover=handover)
    plain = forecast_frame(BrokenCandles(), two_symbols, horizon=6, sample_count=16, quantiles=(0.05, 0.95))
    assert not np.allclose(out["close_q0.95"], plain["close_q0.95"])  # the hand-over changed the forecast
    for stat in ("mean", "median", "q0.05", "q0.95"):
        o, h, lo, c = (out[f"{k}_{stat}"] for k in ("open", "high", "low", "close"))
        assert (lo <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all(), stat
        assert (out[f"volume_{stat}"] >= 0).all(), stat
    about = out.attrs["forecast"]
    assert about["candles"]["repaired_share"] > 0.5 and "random_walk" in about["handover"]
    assert about["point_forecast"].startswith("the median of the handed-over paths (the model's combined with "
                                              "random_walk)")
