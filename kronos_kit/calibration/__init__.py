"""Forecast calibration fitted on the validation split: what the kit does to sample paths before handing them over.

One module per seam, every public name re-exported here:

- :mod:`.paths`: one model's path calibration (spread, spread + center, split-conformal), chosen by held-out
  validation CRPS;
- :mod:`.ensemble`: ensembles of the model's paths with naive forecasts' paths (linear pool, quantile
  averaging), weights fitted by fair CRPS;
- :mod:`.tails`: separate factors for the ends of the 80% and 95% intervals, fitted like split-conformal ends;
- :mod:`.handover`: the handed-over forecast (the calibrated model, then the ensemble, then the tails),
  chosen and fitted by cross-fitted held-out validation scores.

Everything here is numpy on arrays of sample paths (N origins, S paths, H steps, 6 channels in price units)
and plain JSON for the run folder; nothing reads the test split.
"""

from kronos_kit.calibration.ensemble import (
    COMBINATIONS,
    MODEL,
    NO_ENSEMBLE,
    Ensemble,
    fit_ensemble,
    fit_linear_pool,
    fit_quantile_average,
    slot_counts,
)
from kronos_kit.calibration.handover import (
    IDENTITY_HANDOVER,
    TAIL_CRPS_TOLERANCE,
    Handover,
    HandoverFit,
    describe_point_forecast,
    fit_handover,
    no_change_point,
)
from kronos_kit.calibration.paths import (
    CONFORMAL_LEVELS,
    IDENTITY,
    METHODS,
    PathCalibration,
    PathCalibrationFit,
    apply_path_calibration,
    blocked_folds,
    check_prices,
    conformal_quantile,
    fit_path_calibration,
)
from kronos_kit.calibration.tails import NO_TAILS, TailCalibration, apply_tails, coverage_error, fit_tails

__all__ = ["COMBINATIONS", "CONFORMAL_LEVELS", "IDENTITY", "IDENTITY_HANDOVER", "METHODS", "MODEL", "NO_ENSEMBLE",
           "NO_TAILS", "TAIL_CRPS_TOLERANCE", "Ensemble", "Handover", "HandoverFit", "PathCalibration",
           "PathCalibrationFit", "TailCalibration", "apply_path_calibration", "apply_tails", "blocked_folds",
           "check_prices", "conformal_quantile", "describe_point_forecast", "fit_ensemble", "fit_handover",
           "fit_linear_pool", "fit_path_calibration", "fit_quantile_average", "fit_tails", "coverage_error",
           "no_change_point", "slot_counts"]
