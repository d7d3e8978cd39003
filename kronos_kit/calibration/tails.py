"""Tails: a factor for the 80% interval and one beyond its ends, fitted on validation like split-conformal ends.

A spread fitted by the CRPS is right in the body of the distribution and short in the tails of fat-tailed
returns (the 95% interval covered 0.81 of the realized closes on a Student-t GARCH series). This map moves
the interval ends around the median. Per origin and step, with ``m`` the paths' close median log-return,
``s`` their close log-return std, ``z = (r - m) / s`` and ``q10`` / ``q90`` the paths' own 10% / 90%
quantiles of z (so q10 <= 0 <= q90):

    z' = a z                        for q10 <= z <= q90
    z' = a (q90 + b (z - q90))      beyond q90, and alike below q10

``a`` (``body``) moves the ends of the 80% interval, ``b`` (``tail``) stretches (b > 1) or shrinks what lies
beyond them, which is where the 95% interval ends. (1, 1) is the identity. The map is continuous and
increasing, and the same map (with the close's m, s, q10, q90) moves the open, high, low and close
log-returns of a path, so candles stay valid and prices stay > 0; volume and amount are left as they are.

Fitting (:func:`fit_tails`) sees validation arrays only and works like split-conformal calibration of a
central interval (Romano et al. 2019): the interval is read from the mapped paths as the kit reads every
interval (:func:`~kronos_kit.metrics.sample_quantiles`), and ``a`` is the smallest grid value for which at
most 20% of the realized closes fall outside the 80% interval, then ``b`` (given ``a``) the smallest for which
at most 5% fall outside the 95% interval. The misses fall as a factor grows, so the search is a threshold; a
factor at the end of its grid says the paths cannot be stretched (or shrunk) that far. Misses are what
coverage counts, so the intervals hold at 80% and 95% on the fitting origins whatever the tails of the data.
The same factors serve both sides: factors per side, tried first, fit the drift of the fitting window (on
the A-share validation halves 1.56 below the median and 0.64 above it in one half) and raised the other
half's CRPS by 4%; a pinball-loss fit weights origins by their spread and left the 80% interval short on
origins of low volatility. Each grid holds 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kronos_kit.calibration.paths import (
    from_plain,
    in_grid_range,
    plain_fields,
    price_log_returns,
    with_price_log_returns,
)
from kronos_kit.metrics import CLOSE

BODY_GRID: np.ndarray = 2.0 ** (np.arange(-14, 15) / 14)  # a: 0.5 .. 2, 1 included
TAIL_GRID: np.ndarray = 2.0 ** (np.arange(-8, 17) / 8)  # b: 0.5 .. 4, 1 included
KNOTS = (0.1, 0.9)  # the paths' own 10% / 90% quantiles of z: the 80% interval's ends
INNER, OUTER = 0.8, 0.95  # the central intervals a and b are fitted for
_MIN_SPREAD = 1e-12


@dataclass(frozen=True)
class TailCalibration:
    """Factors of the tail map (plain JSON via :meth:`to_dict` / :meth:`from_dict`); (1, 1) is the identity."""

    body: float = 1.0  # a: the 80% interval's ends move this many times farther from the median
    tail: float = 1.0  # b: what lies beyond those ends, stretched by this (relative to a)

    def __post_init__(self) -> None:
        for name, grid in (("body", BODY_GRID), ("tail", TAIL_GRID)):
            if not in_grid_range(getattr(self, name), grid):
                raise ValueError(f"tail factor {name!r} must be within the fitted grid {grid[0]:.4g} .. "
                                 f"{grid[-1]:.4g}, got {getattr(self, name)!r}")

    @property
    def identity(self) -> bool:
        return self == TailCalibration()

    def describe(self) -> str:
        if self.identity:
            return "tails: none"
        return f"tails: 80% interval x{self.body:.3g} around the median, beyond its ends x{self.tail:.3g}"

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "calibration") -> TailCalibration:
        return from_plain(cls, plain_fields(data, cls, where=where, what="tail"), where=where)


NO_TAILS = TailCalibration()


def _standardize(r_close: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median m, spread s (N, H), z (N, S, H) and the knots q10, q90 (N, H) of close log-return paths."""
    m = np.median(r_close, axis=1)
    s = np.maximum(r_close.std(axis=1), _MIN_SPREAD)
    z = (r_close - m[:, None]) / s[:, None]
    q10, q90 = np.quantile(z, KNOTS, axis=1)
    return m, s, z, np.minimum(q10, 0.0), np.maximum(q90, 0.0)


