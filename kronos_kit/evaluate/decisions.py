"""The run's decisions on the validation split: sampling calibration and promotion (never the test split).

The decision files' schema, load and save live with the run layout (:class:`~kronos_kit.runs.Promotion`,
:class:`~kronos_kit.runs.SamplingCalibration`); this module decides what goes into them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from kronos_kit.binding import bind
from kronos_kit.calibration import fit_handover, fit_path_calibration
from kronos_kit.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, MIN_DECISION_ORIGINS, EvalConfig
from kronos_kit.evaluate.scores import EvaluationResult
from kronos_kit.evaluate.table import ORIGIN_LOSSES
from kronos_kit.evaluate.text import fmt, fmt_p, fmt_pct
from kronos_kit.evaluate.verdicts import paired_comparisons
from kronos_kit.evaluate.walk_forward import ForecastFn, as_predictors, evaluate_models, walk_forward
from kronos_kit.metrics import INTERVALS
from kronos_kit.naive import naive_paths
from kronos_kit.runs import Promotion, RunDir, SamplingCalibration, jsonable, relative_source

if TYPE_CHECKING:
    import torch

    from kronos_kit.data import Splits
    from kronos_kit.forecast import KronosPredictor
    from kronos_kit.model import Kronos, KronosTokenizer


logger = logging.getLogger(__name__)
TEMPERATURE_GRID: tuple[float, ...] = (0.7, 0.85, 1.0, 1.15, 1.3)
TOP_P_GRID: tuple[float, ...] = (0.8, 0.9, 1.0)


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
    current: tuple[float, float] = (DEFAULT_TEMPERATURE, DEFAULT_TOP_P),
    top_k: int = DEFAULT_TOP_K,
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
    too_few = n_origins < MIN_DECISION_ORIGINS
    if too_few:  # a grid search on a handful of origins fits their noise: keep the configured sampling
        logger.warning("calibration: only %d validation origins (fewer than %d): kept the configured sampling "
                       "(temperature %g, top_p %g); raise evaluation.val_origins or the validation split",
                       n_origins, MIN_DECISION_ORIGINS, *current)
        chosen = before
    keep = ("temperature", "top_p", "close_crps", "coverage_50", "coverage_80", "coverage_95")
    rule = (f"lowest mean close CRPS of {model!r} over {len(settings)} (temperature, top_p) settings on "
            f"{n_origins} validation origins (seed {seed}, {sample_count} paths); ties go to the setting "
            f"closest to the starting one ({current[0]:g}, {current[1]:g})")
    if too_few:
        rule = (f"not calibrated: {n_origins} validation origins are fewer than the {MIN_DECISION_ORIGINS} a "
                f"calibration needs, so the configured sampling ({current[0]:g}, {current[1]:g}) is kept")
    return SamplingCalibration(temperature=chosen["temperature"], top_p=chosen["top_p"], model=model,
                               before={k: before[k] for k in keep}, after={k: chosen[k] for k in keep},
                               grid=grid, n_origins=n_origins, rule=rule)


def decide_promotion(
    validation_result: EvaluationResult,
    *,
    finetuned_sources: tuple[str, str],
    base_sources: tuple[str, str],
    finetuned: str = "finetuned",
    base: str = "base",
    metric: str = "close_crps",
    level: float = 0.05,
    promotion_level: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> Promotion:
    """Promote the finetuned pair only when the validation split shows it beats the base; else keep the base.

    Rule: promote ``finetuned`` when (1) its mean validation ``metric`` (``close_crps`` or ``close_ae``,
    per-origin means as in :meth:`EvaluationResult.origin_loss`) is lower than ``base``'s and a one-sided
    paired Diebold-Mariano test (H1: lower) rejects at ``promotion_level`` (a point estimate 0.8% lower at
    p 0.62 is no evidence; ``promotion_level=1`` promotes on a lower mean alone), and (2) the paired test does
    not find it worse on close MAE at ``level`` (a probabilistic gain bought with a significantly worse point
    forecast does harm). Otherwise ``base`` is promoted. The ``*_sources`` are (tokenizer, predictor)
    locations written as given. ``validation_result`` must come from the validation split: the test split
    only reports.
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
    p_one = one_sided_p(main["dm_stat"], main["p_value"])
    shown = bool(np.isfinite(p_one) and p_one < promotion_level)
    n_origins = int(main["n_origins"])
    # "not testable" is no evidence that the close MAE is not worse: only a test that ran can clear it
    mae_cleared = mae["verdict"] in ("better", "no detectable difference", "identical")
    enough = n_origins >= MIN_DECISION_ORIGINS
    promote = lower and shown and mae_cleared and enough
    label = ORIGIN_LOSSES[metric]
    change = f"{abs(main['change_pct']):.1f}% {'lower' if main['change_pct'] < 0 else 'higher'}"
    strength = f"one-sided DM {fmt_p(p_one)}, {'below' if shown else 'not below'} the level {promotion_level:g}"
    numbers = (f"validation {label} {fmt(main['model_mean'])} vs {fmt(main['other_mean'])} ({change}, {strength}, "
               f"{n_origins} origins, minimum detectable effect {fmt_pct(main['mde'])})")
    if promote:
        reason = f"Promoted {finetuned}: its {numbers} is lower than {base}'s, and close MAE is not worse."
    elif lower and not enough:
        reason = (f"Promoted {base}: {finetuned}'s {numbers} is lower, but {n_origins} validation origins are fewer "
                  f"than the {MIN_DECISION_ORIGINS} a promotion needs; raise evaluation.val_origins or the "
                  "validation split to decide.")
    elif lower and not shown:
        reason = (f"Promoted {base}: {finetuned}'s {numbers} is lower, but not significantly (promotion needs "
                  f"one-sided p < evaluation.promotion_level {promotion_level:g}): no evidence finetuning helped.")
    elif lower and not mae_cleared and mae["verdict"] != "worse":
        reason = (f"Promoted {base}: {finetuned}'s {numbers} is lower, but its close MAE could not be tested "
                  f"({mae['verdict']}), so it is not shown to be no worse.")
    elif lower:
        reason = (f"Promoted {base}: {finetuned}'s {numbers} is lower, but its close MAE is significantly worse "
                  f"({fmt(mae['model_mean'])} vs {fmt(mae['other_mean'])}, DM {fmt_p(mae['p_value'])}).")
    else:
        reason = f"Promoted {base}: {finetuned} did not beat it on the {numbers}."
    rule = (f"Promote the finetuned tokenizer + predictor only when its mean validation {label} is lower than "
            f"the base model's, significantly (one-sided paired Diebold-Mariano test, Newey-West variance, at "
            f"evaluation.promotion_level {promotion_level:g}), on at least {MIN_DECISION_ORIGINS} origins, and the "
            f"two-sided test does not find its close MAE worse at {level:.0%}; otherwise keep the base pair. "
            "Decided on validation only, never on test.")
    if not promote and (not enough or not mae_cleared):
        logger.warning("promotion: %s", reason)
    keys = ("model_mean", "other_mean", "change_pct", "relative_skill", "ci_low", "ci_high", "dm_stat", "p_value",
            "verdict", "test", "n_origins", "mde")
    evidence = {"metric": {**{k: main[k] for k in keys}, "p_one_sided": p_one, "promotion_level": promotion_level},
                "close_mae": {k: mae[k] for k in keys}, "finetuned": finetuned, "base": base}
    tokenizer, predictor = finetuned_sources if promote else base_sources
    return Promotion(promoted=finetuned if promote else base, tokenizer=str(tokenizer), predictor=str(predictor),
                     metric=metric, evidence=jsonable(evidence), rule=rule, reason=reason)


