"""Typed configuration: one dataclass per concern, loaded from YAML and from papermill parameters.

`KitConfig.from_file("configs/default.yaml")` reads a YAML file whose sections mirror the
dataclasses below. `apply_overrides` is the one override path: notebook parameters (a `None`
parameter keeps the config's value) and dotted keys such as `{"tokenizer.max_steps": 20}` or the
command line's `key=value` words (an explicit `None` / `null` sets the field to null). Unknown keys
are errors that name the key. Every field is documented in the README's configuration table.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

DEFAULT_MAX_CONTEXT = 512  # forecaster context window (tokens) of the published Kronos-small/base

# notebook parameters (first code cell of every notebook) -> the config field they set
NOTEBOOK_PARAMETERS = {
    "data": "data.source",
    "tokenizer_from": "tokenizer.start_from",
    "predictor_from": "predictor.start_from",
    "tokenizer_steps": "tokenizer.max_steps",
    "predictor_steps": "predictor.max_steps",
    "seed": "seed",
    "device": "device",
    "train_tokenizer": "tokenizer.enabled",
    "train_predictor": "predictor.enabled",
    "ignore_gate": "gate.override",
    "eval_origins": "evaluation.max_origins",
    "tokenizer_strategy": "tokenizer.strategy",
    "predictor_strategy": "predictor.strategy",
}

STRATEGIES = ("full", "freeze", "lora", "l2sp")  # finetune strategies of a phase (see PhaseConfig.strategy)
# the linears of a transformer block that LoRA may adapt (kronos_kit.model.adapters checks the same names)
LORA_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "w1", "w2", "w3")
SELECT_METRICS = ("val_loss", "val_crps")  # what picks the phase-2 `best` and decides early stopping


@dataclass
class DataConfig:
    source: str = "sample:nasdaq"  # CSV/Parquet file or folder, or sample:sp500 / sample:nasdaq
    symbol: str | None = None  # symbol for a single-instrument file without a symbol column
    lookback: int = 90  # bars of history in a window (normalisation uses these only)
    predict: int = 10  # bars after the lookback in a training window (not the forecast horizon)
    clip: float = 5.0  # clip normalised values to +-clip
    train_ratio: float = 0.8  # chronological split per symbol, when val_start/test_start are unset
    val_ratio: float = 0.1
    val_start: str | None = None  # or split by dates: first timestamp of validation ...
    test_start: str | None = None  # ... and of test
    stride: int = 1  # bars between consecutive training windows
    max_samples_per_epoch: int | None = None  # cap on windows per epoch (large data)
    fill: str | None = None  # None: NaN is an error; "ffill": forward-fill within a symbol

    def __post_init__(self) -> None:
        if self.lookback < 2 or self.predict < 1:
            raise ValueError(f"data.lookback must be >= 2 and data.predict >= 1; got {self.lookback}, {self.predict}")
        if not (0 < self.train_ratio < 1 and 0 < self.val_ratio < 1 and self.train_ratio + self.val_ratio < 1):
            raise ValueError("data.train_ratio and data.val_ratio must be in (0, 1) and sum below 1 "
                             "(test gets the rest)")

    @property
    def window(self) -> int:
        return self.lookback + self.predict + 1  # the reference's window length


@dataclass
class PhaseConfig:
    enabled: bool = True  # switch the phase off to reuse `start_from` as is
    start_from: str = "tiny"  # checkpoint folder, preset name, or hub id
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early when reached
    batch_size: int = 32  # global batch (split across ranks under torchrun)
    grad_accum_steps: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    pct_start: float = 0.03  # OneCycle warm-up share
    div_factor: float = 10.0  # OneCycle initial lr = lr / div_factor
    grad_clip: float = 2.0
    log_every: int = 10  # optimizer steps between metrics.jsonl lines
    eval_every: int = 50  # optimizer steps between validations (also at each epoch end)
    patience: int | None = None  # validations without improvement before stopping early
    max_val_batches: int | None = None  # cap validation cost on large data
    strategy: str = "full"  # full (every weight), freeze (`trainable` only), lora (adapters), l2sp (full + L2-SP)
    trainable: list[str] | None = None  # freeze: parameter groups that train; None = the phase's default below
    lora_rank: int = 8  # lora: inner dimension of each low-rank update
    lora_alpha: float = 16.0  # lora: the update is scaled by alpha / rank
    lora_dropout: float = 0.0  # lora: dropout on the adapter path's input
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGET_NAMES))  # lora: adapted linears
    l2sp_strength: float = 0.01  # l2sp: weight of sum ||w - w_start||^2 in the loss

    DEFAULT_TRAINABLE: ClassVar[tuple[str, ...]] = ("all",)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum_steps", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.trainable is not None and (isinstance(self.trainable, str) or not self.trainable
                                           or not all(isinstance(g, str) for g in self.trainable)):
            raise ValueError(f"trainable must be a non-empty list of parameter groups (e.g. ['head', 'last:1']) "
                             f"or null for the default {list(self.DEFAULT_TRAINABLE)}, got {self.trainable!r}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a whole number >= 1, got {self.lora_rank!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_targets
        if isinstance(targets, str) or not targets or set(targets) - set(LORA_TARGET_NAMES):
            raise ValueError(f"lora_targets must be a non-empty list drawn from {list(LORA_TARGET_NAMES)}, "
                             f"got {targets!r}")
        if not (math.isfinite(self.l2sp_strength) and self.l2sp_strength >= 0):
            raise ValueError(f"l2sp_strength must be a finite number >= 0, got {self.l2sp_strength!r}")

    @property
    def trainable_groups(self) -> list[str]:
        """The parameter groups the `freeze` strategy trains: `trainable`, else the phase's default."""
        return list(self.trainable) if self.trainable is not None else list(self.DEFAULT_TRAINABLE)


