"""Universe verdicts: paired tests of signals and portfolios, the best naive factor, promotion on RankIC.

A comparison pairs two signals on the same rebalance dates (per-date RankIC) or the same days (daily excess
return of their top-k portfolios after costs) and asks whether the mean difference is zero: the
Diebold-Mariano form of :func:`~kronos_kit.metrics.diebold_mariano` (Newey-West variance, HLN correction;
lag :func:`~kronos_kit.metrics.hac_lag`, at least the dates whose horizons overlap for RankIC), a
moving-block bootstrap interval of the mean difference and the minimum detectable difference at 80% power.
"Better" means a higher RankIC or excess return, significantly at the level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kronos_kit import metrics as M
from kronos_kit.config import MIN_DECISION_ORIGINS
from kronos_kit.evaluate.cross_section import overlap_floor
from kronos_kit.evaluate.decisions import one_sided_p
from kronos_kit.evaluate.text import fmt_p
from kronos_kit.evaluate.verdicts import verdict
from kronos_kit.runs import Promotion, jsonable

NAIVE_CANDIDATES = ("momentum", "reversal")  # the naive factors "the best naive factor" is chosen from
METRICS = {"rank_ic": "RankIC", "topk_excess": "top-k excess return after costs (a year)"}


def paired_difference(a: np.ndarray, b: np.ndarray, *, floor: int = 0, level: float = 0.05, n_boot: int = 2000,
                      seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """Is mean(a) - mean(b) zero? On the pairs where both are finite; means, difference, interval and minimum
    detectable difference multiplied by ``scale`` (e.g. bars a year for daily returns)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = len(a)
    row: dict[str, Any] = {"model_mean": float("nan"), "other_mean": float("nan"), "difference": float("nan"),
                           "ci_low": float("nan"), "ci_high": float("nan"), "statistic": float("nan"),
                           "p_value": float("nan"), "verdict": "not testable", "mde": float("nan"), "n": n, "lag": 0,
                           "block": 0, "ci_level": 1 - level, "test": ""}
    if n < 3:
        return row
    d = a - b
    lag = M.hac_lag(d, floor=floor)
    dm = M.diebold_mariano(-a, -b, lag=lag)  # as losses: mean_diff = mean(b - a) < 0 when a is higher
    block = min(max(lag + 1, int(round(n ** (1 / 3)))), n)
    ci = M.moving_block_mean_ci(d, block=block, n_boot=n_boot, level=1 - level, seed=seed)
    row.update(model_mean=float(a.mean()) * scale, other_mean=float(b.mean()) * scale,
               difference=float(d.mean()) * scale, ci_low=ci.low * scale, ci_high=ci.high * scale,
               statistic=-dm.statistic, p_value=dm.p_value, verdict=verdict(dm.p_value, dm.mean_diff, level),
               mde=M.minimum_detectable_difference(d, lag=lag, level=level) * scale, lag=lag, block=block,
               test=dm.test)
    return row


def best_naive_factor(validation_stats: Mapping[str, Mapping[str, Any]]) -> str:
    """The naive factor with the highest validation RankIC (momentum on a tie or when neither has one):
    chosen on validation, so the test comparison against it is not a selection on test."""
    def score(name: str) -> float:
        value = validation_stats.get(name, {}).get("rank_ic", float("nan"))
        return value if np.isfinite(value) else -np.inf

    return max(NAIVE_CANDIDATES, key=lambda n: (score(n), n == NAIVE_CANDIDATES[0]))


