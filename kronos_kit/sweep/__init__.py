"""Searching the finetuning settings on validation with Optuna: the pipeline called many times.

`run_sweep(config, space, ...)` (the command `python -m kronos_kit sweep`) searches the settings a search
space file names (`space.SearchSpace`: ranges, log scales, choices, conditional parameters) with Optuna's
TPE sampler, seeded, and a median pruner on phase 2's validation forecast skill. Each trial is an ordinary
run folder (`trial`), phase 1 is shared between trials with the same phase-1 settings (`phase1`) and phase
2 reads the frozen tokenizer's tokens from a cache built once (`kronos_kit.token_cache`). The objective is
a validation number read from the trial's folder (`objective`): never anything from the test split. The
study lives in SQLite in the sweep folder or in any storage Optuna supports (`study`); several processes or
machines share it, and a killed sweep continues with `--resume`. At the end (`report`): a leaderboard,
Optuna's figures, and the best trial against trial 0 (the base config) on validation and, once, on test.
The sweep folder's layout is `folder.SweepDir`.
"""

from kronos_kit.sweep.folder import SweepDir, load_sweep_study
from kronos_kit.sweep.holdout import evaluate_on_test, evaluate_universe_on_test
from kronos_kit.sweep.objective import CLOSE_CRPS, RANK_IC, Objective, choose_objective, universe_reason
from kronos_kit.sweep.report import (
    finish_sweep,
    leaderboard,
    leaderboard_markdown,
    read_leaderboard,
)
from kronos_kit.sweep.runner import run_sweep
from kronos_kit.sweep.space import ParamSpec, SearchSpace, SweepSettings

__all__ = ["CLOSE_CRPS", "RANK_IC", "Objective", "ParamSpec", "SearchSpace", "SweepDir", "SweepSettings",
           "choose_objective", "evaluate_on_test", "evaluate_universe_on_test", "finish_sweep", "leaderboard",
           "leaderboard_markdown", "load_sweep_study", "read_leaderboard", "run_sweep", "universe_reason"]
