"""What a walk-forward produced (:class:`EvaluationResult`) and its scores: every metric per model, the table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kronos_kit import metrics as M
from kronos_kit.calibration import Handover, PathCalibration, apply_path_calibration
from kronos_kit.data.schema import FEATURE_COLUMNS
from kronos_kit.evaluate import table as table_module
from kronos_kit.evaluate.table import ORIGIN_LOSSES
from kronos_kit.metrics import CLOSE, INTERVALS

HANDED_OVER = "handed_over"
"""The entry of the handed-over forecast (the promoted model, its ensemble with naive forecasts, the tails)."""


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
    uncalibrated: dict[str, np.ndarray] = field(default_factory=dict)  # paths as sampled, of calibrated models

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

    def calibrate(self, calibrations: Mapping[str, PathCalibration]) -> None:
        """Replace each named model's sample paths by their calibrated version (fitted on validation).

        The paths as sampled are kept in ``uncalibrated`` (calibrating twice starts from them again); the
        predicted volatility and every score follow the calibrated paths. ``config["path_calibration"]``
        records what was applied, in words.
        """
        for name, cal in calibrations.items():
            if name not in self.samples or self.kinds.get(name) != "model":
                raise ValueError(f"cannot calibrate {name!r}: not a model of this result ({self.names})")
            raw = self.uncalibrated.setdefault(name, self.samples[name])
            self.samples[name] = apply_path_calibration(raw, self.last_close, cal)
            self.vol_pred[name] = M.predicted_vol(self.samples[name], self.last_close)
        self.config["path_calibration"] = {**self.config.get("path_calibration", {}),
                                           **{n: c.describe() for n, c in calibrations.items()}}
        # a calibration that centers the median at 0 makes the point forecast no change (np.median of an even
        # number of paths lands a hair above the last close: the mean of exp(+x) and exp(-x), not exactly it)
        kept = {n for n in self.config.get("no_change_point", []) if n not in calibrations}
        self.config["no_change_point"] = sorted(kept | {n for n, c in calibrations.items() if c.no_change_median})
        self.rescore()

    def hand_over(self, handover: Handover, model: str) -> None:
        """Add the handed-over forecast as the entry ``handed_over`` (kind "handed_over", after the models):
        ``model``'s paths (as calibrated) combined with this walk-forward's naive paths by ``handover`` (fitted
        on validation), then its tail map. ``config["handed_over"]`` records it in words."""
        if self.kinds.get(model) != "model":
            raise ValueError(f"cannot hand over {model!r}: not a model of this result ({self.names})")
        missing = [m for m in handover.ensemble.naive_members if m not in self.samples]
        if missing:
            raise ValueError(f"the handed-over forecast needs the naive forecasts {missing} on these origins; "
                             "evaluate them as baselines too")
        members = {m: self.samples[m] for m in handover.ensemble.naive_members}
        self.samples[HANDED_OVER] = handover.apply(self.samples[model], self.last_close, members)
        self.vol_pred[HANDED_OVER] = M.predicted_vol(self.samples[HANDED_OVER], self.last_close)
        kinds = [(n, k) for n, k in self.kinds.items() if n != HANDED_OVER]
        at = max(i for i, (_, k) in enumerate(kinds) if k == "model") + 1
        self.kinds = dict(kinds[:at] + [(HANDED_OVER, "handed_over")] + kinds[at:])
        self.config["handed_over"] = {"model": model, "describe": handover.describe(model),
                                      **handover.to_dict()}
        # its median is the model's when no naive member has weight: no change too when the model's is
        no_change = set(self.config.get("no_change_point", [])) - {HANDED_OVER}
        if model in no_change and handover.keeps_model_median:
            no_change.add(HANDED_OVER)
        self.config["no_change_point"] = sorted(no_change)
        self.rescore()

    def uncalibrated_scores(self) -> pd.DataFrame:
        """Close CRPS and 50/80/95% coverage of each calibrated model as sampled and as calibrated (this split)."""
        rows = {}
        for name, raw in self.uncalibrated.items():
            for label, paths in (("as sampled", raw), ("calibrated", self.samples[name])):
                cov = M.interval_coverage(paths[..., CLOSE], self.realized[..., CLOSE])
                rows[f"{name} ({label})"] = {
                    "close_crps": float(M.crps(paths[..., CLOSE], self.realized[..., CLOSE]).mean()),
                    **{f"coverage_{round(lvl * 100)}": float(c.mean()) for lvl, c in cov.items()}}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "model"
        return table

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
    # a point forecast of no change (persistence, or a model whose calibration centers its median at 0) has no
    # direction: its "changes" are float rounding, whose correlations with the realized moves mean nothing
    out["point_is_no_change"] = name in result.config.get("no_change_point", ()) or bool(
        np.all(np.abs(pred_change) <= NO_CHANGE_RTOL * np.abs(last)[:, None]))
    if out["point_is_no_change"]:
        out["directional_accuracy"] = np.nan
        by_step["directional_accuracy"] = np.full(point.shape[1], np.nan)
        out.update({k: np.nan for k in ("ic", "rank_ic", "xs_ic", "xs_rank_ic")})
    return out


NO_CHANGE_RTOL = 1e-9
"""A point forecast within this relative distance of the last close at every origin and step is no change."""


def summary_table(result: EvaluationResult) -> pd.DataFrame:
    """Headline table: one row per model/baseline, one column per :data:`~kronos_kit.evaluate.table.METRICS`
    row (close-channel, finance and vol metrics), then the counts xs_dates, n_origins, n_samples."""
    metrics = table_module.METRICS  # read at call time: a row added to the table shows up here
    columns = [m.column for m in metrics] + [c for c, _ in table_module.COUNT_COLUMNS]
    rows = {}
    for name in result.names:
        entry = result.scores[name]
        row = {m.column: m.value(result, name, entry) for m in metrics}
        row.update({c: read(result, name, entry) for c, read in table_module.COUNT_COLUMNS})
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    table.index.name = "model"
    return table.astype({"xs_dates": int, "n_origins": int, "n_samples": int})


def _by_channel(values: np.ndarray) -> dict[str, Any]:
    return {f: values[k] for k, f in enumerate(FEATURE_COLUMNS)}


__all__ = ["HANDED_OVER", "NO_CHANGE_RTOL", "EvaluationResult", "score_entry", "summary_table"]
