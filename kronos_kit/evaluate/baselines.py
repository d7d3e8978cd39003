"""The naive baselines every model is scored against.

Their sample paths come from :mod:`kronos_kit.naive` (shared with the ensemble of the handed-over forecast,
which mixes them with the model's paths); this module names the evaluation's set and adds ``garch``, the
GARCH(1,1) realized-volatility forecast that has no paths.
"""

from __future__ import annotations

from kronos_kit.naive import (
    NAIVE_PATHS,
    PROBABILISTIC,
    GarchFit,
    bootstrap_paths,
    close_path_bars,
    drift_paths,
    fit_garch,
    garch_paths,
    history_log_returns,
    naive_paths,
    persistence_paths,
    random_walk_paths,
)

BASELINES: tuple[str, ...] = (*NAIVE_PATHS, "garch")
"""Every baseline: the path baselines, then ``garch`` (realized-volatility forecast only)."""
PROBABILISTIC_BASELINES: tuple[str, ...] = PROBABILISTIC
"""The naive baselines with a forecast distribution (several paths): the bar a calibrated model must clear on CRPS."""


def garch_vol(close, pred_len: int) -> tuple[float, str | None]:
    """Predicted realized vol (sum of squared log returns over ``pred_len``) from GARCH(1,1) on ``close``.

    The sum of :func:`~kronos_kit.naive.fit_garch`'s ``pred_len`` expected conditional variances (arch's
    analytic forecast); on a failed fit ``pred_len`` x the sample variance of the log returns. Returns
    (vol, fallback reason or None).
    """
    fit = fit_garch(close)
    return float(fit.variance_forecast(pred_len).sum()), fit.fallback


__all__ = ["BASELINES", "PROBABILISTIC_BASELINES", "GarchFit", "bootstrap_paths", "close_path_bars", "drift_paths",
           "fit_garch", "garch_paths", "garch_vol", "history_log_returns", "naive_paths", "persistence_paths",
           "random_walk_paths"]
