"""Honest forecast evaluation: walk-forward over the test split, baselines, token metrics, report.

The question answered: did finetuning help, against the base model and naive baselines, on held-out
data? Models enter as plain callables (:data:`ForecastFn`) so this module does not depend on the
forecaster's internals (:func:`evaluate_models` wraps Kronos pairs into such callables):

    fn(histories, history_stamps, future_stamps, pred_len, sample_count) -> (n, S, pred_len, 6) array

in price units, features ordered open, high, low, close, volume, amount. Each history frame carries
its symbol in ``frame.attrs["symbol"]``.

Rules that keep the comparison honest:

- origins are placed mechanically (every ``stride`` bars per symbol, targets only in non-context
  rows) and every origin counts, for every model and baseline alike;
- the point forecast is the element-wise **median** of the sample paths (``point="mean"`` available);
- metric definitions live in :mod:`kronos_kit.metrics`; the report compares every headline metric,
  wins and losses alike.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kronos_kit import metrics as M
from kronos_kit.config import DEFAULT_MAX_CONTEXT, EvalConfig
from kronos_kit.data.schema import FEATURE_COLUMNS
from kronos_kit.metrics import CLOSE, INTERVALS
from kronos_kit.runs import RunDir, atomic_write_text, save_json

if TYPE_CHECKING:  # only for annotations: walk_forward itself never touches the model
    import torch

    from kronos_kit.data import Splits
    from kronos_kit.forecast import KronosPredictor
    from kronos_kit.model import Kronos, KronosTokenizer

ForecastFn = Callable[[list[pd.DataFrame], list[pd.Series], list[pd.Series], int, int], np.ndarray]
"""(histories, history timestamps, future timestamps, pred_len, sample_count) -> (n, S, pred_len, 6)."""

BASELINES: tuple[str, ...] = ("persistence", "drift", "garch")

# Headline metrics: (table column, label in the report, direction). Direction is "lower", "higher",
# or a nominal coverage level (closer is better).
HEADLINE: tuple[tuple[str, str, str | float], ...] = (
    ("close_mae", "close MAE", "lower"),
    ("close_rmse", "close RMSE", "lower"),
    ("close_mape", "close MAPE (%)", "lower"),
    ("close_mase", "close MASE", "lower"),
    ("close_crps", "close CRPS", "lower"),
    ("close_wql", "close WQL", "lower"),
    ("coverage_50", "close 50% interval coverage", 0.5),
    ("coverage_80", "close 80% interval coverage", 0.8),
    ("coverage_95", "close 95% interval coverage", 0.95),
    ("directional_accuracy", "directional accuracy", "higher"),
    ("ic", "IC", "higher"),
    ("rank_ic", "RankIC", "higher"),
    ("xs_ic", "cross-sectional IC", "higher"),
    ("xs_rank_ic", "cross-sectional RankIC", "higher"),
    ("vol_mae", "realized-vol MAE", "lower"),
    ("vol_r2", "realized-vol R^2", "higher"),
)
TABLE_COLUMNS: tuple[str, ...] = tuple(c for c, _, _ in HEADLINE) + ("xs_dates", "n_origins", "n_samples")


# ------------------------------------------------------------------------------------ origins


def forecast_origins(
    frame: pd.DataFrame, *, lookback: int, pred_len: int, stride: int, max_origins: int | None = None
) -> pd.DataFrame:
    """Place forecast origins on a canonical long frame (sorted by symbol, time).

    An origin is the row of the last history bar. Per symbol the first origin is the earliest row with
    ``lookback`` bars of history whose next ``pred_len`` rows are all non-context (``is_context`` False,
    missing column = all False); then one every ``stride`` rows while the targets stay in the frame.
    ``max_origins`` thins the set to at most that many by keeping evenly spaced origin timestamps
    (all symbols of a kept timestamp stay, so cross-sections remain whole); which ones are kept never
    depends on the forecasts.

    Returns a frame with ``symbol``, ``row`` (positional index in ``frame``), ``pos`` (position within
    the symbol) and ``origin_time``.
    """
    if lookback < 2 or pred_len < 1 or stride < 1:
        raise ValueError("need lookback >= 2, pred_len >= 1, stride >= 1")
    ctx = frame["is_context"].to_numpy(bool) if "is_context" in frame else np.zeros(len(frame), bool)
    symbols = frame["symbol"].to_numpy()
    times = frame["timestamps"].to_numpy()
    starts = np.flatnonzero(np.r_[True, symbols[1:] != symbols[:-1]])
    ends = np.r_[starts[1:], len(frame)]
    rows = []
    for start, end in zip(starts, ends):
        n = end - start
        # context rows among (t, t + pred_len], for every t, from one cumulative sum
        cs = np.r_[0, np.cumsum(ctx[start:end])]
        t = np.arange(lookback - 1, n - pred_len)
        valid = t[(cs[t + pred_len + 1] - cs[t + 1]) == 0]
        if len(valid) == 0:
            continue
        grid = np.arange(valid[0], n - pred_len, stride)
        grid = grid[np.isin(grid, valid)]
        rows.append(pd.DataFrame({"symbol": symbols[start + grid], "row": start + grid, "pos": grid}))
    cols = {"symbol": [], "row": np.array([], int), "pos": np.array([], int)}
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(cols)
    out["origin_time"] = times[out["row"].to_numpy()] if len(out) else pd.Series([], dtype="datetime64[ns]")
    if max_origins is not None and len(out) > max_origins:
        stamps, inverse, counts = np.unique(out["origin_time"].to_numpy(), return_inverse=True, return_counts=True)
        keep = np.array([], int)
        for m in range(min(len(stamps), max_origins), 0, -1):
            keep = np.unique(np.linspace(0, len(stamps) - 1, m).round().astype(int))
            if counts[keep].sum() <= max_origins:
                break
        out = out[np.isin(inverse, keep)].reset_index(drop=True)
    return out


# ---------------------------------------------------------------------------------- baselines


def persistence_paths(history: np.ndarray, pred_len: int) -> np.ndarray:
    """Last close carried forward: (N, 1, H, 6) with OHLC = last close, volume/amount = last values."""
    last = history[:, -1]
    path = np.empty((len(history), 1, pred_len, len(FEATURE_COLUMNS)))
    path[..., :4] = last[:, CLOSE, None, None, None]
    path[..., 4:] = last[:, None, None, 4:]
    return path


def drift_paths(history: np.ndarray, pred_len: int, sample_count: int, rng: np.random.Generator) -> np.ndarray:
    """Random walk with drift on the log close: (N, S, H, 6).

    Drift = mean log return of the history, noise = its standard deviation (Gaussian, seeded). Each bar's
    open is the previous close, high/low the max/min of open and close (no intrabar range is modelled),
    volume/amount the last values.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        logret = np.diff(np.log(history[:, :, CLOSE]), axis=1)
    mu = logret.mean(axis=1)
    sigma = logret.std(axis=1, ddof=1)
    eps = rng.standard_normal((len(history), sample_count, pred_len))
    steps = mu[:, None, None] + sigma[:, None, None] * eps
    last_close = history[:, -1, CLOSE]
    close = last_close[:, None, None] * np.exp(np.cumsum(steps, axis=-1))
    opens = np.concatenate([np.broadcast_to(last_close[:, None, None], close[..., :1].shape), close[..., :-1]], -1)
    path = np.empty(close.shape + (len(FEATURE_COLUMNS),))
    path[..., 0] = opens
    path[..., 1] = np.maximum(opens, close)
    path[..., 2] = np.minimum(opens, close)
    path[..., 3] = close
    path[..., 4:] = history[:, None, None, -1, 4:]
    return path


