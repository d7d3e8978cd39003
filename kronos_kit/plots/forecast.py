"""Figures for forecast evaluation: fan chart, error by horizon, coverage, return scatter, PIT.

Each function takes an :class:`kronos_kit.evaluate.EvaluationResult` (``plot_forecast``: a
:class:`kronos_kit.forecast.Forecast` and its history) and returns a
:class:`matplotlib.figure.Figure` built without pyplot that displays inline in a notebook (see
:mod:`kronos_kit.plots.figure`); pass ``ax=`` to draw into your own axes instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kronos_kit import metrics as M
from kronos_kit.data.schema import FEATURE_COLUMNS, PRICE_COLUMNS
from kronos_kit.metrics import CLOSE
from kronos_kit.plots.candles import draw_candles
from kronos_kit.plots.figure import bar_time_axis, figure_and_axes, legend_outside, new_figure

if TYPE_CHECKING:
    from kronos_kit.evaluate import EvaluationResult
    from kronos_kit.forecast import Forecast

__all__ = [
    "plot_fan_chart",
    "plot_fan_comparison",
    "plot_forecast",
    "plot_error_by_horizon",
    "plot_coverage",
    "plot_return_scatter",
    "plot_pit_histogram",
]

_REALIZED_COLOR = "black"
_FAN_COLOR = "tab:blue"
_HISTORY_SWATCH = {"facecolor": "0.7", "edgecolor": "0.35"}  # neutral: candles are both green and red
MIN_PIT_PATHS = 20  # below this many sample paths a PIT histogram is too coarse to judge calibration


def _stamp(t: object) -> str:
    """A bar time as text, without a time of day for a bar at midnight (daily data)."""
    t = pd.Timestamp(t)
    return f"{t:%Y-%m-%d}" if t == t.normalize() else f"{t:%Y-%m-%d %H:%M}"


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
    legend: bool = True,
) -> list:
    """The fan chart body shared by :func:`plot_fan_chart`, :func:`plot_fan_comparison` and :func:`plot_forecast`.

    ``history`` (L, 6) bars in FEATURE_COLUMNS order, drawn at x = 1 - L .. 0 as candles for a price channel
    (a line otherwise); ``paths`` (S, H) sample paths of channel ``channel`` at x = 1 .. H, summarised
    as the median and one central band per level (from 2 paths up); ``realized`` (<= H,) the realized
    values of the channel (None or empty: nothing drawn). Median, bands and the realized path start at
    the last observed value so they visibly continue the history. Returns the legend handles (the
    candles as one neutral swatch), drawn as the axes' legend when ``legend``.
    """
    name = FEATURE_COLUMNS[channel]
    xs_hist = np.arange(1 - len(history), 1)
    handles: list = []
    if channel < 4:
        ohlc = pd.DataFrame(history[:, :4], columns=list(PRICE_COLUMNS))
        draw_candles(ax, ohlc, x=xs_hist)
        handles.append(Patch(**_HISTORY_SWATCH, label="history"))
    else:
        handles += ax.plot(xs_hist, history[:, channel], color="grey", lw=1.2, label=f"history {name}")
    last = history[-1, channel]
    steps = np.arange(1, paths.shape[1] + 1)
    xs = np.r_[0, steps]
    bands = _band_quantiles(levels)
    if paths.shape[0] > 1 and bands:
        alphas = np.linspace(0.18, 0.35, len(bands)) if len(bands) > 1 else [0.25]
        for (level, lo, hi), alpha in zip(bands, alphas):
            q_lo, q_hi = np.quantile(paths, (lo, hi), axis=0)
            handles.append(ax.fill_between(xs, np.r_[last, q_lo], np.r_[last, q_hi], color=color, alpha=alpha,
                                           label=f"{level:.0%} band"))
    handles += ax.plot(xs, np.r_[last, np.median(paths, axis=0)], color=color, lw=2,
                       label=f"{label} median" if label else "median")
    if realized is not None and len(realized):
        real = np.asarray(realized, dtype=np.float64)[: paths.shape[1]]
        handles += ax.plot(xs[: len(real) + 1], np.r_[last, real], color=_REALIZED_COLOR, lw=1.5, ls="--",
                           marker=".", label=f"realized {name}")
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("bars from origin")
    ax.set_ylabel("price" if channel < 4 else name)
    ax.grid(alpha=0.25)
    if legend:
        ax.legend(handles=handles, loc="best", fontsize="small", framealpha=0.85)
    return handles


def _bar_times(result: EvaluationResult, origin: int, frame: pd.DataFrame, n_history: int) -> pd.DatetimeIndex:
    """Times of the last ``n_history`` history bars and the horizon bars of ``origin``, from the evaluated frame."""
    symbol, pos = result.symbols[origin], int(result.origin_pos[origin])
    part = frame[frame["symbol"] == symbol] if "symbol" in frame.columns else frame
    times = pd.DatetimeIndex(pd.to_datetime(part["timestamps"]).sort_values(kind="stable"))
    horizon = result.realized.shape[1]
    if pos + horizon >= len(times) or pd.Timestamp(times[pos]) != pd.Timestamp(result.origin_time[origin]):
        raise ValueError(f"frame does not hold origin {origin} ({symbol} @ {_stamp(result.origin_time[origin])}) "
                         "at its evaluated position: pass the frame the evaluation ran on (e.g. data.splits.test).")
    return times[pos + 1 - n_history : pos + 1 + horizon]


def _origin_fan(ax: Axes, result: EvaluationResult, origin: int, model: str, *, history_bars: int | None,
                frame: pd.DataFrame | None, legend: bool = True, label: str | None = None) -> list:
    """Draw one model's fan at one origin (x in bars from the origin, dates on the ticks with ``frame``)."""
    if model not in result.samples:
        raise ValueError(f"no sample paths for {model!r}; models with paths: {list(result.samples)}")
    if not 0 <= origin < result.n_origins:
        raise ValueError(f"origin {origin} out of range: the evaluation has {result.n_origins} origins")
    hist = result.history[origin]
    if history_bars is not None:
        hist = hist[-history_bars:]
    paths = result.samples[model][origin, :, :, CLOSE]
    handles = _draw_fan(ax, hist, paths, realized=result.realized[origin, :, CLOSE],
                        label=model if label is None else label, legend=legend)
    if frame is not None:
        bar_time_axis(ax, _bar_times(result, origin, frame, len(hist)), first=1 - len(hist))
    else:
        ax.set_xlabel(f"bars from origin (0 = {_stamp(result.origin_time[origin])})")
    return handles


