"""Paired verdicts: Diebold-Mariano tests with bootstrap skill intervals, the bottom line, IC significance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kronos_kit import metrics as M
from kronos_kit.evaluate.baselines import PROBABILISTIC_BASELINES
from kronos_kit.evaluate.scores import EvaluationResult
from kronos_kit.evaluate.table import ORIGIN_LOSSES
from kronos_kit.evaluate.text import fmt, fmt_p, fmt_pct

VERDICTS: tuple[str, ...] = ("better", "no detectable difference", "worse")
"""What a paired test can say at the chosen level; "not testable" when it has fewer than 3 time points, and
"identical" when the two forecasts' losses coincide (e.g. a model whose point forecast is no change against
persistence on close MAE): a test of their float rounding would mean nothing."""


def overlap_lag(result: EvaluationResult) -> int:
    """Most later origins of one symbol whose targets overlap an origin's targets (position gap < pred_len).

    Losses of origins that share target bars are correlated up to this lag at least: with stride s and
    horizon H it is ceil(H / s) - 1, Diebold-Mariano's h - 1 for h-step forecasts counted in origins.
    """
    horizon = int(result.config["pred_len"])
    most = 0
    for sym in np.unique(result.symbols):
        pos = np.sort(result.origin_pos[result.symbols == sym])
        later = np.searchsorted(pos, pos + horizon, side="left") - np.arange(1, len(pos) + 1)
        most = max(most, int(later.max()))
    return most


def comparison_lag(result: EvaluationResult, diff: np.ndarray) -> int:
    """Newey-West lag of a paired test on the loss-difference series ``diff`` (one value per time).

    The largest of: :func:`overlap_lag` (origins sharing target bars), the Newey-West (1994) rule
    :func:`~kronos_kit.metrics.newey_west_lag` and Andrews' (1991) AR(1) plug-in
    :func:`~kronos_kit.metrics.andrews_lag` on ``diff`` (losses cluster with volatility beyond the
    overlap; with persistent differences the fixed rule alone leaves the test overconfident). Capped at
    (n - 1) // 2 so the HLN correction stays defined.
    """
    return M.hac_lag(diff, floor=overlap_lag(result))


def paired_losses(result: EvaluationResult, a: str, b: str, metric: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-origin losses of ``a`` and ``b`` as two series over origin time, ready for the paired tests.

    Origins where either loss is undefined are dropped from both. Several symbols at one origin time are
    averaged into one value: they are forecast from the same market moment and their losses move
    together, so treating them as independent would overstate the evidence. One symbol: the losses as
    they are. Returns (series a, series b, origins used).
    """
    la, lb = result.origin_loss(a, metric), result.origin_loss(b, metric)
    ok = np.isfinite(la) & np.isfinite(lb)
    _, inverse = np.unique(result.origin_time[ok], return_inverse=True)
    count = np.bincount(inverse)
    return np.bincount(inverse, la[ok]) / count, np.bincount(inverse, lb[ok]) / count, int(ok.sum())


def verdict(p_value: float, mean_diff: float, level: float = 0.05) -> str:
    """"better" / "worse" when the test rejects equal loss at ``level`` (by the sign of mean(model - other)),
    "no detectable difference" otherwise, "not testable" without a p-value."""
    if not np.isfinite(p_value):
        return "not testable"
    if p_value < level:
        return "better" if mean_diff < 0 else "worse"
    return "no detectable difference"


