"""Forecast metrics on sample-path arrays: point, probabilistic, finance and volatility.

Every function here is pure numpy on arrays; `kronos_kit.evaluate` places the forecast origins and
calls these. Shape conventions (the walk-forward's per-origin arrays; the trailing channel axis may be
dropped to score one channel, origins always come first and samples second):

- ``samples``: (N, S, H, C) sample paths: N origins, S samples, H horizon steps, C channels
  (open, high, low, close, volume, amount);
- ``realized``: (N, H, C) what happened;
- ``history``: (N, L, C) the lookback window of each origin; ``history[:, -1]`` is the last bar.

Definitions are stated in each docstring so the numbers in a report can be checked by hand.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from kronos_kit.data.schema import FEATURE_COLUMNS

CLOSE = FEATURE_COLUMNS.index("close")  # channel index of the close price
QUANTILES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
INTERVALS: tuple[float, ...] = (0.5, 0.8, 0.95)


# ----------------------------------------------------------------------------- point metrics


def point_forecast(samples: np.ndarray, how: str = "median") -> np.ndarray:
    """Collapse (N, S, ...) sample paths to a point path (N, ...) by the element-wise median or mean."""
    if how == "median":
        return np.median(samples, axis=1)
    if how == "mean":
        return samples.mean(axis=1)
    raise ValueError(f"point must be 'median' or 'mean', got {how!r}")


def seasonal_naive_scale(history: np.ndarray, season: int = 1) -> np.ndarray:
    """In-sample seasonal-naive MAE of each history window: mean |x_t - x_{t-m}|, shape (N, C).

    Zero scales (a flat window) become NaN so MASE skips that origin instead of dividing by zero.
    """
    if season < 1 or season >= history.shape[1]:
        raise ValueError(f"season must be in [1, lookback), got {season}")
    scale = np.abs(history[:, season:] - history[:, :-season]).mean(axis=1)
    return np.where(scale > 0, scale, np.nan)


def point_errors(
    point: np.ndarray, realized: np.ndarray, history: np.ndarray, *, season: int = 1
) -> dict[str, np.ndarray]:
    """MAE, RMSE, MAPE (%) and MASE of a point path, each per channel (C,) and per step (H, C).

    Averages run over origins (and steps for the per-channel figure). MAPE skips targets equal to 0
    (volume can be 0) rather than reporting infinity. MASE divides each origin's absolute errors by the
    seasonal-naive MAE of its own history window (period ``season``), then averages.
    """
    err = point - realized
    abs_err = np.abs(err)
    with np.errstate(divide="ignore", invalid="ignore"):
        ape = np.where(realized != 0, abs_err / np.abs(realized), np.nan) * 100.0
        scaled = abs_err / seasonal_naive_scale(history, season)[:, None, :]
    out: dict[str, np.ndarray] = {}
    for name, values in (("mae", abs_err), ("mape", ape), ("mase", scaled)):
        out[name] = _nanmean(values, axis=(0, 1))
        out[f"{name}_by_step"] = _nanmean(values, axis=0)
    out["rmse"] = np.sqrt(np.mean(err**2, axis=(0, 1)))
    out["rmse_by_step"] = np.sqrt(np.mean(err**2, axis=0))
    return out


# ----------------------------------------------------------------------- probabilistic metrics


def crps(samples: np.ndarray, y: np.ndarray, axis: int = 1) -> np.ndarray:
    """Exact CRPS of the empirical distribution of ``samples`` at ``y``: E|X-y| - 1/2 E|X-X'|.

    X, X' are independent draws from the S samples (pairs i == j included), which is exactly the
    CRPS of the empirical CDF. E|X-X'| comes from the sorted samples in O(S log S):
    sum_{i,j} |x_i - x_j| = 2 sum_k (2k - S - 1) x_(k), k = 1..S. A single sample gives |x - y|.
    ``y`` has the shape of ``samples`` without ``axis``.
    """
    x = np.moveaxis(np.asarray(samples, dtype=np.float64), axis, -1)
    s = x.shape[-1]
    term1 = np.abs(x - np.asarray(y, dtype=np.float64)[..., None]).mean(axis=-1)
    weights = 2.0 * np.arange(1, s + 1) - s - 1
    pair_sum = 2.0 * (np.sort(x, axis=-1) * weights).sum(axis=-1)
    return term1 - 0.5 * pair_sum / s**2


def sample_quantiles(samples: np.ndarray, levels: np.ndarray | tuple[float, ...], axis: int = 1) -> np.ndarray:
    """Quantiles over the sample axis (numpy's default linear interpolation); the level axis comes first."""
    return np.quantile(samples, np.asarray(levels, dtype=np.float64), axis=axis)


def pinball_loss(quantile_pred: np.ndarray, y: np.ndarray, q: float) -> np.ndarray:
    """Pinball (quantile) loss rho_q(y - yhat) = max(q (y - yhat), (q - 1)(y - yhat))."""
    diff = y - quantile_pred
    return np.maximum(q * diff, (q - 1.0) * diff)


def weighted_quantile_loss(
    samples: np.ndarray, realized: np.ndarray, quantiles: tuple[float, ...] = QUANTILES
) -> np.ndarray:
    """Weighted quantile loss per channel (C,), the GluonTS / Chronos definition.

    WQL = (1/K) sum_q [ 2 sum_{n,h} rho_q(y - yhat_q) / sum_{n,h} |y| ] over K quantile levels
    (default 0.1, 0.2, ..., 0.9), with yhat_q the sample quantile. A perfect forecast scores 0.
    """
    qpred = sample_quantiles(samples, quantiles)
    losses = np.stack([pinball_loss(qpred[k], realized, q).sum(axis=(0, 1)) for k, q in enumerate(quantiles)])
    denom = np.abs(realized).sum(axis=(0, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_q = 2.0 * losses / denom
    return per_q.mean(axis=0)


def interval_coverage(
    samples: np.ndarray, realized: np.ndarray, levels: tuple[float, ...] = INTERVALS
) -> dict[float, np.ndarray]:
    """Share of targets inside the central interval [q_(1-a)/2, q_(1+a)/2] of the samples, bounds included.

    Returns {level: hit-rate array (H, C)} averaged over origins; average it over steps for one number.
    """
    out = {}
    for level in levels:
        lo, hi = sample_quantiles(samples, ((1 - level) / 2, (1 + level) / 2))
        out[float(level)] = ((realized >= lo) & (realized <= hi)).mean(axis=0)
    return out


def pit_values(
    samples: np.ndarray, realized: np.ndarray, *, randomize: bool = False, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Probability integral transform: share of samples <= y, shape (N, H, C).

    With ``randomize`` ties are spread: PIT = F(y-) + U (F(y) - F(y-)), U ~ Uniform(0, 1), which makes a
    calibrated discrete forecast (tick-sized prices) uniform too.
    """
    y = realized[:, None]
    at_or_below = (samples <= y).mean(axis=1)
    if not randomize:
        return at_or_below
    below = (samples < y).mean(axis=1)
    rng = rng if rng is not None else np.random.default_rng(0)
    return below + rng.random(below.shape) * (at_or_below - below)


def pit_histogram(pit: np.ndarray, bins: int = 10) -> np.ndarray:
    """Share of PIT values in ``bins`` equal bins on [0, 1] (sums to 1; flat at 1/bins when calibrated)."""
    flat = np.asarray(pit, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    counts, _ = np.histogram(flat, bins=bins, range=(0.0, 1.0))
    return counts / max(len(flat), 1)


# ----------------------------------------------------------------------------- finance metrics


def directional_accuracy(pred_change: np.ndarray, real_change: np.ndarray) -> float:
    """Share of origins whose predicted and realized changes have the same sign.

    Origins where the realized change is exactly 0 are skipped (no direction to call). A predicted change
    of exactly 0 (e.g. persistence) scores 0.5, a coin flip, so not calling a direction is neither
    rewarded nor punished. NaN when no origin moved.
    """
    pred = np.sign(np.asarray(pred_change, dtype=np.float64))
    real = np.sign(np.asarray(real_change, dtype=np.float64))
    keep = real != 0
    if not keep.any():
        return float("nan")
    hits = np.where(pred[keep] == 0, 0.5, (pred[keep] == real[keep]).astype(np.float64))
    return float(hits.mean())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when fewer than 2 points or either side is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    denom = np.sqrt((da**2).sum() * (db**2).sum())
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties are handled)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return pearson(rankdata(a[ok]), rankdata(b[ok]))


def information_coefficients(
    pred_ret: np.ndarray, real_ret: np.ndarray, symbols: np.ndarray, times: np.ndarray, *, min_cross: int = 3
) -> dict[str, float | int | dict[str, float]]:
    """IC (Pearson) and RankIC (Spearman) of predicted vs realized horizon returns.

    Time-series: per symbol over its origins, then averaged over symbols (``ic``, ``rank_ic``, with
    per-symbol values). Cross-sectional: per origin timestamp across symbols, only for timestamps with
    at least ``min_cross`` symbols, then averaged over those dates (``xs_ic``, ``xs_rank_ic``,
    ``xs_dates``); NaN with 0 dates otherwise. Constant predictions give NaN (correlation undefined).
    """
    symbols = np.asarray(symbols)
    per_ic, per_rank = {}, {}
    for sym in np.unique(symbols):
        m = symbols == sym
        per_ic[str(sym)] = pearson(pred_ret[m], real_ret[m])
        per_rank[str(sym)] = spearman(pred_ret[m], real_ret[m])
    xs_ic, xs_rank = [], []
    times = np.asarray(times)
    for t in np.unique(times):
        m = times == t
        if m.sum() >= min_cross:
            xs_ic.append(pearson(pred_ret[m], real_ret[m]))
            xs_rank.append(spearman(pred_ret[m], real_ret[m]))
    return {
        "ic": _nanmean_list(per_ic.values()),
        "rank_ic": _nanmean_list(per_rank.values()),
        "ic_by_symbol": per_ic,
        "rank_ic_by_symbol": per_rank,
        "xs_ic": _nanmean_list(xs_ic),
        "xs_rank_ic": _nanmean_list(xs_rank),
        "xs_dates": int(np.sum(np.isfinite(xs_ic))),
    }


# -------------------------------------------------------------------------- volatility metrics


def realized_vol(close_paths: np.ndarray, last_close: np.ndarray) -> np.ndarray:
    """Sum of squared log returns of the close over the horizon, starting from the last history close.

    ``close_paths`` is (..., H) and ``last_close`` broadcasts against (...). H returns per path;
    non-positive prices give NaN rather than a bogus log.
    """
    close_paths = np.asarray(close_paths, dtype=np.float64)
    start = np.broadcast_to(np.asarray(last_close, dtype=np.float64)[..., None], close_paths.shape[:-1] + (1,))
    full = np.concatenate([start, close_paths], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(full > 0, np.log(np.where(full > 0, full, 1.0)), np.nan)
    return (np.diff(logp, axis=-1) ** 2).sum(axis=-1)


def predicted_vol(samples: np.ndarray, last_close: np.ndarray) -> np.ndarray:
    """Realized vol of each sample path's close, averaged over the samples: shape (N,)."""
    per_path = realized_vol(samples[..., CLOSE], np.asarray(last_close)[:, None])
    return _nanmean(per_path, axis=1)


def vol_errors(pred: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """MAE and R^2 = 1 - SSE/SST (SST around the realized mean) of predicted vs realized vol."""
    ok = np.isfinite(pred) & np.isfinite(real)
    p, r = pred[ok], real[ok]
    if len(r) == 0:
        return {"mae": float("nan"), "r2": float("nan"), "n": 0}
    sst = ((r - r.mean()) ** 2).sum()
    r2 = 1.0 - ((r - p) ** 2).sum() / sst if sst > 0 else float("nan")
    return {"mae": float(np.abs(p - r).mean()), "r2": float(r2), "n": int(len(r))}


# ------------------------------------------------------------------------------------ helpers


def _nanmean(values: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    # all-NaN slices are legitimate (e.g. MAPE of an all-zero volume step): NaN without a warning.
    # Only NaN is skipped; an infinite error (an exploded forecast) must still show.
    present = ~np.isnan(values)
    count = present.sum(axis=axis)
    total = np.where(present, values, 0.0).sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _nanmean_list(values) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if len(arr) else float("nan")