def one_sided_p(statistic: float, p_two_sided: float) -> float:
    """One-sided p-value of H1 "the model's loss is lower" from a two-sided DM test (statistic < 0: lower)."""
    if not (np.isfinite(p_two_sided) and not np.isnan(statistic)):
        return float("nan")
    return float(p_two_sided / 2 if statistic < 0 else 1 - p_two_sided / 2)


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
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ValidationDecision:
    """Promotion and forecast calibration, both on the validation split only (never the test split).

    1. ``base`` and ``finetuned`` forecast the same validation origins (``evaluation``'s horizon, stride
       and paths, at most ``evaluation.val_origins`` origins, the configured sampling);
       :func:`decide_promotion` keeps the base pair unless the finetuned one has the lower close CRPS and a
       close MAE that is not significantly worse.
    2. When ``evaluation.calibrate``, :func:`calibrate_forecasts` fits the calibration on those paths:
       the sampling grid when configured, then each model's path calibration.

    ``validation`` is the validation frame or the :class:`~kronos_kit.data.Splits` (its ``val`` part).
    With ``run_dir`` the decisions are written there (``promoted.json``, ``calibration.json``), sources
    inside it relative to it, so the run folder can move; both record the sha256 of the promoted pair's
    weights (`binding.bind`), which the run's reader checks.
    """
    frame = validation.val if hasattr(validation, "val") else validation
    e = evaluation
    pairs = {name: models[name] for name in (base, finetuned)}
    result = evaluate_models(frame, pairs, lookback=lookback, **_validation_settings(e), baselines=(), seed=seed,
                             device=device, progress=progress, label="validation walk-forward")
    root = Path(run_dir) if run_dir is not None else None
    promotion = decide_promotion(result, finetuned=finetuned, base=base, seed=seed, promotion_level=e.promotion_level,
                                 finetuned_sources=tuple(relative_source(s, root) for s in finetuned_sources),
                                 base_sources=tuple(relative_source(s, root) for s in base_sources))
    calibration = None
    if e.calibrate:
        calibration = calibrate_forecasts(result, frame, pairs, e, lookback=lookback, promoted=promotion.promoted,
                                          seed=seed, device=device, progress=progress)
    return record_decision(ValidationDecision(result, promotion, calibration), finetuned_sources=finetuned_sources,
                           base_sources=base_sources, finetuned=finetuned, run_dir=run_dir)