def paired_comparisons(
    result: EvaluationResult,
    model: str = "finetuned",
    against: Sequence[str] = ("base", "persistence", "drift", "garch"),
    level: float = 0.05,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    hln: bool = True,
) -> pd.DataFrame:
    """Paired tests of ``model`` against each entry of ``against`` on the same origins, one row per metric.

    Metrics: close CRPS and close MAE (:meth:`EvaluationResult.origin_loss`) against every entry with
    sample paths; realized-vol MAE against GARCH (volatility only). Per row, on :func:`paired_losses`:

    - ``verdict`` from the Diebold-Mariano test (:func:`~kronos_kit.metrics.diebold_mariano`, HAC variance,
      HLN small-sample correction unless ``hln=False``) at ``level``, lag :func:`comparison_lag` of the
      difference series;
    - ``relative_skill`` = 1 - mean(model) / mean(other) (positive: ``model`` is better) with its
      moving-block bootstrap percentile CI at 1 - ``level`` (block = lag + 1, at least round(n^(1/3));
      ``n_boot`` resamples, ``seed``);
    - ``model_mean`` / ``other_mean`` over origins (the table's values) and ``change_pct`` of the model;
    - ``mde``: the minimum detectable effect (:func:`~kronos_kit.metrics.minimum_detectable_effect`), the
      smallest relative difference of the two mean losses the test detects at ``level`` with 80% power,
      given the observed HAC variance of the differences and the number of origin times.

    Entries missing from the result are skipped. Returns one row per comparison with columns model,
    other, metric, label, model_mean, other_mean, change_pct, relative_skill, ci_low, ci_high, ci_level,
    dm_stat, p_value, mean_diff, verdict, test, n_origins, n_periods, lag, block, mde.
    """
    if model not in result.samples:
        raise ValueError(f"no sample paths for {model!r}; evaluated: {result.names}")
    rows = []
    for other in against:
        if other == model or other not in result.kinds:
            continue
        for metric in ("close_crps", "close_ae") if other in result.samples else ("vol_ae",):
            a, b, n_used = paired_losses(result, model, other, metric)
            both_no_change = metric == "close_ae" and all(result.scores.get(n, {}).get("point_is_no_change")
                                                          for n in (model, other))
            if len(a) and (both_no_change or np.allclose(a, b, rtol=IDENTICAL_RTOL, atol=0.0)):
                rows.append(_identical(result, model, other, metric, a, n_used, level))
                continue
            la, lb = result.origin_loss(model, metric), result.origin_loss(other, metric)
            ok = np.isfinite(la) & np.isfinite(lb)
            model_mean = float(la[ok].mean()) if ok.any() else float("nan")
            other_mean = float(lb[ok].mean()) if ok.any() else float("nan")
            lag = comparison_lag(result, a - b)
            dm = M.diebold_mariano(a, b, lag=lag, hln=hln)
            block = min(max(lag + 1, int(round(len(a) ** (1 / 3)))), max(len(a), 1))
            if len(a):
                ci = M.moving_block_bootstrap_ci(a, b, block=block, n_boot=n_boot, level=1 - level, seed=seed)
                low, high = ci.low, ci.high
            else:
                low = high = float("nan")
            skill = M.relative_skill(la[ok], lb[ok]) if ok.any() else float("nan")
            mde = M.minimum_detectable_effect(a, b, lag=lag, level=level, hln=hln) if len(a) >= 3 else float("nan")
            rows.append({
                "model": model, "other": other, "metric": metric, "label": ORIGIN_LOSSES[metric],
                "model_mean": model_mean, "other_mean": other_mean, "change_pct": -100 * skill,
                "relative_skill": skill,
                "ci_low": low, "ci_high": high, "ci_level": 1 - level,
                "dm_stat": dm.statistic, "p_value": dm.p_value, "mean_diff": dm.mean_diff,
                "verdict": verdict(dm.p_value, dm.mean_diff, level), "test": dm.test,
                "n_origins": n_used, "n_periods": len(a), "lag": lag, "block": block, "mde": mde,
            })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


IDENTICAL_RTOL = 1e-9  # per-origin losses this close are the same forecast's, up to float rounding


