"""What a sweep shows: the leaderboard, Optuna's figures, the best trial against trial 0 on test, report.md.

The search decides on validation only. When every trial has finished, the best trial and trial 0 (the
base config) are evaluated on the test split once (`holdout`: close CRPS per series, or a universe's
RankIC and portfolios), beside the base model and the naive baselines. `report.md` compares them on
validation and on test and says how much of the best trial's validation gain held on test: the best of N
trials on the origins that chose it is optimistic (selection optimism). It also says how well the pruner's
signal (phase 2's probe) ordered the finished trials as the objective did (`probe`).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from kronos_kit.evaluate.text import fmt
from kronos_kit.plots import SWEEP_FIGURES, save_figure
from kronos_kit.runs import atomic_write_text
from kronos_kit.sweep.folder import SweepDir, load_sweep_study
from kronos_kit.sweep.holdout import evaluate_on_test, evaluate_universe_on_test, holdout_lines
from kronos_kit.sweep.objective import RANK_IC, Objective
from kronos_kit.sweep.probe import probe_agreement, probe_lines
from kronos_kit.sweep.study import ROLE

__all__ = ["finish_sweep", "leaderboard", "leaderboard_markdown", "read_leaderboard", "write_sweep_report"]

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


def leaderboard_markdown(table: pd.DataFrame, objective: Objective, *, limit: int | None = None) -> str:
    """The leaderboard as a Markdown table (the run folder column shortened to its last two parts; the change
    against the base model as `objective` states it: a share of a CRPS, a difference of RankICs)."""
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
            return objective.format_change(v)
        if column in ("retry of", "pruned at step") and isinstance(v, float):
            return str(int(v))
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| rank | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {rank} | " + " | ".join(cell(row[c], c) for c in cols) + " |" for rank, row in shown.iterrows()]
    return "\n".join(lines)


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
        evaluate = evaluate_universe_on_test if objective is RANK_IC else evaluate_on_test
        record = evaluate(sweep, {"best": best, "default": default}, progress=progress)
        done = {**key, "objective": objective.name, "after_trials": len(_attempts(study)),
                "when": dt.datetime.now().isoformat(timespec="seconds"), **record}
        looks = [*looks, done]
        sweep.save_definition({**d, "test_evaluations": looks})
    return holdout_lines(best, default, objective, done, len(looks), len(_attempts(study)))


def write_sweep_report(sweep: SweepDir, study: optuna.Study, objective: Objective, table: pd.DataFrame,
                       test_lines: list[str], figures: list[str]) -> Path:
    """report.md: the objective and calls, the space, best vs trial 0 on validation, the test section, how the
    pruner's probe agreed with the objective, the leaderboard and the figures."""
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
                  f"- change: {objective.format_change(objective.change(best.value, default.value))} better; "
                  f"run folder {best.user_attrs.get('run_dir')}"]
    else:
        lines += ["- not available yet (trial 0 or every trial has not finished)"]
    probe = probe_lines(probe_agreement(study, objective, space.settings), objective, space.settings)
    lines += ["", "## Test split", "", *test_lines, "", "## Pruning: did the probe order the trials as the objective?",
              "", *probe, "", "## Leaderboard", "", leaderboard_markdown(table, objective, limit=20), "", "## Figures",
              ""] + [f"![{f}](figures/{f})" for f in figures]
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
    if study.metric_names != [objective.label]:  # the figures' axis names (a study made before this had none)
        study.set_metric_names([objective.label])
    table = leaderboard(study, objective, [p.name for p in sweep.space().params])
    table.to_csv(sweep.leaderboard_csv)
    atomic_write_text(sweep.leaderboard_md, leaderboard_markdown(table, objective) + "\n")
    figures = []
    if not table.empty:
        for name, plot in SWEEP_FIGURES.items():
            save_figure(plot(study), sweep.figures / name)
            figures.append(name)
    test_lines = _test_section(sweep, study, objective, progress)
    path = write_sweep_report(sweep, study, objective, table, test_lines, figures)
    print(f"[sweep] report {path}", flush=True)
    return path