def garch_vol(close: np.ndarray, pred_len: int) -> tuple[float, str | None]:
    """Predicted realized vol (sum of squared log returns over ``pred_len``) from GARCH(1,1) on ``close``.

    Fits ``arch_model(100 * log_returns, vol="GARCH", p=1, q=1, mean="Constant")`` and sums the
    ``pred_len`` variance forecasts / 100**2. ``rescale=False`` keeps the stated 100x scaling (arch's
    advice to rescale is only a warning about conditioning). On failure (exception, convergence
    warning or flag, non-finite or negative forecast, flat or too short history) it falls back to
    ``pred_len`` x the sample variance of the log returns. Returns (vol, fallback reason or None).
    """
    from arch import arch_model
    from arch.utility.exceptions import ConvergenceWarning

    with np.errstate(divide="ignore", invalid="ignore"):
        logret = np.diff(np.log(np.asarray(close, dtype=np.float64)))
    logret = logret[np.isfinite(logret)]
    fallback = float(pred_len * logret.var(ddof=1)) if len(logret) > 1 else float("nan")
    if len(logret) < 10:
        return fallback, "short history"
    if not logret.std() > 0:
        return fallback, "flat history"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = arch_model(100 * logret, vol="GARCH", p=1, q=1, mean="Constant", rescale=False).fit(disp="off")
            var = res.forecast(horizon=pred_len, reindex=False).variance.to_numpy()[-1]
    except Exception as exc:  # any fit failure falls back; the reason is counted
        return fallback, f"error: {type(exc).__name__}"
    if any(issubclass(w.category, ConvergenceWarning) for w in caught) or res.convergence_flag != 0:
        return fallback, "not converged"
    vol = float(var.sum() / 100**2)
    if not (np.isfinite(vol) and vol >= 0):
        return fallback, "bad forecast"
    return vol, None


# ----------------------------------------------------------------------------------- results


