"""Does the finetuned model trade? The universe evaluation of a panel, validation first, then test.

:func:`evaluate_universe` is notebook 03's one call. On a panel (at least ``evaluation.universe_min_symbols``
symbols sharing rebalance dates in both the validation and the test split) it runs the universe walk-forward
(:func:`~kronos_kit.evaluate.universe.universe_walk_forward`) of base and finetuned, each sampled and
path-calibrated as ``calibration.json`` says, on validation; analyses it (cross-sectional statistics of
every signal, a top-k dropout and a long-short portfolio per signal); promotes on the validation RankIC when
``evaluation.promote_on`` is ``rank_ic``; then does the same on test, compares the models with each other,
the best naive factor (chosen on validation) and the placebo, and writes ``universe.json`` and
``signals.parquet`` into the run folder. Without a cross-section it returns an evaluation that says why and
writes nothing, so a single-series run is unchanged.

``test=False`` runs the validation part alone (a sweep trial: its objective is the validation RankIC): it
never reads the test split (not even its symbols), and ``universe.json`` then holds ``validation`` only. The
validation part is the same computation either way, so a trial's numbers equal the full run's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kronos_kit.calibration import PathCalibration
from kronos_kit.config import EvalConfig
from kronos_kit.evaluate.cross_section import signal_statistics
from kronos_kit.evaluate.decisions import ValidationDecision, record_decision
from kronos_kit.evaluate.portfolio import Backtest, Costs, long_short, performance, periods_per_year, topk_dropout
from kronos_kit.evaluate.signals import NAIVE_FACTORS, PLACEBO
from kronos_kit.evaluate.universe import PanelGrid, UniverseResult, rebalance_dates, universe_walk_forward
from kronos_kit.evaluate.universe_report import universe_bottom_line
from kronos_kit.evaluate.universe_verdicts import best_naive_factor, rank_ic_promotion, universe_comparisons
from kronos_kit.evaluate.walk_forward import ForecastFn, as_predictors
from kronos_kit.runs import RunDir, atomic_write, jsonable, relative_source, save_json

if TYPE_CHECKING:
    import torch

    from kronos_kit.data import Splits
    from kronos_kit.model import Kronos, KronosTokenizer

SPLITS = ("validation", "test")
MODELS = ("base", "finetuned")


@dataclass(frozen=True)
class PortfolioRules:
    """The portfolios' rules, sized to the universe when the config leaves them open."""

    topk: int
    n_drop: int
    hold_bars: int
    n_quantiles: int
    costs: Costs

    @classmethod
    def of(cls, e: EvalConfig, n_symbols: int) -> PortfolioRules:
        """The rules for ``n_symbols`` names (the validation split's: sized before the test split is read)."""
        topk = e.topk if e.topk is not None else max(1, math.ceil(n_symbols / 5))
        n_drop = e.n_drop if e.n_drop is not None else max(1, round(topk / 10))
        costs = Costs(buy=e.buy_cost_bps * 1e-4, sell=e.sell_cost_bps * 1e-4, minimum=e.min_cost, account=e.account)
        return cls(topk, n_drop, e.hold_bars, e.n_quantiles, costs)

    def to_dict(self) -> dict[str, Any]:
        c = self.costs
        return {"topk": self.topk, "n_drop": self.n_drop, "hold_bars": self.hold_bars, "n_quantiles": self.n_quantiles,
                "buy_cost_bps": c.buy / 1e-4, "sell_cost_bps": c.sell / 1e-4, "min_cost": c.minimum,
                "account": c.account}


@dataclass
class SplitAnalysis:
    """Per signal: its cross-sectional statistics, its two books and their performance."""

    statistics: dict[str, dict[str, Any]]
    books: dict[str, dict[str, Backtest]]
    performance: dict[str, dict[str, dict[str, float]]]
    bars_per_year: float


def analyze(result: UniverseResult, rules: PortfolioRules, *, horizon: int) -> SplitAnalysis:
    """Statistics, a top-k dropout and a long-short book for every signal of ``result``, all on the same dates.

    The books trade at the open after each rebalance date and are marked until ``stride`` bars after the last
    one (or the split's end)."""
    grid, at, stride = result.grid, result.rebalance, int(result.config["stride"])
    end = min(int(at[-1]) + stride, len(grid.dates) - 1)
    bars = periods_per_year(grid.dates)
    statistics, books, perf = {}, {}, {}
    for name, scores in result.signals.items():
        statistics[name] = signal_statistics(scores, result.forward, stride=stride, n_quantiles=rules.n_quantiles,
                                             horizon=horizon)
        books[name] = {
            "topk": topk_dropout(scores, grid.open, grid.close, at, topk=rules.topk, n_drop=rules.n_drop,
                                 hold_bars=rules.hold_bars, costs=rules.costs, symbols=grid.symbols, end=end),
            "long_short": long_short(scores, grid.open, grid.close, at, n_quantiles=rules.n_quantiles,
                                     costs=rules.costs, symbols=grid.symbols, end=end),
        }
        perf[name] = {kind: performance(book, bars) for kind, book in books[name].items()}
    return SplitAnalysis(statistics, books, perf, bars)


