"""The evaluation section of the configuration (`evaluation:` in YAML): `EvalConfig`, its sampling defaults and the
names its fields choose from. `kronos_kit.config` re-exports every name here, so `from kronos_kit.config import
EvalConfig` (and the constants) is the one import a caller needs; this module only keeps config.py readable.

Walk-forward settings, the decisions on validation (promotion, calibration, what is handed over) and the universe
evaluation of a panel (signals, quantiles, portfolios with costs). Every field is documented in the README's
configuration table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_MAX_CONTEXT", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_K", "DEFAULT_TOP_P", "ENSEMBLE_METHODS",
           "MIN_DECISION_ORIGINS", "NAIVE_PROBABILISTIC", "PATH_CALIBRATION_METHODS", "PROMOTION_METRICS",
           "UNIVERSE_SIGNALS", "EvalConfig"]

DEFAULT_MAX_CONTEXT = 512  # forecaster context window (tokens) of the published Kronos-small/base
# the kit's sampling when nothing was configured or calibrated (Kronos's published defaults)
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 0  # 0: no top-k filter

# fewer validation origins (time points) than this cannot support a decision: promotion keeps the base pair,
# sampling and path calibration keep the paths as sampled, and each says so
MIN_DECISION_ORIGINS = 10
# how sample paths may be calibrated after sampling (kronos_kit.calibration), simplest first
PATH_CALIBRATION_METHODS = ("none", "spread", "spread_center", "conformal")

# what a model's sample paths give as a cross-sectional signal (kronos_kit.evaluate.signals), the first the default
UNIVERSE_SIGNALS = ("expected_return", "risk_adjusted", "prob_up")
# what promotion decides on, on the validation split: close CRPS per series, or the universe signal's RankIC
PROMOTION_METRICS = ("close_crps", "rank_ic")

# naive forecasts with a distribution (kronos_kit.naive) and how the handed-over forecast may combine them with a model
NAIVE_PROBABILISTIC = ("drift", "random_walk", "garch_rw", "bootstrap")
ENSEMBLE_METHODS = ("linear_pool", "quantile_average")


@dataclass
class EvalConfig:
    stride: int = 1  # bars between forecast origins on the test split (and on validation for promotion)
    pred_len: int = 24  # forecast horizon in bars (independent of data.predict)
    sample_count: int = 32  # sample paths per origin (fewer make 95% intervals little more than min..max)
    max_origins: int | None = 200  # cap per model, evenly spaced in time (None: every origin)
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    max_context: int = DEFAULT_MAX_CONTEXT
    calibrate: bool = True  # fit the forecast calibration on validation; test and the run's forecaster use it
    # path calibration candidates (kronos_kit.calibration), the one with the lowest held-out validation CRPS wins
    calibration_methods: list[str] = field(default_factory=lambda: list(PATH_CALIBRATION_METHODS))
    # temperature / top-p grid: searched only when it holds a setting other than the configured one (each point
    # is one more validation walk-forward); by default it holds just that one (benchmarks/RESULTS.md)
    calibration_temperatures: list[float] = field(default_factory=lambda: [DEFAULT_TEMPERATURE])
    calibration_top_ps: list[float] = field(default_factory=lambda: [DEFAULT_TOP_P])
    val_origins: int | None = 200  # origin cap on validation for promotion and calibration (None: every origin)
    promote_on: str = "close_crps"  # close_crps, or rank_ic (a panel: the validation RankIC of the universe signal)
    # the universe evaluation of a panel (kronos_kit.evaluate.universe): signals, IC, quantiles, portfolios
    universe: bool = True  # run it when at least universe_min_symbols symbols share rebalance dates
    universe_min_symbols: int = 5  # symbols a rebalance date needs to count as a cross-section
    rebalance_stride: int = 5  # bars between rebalance dates; every such date of validation and test is used
    universe_sample_count: int | None = None  # paths per symbol and date; None: sample_count
    signal: str = "expected_return"  # the model signal decisions use: expected_return, risk_adjusted or prob_up
    n_quantiles: int = 5  # quantile groups per date (quantile returns, the long-short portfolio)
    topk: int | None = None  # top-k dropout: names held; None: ceil(symbols / 5)
    n_drop: int | None = None  # names replaced at most per rebalance; None: max(1, round(topk / 10))
    hold_bars: int = 5  # minimum bars a name is held before it may be sold (qlib's hold_thresh)
    buy_cost_bps: float = 10.0  # cost of a buy in basis points of its value (the reference: open_cost 0.10%)
    sell_cost_bps: float = 15.0  # cost of a sell (the reference: close_cost 0.15%)
    min_cost: float = 0.0  # least cost of one trade, in the account's currency (the reference: 5)
    account: float = 1e8  # starting capital, in the currency of min_cost (the reference: 1e8)
    # what is handed over (kronos_kit.calibration.handover): ensembles with naive members ([]: the model alone), tail
    # factors; promotion needs a one-sided DM test at promotion_level (1: a lower validation CRPS suffices)
    ensemble_methods: list[str] = field(default_factory=lambda: list(ENSEMBLE_METHODS))
    ensemble_members: list[str] = field(default_factory=lambda: ["garch_rw", "bootstrap", "random_walk"])
    tails: bool = True
    promotion_level: float = 0.05

    def __post_init__(self) -> None:
        for name in ("stride", "pred_len", "sample_count"):
            _require_count(f"evaluation.{name}", getattr(self, name), 1)
        self._check_universe()
        if self.max_origins is not None:
            _require_count("evaluation.max_origins", self.max_origins, 1, "or null (every origin)")
        if self.val_origins is not None:
            _require_count("evaluation.val_origins", self.val_origins, 1, "or null (every origin)")
        _require_count("evaluation.top_k", self.top_k, 0, "(0 disables it)")
        _require_count("evaluation.max_context", self.max_context, 2, f"(the forecaster's window; default "
                       f"{DEFAULT_MAX_CONTEXT})")
        # the evaluation samples paths: a temperature of 0 is greedy and makes every path the same
        if not (_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"evaluation.temperature must be a finite number > 0 (e.g. 1.0), got {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"evaluation.top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        temps, top_ps = self.calibration_temperatures, self.calibration_top_ps
        if (isinstance(temps, (str, dict)) or not temps
                or not all(_is_number(t) and math.isfinite(t) and t > 0 for t in temps)):
            raise ValueError(f"evaluation.calibration_temperatures must be a non-empty list of finite numbers > 0, "
                             f"e.g. [0.85, 1.0, 1.15]; got {temps!r}")
        if isinstance(top_ps, (str, dict)) or not top_ps or not all(_is_number(q) and 0 < q <= 1 for q in top_ps):
            raise ValueError(f"evaluation.calibration_top_ps must be a non-empty list of numbers in (0, 1], "
                             f"e.g. [0.9, 1.0]; got {top_ps!r}")
        methods = self.calibration_methods
        if isinstance(methods, str) or not methods or set(methods) - set(PATH_CALIBRATION_METHODS):
            raise ValueError(f"evaluation.calibration_methods must be a non-empty list drawn from "
                             f"{list(PATH_CALIBRATION_METHODS)} (['none'] switches path calibration off): {methods!r}")
        for name, allowed, empty in (("ensemble_methods", ENSEMBLE_METHODS, "[]: the model alone"),
                                     ("ensemble_members", NAIVE_PROBABILISTIC, "at least one")):
            value = getattr(self, name)
            if not isinstance(value, list) or set(value) - set(allowed) or len(set(value)) < len(value) or \
                    not value and name == "ensemble_members":
                raise ValueError(f"evaluation.{name} must be a list of distinct names from {list(allowed)} ({empty}), "
                                 f"got {value!r}")
        if not isinstance(self.tails, bool):
            raise ValueError(f"evaluation.tails must be true or false, got {self.tails!r}")
        if not (_is_number(self.promotion_level) and 0 < self.promotion_level <= 1):
            raise ValueError(f"evaluation.promotion_level must be in (0, 1], got {self.promotion_level!r}")

    def _check_universe(self) -> None:
        if self.promote_on not in PROMOTION_METRICS:
            raise ValueError(f"evaluation.promote_on must be one of {list(PROMOTION_METRICS)} (rank_ic needs a panel "
                             f"of at least universe_min_symbols symbols), got {self.promote_on!r}")
        if self.signal not in UNIVERSE_SIGNALS:
            raise ValueError(f"evaluation.signal must be one of {list(UNIVERSE_SIGNALS)}, got {self.signal!r}")
        _require_count("evaluation.rebalance_stride", self.rebalance_stride, 1)
        if self.universe_sample_count is not None:
            _require_count("evaluation.universe_sample_count", self.universe_sample_count, 1,
                           "or null (evaluation.sample_count)")
        _require_count("evaluation.n_quantiles", self.n_quantiles, 2)
        _require_count("evaluation.universe_min_symbols", self.universe_min_symbols, max(3, self.n_quantiles),
                       "(and at least evaluation.n_quantiles, so every quantile group holds a name)")
        _require_count("evaluation.hold_bars", self.hold_bars, 1)
        if self.topk is not None:
            _require_count("evaluation.topk", self.topk, 1, "or null (a fifth of the symbols)")
        if self.n_drop is not None:
            _require_count("evaluation.n_drop", self.n_drop, 1, "or null (a tenth of topk, at least 1)")
        for name in ("buy_cost_bps", "sell_cost_bps", "min_cost"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"evaluation.{name} must be a finite number >= 0, got {value!r}")
        if not (_is_number(self.account) and math.isfinite(self.account) and self.account > 0):
            raise ValueError(f"evaluation.account must be a finite number > 0 (e.g. 1e8), got {self.account!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_count(name: str, value: Any, minimum: int, note: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}{' ' + note if note else ''}, got {value!r}")
