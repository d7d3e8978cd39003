"""Figures for forecast evaluation: fan chart, error by horizon, coverage, return scatter, PIT.

Each function takes an :class:`kronos_kit.evaluate.EvaluationResult` (``plot_forecast``: a
:class:`kronos_kit.forecast.Forecast` and its history) and returns a
:class:`matplotlib.figure.Figure` built without pyplot (headless-safe, never shown twice in a
notebook); pass ``ax=`` to draw into your own axes instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from kronos_kit import metrics as M
from kronos_kit.data.schema import FEATURE_COLUMNS, PRICE_COLUMNS
from kronos_kit.metrics import CLOSE
from kronos_kit.plots.candles import draw_candles

if TYPE_CHECKING:
    from kronos_kit.evaluate import EvaluationResult
    from kronos_kit.forecast import Forecast

__all__ = [
    "plot_fan_chart",
    "plot_forecast",
    "plot_error_by_horizon",
    "plot_coverage",
    "plot_return_scatter",
    "plot_pit_histogram",
]

_REALIZED_COLOR = "black"
_FAN_COLOR = "tab:blue"


def _fig_ax(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _path_models(result: EvaluationResult, models: Sequence[str] | None, min_samples: int = 1) -> list[str]:
    names = list(models) if models is not None else [n for n in result.names if n in result.samples]
    return [n for n in names if n in result.samples and result.samples[n].shape[1] >= min_samples]


def _band_quantiles(levels: Sequence[float]) -> list[tuple[float, float, float]]:
    """(level, lower q, upper q) of each central band, widest first."""
    out = []
    for level in sorted({float(v) for v in levels}, reverse=True):
        if not 0 < level < 1:
            raise ValueError(f"band levels must lie in (0, 1), got {level}")
        out.append((level, (1 - level) / 2, (1 + level) / 2))
    return out


def _draw_fan(
    ax: Axes,
    history: np.ndarray,
    paths: np.ndarray,
    *,
    channel: int = CLOSE,
    realized: np.ndarray | None = None,
    levels: Sequence[float] = (0.5, 0.9),
    label: str = "forecast",
    color: str = _FAN_COLOR,
) -> None:
    """The fan chart body shared by :func:`plot_fan_chart` and :func:`plot_forecast`.

    ``history`` (L, 6) bars in FEATURE_COLUMNS order, drawn at x = 1 - L .. 0 as candles for a price channel
    (a line otherwise); ``paths`` (S, H) sample paths of channel ``channel`` at x = 1 .. H, summarised
    as the median and one central band per level (from 2 paths up); ``realized`` (<= H,) the realized
    values of the channel (None or empty: nothing drawn). Median, bands and the realized path start at
    the last observed value so they visibly continue the history.
    """
    name = FEATURE_COLUMNS[channel]
    xs_hist = np.arange(1 - len(history), 1)
    if channel < 4:
        ohlc = pd.DataFrame(history[:, :4], columns=list(PRICE_COLUMNS))
        draw_candles(ax, ohlc, x=xs_hist, label="history")
    else:
        ax.plot(xs_hist, history[:, channel], color="grey", lw=1.2, label=f"history {name}")
    last = history[-1, channel]
    steps = np.arange(1, paths.shape[1] + 1)
    xs = np.r_[0, steps]
    bands = _band_quantiles(levels)
    if paths.shape[0] > 1 and bands:
        alphas = np.linspace(0.18, 0.35, len(bands)) if len(bands) > 1 else [0.25]
        for (level, lo, hi), alpha in zip(bands, alphas):
            q_lo, q_hi = np.quantile(paths, (lo, hi), axis=0)
            ax.fill_between(xs, np.r_[last, q_lo], np.r_[last, q_hi], color=color, alpha=alpha,
                            label=f"{level:.0%} band")
    ax.plot(xs, np.r_[last, np.median(paths, axis=0)], color=color, lw=2, label=f"{label} median")
    if realized is not None and len(realized):
        real = np.asarray(realized, dtype=np.float64)[: paths.shape[1]]
        ax.plot(xs[: len(real) + 1], np.r_[last, real], color=_REALIZED_COLOR, lw=1.5, ls="--", marker=".",
                label=f"realized {name}")
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("bars from origin")
    ax.set_ylabel("price" if channel < 4 else name)
    ax.legend(loc="best", fontsize="small")


def plot_fan_chart(
    result: EvaluationResult,
    origin: int,
    model: str,
    *,
    history_bars: int | None = 60,
    ax: Axes | None = None,
) -> Figure:
    """One origin: history candles, the model's median close with 50% and 90% bands, the realized close.

    x is in bars relative to the origin (0 = last history bar). ``history_bars`` trims the candles
    shown (None = the whole lookback).
    """
    fig, ax = _fig_ax(ax, (10, 4.5))
    hist = result.history[origin]
    if history_bars is not None:
        hist = hist[-history_bars:]
    paths = result.samples[model][origin, :, :, CLOSE]
    _draw_fan(ax, hist, paths, realized=result.realized[origin, :, CLOSE], label=model)
    when = pd.Timestamp(result.origin_time[origin])
    ax.set_title(f"{result.symbols[origin]} @ {when:%Y-%m-%d %H:%M}: {model}, {paths.shape[0]} paths")
    return fig


def _times(frame: pd.DataFrame) -> pd.DatetimeIndex | None:
    """A frame's bar times: its ``timestamps`` column, else a DatetimeIndex; None when it has neither."""
    if "timestamps" in frame.columns:
        return pd.DatetimeIndex(pd.to_datetime(frame["timestamps"].to_numpy()))
    if isinstance(frame.index, pd.DatetimeIndex):
        return frame.index
    return None


