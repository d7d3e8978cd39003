"""report.md's universe section and its bottom-line sentences, from a :class:`UniverseEvaluation`.

Only a panel has this section (``evaluation.exists``); a single-series report is unchanged. Every number is
on the test split except the validation RankIC column, which is what promotion (``promote_on: rank_ic``)
and a sweep decide on; ``universe.json`` holds both splits in full.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kronos_kit.evaluate.text import fmt, fmt_p, markdown_table
from kronos_kit.evaluate.universe_verdicts import comparison_text

if TYPE_CHECKING:
    from kronos_kit.evaluate.universe_evaluation import UniverseEvaluation


def _pct(x: float) -> str:
    return f"{x:+.1%}" if x is not None and np.isfinite(x) else "n/a"


def _ratio(x: float) -> str:
    return f"{x:.2f}" if x is not None and np.isfinite(x) else "n/a"


def _t(x: float) -> str:
    return f"t {x:.2f}" if x is not None and np.isfinite(x) else "t n/a"


def _breakeven(bps: float) -> str:
    if not np.isfinite(bps):
        return "no breakeven cost (it does not trade)"
    if bps <= 0:
        return "no breakeven cost: it loses before costs"
    return f"breakeven cost {bps:.0f} bp per side"


def _sampling(s: Mapping[str, Any]) -> str:
    if "temperature" not in s:
        return ""
    return f" (temperature {s['temperature']:g}, top-p {s['top_p']:g})"


def _row(comparisons: pd.DataFrame, model: str, other: str, metric: str) -> Mapping[str, Any]:
    hit = comparisons[(comparisons["model"] == model) & (comparisons["other"] == other)
                      & (comparisons["metric"] == metric)]
    return hit.iloc[0].to_dict()


def _brief(row: Mapping[str, Any]) -> str:
    """'better (p = 0.01)': the verdict of one comparison row in a few words."""
    return row["verdict"] if row["verdict"] == "not testable" else f"{row['verdict']} ({fmt_p(row['p_value'])})"


def universe_bottom_line(ev: UniverseEvaluation) -> str:
    """Sentences for the bottom line: does the finetuned model rank the names better than the base, does its top-k
    portfolio beat the equal-weight universe after costs and the base's, and how both compare with the best
    naive factor (chosen on validation) and the placebo; each with its paired test and what it could detect."""
    s, test, cmp = ev.settings, ev.analyses["test"], ev.comparisons
    cfg = ev.results["test"].config
    sig = ev.decision_signals
    ft, bs = test.statistics[sig["finetuned"]], test.statistics[sig["base"]]
    ft_book, bs_book = test.performance[sig["finetuned"]]["topk"], test.performance[sig["base"]]["topk"]
    head = (f"Universe ({cfg['n_symbols']} symbols, {cfg['n_dates']} test rebalance dates every {s['stride']} bars, "
            f"horizon {s['horizon']}, the {s['signal']} signal): the finetuned model ranks the names with a RankIC of "
            f"{ft['rank_ic']:+.3f} ({_t(ft['rank_ic_t'])}), the base model with {bs['rank_ic']:+.3f} "
            f"({_t(bs['rank_ic_t'])}); finetuned vs base: "
            f"{comparison_text(_row(cmp, 'finetuned', 'base', 'rank_ic'), percent=False)}.")
    if np.isfinite(ft["rank_ic_t"]) and ft["rank_ic_t"] < -1.96:
        head += (" The finetuned signal is significantly inverted: its ranking points the wrong way more often than "
                 "chance allows.")
    book = (f"Its top-{s['topk']} dropout portfolio returns {_pct(ft_book['excess_return'])} a year over the "
            f"equal-weight universe after costs ({_pct(ft_book['excess_return_gross'])} before; information ratio "
            f"{_ratio(ft_book['information_ratio'])}; {_breakeven(ft_book['breakeven_bps'])}), the base model's "
            f"{_pct(bs_book['excess_return'])}: "
            f"{comparison_text(_row(cmp, 'finetuned', 'base', 'topk_excess'), percent=True)}.")
    best = ev.best_naive
    naive, placebo = test.statistics[best], test.statistics["placebo"]

    def versus(other: str) -> str:
        return "; ".join(f"{model} {_brief(_row(cmp, model, other, 'rank_ic'))} on RankIC and "
                         f"{_brief(_row(cmp, model, other, 'topk_excess'))} on the portfolio"
                         for model in ("finetuned", "base"))

    others = (f"Against the best naive factor ({best}, chosen on validation; test RankIC {naive['rank_ic']:+.3f}, "
              f"top-k {_pct(test.performance[best]['topk']['excess_return'])} a year): {versus(best)}. Against the "
              f"placebo (test RankIC {placebo['rank_ic']:+.3f}): {versus('placebo')}.")
    return " ".join((head, book, others))


def _order(ev: UniverseEvaluation) -> dict[str, str]:
    """Rows of the tables: the compared entries (label -> signal column), then the models' other signals."""
    entries = ev.entries()
    rest = [c for c in ev.analyses["test"].statistics if c not in entries.values()]
    return {**entries, **{c: c for c in rest}}


def _signal_table(ev: UniverseEvaluation, order: Mapping[str, str]) -> pd.DataFrame:
    test, val = ev.analyses["test"].statistics, ev.analyses["validation"].statistics
    rows = {label: {"val_rank_ic": val[c]["rank_ic"], "rank_ic": test[c]["rank_ic"], "rank_ic_t": test[c]["rank_ic_t"],
                    "ic": test[c]["ic"], "ic_t": test[c]["ic_t"], "rank_icir": test[c]["rank_ic_ir"],
                    "spread_bp": test[c]["spread"] * 1e4, "spread_t": test[c]["spread_t"],
                    "rank_autocorr": test[c]["rank_autocorr"], "dates": test[c]["n_dates"]}
            for label, c in order.items()}
    return _frame(rows)


