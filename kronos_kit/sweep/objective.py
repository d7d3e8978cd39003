"""What a sweep trial returns: one validation number read from the trial's run folder (the one seam).

- `CLOSE_CRPS` (minimize): the finetuned pair's mean close CRPS on the validation origins, as the run's
  promotion measured it (`promoted.json` -> `evidence.metric.model_mean`, per-origin means over
  `evaluation.val_origins` origins of the validation split, the configured sampling, no calibration);
- `RANK_IC` (maximize), for a universe: the mean per-date RankIC of the finetuned model's decision signal on
  the validation split, `universe.json` -> `validation.finetuned.rank_ic`, which the universe evaluation's
  validation part writes (`evaluate_universe(..., test=False)`).

Both are read from files the run itself wrote on the validation split; neither reads the test split. Each
also reads the base model's number on the same validation split (`read_reference`), the leaderboard's
"vs base model". `choose_objective` decides which applies before the study exists (Optuna fixes a study's
direction when it is created): the `sweep.objective` setting, or for `auto` whether the data is a universe,
by the universe evaluation's own rule (`cross_section_reason`), so a sweep and a run never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kronos_kit.evaluate.universe_evaluation import cross_section_reason
from kronos_kit.runs import PROMOTION_FILE, UNIVERSE_FILE, load_json

if TYPE_CHECKING:
    from kronos_kit.config import KitConfig
    from kronos_kit.data import Splits

__all__ = ["CLOSE_CRPS", "OBJECTIVES", "RANK_IC", "Objective", "choose_objective", "universe_reason"]


@dataclass(frozen=True)
class Objective:
    """A validation number of a trial's run folder, and which way is better."""

    name: str  # "close_crps" or "rank_ic"
    label: str  # for tables and reports
    direction: str  # Optuna's "minimize" or "maximize"
    file: str  # the run file it is read from
    read_value: Callable[[dict], object]  # the finetuned pair's number inside that file's JSON
    read_base: Callable[[dict], object]  # the base model's number on the same validation split
    relative: bool  # changes as a share of the reference (a CRPS); False: as a difference (a RankIC near 0)

    def read(self, run_dir: str | Path) -> float:
        """The trial's objective from its run folder; a ValueError naming the file when it is missing or unusable."""
        return self._number(run_dir, self.read_value, "")

    def read_reference(self, run_dir: str | Path) -> float:
        """The base model's number on the same validation split, from the same file (the leaderboard's "vs base")."""
        return self._number(run_dir, self.read_base, " of the base model")

    def _number(self, run_dir: str | Path, read: Callable[[dict], object], whose: str) -> float:
        path = Path(run_dir) / self.file
        if not path.is_file():
            raise ValueError(f"{path} not found: the trial's validation step did not write it, so it has no "
                             f"{self.label}{whose}")
        try:
            value = read(load_json(path))
        except (KeyError, TypeError, IndexError):
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: no finite {self.label}{whose} in it ({value!r}); the trial has no objective")
        return float(value)

    def better(self, a: float, b: float) -> bool:
        """`a` strictly better than `b`."""
        return a < b if self.direction == "minimize" else a > b

    def change(self, value: float, reference: float) -> float:
        """Improvement of `value` over `reference` (positive: better): relative for a CRPS (0.05 = 5% lower),
        the difference for a RankIC (0.01 = one hundredth higher; a share of a RankIC near 0 means nothing)."""
        sign = 1.0 if self.direction == "minimize" else -1.0
        if not self.relative:
            return sign * (reference - value) + 0.0  # + 0.0: no "-0.000" for equal values
        return sign * (reference - value) / abs(reference) + 0.0 if reference else float("nan")

    def format_change(self, change: float) -> str:
        """`change` as text: '4.5%' for a relative change, '+0.012' for a difference."""
        if change is None or not math.isfinite(change):
            return "n/a"
        return f"{change:.1%}" if self.relative else f"{change:+.3f}"


def _close_crps(promotion: dict, key: str = "model_mean") -> object:
    evidence = promotion["evidence"]
    if promotion.get("metric") != "close_crps" or evidence.get("finetuned") != "finetuned":
        raise KeyError("metric")
    return evidence["metric"][key]


CLOSE_CRPS = Objective("close_crps", "validation close CRPS", "minimize", PROMOTION_FILE, _close_crps,
                       lambda promotion: _close_crps(promotion, "other_mean"), relative=True)
RANK_IC = Objective("rank_ic", "validation RankIC", "maximize", UNIVERSE_FILE,
                    lambda universe: universe["validation"]["finetuned"]["rank_ic"],
                    lambda universe: universe["validation"]["base"]["rank_ic"], relative=False)
OBJECTIVES = {o.name: o for o in (CLOSE_CRPS, RANK_IC)}


def universe_reason(cfg: KitConfig, splits: Splits) -> str | None:
    """Why `cfg`'s data is not a universe for the run's universe evaluation (None: it is one). The universe
    evaluation's own rule (`cross_section_reason`: enough symbols sharing rebalance dates with `data.lookback`
    bars of history in the validation and the test split, and `evaluation.universe` on): a sweep optimizes the
    RankIC exactly when a run of its base config would evaluate one. It looks at which symbols have bars on
    which dates, never at a price."""
    return cross_section_reason(splits, cfg.evaluation, lookback=cfg.data.lookback)


def choose_objective(setting: str, cfg: KitConfig, splits: Splits) -> Objective:
    """The objective for `sweep.objective`: `close_crps`, `rank_ic` (refused without a universe), or `auto` (RankIC
    for a universe); `cfg` is the sweep's base config and `splits` its data. A ValueError says what to change."""
    if setting not in ("auto", *OBJECTIVES):
        raise ValueError(f"sweep.objective must be auto, close_crps or rank_ic, got {setting!r}")
    reason = universe_reason(cfg, splits) if setting != "close_crps" else None
    if setting == "rank_ic" and reason is not None:
        raise ValueError(f"rank_ic needs a universe, but {reason}. Use sweep.objective: close_crps or auto, or "
                         "data with more symbols sharing dates")
    objective = OBJECTIVES[setting] if setting != "auto" else CLOSE_CRPS if reason is not None else RANK_IC
    if objective is CLOSE_CRPS and cfg.evaluation.promote_on == "rank_ic":
        raise ValueError("close_crps is read from the close-CRPS promotion, but the config promotes on the validation "
                         "RankIC (evaluation.promote_on: rank_ic). Use sweep.objective: rank_ic (or auto on a "
                         "panel), or -p evaluation.promote_on=close_crps")
    return objective
