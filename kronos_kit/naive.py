"""Naive forecasts as sample paths: the evaluation's baselines and the ensemble's naive members.

Pure functions on history arrays (N, L, 6) in price units (open, high, low, close, volume, amount),
returning paths (N, S, H, 6), so every metric scores them alike and the ensemble can mix them with a
model's paths:

- :func:`persistence_paths`: the last close carried forward (one path);
- :func:`drift_paths`: Gaussian random walk on the log close with the history's drift and volatility;
- :func:`random_walk_paths`: the same without drift (zero-drift random walk, historical volatility);
- :func:`garch_paths`: zero-drift random walk whose volatility follows a GARCH(1,1) fitted on the
  history (:func:`fit_garch`), simulated forward from the last conditional variance;
- :func:`bootstrap_paths`: random walk that resamples the history's demeaned log returns in moving
  blocks (keeps fat tails and short-range volatility clustering, adds no drift).

:func:`naive_paths` draws any of them by name, in one fixed order from one ``rng``: the walk-forward
(:mod:`kronos_kit.evaluate`) and the handed-over forecast at forecast time
(:mod:`kronos_kit.calibration.handover`) build them the same way. This module sits below both.

Bars are built from the close path alone (:func:`close_path_bars`): each open is the previous close,
high / low the max / min of open and close (no intrabar range is modelled), volume and amount the
history's last values. Every draw comes from the ``rng`` passed in, so a seed fixes them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from kronos_kit.config import NAIVE_PROBABILISTIC
from kronos_kit.data.schema import FEATURE_COLUMNS
from kronos_kit.metrics import CLOSE

NAIVE_PATHS: tuple[str, ...] = ("persistence", *NAIVE_PROBABILISTIC)
"""Every naive forecast with sample paths, in the order :func:`naive_paths` draws them."""
PROBABILISTIC: tuple[str, ...] = NAIVE_PROBABILISTIC
"""The naive forecasts with a distribution (several paths): drift, random_walk, garch_rw, bootstrap."""


def persistence_paths(history: np.ndarray, pred_len: int) -> np.ndarray:
    """Last close carried forward: (N, 1, H, 6) with OHLC = last close, volume/amount = last values."""
    last = history[:, -1]
    path = np.empty((len(history), 1, pred_len, len(FEATURE_COLUMNS)))
    path[..., :4] = last[:, CLOSE, None, None, None]
    path[..., 4:] = last[:, None, None, 4:]
    return path


def drift_paths(history: np.ndarray, pred_len: int, sample_count: int, rng: np.random.Generator) -> np.ndarray:
    """Random walk with drift on the log close: (N, S, H, 6); drift = mean log return of the history,
    noise = its standard deviation (ddof 1, Gaussian, seeded)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logret = np.diff(np.log(history[:, :, CLOSE]), axis=1)
    mu, sigma = logret.mean(axis=1), logret.std(axis=1, ddof=1)
    steps = mu[:, None, None] + sigma[:, None, None] * rng.standard_normal((len(history), sample_count, pred_len))
    return close_path_bars(steps, history)


MIN_GARCH_RETURNS = 10  # below this many log returns GARCH(1,1) is not fitted (sample variance instead)


def history_log_returns(history: np.ndarray) -> np.ndarray:
    """(N, L - 1) log returns of each history's close (non-finite values, e.g. a zero close, become 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.diff(np.log(np.asarray(history, dtype=np.float64)[:, :, CLOSE]), axis=1)
    return np.where(np.isfinite(r), r, 0.0)


def close_path_bars(log_steps: np.ndarray, history: np.ndarray) -> np.ndarray:
    """Bars (N, S, H, 6) from per-step close log returns (N, S, H) starting at each history's last close."""
    last = np.asarray(history, dtype=np.float64)[:, -1]
    last_close = last[:, CLOSE]
    close = last_close[:, None, None] * np.exp(np.cumsum(log_steps, axis=-1))
    opens = np.concatenate([np.broadcast_to(last_close[:, None, None], close[..., :1].shape), close[..., :-1]], -1)
    bars = np.empty(close.shape + (len(FEATURE_COLUMNS),))
    bars[..., 0] = opens
    bars[..., 1] = np.maximum(opens, close)
    bars[..., 2] = np.minimum(opens, close)
    bars[..., 3] = close
    bars[..., 4:] = last[:, None, None, 4:]
    return bars


