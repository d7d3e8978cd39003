"""What a sweep trial returns: one validation number read from the trial's run folder (the one seam).

- `CLOSE_CRPS` (minimize): the finetuned pair's mean close CRPS on the validation origins, as the run's
  promotion measured it (`promoted.json` -> `evidence.metric.model_mean`, per-origin means over
  `evaluation.val_origins` origins of the validation split, the configured sampling, no calibration);
- `RANK_IC` (maximize), for a universe: the mean per-date RankIC of the finetuned model's signals on the
  validation split, `universe.json` -> `validation.finetuned.rank_ic`, which the universe evaluation writes.

Both are read from files the run itself wrote on the validation split; neither reads the test split.
`choose_objective` decides which applies before the study exists (Optuna fixes a study's direction when it
is created): the `sweep.objective` setting, or for `auto` whether the data is a universe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kronos_kit.runs import PROMOTION_FILE, load_json

__all__ = ["CLOSE_CRPS", "OBJECTIVES", "RANK_IC", "UNIVERSE_FILE", "Objective", "choose_objective", "is_universe"]

UNIVERSE_FILE = "universe.json"  # written by the universe evaluation (issue 25) for a panel of symbols


@dataclass(frozen=True)
class Objective:
    """A validation number of a trial's run folder, and which way is better."""

    name: str  # "close_crps" or "rank_ic"
    label: str  # for tables and reports
    direction: str  # Optuna's "minimize" or "maximize"
    file: str  # the run file it is read from
    read_value: Callable[[dict], object]  # the number inside that file's JSON

    def read(self, run_dir: str | Path) -> float:
        """The trial's objective from its run folder; a ValueError naming the file when it is missing or unusable."""
        path = Path(run_dir) / self.file
        if not path.is_file():
            raise ValueError(f"{path} not found: the trial's validation step did not write it, so it has no "
                             f"{self.label}" + (" (the universe evaluation writes it; is it in this build?)"
                                                if self is RANK_IC else ""))
        try:
            value = self.read_value(load_json(path))
        except (KeyError, TypeError, IndexError):
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: no finite {self.label} in it ({value!r}); the trial has no objective")
        return float(value)

    def better(self, a: float, b: float) -> bool:
        """`a` strictly better than `b`."""
        return a < b if self.direction == "minimize" else a > b

    def change(self, value: float, reference: float) -> float:
        """Relative improvement of `value` over `reference` (positive: better), e.g. 0.05 = 5% better."""
        sign = 1.0 if self.direction == "minimize" else -1.0
        return sign * (reference - value) / abs(reference) if reference else float("nan")


def _close_crps(promotion: dict) -> object:
    evidence = promotion["evidence"]
    if promotion.get("metric") != "close_crps" or evidence.get("finetuned") != "finetuned":
        raise KeyError("metric")
    return evidence["metric"]["model_mean"]


CLOSE_CRPS = Objective("close_crps", "validation close CRPS", "minimize", PROMOTION_FILE, _close_crps)
RANK_IC = Objective("rank_ic", "validation RankIC", "maximize", UNIVERSE_FILE,
                    lambda universe: universe["validation"]["finetuned"]["rank_ic"])
OBJECTIVES = {o.name: o for o in (CLOSE_CRPS, RANK_IC)}


def is_universe(frame: pd.DataFrame) -> bool:
    """A universe: more than one symbol, sharing dates (a panel ranked per date), not separate series.

    Stand-in until the universe evaluation (issue 25) exposes the run's own rule; at the merge this
    function defers to it, so a sweep and a run never disagree."""
    if frame["symbol"].nunique() < 2:
        return False
    return bool(frame.groupby("timestamps")["symbol"].nunique().max() > 1)


def choose_objective(setting: str, frame: pd.DataFrame | None = None) -> Objective:
    """The objective for `sweep.objective`: `close_crps`, `rank_ic`, or `auto` (RankIC for a universe)."""
    if setting == "auto":
        if frame is None:
            raise ValueError("sweep.objective auto needs the data to decide whether it is a universe")
        return RANK_IC if is_universe(frame) else CLOSE_CRPS
    if setting not in OBJECTIVES:
        raise ValueError(f"sweep.objective must be auto, close_crps or rank_ic, got {setting!r}")
    return OBJECTIVES[setting]
