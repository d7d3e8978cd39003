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
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kronos_kit import metrics as M
from kronos_kit.config import DEFAULT_MAX_CONTEXT, EvalConfig
from kronos_kit.data.origins import forecast_origins, origin_inputs, walk_forward_frame
from kronos_kit.data.schema import FEATURE_COLUMNS
from kronos_kit.metrics import CLOSE, INTERVALS
from kronos_kit.phase_report import phase_sections
from kronos_kit.runs import (
    CALIBRATION_FILE,
    PROMOTION_FILE,
    RunDir,
    atomic_write,
    atomic_write_text,
    load_json,
    save_json,
)

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

# Per-origin losses the paired tests compare (EvaluationResult.origin_loss): key -> label in the report.
ORIGIN_LOSSES: dict[str, str] = {"close_crps": "close CRPS", "close_ae": "close MAE", "vol_ae": "realized-vol MAE"}


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

    def origin_loss(self, name: str, metric: str) -> np.ndarray:
        """Per-origin loss (N,) of ``name``, the series the paired tests compare.

        ``close_crps``: close CRPS averaged over the horizon; ``close_ae``: absolute error of the point
        forecast's close, averaged over the horizon; ``vol_ae``: |predicted - realized vol|. Their means
        over origins are the table's ``close_crps``, ``close_mae`` and ``vol_mae``. GARCH has ``vol_ae`` only.
        """
        if metric == "vol_ae":
            return np.abs(self.vol_pred[name] - self.realized_vol)
        if metric not in ORIGIN_LOSSES:
            raise ValueError(f"metric must be one of {sorted(ORIGIN_LOSSES)}, got {metric!r}")
        if name not in self.samples:
            raise ValueError(f"{name!r} has no sample paths (GARCH forecasts volatility only): use 'vol_ae'")
        real = self.realized[..., CLOSE]
        if metric == "close_crps":
            return M.crps(self.samples[name][..., CLOSE], real, axis=1).mean(axis=1)
        return np.abs(self.point(name)[..., CLOSE] - real).mean(axis=1)

    def origin_losses(self) -> pd.DataFrame:
        """Long frame of every per-origin loss: symbol, origin_time, model and one column per
        :data:`ORIGIN_LOSSES` metric (NaN where undefined, e.g. GARCH's close metrics)."""
        parts = []
        for name in self.names:
            part = pd.DataFrame({"symbol": self.symbols, "origin_time": self.origin_time, "model": name})
            for metric in ORIGIN_LOSSES:
                has = metric == "vol_ae" or name in self.samples
                part[metric] = self.origin_loss(name, metric) if has else np.nan
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

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
    frame = walk_forward_frame(frame)
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
    def inputs(batch: np.ndarray) -> tuple[list[pd.DataFrame], list[pd.Series], list[pd.Series]]:
        return origin_inputs(frame, rows[batch], lookback=lookback, pred_len=pred_len)

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
    calibration: SamplingCalibration | None = None,
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
    :func:`walk_forward`, whose arguments these are. ``calibration`` (fitted on the validation split by
    :func:`calibrate_sampling`) replaces ``temperature`` and ``top_p``. The sampling settings are recorded
    in ``result.config["sampling"]``.
    """
    if evaluation is not None:
        if any(v is not None for v in (pred_len, stride, sample_count, max_origins)):
            raise ValueError("pass either evaluation (cfg.evaluation) or pred_len/stride/sample_count/max_origins")
        e = evaluation
        pred_len, stride, sample_count, max_origins = e.pred_len, e.stride, e.sample_count, e.max_origins
        temperature, top_k, top_p, max_context = e.temperature, e.top_k, e.top_p, e.max_context
    if pred_len is None or stride is None or sample_count is None:
        raise TypeError("evaluate_models needs pred_len, stride and sample_count, or evaluation=cfg.evaluation")
    if calibration is not None:
        temperature, top_p = calibration.temperature, calibration.top_p
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
                                 "calibrated": calibration is not None,
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
    Only targets whose bar lies in the split count (a batch's ``in_split``; context bars borrowed
    from the previous split are not scored).
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
            scores = model.score_next_tokens(s1, s2, torch.as_tensor(batch["stamp"], device=device),
                                             batch.get("in_split"))  # test targets only, not val context
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


FORECAST_QUANTILES: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def forecast_table(result: EvaluationResult, quantiles: Sequence[float] = FORECAST_QUANTILES) -> pd.DataFrame:
    """Every origin's close forecast of every model with sample paths, one row per (model, origin, step).

    Columns: model, symbol, origin_time, step (1..pred_len), last_close (the origin bar's close),
    realized_close, close_mean, close_median, close_q<level> for each quantile. `report.md`'s numbers
    can be recomputed from it, and a backtest can read it (`forecasts.parquet` in a run directory).
    """
    n, horizon = result.n_origins, result.realized.shape[1]
    base = {"symbol": np.repeat(result.symbols, horizon), "origin_time": np.repeat(result.origin_time, horizon),
            "step": np.tile(np.arange(1, horizon + 1), n), "last_close": np.repeat(result.last_close, horizon),
            "realized_close": result.realized[..., CLOSE].reshape(-1)}
    parts = []
    for name, samples in result.samples.items():
        close = samples[..., CLOSE]  # (N, S, H)
        cols = {"close_mean": close.mean(axis=1).reshape(-1), "close_median": np.median(close, axis=1).reshape(-1)}
        for q in quantiles:
            cols[f"close_q{q:g}"] = np.quantile(close, q, axis=1).reshape(-1)
        parts.append(pd.DataFrame({"model": name, **base, **cols}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["model", *base])


def write_report(
    result: EvaluationResult,
    run_dir: str | Path,
    *,
    finetuned: str = "finetuned",
    base: str = "base",
    tokens: Mapping[str, Mapping[str, float]] | None = None,
    level: float = 0.05,
    n_boot: int = 2000,
    calibration: SamplingCalibration | None = None,
    promotion: Promotion | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json`` (every number, NaN as null), ``metrics_table.csv``, ``report.md`` and
    ``forecasts.parquet`` (:func:`forecast_table`: every origin's forecast, for backtests).

    ``report.md`` opens with a one-sentence bottom line (:func:`bottom_line`) and one verdict line per
    paired comparison (:func:`paired_comparisons` at ``level``: better / no detectable difference /
    worse, the numbers and the test), then the promotion and sampling calibration when given (both
    decided on validation), the IC / RankIC with Newey-West t-statistics, the headline table for every
    model and baseline and one sentence per headline metric saying whether ``finetuned`` beat ``base``
    and persistence (and GARCH on volatility), with the numbers. ``tokens`` optionally maps model names
    to :func:`token_metrics` outputs. ``metrics.json`` holds the same verdicts.
    """
    rd = RunDir(run_dir)
    comparisons = report_comparisons(result, finetuned=finetuned, base=base, tokens=tokens)
    if finetuned in result.samples:
        paired = paired_comparisons(result, finetuned, (base, *BASELINES), level, n_boot=n_boot,
                                    seed=int(result.config.get("seed", 0)))
        headline = bottom_line(paired, model=finetuned, base=base)
    else:
        paired = pd.DataFrame(columns=_COMPARISON_COLUMNS)
        headline = f"No model named {finetuned!r} was evaluated, so this run cannot say whether finetuning helped."
    ic_table = ic_significance(result)
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
        "bottom_line": headline,
        "paired_comparisons": paired.to_dict(orient="records"),
        "ic_significance": ic_table.to_dict(orient="index"),
        "promotion": promotion.to_dict() if promotion is not None else None,
        "calibration": calibration.to_dict() if calibration is not None else None,
    }
    paths = {"json": rd.metrics_json, "table": rd.metrics_table, "report": rd.report, "forecasts": rd.forecasts}
    save_json(paths["json"], _jsonable(payload), newline=False, allow_nan=False)
    atomic_write_text(paths["table"], result.table.to_csv())
    atomic_write(paths["forecasts"], lambda tmp: forecast_table(result).to_parquet(tmp, index=False))

    lines = phase_sections(rd.path)  # phase 1 and phase 2, from the run's files, before the forecast evaluation
    lines += _report_head(result, headline, paired, level, promotion, calibration, payload)
    lines += _report_details(result, ic_table, comparisons, finetuned, base, tokens)
    atomic_write_text(paths["report"], "\n".join(lines))
    return paths


