"""Figures of the universe evaluation (a panel): does the model rank the names, would a portfolio on it trade?

Each function takes a :class:`kronos_kit.evaluate.UniverseEvaluation` and returns a Figure of the test split
(``split="validation"`` for the other), one line or bar group per compared signal: finetuned and base (their
decision signal), the naive factors and the placebo. :func:`universe_figure` draws one by name, saves it and
returns it, or returns None when the data has no cross-section, so a notebook cell shows nothing then.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from kronos_kit.plots.figure import legend_outside, new_figure, save_figure

if TYPE_CHECKING:
    from kronos_kit.evaluate import UniverseEvaluation

__all__ = ["UNIVERSE_FIGURES", "plot_cumulative_excess", "plot_ic_by_horizon", "plot_ic_series",
           "plot_quantile_returns", "plot_turnover", "universe_figure"]

COLORS = {"finetuned": "tab:blue", "base": "tab:orange", "momentum": "tab:green", "reversal": "tab:purple",
          "placebo": "0.55"}
ROLLING_DATES = 6  # rebalance dates in the rolling mean of the IC series


def _entries(ev: UniverseEvaluation) -> dict[str, str]:
    return ev.entries()


def _days(ev: UniverseEvaluation, split: str, column: str) -> np.ndarray:
    book = ev.analyses[split].books[column]["topk"]
    return np.asarray(ev.results[split].grid.dates[book.days])


def plot_cumulative_excess(ev: UniverseEvaluation, *, split: str = "test") -> Figure:
    """Top: each signal's top-k portfolio, cumulative return after costs, and the equal-weight universe (black,
    dashed). Bottom: cumulative excess return over the universe, after costs (solid) and before (dotted).
    Returns are summed (qlib's convention), so a slope is a return per day."""
    fig = new_figure((10, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    books = ev.analyses[split].books
    for label, column in _entries(ev).items():
        book, days = books[column]["topk"], _days(ev, split, column)
        color = COLORS.get(label)
        top.plot(days, np.cumsum(book.net), color=color, label=label)
        bottom.plot(days, np.cumsum(book.excess), color=color, label=f"{label} after costs")
        bottom.plot(days, np.cumsum(book.excess_gross), color=color, ls=":", label=f"{label} before costs")
    first = books[ev.decision_signals["finetuned"]]["topk"]
    top.plot(_days(ev, split, ev.decision_signals["finetuned"]), np.cumsum(first.benchmark), color="black", ls="--",
             label="equal-weight universe")
    s = ev.settings
    top.set_title(f"Top-{s['topk']} dropout portfolios ({split}): cumulative return after costs")
    bottom.set_title("Cumulative excess return over the equal-weight universe")
    for ax in (top, bottom):
        ax.axhline(0, color="0.6", lw=0.8)
        ax.grid(alpha=0.3)
        ax.set_ylabel("summed daily return")
        legend_outside(ax)
    return fig


def plot_ic_by_horizon(ev: UniverseEvaluation, *, split: str = "test") -> Figure:
    """Mean per-date RankIC at each horizon 1..H with a 95% band (mean +- 1.96 Newey-West standard errors)."""
    fig = new_figure((8, 4.5))
    ax = fig.add_subplot()
    stats = ev.analyses[split].statistics
    for label, column in _entries(ev).items():
        by = stats[column]["by_horizon"]
        mean, t = np.asarray(by["rank_ic"], dtype=float), np.asarray(by["rank_ic_t"], dtype=float)
        h = np.arange(1, len(mean) + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            se = np.where(np.isfinite(t) & (t != 0), np.abs(mean / t), np.nan)
        ax.plot(h, mean, marker="o", color=COLORS.get(label), label=label)
        ax.fill_between(h, mean - 1.96 * se, mean + 1.96 * se, color=COLORS.get(label), alpha=0.12)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xlabel("horizon (bars after the signal)")
    ax.set_ylabel("mean RankIC")
    ax.set_title(f"IC decay: RankIC by horizon ({split}, band: 95% Newey-West)")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def plot_quantile_returns(ev: UniverseEvaluation, *, split: str = "test") -> Figure:
    """Mean forward return (bp, at the decision horizon) of each quantile group, one bar group per signal: a
    signal that ranks well rises from group 1 (lowest signal) to the top group."""
    fig = new_figure((9, 4.5))
    ax = fig.add_subplot()
    entries = _entries(ev)
    stats = ev.analyses[split].statistics
    q = ev.settings["n_quantiles"]
    width = 0.8 / len(entries)
    for i, (label, column) in enumerate(entries.items()):
        values = 1e4 * np.asarray(stats[column]["quantile_returns"], dtype=float)
        ax.bar(np.arange(1, q + 1) + (i - (len(entries) - 1) / 2) * width, values, width, color=COLORS.get(label),
               label=f"{label} (spread {1e4 * stats[column]['spread']:+.0f} bp)")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xticks(np.arange(1, q + 1))
    ax.set_xlabel("quantile group of the signal (1 = lowest)")
    ax.set_ylabel(f"mean {ev.settings['horizon']}-bar forward return (bp)")
    ax.set_title(f"Quantile returns ({split})")
    ax.grid(alpha=0.3, axis="y")
    legend_outside(ax)
    return fig


def plot_ic_series(ev: UniverseEvaluation, *, split: str = "test") -> Figure:
    """Per-date RankIC of the finetuned and base signals (points) with its rolling mean over
    :data:`ROLLING_DATES` dates (line): is the skill steady, or a few dates?"""
    fig = new_figure((10, 4.5))
    ax = fig.add_subplot()
    dates = np.asarray(ev.results[split].dates)
    for label, column in ev.decision_signals.items():
        series = np.asarray(ev.analyses[split].statistics[column]["series"]["rank_ic"], dtype=float)
        color = COLORS.get(label)
        ax.scatter(dates, series, s=10, color=color, alpha=0.45)
        rolling = np.array([np.nanmean(series[max(0, i - ROLLING_DATES + 1): i + 1])
                            if np.isfinite(series[max(0, i - ROLLING_DATES + 1): i + 1]).any() else np.nan
                            for i in range(len(series))])
        ax.plot(dates, rolling, color=color, label=f"{label}: mean {np.nanmean(series):+.3f}")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_ylabel(f"RankIC at horizon {ev.settings['horizon']}")
    ax.set_title(f"RankIC per rebalance date ({split}; line: rolling mean of {ROLLING_DATES} dates)")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def plot_turnover(ev: UniverseEvaluation, *, split: str = "test") -> Figure:
    """Share of the top-k book replaced at each rebalance (one-sided), per signal: what the costs are paid on."""
    fig = new_figure((10, 4))
    ax = fig.add_subplot()
    for label, column in _entries(ev).items():
        book = ev.analyses[split].books[column]["topk"]
        days = _days(ev, split, column)[book.rebalances]
        turnover = book.turnover[book.rebalances] / 2
        ax.plot(days, 100 * turnover, marker=".", lw=0.8, color=COLORS.get(label),
                label=f"{label}: mean {100 * turnover.mean():.0f}%")
    ax.set_ylabel("turnover per rebalance (%)")
    ax.set_title(f"Top-{ev.settings['topk']} dropout turnover ({split})")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


UNIVERSE_FIGURES: dict[str, tuple[Callable[..., Figure], str]] = {
    "cumulative": (plot_cumulative_excess, "03_universe_cumulative.png"),
    "ic_by_horizon": (plot_ic_by_horizon, "03_universe_ic_by_horizon.png"),
    "quantiles": (plot_quantile_returns, "03_universe_quantiles.png"),
    "ic_series": (plot_ic_series, "03_universe_ic_series.png"),
    "turnover": (plot_turnover, "03_universe_turnover.png"),
}
"""Name -> (figure function, file name in the run's figures/)."""


def universe_figure(ev: UniverseEvaluation, name: str, folder: str | Path, *, split: str = "test") -> Figure | None:
    """Figure ``name`` of :data:`UNIVERSE_FIGURES`, saved into ``folder``; None (nothing to show) without a
    cross-section."""
    if name not in UNIVERSE_FIGURES:
        raise ValueError(f"unknown universe figure {name!r}; choose one of {sorted(UNIVERSE_FIGURES)}")
    if not ev.exists:
        return None
    plot, file = UNIVERSE_FIGURES[name]
    return save_figure(plot(ev, split=split), Path(folder) / file)
