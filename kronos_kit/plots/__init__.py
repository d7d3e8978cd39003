"""Every matplotlib figure of the kit; each function returns a Figure and never calls plt.show()."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from kronos_kit.plots.candles import draw_candles, plot_candles
from kronos_kit.plots.codebook import (
    plot_bit_balance,
    plot_channel_errors,
    plot_code_candle,
    plot_code_heatmap,
    plot_rank_frequency,
    plot_reconstruction,
    plot_window_reconstruction,
)
from kronos_kit.plots.forecast import (
    plot_coverage,
    plot_error_by_horizon,
    plot_fan_chart,
    plot_forecast,
    plot_pit_histogram,
    plot_return_scatter,
)
from kronos_kit.plots.training import plot_selection_curves, plot_training_curves
from kronos_kit.runs import atomic_write


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Figure:
    """Write a figure as PNG (folders created) and return it, so a notebook cell still shows it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    return fig


__all__ = [
    "save_figure",
    "plot_training_curves",
    "plot_selection_curves",
    "draw_candles",
    "plot_bit_balance",
    "plot_candles",
    "plot_channel_errors",
    "plot_code_candle",
    "plot_code_heatmap",
    "plot_coverage",
    "plot_error_by_horizon",
    "plot_fan_chart",
    "plot_forecast",
    "plot_pit_histogram",
    "plot_rank_frequency",
    "plot_reconstruction",
    "plot_return_scatter",
    "plot_window_reconstruction",
]
