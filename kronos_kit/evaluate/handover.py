"""What is handed over, judged on the test split: does the model add anything to the naive forecasts?

The run's handed-over forecast (the promoted model after its path calibration, its ensemble with naive
forecasts and the tails, all fitted on validation; :mod:`kronos_kit.calibration.handover`) is the entry
``handed_over`` of a test :class:`~kronos_kit.evaluate.scores.EvaluationResult`. This module tests it
against every naive probabilistic baseline and the model alone (Diebold-Mariano with a Newey-West variance,
minimum detectable effect: :func:`~kronos_kit.evaluate.verdicts.paired_comparisons`), says in one sentence
whether the model adds anything (:func:`handover_line`, appended to the bottom line), and writes the
report section (:func:`handover_section`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from kronos_kit.evaluate.baselines import PROBABILISTIC_BASELINES
from kronos_kit.evaluate.scores import HANDED_OVER, EvaluationResult
from kronos_kit.evaluate.text import fmt, fmt_p
from kronos_kit.evaluate.verdicts import COMPARISON_COLUMNS, _power, paired_comparisons, verdict_lines

if TYPE_CHECKING:
    from kronos_kit.runs import SamplingCalibration


def handover_comparisons(result: EvaluationResult, level: float = 0.05, *, n_boot: int = 2000,
                         seed: int = 0) -> pd.DataFrame:
    """Paired tests of the handed-over forecast against every naive probabilistic baseline and the model alone
    (the promoted model, calibrated); empty when the result has no handed-over forecast."""
    if HANDED_OVER not in result.samples:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    model = result.config["handed_over"]["model"]
    return paired_comparisons(result, HANDED_OVER, (*PROBABILISTIC_BASELINES, model), level, n_boot=n_boot, seed=seed)


def handover_line(comparisons: pd.DataFrame, handed_over: dict, coverage: dict[str, float] | None = None,
                  *, name: str = "handed_over") -> str:
    """Does the model add anything to the naive forecasts? One or two sentences from the test comparisons of the
    handed-over forecast (``name``) against the naive probabilistic baselines (:func:`paired_comparisons` rows)
    and its record ``handed_over`` (``EvaluationResult.config["handed_over"]``: model, ensemble, describe).

    The best naive forecast is the one with the lowest test close CRPS. Significantly better: "the model adds
    X% over <best>"; no detectable difference: "the model adds nothing detectable", with the minimum detectable
    effect and how much of the forecast is naive; worse: which naive forecast is better and by how much. When the
    test finds the hand-over significantly worse than the model alone (the row against ``model``), it says so.
    ``coverage`` (``coverage_80``, ``coverage_95`` of the handed-over forecast) is stated after.
    """
    rows = comparisons[(comparisons["model"] == name) & comparisons["other"].isin(PROBABILISTIC_BASELINES)
                       & (comparisons["metric"] == "close_crps")]
    model, ensemble = handed_over.get("model", "model"), handed_over.get("ensemble", {})
    weights = dict(zip(ensemble.get("members", ["model"]), ensemble.get("weights", [1.0])))
    share = weights.get("model", 1.0)
    naive = ", ".join(f"{w:.0%} {m}" for m, w in weights.items() if m != "model" and w > 0)
    what = f"What is handed over ({handed_over.get('describe', 'the model')})"
    if rows.empty:
        return f"{what}: no naive forecast was evaluated to compare it with."
    r = rows.loc[rows["other_mean"].idxmin()]
    best, size = r["other"], f"{abs(r['change_pct']):.1f}%"
    numbers = f"DM {fmt_p(r['p_value'])}{_power(r)}"
    sure = {"better": "significantly", "worse": "significantly", "not testable": "not testable"}.get(
        r["verdict"], "not significant")
    if share == 0:
        text = (f"{what}: the model adds nothing: validation gave it weight 0, so the forecast handed over is 100% "
                f"naive ({naive}); on test its close CRPS is {size} {'lower' if r['change_pct'] < 0 else 'higher'} "
                f"than {best}'s, the best naive forecast on test ({sure}, {numbers}).")
    elif r["verdict"] == "better":
        text = (f"{what}: the model adds {size} over {best}, the best naive forecast on test (close CRPS {size} lower, "
                f"significantly, {numbers}); the model's weight is {share:.0%}.")
    elif r["verdict"] == "worse":
        text = (f"{what}: {best} is better: its close CRPS is {size} lower than the handed-over forecast's "
                f"(significantly, {numbers}); the model's weight is {share:.0%}.")
    else:
        lower = "lower" if r["change_pct"] < 0 else "higher"
        parts = f"{1 - share:.0%} naive ({naive}), {share:.0%} {model}" if naive else f"100% {model}"
        text = (f"{what}: the model adds nothing detectable over {best}, the best naive forecast on test (close CRPS "
                f"{size} {lower}, {sure}, {numbers}); the forecast handed over is {parts}.")
    alone = comparisons[(comparisons["model"] == name) & (comparisons["other"] == model)
                        & (comparisons["metric"] == "close_crps")]
    if share < 1 and not alone.empty and alone.iloc[0]["verdict"] == "worse":  # test contradicts validation: say so
        a = alone.iloc[0]
        text += (f" On test the handed-over forecast's close CRPS is {abs(a['change_pct']):.1f}% higher than {model} "
                 f"alone's (significantly, DM {fmt_p(a['p_value'])}): validation's choice did not hold on test; it "
                 "stands, since nothing is chosen on test (`forecast --model-only` writes the model alone).")
    if coverage:
        text += (f" Its 80% / 95% intervals cover {coverage.get('coverage_80', float('nan')):.2f} / "
                 f"{coverage.get('coverage_95', float('nan')):.2f} of the realized closes.")
    return text


def handover_summary(result: EvaluationResult, comparisons: pd.DataFrame) -> str | None:
    """:func:`handover_line` for ``result``'s handed-over forecast with its test coverage (None without one)."""
    if HANDED_OVER not in result.samples:
        return None
    row = result.table.loc[HANDED_OVER]
    return handover_line(comparisons, result.config["handed_over"],
                         {"coverage_80": float(row["coverage_80"]), "coverage_95": float(row["coverage_95"])})