def plot_forecast(
    history: pd.DataFrame,
    forecast: Forecast,
    *,
    series: int = 0,
    realized: pd.DataFrame | None = None,
    history_bars: int | None = 60,
    channel: str = "close",
    levels: Sequence[float] = (0.5, 0.9),
    title: str | None = None,
    label: str = "forecast",
    ax: Axes | None = None,
) -> Figure:
    """Fan chart of one series of a :class:`~kronos_kit.forecast.Forecast`, as :func:`plot_fan_chart` draws it.

    ``history`` holds the bars the forecast was made from (open, high, low, close; volume and
    amount optional; a ``timestamps`` column or DatetimeIndex labels the x ticks), of which the last
    ``history_bars`` are drawn (None = all). The median of the sample paths and one central band per
    entry of ``levels`` are drawn for ``channel``; ``realized`` (rows after the history, may be
    shorter than the horizon or None when the future is unknown) adds the realized path. x is in
    bars from the origin (0 = last history bar); ``label`` names the forecast in the legend.
    """
    if channel not in FEATURE_COLUMNS:
        raise ValueError(f"channel must be one of {list(FEATURE_COLUMNS)}, got {channel!r}")
    if not 0 <= series < forecast.paths.shape[0]:
        raise ValueError(f"series {series} out of range: the forecast holds {forecast.paths.shape[0]} series")
    c = FEATURE_COLUMNS.index(channel)
    missing = [f for f in PRICE_COLUMNS if f not in history.columns]
    if missing or (c >= 4 and channel not in history.columns):
        raise ValueError(f"history lacks columns {missing or [channel]}; columns are {list(history.columns)}")
    if len(history) == 0:
        raise ValueError("history is empty: the fan chart continues the last history bar")
    hist = history if history_bars is None else history.iloc[-history_bars:]
    values = np.full((len(hist), len(FEATURE_COLUMNS)), np.nan)
    for k, f in enumerate(FEATURE_COLUMNS):
        if f in hist.columns:
            values[:, k] = hist[f].to_numpy(np.float64)
    col = list(forecast.columns).index(channel)
    paths = forecast.paths[series, :, :, col]
    real = None
    if realized is not None and len(realized):
        if channel not in realized.columns:
            raise ValueError(f"realized lacks column {channel!r}; columns are {list(realized.columns)}")
        real = realized[channel].to_numpy(np.float64)

    fig, ax = _fig_ax(ax, (10, 4.5))
    _draw_fan(ax, values, paths, channel=c, realized=real, levels=levels, label=label)
    past, future = _times(hist), forecast.timestamps[series]
    if past is not None:  # x ticks read as times; bars stay evenly spaced across session breaks
        stamps = list(past) + list(future)
        first = 1 - len(hist)
        fmt = "%Y-%m-%d %H:%M" if any(t != t.normalize() for t in stamps) else "%Y-%m-%d"

        def tick(x: float, _pos: int) -> str:
            i = int(round(x)) - first
            return stamps[i].strftime(fmt) if abs(x - round(x)) < 1e-6 and 0 <= i < len(stamps) else ""

        ax.xaxis.set_major_formatter(FuncFormatter(tick))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.tick_params(axis="x", labelrotation=20)
        ax.set_xlabel("bar time (evenly spaced bars)")
    if title is None:
        start = f" from {pd.Timestamp(future[0]):%Y-%m-%d %H:%M}" if len(future) else ""
        shown = "no realized path" if real is None else f"{len(real)} realized"
        title = f"{label}: {paths.shape[0]} paths x {paths.shape[1]} steps{start} ({shown})"
    ax.set_title(title)
    return fig