@dataclass
class TokenizerPhaseConfig(PhaseConfig):
    entropy_mode: str = "reference"  # BSQ codebook entropy: "reference" (as published) or "group"

    DEFAULT_TRAINABLE: ClassVar[tuple[str, ...]] = ("decoder", "head")  # freeze: adapt how codes decode


@dataclass
class PredictorPhaseConfig(PhaseConfig):
    start_from: str = "tiny"
    lr: float = 4e-5
    grad_clip: float = 3.0
    tokenizer_from: str | None = None  # None: this run's phase-1 tokenizer if trained, else tokenizer.start_from
    teacher_forcing: bool = False  # condition s2 on the true next s1 instead of a sampled one
    token_cache: bool = True  # encode each window once with the frozen tokenizer and reuse it
    select_metric: str = "val_loss"  # picks `best` and decides early stopping: val_loss or val_crps (forecast skill)
    skill_origins: int = 32  # validation origins of the forecast-skill probe at each validation; 0 switches it off
    skill_paths: int = 8  # sample paths per origin of the probe
    skill_horizon: int = 10  # bars forecast per origin of the probe
    skill_stride: int = 10  # bars between the probe's origins (before thinning to skill_origins)

    DEFAULT_TRAINABLE: ClassVar[tuple[str, ...]] = ("head", "dependency", "norm", "last:1")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric must be one of {list(SELECT_METRICS)}, got {self.select_metric!r}")
        for name in ("skill_paths", "skill_horizon", "skill_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skill_origins < 0:
            raise ValueError(f"skill_origins must be >= 0 (0 switches the probe off), got {self.skill_origins}")
        if self.select_metric == "val_crps" and self.skill_origins == 0:
            raise ValueError("select_metric val_crps needs the forecast-skill probe: set skill_origins >= 1 "
                             "(e.g. 32) or select_metric: val_loss")


@dataclass
class GateConfig:
    max_full_mse: float = 0.5  # reconstruction MSE (normalised units) of the full decoder
    min_s1_usage: float = 0.2  # share of s1 codes used on validation windows
    override: bool = False  # run phase 2 even if the gate failed


@dataclass
class EvalConfig:
    stride: int = 24  # bars between forecast origins on the test split (and on validation for promotion)
    pred_len: int = 24  # forecast horizon in bars (independent of data.predict)
    sample_count: int = 8  # sample paths per origin
    max_origins: int | None = 60  # cap per model (None: every origin)
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    max_context: int = DEFAULT_MAX_CONTEXT
    calibrate: bool = True  # fit temperature / top-p on validation and evaluate test with them
    calibration_temperatures: list[float] = field(default_factory=lambda: [0.85, 1.0, 1.15])  # calibration grid
    calibration_top_ps: list[float] = field(default_factory=lambda: [0.9, 1.0])  # calibration grid
    val_origins: int | None = 40  # origin cap on validation for promotion and calibration (None: every origin)

    def __post_init__(self) -> None:
        temps, top_ps = self.calibration_temperatures, self.calibration_top_ps
        if isinstance(temps, str) or not temps or not all(isinstance(t, (int, float)) and t > 0 for t in temps):
            raise ValueError(f"evaluation.calibration_temperatures must be a non-empty list of numbers > 0: {temps!r}")
        if isinstance(top_ps, str) or not top_ps or not all(isinstance(q, (int, float)) and 0 < q <= 1 for q in top_ps):
            raise ValueError(f"evaluation.calibration_top_ps must be a non-empty list of numbers in (0, 1]: {top_ps!r}")
        if self.val_origins is not None and self.val_origins < 1:
            raise ValueError(f"evaluation.val_origins must be >= 1 or null, got {self.val_origins}")


@dataclass
class KitConfig:
    run_dir: str | None = None  # None: runs/<config name>-<timestamp>
    seed: int = 0  # one seed fixes Python, NumPy, torch and the data order
    device: str = "auto"  # auto (cuda, mps, cpu), or e.g. cpu, cuda:0
    precision: str = "fp32"  # fp32, or bf16 (autocast, CUDA only)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerPhaseConfig = field(default_factory=TokenizerPhaseConfig)
    predictor: PredictorPhaseConfig = field(default_factory=PredictorPhaseConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    name: str = "run"  # run name; the run directory is named after it

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if any(sep in self.name for sep in ("/", "\\")) or ".." in self.name or not self.name.strip():
            raise ValueError(f"name={self.name!r}: the run name names a folder under runs/, so it must be "
                             "non-empty without '/', '\\' or '..'; use e.g. name: my-run (or set run_dir)")

    # ------------------------------------------------------------------ IO
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> KitConfig:
        return _build(cls, values, source)

    @classmethod
    def from_file(cls, path: str | Path) -> KitConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        values = yaml.safe_load(path.read_text()) or {}
        values.setdefault("name", path.stem)
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any] | None = None, **kwargs: Any) -> KitConfig:
        """A copy with dotted keys replaced, e.g. {"tokenizer.max_steps": 20}; see `apply_overrides`."""
        return apply_overrides(self, {**(overrides or {}), **kwargs})


