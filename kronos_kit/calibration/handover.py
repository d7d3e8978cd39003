"""The handed-over forecast: the model's calibrated paths, combined with naive forecasts, with tails that hold.

What a run hands over (``forecast --run``, ``load_run_forecaster``, the explorer) is, per origin:

1. the model's sample paths after its path calibration (:mod:`.paths`, fitted first);
2. an ensemble with the strongest naive probabilistic forecasts (:mod:`.ensemble`: the model alone, a linear
   pool or quantile averaging; the naive members are drawn from the series' own history by
   :func:`kronos_kit.naive.naive_paths`, seeded, so the forecast is reproducible from the run folder);
3. the tail map (:mod:`.tails`) on the result, so its 80% and 95% intervals hold.

:func:`fit_handover` fits steps 2 and 3 on VALIDATION origins only, by the same two-fold blocked
cross-validation as the path calibration, and cross-fitted: in each fold the model's path calibration,
the ensemble weights and the tail factors are all fitted on one half of the origins and scored on the
other, so a held-out number never saw its origins. The candidate with the lowest held-out mean fair close
CRPS wins: the model alone, each combination offered, each naive member alone (exact ties in that order);
the tails are kept when they bring the
held-out coverage of the 80% and 95% intervals closer to nominal without raising the held-out fair CRPS by
more than :data:`TAIL_CRPS_TOLERANCE`. The winners are refit on every validation origin. Plain JSON in
``calibration.json`` (``handover``), bound to the weights like the rest of that file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kronos_kit.calibration.ensemble import (
    COMBINATIONS,
    MODEL,
    NO_ENSEMBLE,
    CloseMembers,
    Ensemble,
    fit_ensemble,
)
from kronos_kit.calibration.paths import (
    PathCalibration,
    PathCalibrationFit,
    apply_path_calibration,
    blocked_folds,
    check_prices,
    plain_fields,
)
from kronos_kit.calibration.tails import NO_TAILS, TailCalibration, apply_tails, coverage_error, fit_tails
from kronos_kit.config import ENSEMBLE_METHODS, MIN_DECISION_ORIGINS
from kronos_kit.metrics import CLOSE, INTERVALS, fair_crps, interval_coverage
from kronos_kit.naive import naive_paths

TAIL_CRPS_TOLERANCE = 0.01  # tails may cost at most 1% of held-out fair CRPS (they aim at the interval ends)


@dataclass
class Handover:
    """Steps 2 and 3 of the handed-over forecast (plain JSON via :meth:`to_dict` / :meth:`from_dict`)."""

    ensemble: Ensemble = field(default_factory=lambda: NO_ENSEMBLE)
    tails: TailCalibration = field(default_factory=lambda: NO_TAILS)

    @property
    def identity(self) -> bool:
        """True when the handed-over forecast is the calibrated model as it is."""
        return self.ensemble.method == MODEL and self.tails.identity

    @property
    def keeps_model_median(self) -> bool:
        """True when the handed-over median is the model's own (calibrated) median: no naive member has weight
        (the tail map moves the paths around their median, never the median itself)."""
        return not self.ensemble.naive_members

    def describe(self, model: str = "the model") -> str:
        return f"{self.ensemble.describe(model)}; {self.tails.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {"ensemble": self.ensemble.to_dict(), "tails": self.tails.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "calibration") -> Handover:
        """Build from plain JSON (``{}``: the model alone); every field is checked, errors name ``where``."""
        fields = plain_fields(data, cls, where=where, what="handover")
        ensemble = Ensemble.from_dict(fields.get("ensemble", NO_ENSEMBLE.to_dict()), where=f"{where} handover.ensemble")
        return cls(ensemble, TailCalibration.from_dict(fields.get("tails", {}), where=f"{where} handover.tails"))

    def apply(self, model_paths: np.ndarray, last_close: np.ndarray, members: Mapping[str, np.ndarray], *,
              where: str = "handed-over forecast") -> np.ndarray:
        """Handed-over paths from the model's calibrated paths (N, S, H, C) and the naive members' paths."""
        out = apply_tails(self.ensemble.combine(model_paths, members, last_close, where=where), last_close,
                          self.tails)
        check_prices(out, where)
        return out

    def forecast(self, model_paths: np.ndarray, history: np.ndarray, *, seed: int | None) -> np.ndarray:
        """Handed-over paths at forecast time: the naive members are drawn from ``history`` (N, L, 6), the
        series' own last bars, with ``np.random.default_rng(seed)`` (as the walk-forward draws them)."""
        model_paths = np.asarray(model_paths, dtype=np.float64)
        history = np.asarray(history, dtype=np.float64)
        _, paths, horizon, _ = model_paths.shape
        members = naive_paths(self.ensemble.naive_members, history, horizon, paths, np.random.default_rng(seed)) \
            if self.ensemble.naive_members else {}
        return self.apply(model_paths, history[:, -1, CLOSE], members)


