"""Walk-forward over a split: every model and baseline forecasts the same mechanically placed origins.

Models enter as plain callables (:data:`ForecastFn`) so this module does not depend on the forecaster's
internals (:func:`evaluate_models` wraps Kronos pairs into such callables):

    fn(histories, history_stamps, future_stamps, pred_len, sample_count) -> (n, S, pred_len, 6) array

in price units, features ordered open, high, low, close, volume, amount. Each history frame carries
its symbol in ``frame.attrs["symbol"]``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kronos_kit import metrics as M
from kronos_kit.calibration import Handover, PathCalibration
from kronos_kit.config import DEFAULT_MAX_CONTEXT, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, EvalConfig
from kronos_kit.data.origins import forecast_origins, origin_inputs, walk_forward_frame
from kronos_kit.data.schema import FEATURE_COLUMNS
from kronos_kit.evaluate.baselines import BASELINES, fit_garch, naive_paths
from kronos_kit.evaluate.scores import EvaluationResult
from kronos_kit.metrics import CLOSE
from kronos_kit.runtime import tqdm

if TYPE_CHECKING:  # only for annotations: walk_forward itself never touches the model
    import torch

    from kronos_kit.data import Splits
    from kronos_kit.forecast import KronosPredictor
    from kronos_kit.model import Kronos, KronosTokenizer
    from kronos_kit.runs import SamplingCalibration

ForecastFn = Callable[[list[pd.DataFrame], list[pd.Series], list[pd.Series], int, int], np.ndarray]
"""(histories, history timestamps, future timestamps, pred_len, sample_count) -> (n, S, pred_len, 6)."""


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
    label: str = "walk-forward",
) -> EvaluationResult:
    """Walk-forward evaluation of ``models`` and ``baselines`` on the same origins of the test split.

    ``frame`` is the canonical long frame (symbol, timestamps, open, high, low, close, volume, amount,
    optional boolean ``is_context``). Origins come from :func:`forecast_origins`; each model is called
    with up to ``batch_size`` origins at a time. ``point`` picks the median or mean of the sample paths
    for point metrics; ``season`` is the MASE seasonal period m; ``label`` names the progress bar (one bar over
    every model's batches, so its ETA is the whole forecast's). Baselines
    (:mod:`~kronos_kit.evaluate.baselines`): "persistence" (one path), "drift", "random_walk", "garch_rw"
    and "bootstrap" (``sample_count`` seeded paths each), "garch" (volatility only).
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
                     batch_size=batch_size, progress=progress, label=label)
    _forecast_baselines(result, baselines, pred_len=pred_len, sample_count=sample_count, seed=seed,
                        progress=progress, label=label)
    t0 = time.perf_counter()
    for name, paths in result.samples.items():
        result.vol_pred[name] = M.predicted_vol(paths, result.last_close)
    result.rescore()
    result.timings["metrics"] = time.perf_counter() - t0
    return result