def apply_overrides(cfg: KitConfig, values: dict[str, Any]) -> KitConfig:
    """The one override path: a copy of `cfg` with notebook parameters and dotted keys applied.

    A key named in `NOTEBOOK_PARAMETERS` (`data`, `tokenizer_steps`, ...) sets its field, and a None
    value means "not given" (papermill's default), so the config keeps its value. Any other key is a
    dotted field (`predictor.lr`, `seed`); there None is an explicit null and sets the field to None.
    """
    tree = cfg.to_dict()
    for key, value in values.items():
        if key in NOTEBOOK_PARAMETERS:
            if value is None:
                continue
            key = NOTEBOOK_PARAMETERS[key]
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {key!r}: {p!r} is not a config section")
            node = node[p]
        if leaf not in node or isinstance(node[leaf], dict):
            raise ValueError(f"override {key!r}: unknown field {leaf!r}; fields here: {sorted(node)}")
        node[leaf] = value
    return KitConfig.from_dict(tree, source="overrides")


def notebook_config(config: str | Path, run_dir: str | Path, **parameters: Any) -> KitConfig:
    """The config a notebook runs with: the YAML file, then its parameters (None = keep the file's)."""
    unknown = set(parameters) - set(NOTEBOOK_PARAMETERS)
    if unknown:
        raise ValueError(f"unknown notebook parameters {sorted(unknown)}; known: {sorted(NOTEBOOK_PARAMETERS)}")
    return apply_overrides(KitConfig.from_file(config), {**parameters, "run_dir": str(run_dir)})


def parse_overrides(words: list[str]) -> dict[str, Any]:
    """`key=value` words from a command line; values are parsed as YAML (numbers, null, true...)."""
    out = {}
    for word in words:
        if "=" not in word:
            raise ValueError(f"override {word!r} must look like key=value, e.g. tokenizer.max_steps=20")
        key, value = word.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _build(cls, values: dict[str, Any], source: str):
    if not isinstance(values, dict):
        raise ValueError(f"{source}: section for {cls.__name__} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} keys {sorted(unknown)}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{source}: {name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{source}: {cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a field's type hint, reading numbers in every common notation.

    YAML 1.1 reads `1e-5` (no dot) as a string, so numeric strings count as numbers; ints may stand
    for floats, and a float or numeric string for an int when it is a whole number.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value) if hint is float or not value.strip().lstrip("+-").isdigit() else int(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    wrong_bool = hint is int and isinstance(value, bool)  # YAML true is an int to Python
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or wrong_bool):
        raise ValueError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
