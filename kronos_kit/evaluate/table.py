"""The one table of headline metrics: column, label, direction and how to read it from a score entry.

`summary_table` (the metrics table, `metrics_table.csv`), the report's sentences (`report_comparisons`)
and the "why is it missing" text all derive from :data:`METRICS`; adding a row here adds the metric
everywhere. A row's ``value(result, name, entry)`` gets the :class:`EvaluationResult`, the model name
and its :func:`score_entry` dict, and returns one number (NaN where undefined, e.g. GARCH's close
metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MetricValue = Callable[[Any, str, Mapping[str, Any]], float]
"""(EvaluationResult, model name, its score entry) -> the table's number."""


@dataclass(frozen=True)
class Metric:
    """One headline metric. ``direction``: "lower", "higher", or a nominal coverage (closer is better)."""

    column: str  # column of the metrics table and key of the report's comparisons
    label: str  # how the report names it
    direction: str | float
    value: MetricValue
    why_missing: str = ""  # appended to "has no value" in the report when the value is NaN


def close_channel(key: str, *sub: str) -> MetricValue:
    """The close channel of ``entry[key]`` (``entry[key][sub...]`` first), NaN when absent."""
    def value(result: Any, name: str, entry: Mapping[str, Any]) -> float:
        node = entry.get(key, {})
        for k in sub:
            node = node.get(k, {})
        return node.get("close", np.nan)
    return value


def entry_value(key: str, *, missing: Any = np.nan) -> MetricValue:
    """``entry[key]``, ``missing`` when absent."""
    return lambda result, name, entry: entry.get(key, missing)


_NO_INTERVAL = ": a single path has no interval"
_CONSTANT = ": correlation is undefined for constant predictions (e.g. a no-change point forecast)"
_NO_DIRECTION = ": a no-change point forecast has no direction"

METRICS: tuple[Metric, ...] = (
    Metric("close_mae", "close MAE", "lower", close_channel("mae")),
    Metric("close_rmse", "close RMSE", "lower", close_channel("rmse")),
    Metric("close_mape", "close MAPE (%)", "lower", close_channel("mape")),
    Metric("close_mase", "close MASE", "lower", close_channel("mase")),
    Metric("close_crps", "close CRPS", "lower", close_channel("crps")),
    Metric("close_wql", "close WQL", "lower", close_channel("wql")),
    Metric("coverage_50", "close 50% interval coverage", 0.5, close_channel("coverage", "0.5"), _NO_INTERVAL),
    Metric("coverage_80", "close 80% interval coverage", 0.8, close_channel("coverage", "0.8"), _NO_INTERVAL),
    Metric("coverage_95", "close 95% interval coverage", 0.95, close_channel("coverage", "0.95"), _NO_INTERVAL),
    Metric("directional_accuracy", "directional accuracy", "higher", entry_value("directional_accuracy"),
           _NO_DIRECTION),
    Metric("ic", "IC", "higher", entry_value("ic"), _CONSTANT),
    Metric("rank_ic", "RankIC", "higher", entry_value("rank_ic"), _CONSTANT),
    Metric("xs_ic", "cross-sectional IC", "higher", entry_value("xs_ic"), _CONSTANT),
    Metric("xs_rank_ic", "cross-sectional RankIC", "higher", entry_value("xs_rank_ic"), _CONSTANT),
    Metric("vol_mae", "realized-vol MAE", "lower", lambda result, name, entry: entry["vol_mae"]),
    Metric("vol_r2", "realized-vol R^2", "higher", lambda result, name, entry: entry["vol_r2"]),
)
"""The headline metrics, in table order. Columns starting ``xs_`` are compared only when a cross-section
exists; ``vol_`` columns are the only ones compared against GARCH (volatility only)."""

# counts after the metrics in the table: (column, how to read it from a score entry)
COUNT_COLUMNS: tuple[tuple[str, MetricValue], ...] = (
    ("xs_dates", entry_value("xs_dates", missing=0)),
    ("n_origins", lambda result, name, entry: entry["n_origins"]),
    ("n_samples", lambda result, name, entry: entry["n_samples"]),
)

HEADLINE: tuple[tuple[str, str, str | float], ...] = tuple((m.column, m.label, m.direction) for m in METRICS)
"""(column, label, direction) of every row of :data:`METRICS` at import (read METRICS for the live table)."""
TABLE_COLUMNS: tuple[str, ...] = tuple(m.column for m in METRICS) + tuple(c for c, _ in COUNT_COLUMNS)

# Per-origin losses the paired tests compare (EvaluationResult.origin_loss): key -> label in the report.
ORIGIN_LOSSES: dict[str, str] = {"close_crps": "close CRPS", "close_ae": "close MAE", "vol_ae": "realized-vol MAE"}

__all__ = ["COUNT_COLUMNS", "HEADLINE", "METRICS", "ORIGIN_LOSSES", "TABLE_COLUMNS", "Metric", "MetricValue",
           "close_channel", "entry_value"]
