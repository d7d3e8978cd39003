"""The sweep's one look at the test split: the best trial and trial 0 (the base config), beside the base model.

The search decides on validation only. When every trial has finished, the best trial and trial 0 are evaluated
on the test split once, on the same origins and with the same random numbers, each trial's finetuned pair as
its objective measured it and with its own look-back (fed the last bars of a common, longer history):

- close CRPS: one per-series walk-forward (`evaluate.walk_forward`, the base config's evaluation settings,
  configured sampling, no calibration) with the naive baselines, and the paired tests of the best trial
  against trial 0 and the base model;
- RankIC (a universe): one universe walk-forward on the test split's rebalance dates (`evaluate.universe`),
  each finetuned pair sampled and path-calibrated as its own `calibration.json` says (the base model as trial
  0's says), beside the naive factors; per signal the RankIC and IC with their Newey-West t, the top-k dropout
  and long-short books with costs (`evaluate.universe_evaluation.analyze`, the base config's rules), and the
  paired tests (RankIC per date, top-k excess return after costs) of the best trial against trial 0, the base
  model and the best naive factor (the one trial 0's validation chose).

Each returns a JSON-ready record, which `sweep.json` keeps (every look at test is counted), and
`holdout_lines` writes report.md's test section from it, with a sentence on selection optimism: how much of
the best trial's validation gain held on test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from optuna.trial import FrozenTrial

from kronos_kit.calibration import PathCalibration
from kronos_kit.config import KitConfig
from kronos_kit.data import load_data
from kronos_kit.evaluate.signals import NAIVE_FACTORS
from kronos_kit.evaluate.text import fmt, fmt_p, fmt_pct
from kronos_kit.evaluate.universe import PanelGrid, universe_walk_forward
from kronos_kit.evaluate.universe_evaluation import PortfolioRules, analyze, signal_summary
from kronos_kit.evaluate.universe_verdicts import comparison_text, universe_comparisons
from kronos_kit.evaluate.verdicts import paired_comparisons
from kronos_kit.evaluate.walk_forward import ForecastFn, walk_forward
from kronos_kit.runs import RunDir, SamplingCalibration, load_json, run_choice
from kronos_kit.runtime import resolve_device
from kronos_kit.sweep.folder import SweepDir
from kronos_kit.sweep.objective import RANK_IC, Objective

__all__ = ["evaluate_on_test", "evaluate_universe_on_test", "holdout_lines"]

SUMMARY_COLUMNS = ("rank_ic", "rank_ic_t", "rank_ic_p", "ic", "topk_excess", "topk_excess_gross", "topk_ir",
                   "topk_breakeven_bps", "long_short")  # the universe test table, in this order


def _own_lookback(fn: ForecastFn, lookback: int) -> ForecastFn:
    """`fn` fed the last `lookback` bars of each (longer) history: trials with different look-backs forecast
    the same origins, each with the history it was trained and validated with."""

    def forecast(histories, hist_stamps, future_stamps, pred_len, sample_count):
        cut = []
        for h in histories:
            part = h.iloc[-lookback:].reset_index(drop=True)
            part.attrs = dict(h.attrs)
            cut.append(part)
        return fn(cut, [s.iloc[-lookback:].reset_index(drop=True) for s in hist_stamps], future_stamps, pred_len,
                  sample_count)

    return forecast


def _forecaster(trial: FrozenTrial, cfg: KitConfig, model: str, *, seed: int, device: Any,
                calibrated: bool) -> tuple[ForecastFn, PathCalibration | None]:
    """A trial's `model` pair ("finetuned" or "base") at its own look-back: sampled as its `calibration.json`
    says with `calibrated` (with that model's path calibration), else with its configured sampling."""
    from kronos_kit.forecast import KronosPredictor
    from kronos_kit.model import Kronos, KronosTokenizer

    run, e = RunDir(trial.user_attrs["run_dir"]), cfg.evaluation
    choice = run_choice(run.path, cfg, model=model)
    cal = SamplingCalibration.load(run.path) if calibrated and run.calibration.is_file() else None
    temperature, top_p = (cal.temperature, cal.top_p) if cal else (e.temperature, e.top_p)
    predictor = KronosPredictor(Kronos.from_pretrained(choice.predictor_source),
                                KronosTokenizer.from_pretrained(choice.tokenizer_source), device=device,
                                max_context=e.max_context)
    path = (PathCalibration.from_dict(cal.path_calibration(model), where=str(run.calibration))
            if cal and model in cal.paths else None)
    return _own_lookback(predictor.as_forecast_fn(temperature, e.top_k, top_p, seed), cfg.data.lookback), path


def _models(sweep: SweepDir, trials: dict[str, FrozenTrial], *, calibrated: bool
            ) -> tuple[dict[str, ForecastFn], dict[str, PathCalibration], int]:
    """"best", "default" (unless it is the best) and "base" (trial 0's base pair) as forecasters, their path
    calibrations and the longest look-back among them."""
    base_cfg = sweep.base_config()
    cfgs = {name: KitConfig.from_file(Path(t.user_attrs["run_dir"]) / "config.yaml") for name, t in trials.items()}
    same = trials["best"].number == trials["default"].number  # the base config won: evaluate it once
    roles = {"best": "finetuned", **({} if same else {"default": "finetuned"})}
    device = resolve_device(base_cfg.device)
    fns, cals = {}, {}
    for name, (trial, model) in {**{n: (trials[n], m) for n, m in roles.items()},
                                 "base": (trials["default"], "base")}.items():
        cfg = cfgs["default" if name == "base" else name]
        fns[name], cal = _forecaster(trial, cfg, model, seed=base_cfg.seed, device=device, calibrated=calibrated)
        if cal is not None:
            cals[name] = cal
    return fns, cals, max(c.data.lookback for c in cfgs.values())


def evaluate_on_test(sweep: SweepDir, trials: dict[str, FrozenTrial], *, progress: bool = True) -> dict[str, Any]:
    """The "best" and "default" trials and the base model on the test split, one per-series walk-forward with the
    base config's evaluation settings; the table (also written to test_table.csv) and the paired tests of "best"
    against the others, as a record for sweep.json."""
    base_cfg = sweep.base_config()
    e = base_cfg.evaluation
    fns, _, lookback = _models(sweep, trials, calibrated=False)
    bundle = load_data(base_cfg.with_overrides({"data.lookback": lookback, "run_dir": None}))
    result = walk_forward(bundle.splits.test, fns, lookback=lookback, pred_len=e.pred_len, stride=e.stride,
                          sample_count=e.sample_count, max_origins=e.max_origins, seed=base_cfg.seed,
                          progress=progress)
    paired = paired_comparisons(result, "best", [n for n in ("default", "base") if n in fns], seed=base_cfg.seed)
    result.table.to_csv(sweep.test_table)
    return {"n_origins": result.n_origins, "lookback": lookback,
            "paired": json.loads(paired.to_json(orient="records")),
            "table": json.loads(result.table.to_json(orient="index"))}


def evaluate_universe_on_test(sweep: SweepDir, trials: dict[str, FrozenTrial], *,
                              progress: bool = True) -> dict[str, Any]:
    """The "best" and "default" trials and the base model in one universe walk-forward on the test split (module
    docstring): per signal the universe metrics (also written to test_table.csv) and the paired tests of "best"
    against trial 0, the base model and the best naive factor, as a record for sweep.json."""
    base_cfg = sweep.base_config()
    e, seed = base_cfg.evaluation, base_cfg.seed
    fns, cals, lookback = _models(sweep, trials, calibrated=True)
    bundle = load_data(base_cfg.with_overrides({"data.lookback": lookback, "run_dir": None}))
    paths = e.universe_sample_count or e.sample_count
    result = universe_walk_forward(bundle.splits.test, fns, lookback=lookback, pred_len=e.pred_len,
                                   stride=e.rebalance_stride, sample_count=paths, min_symbols=e.universe_min_symbols,
                                   calibrations=cals, seed=seed, split="test", progress=progress)
    if result is None:
        return {"reason": f"the test split has no rebalance date where {e.universe_min_symbols} symbols have "
                          f"{lookback} bars of history (the longest look-back of the two trials)"}
    rules = PortfolioRules.of(e, len(PanelGrid.of(bundle.splits.val).symbols))  # sized as the trials' validation
    analysis = analyze(result, rules, horizon=e.pred_len)
    best_naive = load_json(RunDir(trials["default"].user_attrs["run_dir"]).universe).get("best_naive", "momentum")
    signals = {**{n: f"{n}_{e.signal}" for n in fns}, **{f: f for f in NAIVE_FACTORS}}
    table = signal_summary(analysis).loc[list(signals.values())].set_axis(list(signals), axis=0)
    table.insert(2, "rank_ic_p", [math.erfc(abs(t) / math.sqrt(2)) if np.isfinite(t) else np.nan
                                  for t in table["rank_ic_t"]])  # two-sided, normal approximation of the HAC t
    table.index.name = "signal"
    table.to_csv(sweep.test_table)
    compared = [n for n in ("best", "default", "base", best_naive) if n in signals]
    comparisons = universe_comparisons({n: analysis.statistics[signals[n]] for n in compared},
                                       {n: analysis.books[signals[n]]["topk"].excess for n in compared},
                                       pairs=[("best", n) for n in compared[1:]], stride=e.rebalance_stride,
                                       horizon=e.pred_len, bars_per_year=analysis.bars_per_year, seed=seed)
    settings = {"signal": e.signal, "horizon": e.pred_len, "stride": e.rebalance_stride, "paths": paths,
                **rules.to_dict()}
    return {"n_dates": result.config["n_dates"], "n_symbols": result.config["n_symbols"], "lookback": lookback,
            "best_naive": best_naive, "settings": settings, "calibrated": sorted(cals),
            "paired": json.loads(comparisons.to_json(orient="records")),
            "table": json.loads(table[list(SUMMARY_COLUMNS)].to_json(orient="index"))}


def holdout_lines(best: FrozenTrial, default: FrozenTrial, objective: Objective, done: dict[str, Any],
                  looks: int, trials: int) -> list[str]:
    """report.md's test section from a test evaluation's record (`done`): the table, the paired tests and the
    selection-optimism sentence; `looks` counts the test evaluations of this sweep, `trials` its trials."""
    if "reason" in done:
        return [f"No test evaluation: {done['reason']}."]
    lines = (_universe_lines if objective is RANK_IC else _crps_lines)(best, default, done)
    if best.number == default.number:
        lines += ["", "The base config was the best trial: there is no selection gain to check on test."]
    else:
        lines += ["", _optimism(best, default, objective, done, trials)]
    if looks > 1:
        lines += ["", f"The test split has been looked at {looks} times in this sweep (a later --resume found a new "
                  "best): each look is listed in sweep.json; only the first is free of selection on test."]
    return lines


def _crps_lines(best: FrozenTrial, default: FrozenTrial, done: dict[str, Any]) -> list[str]:
    table = pd.DataFrame(done["table"]).T
    rows = [m for m in ("best", "default", "base") if m in table.index]
    cols = [c for c in ("close_crps", "close_mae", "coverage_80", "ic") if c in table.columns]
    lines = [f"Evaluated once on {done['n_origins']} test origins ({done['when']}): the best trial ({best.number}) "
             f"and trial 0 ({default.number}, the base config), each finetuned pair as sampled, with the base model; "
             f"naive baselines in test_table.csv.", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    return lines + [f"| {m} | " + " | ".join(fmt(table.loc[m, c]) for c in cols) + " |" for m in rows]


def _universe_lines(best: FrozenTrial, default: FrozenTrial, done: dict[str, Any]) -> list[str]:
    s, table = done["settings"], pd.DataFrame(done["table"]).T

    def number(x: Any, form: str) -> str:
        return format(x, form) if isinstance(x, (int, float)) and np.isfinite(x) else "n/a"

    def breakeven(bps: Any) -> str:
        return "none" if isinstance(bps, (int, float)) and bps <= 0 else number(bps, ".0f")  # loses before costs

    trials = (f"The best trial ({best.number}) and trial 0 (the base config), each finetuned pair"
              if best.number != default.number else "The best trial, trial 0 (the base config), its finetuned pair")
    lines = [f"Evaluated once on the test split ({done['when']}): {done['n_dates']} rebalance dates every "
             f"{s['stride']} bars x {done['n_symbols']} symbols, the {s['signal']} signal at horizon {s['horizon']} "
             f"from {s['paths']} paths. {trials} sampled and path-calibrated as its own validation decided and with "
             "its own look-back, beside the base model and the naive factors, on the same dates and random numbers. "
             f"Top-{s['topk']} dropout (n_drop {s['n_drop']}, held at least {s['hold_bars']} bars) with "
             f"{s['buy_cost_bps']:g} / {s['sell_cost_bps']:g} bp costs against the equal-weight universe; "
             "every column in test_table.csv.", "",
             "| signal | test RankIC | t | p | IC | top-k excess a year, after costs | before costs | IR | breakeven "
             "(bp) | long-short after costs |", "|---" * 10 + "|"]
    for name, r in table.iterrows():
        label = {"best": f"best (trial {best.number})", "default": "trial 0 (base config)",
                 "base": "base model (not finetuned)"}.get(name, name)
        lines.append(f"| {label} | {number(r['rank_ic'], '+.3f')} | {number(r['rank_ic_t'], '.2f')} | "
                     f"{fmt_p(r['rank_ic_p'])} | {number(r['ic'], '+.3f')} | {number(r['topk_excess'], '+.1%')} | "
                     f"{number(r['topk_excess_gross'], '+.1%')} | {number(r['topk_ir'], '.2f')} | "
                     f"{breakeven(r['topk_breakeven_bps'])} | {number(r['long_short'], '+.1%')} |")
    lines += ["", "Paired tests on test (Diebold-Mariano form, Newey-West variance; block-bootstrap interval):"]
    lines += [f"- best vs {r['other']}, {r['label']}: {comparison_text(r, percent=r['metric'] == 'topk_excess')}"
              for r in done["paired"]]
    return lines


def _paired(done: dict[str, Any], metric: str) -> dict[str, Any] | None:
    return next((r for r in done["paired"] if r["metric"] == metric and r["other"] == "default"), None)


def _optimism(best: FrozenTrial, default: FrozenTrial, objective: Objective, done: dict[str, Any],
              trials: int) -> str:
    """How much of the best trial's validation gain over trial 0 held on test."""
    val_gain = objective.change(best.value, default.value)
    if objective is RANK_IC:
        r, book = _paired(done, "rank_ic"), _paired(done, "topk_excess")
        test_gain = r["difference"]
        numbers = (f"On validation the best trial's RankIC is {best.value:+.3f} against trial 0's {default.value:+.3f} "
                   f"({val_gain:+.3f}); on test {r['model_mean']:+.3f} against {r['other_mean']:+.3f} "
                   f"({test_gain:+.3f}; {r['verdict']}, {fmt_p(r['p_value'])}; these {r['n']} dates detect only "
                   f"differences of {r['mde']:.3f} or more)")
        book_text = (f" Its top-k portfolio's excess return after costs on test is {book['model_mean']:+.1%} a year "
                     f"against trial 0's {book['other_mean']:+.1%} ({book['verdict']}, {fmt_p(book['p_value'])}).")
    else:
        r, book_text = _paired(done, "close_crps"), ""
        test_gain = -r["change_pct"] / 100.0
        numbers = (f"On validation the best trial's close CRPS is {fmt_pct(val_gain)} below trial 0's; on test it is "
                   f"{fmt_pct(test_gain)} below ({r['verdict']}, DM {fmt_p(r['p_value'])}, detectable from "
                   f"{fmt_pct(r['mde'])})")
    held = test_gain / val_gain if val_gain > 0 and np.isfinite(test_gain) else float("nan")
    share = f": {max(held, 0.0):.0%} of the validation gain held on test." if np.isfinite(held) else "."
    return (f"**Selection optimism.** {numbers}{share}{book_text} The validation gain is the best of the sweep's "
            f"{trials} trials, measured on the {'dates' if objective is RANK_IC else 'origins'} that chose it, so it "
            "overstates what the settings are worth; the test numbers are the unbiased ones.")
