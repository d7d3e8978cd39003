"""The search space file of a sweep: typed settings and parameters, read from YAML beside the run config.

```yaml
sweep:                 # SweepSettings: how many trials, the sampler's seed, the objective, pruning
  trials: 16
space:                 # ParamSpec per dotted config field (the names `apply_overrides` takes)
  predictor.lr: {low: 1.0e-5, high: 2.0e-4, log: true}
  predictor.strategy: {choices: [full, freeze, lora, l2sp]}
  predictor.lora_rank: {choices: [4, 8, 16], when: {predictor.strategy: lora}}
```

A parameter is a range (`low`, `high`, optional `log` or `step`; whole numbers make an integer range) or a
list of `choices`. `when` makes it conditional: it is searched only while every named field (an earlier
parameter, else the base config's value) holds one of the given values; otherwise the trial keeps the base
config's value. Trial 0 of every sweep is the base config itself (`SearchSpace.defaults`), so each value of
the base config must lie inside its parameter's range or choices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kronos_kit.config import KitConfig, apply_overrides, config_fields, flatten, read_yaml, unknown_key_message

__all__ = ["OBJECTIVES", "ParamSpec", "SearchSpace", "SweepSettings"]

OBJECTIVES = ("auto", "close_crps", "rank_ic")  # what a trial returns (kronos_kit.sweep.objective)


@dataclass
class SweepSettings:
    """The `sweep:` section of a search space file (every field documented in the README's sweep table)."""

    trials: int | None = 16  # trials to finish, trial 0 (the base config) included; None: until `timeout`
    timeout: float | None = None  # seconds a call may start new trials for; None: no limit
    seed: int = 0  # seed of the TPE sampler (each trial draws from seed and its number)
    startup_trials: int = 6  # trials sampled at random before TPE models the results
    objective: str = "auto"  # close_crps (validation close CRPS), rank_ic (universe validation RankIC), auto
    prune: bool = True  # stop a trial whose validation forecast skill trails the median of earlier trials
    prune_startup_trials: int = 4  # finished trials before pruning starts
    prune_warmup_steps: int = 0  # optimizer steps of phase 2 before a trial can be pruned
    evaluate_test: bool = True  # at the end, evaluate the best trial and trial 0 once on the test split

    def __post_init__(self) -> None:
        if self.trials is not None and (isinstance(self.trials, bool) or self.trials < 1):
            raise ValueError(f"sweep.trials must be a whole number >= 1 or null (run until timeout), got {self.trials}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"sweep.timeout must be a number of seconds > 0 or null, got {self.timeout}")
        if self.trials is None and self.timeout is None:
            raise ValueError("sweep: give trials (how many to finish) or timeout (seconds), or both")
        for name in ("startup_trials", "prune_startup_trials", "prune_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"sweep.{name} must be >= 0, got {getattr(self, name)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"sweep.objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")


@dataclass
class ParamSpec:
    """One searched config field: a range (`low`..`high`, `log` or `step`) or `choices`, maybe conditional."""

    name: str  # dotted config field, e.g. predictor.lr
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, list[Any]] = field(default_factory=dict)  # field -> the values under which it is searched

    def __post_init__(self) -> None:
        where = f"space.{self.name}"
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError(f"{where}: give either choices or a range (low, high), not both")
            if not isinstance(self.choices, list) or not self.choices:
                raise ValueError(f"{where}: choices must be a non-empty list, got {self.choices!r}")
            if len({repr(c) for c in self.choices}) < len(self.choices):
                raise ValueError(f"{where}: choices repeat a value: {self.choices}")
        else:
            self.low, self.high = _number(self.low, f"{where}.low"), _number(self.high, f"{where}.high")
            if not self.low < self.high:
                raise ValueError(f"{where}: low must be below high, got {self.low} and {self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"{where}: a log range needs low > 0, got {self.low}")
            if self.step is not None:
                self.step = _number(self.step, f"{where}.step")
                if self.log or self.step <= 0:
                    raise ValueError(f"{where}: step must be > 0 and cannot combine with log")
        self.when = {k: v if isinstance(v, list) else [v] for k, v in self.when.items()}

    @property
    def integer(self) -> bool:
        """A range of whole numbers (suggested as int)."""
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def active(self, values: Mapping[str, Any]) -> bool:
        """Searched under `values` (the trial's values so far over the base config's)?"""
        return all(values.get(k) in allowed for k, allowed in self.when.items())

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return any(value == c and type(value) is type(c) or value is c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return not self.integer or float(value).is_integer()

    def suggest(self, trial: Any) -> Any:
        """Optuna's suggestion for this parameter (fixed when the trial was enqueued with a value)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> str:
        scale = " (log)" if self.log else f" step {self.step:g}" if self.step else ""
        what = f"one of {self.choices}" if self.choices is not None else f"{self.low:g}..{self.high:g}{scale}"
        cond = ", ".join(f"{k} in {v}" for k, v in self.when.items())
        return f"{self.name}: {what}" + (f" when {cond}" if cond else "")


def _number(value: Any, where: str) -> float:
    """A YAML number (YAML 1.1 reads `1e-5` as text: numeric text counts)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return value


@dataclass
class SearchSpace:
    """A sweep's settings and its parameters, in file order (a condition may name an earlier parameter)."""

    settings: SweepSettings
    params: list[ParamSpec]
    source: str = "space"

    @classmethod
    def from_file(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"search space file {path} not found (see configs/sweep.yaml)")
        return cls.from_dict(read_yaml(path), source=str(path))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "space") -> SearchSpace:
        unknown = set(values) - {"sweep", "space"}
        if unknown:
            raise ValueError(f"{source}: unknown sections {sorted(unknown)}; a search space file has `sweep:` "
                             "(settings) and `space:` (the parameters)")
        settings = _build(SweepSettings, values.get("sweep") or {}, f"{source}: sweep")
        space = values.get("space") or {}
        if not isinstance(space, Mapping) or not space:
            raise ValueError(f"{source}: `space:` must map at least one dotted config field to a range or choices, "
                             "e.g. predictor.lr: {low: 1.0e-5, high: 2.0e-4, log: true}")
        fields = set(config_fields())
        params = []
        for name, spec in space.items():
            if name not in fields:
                raise ValueError(f"{source}: space.{name}: {unknown_key_message(name)}")
            if not isinstance(spec, Mapping):
                raise ValueError(f"{source}: space.{name} must be a mapping such as {{low: 1, high: 4}} or "
                                 f"{{choices: [a, b]}}, got {spec!r}")
            params.append(_build(ParamSpec, {**spec, "name": name}, f"{source}: space.{name}"))
        for i, p in enumerate(params):
            for key in p.when:
                if key not in fields:
                    raise ValueError(f"{source}: space.{p.name}.when: {unknown_key_message(key)}")
                if key in {q.name for q in params[i:]}:
                    raise ValueError(f"{source}: space.{p.name}.when names {key}, which is searched later in the "
                                     "file; list a parameter after those its condition names")
        return cls(settings, params, source)

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": dataclasses.asdict(self.settings),
                "space": {p.name: {k: v for k, v in dataclasses.asdict(p).items()
                                   if k != "name" and v is not None and v is not False and v != {}}
                          for p in self.params}}

    def suggest(self, trial: Any, base: KitConfig) -> dict[str, Any]:
        """This trial's values of the active parameters (Optuna suggests them in file order)."""
        values, chosen = flatten(base.to_dict()), {}
        for p in self.params:
            if p.active(values):
                chosen[p.name] = values[p.name] = p.suggest(trial)
        return chosen

    def defaults(self, base: KitConfig) -> dict[str, Any]:
        """The base config's values of the parameters active under it: trial 0 of the sweep."""
        values = flatten(base.to_dict())
        return {p.name: values[p.name] for p in self.params if p.active(values)}

    def check(self, base: KitConfig) -> None:
        """Refuse a space whose values the base config cannot take, or that cannot hold the base config."""
        values = flatten(base.to_dict())
        for p in self.params:
            if p.active(values) and not p.contains(values[p.name]):
                raise ValueError(f"{self.source}: the base config's {p.name} = {values[p.name]!r} is outside "
                                 f"space.{p.name} ({p.describe()}); trial 0 of a sweep is the base config, so widen "
                                 "the range (or add the value to the choices), or change the base config")
            probes = p.choices if p.choices is not None else [p.low, p.high]
            for value in probes:
                try:
                    apply_overrides(base, {p.name: value})
                except ValueError as err:
                    raise ValueError(f"{self.source}: space.{p.name} = {value!r} is not a valid config value: "
                                     f"{err}") from None

    def describe(self) -> list[str]:
        return [p.describe() for p in self.params]


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(known - {'name'})}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