def _table(rows: Mapping[str, Mapping[str, Any]], columns: list[str], index: str) -> list[str]:
    lines = ["| " + " | ".join([index, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        lines.append("| " + " | ".join([str(name), *(fmt(row.get(c)) if not isinstance(row.get(c), str) else
                                                       row.get(c) for c in columns)]) + " |")
    return lines


HELD_OUT = ["cv_crps", "coverage_50", "coverage_80", "coverage_95", "coverage_error"]


def handover_section(result: EvaluationResult, comparisons: pd.DataFrame, sentence: str | None,
                     calibration: SamplingCalibration | None) -> list[str]:
    """report.md's section on what is handed over: the choice and its validation evidence (held out), the tails
    before / after, and the test verdicts against the naive forecasts and the model alone."""
    fit = calibration.handover if calibration is not None else {}
    if not fit and HANDED_OVER not in result.samples:
        return []
    lines = ["## What is handed over (ensemble and tails fitted on the validation split)", ""]
    if sentence:
        lines += [sentence, ""]
    if fit:
        lines += [fit.get("rule", ""), ""]
    if fit.get("candidates"):
        lines += ["Validation, held out (cross-fitted; cv_crps: fair close CRPS, the choice; nominal coverage 0.5 / "
                  "0.8 / 0.95; coverage_error: |cov80 - 0.8| + |cov95 - 0.95|, what the tails reduce):", ""]
        rows = {c["method"]: {**c, "weights": ", ".join(f"{m} {w:.3g}" for m, w in c["weights"].items() if w > 0)}
                for c in fit["candidates"]}
        lines += _table(rows, ["weights", *HELD_OUT], "combination") + [""]
        lines += ["Each member alone on the same held-out origins (the model with the path calibration of the other "
                  "half):", ""]
        lines += _table(fit.get("members", {}), HELD_OUT, "member") + [""]
    tails = fit.get("tails", {})
    if "before" in tails:
        lines += [f"Tails, held out: {tails.get('why', '')}.", ""]
        lines += _table({"before tails": tails["before"], "after tails": tails["after"]}, HELD_OUT, "tails") + [""]
    if HANDED_OVER in result.samples:
        model = result.config["handed_over"]["model"]
        cols = ["close_crps", "close_mae", "coverage_50", "coverage_80", "coverage_95"]
        rows = {name: {c: float(result.table.at[name, c]) for c in cols} for name in (model, HANDED_OVER)}
        lines += [f"Test split: {model} (calibrated) and the handed-over forecast:", ""]
        lines += _table(rows, cols, "forecast") + [""]
        if not comparisons.empty:
            lines += verdict_lines(comparisons) + [""]
    return lines


__all__ = ["handover_comparisons", "handover_line", "handover_section", "handover_summary"]
