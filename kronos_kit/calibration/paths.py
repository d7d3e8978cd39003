"""Path calibration of one model's sample paths: spread, center and split-conformal, fitted on validation only.

Sampled Kronos distributions are typically too narrow (the 80% interval covering about half of the
realized closes), and temperature / top-p barely move them. This layer acts after sampling, on the
paths themselves, so one set of paths serves every candidate and the cost of fitting is a few
array passes. Every map works on log-returns relative to the origin's last close ``c0`` and uses
the close median ``m_h`` of the paths (per origin and step) as its pivot:

- ``spread``: ``r' = m + k_h (r - m)`` with ``k_h = k1 * h**b`` (a smooth power law in the step h);
- ``spread_center``: ``r' = w m + k_h (r - m)``, ``w`` in [0, 1] shrinks the median log-return toward
  0 (w = 0 is a random walk with the model's spread, w = 1 the model as sampled);
- ``conformal``: the standardized deviation ``z = (r - m) / s`` (``s`` the paths' close log-return
  std) goes through a per-step monotone map that sends the paths' pooled quantiles of z to the
  split-conformal quantiles of the realized z on validation (finite-sample corrected order
  statistics, Romano et al. 2019 / Angelopoulos & Bates 2021), so the central 50/80/95% intervals
  read from the paths carry the conformal guarantee.

The same increasing map is applied to the open, high, low and close log-returns of a path (with the
close's pivot), so every candle stays valid: high >= max(open, close), low <= min(open, close), and
all prices stay > 0 (they are ``c0 * exp(r')``). Volume and amount are left as sampled.

Fitting (:func:`fit_path_calibration`) sees only validation arrays: the sample paths, the realized
closes and the last closes at validation origins. The method is chosen by a two-fold blocked
cross-validation of the mean close CRPS on those origins (fit on the earlier half, score on the
later, and back), so a method with more parameters does not win by fitting the noise; the winner
is refit on every validation origin. The result is a plain-JSON :class:`PathCalibration`.

Fits and choices use the fair ensemble CRPS (:func:`~kronos_kit.metrics.fair_crps`): the plain CRPS of S
sample paths is lowest for paths drawn a little too narrow, so fitting a spread by it would leave the
intervals short of nominal by construction. The report's CRPS stays the plain one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kronos_kit.config import MIN_DECISION_ORIGINS, PATH_CALIBRATION_METHODS
from kronos_kit.metrics import CLOSE, INTERVALS, crps, fair_crps, interval_coverage

METHODS: tuple[str, ...] = PATH_CALIBRATION_METHODS
"""Calibration methods, simplest first (exact ties in validation CRPS go to the simpler one)."""

PRICE_CHANNELS = 4  # open, high, low, close: the channels a calibration moves; volume and amount stay as sampled
SCALE_GRID: np.ndarray = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))  # k1 candidates (log-spaced)
POWER_GRID: np.ndarray = np.round(np.linspace(-0.5, 0.5, 11), 10)  # b candidates: k_h = k1 * h**b
CENTER_GRID: np.ndarray = np.round(np.linspace(0.0, 1.0, 11), 10)  # w candidates
CONFORMAL_LEVELS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.975)
CONFORMAL_FLOOR = 0.1  # conformal: path spreads below this share of the step's median validation spread are raised
_MIN_SPREAD = 1e-12  # floor of a path set's log-return std (a degenerate set of identical paths)
# what a file may hold, beyond which no fit goes: a standardized conformal knot (a fit's are within a few dozen)
# and the conformal spread floor (a log-return std; 1 is a 100% move per step)
MAX_KNOT = 1e3
MAX_FLOOR = 1.0


@dataclass
class PathCalibration:
    """One fitted transform of sample paths (plain JSON via :meth:`to_dict` / :meth:`from_dict`).

    ``method`` is one of :data:`METHODS`. ``scale`` (k1) and ``power`` (b) give the per-step spread
    scale k_h = k1 * h**b; ``center`` is w. ``conformal`` holds ``levels``, per step the paths' quantiles
    of z (``model``) and the realized conformal quantiles (``target``), each (steps, levels), and the
    spread ``floor`` per step; steps beyond the fitted horizon reuse the last fitted step.
    """

    method: str = "none"
    scale: float = 1.0
    power: float = 0.0
    center: float = 1.0
    conformal: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {list(METHODS)}, got {self.method!r}")
        # a value outside every grid a fit searches is no fit: refuse it before it turns prices into inf or 0
        for name, grid in (("scale", SCALE_GRID), ("power", POWER_GRID), ("center", CENTER_GRID)):
            value = getattr(self, name)
            if not in_grid_range(value, grid):
                raise ValueError(f"calibration {name} must be within the fitted grid {grid[0]:.4g} .. {grid[-1]:.4g}, "
                                 f"got {value!r}")
        if self.method == "conformal":
            _check_conformal(self.conformal)

    def step_scales(self, horizon: int) -> np.ndarray:
        """k_h for steps 1..horizon (all 1 unless the method scales the spread)."""
        if self.method not in ("spread", "spread_center"):
            return np.ones(horizon)
        return self.scale * np.arange(1, horizon + 1, dtype=np.float64) ** self.power

    @property
    def no_change_median(self) -> bool:
        """True when the calibrated median path is the last close at every step (`spread_center` with center
        weight 0): the model's point forecast is then persistence, and its direction, IC and RankIC are undefined
        (what is handed over may still move the median: `handover.no_change_point`)."""
        return self.method == "spread_center" and self.center == 0.0

    def describe(self) -> str:
        """The fitted transform in words."""
        if self.method == "none":
            return "none: the paths as sampled"
        if self.method == "conformal":
            n = len(self.conformal["model"])
            return f"conformal: per-step split-conformal quantile map of the standardized close deviation ({n} steps)"
        text = f"spread: k_h = {self.scale:.3g} * h^{self.power:.2g}"
        if self.method == "spread_center":
            text += f", center: median log-return x {self.center:.2g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "calibration") -> PathCalibration:
        """Build from plain JSON; unknown or mistyped fields are errors naming ``where``."""
        fields = plain_fields(data, cls, where=where, what="path-calibration")
        for name in ("scale", "power", "center"):
            if name in fields and (not isinstance(fields[name], (int, float)) or isinstance(fields[name], bool)):
                raise ValueError(f"{where}: path-calibration field {name!r} must be a number, got {fields[name]!r}")
        return from_plain(cls, fields, where=where)


def plain_fields(data: Any, cls: type, *, where: str, what: str) -> dict[str, Any]:
    """``data`` as a dict, once it is a JSON object holding only fields of the dataclass ``cls`` (errors name
    ``where`` and the ``what``); the one reader behind every calibration object's ``from_dict``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: the {what} must be a JSON object, got {type(data).__name__}")
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown {what} field(s) {sorted(unknown)}; expected {known}")
    return dict(data)