def _identical(result: EvaluationResult, model: str, other: str, metric: str, a: np.ndarray, n_used: int,
               level: float) -> dict:
    mean = float(result.origin_loss(model, metric)[np.isfinite(result.origin_loss(model, metric))].mean())
    return {"model": model, "other": other, "metric": metric, "label": ORIGIN_LOSSES[metric], "model_mean": mean,
            "other_mean": mean, "change_pct": 0.0, "relative_skill": 0.0, "ci_low": np.nan, "ci_high": np.nan,
            "ci_level": 1 - level, "dm_stat": np.nan, "p_value": np.nan, "mean_diff": 0.0, "verdict": "identical",
            "test": "none: the losses coincide", "n_origins": n_used, "n_periods": len(a), "lag": 0, "block": 0,
            "mde": np.nan}


COMPARISON_COLUMNS = ["model", "other", "metric", "label", "model_mean", "other_mean", "change_pct",
                       "relative_skill", "ci_low", "ci_high", "ci_level", "dm_stat", "p_value", "mean_diff",
                       "verdict", "test", "n_origins", "n_periods", "lag", "block", "mde"]


UNDERPOWERED_MDE = 0.05
"""A comparison without a detectable difference is called underpowered when its origins could not detect a
5% difference in mean loss (minimum detectable effect >= 5%): a gap a user would care about could hide there."""
COVERAGE_TOLERANCE = 0.05  # the 80% interval reads as calibrated when its coverage is within 0.75..0.85


def _vs(r: pd.Series, what: str, than: str) -> str:
    """'<what> 5.2% lower than <than> (the verdict in words)' for one comparison row."""
    if r["verdict"] == "identical":
        return f"{what} the same as {than} (the two point forecasts coincide: no test)"
    size = f"{abs(r['change_pct']):.1f}% {'lower' if r['change_pct'] < 0 else 'higher'}"
    if r["verdict"] in ("better", "worse"):
        sure = f"significantly, DM {fmt_p(r['p_value'])}"
    elif r["verdict"] == "not testable":
        sure = "too few origins for a test"
    else:
        sure = f"not significant, DM {fmt_p(r['p_value'])}{_power(r)}"
    return f"{what} {size} than {than} ({sure})"


def _power(r: pd.Series) -> str:
    mde = r.get("mde", np.nan)
    if not np.isfinite(mde):
        return ""
    tag = "underpowered: " if mde >= UNDERPOWERED_MDE else ""
    return f"; {tag}these origins detect only differences of {mde:.1%} or more"


def bottom_line(
    comparisons: pd.DataFrame, *, model: str = "finetuned", base: str = "base", split: str = "test",
    coverage_80: float | None = None, handover: str | None = None,
) -> str:
    """Two sentences a user needs, built from :func:`paired_comparisons` rows (and the 80% coverage).

    First: did finetuning help against ``base`` on close CRPS and how sure (with the minimum detectable
    effect when nothing was detected, "underpowered" when it is >= :data:`UNDERPOWERED_MDE`). Second: the
    best naive probabilistic baseline (lowest mean close CRPS among
    :data:`~kronos_kit.evaluate.baselines.PROBABILISTIC_BASELINES`) on close CRPS, persistence on close
    MAE, and whether ``coverage_80`` (the model's 80% interval coverage) is within
    :data:`COVERAGE_TOLERANCE` of nominal. ``handover`` (:func:`~kronos_kit.evaluate.handover.handover_line`) is
    appended: what the run hands over and whether the model adds anything to the naive forecasts.
    """
    if comparisons.empty:
        return f"No comparison was possible: {model!r} has nothing to be compared against."
    rows = comparisons[comparisons["model"] == model]
    head_rows = rows[(rows["other"] == base) & (rows["metric"] == "close_crps")]
    if head_rows.empty:
        head = f"No {base} model was evaluated, so this run cannot say whether finetuning helped"
    else:
        r = head_rows.iloc[0]
        opening = {"better": "Finetuning helped", "worse": "Finetuning did not help",
                   "not testable": "Finetuning cannot be judged"}.get(r["verdict"], "Finetuning made no detectable "
                                                                                 "difference")
        head = _vs(r, f"{opening}: on {int(r['n_origins'])} {split} origins the {model} model's close CRPS is",
                   f"the {base} model's")
    parts = []
    crps_rows = rows[rows["other"].isin(PROBABILISTIC_BASELINES) & (rows["metric"] == "close_crps")]
    if not crps_rows.empty:
        best = crps_rows.loc[crps_rows["other_mean"].idxmin()]
        parts.append(_vs(best, "its close CRPS is", f"the best naive probabilistic baseline's ({best['other']})"))
    mae_rows = rows[(rows["other"] == "persistence") & (rows["metric"] == "close_ae")]
    if not mae_rows.empty:
        parts.append(_vs(mae_rows.iloc[0], "its close MAE is", "persistence's"))
    if coverage_80 is not None and np.isfinite(coverage_80):
        state = ("calibrated" if abs(coverage_80 - 0.8) <= COVERAGE_TOLERANCE else
                 "too narrow: the model is overconfident" if coverage_80 < 0.8 else "too wide")
        parts.append(f"its 80% interval covers {coverage_80:.2f} of the realized closes ({state})")
    tail = f" {handover}" if handover else ""
    if not parts:
        return head + "; no baseline was evaluated." + tail
    return f"{head}. Against naive forecasts, " + "; ".join(parts) + "." + tail