def random_walk_paths(history: np.ndarray, pred_len: int, sample_count: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-drift Gaussian random walk on the log close, sigma = std (ddof 1) of the history's log returns."""
    sigma = history_log_returns(history).std(axis=1, ddof=1)
    steps = sigma[:, None, None] * rng.standard_normal((len(history), sample_count, pred_len))
    return close_path_bars(steps, history)


def bootstrap_paths(history: np.ndarray, pred_len: int, sample_count: int, rng: np.random.Generator,
                    block: int | None = None) -> np.ndarray:
    """Random walk resampling each history's demeaned log returns in moving blocks of ``block`` bars.

    ``block`` defaults to round((L - 1)^(1/3)) (at least 1, at most ``pred_len``): consecutive returns
    stay together so short-range volatility clustering survives; demeaning removes the drift.
    """
    r = history_log_returns(history)
    r = r - r.mean(axis=1, keepdims=True)
    n, m = r.shape
    block = max(1, min(int(round(m ** (1 / 3))), pred_len)) if block is None else int(block)
    if not 1 <= block <= m:
        raise ValueError(f"block must be in [1, {m}] (the history's returns), got {block}")
    n_blocks = -(-pred_len // block)
    starts = rng.integers(0, m - block + 1, size=(n, sample_count, n_blocks))
    idx = (starts[..., None] + np.arange(block)).reshape(n, sample_count, -1)[..., :pred_len]
    return close_path_bars(r[np.arange(n)[:, None, None], idx], history)


@dataclass(frozen=True)
class GarchFit:
    """GARCH(1,1) on 100 x log returns: sigma2_t = omega + alpha e_{t-1}^2 + beta sigma2_{t-1} (in %^2).

    ``next_var`` is the one-step-ahead conditional variance after the last bar. A failed fit keeps
    ``alpha = beta = 0`` and ``omega = next_var`` = the sample variance (a constant-vol random walk),
    with the ``fallback`` reason.
    """

    omega: float
    alpha: float
    beta: float
    next_var: float
    fallback: str | None = None

    def variance_forecast(self, horizon: int) -> np.ndarray:
        """Expected conditional variance (in log-return units^2) for steps 1..horizon."""
        out = np.empty(horizon)
        var = self.next_var
        for h in range(horizon):
            out[h] = var
            var = self.omega + (self.alpha + self.beta) * var
        return out / 100**2


def fit_garch(close: np.ndarray) -> GarchFit:
    """Fit GARCH(1,1) with a constant mean to 100 x the log returns of ``close`` (``arch``, rescale off).

    Falls back to the sample variance (see :class:`GarchFit`) on a short or flat history, an exception,
    a convergence warning or flag, or non-finite / negative parameters; the reason is in ``fallback``.
    """
    from arch import arch_model
    from arch.utility.exceptions import ConvergenceWarning

    with np.errstate(divide="ignore", invalid="ignore"):
        logret = 100 * np.diff(np.log(np.asarray(close, dtype=np.float64)))
    logret = logret[np.isfinite(logret)]
    sample_var = float(logret.var(ddof=1)) if len(logret) > 1 else float("nan")

    def fallback(reason: str) -> GarchFit:
        return GarchFit(omega=sample_var, alpha=0.0, beta=0.0, next_var=sample_var, fallback=reason)

    if len(logret) < MIN_GARCH_RETURNS:
        return fallback("short history")
    if not logret.std() > 0:
        return fallback("flat history")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = arch_model(logret, vol="GARCH", p=1, q=1, mean="Constant", rescale=False).fit(disp="off")
    except Exception as exc:  # any fit failure falls back; the reason is counted
        return fallback(f"error: {type(exc).__name__}")
    if any(issubclass(w.category, ConvergenceWarning) for w in caught) or res.convergence_flag != 0:
        return fallback("not converged")
    p = res.params
    omega, alpha, beta = float(p["omega"]), float(p["alpha[1]"]), float(p["beta[1]"])
    resid, vol = np.asarray(res.resid), np.asarray(res.conditional_volatility)
    next_var = omega + alpha * float(resid[-1]) ** 2 + beta * float(vol[-1]) ** 2
    values = np.array([omega, alpha, beta, next_var])
    if not (np.isfinite(values).all() and (values >= 0).all()):
        return fallback("bad forecast")
    return GarchFit(omega=omega, alpha=alpha, beta=beta, next_var=next_var)


def garch_paths(fits: list[GarchFit], history: np.ndarray, pred_len: int, sample_count: int,
                rng: np.random.Generator) -> np.ndarray:
    """Zero-drift random walk with GARCH(1,1) volatility simulated forward from each origin's fit.

    Per path: e_h = sigma_h z_h (z standard normal), sigma2_{h+1} = omega + alpha e_h^2 + beta sigma2_h,
    starting at ``next_var``; the log close moves by e_h / 100 (the fit is on 100 x log returns).
    """
    if len(fits) != len(history):
        raise ValueError(f"one GARCH fit per origin is needed: {len(fits)} fits for {len(history)} origins")
    omega, alpha, beta, var = (np.array([getattr(f, k) for f in fits])[:, None]
                               for k in ("omega", "alpha", "beta", "next_var"))
    z = rng.standard_normal((len(history), sample_count, pred_len))
    var = np.broadcast_to(var, (len(history), sample_count)).copy()
    steps = np.empty_like(z)
    for h in range(pred_len):
        e = np.sqrt(var) * z[:, :, h]
        steps[:, :, h] = e / 100
        var = omega + alpha * e**2 + beta * var
    return close_path_bars(steps, history)


def naive_paths(names: tuple[str, ...] | list[str], history: np.ndarray, pred_len: int, sample_count: int,
                rng: np.random.Generator, *, fits: list[GarchFit] | None = None) -> dict[str, np.ndarray]:
    """Paths (N, S, H, 6) of each naive forecast in ``names`` from ``history`` (N, L, 6), drawn from ``rng``.

    The draws happen in :data:`NAIVE_PATHS` order whatever the order of ``names``, so one seed gives the
    same paths in the walk-forward and at forecast time. ``fits`` are the GARCH(1,1) fits per origin when
    the caller has them (else fitted here when ``garch_rw`` is asked for).
    """
    unknown = set(names) - set(NAIVE_PATHS)
    if unknown:
        raise ValueError(f"unknown naive forecasts {sorted(unknown)}; choose from {list(NAIVE_PATHS)}")
    history = np.asarray(history, dtype=np.float64)
    if "garch_rw" in names and fits is None:
        fits = [fit_garch(history[i, :, CLOSE]) for i in range(len(history))]
    out = {}
    for name in (n for n in NAIVE_PATHS if n in names):
        if name == "persistence":
            out[name] = persistence_paths(history, pred_len)
        elif name == "drift":
            out[name] = drift_paths(history, pred_len, sample_count, rng)
        elif name == "random_walk":
            out[name] = random_walk_paths(history, pred_len, sample_count, rng)
        elif name == "garch_rw":
            out[name] = garch_paths(fits, history, pred_len, sample_count, rng)
        else:
            out[name] = bootstrap_paths(history, pred_len, sample_count, rng)
    return out


__all__ = ["NAIVE_PATHS", "PROBABILISTIC", "GarchFit", "bootstrap_paths", "close_path_bars", "drift_paths", "fit_garch",
           "garch_paths", "history_log_returns", "naive_paths", "persistence_paths", "random_walk_paths"]