def plot_fan_chart(
    result: EvaluationResult,
    origin: int,
    model: str,
    *,
    history_bars: int | None = 60,
    frame: pd.DataFrame | None = None,
    ax: Axes | None = None,
) -> Figure:
    """One origin: history candles, the model's median close with 50% and 90% bands, the realized close.

    x is in bars relative to the origin (0 = last history bar); ``frame``, the frame the evaluation
    ran on (e.g. ``data.splits.test``), puts the bars' dates on the ticks. ``history_bars`` trims the
    candles shown (None = the whole lookback). The title names the symbol and the origin's time.
    """
    fig, ax = figure_and_axes(ax, (10, 4.5))
    _origin_fan(ax, result, origin, model, history_bars=history_bars, frame=frame)
    n_paths = result.samples[model].shape[1]
    ax.set_title(f"{result.symbols[origin]} @ {_stamp(result.origin_time[origin])}: {model}, {n_paths} paths")
    return fig


def plot_fan_comparison(
    result: EvaluationResult,
    origin: int,
    models: Sequence[str] = ("base", "finetuned"),
    *,
    history_bars: int | None = 30,
    frame: pd.DataFrame | None = None,
) -> Figure:
    """The fan charts of several models at one origin side by side, on one price axis.

    Each panel is :func:`plot_fan_chart`'s body; its title gives the model's close CRPS and median MAE
    at this origin, and one legend below serves all panels. ``frame`` (the evaluated frame) puts dates
    on the x axis.
    """
    models = list(models)
    if not models:
        raise ValueError("plot_fan_comparison: name at least one model")
    fig = new_figure((min(16.0, 1.0 + 5.5 * len(models)), 4.8))
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    handles: list = []
    for ax, model in zip(axes, models):
        handles = _origin_fan(ax, result, origin, model, history_bars=history_bars, frame=frame, legend=False,
                              label="")
        real = result.realized[origin, :, CLOSE]
        paths = result.samples[model][origin, :, :, CLOSE]  # (S, H)
        crps = float(M.crps(paths, real, axis=0).mean())
        mae = float(np.abs(np.median(paths, axis=0) - real).mean())
        ax.set_title(f"{model}: CRPS {crps:.4g}, median MAE {mae:.4g}", fontsize="medium")
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    shape = result.samples[models[0]].shape
    fig.suptitle(f"{result.symbols[origin]} @ {_stamp(result.origin_time[origin])}: close, "
                 f"{shape[1]} paths x {shape[2]} steps, realized dashed")
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

    fig, ax = figure_and_axes(ax, (10, 4.5))
    _draw_fan(ax, values, paths, channel=c, realized=real, levels=levels, label=label)
    past, future = _times(hist), forecast.timestamps[series]
    if past is not None:  # x ticks read as times; bars stay evenly spaced across session breaks
        bar_time_axis(ax, list(past) + list(future), first=1 - len(hist))
    if title is None:
        start = f" from {_stamp(future[0])}" if len(future) else ""
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
    fig, ax = figure_and_axes(ax, (7, 4))
    for name in _path_models(result, models):
        values = np.asarray(result.scores[name]["by_step"][metric][channel], dtype=np.float64)
        style = "-" if result.kinds[name] == "model" else "--"
        ax.plot(np.arange(1, len(values) + 1), values, style, marker=".", label=name)
    ax.set_xlabel("horizon step")
    ax.set_ylabel(f"{channel} {metric.upper()}")
    ax.set_title(f"{channel} {metric.upper()} by horizon step ({result.n_origins} origins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", framealpha=0.85)
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
    fig, ax = figure_and_axes(ax, (5, 5))
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
    """Predicted vs realized horizon return of the close: the points, y = x (a perfect forecast) dashed,
    the least-squares line, IC and RankIC in the title.

    The axes keep their own ranges (predicted returns are usually far narrower than realized ones), so
    a fit much flatter than y = x means the direction may be right but the size is shrunk.
    """
    fig, ax = figure_and_axes(ax, (5.5, 5))
    pred, real = result.horizon_returns(model)
    ax.scatter(pred, real, s=12, alpha=0.6, label="origins")
    ok = np.isfinite(pred) & np.isfinite(real)
    ax.axline((0.0, 0.0), slope=1.0, color="0.3", ls="--", lw=1, label="y = x (perfect)")
    if ok.sum() >= 2 and np.ptp(pred[ok]) > 0:
        slope, intercept = np.polyfit(pred[ok], real[ok], 1)
        xs = np.linspace(pred[ok].min(), pred[ok].max(), 2)
        ax.plot(xs, slope * xs + intercept, color="tab:red", label=f"least squares: slope {slope:.3g}")
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ic, ric = M.pearson(pred, real), M.spearman(pred, real)
    ax.set_title(f"{model}: IC {ic:.3f}, RankIC {ric:.3f} (n={int(ok.sum())})")
    ax.set_xlabel("predicted horizon return")
    ax.set_ylabel("realized horizon return")
    ax.legend(loc="best", fontsize="small", framealpha=0.85)
    return fig