def from_plain(cls: type, fields: Mapping[str, Any], *, where: str) -> Any:
    """``cls(**fields)``, its refusal (a value no fit produces) named after ``where``."""
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}; rerun the validation step to rewrite it") from None


def in_grid_range(value: Any, grid: np.ndarray | tuple[float, ...]) -> bool:
    """Is ``value`` a finite number within [min(grid), max(grid)] (a float rounding off)?"""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    lo, hi = float(np.min(grid)), float(np.max(grid))
    slack = 1e-9 * max(1.0, abs(lo), abs(hi))
    return lo - slack <= value <= hi + slack


def _check_conformal(table: Mapping[str, Any]) -> None:
    """A conformal map as a fit writes it: increasing levels in (0, 1), (steps, levels) knot tables that never
    decrease along the levels and stay within +-MAX_KNOT, a spread floor per step in (0, MAX_FLOOR]."""
    try:
        levels, model, target, floor = (np.asarray(table.get(k, []), dtype=np.float64)
                                        for k in ("levels", "model", "target", "floor"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"conformal calibration tables must hold numbers only ({exc})") from None
    if levels.ndim != 1 or len(levels) < 2 or model.ndim != 2 or model.shape != target.shape \
            or model.shape[1] != len(levels) or floor.shape != (len(model),):
        raise ValueError("conformal calibration needs 'levels' (L,), 'model' / 'target' quantile tables of shape "
                         f"(steps, L) and a 'floor' per step; got {levels.shape}, {model.shape}, {target.shape}, "
                         f"{floor.shape}")
    if not (np.isfinite(levels).all() and (np.diff(levels) > 0).all() and levels[0] > 0 and levels[-1] < 1):
        raise ValueError(f"conformal levels must increase strictly within (0, 1), got {levels.tolist()}")
    for name, knots in (("model", model), ("target", target)):
        if not (np.isfinite(knots).all() and (np.abs(knots) <= MAX_KNOT).all()):
            raise ValueError(f"conformal {name!r} knots must be finite and within +-{MAX_KNOT:g}")
        if (np.diff(knots, axis=1) < 0).any():
            step = int(np.nonzero((np.diff(knots, axis=1) < 0).any(axis=1))[0][0]) + 1
            raise ValueError(f"conformal {name!r} knots must not decrease along the levels (step {step} does)")
    if not (np.isfinite(floor).all() and (floor > 0).all() and (floor <= MAX_FLOOR).all()):
        raise ValueError(f"conformal 'floor' must be a log-return spread in (0, {MAX_FLOOR:g}] per step, got "
                         f"{floor.tolist()[:5]}")


IDENTITY = PathCalibration()


# ----------------------------------------------------------------------------------- applying


def price_log_returns(paths: np.ndarray, last_close: np.ndarray) -> np.ndarray:
    """(N, S, H, 4) log of open/high/low/close relative to each origin's last close."""
    prices = np.asarray(paths, dtype=np.float64)[..., :PRICE_CHANNELS]
    c0 = np.asarray(last_close, dtype=np.float64)[:, None, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.maximum(prices, 1e-300) / c0)
    return out


def with_price_log_returns(paths: np.ndarray, last_close: np.ndarray, log_returns: np.ndarray, *,
                           where: str = "calibration") -> np.ndarray:
    """A copy of ``paths`` whose open/high/low/close are ``last_close * exp(log_returns)`` (volume, amount kept).

    Refuses (ValueError naming ``where``) a result with a price that is not finite and > 0: a forecast is
    never handed over with inf, 0 or NaN prices.
    """
    out = np.array(paths, dtype=np.float64, copy=True)
    with np.errstate(over="ignore", invalid="ignore"):
        out[..., :PRICE_CHANNELS] = np.asarray(last_close, dtype=np.float64)[:, None, None, None] * np.exp(log_returns)
    check_prices(out, where)
    return out


def check_prices(paths: np.ndarray, where: str) -> None:
    """Raise ValueError unless every open/high/low/close of ``paths`` (..., C>=4) is finite and > 0."""
    prices = np.asarray(paths)[..., :PRICE_CHANNELS]
    bad = ~(np.isfinite(prices) & (prices > 0))
    if bad.any():
        raise ValueError(f"{where} gave {int(bad.sum())} price(s) that are not finite and > 0 (e.g. "
                         f"{prices[bad].flat[0]!r}); the calibration is outside anything a fit produces: rerun the "
                         "validation step (pipeline --from 03) or forecast with --uncalibrated")


def _pivot_and_spread(r_close: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Close median (N, H) and close std (N, H, floored) of the paths' log-returns, over the path axis."""
    return np.median(r_close, axis=1), np.maximum(r_close.std(axis=1), _MIN_SPREAD)


def _quantile_map(z: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Increasing piecewise-linear map through (xp, fp), extended linearly with the end slopes."""
    xp = np.maximum.accumulate(xp + np.arange(len(xp)) * 1e-9)  # strictly increasing knots
    fp = np.maximum.accumulate(fp)
    # end slopes bounded: knots of a near-degenerate path set sit almost on top of each other
    lo_slope = float(np.clip((fp[1] - fp[0]) / (xp[1] - xp[0]), 1e-6, 1e3))
    hi_slope = float(np.clip((fp[-1] - fp[-2]) / (xp[-1] - xp[-2]), 1e-6, 1e3))
    out = np.interp(z, xp, fp)
    out = np.where(z < xp[0], fp[0] + (z - xp[0]) * lo_slope, out)
    return np.where(z > xp[-1], fp[-1] + (z - xp[-1]) * hi_slope, out)


def _step_values(values: list, horizon: int) -> np.ndarray:
    """Per-step values for steps 1..horizon; steps beyond the fitted ones reuse the last."""
    v = np.asarray(values, dtype=np.float64)
    return v[np.minimum(np.arange(horizon), len(v) - 1)]


def apply_path_calibration(paths: np.ndarray, last_close: np.ndarray, calibration: PathCalibration) -> np.ndarray:
    """Calibrated copy of ``paths`` (N, S, H, C>=4, price units) given each origin's ``last_close`` (N,).

    Open, high, low and close move by one increasing map per origin and step, so candle order holds
    and prices stay positive; channels after the fourth (volume, amount) are copied unchanged.
    """
    paths = np.asarray(paths, dtype=np.float64)
    if calibration.method == "none":
        return paths.copy()
    if paths.ndim != 4 or paths.shape[-1] < PRICE_CHANNELS or len(last_close) != len(paths):
        raise ValueError(f"paths must be (N, S, H, C>=4) with one last close per origin; got {paths.shape} and "
                         f"{np.shape(last_close)}")
    r = price_log_returns(paths, last_close)
    m, s = _pivot_and_spread(r[..., CLOSE])
    m4, s4 = m[:, None, :, None], s[:, None, :, None]
    if calibration.method == "conformal":
        levels_model = np.asarray(calibration.conformal["model"], dtype=np.float64)
        levels_target = np.asarray(calibration.conformal["target"], dtype=np.float64)
        s4 = np.maximum(s4, _step_values(calibration.conformal["floor"], paths.shape[2])[None, None, :, None])
        z = (r - m4) / s4
        mapped = np.empty_like(z)
        for h in range(z.shape[2]):
            k = min(h, len(levels_model) - 1)
            mapped[:, :, h] = _quantile_map(z[:, :, h], levels_model[k], levels_target[k])
        r_new = m4 + s4 * mapped
    else:
        k = calibration.step_scales(paths.shape[2])[None, None, :, None]
        r_new = calibration.center * m4 + k * (r - m4)
    return with_price_log_returns(paths, last_close, r_new, where=f"path calibration ({calibration.method})")


# ------------------------------------------------------------------------------------ fitting


@dataclass
class PathCalibrationFit:
    """What :func:`fit_path_calibration` decided, with the validation evidence of every candidate."""

    calibration: PathCalibration  # the chosen method, refit on every validation origin
    candidates: list[dict[str, Any]]  # per method: cv_crps (held-out, fair), close/fair CRPS and coverage in-sample
    before: dict[str, float]  # validation close CRPS and coverage of the paths as sampled
    after: dict[str, float]  # the same after the chosen calibration (in-sample: fitted on these origins)
    n_origins: int
    rule: str
    # the two blocked folds of the origins and the chosen method fitted on each (not saved): the handed-over
    # forecast's cross-validation reuses them so its held-out origins never saw the model's calibration either
    folds: tuple[np.ndarray, np.ndarray] = (np.array([], dtype=int), np.array([], dtype=int))
    fold_fits: tuple[PathCalibration, PathCalibration] = (IDENTITY, IDENTITY)

    def to_dict(self) -> dict[str, Any]:
        return {"path_calibration": self.calibration.to_dict(), "candidates": self.candidates,
                "before": self.before, "after": self.after, "n_origins": self.n_origins, "rule": self.rule}


def _close_crps(r_close: np.ndarray, y: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """Per origin and step fair close CRPS (N, H) in price units of log-return paths r_close (N, S, H)."""
    return fair_crps(c0[:, None, None] * np.exp(r_close), y, axis=1)


def _spread_table(r_close: np.ndarray, y: np.ndarray, c0: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """CRPS (W, K, N, H) of ``w m + k (r - m)`` for every center w and every k of :data:`SCALE_GRID`."""
    m = np.median(r_close, axis=1)[:, None, :]
    dev = r_close - m
    table = np.empty((len(centers), len(SCALE_GRID)) + y.shape)
    for i, w in enumerate(centers):
        for j, k in enumerate(SCALE_GRID):
            table[i, j] = _close_crps(w * m + k * dev, y, c0)
    return table


def _power_law_crps(table: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """Mean CRPS over ``origins`` (W, K1, B) of k_h = k1 * h**b, interpolating ``table`` in log k."""
    per_step = table[:, :, origins].mean(axis=2)  # (W, K, H)
    horizon = per_step.shape[-1]
    log_grid = np.log(SCALE_GRID)
    out = np.empty((table.shape[0], len(SCALE_GRID), len(POWER_GRID)))
    for b_i, b in enumerate(POWER_GRID):
        log_k = log_grid[:, None] + b * np.log(np.arange(1, horizon + 1))[None, :]  # (K1, H)
        for h in range(horizon):
            # outside the grid the nearest end is used (np.interp clamps): such k1 / b pairs rarely win
            vals = np.stack([np.interp(log_k[:, h], log_grid, per_step[w, :, h]) for w in range(table.shape[0])])
            out[:, :, b_i] = out[:, :, b_i] + vals if h else vals
    return out / horizon


def _fit_spread(table: np.ndarray, centers: np.ndarray, origins: np.ndarray, method: str) -> PathCalibration:
    scores = _power_law_crps(table, origins)
    w_i, k_i, b_i = np.unravel_index(int(np.argmin(scores)), scores.shape)
    return PathCalibration(method=method, scale=float(SCALE_GRID[k_i]), power=float(POWER_GRID[b_i]),
                           center=float(centers[w_i]))


def blocked_folds(n: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two blocked folds of ``n`` origins: the earlier and the later half by ``order`` (default: as given)."""
    ranked = np.arange(n) if order is None else np.argsort(np.asarray(order), kind="stable")
    return ranked[: n // 2], ranked[n // 2:]


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """Split-conformal quantile of ``scores`` at ``level`` with the finite-sample correction.

    Upper levels (>= 0.5) take the ceil((n + 1) level)-th smallest score, lower levels the
    floor((n + 1) level)-th, so a new exchangeable score falls at or below (above) it with probability
    at least ``level`` (1 - ``level``); the rank is clipped to 1..n when n is too small for the level.
    """
    x = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(x)
    rank = math.ceil((n + 1) * level) if level >= 0.5 else math.floor((n + 1) * level)
    return float(x[min(max(rank, 1), n) - 1])


def _fit_conformal(r_close: np.ndarray, y_r: np.ndarray, origins: np.ndarray) -> PathCalibration:
    m, s = _pivot_and_spread(r_close[origins])
    # a spread floor per step (a tenth of the typical validation spread): an origin whose paths nearly coincide
    # must not turn a small miss into an enormous standardized score
    floor = np.maximum(CONFORMAL_FLOOR * np.median(s, axis=0), _MIN_SPREAD)
    s = np.maximum(s, floor)
    z_paths = (r_close[origins] - m[:, None, :]) / s[:, None, :]
    z_real = (y_r[origins] - m) / s
    levels = np.asarray(CONFORMAL_LEVELS)
    model = np.stack([np.quantile(z_paths[:, :, h], levels) for h in range(r_close.shape[2])])
    target = np.stack([[conformal_quantile(z_real[:, h], q) for q in levels] for h in range(r_close.shape[2])])
    return PathCalibration(method="conformal", conformal={"levels": levels.tolist(), "model": model.tolist(),
                                                          "target": target.tolist(), "floor": floor.tolist()})


def _fit_method(method: str, origins: np.ndarray, r_close: np.ndarray, y_r: np.ndarray,
                tables: Mapping[str, np.ndarray]) -> PathCalibration:
    if method == "none":
        return IDENTITY
    if method == "conformal":
        return _fit_conformal(r_close, y_r, origins)
    centers = CENTER_GRID if method == "spread_center" else np.array([1.0])
    return _fit_spread(tables[method], centers, origins, method)


def _scores(paths_close: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Close CRPS (the report's, and the fair one the fit uses) and 50/80/95% coverage of close paths at y (N, H)."""
    cov = interval_coverage(paths_close[..., None], y[..., None])
    out = {"close_crps": float(crps(paths_close, y, axis=1).mean()),
           "fair_crps": float(fair_crps(paths_close, y, axis=1).mean())}
    out.update({f"coverage_{round(lvl * 100)}": float(cov[lvl].mean()) for lvl in INTERVALS})
    return out


def _calibrated_close(calibration: PathCalibration, close: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """Close paths (N, S, H) after ``calibration`` (the close channel moves like in apply_path_calibration)."""
    as_bars = np.repeat(close[..., None], PRICE_CHANNELS, axis=-1)
    return apply_path_calibration(as_bars, c0, calibration)[..., CLOSE]


def fit_path_calibration(
    samples: np.ndarray,
    realized: np.ndarray,
    last_close: np.ndarray,
    *,
    methods: tuple[str, ...] | list[str] = METHODS,
    order: np.ndarray | None = None,
) -> PathCalibrationFit:
    """Choose and fit a path calibration on VALIDATION origins by two-fold blocked CV of the fair close CRPS.

    ``samples`` (N, S, H, C) or close-only (N, S, H) sample paths in price units, ``realized`` the
    realized closes (N, H) (or bars (N, H, C)), ``last_close`` (N,) the origin closes, ``order`` the
    origins' time order (default: as given). Each method in ``methods`` is fitted on the earlier half
    of the origins and scored on the later half, then the other way round; the lowest mean held-out
    CRPS wins (exact ties: the simpler method, :data:`METHODS` order), and the winner is refit on all.
    """
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"calibration methods must be drawn from {list(METHODS)}, got {list(methods)}")
    close = np.asarray(samples, dtype=np.float64)
    close = close[..., CLOSE] if close.ndim == 4 else close
    y = np.asarray(realized, dtype=np.float64)
    y = y[..., CLOSE] if y.ndim == 3 else y
    c0 = np.asarray(last_close, dtype=np.float64)
    n = len(close)
    folds = blocked_folds(n, order)
    if n < MIN_DECISION_ORIGINS or close.shape[1] < 2:  # too little to fit on: paths stay as sampled, rule says why
        before = _scores(close, y) if close.shape[1] > 1 else {}
        rule = (f"no path calibration: it needs >= {MIN_DECISION_ORIGINS} validation origins and >= 2 paths, "
                f"got {n} and {close.shape[1]}; the paths stay as sampled.")
        return PathCalibrationFit(calibration=IDENTITY, candidates=[], before=before, after=dict(before), n_origins=n,
                                  rule=rule, folds=folds)
    r_close = np.log(np.maximum(close, 1e-300) / c0[:, None, None])
    y_r = np.log(np.maximum(y, 1e-300) / c0[:, None])
    tables = {"spread": _spread_table(r_close, y, c0, np.array([1.0]))} if "spread" in methods else {}
    if "spread_center" in methods:
        tables["spread_center"] = _spread_table(r_close, y, c0, CENTER_GRID)
    candidates = []
    for method in [m for m in METHODS if m in methods]:
        held_out, fold_fits = [], []
        for fit_on, score_on in (folds, folds[::-1]):
            fold_fits.append(_fit_method(method, fit_on, r_close, y_r, tables))
            held_out.append(fair_crps(_calibrated_close(fold_fits[-1], close[score_on], c0[score_on]), y[score_on],
                                      axis=1))
        full = _fit_method(method, np.arange(n), r_close, y_r, tables)
        candidates.append({"method": method, "cv_crps": float(np.concatenate(held_out).mean()),
                           **_scores(_calibrated_close(full, close, c0), y), "describe": full.describe(),
                           "calibration": full, "fold_fits": tuple(fold_fits)})
    best = min(candidates, key=lambda c: c["cv_crps"])
    chosen = next(c for c in candidates if np.isclose(c["cv_crps"], best["cv_crps"], rtol=1e-9, atol=0))
    before = _scores(close, y)
    after = {k: chosen[k] for k in before}
    names = [c["method"] for c in candidates]
    rule = (f"lowest mean fair close CRPS on held-out validation origins (two-fold blocked cross-validation over {n} "
            f"origins: fit on the earlier half, score on the later, and back) among {names}; "
            "exact ties go to the simpler method; the winner is refit on every validation origin. The test split is "
            "never read.")
    table = [{k: v for k, v in c.items() if k not in ("calibration", "fold_fits")} for c in candidates]
    return PathCalibrationFit(calibration=chosen["calibration"], candidates=table, before=before, after=after,
                              n_origins=n, rule=rule, folds=folds, fold_fits=chosen["fold_fits"])


__all__ = ["CONFORMAL_LEVELS", "IDENTITY", "METHODS", "PRICE_CHANNELS", "PathCalibration", "PathCalibrationFit",
           "apply_path_calibration", "blocked_folds", "check_prices", "conformal_quantile", "fit_path_calibration",
           "from_plain", "in_grid_range", "plain_fields", "price_log_returns", "with_price_log_returns"]