def signal_summary(analysis: SplitAnalysis) -> pd.DataFrame:
    """One row per signal of ``analysis``: RankIC and IC at the decision horizon with their Newey-West t, the
    spread, the top-k and long-short portfolios' annual excess return after costs, information ratio, breakeven
    cost and turnover, the number of dates."""
    rows = {}
    for name, s in analysis.statistics.items():
        topk, ls = analysis.performance[name]["topk"], analysis.performance[name]["long_short"]
        rows[name] = {"rank_ic": s["rank_ic"], "rank_ic_t": s["rank_ic_t"], "ic": s["ic"], "ic_t": s["ic_t"],
                      "spread": s["spread"], "topk_excess": topk["excess_return"],
                      "topk_excess_gross": topk["excess_return_gross"], "topk_ir": topk["information_ratio"],
                      "topk_breakeven_bps": topk["breakeven_bps"], "topk_turnover": topk["turnover"],
                      "long_short": ls["excess_return"], "long_short_ir": ls["information_ratio"],
                      "n_dates": s["n_dates"]}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "signal"
    return table


@dataclass
class UniverseEvaluation:
    """What :func:`evaluate_universe` found: ``reason`` says what ran (or why nothing did); ``decision`` is the
    run's validation decision, with the promotion on RankIC when ``evaluation.promote_on`` asked for it."""

    reason: str
    decision: ValidationDecision | None = None
    results: dict[str, UniverseResult] = field(default_factory=dict)
    analyses: dict[str, SplitAnalysis] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)
    best_naive: str = ""
    bottom_line: str = ""

    @property
    def exists(self) -> bool:
        """True when a cross-section was evaluated on both splits (the data is a panel; not a validation-only part)."""
        return "test" in self.analyses

    def __bool__(self) -> bool:
        return self.exists

    @property
    def decision_signals(self) -> dict[str, str]:
        """Each model's name -> the column of the signal it decides with (e.g. ``finetuned_expected_return``)."""
        return {m: f"{m}_{self.settings['signal']}" for m in MODELS}

    def entries(self) -> dict[str, str]:
        """The names the report compares -> their signal columns: base, finetuned, then the naive factors."""
        return {**self.decision_signals, **{f: f for f in NAIVE_FACTORS}}

    def summary(self, split: str = "test") -> pd.DataFrame | str:
        """One row per signal of ``split``: RankIC and IC at the decision horizon with t, the spread, the top-k and
        long-short portfolios' annual excess return after costs, information ratio and breakeven cost."""
        if split not in self.analyses:
            return self.reason
        return signal_summary(self.analyses[split])

    def to_dict(self) -> dict[str, Any]:
        """``universe.json``: per split, every signal's statistics and portfolio performance; ``base`` and
        ``finetuned`` (their decision signal) and the naive factors also under their own names, each with
        ``rank_ic``, ``ic`` and ``n_dates`` at the decision horizon (the sweep's objective is
        ``["validation"]["finetuned"]["rank_ic"]``); the settings, comparisons and bottom line."""
        out: dict[str, Any] = {"exists": self.exists, "reason": self.reason, "splits": list(self.analyses),
                               "settings": self.settings, "bottom_line": self.bottom_line,
                               "best_naive": self.best_naive}
        for split, a in self.analyses.items():
            signals = {name: {**a.statistics[name], **a.performance[name]} for name in a.statistics}
            entries = {alias: signals[column] for alias, column in self.entries().items()}
            out[split] = {**entries, "signals": signals, "forecast_scores": self.results[split].forecast_scores,
                          "config": self.results[split].config}
        out["comparisons"] = self.comparisons.to_dict(orient="records")
        if self.decision is not None:
            out["promotion"] = self.decision.promotion.to_dict()
        return jsonable(out)

    def save(self, run_dir: str | Path) -> dict[str, Path]:
        """Write ``universe.json`` and ``signals.parquet`` (the evaluated splits' per-date signals) into the run
        folder."""
        rd = RunDir(run_dir)
        save_json(rd.universe, self.to_dict(), newline=False, allow_nan=False)
        table = pd.concat([r.signal_table() for r in self.results.values()])
        atomic_write(rd.signals, lambda tmp: table.to_parquet(tmp))
        return {"universe": rd.universe, "signals": rd.signals}