def plot_pit_histogram(
    result: EvaluationResult,
    model: str,
    *,
    channel: str = "close",
    bins: int = 10,
    min_paths: int = MIN_PIT_PATHS,
    ax: Axes | None = None,
) -> Figure:
    """PIT histogram (randomised for ties) of one model over all origins and steps; flat = calibrated.

    Bars are densities, so a calibrated forecast sits on the dashed line at 1; a U shape means the
    bands are too narrow, a hump too wide. The dotted lines are +-2 standard errors of a bin of a
    calibrated forecast if the PIT values were independent (steps of one origin are not, so read them
    as a lower bound on the noise). The title states the number of paths and values; with fewer than
    ``min_paths`` paths a note says the histogram is too coarse to judge.
    """
    fig, ax = figure_and_axes(ax, (7.5, 4))
    c = FEATURE_COLUMNS.index(channel)
    samples = result.samples[model][..., c]
    n_paths = samples.shape[1]
    pit = M.pit_values(samples, result.realized[..., c], randomize=True, rng=np.random.default_rng(0))
    n_values = int(np.isfinite(pit).sum())
    density = M.pit_histogram(pit, bins) * bins
    edges = np.linspace(0, 1, bins + 1)
    ax.bar(edges[:-1], density, width=1 / bins, align="edge", edgecolor="white", label="PIT density")
    ax.axhline(1.0, color="black", ls="--", lw=1, label="uniform (calibrated)")
    if n_values:
        se = bins * np.sqrt((1 / bins) * (1 - 1 / bins) / n_values)
        for k, sign in enumerate((-1, 1)):
            ax.axhline(1 + sign * 2 * se, color="0.35", ls=":", lw=1.2, label=None if k else "±2 s.e. if independent")
    if n_paths < min_paths:
        ax.text(0.5, 0.97, f"only {n_paths} paths (< {min_paths}): each PIT is known only to 1/{n_paths};\n"
                "this histogram cannot judge calibration reliably",
                transform=ax.transAxes, ha="center", va="top", fontsize="small", color="tab:red",
                bbox={"facecolor": "white", "edgecolor": "tab:red", "alpha": 0.9})
    ax.set_xlim(0, 1)
    headroom = 1.45 if n_paths < min_paths else 1.15  # room for the note above the bars
    ax.set_ylim(0, max(2.0, float(np.max(density, initial=0.0)) * headroom))
    ax.set_xlabel("PIT")
    ax.set_ylabel("density")
    ax.set_title(f"{model}: {channel} PIT, {n_paths} paths, {n_values:,} values")
    legend_outside(ax)
    return fig
