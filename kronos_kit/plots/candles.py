"""Candlestick drawing with plain matplotlib primitives (vlines for wicks, bars for bodies).

`draw_candles` draws onto any Axes and is shared by other figures (e.g. reconstruction overlays);
`plot_candles` makes the standard price-and-volume figure of one symbol. Figures are built
without pyplot (headless, no global state) and display inline (see `kronos_kit.plots.figure`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from kronos_kit.data.schema import PRICE_COLUMNS
from kronos_kit.plots.figure import bar_time_axis, new_figure

UP_COLOR = "#26a69a"  # close >= open
DOWN_COLOR = "#ef5350"  # close < open


class CandleArtists(NamedTuple):
    wicks: LineCollection
    bodies: BarContainer


def _ohlc_array(ohlc: pd.DataFrame | np.ndarray) -> np.ndarray:
    """(N, 4) float array in order open, high, low, close, from a DataFrame (any column case) or array."""
    if isinstance(ohlc, pd.DataFrame):
        lower = {str(c).lower(): c for c in ohlc.columns}
        missing = [c for c in PRICE_COLUMNS if c not in lower]
        if missing:
            raise ValueError(f"draw_candles: DataFrame lacks {missing}; columns found: {list(ohlc.columns)}.")
        return ohlc[[lower[c] for c in PRICE_COLUMNS]].to_numpy(np.float64)
    arr = np.asarray(ohlc, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"draw_candles: expected an (N, 4) open/high/low/close array, got shape {arr.shape}.")
    return arr


def draw_candles(
    ax: Axes,
    ohlc: pd.DataFrame | np.ndarray,
    *,
    x: np.ndarray | pd.Series | pd.DatetimeIndex | None = None,
    width: float = 0.6,  # body width as a fraction of the median spacing of x
    up_color: str = UP_COLOR,
    down_color: str = DOWN_COLOR,
    alpha: float = 1.0,
    label: str | None = None,
) -> CandleArtists:
    """Draw candlesticks on ``ax``: a wick from low to high and a body from open to close.

    ``ohlc`` is a DataFrame with open/high/low/close columns or an (N, 4) array in that order.
    ``x`` defaults to 0..N-1; datetimes are accepted (matplotlib date units). Rows with a missing
    value are skipped. ``label`` names the bodies once in a legend. Returns the two artists.
    """
    values = _ohlc_array(ohlc)
    if x is None:
        xs = np.arange(len(values), dtype=np.float64)
    else:
        xs = pd.Series(x).to_numpy()
        if len(xs) != len(values):
            raise ValueError(f"draw_candles: x has {len(xs)} positions for {len(values)} candles.")
        if np.issubdtype(xs.dtype, np.datetime64):
            import matplotlib.dates as mdates

            xs = mdates.date2num(xs)
        xs = xs.astype(np.float64)
    keep = np.isfinite(values).all(axis=1) & np.isfinite(xs)
    xs, values = xs[keep], values[keep]
    o, h, lo, c = values.T
    colors = np.where(c >= o, up_color, down_color)
    spacing = float(np.median(np.diff(np.sort(xs)))) if len(xs) > 1 else 1.0
    wicks = ax.vlines(xs, lo, h, colors=colors, linewidth=1.0, alpha=alpha, zorder=2)
    # an edge in the body colour keeps doji (open == close) visible as a line
    bodies = ax.bar(xs, np.abs(c - o), width=width * spacing, bottom=np.minimum(o, c), color=colors,
                    edgecolor=colors, linewidth=0.8, alpha=alpha, label=label, zorder=3)
    return CandleArtists(wicks, bodies)


def plot_candles(
    frame: pd.DataFrame,
    *,
    symbol: str | None = None,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    max_bars: int = 300,
    volume: bool = True,
) -> Figure:
    """Candlestick figure of one symbol from a canonical frame (see `kronos_kit.data.load_ohlcv`).

    ``symbol`` defaults to the first one in the frame; ``start``/``end`` bound the times
    (inclusive); of what remains the last ``max_bars`` bars are drawn. Bars sit at consecutive
    positions (no blank space over nights or weekends) with dates on the ticks. ``volume`` adds a
    volume panel below. The title names the symbol, the range and the bars shown.
    """
    if "symbol" in frame.columns:
        symbols = pd.unique(frame["symbol"])
        symbol = str(symbols[0]) if symbol is None else symbol
        if symbol not in set(symbols):
            raise ValueError(f"plot_candles: symbol {symbol!r} not in frame; symbols: {list(symbols[:10])}.")
        part = frame[frame["symbol"] == symbol]
    else:
        part = frame
    times = pd.DatetimeIndex(part["timestamps"])

    def bound(value: str | pd.Timestamp) -> pd.Timestamp:  # naive bounds read in the frame's zone
        t = pd.Timestamp(value)
        return t.tz_localize(times.tz) if t.tz is None and times.tz is not None else t

    keep = np.ones(len(part), bool)
    if start is not None:
        keep &= times >= bound(start)
    if end is not None:
        keep &= times <= bound(end)
    part, times = part[keep], times[keep]
    if len(part) == 0:
        raise ValueError(f"plot_candles: no bars for {symbol or 'the frame'} between {start} and {end}.")
    total = len(part)
    if max_bars is not None and total > max_bars:
        part, times = part.iloc[-max_bars:], times[-max_bars:]

    fig = new_figure((11, 5.5 if volume else 4.5))
    if volume:
        price_ax, vol_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    else:
        price_ax, vol_ax = fig.subplots(1, 1), None
    xs = np.arange(len(part))
    draw_candles(price_ax, part)
    price_ax.set_ylabel("price")
    price_ax.grid(alpha=0.25)
    if vol_ax is not None:
        up = part["close"].to_numpy() >= part["open"].to_numpy()
        vol_ax.bar(xs, part["volume"].to_numpy(), width=0.6, color=np.where(up, UP_COLOR, DOWN_COLOR))
        vol_ax.set_ylabel("volume")
        vol_ax.grid(alpha=0.25)
    bottom_ax = vol_ax if vol_ax is not None else price_ax
    bar_time_axis(bottom_ax, times)
    bottom_ax.set_xlim(-1, len(part))
    fmt = "%Y-%m-%d %H:%M" if (times != times.normalize()).any() else "%Y-%m-%d"
    shown = f"last {len(part)} of {total} bars" if len(part) < total else f"{total} bars"
    title = f"{symbol} " if symbol else ""
    price_ax.set_title(f"{title}{times[0].strftime(fmt)} .. {times[-1].strftime(fmt)}, {shown}")
    return fig