def tail_map(z: np.ndarray, q10: np.ndarray, q90: np.ndarray, tails: TailCalibration) -> np.ndarray:
    """The increasing map of z (any shape that broadcasts with the knots q10 <= 0 <= q90)."""
    knot = np.where(z >= 0, q90, q10)
    beyond = np.abs(z) > np.abs(knot)
    return tails.body * np.where(beyond, knot + tails.tail * (z - knot), z)


def apply_tails(paths: np.ndarray, last_close: np.ndarray, tails: TailCalibration) -> np.ndarray:
    """A copy of ``paths`` (N, S, H, C>=4, price units), the tail map applied around each origin's ``last_close``."""
    paths = np.asarray(paths, dtype=np.float64)
    if tails.identity:
        return paths.copy()
    r = price_log_returns(paths, last_close)
    m, s, _, q10, q90 = _standardize(r[..., CLOSE])
    m4, s4 = m[:, None, :, None], s[:, None, :, None]
    z = (r - m4) / s4
    mapped = tail_map(z, q10[:, None, :, None], q90[:, None, :, None], tails)
    return with_price_log_returns(paths, last_close, m4 + s4 * mapped, where="tail calibration")


def _quantile_price(z: np.ndarray, level: float, m: np.ndarray, s: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """The paths' ``level`` quantile of the close (N, H) in price units, from mapped z (N, S, H)."""
    return c0[:, None] * np.exp(m + s * np.quantile(z, level, axis=1))


def fit_tails(close: np.ndarray, realized: np.ndarray, last_close: np.ndarray) -> TailCalibration:
    """Fit the two factors on close paths (N, S, H) in price units, realized closes (N, H) and last closes (N,).

    In-sample on the origins given (the caller holds origins out to judge it): each factor is the smallest grid
    value whose central interval misses no more realized closes than nominal (see the module).
    """
    c0 = np.asarray(last_close, dtype=np.float64)
    y = np.asarray(realized, dtype=np.float64)
    r = np.log(np.maximum(np.asarray(close, dtype=np.float64), 1e-300) / c0[:, None, None])
    m, s, z, q10, q90 = _standardize(r)
    k10, k90 = q10[:, None], q90[:, None]

    def smallest(grid: np.ndarray, level: float, tails) -> float:
        for g in grid:  # misses fall as the factor grows: the first value that holds is the threshold
            mapped = tail_map(z, k10, k90, tails(g))
            lo, hi = (_quantile_price(mapped, q, m, s, c0) for q in ((1 - level) / 2, (1 + level) / 2))
            if np.mean((y < lo) | (y > hi)) <= 1 - level + 1e-12:
                return float(g)
        return float(grid[-1])

    body = smallest(BODY_GRID, INNER, lambda a: TailCalibration(a, 1.0))
    return TailCalibration(body, smallest(TAIL_GRID, OUTER, lambda b: TailCalibration(body, b)))


def coverage_error(coverage_80: float, coverage_95: float) -> float:
    """|coverage_80 - 0.8| + |coverage_95 - 0.95|: how far the two intervals the tails fit are from nominal."""
    return abs(coverage_80 - 0.8) + abs(coverage_95 - 0.95)


__all__ = ["BODY_GRID", "NO_TAILS", "TAIL_GRID", "TailCalibration", "apply_tails", "coverage_error", "fit_tails",
           "tail_map"]
