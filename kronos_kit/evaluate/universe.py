"""The universe walk-forward: at every rebalance date of a split, every symbol with a full history forecasts.

A panel split (a frame of several symbols, as `split` cuts it on common dates) is laid on its own calendar
(the distinct timestamps of its non-context rows) as a :class:`PanelGrid`. Rebalance dates are every
``stride``-th date of that calendar from its first, as long as ``pred_len`` dates follow inside the split;
a date counts when at least ``min_symbols`` symbols have a bar there and ``lookback`` bars of history up to
it (the split's context rows included). Nothing is thinned: every such date is used.

At each date every member forecasts ``pred_len`` bars with ``sample_count`` paths per model, batched across
symbols and dates (``batch_size`` series per call of the model's :data:`~kronos_kit.evaluate.ForecastFn`).
A model sees the history up to the date and the next ``pred_len`` dates of the calendar (the market's
trading days, known in advance), nothing of what happens after it. The model signals
(:mod:`~kronos_kit.evaluate.signals`) come from each model's paths with its path calibration but without
its center shrink; the return-unit forecast scores use the fully calibrated paths. Naive factors are
computed from the same histories. Forward returns (close to close, 1..pred_len bars) are kept beside the
signals for the statistics and portfolios (:mod:`~kronos_kit.evaluate.universe_evaluation`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kronos_kit import metrics as M
from kronos_kit.calibration import PathCalibration, apply_path_calibration
from kronos_kit.data.origins import origin_inputs, walk_forward_frame
from kronos_kit.data.schema import CONTEXT_COLUMN, FEATURE_COLUMNS
from kronos_kit.evaluate.signals import naive_signals, path_signals, signal_table
from kronos_kit.evaluate.walk_forward import ForecastFn
from kronos_kit.metrics import CLOSE
from kronos_kit.runtime import tqdm

SPLIT_CODES = {"validation": 1, "test": 2}  # seeds the placebo per split, so the two splits draw differently


@dataclass(frozen=True)
class PanelGrid:
    """A split's bars on its calendar: ``open`` / ``close`` (T, K) (NaN: no bar), ``rows`` (T, K) the row of
    each bar in ``frame`` (-1: none), ``position`` (T, K) its position within its symbol's rows (context
    rows included), ``frame`` the split sorted by symbol and time (`walk_forward_frame`)."""

    dates: pd.DatetimeIndex
    symbols: list[str]
    open: np.ndarray
    close: np.ndarray
    rows: np.ndarray
    position: np.ndarray
    frame: pd.DataFrame

    @classmethod
    def of(cls, split_frame: pd.DataFrame) -> PanelGrid:
        frame = walk_forward_frame(split_frame)
        own = ~frame[CONTEXT_COLUMN].to_numpy(bool) if CONTEXT_COLUMN in frame else np.ones(len(frame), bool)
        dates = pd.DatetimeIndex(frame.loc[own, "timestamps"].drop_duplicates().sort_values())
        symbols = sorted(frame["symbol"].astype(str).unique().tolist())
        k = pd.Index(symbols).get_indexer(frame["symbol"].astype(str))
        t = dates.get_indexer(pd.DatetimeIndex(frame["timestamps"]))
        shape = (len(dates), len(symbols))
        rows, position = np.full(shape, -1, dtype=np.int64), np.full(shape, -1, dtype=np.int64)
        open_, close = np.full(shape, np.nan), np.full(shape, np.nan)
        within = frame.groupby("symbol", sort=False).cumcount().to_numpy()  # position in its symbol's rows
        on = t >= 0  # context rows lie before the calendar
        rows[t[on], k[on]] = np.flatnonzero(on)
        position[t[on], k[on]] = within[on]
        open_[t[on], k[on]] = frame["open"].to_numpy(np.float64)[on]
        close[t[on], k[on]] = frame["close"].to_numpy(np.float64)[on]
        return cls(dates, symbols, open_, close, rows, position, frame)

    def forward_returns(self, at: np.ndarray, horizon: int) -> np.ndarray:
        """Close-to-close returns from dates ``at`` (D,) to 1..horizon dates later: (horizon, D, K), NaN where
        a name lacks either bar."""
        base = self.close[at]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.stack([self.close[at + h] / base - 1.0 for h in range(1, horizon + 1)])


def rebalance_dates(grid: PanelGrid, *, lookback: int, pred_len: int, stride: int,
                    min_symbols: int) -> tuple[np.ndarray, np.ndarray]:
    """(date indices (D,), members (D, K)): every ``stride``-th calendar date with ``pred_len`` dates after it
    in the split and at least ``min_symbols`` symbols with a bar there and ``lookback`` bars up to it."""
    if stride < 1 or pred_len < 1 or lookback < 2:
        raise ValueError(f"need stride >= 1, pred_len >= 1, lookback >= 2; got {stride}, {pred_len}, {lookback}")
    grid_at = np.arange(0, len(grid.dates) - pred_len, stride)
    members = grid.position[grid_at] >= lookback - 1
    keep = members.sum(axis=1) >= min_symbols
    return grid_at[keep], members[keep]


@dataclass
class UniverseResult:
    """One split's universe walk-forward: the grid, the rebalance dates, members, signals and forward returns.

    ``signals[name]`` and ``members`` are (D, K) over the rebalance dates x ``grid.symbols`` (a signal is NaN
    off the cross-section); ``forward`` (pred_len, D, K); ``forecast_scores[model]`` the return-unit scores
    of its calibrated paths (:func:`forecast_scores`); ``config`` what was run.
    """

    split: str
    grid: PanelGrid
    rebalance: np.ndarray
    members: np.ndarray
    signals: dict[str, np.ndarray]
    forward: np.ndarray
    forecast_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def dates(self) -> pd.DatetimeIndex:
        return self.grid.dates[self.rebalance]

    @property
    def n_origins(self) -> int:
        return int(self.members.sum())

    def signal_table(self) -> pd.DataFrame:
        """The per-date signals as `signals.parquet` holds them (:func:`~kronos_kit.evaluate.signals.signal_table`)."""
        return signal_table(self.dates, self.grid.symbols, self.signals, self.split)


def universe_walk_forward(
    frame: pd.DataFrame,
    models: Mapping[str, ForecastFn],
    *,
    lookback: int,
    pred_len: int,
    stride: int,
    sample_count: int,
    min_symbols: int = 5,
    calibrations: Mapping[str, PathCalibration] | None = None,
    seed: int = 0,
    split: str = "test",
    batch_size: int = 64,
    progress: bool = True,
) -> UniverseResult | None:
    """Signals of every model and naive factor at every rebalance date of ``frame`` (see the module docstring).

    ``frame`` is one split of a panel (``bundle.splits.test`` or ``.val``: canonical columns and
    ``is_context``); ``models`` map a name to a forecaster callable (what
    :meth:`~kronos_kit.forecast.KronosPredictor.as_forecast_fn` returns); ``calibrations`` each model's path
    calibration fitted on validation (``calibration.json``). Returns None when no date has a cross-section.
    """
    grid = PanelGrid.of(frame)
    at, members = rebalance_dates(grid, lookback=lookback, pred_len=pred_len, stride=stride,
                                  min_symbols=min_symbols)
    if len(at) == 0:
        return None
    d_idx, k_idx = np.nonzero(members)  # origins in date order, then symbol order
    rows = grid.rows[at[d_idx], k_idx]
    values = grid.frame[list(FEATURE_COLUMNS)].to_numpy(np.float64)
    history_close = values[rows[:, None] + np.arange(1 - lookback, 1), CLOSE]  # (N, lookback)
    last_close = history_close[:, -1]
    forward = grid.forward_returns(at, pred_len)
    realized = forward[:, d_idx, k_idx].T  # (N, pred_len) returns from the origin's close

    def grid_of(values_n: np.ndarray) -> np.ndarray:
        out = np.full(members.shape, np.nan)
        out[d_idx, k_idx] = values_n
        return out

    signals: dict[str, np.ndarray] = {}
    scores, timings = {}, {}
    future = [pd.Series(grid.dates[i + 1: i + 1 + pred_len]) for i in at]
    for name, fn in models.items():
        t0 = time.perf_counter()
        cal = (calibrations or {}).get(name, PathCalibration())
        ranked, scored = _forecast(fn, grid.frame, rows, [future[d] for d in d_idx], last_close, cal, name=name,
                                   lookback=lookback, pred_len=pred_len, sample_count=sample_count,
                                   batch_size=batch_size, progress=progress)
        for kind, values_n in path_signals(ranked).items():
            signals[f"{name}_{kind}"] = grid_of(values_n)
        scores[name] = forecast_scores(scored, realized)
        timings[f"model:{name}"] = time.perf_counter() - t0
    rng = np.random.default_rng([seed, SPLIT_CODES.get(split, 0)])
    for kind, values_n in naive_signals(history_close, rng).items():
        signals[kind] = grid_of(values_n)
    scores["persistence"] = forecast_scores(np.zeros((len(rows), 1, pred_len)), realized)
    config = {"split": split, "lookback": lookback, "pred_len": pred_len, "stride": stride,
              "sample_count": sample_count, "min_symbols": min_symbols, "seed": seed, "batch_size": batch_size,
              "n_dates": len(at), "n_symbols": int(members.any(axis=0).sum()), "n_origins": len(rows),
              "path_calibration": {n: c.describe() for n, c in (calibrations or {}).items() if n in models}}
    return UniverseResult(split, grid, at, members, signals, forward, scores, config, timings)


def _forecast(fn: ForecastFn, frame: pd.DataFrame, rows: np.ndarray, future: list[pd.Series], last_close: np.ndarray,
              cal: PathCalibration, *, name: str, lookback: int, pred_len: int, sample_count: int, batch_size: int,
              progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """One model at every origin, ``batch_size`` per call: (close returns at the horizon (N, S) of the paths
    calibrated without the center shrink, close returns (N, S, pred_len) of the fully calibrated paths)."""
    unshrunk = dataclasses.replace(cal, center=1.0)
    ranked, scored = [], []
    batches = [np.arange(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    for batch in tqdm(batches, desc=f"universe {name}", disable=not progress):
        hists, hstamps, _ = origin_inputs(frame, rows[batch], lookback=lookback, pred_len=0)
        raw = np.asarray(fn(hists, hstamps, [future[i] for i in batch], pred_len, sample_count), dtype=np.float64)
        if raw.ndim != 4 or raw.shape[0] != len(batch) or raw.shape[2:] != (pred_len, len(FEATURE_COLUMNS)):
            raise ValueError(f"model {name!r} returned shape {raw.shape}; expected ({len(batch)}, S, {pred_len}, 6)")
        last = last_close[batch]
        ranked.append(apply_path_calibration(raw, last, unshrunk)[:, :, -1, CLOSE] / last[:, None] - 1.0)
        scored.append(apply_path_calibration(raw, last, cal)[..., CLOSE] / last[:, None, None] - 1.0)
    return np.concatenate(ranked), np.concatenate(scored)


def forecast_scores(paths: np.ndarray, realized: np.ndarray) -> dict[str, float]:
    """Per-series forecast scores pooled across symbols in return units, so no price level dominates.

    ``paths`` (N, S, H) close returns from each origin's close, ``realized`` (N, H) (NaN: no bar). Close CRPS
    and the median path's close MAE in basis points (averaged over steps and origins), the 80% interval's
    coverage (NaN with one path) and the directional accuracy of the median at the last step.
    """
    ok = np.isfinite(realized)
    y = np.where(ok, realized, 0.0)
    crps = M.crps(paths, y, axis=1)
    median = np.median(paths, axis=1)
    err = np.abs(median - y)
    out = {"close_crps_bp": float(crps[ok].mean() / 1e-4) if ok.any() else float("nan"),
           "close_mae_bp": float(err[ok].mean() / 1e-4) if ok.any() else float("nan"),
           "coverage_80": float("nan"), "directional_accuracy": float("nan"), "n_origins": int(ok.any(axis=1).sum())}
    if paths.shape[1] > 1 and ok.any():
        lo, hi = np.quantile(paths, [0.1, 0.9], axis=1)
        out["coverage_80"] = float(((y >= lo) & (y <= hi))[ok].mean())
    last = ok[:, -1]
    if last.any():
        out["directional_accuracy"] = M.directional_accuracy(median[last, -1], realized[last, -1])
    return out


__all__ = ["PanelGrid", "UniverseResult", "forecast_scores", "rebalance_dates", "universe_walk_forward"]