@dataclass
class EvaluationResult:
    """Everything a walk-forward produced; metrics and plots can be recomputed from the arrays.

    Arrays are per origin, in the order of ``symbols``/``origin_time``: ``history`` (N, lookback, 6),
    ``realized`` (N, pred_len, 6), ``samples[name]`` (N, S, pred_len, 6) for every model and path
    baseline, ``vol_pred[name]`` (N,) predicted realized vol for every entry (GARCH has only this).
    """

    symbols: np.ndarray
    origin_time: np.ndarray
    origin_pos: np.ndarray
    history: np.ndarray
    realized: np.ndarray
    samples: dict[str, np.ndarray]
    vol_pred: dict[str, np.ndarray]
    kinds: dict[str, str]
    config: dict[str, Any]
    garch_fallbacks: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def names(self) -> list[str]:
        """Models first, then baselines, in evaluation order."""
        return list(self.kinds)

    @property
    def n_origins(self) -> int:
        return len(self.symbols)

    @property
    def last_close(self) -> np.ndarray:
        return self.history[:, -1, CLOSE]

    @property
    def realized_vol(self) -> np.ndarray:
        return M.realized_vol(self.realized[..., CLOSE], self.last_close)

    def point(self, name: str, how: str | None = None) -> np.ndarray:
        """Point path (N, H, 6) of ``name``: median (default) or mean of its sample paths."""
        return M.point_forecast(self.samples[name], how or self.config["point"])

    def horizon_returns(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, realized) simple close return from the last history close to the horizon end."""
        pred = self.point(name)[:, -1, CLOSE] / self.last_close - 1.0
        real = self.realized[:, -1, CLOSE] / self.last_close - 1.0
        return pred, real

    def rescore(self, *, point: str | None = None, season: int | None = None) -> pd.DataFrame:
        """Recompute every score and the table from the stored arrays (optionally another point/season)."""
        if point is not None:
            self.config["point"] = point
        if season is not None:
            self.config["season"] = season
        self.scores = {name: score_entry(self, name) for name in self.names}
        self.table = summary_table(self)
        return self.table


def score_entry(result: EvaluationResult, name: str) -> dict[str, Any]:
    """All metrics of one model or baseline on the result's origins (see :mod:`kronos_kit.metrics`)."""
    real_vol = result.realized_vol
    out: dict[str, Any] = {"kind": result.kinds[name], "n_origins": result.n_origins}
    out.update({f"vol_{k}": v for k, v in M.vol_errors(result.vol_pred[name], real_vol).items()})
    if name not in result.samples:  # volatility-only baseline (GARCH)
        out["n_samples"] = 0
        return out
    samples, realized, history = result.samples[name], result.realized, result.history
    n_samples = samples.shape[1]
    point = M.point_forecast(samples, result.config["point"])
    errs = M.point_errors(point, realized, history, season=result.config["season"])
    crps = M.crps(samples, realized)
    out["n_samples"] = n_samples
    for key in ("mae", "rmse", "mape", "mase"):
        out[key] = _by_channel(errs[key])
    out["crps"] = _by_channel(crps.mean(axis=(0, 1)))
    out["wql"] = _by_channel(M.weighted_quantile_loss(samples, realized))
    by_step: dict[str, Any] = {key: _by_channel(errs[f"{key}_by_step"].T) for key in ("mae", "rmse", "mape", "mase")}
    by_step["crps"] = _by_channel(crps.mean(axis=0).T)
    # a single path has no interval and a degenerate PIT: those are undefined, not zero
    if n_samples > 1:
        cov = M.interval_coverage(samples, realized)
        out["coverage"] = {f"{lvl:g}": _by_channel(c.mean(axis=0)) for lvl, c in cov.items()}
        by_step["coverage"] = {f"{lvl:g}": c[:, CLOSE] for lvl, c in cov.items()}
        pit = M.pit_values(samples[..., CLOSE], realized[..., CLOSE], randomize=True, rng=np.random.default_rng(0))
        out["pit_histogram"] = M.pit_histogram(pit)
    else:
        out["coverage"] = {f"{lvl:g}": _by_channel(np.full(len(FEATURE_COLUMNS), np.nan)) for lvl in INTERVALS}
        out["pit_histogram"] = None
    last = result.last_close
    pred_change = point[..., CLOSE] - last[:, None]
    real_change = realized[..., CLOSE] - last[:, None]
    out["directional_accuracy"] = M.directional_accuracy(pred_change[:, -1], real_change[:, -1])
    by_step["directional_accuracy"] = np.array(
        [M.directional_accuracy(pred_change[:, h], real_change[:, h]) for h in range(point.shape[1])]
    )
    out["by_step"] = by_step
    pred_ret, real_ret = result.horizon_returns(name)
    out.update(M.information_coefficients(pred_ret, real_ret, result.symbols, result.origin_time))
    return out


