"""What a sweep shows: the leaderboard, Optuna's figures, the best trial against trial 0 on test, report.md.

The search decides on validation only. When every trial has finished, the best trial and trial 0 (the
base config) are evaluated on the test split once, in one walk-forward on the same origins and with the
same random numbers, beside the base model and the naive baselines: each trial's finetuned pair as its
objective measured it (configured sampling, no calibration), each with its own look-back. `report.md`
compares them on validation and on test and says how much of the best trial's validation gain held on
test: the best of N trials on the origins that chose it is optimistic (selection optimism).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from kronos_kit.config import KitConfig
from kronos_kit.data import load_data
from kronos_kit.evaluate.text import fmt, fmt_p, fmt_pct
from kronos_kit.evaluate.verdicts import paired_comparisons
from kronos_kit.evaluate.walk_forward import ForecastFn, walk_forward
from kronos_kit.plots import SWEEP_FIGURES, save_figure
from kronos_kit.runs import atomic_write_text, run_choice
from kronos_kit.runtime import resolve_device
from kronos_kit.sweep.folder import SweepDir, load_sweep_study
from kronos_kit.sweep.objective import Objective
from kronos_kit.sweep.study import ROLE

__all__ = ["evaluate_on_test", "finish_sweep", "leaderboard", "leaderboard_markdown", "read_leaderboard",
           "write_sweep_report"]

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}


def _attempts(study: optuna.Study) -> list[FrozenTrial]:
    """Trials, without failed attempts that were enqueued again (the retry stands for them)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials} - {None}
    return [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)]