IDENTITY_HANDOVER = Handover()


def no_change_point(calibration: PathCalibration, handover: Handover | None = None) -> bool:
    """True when a forecast's point forecast (the median path) is the last close at every step: the model's path
    calibration centers its median at 0 (`PathCalibration.no_change_median`) and what is handed over keeps the
    model's median. Its direction, IC and RankIC are then undefined (they would correlate float rounding)."""
    return calibration.no_change_median and (handover is None or handover.keeps_model_median)


def describe_point_forecast(calibration: PathCalibration, handover: Handover | None = None) -> str:
    """What a forecast's median (its point forecast: the `*_median` columns) is, in words."""
    if no_change_point(calibration, handover):
        return ("no change: the path calibration fitted on validation shrank the model's median move to 0 (center "
                "factor 0), so the median close is the last close (to about 1e-6: the median of an even number of "
                "paths averages the middle two); the quantiles carry the spread, and the direction, IC and RankIC "
                "of this point forecast are undefined")
    if handover is None or handover.keeps_model_median:
        return "the median of the sample paths, bar by bar"
    naive = ", ".join(handover.ensemble.naive_members)
    if handover.ensemble.model_weight == 0:  # the model's paths do not enter: "combined with" would mislead
        return (f"the median of the handed-over paths, bar by bar: the naive forecasts alone ({naive}; the model has "
                "weight 0)")
    if calibration.no_change_median:
        return (f"the median of the handed-over paths, bar by bar: the model's own median move is 0 (center factor "
                f"0), so any move of the median comes from the naive forecasts it is combined with ({naive})")
    return f"the median of the handed-over paths (the model's combined with {naive}), bar by bar"


@dataclass
class HandoverFit:
    """What :func:`fit_handover` decided, with the held-out validation evidence."""

    handover: Handover
    candidates: list[dict[str, Any]]  # per combination: weights refit on all, held-out fair CRPS and coverage
    members: dict[str, dict[str, float]]  # each member alone, held out (the model calibrated per fold)
    tails: dict[str, Any]  # held-out before / after the tail map, and whether it was kept
    before: dict[str, float]  # held out: the calibrated model alone
    after: dict[str, float]  # held out: what is handed over (combination, then tails)
    n_origins: int
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return {"handover": self.handover.to_dict(), "candidates": self.candidates, "members": self.members,
                "tails": self.tails, "before": self.before, "after": self.after, "n_origins": self.n_origins,
                "rule": self.rule}