def _report_head(result: EvaluationResult, headline: str, paired: pd.DataFrame, level: float,
                 promotion: Promotion | None, calibration: SamplingCalibration | None,
                 payload: Mapping[str, Any]) -> list[str]:
    """report.md's opening: the bottom line, the paired verdicts, promotion, calibration, the headline table."""
    cfg = result.config
    lines = ["# Forecast evaluation", "", f"**Bottom line.** {headline}", ""]
    if not paired.empty:
        lines += [f"## Verdict (paired tests at {level:.0%}, test split)", "",
                  "Each line compares per-origin losses on the same origins: the Diebold-Mariano test with a "
                  "Newey-West variance (neighbouring origins are correlated) decides better / no detectable "
                  "difference / worse; relative skill is 1 - model/other (positive: the model is better) with a "
                  "moving-block bootstrap interval. Origins at the same time are averaged into one value.", ""]
        lines += verdict_lines(paired) + [""]
    if promotion is not None:
        lines += ["## Promotion (decided on the validation split)", "", promotion.reason, "",
                  f"Tokenizer: `{promotion.tokenizer}`; predictor: `{promotion.predictor}`. Rule: {promotion.rule}", ""]
    if calibration is not None:
        lines += _calibration_lines(calibration)
    lines += [
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
    return lines


def _report_details(result: EvaluationResult, ic_table: pd.DataFrame, comparisons: list[dict], finetuned: str,
                    base: str, tokens: Mapping[str, Mapping[str, float]] | None) -> list[str]:
    """report.md's body: IC significance, GARCH fallbacks, one sentence per headline metric, token metrics."""
    lines: list[str] = []
    if len(ic_table):
        lines += ["## IC significance (Newey-West t)", "",
                  "t = IC / its Newey-West standard error (time series: the slope of within-symbol z-scored "
                  "realized on predicted returns; cross-sectional: the mean of the per-date ICs); |t| > 1.96 "
                  f"rejects 'no correlation' at 5% (lag {int(ic_table['lag'].iloc[0])}).", "",
                  _markdown_table(ic_table.drop(columns="lag")), ""]
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
    return lines


def _calibration_lines(cal: SamplingCalibration) -> list[str]:
    table = cal.table()
    return ["## Sampling calibration (fitted on the validation split)", "",
            f"Temperature {cal.before['temperature']:g} -> {cal.temperature:g}, top-p {cal.before['top_p']:g} -> "
            f"{cal.top_p:g}: {cal.rule}. Coverage of the central close intervals (nominal 0.5 / 0.8 / 0.95):", "",
            _markdown_table(table), ""]


def _paired_crps_line(result: EvaluationResult, a: str, b: str) -> str:
    # per-origin view of the CRPS gap, so a mean difference driven by a few origins is visible
    ca, cb = result.origin_loss(a, "close_crps"), result.origin_loss(b, "close_crps")
    share = float(np.mean(ca < cb)) * 100
    ties = float(np.mean(ca == cb)) * 100
    return (f"Per origin, {a} has the lower close CRPS than {b} on {share:.1f}% of the {result.n_origins} origins "
            f"(ties {ties:.1f}%). Origins overlap when stride < horizon, so they are not independent.")


def _by_channel(values: np.ndarray) -> dict[str, Any]:
    return {f: values[k] for k, f in enumerate(FEATURE_COLUMNS)}


# ----------------------------------------------------------------------------- paired verdicts

VERDICTS: tuple[str, ...] = ("better", "no detectable difference", "worse")
"""What a paired test can say at the chosen level; "not testable" when it has fewer than 3 time points."""


def overlap_lag(result: EvaluationResult) -> int:
    """Most later origins of one symbol whose targets overlap an origin's targets (position gap < pred_len).

    Losses of origins that share target bars are correlated up to this lag at least: with stride s and
    horizon H it is ceil(H / s) - 1, Diebold-Mariano's h - 1 for h-step forecasts counted in origins.
    """
    horizon = int(result.config["pred_len"])
    most = 0
    for sym in np.unique(result.symbols):
        pos = np.sort(result.origin_pos[result.symbols == sym])
        later = np.searchsorted(pos, pos + horizon, side="left") - np.arange(1, len(pos) + 1)
        most = max(most, int(later.max()))
    return most


def comparison_lag(result: EvaluationResult, diff: np.ndarray) -> int:
    """Newey-West lag of a paired test on the loss-difference series ``diff`` (one value per time).

    The largest of: :func:`overlap_lag` (origins sharing target bars), the Newey-West (1994) rule
    :func:`~kronos_kit.metrics.newey_west_lag` and Andrews' (1991) AR(1) plug-in
    :func:`~kronos_kit.metrics.andrews_lag` on ``diff`` (losses cluster with volatility beyond the
    overlap; with persistent differences the fixed rule alone leaves the test overconfident). Capped at
    (n - 1) // 2 so the HLN correction stays defined.
    """
    n = len(diff)
    if n < 3:
        return 0
    return min(max(overlap_lag(result), M.newey_west_lag(n), M.andrews_lag(diff)), (n - 1) // 2)


def paired_losses(result: EvaluationResult, a: str, b: str, metric: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-origin losses of ``a`` and ``b`` as two series over origin time, ready for the paired tests.

    Origins where either loss is undefined are dropped from both. Several symbols at one origin time are
    averaged into one value: they are forecast from the same market moment and their losses move
    together, so treating them as independent would overstate the evidence. One symbol: the losses as
    they are. Returns (series a, series b, origins used).
    """
    la, lb = result.origin_loss(a, metric), result.origin_loss(b, metric)
    ok = np.isfinite(la) & np.isfinite(lb)
    _, inverse = np.unique(result.origin_time[ok], return_inverse=True)
    count = np.bincount(inverse)
    return np.bincount(inverse, la[ok]) / count, np.bincount(inverse, lb[ok]) / count, int(ok.sum())


def verdict(p_value: float, mean_diff: float, level: float = 0.05) -> str:
    """"better" / "worse" when the test rejects equal loss at ``level`` (by the sign of mean(model - other)),
    "no detectable difference" otherwise, "not testable" without a p-value."""
    if not np.isfinite(p_value):
        return "not testable"
    if p_value < level:
        return "better" if mean_diff < 0 else "worse"
    return "no detectable difference"


def paired_comparisons(
    result: EvaluationResult,
    model: str = "finetuned",
    against: Sequence[str] = ("base", "persistence", "drift", "garch"),
    level: float = 0.05,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    hln: bool = True,
) -> pd.DataFrame:
    """Paired tests of ``model`` against each entry of ``against`` on the same origins, one row per metric.

    Metrics: close CRPS and close MAE (:meth:`EvaluationResult.origin_loss`) against every entry with
    sample paths; realized-vol MAE against GARCH (volatility only). Per row, on :func:`paired_losses`:

    - ``verdict`` from the Diebold-Mariano test (:func:`~kronos_kit.metrics.diebold_mariano`, HAC variance,
      HLN small-sample correction unless ``hln=False``) at ``level``, lag :func:`comparison_lag` of the
      difference series;
    - ``relative_skill`` = 1 - mean(model) / mean(other) (positive: ``model`` is better) with its
      moving-block bootstrap percentile CI at 1 - ``level`` (block = lag + 1, at least round(n^(1/3));
      ``n_boot`` resamples, ``seed``);
    - ``model_mean`` / ``other_mean`` over origins (the table's values) and ``change_pct`` of the model.

    Entries missing from the result are skipped. Returns one row per comparison with columns model,
    other, metric, label, model_mean, other_mean, change_pct, relative_skill, ci_low, ci_high, ci_level,
    dm_stat, p_value, mean_diff, verdict, test, n_origins, n_periods, lag, block.
    """
    if model not in result.samples:
        raise ValueError(f"no sample paths for {model!r}; evaluated: {result.names}")
    rows = []
    for other in against:
        if other == model or other not in result.kinds:
            continue
        for metric in ("close_crps", "close_ae") if other in result.samples else ("vol_ae",):
            a, b, n_used = paired_losses(result, model, other, metric)
            la, lb = result.origin_loss(model, metric), result.origin_loss(other, metric)
            ok = np.isfinite(la) & np.isfinite(lb)
            model_mean = float(la[ok].mean()) if ok.any() else float("nan")
            other_mean = float(lb[ok].mean()) if ok.any() else float("nan")
            lag = comparison_lag(result, a - b)
            dm = M.diebold_mariano(a, b, lag=lag, hln=hln)
            block = min(max(lag + 1, int(round(len(a) ** (1 / 3)))), max(len(a), 1))
            if len(a):
                ci = M.moving_block_bootstrap_ci(a, b, block=block, n_boot=n_boot, level=1 - level, seed=seed)
                low, high = ci.low, ci.high
            else:
                low = high = float("nan")
            skill = M.relative_skill(la[ok], lb[ok]) if ok.any() else float("nan")
            rows.append({
                "model": model, "other": other, "metric": metric, "label": ORIGIN_LOSSES[metric],
                "model_mean": model_mean, "other_mean": other_mean, "change_pct": -100 * skill,
                "relative_skill": skill,
                "ci_low": low, "ci_high": high, "ci_level": 1 - level,
                "dm_stat": dm.statistic, "p_value": dm.p_value, "mean_diff": dm.mean_diff,
                "verdict": verdict(dm.p_value, dm.mean_diff, level), "test": dm.test,
                "n_origins": n_used, "n_periods": len(a), "lag": lag, "block": block,
            })
    return pd.DataFrame(rows, columns=_COMPARISON_COLUMNS)


_COMPARISON_COLUMNS = ["model", "other", "metric", "label", "model_mean", "other_mean", "change_pct",
                       "relative_skill", "ci_low", "ci_high", "ci_level", "dm_stat", "p_value", "mean_diff",
                       "verdict", "test", "n_origins", "n_periods", "lag", "block"]


def _p(p: float) -> str:
    if not np.isfinite(p):
        return "p n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2f}" if p >= 0.1 else f"p = {p:.3g}" if p >= 0.01 else f"p = {p:.1g}"


def bottom_line(
    comparisons: pd.DataFrame, *, model: str = "finetuned", base: str = "base", split: str = "test"
) -> str:
    """One sentence: did finetuning help against ``base`` on close CRPS, how sure, and which baselines beat it.

    Built only from :func:`paired_comparisons` rows, e.g. "Finetuning did not help: on 60 test origins
    the finetuned model's close CRPS is 3.1% worse than the base model's (DM p = 0.02), and persistence
    beats it on close MAE (p < 0.001)."
    """
    if comparisons.empty:
        return f"No comparison was possible: {model!r} has nothing to be compared against."
    rows = comparisons[comparisons["model"] == model]
    head_rows = rows[(rows["other"] == base) & (rows["metric"] == "close_crps")]
    if head_rows.empty:
        n = int(rows["n_origins"].max())
        head = f"No {base} model was evaluated, so this run cannot say whether finetuning helped; on {n} {split} " \
               "origins"
        helped = None
    else:
        r = head_rows.iloc[0]
        size = f"{abs(r['change_pct']):.1f}%"
        where = f"on {int(r['n_origins'])} {split} origins the {model} model's close CRPS is"
        sure = f"(DM {_p(r['p_value'])})"
        if r["verdict"] == "better":
            head = f"Finetuning helped: {where} {size} lower than the {base} model's {sure}"
        elif r["verdict"] == "worse":
            head = f"Finetuning did not help: {where} {size} worse than the {base} model's {sure}"
        elif r["verdict"] == "not testable":
            head = f"Finetuning cannot be judged: {where} {size} {'lower' if r['change_pct'] < 0 else 'higher'} " \
                   f"than the {base} model's, too few origins for a test"
        else:
            head = (f"Finetuning made no detectable difference: {where} {size} "
                    f"{'lower' if r['change_pct'] < 0 else 'higher'} than the {base} model's "
                    f"(DM {_p(r['p_value'])}, not significant at {1 - r['ci_level']:.0%})")
        helped = {"better": 1, "worse": -1}.get(r["verdict"], 0)
    baselines = rows[rows["other"] != base]
    if baselines.empty:
        return head + " no baseline was evaluated." if helped is None else head + "."
    worse = baselines[baselines["verdict"] == "worse"]
    if not worse.empty:
        beats = [f"{other} beats it on " + " and ".join(f"{r.label} ({_p(r.p_value)})" for r in g.itertuples())
                 for other, g in worse.groupby("other", sort=False)]
        tail = "; ".join(beats)
    elif (baselines["verdict"] == "better").all():
        tail = f"it beats every baseline ({', '.join(dict.fromkeys(baselines['other']))}) on every paired metric"
    else:
        k = int((baselines["verdict"] == "better").sum())
        tail = (f"no baseline beats it significantly (better in {k} of {len(baselines)} baseline "
                "comparisons, no detectable difference in the rest)")
    if helped is None:  # no base model: the baselines are the whole story
        return f"{head} {tail}."
    # "but" where the baselines' news goes against the news about the base model
    joiner = ", but " if helped * (1 if worse.empty else -1) < 0 else ", and "
    return f"{head}{joiner}{tail}."


def verdict_lines(comparisons: pd.DataFrame) -> list[str]:
    """One markdown bullet per comparison: the verdict in bold, the means, skill with CI, DM statistic, test."""
    lines = []
    for r in comparisons.itertuples():
        level = f"{1 - r.ci_level:.0%}"
        skill = (f"relative skill {r.relative_skill:+.1%} ({r.ci_level:.0%} CI {r.ci_low:+.1%} to {r.ci_high:+.1%}, "
                 f"moving-block bootstrap, block {r.block})")
        lines.append(
            f"- {r.model} vs {r.other}, {r.label}: **{r.verdict}** at {level}. {_fmt(r.model_mean)} vs "
            f"{_fmt(r.other_mean)} ({r.change_pct:+.1f}%); {skill}; DM {r.dm_stat:.2f}, {_p(r.p_value)} "
            f"({r.test}; {r.n_origins} origins at {r.n_periods} times)."
        )
    return lines


def ic_significance(result: EvaluationResult, *, lag: int | None = None) -> pd.DataFrame:
    """IC / RankIC of every entry with sample paths beside their Newey-West t-statistics
    (:func:`~kronos_kit.metrics.ic_tstats`). ``lag`` defaults to the larger of :func:`overlap_lag` (horizon
    returns of overlapping origins share bars) and the Newey-West (1994) rule on the number of origin
    times, capped at (n - 1) // 2. |t| > 1.96 rejects "no correlation" at 5% (two-sided)."""
    if lag is None:
        n_times = len(np.unique(result.origin_time))
        lag = min(max(overlap_lag(result), M.newey_west_lag(n_times)), max((n_times - 1) // 2, 0))
    rows = {}
    for name in result.samples:
        pred, real = result.horizon_returns(name)
        t = M.ic_tstats(pred, real, result.symbols, result.origin_time, lag=lag)
        s = result.scores[name]
        rows[name] = {"ic": s["ic"], "ic_t": t["ic_t"], "rank_ic": s["rank_ic"], "rank_ic_t": t["rank_ic_t"],
                      "xs_ic": s["xs_ic"], "xs_ic_t": t["xs_ic_t"], "xs_rank_ic": s["xs_rank_ic"],
                      "xs_rank_ic_t": t["xs_rank_ic_t"], "lag": lag}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


# ------------------------------------------------------------------- run-directory decisions


class _RunFile:
    """Plain-JSON save/load of a decision dataclass: a run folder is data, loading it runs no code.

    ``save``/``load`` take the run directory (the file name is the class's ``FILE``) or a ``.json`` path;
    ``load`` checks every field and names the file and field at fault.
    """

    FILE: ClassVar[str]

    @classmethod
    def _path(cls, path: str | Path) -> Path:
        path = Path(path)
        return path if path.suffix == ".json" else path / cls.FILE

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def save(self, path: str | Path) -> Path:
        return save_json(self._path(path), self.to_dict(), allow_nan=False)

    @classmethod
    def load(cls, path: str | Path):
        path = cls._path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; {cls.__name__} is written by the pipeline's "
                                    "validation step (or call .save on one)")
        data = load_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        types = {f.name: f.type for f in fields(cls)}
        unknown = set(data) - set(types)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; expected {sorted(types)}")
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ValueError(f"{path}: field {f.name!r} is missing; re-create the file")
                continue
            expected = _JSON_TYPES[f.type]
            value = data[f.name]
            if not isinstance(value, expected) or isinstance(value, bool) and bool not in expected:
                raise ValueError(f"{path}: field {f.name!r} must be {f.type}, got {type(value).__name__} {value!r}")
        return cls(**data)


# dataclass field annotations (strings under `from __future__ import annotations`) -> JSON types
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "float": (int, float), "int": (int,),
    "dict[str, Any]": (dict,), "list[dict[str, Any]]": (list,),
}

TEMPERATURE_GRID: tuple[float, ...] = (0.7, 0.85, 1.0, 1.15, 1.3)
TOP_P_GRID: tuple[float, ...] = (0.8, 0.9, 1.0)


@dataclass
class SamplingCalibration(_RunFile):
    """Sampling temperature and top-p fitted on the validation split (:func:`calibrate_sampling`).

    ``before`` / ``after`` hold temperature, top_p, close CRPS and the coverage of the 50/80/95% close
    intervals at the starting and at the chosen setting; ``grid`` holds the same for every grid point.
    """

    FILE: ClassVar[str] = CALIBRATION_FILE

    temperature: float
    top_p: float
    model: str
    before: dict[str, Any]
    after: dict[str, Any]
    grid: list[dict[str, Any]]
    n_origins: int
    rule: str
    metric: str = "close_crps"
    split: str = "validation"

    def sampling(self) -> dict[str, float]:
        """Keyword arguments for :func:`evaluate_models` / ``KronosPredictor.as_forecast_fn``."""
        return {"temperature": self.temperature, "top_p": self.top_p}

    def table(self) -> pd.DataFrame:
        """Rows ``before`` / ``after``: temperature, top_p, close CRPS and 50/80/95% interval coverage (validation)."""
        table = pd.DataFrame.from_dict({"before": self.before, "after": self.after}, orient="index")
        table.index.name = "setting"
        return table


def calibrate_sampling(
    forecaster: KronosPredictor | Callable[[float, float], ForecastFn],
    validation: pd.DataFrame | Splits,
    *,
    lookback: int,
    pred_len: int,
    stride: int,
    sample_count: int,
    max_origins: int | None = None,
    temperatures: Sequence[float] = TEMPERATURE_GRID,
    top_ps: Sequence[float] = TOP_P_GRID,
    current: tuple[float, float] = (1.0, 0.9),
    top_k: int = 0,
    seed: int = 0,
    model: str = "finetuned",
    batch_size: int = 32,
    point: str = "median",
    progress: bool = False,
) -> SamplingCalibration:
    """Fit sampling temperature and top-p on the validation split by the mean close CRPS.

    ``forecaster`` is a ``KronosPredictor`` (sampled through ``as_forecast_fn(T, top_k, top_p, seed)``) or
    any ``(temperature, top_p) -> ForecastFn`` factory. ``validation`` is the validation frame or the
    :class:`~kronos_kit.data.Splits`, whose ``val`` part is used: never the test split. Each grid point
    (every ``temperatures`` x ``top_ps`` pair, plus ``current``) runs :func:`walk_forward` on the same
    origins with the same ``seed`` (common random numbers, so differences come from the setting, not the
    noise). The lowest mean close CRPS wins; exact ties (rtol 1e-9) go to the setting closest to
    ``current`` (|dT| + |dp|). Default grid: T in 0.7..1.3 (+-30% around the trained distribution) and
    top-p in {0.8, 0.9, 1.0}: 15 walk-forwards, so keep ``max_origins`` small.
    """
    frame = validation.val if hasattr(validation, "val") else validation
    if hasattr(forecaster, "as_forecast_fn"):
        predictor = forecaster

        def make(temperature: float, top_p: float) -> ForecastFn:
            return predictor.as_forecast_fn(temperature, top_k, top_p, seed)
    else:
        make = forecaster
    settings = list(dict.fromkeys([(float(t), float(p)) for t in temperatures for p in top_ps]))
    current = (float(current[0]), float(current[1]))
    grid, n_origins = [], 0
    for temperature, top_p in list(dict.fromkeys(settings + [current])):
        result = walk_forward(frame, {model: make(temperature, top_p)}, lookback=lookback, pred_len=pred_len,
                              stride=stride, sample_count=sample_count, max_origins=max_origins, baselines=(),
                              seed=seed, progress=progress, batch_size=batch_size, point=point)
        row = result.table.loc[model]
        grid.append({"temperature": temperature, "top_p": top_p, "close_crps": float(row["close_crps"]),
                     **{f"coverage_{round(lvl * 100)}": float(row[f"coverage_{round(lvl * 100)}"])
                        for lvl in INTERVALS},
                     "in_grid": (temperature, top_p) in settings})
        n_origins = result.n_origins
    candidates = [g for g in grid if g["in_grid"] and np.isfinite(g["close_crps"])]
    if not candidates:
        raise ValueError("every grid point gave a non-finite close CRPS; check the forecaster on validation data")
    best_crps = min(g["close_crps"] for g in candidates)
    tied = [g for g in candidates if np.isclose(g["close_crps"], best_crps, rtol=1e-9, atol=0)]
    chosen = min(tied, key=lambda g: abs(g["temperature"] - current[0]) + abs(g["top_p"] - current[1]))
    before = next(g for g in grid if (g["temperature"], g["top_p"]) == current)
    keep = ("temperature", "top_p", "close_crps", "coverage_50", "coverage_80", "coverage_95")
    rule = (f"lowest mean close CRPS of {model!r} over {len(settings)} (temperature, top_p) settings on "
            f"{n_origins} validation origins (seed {seed}, {sample_count} paths); ties go to the setting "
            f"closest to the starting one ({current[0]:g}, {current[1]:g})")
    return SamplingCalibration(temperature=chosen["temperature"], top_p=chosen["top_p"], model=model,
                               before={k: before[k] for k in keep}, after={k: chosen[k] for k in keep},
                               grid=grid, n_origins=n_origins, rule=rule)


@dataclass
class Promotion(_RunFile):
    """Which tokenizer + predictor a run hands on (:func:`decide_promotion`), with the validation evidence."""

    FILE: ClassVar[str] = PROMOTION_FILE

    promoted: str
    tokenizer: str
    predictor: str
    metric: str
    evidence: dict[str, Any]
    rule: str
    reason: str
    split: str = "validation"


def decide_promotion(
    validation_result: EvaluationResult,
    *,
    finetuned_sources: tuple[str, str],
    base_sources: tuple[str, str],
    finetuned: str = "finetuned",
    base: str = "base",
    metric: str = "close_crps",
    level: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> Promotion:
    """Promote the finetuned pair only when it beats the base on the validation split; else keep the base.

    Rule: promote ``finetuned`` when (1) its mean validation ``metric`` (``close_crps`` or ``close_ae``,
    per-origin means as in :meth:`EvaluationResult.origin_loss`) is lower than ``base``'s and (2) the
    paired Diebold-Mariano test does not find it worse on close MAE at ``level`` (a probabilistic gain
    bought with a significantly worse point forecast does harm). Otherwise ``base`` is promoted. The
    ``*_sources`` are (tokenizer, predictor) locations written as given. ``validation_result`` must come
    from the validation split: the test split only reports.
    """
    if metric not in ("close_crps", "close_ae"):
        raise ValueError(f"metric must be 'close_crps' or 'close_ae', got {metric!r}")
    for name in (finetuned, base):
        if name not in validation_result.samples:
            raise ValueError(f"the validation result has no model {name!r}; evaluated: {validation_result.names}")
    rows = paired_comparisons(validation_result, finetuned, (base,), level, n_boot=n_boot, seed=seed)
    main = rows[rows["metric"] == metric].iloc[0]
    mae = rows[rows["metric"] == "close_ae"].iloc[0]
    lower = bool(np.isfinite(main["model_mean"]) and np.isfinite(main["other_mean"])
                 and main["model_mean"] < main["other_mean"])
    mae_worse = mae["verdict"] == "worse"
    promote = lower and not mae_worse
    label = ORIGIN_LOSSES[metric]
    change = f"{abs(main['change_pct']):.1f}% {'lower' if main['change_pct'] < 0 else 'higher'}"
    numbers = (f"validation {label} {_fmt(main['model_mean'])} vs {_fmt(main['other_mean'])} ({change}, "
               f"DM {_p(main['p_value'])}, {int(main['n_origins'])} origins)")
    if promote:
        reason = f"Promoted {finetuned}: its {numbers} is lower than {base}'s, and close MAE is not worse."
    elif lower:
        reason = (f"Promoted {base}: {finetuned}'s {numbers} is lower, but its close MAE is significantly worse "
                  f"({_fmt(mae['model_mean'])} vs {_fmt(mae['other_mean'])}, DM {_p(mae['p_value'])}).")
    else:
        reason = f"Promoted {base}: {finetuned} did not beat it on the {numbers}."
    rule = (f"Promote the finetuned tokenizer + predictor only when its mean validation {label} is lower than "
            f"the base model's and the paired Diebold-Mariano test (Newey-West variance) does not find its close "
            f"MAE worse at {level:.0%}; otherwise keep the base pair. Decided on validation only, never on test.")
    keys = ("model_mean", "other_mean", "change_pct", "relative_skill", "ci_low", "ci_high", "dm_stat", "p_value",
            "verdict", "test", "n_origins")
    evidence = {"metric": {k: main[k] for k in keys}, "close_mae": {k: mae[k] for k in keys},
                "finetuned": finetuned, "base": base}
    tokenizer, predictor = finetuned_sources if promote else base_sources
    return Promotion(promoted=finetuned if promote else base, tokenizer=str(tokenizer), predictor=str(predictor),
                     metric=metric, evidence=_jsonable(evidence), rule=rule, reason=reason)


# ---------------------------------------------------------------- the validation step of a run


@dataclass
class ValidationDecision:
    """What a run decides on the validation split before the test split is touched (:func:`decide_on_validation`)."""

    result: EvaluationResult  # base and finetuned on validation origins, at the configured sampling
    promotion: Promotion
    calibration: SamplingCalibration | None  # None when calibration is switched off

    @property
    def sampling(self) -> dict[str, float]:
        """Temperature and top-p the test evaluation and the run's forecaster use."""
        return self.calibration.sampling() if self.calibration is not None else {}


def _run_relative(source: str | Path, run_dir: Path | None) -> str:
    """A checkpoint folder inside the run directory as a path relative to it (the run folder can move)."""
    path = Path(source)
    if run_dir is None or not path.exists():
        return str(source)  # a preset, an embedded name or a hub id stays as given
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(source)


def decide_on_validation(
    validation: pd.DataFrame | Splits,
    models: Mapping[str, tuple[Kronos, KronosTokenizer]],
    evaluation: EvalConfig,
    *,
    lookback: int,
    finetuned_sources: tuple[str | Path, str | Path],
    base_sources: tuple[str | Path, str | Path],
    run_dir: str | Path | None = None,
    finetuned: str = "finetuned",
    base: str = "base",
    temperatures: Sequence[float] | None = None,
    top_ps: Sequence[float] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ValidationDecision:
    """Promotion and sampling calibration, both on the validation split only (never the test split).

    1. ``base`` and ``finetuned`` forecast the same validation origins (``evaluation``'s horizon, stride
       and paths, at most ``evaluation.val_origins`` origins, the configured sampling);
       :func:`decide_promotion` keeps the base pair unless the finetuned one has the lower close CRPS and a
       close MAE that is not significantly worse.
    2. When ``evaluation.calibrate``, :func:`calibrate_sampling` fits temperature and top-p of the
       promoted pair on the same origins (``temperatures`` x ``top_ps``, by default
       ``evaluation.calibration_temperatures`` x ``evaluation.calibration_top_ps``, plus the configured
       setting; each grid point is one walk-forward, so the grid is the cost).

    ``validation`` is the validation frame or the :class:`~kronos_kit.data.Splits` (its ``val`` part).
    With ``run_dir`` the decisions are written there (``promoted.json``, ``calibration.json``), sources
    inside it relative to it, so the run folder can move.
    """
    frame = validation.val if hasattr(validation, "val") else validation
    e = evaluation
    settings = dict(lookback=lookback, pred_len=e.pred_len, stride=e.stride, sample_count=e.sample_count,
                    max_origins=e.val_origins)
    sampling = dict(temperature=e.temperature, top_k=e.top_k, top_p=e.top_p, max_context=e.max_context)
    pairs = {name: models[name] for name in (base, finetuned)}
    result = evaluate_models(frame, pairs, **settings, **sampling, baselines=(), seed=seed, device=device,
                             progress=progress)
    root = Path(run_dir) if run_dir is not None else None
    promotion = decide_promotion(result, finetuned=finetuned, base=base, seed=seed,
                                 finetuned_sources=tuple(_run_relative(s, root) for s in finetuned_sources),
                                 base_sources=tuple(_run_relative(s, root) for s in base_sources))
    calibration = None
    if e.calibrate:
        predictor = _predictors({promotion.promoted: pairs[promotion.promoted]}, device=device,
                                max_context=e.max_context)[promotion.promoted]
        temperatures = e.calibration_temperatures if temperatures is None else temperatures
        top_ps = e.calibration_top_ps if top_ps is None else top_ps
        calibration = calibrate_sampling(predictor, frame, **settings, temperatures=temperatures, top_ps=top_ps,
                                         current=(e.temperature, e.top_p), top_k=e.top_k, seed=seed,
                                         model=promotion.promoted, progress=progress)
    if root is not None:
        promotion.save(root)
        if calibration is not None:
            calibration.save(root)
        else:
            RunDir(root).calibration.unlink(missing_ok=True)  # a stale file must not outlive the setting
    return ValidationDecision(result, promotion, calibration)
