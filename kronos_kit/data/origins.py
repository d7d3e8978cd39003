"""Forecast origins on a canonical long frame, and the model inputs at them.

One home for "where does a walk-forward forecast from, and what does the model see there", used by
the test evaluation (`kronos_kit.evaluate.walk_forward`) and by phase 2's forecast-skill probe on
the validation split (`kronos_kit.forecast.ForecastSkill`), so both score exactly the same origins.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .schema import FEATURE_COLUMNS


def walk_forward_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` sorted by (symbol, timestamps) with a fresh index and datetime timestamps (a copy)."""
    missing = {"symbol", "timestamps", *FEATURE_COLUMNS} - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks columns {sorted(missing)}")
    frame = frame.sort_values(["symbol", "timestamps"], kind="stable").reset_index(drop=True)
    frame["timestamps"] = pd.to_datetime(frame["timestamps"])
    return frame


def forecast_origins(
    frame: pd.DataFrame, *, lookback: int, pred_len: int, stride: int, max_origins: int | None = None
) -> pd.DataFrame:
    """Place forecast origins on a canonical long frame (sorted by symbol, time).

    An origin is the row of the last history bar. Per symbol the first origin is the earliest row with
    ``lookback`` bars of history whose next ``pred_len`` rows are all non-context (``is_context`` False,
    missing column = all False); then one every ``stride`` rows while the targets stay in the frame.
    ``max_origins`` thins the set to at most that many by keeping evenly spaced origin timestamps
    (all symbols of a kept timestamp stay, so cross-sections remain whole); which ones are kept never
    depends on the forecasts.

    Returns a frame with ``symbol``, ``row`` (positional index in ``frame``), ``pos`` (position within
    the symbol) and ``origin_time``.
    """
    if lookback < 2 or pred_len < 1 or stride < 1:
        raise ValueError("need lookback >= 2, pred_len >= 1, stride >= 1")
    ctx = frame["is_context"].to_numpy(bool) if "is_context" in frame else np.zeros(len(frame), bool)
    symbols = frame["symbol"].to_numpy()
    times = frame["timestamps"].to_numpy()
    starts = np.flatnonzero(np.r_[True, symbols[1:] != symbols[:-1]])
    ends = np.r_[starts[1:], len(frame)]
    rows = []
    for start, end in zip(starts, ends):
        n = end - start
        # context rows among (t, t + pred_len], for every t, from one cumulative sum
        cs = np.r_[0, np.cumsum(ctx[start:end])]
        t = np.arange(lookback - 1, n - pred_len)
        valid = t[(cs[t + pred_len + 1] - cs[t + 1]) == 0]
        if len(valid) == 0:
            continue
        grid = np.arange(valid[0], n - pred_len, stride)
        grid = grid[np.isin(grid, valid)]
        rows.append(pd.DataFrame({"symbol": symbols[start + grid], "row": start + grid, "pos": grid}))
    cols = {"symbol": [], "row": np.array([], int), "pos": np.array([], int)}
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(cols)
    out["origin_time"] = times[out["row"].to_numpy()] if len(out) else pd.Series([], dtype="datetime64[ns]")
    if max_origins is not None and len(out) > max_origins:
        stamps, inverse, counts = np.unique(out["origin_time"].to_numpy(), return_inverse=True, return_counts=True)
        keep = np.array([], int)
        for m in range(min(len(stamps), max_origins), 0, -1):
            keep = np.unique(np.linspace(0, len(stamps) - 1, m).round().astype(int))
            if counts[keep].sum() <= max_origins:
                break
        out = out[np.isin(inverse, keep)].reset_index(drop=True)
    return out


def origin_inputs(
    frame: pd.DataFrame, rows: np.ndarray, *, lookback: int, pred_len: int
) -> tuple[list[pd.DataFrame], list[pd.Series], list[pd.Series]]:
    """What a forecaster sees at origin rows `rows` of `frame` (see `walk_forward_frame`).

    Returns (histories, history timestamps, future timestamps): per origin the `lookback` feature
    rows ending at the origin (its symbol in `attrs["symbol"]`), their timestamps, and the
    `pred_len` timestamps after it.
    """
    stamps, names = frame["timestamps"], frame["symbol"].to_numpy()
    hists, hstamps, fstamps = [], [], []
    for r in rows:
        hist = frame.iloc[r - lookback + 1 : r + 1][list(FEATURE_COLUMNS)].reset_index(drop=True)
        hist.attrs["symbol"] = names[r]
        hists.append(hist)
        hstamps.append(stamps.iloc[r - lookback + 1 : r + 1].reset_index(drop=True))
        fstamps.append(stamps.iloc[r + 1 : r + pred_len + 1].reset_index(drop=True))
    return hists, hstamps, fstamps