def record_decision(decision: ValidationDecision, *, finetuned_sources: tuple[str | Path, str | Path],
                    base_sources: tuple[str | Path, str | Path], finetuned: str = "finetuned",
                    run_dir: str | Path | None = None) -> ValidationDecision:
    """Bind the decision to the promoted pair's weights (`binding.bind`: their sha256, which the run's reader
    checks) and, with ``run_dir``, write ``promoted.json`` and ``calibration.json`` (or remove a stale one)."""
    promotion, calibration = decision.promotion, decision.calibration
    chosen = finetuned_sources if promotion.promoted == finetuned else base_sources
    bound = bind({"tokenizer": str(chosen[0]), "predictor": str(chosen[1])})  # the reader checks these hashes
    promotion.checkpoints = bound
    if calibration is not None:
        calibration.checkpoints = bound
    if run_dir is not None:
        promotion.save(Path(run_dir))
        if calibration is not None:
            calibration.save(Path(run_dir))
        else:
            RunDir(run_dir).calibration.unlink(missing_ok=True)  # a stale file must not outlive the setting
    return decision


def _validation_settings(e: EvalConfig) -> dict:
    return dict(pred_len=e.pred_len, stride=e.stride, sample_count=e.sample_count, max_origins=e.val_origins,
                temperature=e.temperature, top_k=e.top_k, top_p=e.top_p, max_context=e.max_context)