def _forecast_models(result: EvaluationResult, frame: pd.DataFrame, rows: np.ndarray, models: Mapping[str, ForecastFn],
                     *, lookback: int, pred_len: int, sample_count: int, batch_size: int, progress: bool,
                     label: str) -> None:
    """Every model's sample paths at every origin, ``batch_size`` origins per call, into ``result``."""
    def inputs(batch: np.ndarray) -> tuple[list[pd.DataFrame], list[pd.Series], list[pd.Series]]:
        return origin_inputs(frame, rows[batch], lookback=lookback, pred_len=pred_len)

    batches = [np.arange(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    bar = tqdm(total=len(batches) * len(models), desc=f"{label} ({len(rows)} origins)", unit="batch",
               disable=not progress)
    for name, fn in models.items():
        parts, build_s, call_s = [], 0.0, 0.0
        bar.set_postfix_str(f"forecasting {name}")
        for batch in batches:
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
            bar.update(1)
        result.samples[name] = np.concatenate(parts)
        # the model's own time apart from building its input frames (the evaluator's share)
        result.timings[f"model:{name}"] = call_s
        result.timings[f"inputs:{name}"] = build_s
    bar.close()


def _forecast_baselines(result: EvaluationResult, baselines: Sequence[str], *, pred_len: int, sample_count: int,
                        seed: int, progress: bool, label: str) -> None:
    """Baseline paths and GARCH volatility at every origin, into ``result`` (one GARCH fit per origin
    serves both ``garch`` and ``garch_rw``; its time is counted once, under the first of them)."""
    history = result.history
    rng = np.random.default_rng(seed)
    fits = None
    for name in sorted(baselines, key=BASELINES.index):  # one draw order, whatever the order asked for
        t0 = time.perf_counter()
        if name in ("garch", "garch_rw") and fits is None:
            fits = [fit_garch(history[i, :, CLOSE]) for i in tqdm(range(len(history)), desc=f"{label}: GARCH(1,1)",
                                                                   unit="fit", disable=not progress)]
            reasons = Counter(f.fallback for f in fits if f.fallback is not None)
            result.garch_fallbacks = {"total": sum(reasons.values()), **dict(reasons)}
        if name == "garch":
            result.vol_pred[name] = np.array([f.variance_forecast(pred_len).sum() for f in fits])
        else:  # the same draws as kronos_kit.naive.naive_paths over every name at once
            result.samples[name] = naive_paths((name,), history, pred_len, sample_count, rng, fits=fits)[name]
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
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    max_context: int | None = None,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
    baselines: Sequence[str] = BASELINES,
    progress: bool = True,
    batch_size: int = 32,
    point: str = "median",
    season: int = 1,
    calibration: SamplingCalibration | None = None,
    label: str = "walk-forward",
) -> EvaluationResult:
    """Walk-forward evaluation of Kronos (predictor, tokenizer) pairs: the notebook one-liner.

    ``frame_or_test_split`` is the test frame (usually ``split(...).test``, whose ``is_context`` rows
    only feed histories) or the :class:`~kronos_kit.data.Splits` itself, whose ``test`` part is used.
    Settings come from one place: either ``evaluation`` (the run's ``cfg.evaluation``: ``pred_len``,
    ``stride``, ``sample_count``, ``max_origins``, ``temperature``, ``top_k``, ``top_p``,
    ``max_context``) or those arguments one by one (sampling defaults: the kit's
    ``DEFAULT_TEMPERATURE`` / ``DEFAULT_TOP_K`` / ``DEFAULT_TOP_P``, context ``DEFAULT_MAX_CONTEXT``),
    never both. ``models`` maps a name to ``(Kronos, KronosTokenizer)``; each pair is wrapped in a
    :class:`~kronos_kit.forecast.KronosPredictor` on ``device`` with ``max_context`` (a ready
    ``KronosPredictor`` is used as it is, with its own device and context). Every model samples
    with the same ``temperature``, ``top_k``, ``top_p`` and ``seed`` (the same seed for every batch
    and model: common random numbers, reproducible), through
    :meth:`~kronos_kit.forecast.KronosPredictor.as_forecast_fn`; everything else is
    :func:`walk_forward`, whose arguments these are. ``calibration`` (calibration.json, fitted on the
    validation split by :func:`~kronos_kit.evaluate.decisions.calibrate_forecasts`) replaces the configured
    ``temperature`` and ``top_p`` (so it cannot be combined with an explicit ``temperature`` or ``top_p``),
    and each model it holds a path calibration for has its sample paths calibrated after sampling
    (:meth:`EvaluationResult.calibrate`; the paths as sampled stay in ``result.uncalibrated``). The
    sampling settings are recorded in ``result.config["sampling"]``. When ``calibration`` holds a handed-over
    forecast for one of ``models`` (its promoted model), the result gets it as the entry ``handed_over``
    (:meth:`EvaluationResult.hand_over`; its naive members are evaluated as baselines if not asked for).
    """
    if calibration is not None and (temperature is not None or top_p is not None):
        raise ValueError("pass either calibration (its temperature / top_p) or temperature / top_p, not both")
    s = _settings(evaluation, pred_len=pred_len, stride=stride, sample_count=sample_count, max_origins=max_origins,
                  temperature=temperature, top_k=top_k, top_p=top_p, max_context=max_context)
    temperature, top_p = s["temperature"], s["top_p"]
    if calibration is not None:
        temperature, top_p = calibration.temperature, calibration.top_p
    frame = _test_frame(frame_or_test_split)
    if not models:
        raise ValueError("models must name at least one (predictor, tokenizer) pair")
    predictors = as_predictors(models, device=device, max_context=s["max_context"])
    fns: dict[str, ForecastFn] = {name: p.as_forecast_fn(temperature, s["top_k"], top_p, seed)
                                  for name, p in predictors.items()}
    handover = None
    if calibration is not None and calibration.model in fns and calibration.handover_choice():
        handover = Handover.from_dict(calibration.handover_choice(), where="calibration.json")
        baselines = (*baselines, *(m for m in handover.ensemble.naive_members if m not in baselines))
    result = walk_forward(frame, fns, lookback=lookback, pred_len=s["pred_len"], stride=s["stride"],
                          sample_count=s["sample_count"], max_origins=s["max_origins"], baselines=baselines,
                          seed=0 if seed is None else seed, progress=progress, batch_size=batch_size, point=point,
                          season=season, label=label)
    if calibration is not None:  # each model's path calibration fitted on validation, applied to its paths
        result.calibrate({name: PathCalibration.from_dict(calibration.path_calibration(name), where="calibration.json")
                          for name in fns if name in calibration.paths})
    if handover is not None:
        result.hand_over(handover, calibration.model)
    result.config["sampling"] = {"temperature": temperature, "top_k": s["top_k"], "top_p": top_p, "seed": seed,
                                 "calibrated": calibration is not None,
                                 "max_context": {n: p.max_context for n, p in predictors.items()},
                                 "device": {n: str(p.device) for n, p in predictors.items()}}
    return result


_SECTION_FIELDS = ("pred_len", "stride", "sample_count", "max_origins", "temperature", "top_k", "top_p",
                   "max_context")
_LOOSE_DEFAULTS = {"max_origins": None, "temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K,
                   "top_p": DEFAULT_TOP_P, "max_context": DEFAULT_MAX_CONTEXT}


def _settings(evaluation: EvalConfig | None, **loose: Any) -> dict[str, Any]:
    """The walk-forward and sampling settings from ``evaluation`` or from the loose arguments, not both."""
    given = sorted(k for k, v in loose.items() if v is not None)
    if evaluation is not None:
        if given:
            raise ValueError(f"pass either evaluation (cfg.evaluation) or {'/'.join(given)}, not both: "
                             "the section already holds them")
        return {k: getattr(evaluation, k) for k in _SECTION_FIELDS}
    missing = [k for k in ("pred_len", "stride", "sample_count") if loose[k] is None]
    if missing:
        raise TypeError(f"evaluate_models needs pred_len, stride and sample_count ({', '.join(missing)} missing), "
                        "or evaluation=cfg.evaluation")
    return {k: _LOOSE_DEFAULTS[k] if loose[k] is None else loose[k] for k in _SECTION_FIELDS}


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


def as_predictors(models: Mapping[str, Any], *, device: Any, max_context: int) -> dict[str, KronosPredictor]:
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


__all__ = ["ForecastFn", "evaluate_models", "walk_forward"]