def summary_table(result: EvaluationResult) -> pd.DataFrame:
    """Headline table: one row per model/baseline, close-channel metrics plus finance and vol metrics."""
    rows = {}
    for name in result.names:
        s = result.scores[name]
        cov = s.get("coverage", {})
        rows[name] = {
            "close_mae": s.get("mae", {}).get("close", np.nan),
            "close_rmse": s.get("rmse", {}).get("close", np.nan),
            "close_mape": s.get("mape", {}).get("close", np.nan),
            "close_mase": s.get("mase", {}).get("close", np.nan),
            "close_crps": s.get("crps", {}).get("close", np.nan),
            "close_wql": s.get("wql", {}).get("close", np.nan),
            "coverage_50": cov.get("0.5", {}).get("close", np.nan),
            "coverage_80": cov.get("0.8", {}).get("close", np.nan),
            "coverage_95": cov.get("0.95", {}).get("close", np.nan),
            "directional_accuracy": s.get("directional_accuracy", np.nan),
            "ic": s.get("ic", np.nan),
            "rank_ic": s.get("rank_ic", np.nan),
            "xs_ic": s.get("xs_ic", np.nan),
            "xs_rank_ic": s.get("xs_rank_ic", np.nan),
            "vol_mae": s["vol_mae"],
            "vol_r2": s["vol_r2"],
            "xs_dates": s.get("xs_dates", 0),
            "n_origins": s["n_origins"],
            "n_samples": s["n_samples"],
        }
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(TABLE_COLUMNS))
    table.index.name = "model"
    return table.astype({"xs_dates": int, "n_origins": int, "n_samples": int})


# ------------------------------------------------------------------------------- walk-forward


def walk_forward(
    frame: pd.DataFrame,
    models: Mapping[str, ForecastFn],
    *,
    lookback: int,
    pred_len: int,
    stride: int,
    sample_count: int,
    max_origins: int | None = None,
    baselines: Sequence[str] = BASELINES,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 32,
    point: str = "median",
    season: int = 1,
) -> EvaluationResult:
    """Walk-forward evaluation of ``models`` and ``baselines`` on the same origins of the test split.

    ``frame`` is the canonical long frame (symbol, timestamps, open, high, low, close, volume, amount,
    optional boolean ``is_context``). Origins come from :func:`forecast_origins`; each model is called
    with up to ``batch_size`` origins at a time. ``point`` picks the median or mean of the sample paths
    for point metrics; ``season`` is the MASE seasonal period m. Baselines: "persistence" (one path),
    "drift" (``sample_count`` seeded paths), "garch" (volatility only).
    """
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
    clash = set(models) & set(BASELINES)
    if clash:
        raise ValueError(f"model names {sorted(clash)} are reserved for baselines")
    missing = {"symbol", "timestamps", *FEATURE_COLUMNS} - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks columns {sorted(missing)}")
    frame = frame.sort_values(["symbol", "timestamps"], kind="stable").reset_index(drop=True)
    frame["timestamps"] = pd.to_datetime(frame["timestamps"])
    origins = forecast_origins(frame, lookback=lookback, pred_len=pred_len, stride=stride, max_origins=max_origins)
    if origins.empty:
        raise ValueError("no forecast origins: the split is shorter than lookback + pred_len")
    rows = origins["row"].to_numpy()
    values = frame[list(FEATURE_COLUMNS)].to_numpy(np.float64)
    history = values[rows[:, None] + np.arange(1 - lookback, 1)]
    realized = values[rows[:, None] + np.arange(1, pred_len + 1)]

    result = EvaluationResult(
        symbols=origins["symbol"].to_numpy(),
        origin_time=origins["origin_time"].to_numpy(),
        origin_pos=origins["pos"].to_numpy(),
        history=history,
        realized=realized,
        samples={},
        vol_pred={},
        kinds={**{name: "model" for name in models}, **{name: "baseline" for name in baselines}},
        config={
            "lookback": lookback,
            "pred_len": pred_len,
            "stride": stride,
            "sample_count": sample_count,
            "max_origins": max_origins,
            "seed": seed,
            "point": point,
            "season": season,
            "batch_size": batch_size,
            "n_symbols": int(origins["symbol"].nunique()),
        },
    )

    _forecast_models(result, frame, rows, models, lookback=lookback, pred_len=pred_len, sample_count=sample_count,
                     batch_size=batch_size, progress=progress)
    _forecast_baselines(result, baselines, pred_len=pred_len, sample_count=sample_count, seed=seed, progress=progress)
    t0 = time.perf_counter()
    for name, paths in result.samples.items():
        result.vol_pred[name] = M.predicted_vol(paths, result.last_close)
    result.rescore()
    result.timings["metrics"] = time.perf_counter() - t0
    return result


