"""The pruner's signal: phase 2's forecast-skill probe, and how well it stands in for the objective.

Every validation of phase 2 reports the probe's validation close CRPS (`val_crps`, lower is better) to the
trial. `ProbePruner` is Optuna's median rule on it, always read as lower-is-better: Optuna's own pruners
read intermediate values in the study's direction, so a RankIC study (maximize) would stop the trials that
forecast *best*. The probe measures per-series forecast skill, which is the close-CRPS objective itself
(on fewer origins and paths) but only a proxy for a universe's RankIC: a model can forecast every series a
little better and rank the names no better. `probe_agreement` measures that on the finished trials: the
rank correlation between the probe and the objective, and, when pruning was off, which trials the median
rule would have stopped (replayed in trial order) and where their objective ranked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kronos_kit import metrics as M
from kronos_kit.sweep.space import SweepSettings

__all__ = ["ProbePruner", "probe_agreement", "probe_lines", "replay_pruning"]


class _ProbeView:
    """What the median rule reads of a study: its trials, and the probe's direction (lower is better)."""

    direction = StudyDirection.MINIMIZE

    def __init__(self, get_trials: Callable[..., list[FrozenTrial]]):
        self._get_trials = get_trials

    def get_trials(self, deepcopy: bool = False, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)


class ProbePruner(optuna.pruners.BasePruner):
    """Optuna's `MedianPruner` on the probe's `val_crps`, lower is better whatever the study's direction: stop a
    trial whose best probe value so far is above the median of the finished trials' values at the same step."""

    def __init__(self, n_startup_trials: int, n_warmup_steps: int):
        self._median = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self._median.prune(_ProbeView(study.get_trials), trial)


def replay_pruning(trials: Sequence[FrozenTrial], settings: SweepSettings) -> dict[int, int]:
    """Finished trials the median rule (`settings`' start-up trials and warm-up steps) would have stopped, trial
    number -> step, replayed in trial-number order (each trial against the earlier ones it would have let finish;
    several workers finish in about that order). Trial 0 (the base config) is never pruned, as in a sweep."""
    pruner = ProbePruner(settings.prune_startup_trials, settings.prune_warmup_steps)
    done: list[FrozenTrial] = []
    stopped: dict[int, int] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.user_attrs.get("role") != "default":
            values = t.intermediate_values
            for step in sorted(values):
                seen = SimpleNamespace(last_step=step, intermediate_values={s: values[s] for s in values if s <= step})
                if pruner.prune(_ProbeView(lambda deepcopy, states, earlier=list(done): earlier), seen):
                    stopped[t.number] = step
                    break
        if t.number not in stopped:  # a stopped trial would not have finished, so later medians leave it out
            done.append(t)
    return stopped


def probe_agreement(study: optuna.Study, objective: Any, settings: SweepSettings) -> dict[str, Any]:
    """How well the probe stood in for the objective on the finished trials: `rho`, the rank correlation of the
    probe's first-validation value (where most pruning happens) with the objective, both oriented so that +1
    means the probe orders the trials exactly as the objective does; `pruned` (trials the pruner stopped, whose
    objective is unknown); with pruning off, `would_stop` (trial -> step, `replay_pruning`) and `ranks` (each
    such trial's rank by the objective among the finished, 1 = best)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.intermediate_values]
    pruned = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))]
    out: dict[str, Any] = {"n": len(done), "rho": float("nan"), "step": None, "pruned": pruned, "would_stop": {},
                           "ranks": {}}
    if not done:
        return out
    first = min(min(t.intermediate_values) for t in done)
    at_first = [t for t in done if first in t.intermediate_values]
    sign = -1.0 if objective.direction == "minimize" else 1.0  # "higher is better" for both
    probe = np.array([-t.intermediate_values[first] for t in at_first])
    value = np.array([sign * t.value for t in at_first])
    out.update(rho=M.spearman(probe, value) if len(at_first) > 2 else float("nan"), step=first)
    if not settings.prune:
        order = sorted(done, key=lambda t: -sign * t.value)
        rank = {t.number: i + 1 for i, t in enumerate(order)}
        out["would_stop"] = replay_pruning(done, settings)
        out["ranks"] = {n: rank[n] for n in out["would_stop"]}
    return out


def probe_lines(agreement: dict[str, Any], objective: Any, settings: SweepSettings) -> list[str]:
    """report.md's pruning section from `probe_agreement`."""
    what = ("the objective itself on fewer origins and paths" if objective.name == "close_crps" else
            "a proxy for the RankIC objective: it scores each series' forecast, not the ranking across names")
    lines = [f"The pruner watches phase 2's probe (validation close CRPS at every validation), {what}."]
    if agreement["n"] > 2 and np.isfinite(agreement["rho"]):
        lines.append(f"On the {agreement['n']} finished trials, the rank correlation of the probe at step "
                     f"{agreement['step']} with the objective is {agreement['rho']:+.2f} (+1: the probe orders the "
                     "trials as the objective does; 0: no relation; negative: the other way round).")
    else:
        lines.append(f"Too few finished trials ({agreement['n']}) to say how well it agrees with the objective.")
    if settings.prune:
        stopped = agreement["pruned"]
        lines.append(f"Pruning was on: {len(stopped)} trial(s) stopped{f' ({stopped})' if stopped else ''}; their "
                     "objective is unknown. Where the correlation above is weak, sweep.prune: false (or a larger "
                     "sweep.prune_warmup_steps) lets every trial reach the objective.")
    elif agreement["would_stop"]:
        n = agreement["n"]
        stops = " and ".join(f"trial {t} at step {s} (its objective ranks {agreement['ranks'][t]} of {n})"
                             for t, s in agreement["would_stop"].items())
        best = " It would have stopped the best trial." if 1 in agreement["ranks"].values() else ""
        lines.append(f"Pruning was off. Replayed on the finished trials in trial order, the median rule (after "
                     f"{settings.prune_startup_trials} finished trials, from step {settings.prune_warmup_steps}) would "
                     f"have stopped {stops}.{best}")
    else:
        lines.append("Pruning was off. Replayed on the finished trials in trial order, the median rule would have "
                     "stopped none of them.")
    return lines