def leaderboard(study: optuna.Study, objective: Objective, params: list[str] | None = None) -> pd.DataFrame:
    """One row per trial, best first: state, objective (finished trials only), change against the base model on
    the same validation origins, the probe's last validation close CRPS and the step a pruned trial stopped at,
    wall time, the parameters (`params`: in this order), the run folder."""
    rows = []
    trials = _attempts(study)
    names = params or list(dict.fromkeys(k for t in trials for k in t.params))
    for t in trials:
        value = t.value if t.state == TrialState.COMPLETE else None
        base = t.user_attrs.get("base_value")
        steps = sorted(t.intermediate_values)
        rows.append({
            "trial": t.number, "role": t.user_attrs.get(ROLE, "search"), "state": t.state.name.lower(),
            objective.name: value, "vs base model": objective.change(value, base)
            if value is not None and isinstance(base, (int, float)) else None,
            "promoted": t.user_attrs.get("promoted"),
            "probe val_crps": t.intermediate_values[steps[-1]] if steps else None,
            "pruned at step": t.user_attrs.get("pruned_at_step"), "seconds": t.user_attrs.get("seconds"),
            **{k: t.params.get(k) for k in names}, "retry of": t.user_attrs.get("retry_of"),
            "error": t.user_attrs.get("error"), "run": t.user_attrs.get("run_dir"),
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    sign = 1.0 if objective.direction == "minimize" else -1.0
    order = table["state"].str.upper().map(STATE_ORDER)
    value = sign * table[objective.name].astype(float)
    table = table.assign(_o=order, _v=value).sort_values(["_o", "_v", "trial"]).drop(columns=["_o", "_v"])
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.set_index("rank")


def leaderboard_markdown(table: pd.DataFrame, *, limit: int | None = None) -> str:
    """The leaderboard as a Markdown table (the run folder column shortened to its last two parts)."""
    if table.empty:
        return "(no trials yet)"
    shown = table.head(limit) if limit else table
    shown = shown.drop(columns=[c for c in ("error",) if c in shown]).copy()
    shown["run"] = shown["run"].map(lambda p: "/".join(Path(p).parts[-2:]) if isinstance(p, str) else "")
    cols = list(shown.columns)

    def cell(v: Any, column: str) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if column == "vs base model":
            return fmt_pct(v)
        if column in ("retry of", "pruned at step") and isinstance(v, float):
            return str(int(v))
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| rank | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {rank} | " + " | ".join(cell(row[c], c) for c in cols) + " |" for rank, row in shown.iterrows()]
    return "\n".join(lines)


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


def evaluate_on_test(sweep: SweepDir, trials: dict[str, FrozenTrial], *, progress: bool = True) -> dict[str, Any]:
    """The "best" and "default" trials and the base model on the test split, one walk-forward with the base
    config's evaluation settings; the table and the paired tests of "best" against the others."""
    from kronos_kit.forecast import KronosPredictor
    from kronos_kit.model import Kronos, KronosTokenizer

    base_cfg = sweep.base_config()
    e = base_cfg.evaluation
    cfgs = {name: KitConfig.from_file(Path(t.user_attrs["run_dir"]) / "config.yaml") for name, t in trials.items()}
    lookback = max(c.data.lookback for c in cfgs.values())
    device = resolve_device(base_cfg.device)
    fns: dict[str, ForecastFn] = {}
    same = trials["best"].number == trials["default"].number  # the base config won: evaluate it once
    pairs = {name: (run_choice(t.user_attrs["run_dir"], cfgs[name], model="finetuned"), cfgs[name].data.lookback)
             for name, t in trials.items() if not (same and name == "default")}
    pairs["base"] = (run_choice(trials["default"].user_attrs["run_dir"], cfgs["default"], model="base"),
                     cfgs["default"].data.lookback)
    for name, (choice, own) in pairs.items():
        predictor = KronosPredictor(Kronos.from_pretrained(choice.predictor_source),
                                    KronosTokenizer.from_pretrained(choice.tokenizer_source), device=device,
                                    max_context=e.max_context)
        fns[name] = _own_lookback(predictor.as_forecast_fn(e.temperature, e.top_k, e.top_p, base_cfg.seed), own)
    bundle = load_data(base_cfg.with_overrides({"data.lookback": lookback, "run_dir": None}))
    result = walk_forward(bundle.splits.test, fns, lookback=lookback, pred_len=e.pred_len, stride=e.stride,
                          sample_count=e.sample_count, max_origins=e.max_origins, seed=base_cfg.seed,
                          progress=progress)
    others = [n for n in ("default", "base") if n in fns and n != "best"]
    paired = paired_comparisons(result, "best", others, seed=base_cfg.seed)
    return {"table": result.table, "paired": paired, "n_origins": result.n_origins, "lookback": lookback}


def _best_and_default(study: optuna.Study) -> tuple[FrozenTrial | None, FrozenTrial | None]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    default = next((t for t in done if t.user_attrs.get(ROLE) == "default"), None)
    return (study.best_trial if done else None), default


def _test_section(sweep: SweepDir, study: optuna.Study, objective: Objective, progress: bool) -> list[str]:
    """report.md's test part: the best trial and trial 0 on test, once per pair (recorded in sweep.json)."""
    settings = sweep.space().settings
    unfinished = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    best, default = _best_and_default(study)
    if not settings.evaluate_test:
        return ["The test split was not evaluated (sweep.evaluate_test is off)."]
    if unfinished:
        return [f"The test evaluation waits until every trial has finished ({len(unfinished)} waiting or running); "
                "continue with --resume."]
    if best is None or default is None:
        return ["No test evaluation: trial 0 (the base config) or every trial failed or was pruned."]
    away = [t for t in (best, default) if not Path(t.user_attrs.get("run_dir", "")).is_dir()]
    if away:
        return [f"The test evaluation needs the run folders of trials {[t.number for t in away]}, which are on "
                f"another machine ({', '.join(str(t.user_attrs.get('host')) for t in away)}): run "
                "`python -m kronos_kit sweep --sweep-dir DIR --report` there."]
    d = sweep.definition()
    looks = d.get("test_evaluations", [])
    key = {"best": best.number, "default": default.number}
    done = next((x for x in looks if {k: x[k] for k in key} == key), None)
    if done is None:
        test = evaluate_on_test(sweep, {"best": best, "default": default}, progress=progress)
        test["table"].to_csv(sweep.test_table)
        done = {**key, "after_trials": len(_attempts(study)), "when": dt.datetime.now().isoformat(timespec="seconds"),
                "n_origins": test["n_origins"], "paired": json.loads(test["paired"].to_json(orient="records")),
                "table": json.loads(test["table"].to_json(orient="index"))}
        looks = [*looks, done]
        sweep.save_definition({**d, "test_evaluations": looks})
    return _test_lines(best, default, objective, done, len(looks))


def _test_lines(best: FrozenTrial, default: FrozenTrial, objective: Objective, done: dict[str, Any],
                looks: int) -> list[str]:
    table = pd.DataFrame(done["table"]).T
    rows = [m for m in ("best", "default", "base") if m in table.index]
    cols = [c for c in ("close_crps", "close_mae", "coverage_80", "ic") if c in table.columns]
    lines = [f"Evaluated once on {done['n_origins']} test origins ({done['when']}): the best trial ({best.number}) "
             f"and trial 0 ({default.number}, the base config), each finetuned pair as sampled, with the base model; "
             f"naive baselines in test_table.csv.", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(fmt(table.loc[m, c]) for c in cols) + " |" for m in rows]
    crps = [r for r in done["paired"] if r["metric"] == "close_crps" and r["other"] == "default"]
    if best.number == default.number:
        lines += ["", "The base config was the best trial: there is no selection gain to check on test."]
    elif crps and objective.name == "close_crps":
        r = crps[0]
        val_gain = objective.change(best.value, default.value)
        test_gain = -r["change_pct"] / 100.0
        held = test_gain / val_gain if val_gain > 0 else float("nan")
        lines += ["", f"**Selection optimism.** On validation the best trial's close CRPS is {fmt_pct(val_gain)} "
                  f"below trial 0's; on test it is {fmt_pct(test_gain)} below ({r['verdict']}, DM "
                  f"{fmt_p(r['p_value'])}, detectable from {fmt_pct(r['mde'])}): "
                  + (f"{max(held, 0.0):.0%} of the validation gain held on test. " if np.isfinite(held) else "")
                  + "The validation gain is the best of the sweep's trials, measured on the origins that chose it, so "
                  "it overstates what the settings are worth; the test number is the unbiased one."]
    if looks > 1:
        lines += ["", f"The test split has been looked at {looks} times in this sweep (a later --resume found a new "
                  "best): each look is listed in sweep.json; only the first is free of selection on test."]
    return lines


def write_sweep_report(sweep: SweepDir, study: optuna.Study, objective: Objective, table: pd.DataFrame,
                       test_lines: list[str], figures: list[str]) -> Path:
    d, space = sweep.definition(), sweep.space()
    counts = table["state"].value_counts().to_dict() if not table.empty else {}
    best, default = _best_and_default(study)
    walls = [c for c in d.get("calls", [])]
    lines = [f"# Sweep {d['study']}", "",
             f"Objective: {objective.label} ({objective.direction}), on the validation split only. Base config: "
             f"{d['config_file']}; search space: {d['space_file']}; storage: {d['storage']}.",
             f"Trials: {', '.join(f'{n} {s.lower()}' for s, n in counts.items())}. Calls: {len(walls)} "
             f"(workers: {', '.join(str(c['workers']) for c in walls)}).", "", "## Search space", ""]
    lines += [f"- {p}" for p in space.describe()]
    lines += ["", "## Best trial vs the base config (trial 0) on validation", ""]
    if best is not None and default is not None:
        lines += [f"- best: trial {best.number}, {objective.label} {fmt(best.value)}, parameters {best.params}",
                  f"- trial 0 (base config): {objective.label} {fmt(default.value)}",
                  f"- change: {fmt_pct(objective.change(best.value, default.value))} better; run folder "
                  f"{best.user_attrs.get('run_dir')}"]
    else:
        lines += ["- not available yet (trial 0 or every trial has not finished)"]
    lines += ["", "## Test split", "", *test_lines, "", "## Leaderboard", "", leaderboard_markdown(table, limit=20),
              "", "## Figures", ""] + [f"![{f}](figures/{f})" for f in figures]
    lines += ["", "Open the best trial like any run: notebooks 01-03 with `run_dir` set to its folder, `python -m "
              "kronos_kit compare <trial> <trial>`, `python -m kronos_kit forecast --run <trial> ...`."]
    atomic_write_text(sweep.report, "\n".join(lines) + "\n")
    return sweep.report


def read_leaderboard(sweep: SweepDir) -> pd.DataFrame:
    """The leaderboard the sweep last wrote (leaderboard.csv), indexed by rank."""
    return pd.read_csv(sweep.leaderboard_csv, index_col="rank")


def finish_sweep(sweep: SweepDir, *, storage: str | None = None, progress: bool = True) -> Path:
    """Leaderboard (CSV, Markdown), figures (PNG), the test evaluation when due, report.md."""
    study = load_sweep_study(sweep, storage)
    objective = sweep.objective()
    table = leaderboard(study, objective, [p.name for p in sweep.space().params])
    table.to_csv(sweep.leaderboard_csv)
    atomic_write_text(sweep.leaderboard_md, leaderboard_markdown(table) + "\n")
    figures = []
    if not table.empty:
        for name, plot in SWEEP_FIGURES.items():
            save_figure(plot(study), sweep.figures / name)
            figures.append(name)
    test_lines = _test_section(sweep, study, objective, progress)
    path = write_sweep_report(sweep, study, objective, table, test_lines, figures)
    print(f"[sweep] report {path}", flush=True)
    return path