def _forecast_models(result: EvaluationResult, frame: pd.DataFrame, rows: np.ndarray, models: Mapping[str, ForecastFn],
                     *, lookback: int, pred_len: int, sample_count: int, batch_size: int, progress: bool) -> None:
    """Every model's sample paths at every origin, ``batch_size`` origins per call, into ``result``."""
    stamps = frame["timestamps"]

    def inputs(batch: np.ndarray) -> tuple[list[pd.DataFrame], list[pd.Series], list[pd.Series]]:
        hists, hstamps, fstamps = [], [], []
        for i in batch:
            r = rows[i]
            hist = frame.iloc[r - lookback + 1 : r + 1][list(FEATURE_COLUMNS)].reset_index(drop=True)
            hist.attrs["symbol"] = result.symbols[i]
            hists.append(hist)
            hstamps.append(stamps.iloc[r - lookback + 1 : r + 1].reset_index(drop=True))
            fstamps.append(stamps.iloc[r + 1 : r + pred_len + 1].reset_index(drop=True))
        return hists, hstamps, fstamps

    batches = [np.arange(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    for name, fn in models.items():
        parts, build_s, call_s = [], 0.0, 0.0
        for batch in tqdm(batches, desc=f"forecast {name}", disable=not progress):
            t0 = time.perf_counter()
            args = inputs(batch)
            t1 = time.perf_counter()
            out = np.asarray(fn(*args, pred_len, sample_count), dtype=np.float64)
            build_s, call_s = build_s + t1 - t0, call_s + time.perf_counter() - t1
            if out.ndim != 4 or out.shape[0] != len(batch) or out.shape[2:] != (pred_len, len(FEATURE_COLUMNS)):
                raise ValueError(
                    f"model {name!r} returned shape {out.shape}; expected ({len(batch)}, S, {pred_len}, 6)"
                )
            if parts and out.shape[1] != parts[0].shape[1]:
                raise ValueError(f"model {name!r} changed its sample count between batches")
            parts.append(out)
        result.samples[name] = np.concatenate(parts)
        # the model's own time apart from building its input frames (the evaluator's share)
        result.timings[f"model:{name}"] = call_s
        result.timings[f"inputs:{name}"] = build_s


def _forecast_baselines(result: EvaluationResult, baselines: Sequence[str], *, pred_len: int, sample_count: int,
                        seed: int, progress: bool) -> None:
    """Baseline paths (persistence, drift) and GARCH volatility at every origin, into ``result``."""
    history = result.history
    rng = np.random.default_rng(seed)
    for name in baselines:
        t0 = time.perf_counter()
        if name == "persistence":
            result.samples[name] = persistence_paths(history, pred_len)
        elif name == "drift":
            result.samples[name] = drift_paths(history, pred_len, sample_count, rng)
        else:
            vols, reasons = [], Counter()
            for i in tqdm(range(len(history)), desc="GARCH(1,1)", disable=not progress):
                vol, reason = garch_vol(history[i, :, CLOSE], pred_len)
                vols.append(vol)
                if reason is not None:
                    reasons[reason] += 1
            result.vol_pred[name] = np.array(vols)
            result.garch_fallbacks = {"total": sum(reasons.values()), **dict(reasons)}
        result.timings[f"baseline:{name}"] = time.perf_counter() - t0


def evaluate_models(
    frame_or_test_split: pd.DataFrame | Splits,
    models: Mapping[str, tuple[Kronos, KronosTokenizer] | KronosPredictor],
    evaluation: EvalConfig | None = None,
    *,
    lookback: int,
    pred_len: int | None = None,
    stride: int | None = None,
    sample_count: int | None = None,
    max_origins: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.9,
    max_context: int = DEFAULT_MAX_CONTEXT,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
    baselines: Sequence[str] = BASELINES,
    progress: bool = True,
    batch_size: int = 32,
    point: str = "median",
    season: int = 1,
) -> EvaluationResult:
    """Walk-forward evaluation of Kronos (predictor, tokenizer) pairs: the notebook one-liner.

    ``frame_or_test_split`` is the test frame (usually ``split(...).test``, whose ``is_context`` rows
    only feed histories) or the :class:`~kronos_kit.data.Splits` itself, whose ``test`` part is used.
    ``evaluation`` (the run's ``cfg.evaluation``) supplies ``pred_len``, ``stride``, ``sample_count``,
    ``max_origins``, ``temperature``, ``top_k``, ``top_p`` and ``max_context``; without it pass
    them one by one. ``models`` maps a name to ``(Kronos, KronosTokenizer)``; each pair is wrapped in
    a :class:`~kronos_kit.forecast.KronosPredictor` on ``device`` with ``max_context`` (a ready
    ``KronosPredictor`` is used as it is, with its own device and context). Every model samples
    with the same ``temperature``, ``top_k``, ``top_p`` and ``seed`` (the same seed for every batch
    and model: common random numbers, reproducible), through
    :meth:`~kronos_kit.forecast.KronosPredictor.as_forecast_fn`; everything else is
    :func:`walk_forward`, whose arguments these are. The sampling settings are recorded in
    ``result.config["sampling"]``.
    """
    if evaluation is not None:
        if any(v is not None for v in (pred_len, stride, sample_count, max_origins)):
            raise ValueError("pass either evaluation (cfg.evaluation) or pred_len/stride/sample_count/max_origins")
        e = evaluation
        pred_len, stride, sample_count, max_origins = e.pred_len, e.stride, e.sample_count, e.max_origins
        temperature, top_k, top_p, max_context = e.temperature, e.top_k, e.top_p, e.max_context
    if pred_len is None or stride is None or sample_count is None:
        raise TypeError("evaluate_models needs pred_len, stride and sample_count, or evaluation=cfg.evaluation")
    frame = _test_frame(frame_or_test_split)
    if not models:
        raise ValueError("models must name at least one (predictor, tokenizer) pair")
    predictors = _predictors(models, device=device, max_context=max_context)
    fns: dict[str, ForecastFn] = {name: p.as_forecast_fn(temperature, top_k, top_p, seed)
                                  for name, p in predictors.items()}
    result = walk_forward(frame, fns, lookback=lookback, pred_len=pred_len, stride=stride, sample_count=sample_count,
                          max_origins=max_origins, baselines=baselines, seed=0 if seed is None else seed,
                          progress=progress, batch_size=batch_size, point=point, season=season)
    result.config["sampling"] = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
                                 "max_context": {n: p.max_context for n, p in predictors.items()},
                                 "device": {n: str(p.device) for n, p in predictors.items()}}
    return result


def _test_frame(frame_or_test_split: pd.DataFrame | Splits) -> pd.DataFrame:
    frame = frame_or_test_split
    if not isinstance(frame, pd.DataFrame):
        frame = getattr(frame_or_test_split, "test", None)
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"expected a DataFrame or a Splits with a .test frame, got "
                            f"{type(frame_or_test_split).__name__}")
    if "symbol" not in frame.columns:  # a single-series frame, e.g. one CSV read with pandas
        frame = frame.assign(symbol=str(frame.attrs.get("symbol", "series")))
    return frame


