"""Tails: separate factors for the ends of the 80% and 95% intervals, fitted on validation like split-conformal ends.

A spread fitted by the CRPS is right in the body of the distribution and short in the tails of fat-tailed
returns (the 95% interval covered 0.81 of the realized closes on a Student-t GARCH series). This map moves
the interval ends on each side of the median separately. Per origin and step, with ``m`` the paths' close median
log-return, ``s`` their close log-return std, ``z = (r - m) / s`` and ``q10`` / ``q90`` the paths' own 10% /
90% quantiles of z (so q10 <= 0 <= q90):

    z' = a z                        for q10 <= z <= q90     (a_lo below the median, a_hi above)
    z' = a (q90 + b (z - q90))      beyond q90              (b_hi; below q10 alike with a_lo, b_lo)

``a`` moves the ends of the 80% interval, ``b`` stretches (b > 1) or shrinks what lies beyond them, which
is where the 95% interval ends. (1, 1) is the identity. The map is continuous and increasing, and the
same map (with the close's m, s, q10, q90) moves the open, high, low and close log-returns of a path, so
candles stay valid and prices stay > 0; volume and amount are left as they are.

Fitting (:func:`fit_tails`) sees validation arrays only and works like split-conformal calibration of each
interval end (Romano et al. 2019): the ends are read from the mapped paths as the kit reads every interval
(:func:`~kronos_kit.metrics.sample_quantiles`), and each factor is the smallest grid value whose end the
realized closes exceed no more often than nominal: a_hi the smallest with at most 10% of closes above the
0.9 quantile, then b_hi given a_hi the smallest with at most 2.5% above the 0.975 quantile, and the lower
side alike. The exceedance falls as the factor grows, so the search is a threshold; a factor at the end of
its grid says the paths cannot be stretched (or shrunk) that far. The share of realized values beyond an end
is what coverage counts, so the fitted intervals hold at 80% and 95% on the fitting origins whatever the tails
of the data (a pinball-loss fit, tried first, weights each origin by its spread and left the 80% interval
short on origins of low volatility). Each grid holds 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kronos_kit.calibration.paths import (
    in_grid_range,
    price_log_returns,
    with_price_log_returns,
)
from kronos_kit.metrics import CLOSE

BODY_GRID: np.ndarray = 2.0 ** (np.arange(-14, 15) / 14)  # a: 0.5 .. 2, 1 included
TAIL_GRID: np.ndarray = 2.0 ** (np.arange(-8, 17) / 8)  # b: 0.5 .. 4, 1 included
INNER = (0.1, 0.9)  # the knots: the paths' own 10% / 90% quantiles of z (the 80% interval's ends)
OUTER = (0.025, 0.975)  # the 95% interval's ends, which b moves
_MIN_SPREAD = 1e-12


@dataclass(frozen=True)
class TailCalibration:
    """Factors of the tail map (plain JSON via :meth:`to_dict` / :meth:`from_dict`); all 1 is the identity."""

    lower_body: float = 1.0  # a_lo: the 10% end's distance from the median, times this
    upper_body: float = 1.0  # a_hi: the 90% end's
    lower_tail: float = 1.0  # b_lo: what lies below the 10% end, stretched by this (relative to a_lo)
    upper_tail: float = 1.0  # b_hi: what lies above the 90% end

    def __post_init__(self) -> None:
        for name, grid in (("lower_body", BODY_GRID), ("upper_body", BODY_GRID), ("lower_tail", TAIL_GRID),
                           ("upper_tail", TAIL_GRID)):
            if not in_grid_range(getattr(self, name), grid):
                raise ValueError(f"tail factor {name!r} must be within the fitted grid {grid[0]:.4g} .. "
                                 f"{grid[-1]:.4g}, got {getattr(self, name)!r}")

    @property
    def identity(self) -> bool:
        return self == TailCalibration()

    def describe(self) -> str:
        if self.identity:
            return "tails: none"
        return (f"tails: 80% interval ends x{self.lower_body:.3g} (lower) / x{self.upper_body:.3g} (upper) from the "
                f"median, beyond them x{self.lower_tail:.3g} / x{self.upper_tail:.3g}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "calibration") -> TailCalibration:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: the tail calibration must be a JSON object, got {type(data).__name__}")
        known = {"lower_body", "upper_body", "lower_tail", "upper_tail"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{where}: unknown tail field(s) {sorted(unknown)}; expected {sorted(known)}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}; rerun the validation step to rewrite it") from None


NO_TAILS = TailCalibration()


def _standardize(r_close: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median m, spread s (N, H), z (N, S, H) and the knots q10, q90 (N, H) of close log-return paths."""
    m = np.median(r_close, axis=1)
    s = np.maximum(r_close.std(axis=1), _MIN_SPREAD)
    z = (r_close - m[:, None]) / s[:, None]
    q10, q90 = np.quantile(z, INNER, axis=1)
    return m, s, z, np.minimum(q10, 0.0), np.maximum(q90, 0.0)


