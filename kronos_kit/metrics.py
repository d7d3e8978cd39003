"""Forecast metrics on sample-path arrays: point, probabilistic, finance and volatility.

Every function here is pure numpy on arrays; `kronos_kit.evaluate` places the forecast origins and
calls these. Shape conventions (the walk-forward's per-origin arrays; the trailing channel axis may be
dropped to score one channel, origins always come first and samples second):

- ``samples``: (N, S, H, C) sample paths: N origins, S samples, H horizon steps, C channels
  (open, high, low, close, volume, amount);
- ``realized``: (N, H, C) what happened;
- ``history``: (N, L, C) the lookback window of each origin; ``history[:, -1]`` is the last bar.

Definitions are stated in each docstring so the numbers in a report can be checked by hand. The tests
of differences at the end (Diebold-Mariano, moving-block bootstrap, Newey-West t-statistics) take plain
per-origin loss series and say how sure a comparison is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _stats
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


def fair_crps(samples: np.ndarray, y: np.ndarray, axis: int = 1) -> np.ndarray:
    """Fair (unbiased) ensemble CRPS: E|X-y| - sum_{i != j} |x_i - x_j| / (2 S (S - 1)) (Ferro 2014, QJRMS 140:1917).

    :func:`crps` scores the S samples' empirical distribution, whose expected score is lowest for an
    ensemble drawn somewhat too narrow (about 6% at S = 32 for Gaussian targets); the fair version's
    expectation is lowest when the samples come from the true distribution, whatever S. Fitting a
    spread by it therefore targets the distribution, not the S-sample artefact. Needs S >= 2.
    """
    x = np.moveaxis(np.asarray(samples, dtype=np.float64), axis, -1)
    s = x.shape[-1]
    if s < 2:
        raise ValueError(f"fair_crps needs at least 2 samples, got {s}")
    term1 = np.abs(x - np.asarray(y, dtype=np.float64)[..., None]).mean(axis=-1)
    weights = 2.0 * np.arange(1, s + 1) - s - 1
    pair_sum = 2.0 * (np.sort(x, axis=-1) * weights).sum(axis=-1)
    return term1 - 0.5 * pair_sum / (s * (s - 1))


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


# ------------------------------------------------------------------------- tests of differences
#
# Walk-forward origins overlap when stride < horizon (neighbouring origins share target bars) and
# forecast losses cluster with volatility, so per-origin losses are autocorrelated. An i.i.d. t-test
# then understates the variance of a mean and is overconfident; everything below uses a
# heteroskedasticity-and-autocorrelation-consistent (HAC) variance or resamples whole blocks.


def newey_west_lag(n: int) -> int:
    """Newey-West (1994) rule-of-thumb truncation lag for the Bartlett kernel: floor(4 (n/100)^(2/9)).

    n = 20 -> 2, 60 -> 3, 100 -> 4, 500 -> 5. It grows slowly with n so the variance stays consistent.
    """
    return int(np.floor(4.0 * (max(int(n), 0) / 100.0) ** (2.0 / 9.0)))


def andrews_lag(x: np.ndarray) -> int:
    """Data-dependent Bartlett lag from Andrews' (1991, Econometrica 59:817) AR(1) plug-in rule.

    rho = lag-1 autocorrelation of ``x`` (clipped to +-0.97), a = 4 rho^2 / ((1 - rho)^2 (1 + rho)^2),
    bandwidth S = 1.1447 (a n)^(1/3), lag = floor(S). It grows with the persistence of the series
    (rho 0 -> 0; rho 0.8 at n = 120 -> about 14), where the fixed :func:`newey_west_lag` rule (4 at
    n = 120) leaves the variance too small and the test overconfident.
    """
    x = _finite_series(x, "x")
    n = len(x)
    if n < 3:
        return 0
    e = x - x.mean()
    denom = float(e @ e)
    if not denom > 0:
        return 0
    rho = float(np.clip(float(e[1:] @ e[:-1]) / denom, -0.97, 0.97))
    alpha = 4 * rho**2 / ((1 - rho) ** 2 * (1 + rho) ** 2)
    return int(np.floor(1.1447 * (alpha * n) ** (1 / 3)))


def hac_lag(diff: np.ndarray, *, floor: int = 0) -> int:
    """The lag of a paired test on the loss-difference series ``diff``: the largest of ``floor`` (e.g. the
    origins' target overlap), :func:`newey_west_lag` and :func:`andrews_lag`, capped at (n - 1) // 2 so
    the HLN correction stays defined; 0 below three values."""
    n = len(diff)
    if n < 3:
        return 0
    return min(max(int(floor), newey_west_lag(n), andrews_lag(diff)), (n - 1) // 2)


def _finite_series(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D series (one value per origin), got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x))
        raise ValueError(f"{name} has non-finite values at positions {bad[:5].tolist()}: drop those origins "
                         "(from both series of a pair) first")
    return x


def newey_west_variance(x: np.ndarray, lag: int | None = None) -> float:
    """HAC variance of the sample mean of a series: its Newey-West long-run variance divided by n.

    Var(mean x) ~= [g_0 + 2 sum_{k=1..L} (1 - k/(L+1)) g_k] / n,   g_k = (1/n) sum_{t>k} (x_t - m)(x_{t-k} - m)

    with m the sample mean and Bartlett weights 1 - k/(L+1), which keep the estimate >= 0 (Newey & West
    1987, Econometrica 55:703). ``lag`` L defaults to :func:`newey_west_lag` (Newey & West 1994, Rev.
    Econ. Stud. 61:631) and is capped at n - 1. L = 0 gives the i.i.d. variance var(x, ddof=0) / n.
    NaN for fewer than 2 values.
    """
    x = _finite_series(x, "x")
    n = len(x)
    if n < 2:
        return float("nan")
    lag = newey_west_lag(n) if lag is None else int(lag)
    if lag < 0:
        raise ValueError(f"lag must be >= 0, got {lag}")
    lag = min(lag, n - 1)
    e = x - x.mean()
    long_run = float(e @ e) / n
    for k in range(1, lag + 1):
        long_run += 2.0 * (1.0 - k / (lag + 1.0)) * float(e[k:] @ e[:-k]) / n
    return long_run / n


def newey_west_tstat(series: np.ndarray, lag: int | None = None) -> float:
    """t-statistic of the mean of ``series`` against 0 with the Newey-West standard error.

    t = mean(x) / sqrt(newey_west_variance(x, lag)); compare with N(0, 1) (|t| > 1.96 ~ 5% two-sided).
    Used for the IC / RankIC series. NaN for fewer than 2 values or a zero variance (constant series).
    """
    x = _finite_series(series, "series")
    var = newey_west_variance(x, lag)
    if not var > 0:
        return float("nan")
    return float(x.mean() / np.sqrt(var))


@dataclass(frozen=True)
class DMResult:
    """Outcome of :func:`diebold_mariano`: the statistic, its two-sided p-value and what it was made of.

    ``mean_diff`` is mean(loss_a - loss_b): negative means ``a`` has the lower loss.
    """

    statistic: float
    p_value: float
    mean_diff: float
    n: int
    lag: int
    std_error: float
    test: str


def diebold_mariano(
    loss_a: np.ndarray, loss_b: np.ndarray, *, lag: int | None = None, hln: bool = True
) -> DMResult:
    """Diebold-Mariano test of equal expected loss on paired per-origin losses (H0: E[a - b] = 0).

    d_t = a_t - b_t;  DM = mean(d) / sqrt(V),  V = :func:`newey_west_variance` (d, lag) (HAC, since
    overlapping origins make d autocorrelated). ``lag`` defaults to :func:`newey_west_lag` (n).

    With ``hln`` (the default) the Harvey, Leybourne & Newbold (1997, Int. J. Forecasting 13:281)
    small-sample correction is applied with h = lag + 1 (the dependence the lag allows for):
    DM* = DM sqrt((n + 1 - 2h + h(h - 1)/n) / n), p-value from Student's t with n - 1 degrees of freedom.
    It is conservative for the 30-100 origins an evaluation typically has. Without it: DM against N(0, 1)
    (Diebold & Mariano 1995, J. Bus. Econ. Stat. 13:253). Both p-values are two-sided.

    A zero variance (identical or constant-gap losses) gives statistic 0 and p = 1 when mean(d) = 0,
    +-inf and p = 0 otherwise; fewer than 3 pairs give NaN.
    """
    a = _finite_series(loss_a, "loss_a")
    b = _finite_series(loss_b, "loss_b")
    if a.shape != b.shape:
        raise ValueError(f"loss_a and loss_b must pair up origin by origin, got {a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    lag = newey_west_lag(n) if lag is None else int(lag)
    lag = min(lag, max(n - 1, 0))
    h = lag + 1
    name = f"Diebold-Mariano, Newey-West lag {lag}, " + (f"HLN-corrected t({n - 1})" if hln else "normal")
    if n < 3:
        return DMResult(float("nan"), float("nan"), float(d.mean()) if n else float("nan"), n, lag, float("nan"), name)
    mean = float(d.mean())
    se = float(np.sqrt(newey_west_variance(d, lag)))
    if not se > 0:
        stat = 0.0 if mean == 0 else float(np.sign(mean) * np.inf)
        return DMResult(stat, 1.0 if mean == 0 else 0.0, mean, n, lag, se, name)
    stat = mean / se
    if hln:
        factor = (n + 1 - 2 * h + h * (h - 1) / n) / n
        if not factor > 0:
            raise ValueError(f"lag {lag} is too large for {n} origins with the HLN correction; use lag < n/2")
        stat *= float(np.sqrt(factor))
        p = 2.0 * float(_stats.t.sf(abs(stat), df=n - 1))
    else:
        p = 2.0 * float(_stats.norm.sf(abs(stat)))
    return DMResult(float(stat), p, mean, n, lag, se, name)


def relative_skill(loss_a: np.ndarray, loss_b: np.ndarray) -> float:
    """Relative skill of ``a`` over ``b``: 1 - mean(a) / mean(b). Positive: ``a`` has the lower mean loss.

    A perfect ``b`` (mean loss 0) gives -inf against any imperfect ``a`` and NaN against a perfect one.
    """
    mean_a, mean_b = float(np.mean(loss_a)), float(np.mean(loss_b))
    if mean_b == 0:
        return float("-inf") if mean_a > 0 else float("nan")
    return 1.0 - mean_a / mean_b


def minimum_detectable_effect(
    loss_a: np.ndarray, loss_b: np.ndarray, *, lag: int | None = None, level: float = 0.05, power: float = 0.8,
    hln: bool = True,
) -> float:
    """Smallest relative loss difference |mean(a - b)| / mean(b) that :func:`diebold_mariano` would detect.

    With the observed HAC standard error ``se`` of mean(a - b) (:func:`newey_west_variance` at ``lag``)
    and n pairs, a two-sided test at ``level`` rejects with probability ``power`` when the true mean
    difference is (t_{1-level/2} + t_{power}) * se / sqrt(f): Student's t with n - 1 degrees of freedom
    and the HLN factor f of :func:`diebold_mariano` (normal quantiles and f = 1 with ``hln=False``).
    Returned as a share of mean(b): 0.05 means a 5% lower or higher loss is the smallest effect the
    origins could pick up at that power. NaN for fewer than 3 pairs or mean(b) = 0; 0 for a zero variance.
    """
    a = _finite_series(loss_a, "loss_a")
    b = _finite_series(loss_b, "loss_b")
    if a.shape != b.shape:
        raise ValueError(f"loss_a and loss_b must pair up origin by origin, got {a.shape} and {b.shape}")
    if not (0 < level < 1 and 0 < power < 1):
        raise ValueError(f"level and power must be in (0, 1), got {level} and {power}")
    n = len(a)
    mean_b = float(b.mean()) if n else 0.0
    if n < 3 or mean_b == 0:
        return float("nan")
    return minimum_detectable_difference(a - b, lag=lag, level=level, power=power, hln=hln) / abs(mean_b)


def minimum_detectable_difference(
    diff: np.ndarray, *, lag: int | None = None, level: float = 0.05, power: float = 0.8, hln: bool = True,
) -> float:
    """Smallest |mean(diff)| the paired test on ``diff`` (:func:`diebold_mariano` on its two series) detects.

    (t_{1-level/2} + t_{power}) * se / sqrt(f), with se the HAC standard error of mean(diff) at ``lag``
    (:func:`newey_west_variance`; default :func:`newey_west_lag`), Student's t with n - 1 degrees of freedom
    and the HLN factor f (normal quantiles and f = 1 with ``hln=False``). In the units of ``diff`` (e.g. a
    daily return difference); :func:`minimum_detectable_effect` divides it by the other's mean loss. NaN for
    fewer than 3 values; 0 for a zero variance.
    """
    d = _finite_series(diff, "diff")
    if not (0 < level < 1 and 0 < power < 1):
        raise ValueError(f"level and power must be in (0, 1), got {level} and {power}")
    n = len(d)
    if n < 3:
        return float("nan")
    lag = min(newey_west_lag(n) if lag is None else int(lag), n - 1)
    se = float(np.sqrt(newey_west_variance(d, lag)))
    if hln:
        h = lag + 1
        factor = (n + 1 - 2 * h + h * (h - 1) / n) / n
        if not factor > 0:
            raise ValueError(f"lag {lag} is too large for {n} origins with the HLN correction; use lag < n/2")
        z = float(_stats.t.ppf(1 - level / 2, df=n - 1) + _stats.t.ppf(power, df=n - 1)) / np.sqrt(factor)
    else:
        z = float(_stats.norm.ppf(1 - level / 2) + _stats.norm.ppf(power))
    return z * se


def moving_block_indices(n: int, block: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Moving-block bootstrap resamples of positions 0..n-1, shape (n_boot, n).

    Each resample glues ceil(n / block) blocks of ``block`` consecutive positions, each starting
    uniformly at 0..n-block (overlapping blocks, Kunsch 1989, Ann. Stat. 17:1217), cut to length n.
    """
    if not 1 <= block <= n:
        raise ValueError(f"block must be in [1, n={n}], got {block}")
    n_blocks = -(-n // block)
    starts = rng.integers(0, n - block + 1, size=(n_boot, n_blocks))
    return (starts[..., None] + np.arange(block)).reshape(n_boot, -1)[:, :n]


def _block_resamples(n: int, block: int | None, n_boot: int, level: float, seed: int) -> tuple[np.ndarray, int]:
    """Seeded moving-block resamples (n_boot, n) of n positions and the block (default round(n^(1/3)))."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n == 0:
        raise ValueError("no values to resample")
    block = max(1, int(round(n ** (1 / 3)))) if block is None else int(block)
    return moving_block_indices(n, block, n_boot, np.random.default_rng(seed)), block


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile confidence interval from :func:`moving_block_bootstrap_ci`."""

    estimate: float
    low: float
    high: float
    level: float
    block: int
    n_boot: int


def moving_block_bootstrap_ci(
    loss_a: np.ndarray,
    loss_b: np.ndarray,
    *,
    block: int | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Moving-block bootstrap percentile CI of the relative skill 1 - mean(a) / mean(b).

    The same block positions resample ``a`` and ``b`` (pairing kept); blocks of consecutive origins keep
    their autocorrelation. ``block`` defaults to round(n^(1/3)) (the order Hall, Horowitz & Jing 1995,
    Biometrika 82:561, find optimal for distribution estimates; 60 origins -> 4). The interval holds the
    (1 - level)/2 and (1 + level)/2 quantiles of the n_boot resampled skills (numpy's linear rule; no
    interpolation when a resample's mean(b) is 0, whose skill is -inf); seeded, so reruns are identical.
    ``estimate`` is the skill on the original series.
    """
    a = _finite_series(loss_a, "loss_a")
    b = _finite_series(loss_b, "loss_b")
    if a.shape != b.shape:
        raise ValueError(f"loss_a and loss_b must pair up origin by origin, got {a.shape} and {b.shape}")
    idx, block = _block_resamples(len(a), block, n_boot, level, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        skills = 1.0 - a[idx].mean(axis=1) / b[idx].mean(axis=1)
    # a resample where b is perfect has skill -inf: no interpolation then, so a bound can be -inf, not NaN
    method = "linear" if np.isfinite(skills).all() else "inverted_cdf"
    low, high = np.quantile(skills, [(1 - level) / 2, (1 + level) / 2], method=method)
    return BootstrapCI(relative_skill(a, b), float(low), float(high), float(level), block, int(n_boot))


def moving_block_mean_ci(
    diff: np.ndarray, *, block: int | None = None, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> BootstrapCI:
    """Moving-block bootstrap percentile CI of mean(``diff``), e.g. the daily return difference of two portfolios.

    Blocks of ``block`` consecutive values (default round(n^(1/3))) keep the series' autocorrelation
    (:func:`moving_block_indices`); the interval holds the (1 - level)/2 and (1 + level)/2 quantiles of the
    ``n_boot`` resampled means (seeded, so reruns are identical). ``estimate`` is the mean of ``diff``.
    """
    d = _finite_series(diff, "diff")
    idx, block = _block_resamples(len(d), block, n_boot, level, seed)
    means = d[idx].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapCI(float(d.mean()), float(low), float(high), float(level), block, int(n_boot))


def ic_tstats(
    pred_ret: np.ndarray,
    real_ret: np.ndarray,
    symbols: np.ndarray,
    times: np.ndarray,
    *,
    lag: int | None = None,
    min_cross: int = 3,
) -> dict[str, float]:
    """Newey-West t-statistics (H0: no correlation) for the IC / RankIC of :func:`information_coefficients`.

    Time series (``ic_t``): within each symbol z-score the predicted (p) and realized (r) returns
    (population std). The IC is then the slope of the pooled regression r = b p + e,
    b = sum p r / sum p^2 (exactly the Pearson IC for one symbol; the origin-weighted mean of the
    per-symbol ICs otherwise). Its HAC standard error comes from the scores s = p e summed over the
    symbols of each origin time (one value per time, so cross-sectional dependence stays inside it):
    se(b) = T sqrt(newey_west_variance(S, lag)) / sum p^2 over T times; ``ic_t`` = b / se(b)
    (with lag 0 and one symbol, about the classic r sqrt(n) / sqrt(1 - r^2)). ``rank_ic_t``: the same
    on within-symbol average ranks. Cross-sectional (``xs_ic_t``, ``xs_rank_ic_t``):
    :func:`newey_west_tstat` of the per-date IC / RankIC series (dates with >= ``min_cross`` symbols).
    Symbols with constant predictions (persistence) have no IC and are left out; NaN when none is left.
    """
    pred_ret = np.asarray(pred_ret, dtype=np.float64)
    real_ret = np.asarray(real_ret, dtype=np.float64)
    symbols, times = np.asarray(symbols), np.asarray(times)
    out: dict[str, float] = {}
    for key, transform in (("ic_t", lambda v: v), ("rank_ic_t", rankdata)):
        zp = np.full(len(pred_ret), np.nan)
        zr = np.full(len(pred_ret), np.nan)
        for sym in np.unique(symbols):
            m = (symbols == sym) & np.isfinite(pred_ret) & np.isfinite(real_ret)
            if m.sum() < 2:
                continue
            p, r = transform(pred_ret[m]), transform(real_ret[m])
            if p.std() > 0 and r.std() > 0:
                zp[m], zr[m] = (p - p.mean()) / p.std(), (r - r.mean()) / r.std()
        out[key] = _hac_slope_t(zp, zr, times, lag)
    for key, corr in (("xs_ic_t", pearson), ("xs_rank_ic_t", spearman)):
        per_date = []
        for t in np.unique(times):
            m = times == t
            if m.sum() >= min_cross:
                per_date.append(corr(pred_ret[m], real_ret[m]))
        series = np.asarray(per_date, dtype=np.float64)
        series = series[np.isfinite(series)]
        out[key] = newey_west_tstat(series, lag) if len(series) >= 2 else float("nan")
    return out


def _hac_slope_t(zp: np.ndarray, zr: np.ndarray, times: np.ndarray, lag: int | None) -> float:
    # slope of zr on zp through the origin, HAC t over time (see ic_tstats)
    ok = np.isfinite(zp) & np.isfinite(zr)
    if ok.sum() < 3:
        return float("nan")
    zp, zr = zp[ok], zr[ok]
    sxx = float(zp @ zp)
    slope = float(zp @ zr) / sxx
    _, inverse = np.unique(times[ok], return_inverse=True)
    scores = np.bincount(inverse, weights=zp * (zr - slope * zp))
    if len(scores) < 2:
        return float("nan")
    var = newey_west_variance(scores, lag)
    if not var > 0:
        return float("nan") if slope == 0 else float(np.sign(slope) * np.inf)
    return slope / (len(scores) * np.sqrt(var) / sxx)


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
