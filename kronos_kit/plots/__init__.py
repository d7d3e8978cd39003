"""Every matplotlib figure of the kit; each function returns a Figure and never calls plt.show().

The figures are built without pyplot and display themselves inline in a notebook: end a cell with
the figure, or with ``save_figure(fig, path)``, which writes the PNG and returns the figure.
"""

from __future__ import annotations

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
from kronos_kit.plots.figure import KitFigure, figure_png, new_figure, save_figure
from kronos_kit.plots.forecast import (
    plot_coverage,
    plot_error_by_horizon,
    plot_fan_chart,
    plot_fan_comparison,
    plot_forecast,
    plot_pit_histogram,
    plot_return_scatter,
)
from kronos_kit.plots.handover import plot_handover
from kronos_kit.plots.reconstruction import plot_window_errors, plot_worst_windows
from kronos_kit.plots.sweep import (
    SWEEP_FIGURES,
    plot_sweep_history,
    plot_sweep_importances,
    plot_sweep_intermediate,
    plot_sweep_parallel,
    plot_sweep_slices,
)
from kronos_kit.plots.training import plot_loss_curves, plot_selection_curves, plot_training_curves
from kronos_kit.plots.universe import (
    UNIVERSE_FIGURES,
    plot_cumulative_excess,
    plot_ic_by_horizon,
    plot_ic_series,
    plot_quantile_returns,
    plot_turnover,
    universe_figure,
)

__all__ = [
    "KitFigure",
    "figure_png",
    "new_figure",
    "save_figure",
    "plot_loss_curves",
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
    "plot_fan_comparison",
    "plot_forecast",
    "plot_handover",
    "plot_pit_histogram",
    "plot_rank_frequency",
    "plot_reconstruction",
    "plot_return_scatter",
    "plot_window_reconstruction",
    "plot_window_errors",
    "plot_worst_windows",
    "UNIVERSE_FIGURES",
    "plot_cumulative_excess",
    "plot_ic_by_horizon",
    "plot_ic_series",
    "plot_quantile_returns",
    "plot_turnover",
    "universe_figure",
    "SWEEP_FIGURES",
    "plot_sweep_history",
    "plot_sweep_importances",
    "plot_sweep_intermediate",
    "plot_sweep_parallel",
    "plot_sweep_slices",
]
