"""Forecasting with Kronos: every sample path of a batch of series, and the forecasts a run hands on.

`KronosPredictor` keeps the reference's public API (`predict`, `predict_batch`: per-series z-score
of the history, clip, tokenize with the frozen tokenizer, generate s1 then s2 per step, decode the
last `max_context` tokens, de-normalize, return the mean path) and adds `predict_paths*`, which
return every path with mean, median and quantiles. The generation itself (sampling, the KV cache
whose history part the sample paths share, sliding windows, decoding) is `kronos_kit.generation`.
Arguments are checked before any model runs.

`forecast_frame` forecasts the bars after the end of each symbol of a canonical long frame and
returns a tidy table (symbol, timestamp, step, and per channel mean, median and quantiles), the
library side of a forecast command.

`ForecastSkill` scores a (predictor, tokenizer) pair by close CRPS and close MAE on fixed origins of
a frame (phase 2 selects `best` by it on the validation split); its numbers equal
`evaluate.walk_forward`'s on the same origins and sampling. `load_run_forecaster` builds the
forecaster a run directory promotes (`promoted.json`) with the sampling fitted on validation
(`calibration.json`), reading plain JSON only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from kronos_kit import metrics
from kronos_kit.calibration import (
    IDENTITY_HANDOVER,
    Handover,
    PathCalibration,
    apply_path_calibration,
    describe_point_forecast,
)
from kronos_kit.config import DEFAULT_MAX_CONTEXT, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from kronos_kit.data.origins import forecast_origins, origin_inputs, walk_forward_frame
from kronos_kit.data.schema import (
    CANDLE_RULE,
    FEATURE_COLUMNS,
    PRICE_COLUMNS,
    denormalize,
    fill_amount,
    modal_step,
    nanoseconds,
    normalize,
    repair_candles,
    require_canonical,
    symbol_bounds,
    time_features,
)
from kronos_kit.generation import (
    GREEDY_TEMPERATURE,
    Sampler,
    _check_sliding,
    _is_int,
    decode_forecast,
    filter_logits,
    generate_tokens,
)
from kronos_kit.model import Kronos, KronosTokenizer, check_pair
from kronos_kit.runs import RunChoice, run_choice
from kronos_kit.runtime import inference, tqdm


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def time_stamps(timestamps: pd.Series | pd.DatetimeIndex | Sequence) -> np.ndarray:
    """(T, 5) float32 calendar features (minute, hour, weekday, day, month), as the model takes them."""
    return time_features(_datetime_index(timestamps)).to_numpy(np.float32, copy=True)


def _datetime_index(timestamps: pd.Series | pd.DatetimeIndex | Sequence) -> pd.DatetimeIndex:
    """Times as a DatetimeIndex; a Series or Index of times is taken as it is (parsing costs ~0.5 ms a call)."""
    if isinstance(timestamps, pd.Series | pd.Index) and pd.api.types.is_datetime64_any_dtype(timestamps.dtype):
        return pd.DatetimeIndex(timestamps)
    return pd.DatetimeIndex(pd.to_datetime(pd.Series(timestamps).to_numpy()))


def _stacked_time_stamps(series: Sequence[Sequence[pd.DatetimeIndex]]) -> np.ndarray:
    """`time_stamps` of each series' indexes joined, (N, T, 5), in one call (it costs ~1 ms a call);
    zoned times by their local wall clock, as `time_features` reads them."""
    wall = [(ix.tz_localize(None) if ix.tz is not None else ix).to_numpy() for parts in series for ix in parts]
    return time_stamps(np.concatenate(wall)).reshape(len(series), -1, 5)


@dataclass
class Forecast:
    """Every sample path of a forecast, in price units, with summaries as DataFrames."""

    paths: np.ndarray  # (series, samples, steps, features)
    timestamps: list[pd.DatetimeIndex]  # future timestamps of each series
    columns: tuple[str, ...] = FEATURE_COLUMNS
    quantile_levels: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)

    def summary(self, series: int = 0, quantiles: Sequence[float] | None = None) -> pd.DataFrame:
        """One row per step: timestamp, step (1..), then per channel mean, median and each quantile
        (`close_mean`, `close_median`, `close_q0.1`, ...); `quantiles` defaults to `quantile_levels`."""
        paths = self.paths[series]  # (samples, steps, features)
        levels = self.quantile_levels if quantiles is None else tuple(quantiles)
        stats = {"mean": paths.mean(0), "median": np.median(paths, 0),
                 **{f"q{q:g}": np.quantile(paths, q, axis=0) for q in levels}}
        columns = {f"{c}_{name}": values[:, j] for j, c in enumerate(self.columns) for name, values in stats.items()}
        return pd.DataFrame({"timestamp": self.timestamps[series], "step": np.arange(1, paths.shape[1] + 1),
                             **columns})

    def _frame(self, values: np.ndarray, series: int) -> pd.DataFrame:
        return pd.DataFrame(values, columns=list(self.columns), index=self.timestamps[series])

    def mean(self, series: int = 0) -> pd.DataFrame:
        return self._frame(self.paths[series].mean(0), series)

    def median(self, series: int = 0) -> pd.DataFrame:
        return self._frame(np.median(self.paths[series], 0), series)

    def quantile(self, q: float, series: int = 0) -> pd.DataFrame:
        return self._frame(np.quantile(self.paths[series], q, axis=0), series)

    def quantiles(self, series: int = 0) -> dict[float, pd.DataFrame]:
        return {q: self.quantile(q, series) for q in self.quantile_levels}

    def calibrated(self, calibration: PathCalibration, last_close: Sequence[float]) -> Forecast:
        """A copy with the paths calibrated (`kronos_kit.calibration`) around each series' last history close."""
        paths = apply_path_calibration(self.paths, np.asarray(last_close, dtype=np.float64), calibration)
        return Forecast(paths, self.timestamps, self.columns, self.quantile_levels)

    def handed_over(self, handover: Handover, history: pd.DataFrame, *, seed: int | None) -> Forecast:
        """A copy of a one-series forecast as a run hands it over (naive members drawn from `history`, seeded)."""
        bars = _lowercase_features(history, "history").reindex(columns=list(FEATURE_COLUMNS), fill_value=0.0)
        paths = handover.forecast(self.paths, bars.to_numpy(np.float64)[None], seed=seed)
        return Forecast(paths, self.timestamps, self.columns, self.quantile_levels)


