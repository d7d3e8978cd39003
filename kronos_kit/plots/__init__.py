"""Every matplotlib figure of the kit; each function returns a Figure and never calls plt.show()."""

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

__all__ = [
    "draw_candles",
    "plot_bit_balance",
    "plot_candles",
    "plot_channel_errors",
    "plot_code_candle",
    "plot_code_heatmap",
    "plot_rank_frequency",
    "plot_reconstruction",
    "plot_window_reconstruction",
]