def _predictors(models: Mapping[str, Any], *, device: Any, max_context: int) -> dict[str, KronosPredictor]:
    from kronos_kit.forecast import KronosPredictor

    out = {}
    for name, entry in models.items():
        if isinstance(entry, KronosPredictor):
            out[name] = entry
        elif isinstance(entry, tuple) and len(entry) == 2:
            out[name] = KronosPredictor(entry[0], entry[1], device=device, max_context=max_context)
        else:
            raise TypeError(f"model {name!r}: expected a (Kronos, KronosTokenizer) pair, got {type(entry).__name__}")
    return out


# --------------------------------------------------------------------------------- token level


def token_metrics(model: Any, tokenizer: Any, batches: Iterable[Mapping[str, Any]], *, device: str = "cpu") -> dict:
    """Next-token accuracy and perplexity of the s1 and s2 heads on test windows.

    Uses the causal path: inputs are tokens ``[:, :-1]``, targets ``[:, 1:]``, the model in eval mode
    under ``no_grad`` with ``use_teacher_forcing=True, s1_targets=s1[:, 1:]`` (Kronos conditions the s2
    head on the true s1 of the same step, which is available when decoding). ``model`` and
    ``tokenizer`` must already be on ``device``; their train/eval modes are restored afterwards.
    Perplexity = exp(mean token NLL). Returns s1/s2 accuracy, nll, perplexity and the token count.
    """
    import torch

    from kronos_kit.data.batches import loop_batches
    from kronos_kit.runtime import inference

    sums = [0.0] * 5  # s1 NLL, s2 NLL, s1 hits, s2 hits, tokens
    n_batches = 0
    with inference(*[m for m in (model, tokenizer) if isinstance(m, torch.nn.Module)]):
        for batch in loop_batches(batches):  # a window dataset is batched; batches pass through
            x = torch.as_tensor(batch["x"], dtype=torch.float32, device=device)
            s1, s2 = tokenizer.encode(x, half=True)
            scores = model.score_next_tokens(s1, s2, torch.as_tensor(batch["stamp"], device=device))
            sums = [a + b for a, b in zip(sums, scores)]
            n_batches += 1
    nll = {"s1": sums[0], "s2": sums[1]}
    hits = {"s1": sums[2], "s2": sums[3]}
    n_tokens = int(sums[4])
    if n_tokens == 0:
        raise ValueError("token_metrics got no tokens (empty batches or windows of length 1)")
    out: dict[str, float | int] = {}
    for key in ("s1", "s2"):
        mean_nll = nll[key] / n_tokens
        out[f"{key}_accuracy"] = hits[key] / n_tokens
        out[f"{key}_nll"] = mean_nll
        out[f"{key}_perplexity"] = math.exp(mean_nll)
    out["n_tokens"] = n_tokens
    out["n_batches"] = n_batches
    return out