class KronosPredictor:
    """Forecast OHLCV bars with a Kronos predictor and its (frozen) tokenizer.

    The reference's constructor and `predict`/`predict_batch` signatures, so existing code runs.
    Models run in eval() during a call and get their previous mode back afterwards.
    """

    def __init__(
        self,
        model: Kronos,
        tokenizer: KronosTokenizer,
        device: str | torch.device | None = None,
        max_context: int = DEFAULT_MAX_CONTEXT,
        clip: float = 5,
    ):
        check_pair(tokenizer, model)
        if max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model, self.tokenizer = model.to(self.device), tokenizer.to(self.device)
        self.max_context, self.clip = max_context, clip

    # ------------------------------------------------------------------ inputs
    def _prepare(self, df: pd.DataFrame, x_timestamp, y_timestamp, pred_len: int, where: str):
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"{where}: history must be a pandas DataFrame, got {type(df).__name__}")
        df = _lowercase_features(df, where)
        missing = [c for c in PRICE_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{where}: price columns {missing} not found; columns are {list(df.columns)}")
        if "volume" not in df.columns:  # the reference fills both with 0 when volume is absent
            df = df.assign(volume=0.0, amount=0.0)
        if "amount" not in df.columns:
            df = df.assign(amount=fill_amount(df["volume"], *(df[c] for c in PRICE_COLUMNS)))
        # column by column (selecting a list of columns costs ~1 ms a call in pandas), stored column-major as
        # pandas gives it: the mean and std below sum each column pairwise, and a row-major copy would
        # sum in another order and change their last bits, and so the tokens
        values = np.array([df[c].to_numpy(dtype=np.float64) for c in FEATURE_COLUMNS]).T
        bad = ~np.isfinite(values)
        if bad.any():
            rows, cols = np.nonzero(bad)
            raise ValueError(
                f"{where}: history has {bad.sum()} NaN/inf values, first in column "
                f"{FEATURE_COLUMNS[cols[0]]!r} at rows {sorted(set(rows.tolist()))[:5]}; fill or drop them first"
            )
        if len(df) < 2:
            raise ValueError(f"{where}: history has {len(df)} bar(s); at least 2 are needed to normalise it")
        if len(x_timestamp) != len(df):
            raise ValueError(f"{where}: x_timestamp has {len(x_timestamp)} entries but the history has {len(df)} rows")
        if len(y_timestamp) != pred_len:
            raise ValueError(f"{where}: y_timestamp has {len(y_timestamp)} entries but pred_len is {pred_len}")
        x = values.astype(np.float32)
        mean, std = x.mean(0), x.std(0)
        x = normalize(x, mean, std, self.clip)
        return x, mean, std, _datetime_index(x_timestamp), _datetime_index(y_timestamp)

    # ------------------------------------------------------------------ core
    def predict_paths_batch(
        self,
        df_list: Sequence[pd.DataFrame],
        x_timestamp_list: Sequence,
        y_timestamp_list: Sequence,
        pred_len: int,
        T: float = DEFAULT_TEMPERATURE,
        top_k: int = 0,
        top_p: float = DEFAULT_TOP_P,
        sample_count: int = 1,
        verbose: bool = True,
        *,
        use_cache: bool = True,
        sliding: str = "exact",
        reference_filtering: bool = False,
        seed: int | None = None,
        quantile_levels: Sequence[float] | None = None,
    ) -> Forecast:
        """Every sample path for each series, generated in one batched pass.

        Histories must share one length (as the reference requires); `seed` makes sampling
        reproducible without touching the global RNG. `T <= GREEDY_TEMPERATURE` is greedy; `pred_len`
        may exceed `max_context` (see `decode_forecast`). Every argument is checked before any model runs.
        """
        pred_len = _check_count("pred_len", pred_len)
        sample_count = _check_count("sample_count", sample_count)
        sampler = Sampler(T, top_k, top_p, reference_filtering)
        _check_sliding(sliding)
        if not (len(df_list) == len(x_timestamp_list) == len(y_timestamp_list)) or not df_list:
            raise ValueError(
                f"df_list, x_timestamp_list and y_timestamp_list must be non-empty and equally long; got "
                f"{len(df_list)}, {len(x_timestamp_list)}, {len(y_timestamp_list)}"
            )
        prepared = [self._prepare(df, xt, yt, pred_len, f"series {i}")
                    for i, (df, xt, yt) in enumerate(zip(df_list, x_timestamp_list, y_timestamp_list))]
        lengths = {len(p[0]) for p in prepared}
        if len(lengths) > 1:
            raise ValueError(f"all histories must have the same length for a batch; got lengths {sorted(lengths)}")
        x = torch.from_numpy(np.stack([p[0] for p in prepared])).to(self.device)
        stamps = torch.from_numpy(_stacked_time_stamps([p[3:] for p in prepared])).to(self.device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        with inference(self.model, self.tokenizer):
            s1, s2 = self.tokenizer.encode(x, half=True)
            tokens1, tokens2 = generate_tokens(
                self.model, s1, s2, stamps, pred_len, max_context=self.max_context, sample_count=sample_count,
                sampler=sampler, use_cache=use_cache, sliding=sliding, generator=generator, progress=verbose,
            )
            decoded = decode_forecast(self.tokenizer, tokens1, tokens2, pred_len, max_context=self.max_context,
                                      sample_count=sample_count, use_cache=use_cache)
        preds = decoded.float().cpu().numpy().reshape(len(prepared), sample_count, pred_len, len(FEATURE_COLUMNS))
        mean = np.stack([p[1] for p in prepared])[:, None, None]
        std = np.stack([p[2] for p in prepared])[:, None, None]
        paths = denormalize(preds, std=std, mean=mean)
        extra = {} if quantile_levels is None else {"quantile_levels": tuple(quantile_levels)}
        return Forecast(paths, [p[4] for p in prepared], **extra)

    def predict_paths(self, df, x_timestamp, y_timestamp, pred_len, T=DEFAULT_TEMPERATURE, top_k=0,
                      top_p=DEFAULT_TOP_P, sample_count=1, verbose=True, **kwargs) -> Forecast:
        """Every sample path of one series (see `predict_paths_batch`)."""
        return self.predict_paths_batch([df], [x_timestamp], [y_timestamp], pred_len, T, top_k, top_p,
                                        sample_count, verbose, **kwargs)

    # ------------------------------------------------------------------ reference API
    def predict(self, df, x_timestamp, y_timestamp, pred_len, T=DEFAULT_TEMPERATURE, top_k=0, top_p=DEFAULT_TOP_P,
                sample_count=1, verbose=True, **kwargs) -> pd.DataFrame:
        """Mean forecast path as a DataFrame indexed by `y_timestamp` (the reference's return)."""
        return self.predict_paths(df, x_timestamp, y_timestamp, pred_len, T, top_k, top_p, sample_count,
                                  verbose, **kwargs).mean(0)

    def predict_batch(self, df_list, x_timestamp_list, y_timestamp_list, pred_len, T=DEFAULT_TEMPERATURE, top_k=0,
                      top_p=DEFAULT_TOP_P, sample_count=1, verbose=True, **kwargs) -> list[pd.DataFrame]:
        """Mean forecast path of each series (the reference's return)."""
        fc = self.predict_paths_batch(df_list, x_timestamp_list, y_timestamp_list, pred_len, T, top_k, top_p,
                                      sample_count, verbose, **kwargs)
        return [fc.mean(i) for i in range(len(df_list))]

    def as_forecast_fn(self, T: float = DEFAULT_TEMPERATURE, top_k: int = 0, top_p: float = DEFAULT_TOP_P,
                       seed: int | None = 0, **kwargs) -> Callable[..., np.ndarray]:
        """Adapter for evaluation: (histories, x_ts, y_ts, pred_len, sample_count) -> paths array."""

        def forecast(histories, x_timestamps, y_timestamps, pred_len, sample_count):
            return self.predict_paths_batch(histories, x_timestamps, y_timestamps, pred_len, T, top_k, top_p,
                                            sample_count, verbose=False, seed=seed, **kwargs).paths

        return forecast


def _lowercase_features(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Rename OHLCV columns written in any letter case (Open, CLOSE) to the canonical lowercase names."""
    found: dict[str, object] = {}
    for col in df.columns:
        name = str(col).strip().lower()
        if name in FEATURE_COLUMNS:
            if name in found:
                raise ValueError(f"{where}: columns {found[name]!r} and {col!r} both name {name!r}; keep one")
            found[name] = col
    renames = {col: name for name, col in found.items() if col != name}
    return df.rename(columns=renames) if renames else df  # renaming copies the frame: only when needed


# ---------------------------------------------------------------------- forecasting a frame


def future_timestamps(timestamps: pd.Series | pd.DatetimeIndex | Sequence, horizon: int) -> pd.DatetimeIndex:
    """The `horizon` bar times after the last of `timestamps`, at the series' most frequent interval.

    Daily bars (a modal interval of exactly one day) with no bar on a Saturday or Sunday continue
    on business days, Monday to Friday (holidays are not known, so a holiday gets a bar). Every
    other interval continues in plain multiples of it: intraday bars do not skip nights, breaks or
    weekends, since the data does not say when a session closes.
    """
    horizon = _check_count("horizon", horizon)
    ts = pd.DatetimeIndex(pd.to_datetime(timestamps))
    if len(ts) < 2:
        raise ValueError(f"future_timestamps: need at least 2 timestamps to know the bar interval, got {len(ts)}")
    if not ts.is_monotonic_increasing or ts.has_duplicates:
        raise ValueError("future_timestamps: timestamps must be strictly increasing; sort them and drop duplicates")
    step = pd.Timedelta(int(modal_step(nanoseconds(ts), np.array([0]))[0]), unit="ns")
    last = ts[-1]
    if (pd.Timestamp.max - last.tz_localize(None)) / step < horizon * 7 / 5:  # business days: 7/5 calendar days each
        raise ValueError(f"horizon {horizon}: {horizon} bars of {step} after {last} would run past "
                         f"{pd.Timestamp.max:%Y-%m-%d}, the last time a timestamp holds; forecast fewer bars")
    if step == pd.Timedelta(days=1) and (ts.day_of_week < 5).all():
        return pd.DatetimeIndex([last + pd.offsets.BDay(k) for k in range(1, horizon + 1)])
    return pd.DatetimeIndex([last + step * k for k in range(1, horizon + 1)])


def _check_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
    levels = tuple(float(q) for q in quantiles)
    bad = [q for q in levels if not 0 <= q <= 1]  # NaN fails too
    if bad:
        raise ValueError(f"quantiles must be in [0, 1], got {bad}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"quantiles must be distinct, got {list(levels)}")
    return tuple(sorted(levels))


def forecast_frame(
    predictor: KronosPredictor,
    frame: pd.DataFrame,
    *,
    horizon: int,
    sample_count: int = 32,
    quantiles: Sequence[float] = (0.1, 0.5, 0.9),
    seed: int | None = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = 0,
    lookback: int | None = None,
    progress: bool = False,
    calibration: PathCalibration | None = None,
    handover: Handover | None = None,
) -> pd.DataFrame:
    """Forecast the `horizon` bars after the end of each symbol's data, as one tidy frame.

    `frame` is the canonical long frame of `kronos_kit.data.load_ohlcv` (symbol, timestamps, OHLCV,
    amount). Each symbol's last `lookback` bars (default: the predictor's `max_context`) are its
    history; its future bar times come from `future_timestamps` over all its bars. Each symbol is
    forecast on its own with the same `seed` (common random numbers, as the evaluation does), so
    its forecast does not depend on the other symbols in the frame, and a rerun is identical.
    `calibration` (a run's path calibration, fitted on validation) is applied to every symbol's paths
    before they are summarized, then `handover` (a run's handed-over forecast: the ensemble with naive
    forecasts drawn from the symbol's own history with `seed`, and the tails).

    Every sampled bar is made a valid candle before the summaries (`data.schema.repair_candles`: the model
    decodes each channel on its own), so each row's mean, median and every quantile level are valid candles
    (low <= min(open, close), high >= max(open, close)); the share of sampled bars that needed it is reported.

    Returns one row per symbol and step, sorted by symbol then step: `symbol`, `timestamp`, `step`
    (1..horizon), then per channel (open, high, low, close, volume, amount) `<channel>_mean`,
    `<channel>_median` and `<channel>_q<level>` for each quantile, ascending (`close_q0.1`). The
    settings are kept in `attrs["forecast"]`, with `candles` (the rule, the repaired share) and
    `point_forecast` (what the median is: a no-change forecast when the calibration centers it at 0).
    """
    require_canonical(frame, "forecast_frame")
    starts, ends, names = symbol_bounds(frame, "forecast_frame")
    horizon = _check_count("horizon", horizon)
    levels = _check_quantiles(quantiles)
    lookback = predictor.max_context if lookback is None else lookback
    lookback = _check_count("lookback", lookback, minimum=2)
    short = [f"{n} ({b - a} bar)" for n, a, b in zip(names, starts, ends) if b - a < 2]
    if short:
        raise ValueError(f"forecast_frame: symbols {short} have 1 bar; at least 2 are needed per symbol")
    parts, repaired = [], []
    for name, a, b in tqdm(list(zip(names, starts, ends)), desc="forecast", unit="symbol", disable=not progress,
                           delay=2):  # shown only when the symbols take a while
        bars = frame.iloc[a:b]
        history = bars.iloc[-lookback:]
        fc = predictor.predict_paths(
            history[list(FEATURE_COLUMNS)], history["timestamps"], future_timestamps(bars["timestamps"], horizon),
            horizon,
            T=temperature, top_k=top_k, top_p=top_p, sample_count=sample_count, verbose=False, seed=seed,
        )
        if calibration is not None:
            fc = fc.calibrated(calibration, [float(history["close"].iloc[-1])])
        if handover is not None:
            fc = fc.handed_over(handover, history[list(FEATURE_COLUMNS)], seed=seed)
        paths, needed = repair_candles(fc.paths)  # after the hand-over: the naive members' bars are candles too
        repaired.append(float(needed.mean()))
        fc = Forecast(paths, fc.timestamps, fc.columns, fc.quantile_levels)
        parts.append(fc.summary(quantiles=levels).assign(symbol=name))
    out = pd.concat(parts, ignore_index=True)
    out = out[["symbol", *out.columns[:-1]]]
    calibration = calibration or PathCalibration()
    out.attrs["forecast"] = {"horizon": horizon, "sample_count": sample_count, "quantiles": list(levels),
                             "seed": seed, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                             "lookback": lookback, "max_context": predictor.max_context,
                             "path_calibration": calibration.describe(),
                             "handover": (handover or IDENTITY_HANDOVER).describe(),
                             "candles": {"rule": CANDLE_RULE, "repaired_share": float(np.mean(repaired))},
                             "point_forecast": describe_point_forecast(calibration, handover)}
    return out



# ---------------------------------------------------------------------- forecast skill on fixed origins


class ForecastSkill:
    """Close CRPS and close MAE of a (predictor, tokenizer) pair on fixed walk-forward origins of `frame`.

    Origins (`data.forecast_origins`: every `stride` bars, thinned to `max_origins`) and the inputs at
    them are built once; each call forecasts `sample_count` paths per origin with the KV-cached
    `KronosPredictor` in eval mode and the given `seed` (common random numbers: every model and every
    call draws the same noise, and the global RNG is not touched, so training resumes exactly).
    Batching and seeding follow `evaluate.walk_forward`, so the numbers equal its `close_crps` and
    `close_mae` for the same origins and sampling. Phase 2 scores it on the validation split.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        *,
        lookback: int,  # history bars per origin
        pred_len: int,  # bars forecast per origin
        stride: int,  # bars between origins before thinning
        max_origins: int | None,  # cap, evenly spaced in time (None: every origin)
        sample_count: int,  # paths per origin
        seed: int = 0,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        top_k: int = 0,
        max_context: int = DEFAULT_MAX_CONTEXT,
        batch_size: int = 32,  # origins per forecaster call (as walk_forward)
    ):
        frame = walk_forward_frame(frame)
        origins = forecast_origins(frame, lookback=lookback, pred_len=pred_len, stride=stride, max_origins=max_origins)
        if origins.empty:
            raise ValueError(f"ForecastSkill: no origin with {lookback} history bars and {pred_len} target bars; "
                             "lower the horizon / lookback or enlarge the split")
        rows = origins["row"].to_numpy()
        self.n_origins, self.pred_len, self.sample_count, self.seed = len(rows), pred_len, sample_count, seed
        self.sampler = Sampler(temperature, top_k, top_p)  # checked now, not at the first validation
        self.max_context = max_context
        self.batches = [origin_inputs(frame, rows[i : i + batch_size], lookback=lookback, pred_len=pred_len)
                        for i in range(0, len(rows), batch_size)]
        close = frame["close"].to_numpy(np.float64)
        self.realized = close[rows[:, None] + np.arange(1, pred_len + 1)]  # (N, pred_len)

    def __call__(self, model: Kronos, tokenizer: KronosTokenizer) -> dict[str, float]:
        """{"val_crps": mean close CRPS, "val_mae": mean |median path - realized| of the close}."""
        predictor = KronosPredictor(model, tokenizer, max_context=self.max_context)
        s = self.sampler
        paths = np.concatenate([
            predictor.predict_paths_batch(*batch, self.pred_len, s.temperature, s.top_k, s.top_p, self.sample_count,
                                          verbose=False, seed=self.seed).paths[..., metrics.CLOSE]
            for batch in self.batches
        ])  # (N, S, pred_len)
        crps = metrics.crps(paths, self.realized, axis=1).mean(axis=1)
        mae = np.abs(metrics.point_forecast(paths, "median") - self.realized).mean(axis=1)
        return {"val_crps": float(crps.mean()), "val_mae": float(mae.mean())}


# ---------------------------------------------------------------------- the forecaster a run promotes


DEFAULT_SAMPLING = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P}  # when nothing was calibrated


@dataclass
class RunForecaster:
    """The forecaster a run directory hands on: the promoted pair and the sampling fitted on validation."""

    predictor: KronosPredictor
    promoted: str  # "finetuned" or "base", as promoted.json says
    tokenizer_source: str  # where the tokenizer was loaded from
    predictor_source: str
    sampling: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SAMPLING))  # temperature, top_p
    calibrated: bool = False  # True when `sampling` and `path_calibration` come from calibration.json
    path_calibration: PathCalibration = field(default_factory=PathCalibration)  # applied to every sampled path
    lookback: int | None = None  # bars of history per forecast: the run's data.lookback (None: max_context)
    handover: Handover = field(default_factory=lambda: IDENTITY_HANDOVER)  # then ensemble + tails (calibration.json)

    def forecast_frame(self, frame: pd.DataFrame, *, horizon: int, **kwargs: Any) -> pd.DataFrame:
        """`forecast_frame` with this run's predictor, sampling, path calibration, handover and history length (the
        run's data.lookback); keywords override them (`handover=None`: the calibrated model alone)."""
        return forecast_frame(self.predictor, frame, horizon=horizon,
                              **{**self.sampling, "calibration": self.path_calibration, "lookback": self.lookback,
                                 "handover": self.handover, **kwargs})

    def predict_paths(self, df: pd.DataFrame, x_timestamp, y_timestamp, pred_len: int, sample_count: int = 32,
                      *, model_only: bool = False, **kwargs: Any) -> Forecast:
        """`KronosPredictor.predict_paths` at the run's sampling, path calibration, then (not `model_only`) handover."""
        sampling = {"T": self.sampling["temperature"], "top_p": self.sampling["top_p"], "verbose": False, **kwargs}
        fc = self.predictor.predict_paths(df, x_timestamp, y_timestamp, pred_len, sample_count=sample_count,
                                          **sampling)
        fc = fc.calibrated(self.path_calibration, [float(_lowercase_features(df, "history")["close"].iloc[-1])])
        return fc if model_only else fc.handed_over(self.handover, df, seed=kwargs.get("seed"))


