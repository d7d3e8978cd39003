"""Forecasting with Kronos: KV-cached generation that keeps every sample path.

`KronosPredictor` keeps the reference's public API (`predict`, `predict_batch`: per-series z-score
of the history, clip, tokenize with the frozen tokenizer, generate s1 then s2 per step, decode the
last `max_context` tokens, de-normalize, return the mean path) and adds `predict_paths*`, which
return every path with mean, median and quantiles.

Generation is incremental: each new bar runs one position through the transformer against a
key/value cache, and the s2 layer reuses cached key/value projections of the context. Once
history plus generated bars exceed `max_context`, the reference drops the oldest bar and
recomputes the window from position 0. `sliding="exact"` (default) does the same, so results
equal the reference; it shares the history part of each window across sample paths, so many paths
cost little more than one. `sliding="approx"` (opt-in) instead drops the oldest cached position
and keeps going: much faster for long forecasts, but the remaining positions' hidden states still
reflect the dropped bars, so it no longer equals the reference.

Arguments are checked before any model runs. A temperature at or below `GREEDY_TEMPERATURE` (1e-5)
samples greedily (argmax): dividing logits by a smaller one overflows float32, and the distribution
is a point mass anyway. `top_k` keeps exactly k tokens (ties go to the lower token id). A horizon
longer than `max_context` is generated with the sliding window above and decoded in windows of
`max_context` tokens counted back from the last bar (the reference decodes only the last window,
which covers any horizon up to `max_context`, so results there are unchanged).

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

import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from kronos_kit import metrics
from kronos_kit.calibration import PathCalibration, apply_path_calibration
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
from kronos_kit.model import Kronos, KronosTokenizer, PredictorCache, check_pair
from kronos_kit.runs import RunChoice, run_choice
from kronos_kit.runtime import inference, tqdm

GREEDY_TEMPERATURE = 1e-5  # temperatures <= this take the argmax instead of sampling
SLIDING_MODES = ("exact", "approx")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_sliding(sliding: object) -> None:
    if sliding not in SLIDING_MODES:
        raise ValueError(f"sliding must be 'exact' or 'approx', got {sliding!r}")


def time_stamps(timestamps: pd.Series | pd.DatetimeIndex | Sequence) -> np.ndarray:
    """(T, 5) float32 calendar features (minute, hour, weekday, day, month), as the model takes them."""
    return time_features(pd.to_datetime(pd.Series(timestamps).to_numpy())).to_numpy(np.float32)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, *, reference: bool = False):
    """Mask logits outside the top-k and/or the top-p nucleus (at least one token always kept).

    Top-k keeps exactly k tokens; ties with the k-th largest logit go to the lower token ids.

    By default both filters apply when both are set. `reference=True` reproduces the reference,
    which applies only top-k when `top_k > 0` and ignores `top_p` then.
    """
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        above, tie = logits > kth, logits == kth
        # exactly k: of the tokens tied with the k-th largest, keep the lowest ids that fill k
        keep = above | (tie & (tie.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
        logits[~keep] = float("-inf")
        if reference:
            return logits
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits[remove.scatter(-1, order, remove)] = float("-inf")
    return logits


@dataclass(frozen=True)
class Sampler:
    """Temperature, top-k and top-p sampling of the next token; greedy (argmax) when
    `temperature <= GREEDY_TEMPERATURE`."""

    temperature: float = DEFAULT_TEMPERATURE  # >= 0; <= GREEDY_TEMPERATURE takes the argmax
    top_k: int = 0  # keep the k most likely tokens; 0 disables it
    top_p: float = DEFAULT_TOP_P  # keep the smallest set with this much probability; 1 disables it
    reference_filtering: bool = False  # True: top-k alone when both are set, as the reference

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (<= {GREEDY_TEMPERATURE:g} takes the "
                             f"argmax), got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 < p <= 1:  # NaN fails too
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.greedy:  # top-k and top-p always keep the largest logit; ties take the lowest id
            return logits.argmax(-1)
        logits = filter_logits(logits.float() / self.temperature, self.top_k, self.top_p,
                               reference=self.reference_filtering)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate_tokens(
    model: Kronos,
    s1: torch.Tensor,
    s2: torch.Tensor,
    stamps: torch.Tensor,
    pred_len: int,
    *,
    max_context: int,
    sample_count: int = 1,
    sampler: Sampler | None = None,
    use_cache: bool = True,
    sliding: str = "exact",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate `pred_len` (s1, s2) pairs after each history; `sample_count` paths per series.

    s1, s2: (N, H) history tokens; stamps: (N, H + pred_len, 5). Returns (N * sample_count,
    H + pred_len) token tensors, series-major (rows n * sample_count ... are series n's paths).
    Both paths draw random numbers in the same order, so a seeded generator gives the same tokens.
    """
    _check_sliding(sliding)
    sampler = sampler or Sampler()
    n, hist_len = s1.shape
    s1 = s1.repeat_interleave(sample_count, 0)
    s2 = s2.repeat_interleave(sample_count, 0)
    stamps_rows = stamps.repeat_interleave(sample_count, 0)
    tokens1 = torch.cat([s1, s1.new_zeros(s1.shape[0], pred_len)], 1)
    tokens2 = torch.cat([s2, s2.new_zeros(s2.shape[0], pred_len)], 1)
    step = _CachedStepper(model, tokens1, tokens2, stamps, stamps_rows, n, sample_count, max_context, sliding) \
        if use_cache else None
    for i in tqdm(range(pred_len), desc="forecast", unit="bar", disable=not progress, leave=False):
        cur = hist_len + i  # tokens known so far
        if step is None:
            start = max(0, cur - max_context)
            logits1, context = model.decode_s1(tokens1[:, start:cur], tokens2[:, start:cur],
                                               stamps_rows[:, start:cur])
            next1 = sampler(logits1[:, -1], generator)
            next2 = sampler(model.decode_s2(context, next1[:, None])[:, -1], generator)
        else:
            logits1, last_context = step.advance(cur)
            next1 = sampler(logits1, generator)
            next2 = sampler(model.decode_s2_step(last_context, next1, step.cache), generator)
        tokens1[:, cur], tokens2[:, cur] = next1, next2
    return tokens1, tokens2