def verdict_lines(comparisons: pd.DataFrame) -> list[str]:
    """One markdown bullet per comparison: the verdict in bold, the means, skill with CI, DM statistic, test and
    the minimum detectable effect (the smallest relative difference these origins detect with 80% power)."""
    lines = []
    for r in comparisons.itertuples():
        level = f"{1 - r.ci_level:.0%}"
        skill = (f"relative skill {r.relative_skill:+.1%} ({r.ci_level:.0%} CI {r.ci_low:+.1%} to {r.ci_high:+.1%}, "
                 f"moving-block bootstrap, block {r.block})")
        lines.append(
            f"- {r.model} vs {r.other}, {r.label}: **{r.verdict}** at {level}. {fmt(r.model_mean)} vs "
            f"{fmt(r.other_mean)} ({r.change_pct:+.1f}%); {skill}; DM {r.dm_stat:.2f}, {fmt_p(r.p_value)} "
            f"({r.test}; {r.n_origins} origins at {r.n_periods} times); minimum detectable effect "
            f"{fmt_pct(getattr(r, 'mde', np.nan))} at 80% power."
        )
    return lines


def ic_significance(result: EvaluationResult, *, lag: int | None = None) -> pd.DataFrame:
    """IC / RankIC of every entry with sample paths beside their Newey-West t-statistics
    (:func:`~kronos_kit.metrics.ic_tstats`). ``lag`` defaults to the larger of :func:`overlap_lag` (horizon
    returns of overlapping origins share bars) and the Newey-West (1994) rule on the number of origin
    times, capped at (n - 1) // 2. |t| > 1.96 rejects "no correlation" at 5% (two-sided)."""
    if lag is None:
        n_times = len(np.unique(result.origin_time))
        lag = min(max(overlap_lag(result), M.newey_west_lag(n_times)), max((n_times - 1) // 2, 0))
    rows = {}
    for name in result.samples:
        pred, real = result.horizon_returns(name)
        t = M.ic_tstats(pred, real, result.symbols, result.origin_time, lag=lag)
        s = result.scores[name]
        if s.get("point_is_no_change"):  # no direction to correlate: undefined, not a t of rounding noise
            t = dict.fromkeys(t, np.nan)
        rows[name] = {"ic": s["ic"], "ic_t": t["ic_t"], "rank_ic": s["rank_ic"], "rank_ic_t": t["rank_ic_t"],
                      "xs_ic": s["xs_ic"], "xs_ic_t": t["xs_ic_t"], "xs_rank_ic": s["xs_rank_ic"],
                      "xs_rank_ic_t": t["xs_rank_ic_t"], "lag": lag}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


__all__ = ["COMPARISON_COLUMNS", "VERDICTS", "bottom_line", "comparison_lag", "ic_significance", "overlap_lag",
           "paired_comparisons", "paired_losses", "verdict", "verdict_lines"]