def cross_section_reason(splits: Splits, e: EvalConfig, *, lookback: int,
                         parts: Sequence[str] = SPLITS) -> str | None:
    """Why the data has no cross-section for the universe evaluation (None: it has one in every split of ``parts``,
    validation and test by default). The one rule for "is this a universe": the run and a sweep both ask it."""
    if not e.universe:
        return "the universe evaluation is switched off (evaluation.universe: false)"
    for split in parts:
        grid = PanelGrid.of(splits.val if split == "validation" else splits.test)  # only the named splits are read
        at, _ = rebalance_dates(grid, lookback=lookback, pred_len=e.pred_len, stride=e.rebalance_stride,
                                min_symbols=e.universe_min_symbols)
        if len(at) == 0:
            return (f"no cross-section: the {split} split has no rebalance date where {e.universe_min_symbols} or more "
                    f"symbols (evaluation.universe_min_symbols) share a bar with data.lookback={lookback} bars of "
                    f"history; it holds {len(grid.symbols)} symbol(s)")
    return None


def check_promote_on(splits: Splits, e: EvalConfig, *, lookback: int, parts: Sequence[str] = SPLITS) -> None:
    """Refuse ``evaluation.promote_on: rank_ic`` for data without a cross-section (ValueError naming why)."""
    if e.promote_on != "rank_ic":
        return
    reason = cross_section_reason(splits, e, lookback=lookback, parts=parts)
    if reason is not None:
        raise ValueError(f"evaluation.promote_on=rank_ic needs a panel, but {reason}. Use "
                         "evaluation.promote_on=close_crps, or data with more symbols sharing dates")


def evaluate_universe(
    splits: Splits,
    models: Mapping[str, tuple[Kronos, KronosTokenizer]],
    evaluation: EvalConfig,
    *,
    lookback: int,
    decision: ValidationDecision | None = None,
    finetuned_sources: tuple[str | Path, str | Path] | None = None,
    base_sources: tuple[str | Path, str | Path] | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    level: float = 0.05,
    n_boot: int = 2000,
    test: bool = True,
    progress: bool = True,
) -> UniverseEvaluation:
    """The universe evaluation of ``models`` (``base`` and ``finetuned`` pairs) on a panel: the notebook one-liner.

    ``decision`` is :func:`~kronos_kit.evaluate.decide_on_validation`'s: its calibration sets each model's sampling
    (temperature, top-p; else ``evaluation``'s) and path calibration; each pair samples through
    :meth:`~kronos_kit.forecast.KronosPredictor.as_forecast_fn` with ``seed`` (common random numbers for both
    models). Everything else is :func:`run_universe`, whose arguments these are (``test=False``: the validation
    part only, as a sweep trial runs it).
    """
    e = evaluation
    calibration = decision.calibration if decision is not None else None
    temperature, top_p = (calibration.temperature, calibration.top_p) if calibration else (e.temperature, e.top_p)
    predictors = as_predictors({m: models[m] for m in MODELS}, device=device, max_context=e.max_context)
    fns = {m: p.as_forecast_fn(temperature, e.top_k, top_p, seed) for m, p in predictors.items()}
    cals = {m: PathCalibration.from_dict(calibration.path_calibration(m), where="calibration.json")
            for m in MODELS if calibration is not None and m in calibration.paths}
    return run_universe(splits, fns, e, lookback=lookback, calibrations=cals,
                        sampling={"temperature": temperature, "top_p": top_p, "top_k": e.top_k}, decision=decision,
                        finetuned_sources=finetuned_sources, base_sources=base_sources, run_dir=run_dir, seed=seed,
                        level=level, n_boot=n_boot, test=test, progress=progress)


