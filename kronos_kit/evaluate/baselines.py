"""Naive baselines every model is scored against: persistence, drift (random walk) and GARCH(1,1) volatility."""

from __future__ import annotations

import warnings

import numpy as np

from kronos_kit.data.schema import FEATURE_COLUMNS
from kronos_kit.metrics import CLOSE

BASELINES: tuple[str, ...] = ("persistence", "drift", "garch")


def persistence_paths(history: np.ndarray, pred_len: int) -> np.ndarray:
    """Last close carried forward: (N, 1, H, 6) with OHLC = last close, volume/amount = last values."""
    last = history[:, -1]
    path = np.empty((len(history), 1, pred_len, len(FEATURE_COLUMNS)))
    path[..., :4] = last[:, CLOSE, None, None, None]
    path[..., 4:] = last[:, None, None, 4:]
    return path


def drift_paths(history: np.ndarray, pred_len: int, sample_count: int, rng: np.random.Generator) -> np.ndarray:
    """Random walk with drift on the log close: (N, S, H, 6).

    Drift = mean log return of the history, noise = its standard deviation (Gaussian, seeded). Each bar's
    open is the previous close, high/low the max/min of open and close (no intrabar range is modelled),
    volume/amount the last values.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        logret = np.diff(np.log(history[:, :, CLOSE]), axis=1)
    mu = logret.mean(axis=1)
    sigma = logret.std(axis=1, ddof=1)
    eps = rng.standard_normal((len(history), sample_count, pred_len))
    steps = mu[:, None, None] + sigma[:, None, None] * eps
    last_close = history[:, -1, CLOSE]
    close = last_close[:, None, None] * np.exp(np.cumsum(steps, axis=-1))
    opens = np.concatenate([np.broadcast_to(last_close[:, None, None], close[..., :1].shape), close[..., :-1]], -1)
    path = np.empty(close.shape + (len(FEATURE_COLUMNS),))
    path[..., 0] = opens
    path[..., 1] = np.maximum(opens, close)
    path[..., 2] = np.minimum(opens, close)
    path[..., 3] = close
    path[..., 4:] = history[:, None, None, -1, 4:]
    return path


def garch_vol(close: np.ndarray, pred_len: int) -> tuple[float, str | None]:
    """Predicted realized vol (sum of squared log returns over ``pred_len``) from GARCH(1,1) on ``close``.

    Fits ``arch_model(100 * log_returns, vol="GARCH", p=1, q=1, mean="Constant")`` and sums the
    ``pred_len`` variance forecasts / 100**2. ``rescale=False`` keeps the stated 100x scaling (arch's
    advice to rescale is only a warning about conditioning). On failure (exception, convergence
    warning or flag, non-finite or negative forecast, flat or too short history) it falls back to
    ``pred_len`` x the sample variance of the log returns. Returns (vol, fallback reason or None).
    """
    from arch import arch_model
    from arch.utility.exceptions import ConvergenceWarning

    with np.errstate(divide="ignore", invalid="ignore"):
        logret = np.diff(np.log(np.asarray(close, dtype=np.float64)))
    logret = logret[np.isfinite(logret)]
    fallback = float(pred_len * logret.var(ddof=1)) if len(logret) > 1 else float("nan")
    if len(logret) < 10:
        return fallback, "short history"
    if not logret.std() > 0:
        return fallback, "flat history"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = arch_model(100 * logret, vol="GARCH", p=1, q=1, mean="Constant", rescale=False).fit(disp="off")
            var = res.forecast(horizon=pred_len, reindex=False).variance.to_numpy()[-1]
    except Exception as exc:  # any fit failure falls back; the reason is counted
        return fallback, f"error: {type(exc).__name__}"
    if any(issubclass(w.category, ConvergenceWarning) for w in caught) or res.convergence_flag != 0:
        return fallback, "not converged"
    vol = float(var.sum() / 100**2)
    if not (np.isfinite(vol) and vol >= 0):
        return fallback, "bad forecast"
    return vol, None

__all__ = ["BASELINES", "drift_paths", "garch_vol", "persistence_paths"]
