"""Cross-sectional statistics of a signal on a panel: IC and RankIC per date and horizon, quantile returns.

Arrays are grids over rebalance dates x symbols: ``signal`` (D, K) and forward returns ``forward`` (H, D, K),
``forward[h - 1]`` the close-to-close return from a date's close to the close ``h`` bars later (NaN where
a name has no bar). Every statistic is per date first, then summarized over dates (the alphalens and
qlib convention), so each date counts once however many names it has:

- IC (Pearson) and RankIC (Spearman) per date at every horizon 1..H, over the names with a finite signal
  and return (at least :data:`MIN_NAMES`); their mean, standard deviation, ICIR = mean / std and a
  Newey-West t of the mean (lag at least the dates whose horizons overlap: ceil(h / stride) - 1);
- quantile groups per date by the signal's rank (group 1 lowest), the mean forward return of each group
  and the top-minus-bottom spread with its Newey-West t;
- the rank autocorrelation of the signal between consecutive dates (high: a slow signal, cheap to trade).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from kronos_kit import metrics as M

MIN_NAMES = 3  # names a date needs for a correlation


def per_date_ic(signal: np.ndarray, forward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IC, RankIC) of each date (D,) between ``signal`` and one horizon's ``forward`` returns, both (D, K);
    NaN where fewer than :data:`MIN_NAMES` names have both, or either side is constant."""
    ic = np.full(len(signal), np.nan)
    rank_ic = np.full(len(signal), np.nan)
    for d in range(len(signal)):
        ok = np.isfinite(signal[d]) & np.isfinite(forward[d])
        if ok.sum() >= MIN_NAMES:
            ic[d] = M.pearson(signal[d, ok], forward[d, ok])
            rank_ic[d] = M.spearman(signal[d, ok], forward[d, ok])
    return ic, rank_ic


def overlap_floor(horizon: int, stride: int) -> int:
    """Later dates whose forward returns overlap a date's: ceil(horizon / stride) - 1 (the HAC lag's floor)."""
    return max(0, math.ceil(horizon / stride) - 1)


def series_summary(series: np.ndarray, *, floor: int = 0) -> dict[str, float]:
    """Mean, std, mean / std, Newey-West t (lag :func:`~kronos_kit.metrics.hac_lag` at least ``floor``), the share
    of positive values and the count, over the finite values of a per-date series."""
    x = np.asarray(series, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    out = {"mean": float("nan"), "std": float("nan"), "ir": float("nan"), "t": float("nan"),
           "positive": float("nan"), "n_dates": n, "lag": 0}
    if n == 0:
        return out
    out["mean"], out["positive"] = float(x.mean()), float((x > 0).mean())
    if n >= 2:
        std = float(x.std(ddof=1))
        lag = M.hac_lag(x, floor=floor)
        out.update(std=std, ir=float(x.mean() / std) if std > 0 else float("nan"), lag=lag,
                   t=M.newey_west_tstat(x, lag))
    return out


def quantile_groups(signal: np.ndarray, n_quantiles: int) -> np.ndarray:
    """Group 1..``n_quantiles`` of each name per date by the signal's rank (ties broken by position, so a
    date of n names puts n / Q in each group); 0 where the signal is missing or the date has fewer names
    than groups."""
    groups = np.zeros(signal.shape, dtype=np.int64)
    for d in range(len(signal)):
        ok = np.flatnonzero(np.isfinite(signal[d]))
        if len(ok) < n_quantiles:
            continue
        rank = rankdata(signal[d, ok], method="ordinal") - 1  # 0 .. n-1
        groups[d, ok] = rank * n_quantiles // len(ok) + 1
    return groups


def quantile_returns(signal: np.ndarray, forward: np.ndarray, n_quantiles: int) -> np.ndarray:
    """Mean forward return of each quantile group per date, (D, Q); NaN where a group is empty."""
    groups = quantile_groups(signal, n_quantiles)
    out = np.full((len(signal), n_quantiles), np.nan)
    for q in range(1, n_quantiles + 1):
        member = (groups == q) & np.isfinite(forward)
        count = member.sum(axis=1)
        total = np.where(member, forward, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, q - 1] = np.where(count > 0, total / count, np.nan)
    return out


def rank_autocorrelation(signal: np.ndarray) -> np.ndarray:
    """Spearman correlation of the signal between each date and the one before, over names on both (D - 1,)."""
    out = np.full(max(len(signal) - 1, 0), np.nan)
    for d in range(1, len(signal)):
        ok = np.isfinite(signal[d]) & np.isfinite(signal[d - 1])
        if ok.sum() >= MIN_NAMES:
            out[d - 1] = M.spearman(signal[d, ok], signal[d - 1, ok])
    return out


def signal_statistics(signal: np.ndarray, forward: np.ndarray, *, stride: int, n_quantiles: int,
                      horizon: int | None = None) -> dict:
    """Every cross-sectional statistic of one signal (plain JSON, see the module docstring).

    ``horizon`` is the decision horizon (default: the last one): the headline ``ic`` / ``rank_ic`` (with
    ``_t``, ``_std``, ``_ir``, ``_positive``), ``n_dates``, the quantile returns and the spread are measured
    there; ``by_horizon`` holds IC, RankIC and their t at every horizon; ``series`` the per-date values at
    the decision horizon (``rank_ic``, ``ic``, ``spread``).
    """
    h_max = forward.shape[0]
    horizon = h_max if horizon is None else int(horizon)
    if not 1 <= horizon <= h_max:
        raise ValueError(f"horizon must be in 1..{h_max}, got {horizon}")
    by_horizon: dict[str, list[float]] = {"ic": [], "ic_t": [], "rank_ic": [], "rank_ic_t": []}
    series: dict[str, np.ndarray] = {}
    out: dict = {}
    for h in range(1, h_max + 1):
        ic, rank_ic = per_date_ic(signal, forward[h - 1])
        floor = overlap_floor(h, stride)
        for name, values in (("ic", ic), ("rank_ic", rank_ic)):
            s = series_summary(values, floor=floor)
            by_horizon[name].append(s["mean"])
            by_horizon[f"{name}_t"].append(s["t"])
            if h == horizon:
                series[name] = values
                out.update({name: s["mean"], f"{name}_t": s["t"], f"{name}_std": s["std"], f"{name}_ir": s["ir"],
                            f"{name}_positive": s["positive"]})
                out["n_dates"] = s["n_dates"]
    groups = quantile_returns(signal, forward[horizon - 1], n_quantiles)
    spread = groups[:, -1] - groups[:, 0]
    spread_summary = series_summary(spread, floor=overlap_floor(horizon, stride))
    series["spread"] = spread
    with np.errstate(invalid="ignore"):
        quantile_means = [float(np.nanmean(groups[:, q])) if np.isfinite(groups[:, q]).any() else float("nan")
                          for q in range(n_quantiles)]
    autocorr = rank_autocorrelation(signal)
    out.update({
        "horizon": horizon, "by_horizon": by_horizon, "quantile_returns": quantile_means,
        "spread": spread_summary["mean"], "spread_t": spread_summary["t"],
        "rank_autocorr": float(np.nanmean(autocorr)) if np.isfinite(autocorr).any() else float("nan"),
        "series": {k: v.tolist() for k, v in series.items()},
    })
    return out


__all__ = ["MIN_NAMES", "overlap_floor", "per_date_ic", "quantile_groups", "quantile_returns", "rank_autocorrelation",
           "series_summary", "signal_statistics"]