def _held_out_scores(close: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean fair close CRPS, 50/80/95% coverage and the coverage error of close paths (N, S, H) at y (N, H)."""
    cov = interval_coverage(close[..., None], y[..., None])
    out = {"cv_crps": float(fair_crps(close, y, axis=1).mean())}
    out.update({f"coverage_{round(lvl * 100)}": float(cov[lvl].mean()) for lvl in INTERVALS})
    out["coverage_error"] = coverage_error(out["coverage_80"], out["coverage_95"])
    return out


class _Folds:
    """The cross-fitting data: the model calibrated per fold (and on all origins) and the members' close stats."""

    def __init__(self, model_samples: np.ndarray, members: Mapping[str, np.ndarray], y: np.ndarray, c0: np.ndarray,
                 path_fit: PathCalibrationFit):
        n = len(c0)
        self.folds = path_fit.folds if len(path_fit.folds[0]) + len(path_fit.folds[1]) == n else blocked_folds(n)
        self.y, self.c0, self.members = y, c0, dict(members)
        self.names = [MODEL, *self.members]
        fits = {0: path_fit.fold_fits[0], 1: path_fit.fold_fits[1], "all": path_fit.calibration}
        self.model = {k: apply_path_calibration(model_samples, c0, cal) for k, cal in fits.items()}
        naive_close = [p[..., CLOSE] for p in self.members.values()]
        self.stats = {k: CloseMembers([paths[..., CLOSE], *naive_close], y) for k, paths in self.model.items()}

    def split(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(fit on, score on) of fold ``i``: fit on half ``i``, score on the other."""
        return self.folds[i], self.folds[1 - i]

    @property
    def held_out(self) -> np.ndarray:
        """The origins in the order held-out results are concatenated (fold 0's scored half, then fold 1's)."""
        return np.concatenate([self.split(i)[1] for i in (0, 1)])

    def member_scores(self) -> dict[str, dict[str, float]]:
        """Each member alone on the held-out origins (the model with the path calibration of the other half)."""
        rows, y = self.held_out, self.y[self.held_out]
        model = np.concatenate([self.model[i][self.split(i)[1], ..., CLOSE] for i in (0, 1)])
        return {MODEL: _held_out_scores(model, y),
                **{name: _held_out_scores(p[rows, ..., CLOSE], y) for name, p in self.members.items()}}

    def combine(self, ensemble: Ensemble, key: int | str, rows: np.ndarray) -> np.ndarray:
        return ensemble.combine(self.model[key][rows], {m: p[rows] for m, p in self.members.items()}, self.c0[rows])


def _too_few(n: int, paths: int) -> HandoverFit:
    rule = (f"handed over: the calibrated model alone: an ensemble and tails need >= {MIN_DECISION_ORIGINS} validation "
            f"origins and >= 2 paths, got {n} and {paths}.")
    return HandoverFit(IDENTITY_HANDOVER, [], {}, {"kept": False}, {}, {}, n, rule)


def fit_handover(
    model_samples: np.ndarray,
    members: Mapping[str, np.ndarray],
    realized: np.ndarray,
    last_close: np.ndarray,
    *,
    path_fit: PathCalibrationFit,
    methods: tuple[str, ...] | list[str] = ENSEMBLE_METHODS,
    tails: bool = True,
) -> HandoverFit:
    """Fit the handed-over forecast on VALIDATION origins (see the module).

    ``model_samples`` (N, S, H, C) are the model's paths as sampled, ``path_fit`` its path calibration fit on
    these origins (:func:`~kronos_kit.calibration.paths.fit_path_calibration`, whose folds and per-fold fits
    are reused), ``members`` each naive member's paths (N, S, H, C) on the same origins, ``realized`` the
    realized bars (N, H, C) or closes (N, H), ``last_close`` (N,). ``methods`` are the combinations offered
    besides the model alone; ``tails`` whether the tail map may be fitted.
    """
    unknown = set(methods) - set(ENSEMBLE_METHODS)
    if unknown:
        raise ValueError(f"ensemble methods must be drawn from {list(ENSEMBLE_METHODS)}, got {list(methods)}")
    model_samples = np.asarray(model_samples, dtype=np.float64)
    y = np.asarray(realized, dtype=np.float64)
    y = y[..., CLOSE] if y.ndim == 3 else y
    c0 = np.asarray(last_close, dtype=np.float64)
    n, paths = model_samples.shape[:2]
    if n < MIN_DECISION_ORIGINS or paths < 2:
        return _too_few(n, paths)
    data = _Folds(model_samples, members if methods else {}, y, c0, path_fit)
    candidates, held = [], {}
    for method in _candidates(methods, data.names):
        if method in COMBINATIONS:  # fitted per fold, then on every origin
            fold_ensembles = [fit_ensemble(method, data.stats[i], data.split(i)[0], c0, data.names) for i in (0, 1)]
            full = fit_ensemble(method, data.stats["all"], np.arange(n), c0, data.names)
        else:  # a naive member alone: nothing to fit
            full = Ensemble("linear_pool", data.names, [float(m == method.removesuffix(ALONE)) for m in data.names])
            fold_ensembles = [full, full]
        combined = [data.combine(fold_ensembles[i], i, data.split(i)[1]) for i in (0, 1)]
        scores = _held_out_scores(np.concatenate([c[..., CLOSE] for c in combined]), y[data.held_out])
        candidates.append({"method": method, "weights": dict(zip(full.members, full.weights)), **scores,
                           "describe": full.describe()})
        held[method] = (full, fold_ensembles, combined)
    best = min(c["cv_crps"] for c in candidates)
    chosen = next(c for c in candidates if np.isclose(c["cv_crps"], best, rtol=1e-9, atol=0))["method"]
    ensemble, fold_ensembles, combined = held[chosen]
    tail_fit, tail_evidence = NO_TAILS, {"kept": False, "why": "tails are switched off (evaluation.tails)"}
    if tails:
        tail_fit, tail_evidence = _fit_tails(data, ensemble, fold_ensembles, combined)
    member_scores = data.member_scores()
    handover = Handover(ensemble, tail_fit)
    after = tail_evidence["after"] if tail_evidence["kept"] else next(c for c in candidates if c["method"] == chosen)
    after = {k: after[k] for k in member_scores[MODEL]}
    return HandoverFit(handover, candidates, member_scores, tail_evidence, member_scores[MODEL], after, n,
                       _rule(n, [c["method"] for c in candidates], handover, tail_evidence))


ALONE = " alone"  # a candidate "<naive member> alone": weight 1 on it


def _candidates(methods: tuple[str, ...] | list[str], names: list[str]) -> list[str]:
    """What the held-out CRPS chooses among, in tie order: the model alone, the fitted combinations offered, each
    naive member alone (weight 1 on the model and weight 1 on a naive forecast are candidates in their own right,
    so the choice is never worse held out than either)."""
    fitted = [m for m in COMBINATIONS if m == MODEL or m in methods]
    return fitted + ([f"{m}{ALONE}" for m in names[1:]] if methods else [])


def _fit_tails(data: _Folds, ensemble: Ensemble, fold_ensembles: list[Ensemble],
               combined: list[np.ndarray]) -> tuple[TailCalibration, dict[str, Any]]:
    """Tail factors fitted per fold on the chosen combination, judged on the other half, kept or not, refit on all."""
    y_held = data.y[data.held_out]
    tailed = []
    for i in (0, 1):
        fit_on, score_on = data.split(i)
        on_fit = data.combine(fold_ensembles[i], i, fit_on)[..., CLOSE]
        factors = fit_tails(on_fit, data.y[fit_on], data.c0[fit_on])
        tailed.append(apply_tails(combined[i], data.c0[score_on], factors)[..., CLOSE])
    before = _held_out_scores(np.concatenate([c[..., CLOSE] for c in combined]), y_held)
    after = _held_out_scores(np.concatenate(tailed), y_held)
    better_ends = after["coverage_error"] < before["coverage_error"]
    crps_ok = after["cv_crps"] <= before["cv_crps"] * (1 + TAIL_CRPS_TOLERANCE)
    kept = better_ends and crps_ok
    rows = np.arange(len(data.c0))
    factors = fit_tails(data.combine(ensemble, "all", rows)[..., CLOSE], data.y, data.c0) if kept else NO_TAILS
    why = ("they bring the held-out 80% / 95% coverage closer to nominal and cost at most "
           f"{TAIL_CRPS_TOLERANCE:.0%} of the held-out fair CRPS" if kept else
           "they did not bring the held-out 80% / 95% coverage closer to nominal" if not better_ends else
           f"they raised the held-out fair CRPS by more than {TAIL_CRPS_TOLERANCE:.0%}")
    return factors, {"kept": kept, "why": f"tails {'kept' if kept else 'dropped'}: {why}", "before": before,
                     "after": after, "factors": factors.to_dict()}


def _rule(n: int, names: list[str], handover: Handover, tails: Mapping[str, Any]) -> str:
    return (f"Handed over: {handover.describe()}. It has the lowest mean fair close CRPS on held-out "
            f"validation origins among {names} (two-fold blocked cross-validation over {n} origins, cross-fitted: in "
            "each fold the model's path calibration, the weights and the tails are fitted on one half and scored on "
            "the other; exact ties go to the model alone); weights refit on every validation origin. "
            f"{tails.get('why', '')[:1].upper()}{tails.get('why', '')[1:]}. The test split is never read.")


__all__ = ["IDENTITY_HANDOVER", "TAIL_CRPS_TOLERANCE", "Handover", "HandoverFit", "describe_point_forecast",
           "fit_handover", "no_change_point"]
