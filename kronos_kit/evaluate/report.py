"""The run's evaluation files: metrics.json, metrics_table.csv, report.md and forecasts.parquet.

`report.md` is a sequence of sections (:data:`REPORT_SECTIONS`, functions of one :class:`ReportContext`), in
reading order: the verdict first, then the paired tests behind it, "Did finetuning help?" in the same voice
(only tested differences are called better or worse), the decisions taken on validation, the test evaluation's
tables, and the phase 1 and 2 sections. A new section is one function added to the tuple. The report compares
every headline metric (:data:`~kronos_kit.evaluate.table.METRICS`), wins and losses alike; metric definitions
live in :mod:`kronos_kit.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kronos_kit.calibration import PathCalibration
from kronos_kit.evaluate import table as table_module
from kronos_kit.evaluate.baselines import BASELINES
from kronos_kit.evaluate.handover import handover_comparisons, handover_section, handover_summary
from kronos_kit.evaluate.scores import EvaluationResult
from kronos_kit.evaluate.text import fmt, fmt_p
from kronos_kit.evaluate.text import markdown_table as _markdown_table
from kronos_kit.evaluate.tokens import TOKEN_HEADLINE
from kronos_kit.evaluate.universe_report import universe_section
from kronos_kit.evaluate.verdicts import (
    COMPARISON_COLUMNS,
    bottom_line,
    ic_significance,
    paired_comparisons,
    verdict_lines,
)
from kronos_kit.metrics import CLOSE
from kronos_kit.phase_report import phase_sections
from kronos_kit.runs import RunDir, atomic_write, atomic_write_text, jsonable, save_json

if TYPE_CHECKING:
    from kronos_kit.evaluate.universe_evaluation import UniverseEvaluation
    from kronos_kit.runs import Promotion, SamplingCalibration


def compare(value: float, other: float, direction: str | float) -> tuple[bool | None, float | None]:
    """Is ``value`` better than ``other``? (None when either is missing or they tie) and the % change.

    ``direction`` is "lower", "higher", or a nominal coverage (closer to it is better).
    """
    if not (np.isfinite(value) and np.isfinite(other)):
        return None, None
    change = (value - other) / abs(other) * 100.0 if other != 0 else None
    if isinstance(direction, float):
        a, b = abs(value - direction), abs(other - direction)
    elif direction == "lower":
        a, b = value, other
    else:
        a, b = -value, -other
    if np.isclose(a, b, rtol=1e-12, atol=1e-15):
        return None, change
    return bool(a < b), change


def _sentence(label: str, ft: str, ft_val: float, other: str, other_val: float, direction: str | float,
              why_missing: str = "") -> dict:
    """One metric of ``ft`` against ``other``, described without a verdict: most metrics have no test here, so
    the sentence says lower / higher / closer to nominal, never better or worse (``better`` stays in the row)."""
    better, change = compare(ft_val, other_val, direction)
    head = f"{ft.capitalize()} {label} {fmt(ft_val)} vs {other} {fmt(other_val)}"
    if isinstance(direction, float):
        head += f" (nominal {direction:g})"
    if not (np.isfinite(ft_val) and np.isfinite(other_val)):
        missing = ft if not np.isfinite(ft_val) else other
        text = f"{head}: not comparable ({missing} has no value{why_missing})."
    elif better is None:
        text = f"{head}: equal."
    elif isinstance(direction, float):
        gaps = f"|error| {abs(ft_val - direction):.3g} vs {abs(other_val - direction):.3g}"
        text = f"{head}: {'closer to' if better else 'further from'} nominal ({gaps})."
    elif direction == "higher":
        # correlations, R^2 and hit rates can be negative or near 0: a difference reads better than a %
        text = f"{head}: {'higher' if ft_val > other_val else 'lower'} by {abs(ft_val - other_val):.3g}."
    else:
        text = f"{head}: {_change_text(change) if change is not None else 'different'}."
    return {"metric": label, "against": other, "finetuned": ft_val, "other": other_val, "better": better,
            "change_pct": change, "sentence": text}


def _change_text(change: float) -> str:
    """`1.8% lower`, `0.02% higher`: two significant digits below 1%, so a small change never reads as 0.0%."""
    size = f"{abs(change):.2g}%" if abs(change) < 1 else f"{abs(change):.1f}%"
    return f"{size} {'lower' if change < 0 else 'higher'}"


def report_comparisons(
    result: EvaluationResult, *, finetuned: str = "finetuned", base: str = "base",
    tokens: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict]:
    """Every headline comparison of ``finetuned`` against ``base`` and persistence (GARCH too for vol).

    No selection: each headline metric is compared, wins and losses alike; the cross-sectional IC rows
    are only included when a cross-section exists (at least 3 symbols per origin time).
    """
    if finetuned not in result.table.index:
        return []
    table = result.table
    xs = bool((table["xs_dates"] > 0).any())
    out = []
    for other in (base, "persistence", "garch"):
        if other not in table.index:
            continue
        for m in table_module.METRICS:  # read at call time: a row added to the table is compared too
            if m.column.startswith("xs_") and not xs:
                continue
            if other == "garch" and not m.column.startswith("vol_"):
                continue  # GARCH forecasts volatility only
            row = _sentence(m.label, finetuned, float(table.at[finetuned, m.column]), other,
                            float(table.at[other, m.column]), m.direction, m.why_missing)
            out.append({"column": m.column, **row})
    if tokens and finetuned in tokens and base in tokens:
        for key, label, direction in TOKEN_HEADLINE:
            row = _sentence(label, finetuned, float(tokens[finetuned].get(key, np.nan)), base,
                            float(tokens[base].get(key, np.nan)), direction)
            out.append({"column": key, **row})
    return out


FORECAST_QUANTILES: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def forecast_table(result: EvaluationResult, quantiles: Sequence[float] = FORECAST_QUANTILES) -> pd.DataFrame:
    """Every origin's close forecast of every model with sample paths, one row per (model, origin, step).

    Columns: model, symbol, origin_time, step (1..pred_len), last_close (the origin bar's close),
    realized_close, close_mean, close_median, close_q<level> for each quantile. `report.md`'s numbers
    can be recomputed from it, and a backtest can read it (`forecasts.parquet` in a run directory).
    """
    n, horizon = result.n_origins, result.realized.shape[1]
    base = {"symbol": np.repeat(result.symbols, horizon), "origin_time": np.repeat(result.origin_time, horizon),
            "step": np.tile(np.arange(1, horizon + 1), n), "last_close": np.repeat(result.last_close, horizon),
            "realized_close": result.realized[..., CLOSE].reshape(-1)}
    parts = []
    for name, samples in result.samples.items():
        close = samples[..., CLOSE]  # (N, S, H)
        cols = {"close_mean": close.mean(axis=1).reshape(-1), "close_median": np.median(close, axis=1).reshape(-1)}
        for q in quantiles:
            cols[f"close_q{q:g}"] = np.quantile(close, q, axis=1).reshape(-1)
        parts.append(pd.DataFrame({"model": name, **base, **cols}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["model", *base])


def write_report(
    result: EvaluationResult,
    run_dir: str | Path,
    *,
    finetuned: str = "finetuned",
    base: str = "base",
    tokens: Mapping[str, Mapping[str, float]] | None = None,
    level: float = 0.05,
    n_boot: int = 2000,
    calibration: SamplingCalibration | None = None,
    promotion: Promotion | None = None,
    universe: UniverseEvaluation | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json`` (every number, NaN as null), ``metrics_table.csv``, ``report.md`` and
    ``forecasts.parquet`` (:func:`forecast_table`: every origin's forecast, for backtests).

    ``report.md`` is :data:`REPORT_SECTIONS` in order: the bottom line (:func:`bottom_line`) first, one line
    per paired test (:func:`paired_comparisons` at ``level``: better / no detectable difference / worse, the
    numbers and the test), "Did finetuning help?" (one sentence per headline metric against ``base``,
    persistence and GARCH, descriptive except where a paired test stands behind it), the promotion and the
    calibration when given (both decided on validation), the handed-over forecast (:func:`handover_section`), the
    universe evaluation when given (:func:`universe_section`), the test evaluation's table, IC / RankIC with
    Newey-West t-statistics, token metrics, and the phase 1 and 2 sections from the run's files. ``tokens``
    optionally maps model names to :func:`token_metrics` outputs. ``metrics.json`` holds the same verdicts.
    ``universe`` (a panel's :func:`~kronos_kit.evaluate.evaluate_universe`) adds its sentences to the bottom
    line and its section after the handover; without a cross-section it changes nothing.
    """
    rd = RunDir(run_dir)
    comparisons = report_comparisons(result, finetuned=finetuned, base=base, tokens=tokens)
    handover_rows = handover_comparisons(result, level, n_boot=n_boot, seed=int(result.config.get("seed", 0)))
    handover_text = handover_summary(result, handover_rows)  # what is handed over, and does the model add anything
    if finetuned in result.samples:
        paired = paired_comparisons(result, finetuned, (base, *BASELINES), level, n_boot=n_boot,
                                    seed=int(result.config.get("seed", 0)))
        headline = bottom_line(paired, model=finetuned, base=base, handover=handover_text,
                               coverage_80=float(result.table.at[finetuned, "coverage_80"]))
    else:
        paired = pd.DataFrame(columns=COMPARISON_COLUMNS)
        headline = f"No model named {finetuned!r} was evaluated, so this run cannot say whether finetuning helped."
    if universe is not None and universe.exists:
        headline = f"{headline} {universe.bottom_line}"
    ic_table = ic_significance(result)
    payload = {
        "config": result.config,
        "n_origins": result.n_origins,
        "n_symbols": int(len(np.unique(result.symbols))),
        "origin_time_range": [str(pd.Timestamp(result.origin_time.min())), str(pd.Timestamp(result.origin_time.max()))],
        "point_forecast": result.config["point"],
        "garch_fallbacks": result.garch_fallbacks,
        "timings_s": result.timings,
        "table": result.table.to_dict(orient="index"),
        "scores": result.scores,
        "token_metrics": tokens or {},
        "comparisons": comparisons,
        "bottom_line": headline,
        "paired_comparisons": paired.to_dict(orient="records"),
        "ic_significance": ic_table.to_dict(orient="index"),
        "promotion": promotion.to_dict() if promotion is not None else None,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "test_as_sampled_vs_calibrated": result.uncalibrated_scores().to_dict(orient="index"),
        "handover_line": handover_text,
        "handover_comparisons": handover_rows.to_dict(orient="records"),
    }
    paths = {"json": rd.metrics_json, "table": rd.metrics_table, "report": rd.report, "forecasts": rd.forecasts}
    save_json(paths["json"], jsonable(payload), newline=False, allow_nan=False)
    atomic_write_text(paths["table"], result.table.to_csv())
    atomic_write(paths["forecasts"], lambda tmp: forecast_table(result).to_parquet(tmp, index=False))
    ctx = ReportContext(result, rd, finetuned, base, tokens, level, promotion, calibration, paired, headline,
                        ic_table, comparisons, payload, handover_rows, handover_text, universe)
    atomic_write_text(paths["report"], "\n".join(line for section in REPORT_SECTIONS for line in section(ctx)))
    return paths


@dataclass
class ReportContext:
    """Everything a report section reads: the evaluation, the run folder, the decisions and the verdicts."""

    result: EvaluationResult
    rd: RunDir
    finetuned: str
    base: str
    tokens: Mapping[str, Mapping[str, float]] | None
    level: float
    promotion: Promotion | None
    calibration: SamplingCalibration | None
    paired: pd.DataFrame  # paired_comparisons of `finetuned` against the base and every baseline
    headline: str  # bottom_line: the verdict in a sentence or two
    ic_table: pd.DataFrame
    comparisons: list[dict]  # report_comparisons: every headline metric against base, persistence, GARCH
    payload: Mapping[str, Any]  # metrics.json
    handover_rows: pd.DataFrame  # handover_comparisons: the handed-over forecast against the model and the naive ones
    handover_text: str | None  # handover_summary: what is handed over, in a sentence (part of the bottom line)
    universe: UniverseEvaluation | None  # a panel's universe evaluation, or None


def verdict_section(ctx: ReportContext) -> list[str]:
    """The title and the verdict, before anything else."""
    return [f"# Report: {ctx.rd.path.name}", "", f"**Bottom line.** {ctx.headline}", "",
            "Decided on the test split, which no choice of this run looked at: the promotion and the forecast "
            "calibration below were decided on validation. The sections after the tests give the details.", ""]


def paired_section(ctx: ReportContext) -> list[str]:
    """One line per paired test (`verdict_lines`): the evidence the bottom line is made of."""
    if ctx.paired.empty:
        return []
    return [f"## The tests behind it (paired, at {ctx.level:.0%}, test split)", "",
            "Each line compares per-origin losses on the same origins: the Diebold-Mariano test with a Newey-West "
            "variance (neighbouring origins are correlated) decides better / no detectable difference / worse; "
            "relative skill is 1 - model/other (positive: the model is better) with a moving-block bootstrap "
            "interval. Origins at the same time are averaged into one value.", "",
            *verdict_lines(ctx.paired), ""]


def finetuning_section(ctx: ReportContext) -> list[str]:
    """"Did finetuning help?" in the verdict's voice: the tested metrics carry their verdicts, the others are
    described (lower / higher), never counted as wins."""
    ft, base, result = ctx.finetuned, ctx.base, ctx.result
    lines = ["## Did finetuning help?", ""]
    if ft not in result.table.index:
        return [*lines, f"No model named {ft!r} was evaluated, so there is nothing to compare.", ""]
    if base not in result.table.index:
        lines += [f"No model named {base!r} was evaluated; comparisons are against the baselines only.", ""]
    lines += [f"The answer is the bottom line above: close CRPS and close MAE are the metrics this run tests (paired, "
              f"at {ctx.level:.0%}). Every other difference below is descriptive: no test stands behind it, so it is "
              "not evidence either way, however many of them point the same way.", ""]
    tested = {(r["other"], r["metric"]): r for r in ctx.paired.to_dict(orient="records")}
    for other in dict.fromkeys(c["against"] for c in ctx.comparisons):
        lines += [f"### {ft} vs {other}", ""]
        for c in (c for c in ctx.comparisons if c["against"] == other):
            test = tested.get((other, {"close_crps": "close_crps", "close_mae": "close_ae"}.get(c["column"], "")))
            note = f" Paired test: **{test['verdict']}** ({fmt_p(test['p_value'])})." if test else ""
            lines.append(f"- {c['sentence']}{note}")
        lines.append("")
        if other in result.samples and ft in result.samples:
            lines += [_paired_crps_line(result, ft, other), ""]
    return lines


def promotion_section(ctx: ReportContext) -> list[str]:
    p = ctx.promotion
    if p is None:
        return []
    return ["## Promotion (decided on the validation split)", "", p.reason, "",
            f"Tokenizer: `{p.tokenizer}`; predictor: `{p.predictor}`. Rule: {p.rule}", ""]


def calibration_section(ctx: ReportContext) -> list[str]:
    return _calibration_lines(ctx.calibration, ctx.result) if ctx.calibration is not None else []


def handover_section_of(ctx: ReportContext) -> list[str]:
    """The handed-over forecast: what the kit gives the user, against the model alone and the naive forecasts."""
    return handover_section(ctx.result, ctx.handover_rows, ctx.handover_text, ctx.calibration)


def universe_section_of(ctx: ReportContext) -> list[str]:
    """A panel's ranking and portfolio evaluation (nothing without a cross-section)."""
    return universe_section(ctx.universe) if ctx.universe is not None else []


def evaluation_section(ctx: ReportContext) -> list[str]:
    """How the test evaluation ran, and the headline table of every model and baseline."""
    result, cfg, payload = ctx.result, ctx.result.config, ctx.payload
    return [
        "## The test evaluation", "",
        f"Walk-forward on the test split: {result.n_origins} origins over {payload['n_symbols']} symbol(s) "
        f"({payload['origin_time_range'][0]} to {payload['origin_time_range'][1]}), lookback {cfg['lookback']}, "
        f"horizon {cfg['pred_len']}, stride {cfg['stride']}, {cfg['sample_count']} sample paths. Every origin "
        f"counts and every model and baseline is scored on the same origins. Point metrics use the "
        f"{cfg['point']} of the sample paths; MASE uses the seasonal-naive error (m={cfg['season']}) of each "
        "history window; WQL averages 2*pinball/sum|y| over q=0.1..0.9.", "",
        "### Headline metrics", "", _markdown_table(result.table), ""]


def ic_section(ctx: ReportContext) -> list[str]:
    """IC significance (undefined for a no-change point forecast) and GARCH fallbacks."""
    lines: list[str] = []
    if len(ctx.ic_table):
        lines += ["### IC significance (Newey-West t)", "",
                  "t = IC / its Newey-West standard error (time series: the slope of within-symbol z-scored "
                  "realized on predicted returns; cross-sectional: the mean of the per-date ICs); |t| > 1.96 "
                  f"rejects 'no correlation' at 5% (lag {int(ctx.ic_table['lag'].iloc[0])}). A point forecast of no "
                  "change has no IC (n/a).", "", _markdown_table(ctx.ic_table.drop(columns="lag")), ""]
    fb = ctx.result.garch_fallbacks
    if fb:
        reasons = ", ".join(f"{k}: {v}" for k, v in fb.items() if k != "total") or "none"
        lines += [f"GARCH(1,1) fell back to the sample variance on {fb['total']} of {ctx.result.n_origins} origins "
                  f"({reasons}).", ""]
    return lines


def token_section(ctx: ReportContext) -> list[str]:
    if not ctx.tokens:
        return []
    keys = [k for k, _, _ in TOKEN_HEADLINE]
    table = pd.DataFrame.from_dict({n: {k: t.get(k) for k in keys + ["n_tokens"]} for n, t in ctx.tokens.items()},
                                   orient="index")
    table.index.name = "model"
    return ["### Token-level metrics (test windows, causal path)", "", _markdown_table(table), ""]


def phase_section(ctx: ReportContext) -> list[str]:
    """Phase 1 (the gate, reconstruction, codebook) and phase 2 (best step vs base), from the run's files."""
    return phase_sections(ctx.rd.path)


Section = Callable[[ReportContext], list[str]]
REPORT_SECTIONS: tuple[Section, ...] = (verdict_section, paired_section, finetuning_section, promotion_section,
                                        calibration_section, handover_section_of, universe_section_of,
                                        evaluation_section, ic_section, token_section, phase_section)
"""report.md's sections in reading order (read at write time: a section added here is written)."""


def _calibration_lines(cal: SamplingCalibration, result: EvaluationResult) -> list[str]:
    """The calibration fitted on validation (sampling, then each model's path calibration) and what it did on test."""
    lines = ["## Forecast calibration (fitted on the validation split)", "", cal.rule, "",
             f"Validation, {cal.model} (before: as sampled at the configured setting; after: calibrated, in-sample on "
             f"{cal.n_origins} origins); nominal coverage 0.5 / 0.8 / 0.95:", "", _markdown_table(cal.table()), ""]
    for name in cal.paths:
        if not cal.paths[name].get("candidates"):
            continue  # nothing was fitted (too few validation origins or paths): the rule says so
        candidates = pd.DataFrame(cal.paths[name]["candidates"]).set_index("method")
        candidates = candidates.drop(columns="describe", errors="ignore")
        lines += [f"Path calibration candidates for {name} (cv_crps: held-out validation fair CRPS, the choice; the "
                  f"others in-sample). Chosen: {PathCalibration.from_dict(cal.path_calibration(name)).describe()}.",
                  "",
                  _markdown_table(candidates), ""]
    if result.uncalibrated:
        lines += ["On the test split, as sampled vs calibrated (the calibration saw no test data):", "",
                  _markdown_table(result.uncalibrated_scores()), ""]
    return lines


def _paired_crps_line(result: EvaluationResult, a: str, b: str) -> str:
    # per-origin view of the CRPS gap, so a mean difference driven by a few origins is visible
    ca, cb = result.origin_loss(a, "close_crps"), result.origin_loss(b, "close_crps")
    share = float(np.mean(ca < cb)) * 100
    ties = float(np.mean(ca == cb)) * 100
    return (f"Per origin, {a} has the lower close CRPS than {b} on {share:.1f}% of the {result.n_origins} origins "
            f"(ties {ties:.1f}%). Origins overlap when stride < horizon, so they are not independent.")


__all__ = ["FORECAST_QUANTILES", "REPORT_SECTIONS", "ReportContext", "compare", "forecast_table", "report_comparisons",
           "write_report"]