TOKEN_HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("s1_accuracy", "s1 next-token accuracy", "higher"),
    ("s1_perplexity", "s1 perplexity", "lower"),
    ("s2_accuracy", "s2 next-token accuracy", "higher"),
    ("s2_perplexity", "s2 perplexity", "lower"),
)


# ------------------------------------------------------------------------------------- report


def save_token_metrics(metrics: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Write {model name: token_metrics(...)} as JSON (NaN as null)."""
    return save_json(path, _jsonable(dict(metrics)))


def compare(value: float, other: float, direction: str | float) -> tuple[bool | None, float | None]:
    """Is ``value`` better than ``other``? (None when either is missing or they tie) and the % change.

    ``direction`` is "lower", "higher", or a nominal coverage (closer to it is better).
    """
    if not (np.isfinite(value) and np.isfinite(other)):
        return None, None
    change = (value - other) / abs(other) * 100.0 if other != 0 else None
    if isinstance(direction, float):
        a, b = abs(value - direction), abs(other - direction)
    elif direction == "lower":
        a, b = value, other
    else:
        a, b = -value, -other
    if np.isclose(a, b, rtol=1e-12, atol=1e-15):
        return None, change
    return bool(a < b), change


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.4g}"


_WHY_MISSING = {
    **{label: ": a single path has no interval" for _, label, d in HEADLINE if isinstance(d, float)},
    "IC": ": correlation is undefined for constant predictions",
    "RankIC": ": correlation is undefined for constant predictions",
}


def _sentence(label: str, ft: str, ft_val: float, other: str, other_val: float, direction: str | float) -> dict:
    better, change = compare(ft_val, other_val, direction)
    head = f"{ft.capitalize()} {label} {_fmt(ft_val)} vs {other} {_fmt(other_val)}"
    if isinstance(direction, float):
        head += f" (nominal {direction:g})"
    if not (np.isfinite(ft_val) and np.isfinite(other_val)):
        missing = ft if not np.isfinite(ft_val) else other
        text = f"{head}: not comparable ({missing} has no value{_WHY_MISSING.get(label, '')})."
    elif better is None:
        text = f"{head}: a tie."
    else:
        verdict = f"{ft} is {'better' if better else 'worse'}"
        if isinstance(direction, float):
            gaps = f"|error| {abs(ft_val - direction):.3g} vs {abs(other_val - direction):.3g}"
            text = f"{head}: {verdict} (closer to nominal is better; {gaps})."
        elif direction == "higher":
            # correlations, R^2 and hit rates can be negative or near 0: a difference reads better than a %
            text = f"{head}: {verdict} (difference {ft_val - other_val:+.3g})."
        else:
            pct = f" ({change:+.1f}%)" if change is not None else ""
            text = f"{head}: {verdict}{pct}."
    return {"metric": label, "against": other, "finetuned": ft_val, "other": other_val, "better": better,
            "change_pct": change, "sentence": text}


def _markdown_table(table: pd.DataFrame) -> str:
    cols = [table.index.name or ""] + list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name)] + [_fmt(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def report_comparisons(
    result: EvaluationResult, *, finetuned: str = "finetuned", base: str = "base",
    tokens: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict]:
    """Every headline comparison of ``finetuned`` against ``base`` and persistence (GARCH too for vol).

    No selection: each headline metric is compared, wins and losses alike; the cross-sectional IC rows
    are only included when a cross-section exists (at least 3 symbols per origin time).
    """
    if finetuned not in result.table.index:
        return []
    table = result.table
    xs = bool((table["xs_dates"] > 0).any())
    out = []
    for other in (base, "persistence", "garch"):
        if other not in table.index:
            continue
        for col, label, direction in HEADLINE:
            if col.startswith("xs_") and not xs:
                continue
            if other == "garch" and not col.startswith("vol_"):
                continue  # GARCH forecasts volatility only
            row = _sentence(label, finetuned, float(table.at[finetuned, col]), other,
                            float(table.at[other, col]), direction)
            out.append({"column": col, **row})
    if tokens and finetuned in tokens and base in tokens:
        for key, label, direction in TOKEN_HEADLINE:
            row = _sentence(label, finetuned, float(tokens[finetuned].get(key, np.nan)), base,
                            float(tokens[base].get(key, np.nan)), direction)
            out.append({"column": key, **row})
    return out


def write_report(
    result: EvaluationResult,
    run_dir: str | Path,
    *,
    finetuned: str = "finetuned",
    base: str = "base",
    tokens: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json`` (every number, NaN as null), ``metrics_table.csv`` and ``report.md``.

    ``report.md`` holds the headline table for every model and baseline and one sentence per headline
    metric saying whether ``finetuned`` beat ``base`` and persistence (and GARCH on volatility), with
    the numbers. ``tokens`` optionally maps model names to :func:`token_metrics` outputs.
    """
    rd = RunDir(run_dir)
    comparisons = report_comparisons(result, finetuned=finetuned, base=base, tokens=tokens)
    payload = {
        "config": result.config,
        "n_origins": result.n_origins,
        "n_symbols": int(len(np.unique(result.symbols))),
        "origin_time_range": [str(pd.Timestamp(result.origin_time.min())), str(pd.Timestamp(result.origin_time.max()))],
        "point_forecast": result.config["point"],
        "garch_fallbacks": result.garch_fallbacks,
        "timings_s": result.timings,
        "table": result.table.to_dict(orient="index"),
        "scores": result.scores,
        "token_metrics": tokens or {},
        "comparisons": comparisons,
    }
    paths = {"json": rd.metrics_json, "table": rd.metrics_table, "report": rd.report}
    save_json(paths["json"], _jsonable(payload), newline=False, allow_nan=False)
    atomic_write_text(paths["table"], result.table.to_csv())

    cfg = result.config
    lines = [
        "# Forecast evaluation",
        "",
        f"Walk-forward on the test split: {result.n_origins} origins over {payload['n_symbols']} symbol(s) "
        f"({payload['origin_time_range'][0]} to {payload['origin_time_range'][1]}), lookback {cfg['lookback']}, "
        f"horizon {cfg['pred_len']}, stride {cfg['stride']}, {cfg['sample_count']} sample paths. Every origin "
        f"counts and every model and baseline is scored on the same origins. Point metrics use the "
        f"{cfg['point']} of the sample paths; MASE uses the seasonal-naive error (m={cfg['season']}) of each "
        "history window; WQL averages 2*pinball/sum|y| over q=0.1..0.9.",
        "",
        "## Headline metrics",
        "",
        _markdown_table(result.table),
        "",
    ]
    if result.garch_fallbacks:
        fb = result.garch_fallbacks
        reasons = ", ".join(f"{k}: {v}" for k, v in fb.items() if k != "total") or "none"
        lines += [f"GARCH(1,1) fell back to the sample variance on {fb['total']} of {result.n_origins} origins "
                  f"({reasons}).", ""]
    lines += ["## Did finetuning help?", ""]
    if finetuned not in result.table.index:
        lines += [f"No model named {finetuned!r} was evaluated, so there is nothing to compare.", ""]
    else:
        if base not in result.table.index:
            lines += [f"No model named {base!r} was evaluated; comparisons are against the baselines only.", ""]
        for other in dict.fromkeys(c["against"] for c in comparisons):
            rows = [c for c in comparisons if c["against"] == other]
            wins = sum(c["better"] is True for c in rows)
            losses = sum(c["better"] is False for c in rows)
            lines += [f"### {finetuned} vs {other}", "",
                      f"{finetuned.capitalize()} is better on {wins} and worse on {losses} of the {len(rows)} "
                      f"metrics compared against {other} (the rest tie or are not comparable).", ""]
            lines += [f"- {c['sentence']}" for c in rows] + [""]
            if other in result.samples and finetuned in result.samples:
                lines += [_paired_crps_line(result, finetuned, other), ""]
    if tokens:
        keys = [k for k, _, _ in TOKEN_HEADLINE]
        token_table = pd.DataFrame.from_dict({n: {k: t.get(k) for k in keys + ["n_tokens"]} for n, t in tokens.items()},
                                             orient="index")
        token_table.index.name = "model"
        lines += ["## Token-level metrics (test windows, causal path)", "", _markdown_table(token_table), ""]
    atomic_write_text(paths["report"], "\n".join(lines))
    return paths


def _paired_crps_line(result: EvaluationResult, a: str, b: str) -> str:
    # per-origin view of the CRPS gap, so a mean difference driven by a few origins is visible
    ca = M.crps(result.samples[a][..., CLOSE], result.realized[..., CLOSE], axis=1).mean(axis=1)
    cb = M.crps(result.samples[b][..., CLOSE], result.realized[..., CLOSE], axis=1).mean(axis=1)
    share = float(np.mean(ca < cb)) * 100
    ties = float(np.mean(ca == cb)) * 100
    return (f"Per origin, {a} has the lower close CRPS than {b} on {share:.1f}% of the {result.n_origins} origins "
            f"(ties {ties:.1f}%). Origins overlap when stride < horizon, so they are not independent.")


def _by_channel(values: np.ndarray) -> dict[str, Any]:
    return {f: values[k] for k, f in enumerate(FEATURE_COLUMNS)}