def _side_map(z: np.ndarray, knot: np.ndarray, body: float, tail: float) -> np.ndarray:
    """One side of the map: body * z up to the knot, body * (knot + tail * (z - knot)) beyond it."""
    beyond = np.abs(z) > np.abs(knot)
    return body * np.where(beyond, knot + tail * (z - knot), z)


def tail_map(z: np.ndarray, q10: np.ndarray, q90: np.ndarray, tails: TailCalibration) -> np.ndarray:
    """The increasing map of z (any shape that broadcasts with the knots q10 <= 0 <= q90)."""
    upper = _side_map(z, q90, tails.upper_body, tails.upper_tail)
    lower = _side_map(z, q10, tails.lower_body, tails.lower_tail)
    return np.where(z >= 0, upper, lower)


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
    """Fit the four factors on close paths (N, S, H) in price units, realized closes (N, H) and last closes (N,).

    In-sample on the origins given (the caller holds origins out to judge it): each factor is the smallest
    grid value whose interval end the realized closes pass no more often than nominal (see the module).
    """
    c0 = np.asarray(last_close, dtype=np.float64)
    y = np.asarray(realized, dtype=np.float64)
    r = np.log(np.maximum(np.asarray(close, dtype=np.float64), 1e-300) / c0[:, None, None])
    m, s, z, q10, q90 = _standardize(r)
    k10, k90 = q10[:, None], q90[:, None]
    upper, lower = z >= 0, z < 0

    def smallest(grid: np.ndarray, level: float, mapped) -> float:
        for g in grid:  # exceedance falls as the factor grows: the first value that holds is the threshold
            end = _quantile_price(mapped(g), level, m, s, c0)
            share = np.mean(y > end) if level > 0.5 else np.mean(y < end)
            if share <= min(level, 1 - level) + 1e-12:
                return float(g)
        return float(grid[-1])

    a_hi = smallest(BODY_GRID, INNER[1], lambda a: np.where(upper, _side_map(z, k90, a, 1.0), z))
    b_hi = smallest(TAIL_GRID, OUTER[1], lambda b: np.where(upper, _side_map(z, k90, a_hi, b), z))
    a_lo = smallest(BODY_GRID, INNER[0], lambda a: np.where(lower, _side_map(z, k10, a, 1.0), z))
    b_lo = smallest(TAIL_GRID, OUTER[0], lambda b: np.where(lower, _side_map(z, k10, a_lo, b), z))
    return TailCalibration(lower_body=a_lo, upper_body=a_hi, lower_tail=b_lo, upper_tail=b_hi)


def coverage_error(coverage_80: float, coverage_95: float) -> float:
    """|coverage_80 - 0.8| + |coverage_95 - 0.95|: how far the two intervals the tails fit are from nominal."""
    return abs(coverage_80 - 0.8) + abs(coverage_95 - 0.95)


__all__ = ["BODY_GRID", "NO_TAILS", "TAIL_GRID", "TailCalibration", "apply_tails", "coverage_error", "fit_tails",
           "tail_map"]
