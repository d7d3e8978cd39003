"""Cross-sectional signals on a panel: what a model's sample paths say about each symbol, and naive factors.

A model signal is read off the close-return paths ``r[s] = close[s, H] / last_close - 1`` of one origin at the
decision horizon H (the reference ranked names by a difference of averaged closes, which is not a return and
mixes price levels across names):

- ``expected_return``: mean of the paths' returns;
- ``risk_adjusted``: that mean over the paths' standard deviation (a Sharpe-like score per name);
- ``prob_up``: the share of paths that end above the last close.

They are taken from the paths before any center shrink (`kronos_kit.calibration`'s ``spread_center``): a
shrink toward no change rescales every name's expected return alike, and at weight 0 it leaves only the
paths' rounding noise to rank.

Naive factors on the same dates and histories: ``momentum`` (the past 20-bar return), ``reversal`` (minus
the past 5-bar return) and a ``placebo`` (uniform noise, seeded), which no signal with skill should fail to beat.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from kronos_kit.config import UNIVERSE_SIGNALS

MOMENTUM_BARS = 20  # the momentum factor's look-back (a month of daily bars)
REVERSAL_BARS = 5  # the short-term reversal factor's look-back (a week of daily bars)
NAIVE_FACTORS: tuple[str, ...] = ("momentum", "reversal", "placebo")
PLACEBO = "placebo"


def path_signals(close_returns: np.ndarray) -> dict[str, np.ndarray]:
    """Every model signal of :data:`~kronos_kit.config.UNIVERSE_SIGNALS` from (N, S) path returns at the horizon.

    ``risk_adjusted`` is NaN where the paths do not differ (a zero standard deviation ranks nothing).
    """
    r = np.asarray(close_returns, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"close_returns must be (origins, paths), got shape {r.shape}")
    mean = r.mean(axis=1)
    std = r.std(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        risk_adjusted = np.where(std > 0, mean / std, np.nan)
    out = {"expected_return": mean, "risk_adjusted": risk_adjusted, "prob_up": (r > 0).mean(axis=1)}
    return {name: out[name] for name in UNIVERSE_SIGNALS}


def naive_signals(history_close: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """:data:`NAIVE_FACTORS` from (N, L) history closes (the last column is the origin's close).

    Momentum and reversal look back :data:`MOMENTUM_BARS` / :data:`REVERSAL_BARS` bars, or the whole history
    when it is shorter; the placebo draws one uniform number per origin from ``rng``.
    """
    close = np.asarray(history_close, dtype=np.float64)
    if close.ndim != 2 or close.shape[1] < 2:
        raise ValueError(f"history_close must be (origins, >= 2 bars), got shape {close.shape}")
    last = close[:, -1]

    def past_return(bars: int) -> np.ndarray:
        return last / close[:, -1 - min(bars, close.shape[1] - 1)] - 1.0

    return {"momentum": past_return(MOMENTUM_BARS), "reversal": -past_return(REVERSAL_BARS),
            PLACEBO: rng.random(len(close))}


def signal_columns(models: list[str] | tuple[str, ...]) -> list[str]:
    """The signal names of a panel evaluation: ``<model>_<signal>`` for every model signal, then the naive factors."""
    return [f"{m}_{s}" for m in models for s in UNIVERSE_SIGNALS] + list(NAIVE_FACTORS)


def signal_table(dates: pd.DatetimeIndex, symbols: list[str], signals: Mapping[str, np.ndarray],
                 split: str) -> pd.DataFrame:
    """Per-date signals as a tidy table: a (datetime, instrument) index, ``split``, one column per signal.

    ``signals[name]`` is (D, K) over ``dates`` x ``symbols`` (NaN: not in that date's cross-section, left
    out). The shape qlib's backtest (a score series indexed by datetime and instrument) and alphalens
    (a factor indexed by date and asset) read, so ``table["finetuned_expected_return"]`` goes to them as is.
    """
    names = list(signals)
    if not names:
        raise ValueError("no signals to tabulate")
    grid = np.stack([np.asarray(signals[n], dtype=np.float64) for n in names], axis=-1)  # (D, K, n)
    present = np.isfinite(grid).any(axis=-1)
    d, k = np.nonzero(present)
    index = pd.MultiIndex.from_arrays([pd.DatetimeIndex(dates)[d], np.asarray(symbols, dtype=object)[k]],
                                      names=["datetime", "instrument"])
    table = pd.DataFrame(grid[d, k], index=index, columns=names)
    table.insert(0, "split", split)
    return table


__all__ = ["MOMENTUM_BARS", "NAIVE_FACTORS", "PLACEBO", "REVERSAL_BARS", "naive_signals", "path_signals",
           "signal_columns", "signal_table"]