def plot_error_by_horizon(
    result: EvaluationResult,
    *,
    channel: str = "close",
    metric: str = "mae",
    models: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Point error (default MAE of the close) per horizon step, one line per model and path baseline."""
    fig, ax = _fig_ax(ax, (7, 4))
    for name in _path_models(result, models):
        values = np.asarray(result.scores[name]["by_step"][metric][channel], dtype=np.float64)
        style = "-" if result.kinds[name] == "model" else "--"
        ax.plot(np.arange(1, len(values) + 1), values, style, marker=".", label=name)
    ax.set_xlabel("horizon step")
    ax.set_ylabel(f"{channel} {metric.upper()}")
    ax.set_title(f"{channel} {metric.upper()} by horizon step ({result.n_origins} origins)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_coverage(
    result: EvaluationResult,
    *,
    channel: str = "close",
    levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    models: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Empirical coverage of central intervals vs nominal level, with the diagonal (perfect calibration).

    Only forecasts with at least 2 sample paths have intervals; point baselines are left out.
    """
    fig, ax = _fig_ax(ax, (5, 5))
    c = FEATURE_COLUMNS.index(channel)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="nominal")
    for name in _path_models(result, models, min_samples=2):
        cov = M.interval_coverage(result.samples[name][..., c], result.realized[..., c], tuple(levels))
        ax.plot(list(cov), [float(v.mean()) for v in cov.values()], marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal central-interval level")
    ax.set_ylabel("empirical coverage")
    ax.set_title(f"{channel} interval coverage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_return_scatter(result: EvaluationResult, model: str, *, ax: Axes | None = None) -> Figure:
    """Predicted vs realized horizon return of the close, least-squares line, IC and RankIC in the title."""
    fig, ax = _fig_ax(ax, (5.5, 5))
    pred, real = result.horizon_returns(model)
    ax.scatter(pred, real, s=12, alpha=0.6)
    ok = np.isfinite(pred) & np.isfinite(real)
    if ok.sum() >= 2 and np.ptp(pred[ok]) > 0:
        slope, intercept = np.polyfit(pred[ok], real[ok], 1)
        xs = np.linspace(pred[ok].min(), pred[ok].max(), 2)
        ax.plot(xs, slope * xs + intercept, color="tab:red", label=f"fit: slope {slope:.3g}")
        ax.legend(fontsize="small")
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ic, ric = M.pearson(pred, real), M.spearman(pred, real)
    ax.set_title(f"{model}: IC {ic:.3f}, RankIC {ric:.3f} (n={int(ok.sum())})")
    ax.set_xlabel("predicted horizon return")
    ax.set_ylabel("realized horizon return")
    return fig


def plot_pit_histogram(
    result: EvaluationResult, model: str, *, channel: str = "close", bins: int = 10, ax: Axes | None = None
) -> Figure:
    """PIT histogram (randomised for ties) of one model over all origins and steps; flat = calibrated.

    Bars are densities, so a calibrated forecast sits on the dashed line at 1; a U shape means the
    bands are too narrow, a hump too wide.
    """
    fig, ax = _fig_ax(ax, (6, 4))
    c = FEATURE_COLUMNS.index(channel)
    pit = M.pit_values(result.samples[model][..., c], result.realized[..., c], randomize=True,
                       rng=np.random.default_rng(0))
    density = M.pit_histogram(pit, bins) * bins
    edges = np.linspace(0, 1, bins + 1)
    ax.bar(edges[:-1], density, width=1 / bins, align="edge", edgecolor="white")
    ax.axhline(1.0, color="black", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("PIT")
    ax.set_ylabel("density")
    ax.set_title(f"{model}: {channel} PIT ({result.samples[model].shape[1]} paths)")
    return fig