def run_universe(
    splits: Splits,
    forecasters: Mapping[str, ForecastFn],
    evaluation: EvalConfig,
    *,
    lookback: int,
    calibrations: Mapping[str, PathCalibration] | None = None,
    sampling: Mapping[str, float] | None = None,
    decision: ValidationDecision | None = None,
    finetuned_sources: tuple[str | Path, str | Path] | None = None,
    base_sources: tuple[str | Path, str | Path] | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    level: float = 0.05,
    n_boot: int = 2000,
    test: bool = True,
    progress: bool = True,
) -> UniverseEvaluation:
    """The universe evaluation of ``base`` and ``finetuned`` forecaster callables on ``splits`` (module docstring).

    Validation first: walk-forward, analysis and, with ``evaluation.promote_on: rank_ic``, the promotion
    (replacing ``decision``'s, bound to the chosen weights and written like it: pass the ``*_sources`` and
    ``run_dir``); then test, the comparisons at ``level`` (``n_boot`` bootstrap resamples) and the bottom line.
    ``test=False`` stops after validation and never reads ``splits.test`` (a sweep trial). ``calibrations`` are
    each model's path calibration; ``sampling`` is recorded in the settings. With ``run_dir`` writes
    ``universe.json`` and ``signals.parquet``. Without a cross-section returns an evaluation that says why (and
    refuses ``promote_on: rank_ic``).
    """
    e = evaluation
    parts = SPLITS if test else ("validation",)
    check_promote_on(splits, e, lookback=lookback, parts=parts)
    reason = cross_section_reason(splits, e, lookback=lookback, parts=parts)
    if reason is not None:
        return UniverseEvaluation(reason, decision)
    paths = e.universe_sample_count or e.sample_count
    walk = dict(lookback=lookback, pred_len=e.pred_len, stride=e.rebalance_stride, sample_count=paths,
                min_symbols=e.universe_min_symbols, calibrations=calibrations, seed=seed, progress=progress)
    fns = {m: forecasters[m] for m in MODELS}
    validation = universe_walk_forward(splits.val, fns, split="validation", **walk)
    rules = PortfolioRules.of(e, len(validation.grid.symbols))
    out = UniverseEvaluation("evaluated" if test else "evaluated on validation only (the test split was not read)",
                             decision, {"validation": validation},
                             {"validation": analyze(validation, rules, horizon=e.pred_len)})
    out.best_naive = best_naive_factor(out.analyses["validation"].statistics)
    out.settings = {"signal": e.signal, "horizon": e.pred_len, "stride": e.rebalance_stride, "paths": paths,
                    "min_symbols": e.universe_min_symbols, "n_symbols": len(validation.grid.symbols),
                    **dict(sampling or {}), "calibrated": bool(calibrations), "level": level,
                    "benchmark": "equal-weight universe (close to close)", **rules.to_dict()}
    if e.promote_on == "rank_ic":
        out.decision = _promote_on_rank_ic(decision, out.analyses["validation"], out.decision_signals, e,
                                           finetuned_sources, base_sources, run_dir, seed=seed, level=level)
    if test:  # validation decided everything above; the test split is read from here on
        _add_test(out, universe_walk_forward(splits.test, fns, split="test", **walk), rules, e, level=level,
                  n_boot=n_boot, seed=seed)
    if run_dir is not None:
        out.save(run_dir)
    return out


def _add_test(out: UniverseEvaluation, result: UniverseResult, rules: PortfolioRules, e: EvalConfig, *,
              level: float, n_boot: int, seed: int) -> None:
    """The test split's analysis, the comparisons with base, the best naive factor and the placebo, the bottom
    line."""
    out.results["test"] = result
    test = out.analyses["test"] = analyze(result, rules, horizon=e.pred_len)
    out.settings["n_symbols"] = len(set(out.results["validation"].grid.symbols) | set(result.grid.symbols))
    best, signal = out.best_naive, out.decision_signals
    pairs = [("finetuned", "base"), ("finetuned", best), ("finetuned", PLACEBO), ("base", best), ("base", PLACEBO)]
    named = {**signal, best: best, PLACEBO: PLACEBO}
    out.comparisons = universe_comparisons({n: test.statistics[c] for n, c in named.items()},
                                           {n: test.books[c]["topk"].excess for n, c in named.items()}, pairs=pairs,
                                           stride=e.rebalance_stride, horizon=e.pred_len,
                                           bars_per_year=test.bars_per_year, level=level, n_boot=n_boot, seed=seed)
    out.bottom_line = universe_bottom_line(out)


def _promote_on_rank_ic(decision: ValidationDecision | None, validation: SplitAnalysis, signal: Mapping[str, str],
                        e: EvalConfig, finetuned_sources: Any, base_sources: Any, run_dir: str | Path | None, *,
                        seed: int, level: float) -> ValidationDecision:
    """The run's decision with its promotion decided on the validation RankIC, bound and written like the first."""
    if decision is None or finetuned_sources is None or base_sources is None:
        raise ValueError("evaluation.promote_on: rank_ic needs the validation decision and both models' sources")
    root = Path(run_dir) if run_dir is not None else None
    promotion = rank_ic_promotion({m: validation.statistics[c] for m, c in signal.items()},
                                  finetuned_sources=tuple(relative_source(s, root) for s in finetuned_sources),
                                  base_sources=tuple(relative_source(s, root) for s in base_sources),
                                  stride=e.rebalance_stride, horizon=e.pred_len, signal=e.signal, level=level,
                                  promotion_level=e.promotion_level, seed=seed)
    return record_decision(ValidationDecision(decision.result, promotion, decision.calibration),
                           finetuned_sources=finetuned_sources, base_sources=base_sources, run_dir=run_dir)


__all__ = ["PortfolioRules", "SplitAnalysis", "UniverseEvaluation", "analyze", "check_promote_on",
           "cross_section_reason", "evaluate_universe", "run_universe", "signal_summary"]