def _frame(rows: Mapping[str, Mapping[str, Any]], index: str = "signal") -> pd.DataFrame:
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = index
    return table


def _portfolio_table(ev: UniverseEvaluation, order: Mapping[str, str], kind: str) -> pd.DataFrame:
    """One row per signal: the ``kind`` book's annualized performance (percent where a share)."""
    perf = ev.analyses["test"].performance
    rows = {}
    for label, c in order.items():
        k = perf[c][kind]
        rows[label] = {"return_%": 100 * k["annual_return"], "excess_%": 100 * k["excess_return"],
                       "excess_gross_%": 100 * k["excess_return_gross"], "vol_%": 100 * k["volatility"],
                       "ir": k["information_ratio"], "ir_gross": k["information_ratio_gross"],
                       "max_dd_%": 100 * k["max_drawdown"], "turnover_%": 100 * k["turnover"],
                       "hit_rate": k["hit_rate"], "breakeven_bp": k["breakeven_bps"]}
    return _frame(rows)


def _by_horizon(ev: UniverseEvaluation, order: Mapping[str, str], name: str) -> pd.DataFrame:
    """``name`` (ic or rank_ic) of each signal at every horizon as 'value (t)'."""
    rows = {}
    for label, c in order.items():
        by = ev.analyses["test"].statistics[c]["by_horizon"]
        rows[label] = {f"h{i + 1}": f"{fmt(v)} ({fmt(t)})" for i, (v, t) in enumerate(zip(by[name], by[f"{name}_t"]))}
    return _frame(rows)


def universe_section(ev: UniverseEvaluation) -> list[str]:
    """report.md's universe section (nothing without a cross-section)."""
    if not ev.exists:
        return []
    s, order = ev.settings, _order(ev)
    cfg, test = ev.results["test"].config, ev.analyses["test"]
    dates = ev.results["test"].dates
    h = s["horizon"]
    lines = ["## Universe: does the model rank the names, and would it trade? (test split)", "",
             f"**Bottom line (universe).** {ev.bottom_line}", "",
             f"{cfg['n_symbols']} symbols, {cfg['n_dates']} rebalance dates from {dates[0]:%Y-%m-%d} to "
             f"{dates[-1]:%Y-%m-%d} (every {s['stride']} bars; {cfg['n_origins']} forecasts of {s['paths']} paths per "
             f"model, horizon {h}; validation: {ev.results['validation'].config['n_dates']} dates). Model signals come "
             f"from the sample paths{_sampling(s)}"
             f"{', path-calibrated without the center shrink' if s['calibrated'] else ''}; the decision signal is "
             f"`{s['signal']}` ({', '.join(f'{m} = `{c}`' for m, c in ev.decision_signals.items())}). Forward "
             "returns run close to close. IC and RankIC are per date, then averaged; t is a Newey-West t of the "
             "mean (lag at least the dates whose horizons overlap).", "",
             f"### Signals at horizon {h}", "", markdown_table(_signal_table(ev, order)), "",
             "### IC decay: RankIC (Newey-West t) by horizon", "", markdown_table(_by_horizon(ev, order, "rank_ic")),
             "", "IC (Pearson) by horizon:", "", markdown_table(_by_horizon(ev, ev.entries(), "ic")), "",
             f"### Quantile returns at horizon {h} (mean forward return per date, bp; group 1 = lowest signal)", "",
             markdown_table(_frame({label: {**{f"q{i + 1}": 1e4 * v for i, v in
                                               enumerate(test.statistics[c]["quantile_returns"])},
                                            "spread": 1e4 * test.statistics[c]["spread"]}
                                    for label, c in order.items()})), "",
             f"### Portfolios (annualized over {test.bars_per_year:g} bars a year; signals at a close, trades at "
             "the next open)", "",
             f"Top-{s['topk']} dropout (n_drop {s['n_drop']}, minimum hold {s['hold_bars']} bars, long only, fully "
             f"invested): return after costs; excess return over the equal-weight universe (which returned "
             f"{_pct(test.performance[order['finetuned']]['topk']['benchmark_return'])} a year) after and before "
             f"costs ({s['buy_cost_bps']:g} bp a buy, {s['sell_cost_bps']:g} bp a sell, minimum {s['min_cost']:g}); "
             "volatility; information ratio after and before costs; max drawdown of the summed excess; the share of "
             "the book replaced per rebalance; hit rate over holding periods; breakeven cost per side.", "",
             markdown_table(_portfolio_table(ev, order, "topk")), "",
             "Long-short: the top quantile group long, the bottom short, equal weights, one unit of capital a side; "
             "measured against cash, so its excess is its return.", "",
             markdown_table(_portfolio_table(ev, order, "long_short")), "",
             "### Verdicts (paired tests on the test split)", ""]
    for r in ev.comparisons.to_dict(orient="records"):
        lines.append(f"- {r['model']} vs {r['other']}, {r['label']}: "
                     f"**{comparison_text(r, percent=r['metric'] == 'topk_excess')}**.")
    scores = ev.results["test"].forecast_scores
    lines += ["", "### Forecasts in return units (pooled across symbols, so no price level dominates)", "",
              markdown_table(_frame(scores, "model")), ""]
    return lines


__all__ = ["universe_bottom_line", "universe_section"]