def read_run_choice(run_dir: str | os.PathLike, *, calibrated: bool = True) -> RunChoice:
    """The promoted pair and its sampling: `runs.run_choice(run_dir, calibrated=calibrated)`."""
    return run_choice(run_dir, calibrated=calibrated)


def load_run_forecaster(
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    calibrated: bool = True,  # False: ignore calibration.json and sample with the kit's defaults
) -> RunForecaster:
    """The promoted tokenizer + predictor of a run directory with its calibration (`read_run_choice`);
    its `forecast_frame` uses the run's data.lookback bars of history, as the run was trained and evaluated.

    Use `rf.predict_paths(df, x_timestamp, y_timestamp, pred_len)` or `rf.forecast_frame(frame, horizon=...)`:
    both sample as calibrated and calibrate the paths (`rf.predictor` alone gives the paths as sampled).
    """
    choice = run_choice(run_dir, calibrated=calibrated)
    Sampler(choice.sampling["temperature"], 0, choice.sampling["top_p"])  # a clear error for out-of-range values
    predictor = KronosPredictor(Kronos.from_pretrained(choice.predictor_source, device=device),
                                KronosTokenizer.from_pretrained(choice.tokenizer_source, device=device),
                                device=device, max_context=max(max_context, choice.lookback))
    where = f"{run_dir}/calibration.json"
    return RunForecaster(predictor, choice.promoted, choice.tokenizer_source, choice.predictor_source, choice.sampling,
                         choice.calibrated, PathCalibration.from_dict(choice.path_calibration, where=where),
                         lookback=choice.lookback, handover=Handover.from_dict(choice.handover, where=where))


__all__ = ["DEFAULT_SAMPLING", "GREEDY_TEMPERATURE", "Forecast", "ForecastSkill", "KronosPredictor", "RunChoice",
           "RunForecaster", "Sampler", "decode_forecast", "filter_logits", "forecast_frame", "future_timestamps",
           "generate_tokens", "load_run_forecaster", "read_run_choice", "time_stamps"]