def decode_forecast(
    tokenizer: KronosTokenizer, tokens1: torch.Tensor, tokens2: torch.Tensor, pred_len: int, *, max_context: int
) -> torch.Tensor:
    """Decode the last `pred_len` token pairs into (B, pred_len, d_in) normalised bars.

    As the reference, the last `max_context` tokens are decoded together and the forecast bars
    among them kept; a longer horizon continues in windows of `max_context` tokens counted back
    from the end (the tokenizer is causal, so no bar is decoded from later tokens).
    """
    parts, end, first = [], tokens1.shape[1], tokens1.shape[1] - pred_len
    while end > first:
        start = max(0, end - max_context)
        decoded = tokenizer.decode([tokens1[:, start:end], tokens2[:, start:end]], half=True)
        parts.append(decoded[:, max(start, first) - start :])
        end = start
    return torch.cat(parts[::-1], dim=1)


class _CachedStepper:
    """Keeps a predictor cache in step with the token buffers during generation."""

    def __init__(self, model, tokens1, tokens2, stamps, stamps_rows, n_series, samples, max_context, sliding):
        self.model, self.tokens1, self.tokens2 = model, tokens1, tokens2
        self.stamps, self.stamps_rows = stamps, stamps_rows
        self.n_series, self.samples, self.max_context, self.sliding = n_series, samples, max_context, sliding
        self.hist_len = 0  # set on the first advance
        self.cache: PredictorCache | None = None

    def _run(self, start: int, end: int, rows_are_series: bool):
        """Feed positions [start, end) into the cache; rows are series (N) or paths (N * samples)."""
        rows = slice(None, None, self.samples) if rows_are_series else slice(None)
        stamps = self.stamps[:, start:end] if rows_are_series else self.stamps_rows[:, start:end]
        logits, context = self.model.decode_s1(self.tokens1[rows, start:end], self.tokens2[rows, start:end],
                                               stamps, cache=self.cache)
        self.model.extend_s2_cache(context, self.cache)
        return logits[:, -1], context[:, -1:]

    def _rebuild(self, start: int, cur: int, hist_len: int):
        """Recompute the window [start, cur) from position 0, sharing the history part per series."""
        self.cache = PredictorCache.empty(self.model.n_layers)
        logits, context = None, None
        if start < hist_len:
            logits, context = self._run(start, min(hist_len, cur), rows_are_series=True)
            self.cache.repeat_interleave(self.samples)
            logits = logits.repeat_interleave(self.samples, 0)
            context = context.repeat_interleave(self.samples, 0)
        if cur > max(start, hist_len):
            logits, context = self._run(max(start, hist_len), cur, rows_are_series=False)
        return logits, context

    def advance(self, cur: int):
        """s1 logits and last context for the window ending at token `cur` (exclusive)."""
        if self.cache is None:  # first step: everything known is history
            self.hist_len = cur
            return self._rebuild(max(0, cur - self.max_context), cur, cur)
        if cur <= self.max_context:
            return self._run(cur - 1, cur, rows_are_series=False)
        if self.sliding == "approx":
            self.cache.drop_front(self.cache.length + 1 - self.max_context)
            return self._run(cur - 1, cur, rows_are_series=False)
        return self._rebuild(cur - self.max_context, cur, self.hist_len)


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
            df["volume"], df["amount"] = 0.0, 0.0
        if "amount" not in df.columns:
            df["amount"] = fill_amount(df["volume"], *(df[c] for c in PRICE_COLUMNS))
        values = df[list(FEATURE_COLUMNS)].to_numpy(dtype=np.float64)
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
        stamps = np.concatenate([time_stamps(x_timestamp), time_stamps(y_timestamp)])
        future = pd.DatetimeIndex(pd.to_datetime(pd.Series(y_timestamp).to_numpy()))
        return x, stamps, mean, std, future

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
        stamps = torch.from_numpy(np.stack([p[1] for p in prepared])).to(self.device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        with inference(self.model, self.tokenizer):
            s1, s2 = self.tokenizer.encode(x, half=True)
            tokens1, tokens2 = generate_tokens(
                self.model, s1, s2, stamps, pred_len, max_context=self.max_context, sample_count=sample_count,
                sampler=sampler, use_cache=use_cache, sliding=sliding, generator=generator, progress=verbose,
            )
            decoded = decode_forecast(self.tokenizer, tokens1, tokens2, pred_len, max_context=self.max_context)
        preds = decoded.float().cpu().numpy().reshape(len(prepared), sample_count, pred_len, len(FEATURE_COLUMNS))
        mean = np.stack([p[2] for p in prepared])[:, None, None]
        std = np.stack([p[3] for p in prepared])[:, None, None]
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
    return df.rename(columns={col: name for name, col in found.items() if col != name})


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
) -> pd.DataFrame:
    """Forecast the `horizon` bars after the end of each symbol's data, as one tidy frame.

    `frame` is the canonical long frame of `kronos_kit.data.load_ohlcv` (symbol, timestamps, OHLCV,
    amount). Each symbol's last `lookback` bars (default: the predictor's `max_context`) are its
    history; its future bar times come from `future_timestamps` over all its bars. Each symbol is
    forecast on its own with the same `seed` (common random numbers, as the evaluation does), so
    its forecast does not depend on the other symbols in the frame, and a rerun is identical.
    `calibration` (a run's path calibration, fitted on validation) is applied to every symbol's paths
    before they are summarized.

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
        paths, needed = repair_candles(fc.paths)
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
                             "candles": {"rule": CANDLE_RULE, "repaired_share": float(np.mean(repaired))},
                             "point_forecast": calibration.point_forecast()}
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

    def forecast_frame(self, frame: pd.DataFrame, *, horizon: int, **kwargs: Any) -> pd.DataFrame:
        """`forecast_frame` with this run's predictor, sampling, path calibration and history length (the run's
        data.lookback, recorded in the table's attrs["forecast"]["lookback"]); keywords override them."""
        return forecast_frame(self.predictor, frame, horizon=horizon,
                              **{**self.sampling, "calibration": self.path_calibration, "lookback": self.lookback,
                                 **kwargs})

    def predict_paths(self, df: pd.DataFrame, x_timestamp, y_timestamp, pred_len: int, sample_count: int = 32,
                      **kwargs: Any) -> Forecast:
        """`KronosPredictor.predict_paths` at this run's sampling, then its path calibration."""
        sampling = {"T": self.sampling["temperature"], "top_p": self.sampling["top_p"], "verbose": False, **kwargs}
        fc = self.predictor.predict_paths(df, x_timestamp, y_timestamp, pred_len, sample_count=sample_count,
                                          **sampling)
        return fc.calibrated(self.path_calibration, [float(_lowercase_features(df, "history")["close"].iloc[-1])])


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
    return RunForecaster(predictor, choice.promoted, choice.tokenizer_source, choice.predictor_source,
                         choice.sampling, choice.calibrated,
                         PathCalibration.from_dict(choice.path_calibration, where=f"{run_dir}/calibration.json"),
                         lookback=choice.lookback)


__all__ = ["DEFAULT_SAMPLING", "GREEDY_TEMPERATURE", "Forecast", "ForecastSkill", "KronosPredictor", "RunChoice",
           "RunForecaster", "Sampler", "decode_forecast", "filter_logits", "forecast_frame", "future_timestamps",
           "generate_tokens", "load_run_forecaster", "read_run_choice", "time_stamps"]
