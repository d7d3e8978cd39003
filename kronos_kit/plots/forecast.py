"""Figures for forecast evaluation: fan chart, error by horizon, coverage, return scatter, PIT.

Each function takes an :class:`kronos_kit.evaluate.EvaluationResult` and returns a
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

from kronos_kit import metrics as M
from kronos_kit.metrics import CLOSE, FEATURES
from kronos_kit.plots.candles import draw_candles

if TYPE_CHECKING:
    from kronos_kit.evaluate import EvaluationResult

__all__ = [
    "plot_fan_chart",
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
    ohlc = pd.DataFrame(hist[:, :4], columns=list(FEATURES[:4]))
    draw_candles(ax, ohlc, x=np.arange(1 - len(hist), 1), label="history")
    paths = result.samples[model][origin, :, :, CLOSE]
    steps = np.arange(1, paths.shape[1] + 1)
    last = result.last_close[origin]
    # the fan starts at the last observed close so it visibly continues the candles
    xs = np.r_[0, steps]
    if paths.shape[0] > 1:
        q05, q25, q75, q95 = np.quantile(paths, (0.05, 0.25, 0.75, 0.95), axis=0)
        ax.fill_between(xs, np.r_[last, q05], np.r_[last, q95], color=_FAN_COLOR, alpha=0.18, label="90% band")
        ax.fill_between(xs, np.r_[last, q25], np.r_[last, q75], color=_FAN_COLOR, alpha=0.35, label="50% band")
    ax.plot(xs, np.r_[last, np.median(paths, axis=0)], color=_FAN_COLOR, lw=2, label=f"{model} median")
    real = result.realized[origin, :, CLOSE]
    ax.plot(xs, np.r_[last, real], color=_REALIZED_COLOR, lw=1.5, ls="--", marker=".", label="realized close")
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    when = pd.Timestamp(result.origin_time[origin])
    ax.set_title(f"{result.symbols[origin]} @ {when:%Y-%m-%d %H:%M}: {model}, {paths.shape[0]} paths")
    ax.set_xlabel("bars from origin")
    ax.set_ylabel("price")
    ax.legend(loc="best", fontsize="small")
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
    c = FEATURES.index(channel)
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
    c = FEATURES.index(channel)
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