def universe_comparisons(statistics: Mapping[str, Mapping[str, Any]], excess: Mapping[str, np.ndarray], *,
                         pairs: Sequence[tuple[str, str]], stride: int, horizon: int, bars_per_year: float,
                         level: float = 0.05, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (pair, metric): RankIC per date (from ``statistics[name]["series"]``) and daily top-k excess
    return after costs (``excess[name]``, annualized), with :func:`paired_difference`'s columns."""
    rows = []
    for model, other in pairs:
        for metric in METRICS:
            if metric == "rank_ic":
                a, b = (np.asarray(statistics[n]["series"]["rank_ic"], dtype=np.float64) for n in (model, other))
                test = paired_difference(a, b, floor=overlap_floor(horizon, stride), level=level, n_boot=n_boot,
                                         seed=seed)
            else:
                test = paired_difference(excess[model], excess[other], level=level, n_boot=n_boot, seed=seed,
                                         scale=bars_per_year)
            rows.append({"model": model, "other": other, "metric": metric, "label": METRICS[metric], **test})
    return pd.DataFrame(rows)


def comparison_text(row: Mapping[str, Any], percent: bool) -> str:
    """'better (difference +0.031, 95% CI ..., p = 0.01; detects differences of 0.04 or more)' for one row."""
    def number(x: float) -> str:
        return "n/a" if not np.isfinite(x) else f"{x:+.1%}" if percent else f"{x:+.3f}"

    if row["verdict"] == "not testable":
        return f"not testable ({row['n']} pairs)"
    level = f"{row['ci_level']:.0%}"
    mde = "n/a" if not np.isfinite(row["mde"]) else f"{row['mde']:.1%}" if percent else f"{row['mde']:.3f}"
    return (f"{row['verdict']} (difference {number(row['difference'])}, {level} CI {number(row['ci_low'])} to "
            f"{number(row['ci_high'])}, {fmt_p(row['p_value'])}; these {row['n']} "
            f"{'days' if percent else 'dates'} detect only differences of {mde} or more)")


def rank_ic_promotion(validation_stats: Mapping[str, Mapping[str, Any]], *, finetuned_sources: tuple[str, str],
                      base_sources: tuple[str, str], stride: int, horizon: int, signal: str,
                      finetuned: str = "finetuned", base: str = "base", level: float = 0.05,
                      promotion_level: float = 0.05, seed: int = 0) -> Promotion:
    """Promote the finetuned pair when its validation RankIC (the decision signal at the decision horizon) is higher
    than the base's with evidence (the paired test's one-sided p below ``promotion_level``, as the CRPS promotion
    asks; 1: a higher mean suffices), on at least :data:`~kronos_kit.config.MIN_DECISION_ORIGINS` dates; else keep
    the base pair. The paired test is recorded as evidence. Decided on validation only, never on test."""
    test = paired_difference(validation_stats[finetuned]["series"]["rank_ic"],
                             validation_stats[base]["series"]["rank_ic"], floor=overlap_floor(horizon, stride),
                             level=level, seed=seed)
    ft, bs = test["model_mean"], test["other_mean"]
    # the test's statistic is positive when the finetuned RankIC is higher: H1 "higher" is the lower-loss side
    test["p_one_sided"] = one_sided_p(-test["statistic"], test["p_value"])
    test["promotion_level"] = promotion_level
    higher = bool(np.isfinite(ft) and np.isfinite(bs) and ft > bs)
    shown = bool(np.isfinite(test["p_one_sided"]) and test["p_one_sided"] < promotion_level) or promotion_level >= 1
    enough = test["n"] >= MIN_DECISION_ORIGINS
    promote = higher and shown and enough
    numbers = (f"validation RankIC of the {signal} signal at horizon {horizon}: {ft:+.4f} vs {bs:+.4f} "
               f"(one-sided {fmt_p(test['p_one_sided'])}, {test['n']} dates)")
    if promote:
        reason = f"Promoted {finetuned}: its {numbers} is higher than {base}'s."
    elif higher and not enough:
        reason = (f"Promoted {base}: {finetuned}'s {numbers} is higher, but {test['n']} dates are fewer than the "
                  f"{MIN_DECISION_ORIGINS} a promotion needs.")
    elif higher:
        reason = (f"Promoted {base}: {finetuned}'s {numbers} is higher, but not with evidence (one-sided p not below "
                  f"evaluation.promotion_level {promotion_level:g}).")
    else:
        reason = f"Promoted {base}: {finetuned} did not beat it on the {numbers}."
    rule = (f"evaluation.promote_on: rank_ic. Promote the finetuned tokenizer + predictor only when the mean per-date "
            f"RankIC of its {signal} signal at horizon {horizon} on the validation split's rebalance dates is higher "
            f"than the base model's (paired test, one-sided p < evaluation.promotion_level {promotion_level:g}), on "
            f"at least {MIN_DECISION_ORIGINS} dates; otherwise keep the base pair. Decided on validation only, never "
            "on test.")
    tokenizer, predictor = finetuned_sources if promote else base_sources
    return Promotion(promoted=finetuned if promote else base, tokenizer=str(tokenizer), predictor=str(predictor),
                     metric="rank_ic", evidence=jsonable({"rank_ic": test, "finetuned": finetuned, "base": base}),
                     rule=rule, reason=reason)


__all__ = ["METRICS", "NAIVE_CANDIDATES", "best_naive_factor", "comparison_text", "paired_difference",
           "rank_ic_promotion", "universe_comparisons"]
