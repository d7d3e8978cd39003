"""Honest forecast evaluation: walk-forward over the test split, baselines, token metrics, report.

The question answered: did finetuning help, against the base model and naive baselines, on held-out
data? One module per seam, every public name re-exported here:

- :mod:`.baselines`: persistence, drift, zero-drift / GARCH(1,1) / block-bootstrap random walks, GARCH volatility;
- :mod:`.table`: the one table of headline metrics (column, label, direction, how to read it);
- :mod:`.scores`: :class:`EvaluationResult`, every metric per model, the summary table;
- :mod:`.walk_forward`: :func:`walk_forward` over plain callables, :func:`evaluate_models` for Kronos pairs;
- :mod:`.tokens`: next-token accuracy and perplexity;
- :mod:`.verdicts`: paired Diebold-Mariano verdicts, the bottom line, IC significance;
- :mod:`.report`: metrics.json, metrics_table.csv, report.md, forecasts.parquet;
- :mod:`.decisions`: sampling calibration, promotion and the handed-over forecast, decided on validation (the
  files' schema is :mod:`kronos_kit.runs`');
- :mod:`.handover`: the handed-over forecast judged on test (does the model add anything to naive forecasts?).
- :mod:`.decisions`: sampling calibration and promotion, decided on validation (the files' schema is
  :mod:`kronos_kit.runs`');
- the universe layer of a panel: :mod:`.universe` (the walk-forward at every rebalance date), :mod:`.signals`
  (model signals from the sample paths, naive factors, the tidy signal table), :mod:`.cross_section` (IC and
  RankIC by date and horizon, quantile returns), :mod:`.portfolio` (top-k dropout and long-short books with
  costs, as pure functions), :mod:`.universe_verdicts` (paired tests, promotion on RankIC),
  :mod:`.universe_report` (report.md's section) and :mod:`.universe_evaluation` (:func:`evaluate_universe`,
  notebook 03's call: universe.json, signals.parquet).

Rules that keep the comparison honest:

- origins are placed mechanically (every ``stride`` bars per symbol, targets only in non-context
  rows) and every origin counts, for every model and baseline alike;
- the point forecast is the element-wise **median** of the sample paths (``point="mean"`` available);
- metric definitions live in :mod:`kronos_kit.metrics`; the report compares every headline metric,
  wins and losses alike.
"""

from kronos_kit.data.origins import forecast_origins
from kronos_kit.evaluate.baselines import (
    BASELINES,
    PROBABILISTIC_BASELINES,
    bootstrap_paths,
    drift_paths,
    fit_garch,
    garch_paths,
    garch_vol,
    persistence_paths,
    random_walk_paths,
)
from kronos_kit.evaluate.decisions import (
    TEMPERATURE_GRID,
    TOP_P_GRID,
    ValidationDecision,
    calibrate_forecasts,
    calibrate_sampling,
    decide_on_validation,
    decide_promotion,
)
from kronos_kit.evaluate.handover import handover_comparisons, handover_line, handover_section, handover_summary
from kronos_kit.evaluate.report import FORECAST_QUANTILES, compare, forecast_table, report_comparisons, write_report
from kronos_kit.evaluate.scores import HANDED_OVER, EvaluationResult, score_entry, summary_table
from kronos_kit.evaluate.table import HEADLINE, METRICS, ORIGIN_LOSSES, TABLE_COLUMNS, Metric
from kronos_kit.evaluate.tokens import TOKEN_HEADLINE, save_token_metrics, token_metrics
from kronos_kit.evaluate.universe import PanelGrid, UniverseResult, universe_walk_forward
from kronos_kit.evaluate.universe_evaluation import UniverseEvaluation, evaluate_universe
from kronos_kit.evaluate.verdicts import (
    VERDICTS,
    bottom_line,
    comparison_lag,
    ic_significance,
    overlap_lag,
    paired_comparisons,
    paired_losses,
    verdict,
    verdict_lines,
)
from kronos_kit.evaluate.walk_forward import ForecastFn, evaluate_models, walk_forward
from kronos_kit.runs import CALIBRATION_FILE, PROMOTION_FILE, Promotion, SamplingCalibration

__all__ = [
    "BASELINES", "CALIBRATION_FILE", "HANDED_OVER", "handover_comparisons", "handover_line", "handover_section",
    "handover_summary", "FORECAST_QUANTILES", "HEADLINE", "METRICS", "ORIGIN_LOSSES", "PROMOTION_FILE",
    "TABLE_COLUMNS", "TEMPERATURE_GRID", "TOKEN_HEADLINE", "TOP_P_GRID", "VERDICTS", "EvaluationResult", "ForecastFn",
    "Metric", "PanelGrid", "Promotion", "SamplingCalibration", "UniverseEvaluation", "UniverseResult",
    "ValidationDecision", "bottom_line", "calibrate_forecasts",
    "calibrate_sampling", "PROBABILISTIC_BASELINES", "bootstrap_paths", "fit_garch", "garch_paths", "random_walk_paths",
    "compare", "comparison_lag", "decide_on_validation", "decide_promotion", "drift_paths", "evaluate_models",
    "forecast_origins", "forecast_table", "garch_vol", "ic_significance", "overlap_lag", "paired_comparisons",
    "paired_losses", "persistence_paths", "report_comparisons", "save_token_metrics", "score_entry",
    "summary_table", "token_metrics", "evaluate_universe", "universe_walk_forward", "verdict", "verdict_lines",
    "walk_forward", "write_report",
]