def calibrate_forecasts(
    validation_result: EvaluationResult,
    validation: pd.DataFrame,
    models: Mapping[str, tuple[Kronos, KronosTokenizer]],
    evaluation: EvalConfig,
    *,
    lookback: int,
    promoted: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SamplingCalibration:
    """The run's forecast calibration, fitted on the validation split (``validation_result``: every model in
    ``models`` on validation origins at the configured sampling).

    1. Sampling: when ``evaluation.calibration_temperatures`` x ``calibration_top_ps`` holds a setting other
       than the configured one, :func:`calibrate_sampling` picks the promoted model's temperature / top-p
       by validation CRPS and, if that moves them, the validation paths are sampled again at it (every
       model samples alike on test). Otherwise the configured sampling stays and nothing is resampled.
    2. Paths: for every model, :func:`~kronos_kit.calibration.fit_path_calibration` chooses among
       ``evaluation.calibration_methods`` by held-out validation CRPS and fits the winner.
    3. What is handed over: for the promoted model, :func:`~kronos_kit.calibration.fit_handover` chooses among
       the model alone and ``evaluation.ensemble_methods`` with the naive ``evaluation.ensemble_members`` (taken
       from ``validation_result`` when it has them, else drawn from its histories with ``seed``) and fits the
       tails when ``evaluation.tails``, by cross-fitted held-out validation scores.

    ``before`` is the promoted model as sampled at the configured setting, ``after`` after steps 1 and 2
    (in-sample on these origins); the per-model fits land in ``paths``, step 3 in ``handover``.
    """
    e = evaluation
    current = (float(e.temperature), float(e.top_p))
    settings = {(float(t), float(p)) for t in e.calibration_temperatures for p in e.calibration_top_ps}
    sampled, sampling, grid, sampling_rule = validation_result, current, [], "sampling kept as configured"
    if settings - {current}:
        predictor = as_predictors({promoted: models[promoted]}, device=device, max_context=e.max_context)[promoted]
        vs = _validation_settings(e)
        searched = calibrate_sampling(predictor, validation, lookback=lookback, pred_len=e.pred_len, stride=e.stride,
                                      sample_count=e.sample_count, max_origins=e.val_origins,
                                      temperatures=e.calibration_temperatures, top_ps=e.calibration_top_ps,
                                      current=current, top_k=e.top_k, seed=seed, model=promoted, progress=progress)
        sampling, grid, sampling_rule = (searched.temperature, searched.top_p), searched.grid, searched.rule
        if sampling != current:
            vs.update(temperature=sampling[0], top_p=sampling[1])
            sampled = evaluate_models(validation, models, lookback=lookback, **vs, baselines=(), seed=seed,
                                      device=device, progress=progress)
    fits = {name: fit_path_calibration(sampled.samples[name], sampled.realized, sampled.last_close,
                                       methods=tuple(e.calibration_methods), order=sampled.origin_time)
            for name in models}
    handover = None
    if e.ensemble_methods or e.tails:
        members = _naive_members(validation_result, e, seed) if e.ensemble_methods else {}
        handover = fit_handover(sampled.samples[promoted], members, sampled.realized, sampled.last_close,
                                path_fit=fits[promoted], methods=tuple(e.ensemble_methods), tails=e.tails)
    row = validation_result.table.loc[promoted]
    keep = ("close_crps", "coverage_50", "coverage_80", "coverage_95")
    before = {"temperature": current[0], "top_p": current[1], **{k: float(row[k]) for k in keep}}
    chosen = fits[promoted].after
    after = {"temperature": sampling[0], "top_p": sampling[1], **{k: chosen.get(k, float("nan")) for k in keep}}
    rule = (f"Sampling: {sampling_rule} (temperature {sampling[0]:g}, top-p {sampling[1]:g}). Paths, for each model "
            f"on its own validation paths: {fits[promoted].rule} Chosen for {promoted}: "
            f"{fits[promoted].calibration.describe()}.")
    if handover is not None:
        rule += f" {handover.rule}"
    return SamplingCalibration(temperature=sampling[0], top_p=sampling[1], model=promoted, before=before, after=after,
                               grid=grid, n_origins=sampled.n_origins, rule=rule,
                               paths={name: jsonable(fit.to_dict()) for name, fit in fits.items()},
                               handover=jsonable(handover.to_dict()) if handover is not None else {})


def _naive_members(result: EvaluationResult, e: EvalConfig, seed: int) -> dict[str, np.ndarray]:
    """The ensemble's naive members on the validation origins: the walk-forward's paths when it drew them,
    else drawn from the same histories (seeded) as the walk-forward and a forecast draw them."""
    missing = [m for m in e.ensemble_members if m not in result.samples]
    horizon, paths = result.realized.shape[1], next(iter(result.samples.values())).shape[1]
    drawn = naive_paths(missing, result.history, horizon, paths, np.random.default_rng(seed)) if missing else {}
    return {m: result.samples[m] if m in result.samples else drawn[m] for m in e.ensemble_members}


__all__ = ["MIN_DECISION_ORIGINS", "TEMPERATURE_GRID", "TOP_P_GRID", "ValidationDecision", "calibrate_forecasts",
           "calibrate_sampling", "decide_on_validation", "decide_promotion", "record_decision"]
