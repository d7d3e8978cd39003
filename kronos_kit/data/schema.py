"""The canonical OHLCV schema and what every part of the kit shares about it: column names, the
normalisation and its inverse, the amount fill, `DataError`, `DataNotice`, `time_features` and the
per-symbol block helpers. Each of these constants and formulas exists here only."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from kronos_kit.model.predictor import TIME_FEATURE_COLUMNS  # the predictor's stamp columns, in its order

COLUMNS = ("symbol", "timestamps", "open", "high", "low", "close", "volume", "amount")
PRICE_COLUMNS = ("open", "high", "low", "close")
FEATURE_COLUMNS = (*PRICE_COLUMNS, "volume", "amount")  # the order of the model's 6 inputs
NORM_EPS = 1e-5  # the reference's std guard in `normalize` / `denormalize`, for series at levels of 1 and above
NORM_EPS_FLOOR = 1e-30  # the guard's level for an all-zero series (volume 0), whose z-score is 0 anyway
CONTEXT_COLUMN = "is_context"  # set by `split`: True for look-back rows borrowed from the previous split
SHOW = 5  # offending rows quoted in an error message


class DataError(ValueError):
    """Input data the kit refuses; the message names the source, column, rows at fault and the fix."""


class DataNotice(UserWarning):
    """Something the loader filled, sorted or repaired (also kept in ``frame.attrs["notices"]``)."""


def notify(notices: list[str], message: str) -> None:
    """Record a notice and warn, pointing the warning at the caller outside this package."""
    notices.append(message)
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(__package__ or "-"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DataNotice, stacklevel=level)


def norm_scale(mean, std):
    """The divisor of `normalize`: ``std + NORM_EPS * min(1, |mean|)``. The guard keeps a flat series finite;
    at levels of 1 and above it is the reference's constant 1e-5, below it shrinks with the level, so a series
    quoted around 1e-5 (a low-priced token, a BTC-quoted pair) keeps its own spread instead of being swamped by
    it (and a price scaled by any factor normalizes the same). NumPy (keeps the dtype) or torch."""
    level = abs(mean).clip(NORM_EPS_FLOOR, 1.0)
    return std + NORM_EPS * level


def normalize(x, mean, std, clip: float):
    """z-score with a scale-relative guard (`norm_scale`), clipped to +-clip: ``clip((x - mean) / scale)``.

    Works on NumPy arrays (keeping their dtype); `mean`/`std` broadcast against `x`.
    """
    return np.clip((x - mean) / norm_scale(mean, std), -clip, clip)


def denormalize(x, mean, std):
    """The inverse of `normalize` (before clipping): ``x * norm_scale(mean, std) + mean``; NumPy or torch."""
    return x * norm_scale(mean, std) + mean


def fill_amount(volume, open_, high, low, close):
    """The amount the reference fills when a source has none: volume * mean(open, high, low, close)."""
    return volume * ((open_ + high + low + close) / 4.0)


CANDLE_RULE = ("high = max(high, open, close), low = min(low, open, close), volume and amount at least 0, "
               "per sample path and bar")


def repair_candles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sampled bars as valid candles (`CANDLE_RULE`): the model decodes each channel on its own, so a sampled bar
    can have its low above its close. `values` (..., 6) in `FEATURE_COLUMNS` order; returns the repaired copy and
    a boolean mask (...) of the bars that needed it. Summaries taken per channel at one level (mean, median, any
    quantile) of repaired paths are valid candles too: high >= open on every path keeps the q-quantile of the
    highs at or above the q-quantile of the opens."""
    out = np.array(values, dtype=np.float64, copy=True)
    o, h, lo, c, v, a = (out[..., k] for k in range(6))
    top, bottom = np.maximum(o, c), np.minimum(o, c)
    needed = (h < top) | (lo > bottom) | (v < 0) | (a < 0)
    out[..., 1], out[..., 2] = np.maximum(h, top), np.minimum(lo, bottom)
    out[..., 4], out[..., 5] = np.maximum(v, 0.0), np.maximum(a, 0.0)
    return out, needed


def time_features(timestamps: pd.Series | pd.DatetimeIndex | Sequence | np.ndarray) -> pd.DataFrame:
    """Calendar features as the Kronos reference computes them: columns exactly
    ``minute, hour, weekday (Monday=0), day (of month, 1..31), month (1..12)``, int64.

    Zoned times give the local wall-clock fields. A Series keeps its index.
    """
    index = timestamps.index if isinstance(timestamps, pd.Series) else None
    try:
        ts = pd.DatetimeIndex(timestamps)
    except (ValueError, TypeError) as exc:
        raise DataError(f"time_features: timestamps could not be read as times ({exc}).") from None
    fields = {"minute": ts.minute, "hour": ts.hour, "weekday": ts.day_of_week, "day": ts.day, "month": ts.month}
    return pd.DataFrame({name: fields[name] for name in TIME_FEATURE_COLUMNS}, index=index).astype("int64")


def nanoseconds(timestamps: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Times as int64 nanoseconds (UTC instants when zoned), whatever the stored resolution."""
    return pd.DatetimeIndex(timestamps).as_unit("ns").asi8


def require_canonical(frame: pd.DataFrame, where: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{where}: expected a DataFrame from load_ohlcv, got {type(frame).__name__}.")
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: frame lacks column(s) {missing}; columns found: {list(frame.columns)}. "
                        "Build it with load_ohlcv(...).")
    if len(frame) == 0:
        raise DataError(f"{where}: frame has no rows.")


def symbol_bounds(frame: pd.DataFrame, where: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Start/end row of each symbol's block; refuse frames not sorted by symbol then time."""
    sym = frame["symbol"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, sym[1:] != sym[:-1]])
    ends = np.r_[starts[1:], len(sym)]
    names = [str(s) for s in sym[starts]]
    ts = nanoseconds(frame["timestamps"])
    step = np.diff(ts)
    inner = np.ones(len(sym) - 1, bool)
    inner[starts[1:] - 1] = False  # differences across a symbol boundary do not count
    if len(set(names)) != len(names) or (step[inner] <= 0).any():
        raise DataError(f"{where}: frame is not sorted by symbol then strictly increasing time; "
                        "build it with load_ohlcv(...) (which sorts and refuses duplicate times).")
    return starts, ends, names


def modal_step(ts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Most frequent timestamp difference of each symbol (ns; 0 for a single bar)."""
    out = np.zeros(len(starts), np.int64)
    for k, (a, b) in enumerate(zip(starts, np.r_[starts[1:], len(ts)])):  # one pass per symbol
        d = np.diff(ts[a:b])
        if len(d):
            vals, counts = np.unique(d, return_counts=True)
            out[k] = vals[np.argmax(counts)]
    return out


