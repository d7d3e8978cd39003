"""Typed configuration: one dataclass per concern, loaded from YAML and from papermill parameters.

`KitConfig.from_file("configs/default.yaml")` reads a YAML file whose sections mirror the
dataclasses below. `apply_overrides` is the one override path: notebook parameters (a `None`
parameter keeps the config's value) and dotted keys such as `{"tokenizer.max_steps": 20}` or the
command line's `key=value` words (an explicit `None` / `null` sets the field to null); a dotted key
may reach into a mapping field (`data.columns.Date=timestamps`). Unknown keys are errors that name
the key and the closest valid ones. Every field is documented in the README's configuration table.

Relative paths in parameters and config fields (the config file, `data.source`, checkpoint
folders, `run_dir`) resolve the same from any working directory (`resolve_path`): the working
directory's path when it exists there, else the project root's (the folder holding `configs/`
above the installed package), so a notebook kernel started in `notebooks/` finds
`configs/default.yaml` and writes `runs/` at the project root.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

# the evaluation section lives in its own module; re-exported here, so every config name has one import
from kronos_kit.evaluation_config import (  # noqa: F401
    DEFAULT_MAX_CONTEXT,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    ENSEMBLE_METHODS,
    MIN_DECISION_ORIGINS,
    NAIVE_PROBABILISTIC,
    PATH_CALIBRATION_METHODS,
    PROMOTION_METRICS,
    UNIVERSE_SIGNALS,
    EvalConfig,
)

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
    "threads": "threads",
    "tokenizer_strategy": "tokenizer.strategy",
    "predictor_strategy": "predictor.strategy",
}
# notebook parameters that are not config fields: where the run goes, which YAML, whether the training
# stages continue from their saved state (the pipeline sets it under --resume), and whether they may
# retrain a phase the run folder already holds (a user's choice in Lab; under the pipeline the kernel learns
# from its environment that the pipeline runs the stage, `stages.open_stage`)
RUN_PARAMETERS = ("run_dir", "config", "resume", "overwrite")
THREADS_ENV = "KRONOS_THREADS"  # thread count when the config leaves `threads` at null

STRATEGIES = ("full", "freeze", "lora", "l2sp")  # finetune strategies of a phase (see PhaseConfig.strategy)
# the linears of a transformer block that LoRA may adapt (kronos_kit.model.adapters builds on these names)
LORA_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # SelfAttention linears of a block
LORA_FFN_TARGETS = ("w1", "w2", "w3")  # SwiGLU linears of a block
LORA_TARGET_NAMES = LORA_ATTENTION_TARGETS + LORA_FFN_TARGETS  # the default: every linear of every block
SELECT_METRICS = ("val_loss", "val_crps")  # what picks the phase-2 `best` and decides early stopping
# a LoRA update of rank r costs r * (in + out) weights per linear; the published models' widest layer
# is 832 wide, so a rank above this is never low-rank (apply_lora also checks it against each layer)
MAX_LORA_RANK = 1024
# how data.train_ratio / val_ratio cut several symbols: on the pooled calendar (common dates), or each symbol by its
# own bar count (the symbols' test periods then differ, and one symbol's training targets can lie in another's test)
RATIO_SPLITS = ("calendar", "symbol")
# phase config fields that may change between a run and its resume (or after the phase ran): they decide when
# to log, validate or stop, never what the weights become or what a validation metric means
HARMLESS_ON_RESUME = ("enabled", "log_every", "eval_every", "patience", "nonfinite_grad", "resume_changed")
# data.short: what a symbol too short for one window of a split means; "auto": left out of that split (with a notice)
# in a panel (late listings, early delistings), an error for one series
SHORT_SYMBOLS = ("auto", "error", "drop")


def check_lora_targets(targets: Any, what: str = "LoRA targets") -> None:
    """Raise unless `targets` is a non-empty list of names from `LORA_TARGET_NAMES` (the one check)."""
    if isinstance(targets, str) or not targets or set(targets) - set(LORA_TARGET_NAMES):
        raise ValueError(f"{what} must be a non-empty list drawn from {list(LORA_TARGET_NAMES)}, got {targets!r}")


@dataclass
class DataConfig:
    source: str = "sample:nasdaq"  # CSV/Parquet file or folder, or sample:sp500 / sample:nasdaq
    symbol: str | None = None  # symbol for a single-instrument file without a symbol column
    lookback: int = 90  # bars of history in a window (normalisation uses these only)
    predict: int = 10  # bars after the lookback in a training window (not the forecast horizon)
    clip: float = 5.0  # clip normalised values to +-clip
    train_ratio: float = 0.8  # chronological split (shares of time), when val_start/test_start are unset
    val_ratio: float = 0.1
    ratio_split: str = "calendar"  # several symbols: cut on common dates (calendar) or each by its bar count (symbol)
    val_start: str | None = None  # or split by dates: first timestamp of validation ...
    test_start: str | None = None  # ... and of test
    stride: int = 1  # bars between consecutive training windows
    max_samples_per_epoch: int | None = None  # cap on windows per epoch (large data)
    fill: str | None = None  # None: NaN is an error; "ffill": forward-fill within a symbol
    columns: dict[str, str] | None = None  # {source column: canonical name}, e.g. {Date: timestamps}
    short: str = "auto"  # a symbol too short for a window of a split: "drop" it there, "error"; "auto": drop in a panel
    adj_close: bool = False  # True: close = 'Adj Close', open/high/low scaled by Adj Close / Close

    def __post_init__(self) -> None:
        if self.short not in SHORT_SYMBOLS:
            raise ValueError(f"data.short must be one of {list(SHORT_SYMBOLS)}, got {self.short!r}")
        if self.lookback < 2 or self.predict < 1:
            raise ValueError(f"data.lookback must be >= 2 and data.predict >= 1; got {self.lookback}, {self.predict}")
        if not (0 < self.train_ratio < 1 and 0 < self.val_ratio < 1 and self.train_ratio + self.val_ratio < 1):
            raise ValueError("data.train_ratio and data.val_ratio must be in (0, 1) and sum below 1 "
                             "(test gets the rest)")
        if self.ratio_split not in RATIO_SPLITS:
            raise ValueError(f"data.ratio_split must be one of {list(RATIO_SPLITS)} (calendar: every symbol cut on "
                             f"the same dates; symbol: each by its own bar count), got {self.ratio_split!r}")

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
    nonfinite_grad: str = "stop"  # a NaN/inf gradient norm: "stop" (error) or "skip" (no update, logged, counted)
    resume_changed: bool = False  # resume even if fields that break exactness changed (warning; schedule rebuilt)
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
        if self.nonfinite_grad not in ("stop", "skip"):
            raise ValueError(f"nonfinite_grad must be 'stop' or 'skip', got {self.nonfinite_grad!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            # clip_grad_norm_ with a negative norm flips the gradient (ascent); 0 zeroes every update
            raise ValueError(f"grad_clip must be a finite number > 0 (the largest gradient norm kept, e.g. 2.0), "
                             f"got {self.grad_clip}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 validations or null (no early stopping), got {self.patience}")
        if self.max_val_batches is not None and self.max_val_batches < 1:
            raise ValueError(f"max_val_batches must be >= 1 or null (every batch), got {self.max_val_batches}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.trainable is not None and (isinstance(self.trainable, str) or not self.trainable
                                           or not all(isinstance(g, str) for g in self.trainable)):
            raise ValueError(f"trainable must be a non-empty list of parameter groups (e.g. ['head', 'last:1']) "
                             f"or null for the default {list(self.DEFAULT_TRAINABLE)}, got {self.trainable!r}")
        if self.trainable is not None and self.strategy != "freeze":
            raise ValueError(f"trainable={self.trainable!r} is read by strategy 'freeze' only, but strategy is "
                             f"{self.strategy!r}: set strategy: freeze, or trainable: null")
        if (not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool)
                or not 1 <= self.lora_rank <= MAX_LORA_RANK):
            raise ValueError(f"lora_rank must be a whole number in [1, {MAX_LORA_RANK}] (a low rank: 4 to 64 is "
                             f"usual), got {self.lora_rank!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        check_lora_targets(self.lora_targets, "lora_targets")
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
    # folder of on-disk token caches (kronos_kit.token_cache): every window's tokens under the frozen tokenizer,
    # encoded once and shared by every run pointing there (a sweep's trials); None: encode in this process only
    token_cache_dir: str | None = None
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
    """Thresholds of the tokenizer gate before phase 2 (`kronos_kit.gate`); null disables a check."""

    max_full_mse_vs_base: float | None = 1.05  # adapted / base per-window full MSE, failed only when significant
    base_test_level: float = 0.05  # one-sided level of that paired test (Diebold-Mariano over windows)
    max_close_error_to_move: float | None = 1.0  # mean close error / median |bar-to-bar move|, both in bp
    max_high_low_error_to_move: float | None = 1.25  # the same for the high and the low (the larger)
    max_full_mse: float | None = 0.2  # reconstruction MSE (normalised units) of the full decoder
    max_full_to_s1_mse_ratio: float | None = 1.0  # the fine bits must not make the reconstruction worse
    min_s1_usage: float | None = 0.2  # share of s1 codes used on validation windows
    min_s2_usage: float | None = 0.05  # share of s2 codes used
    min_bit_balance: float | None = 0.05  # least balanced bit's min(P(1), P(0))
    override: bool = False  # run phase 2 even if the gate failed




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
    threads: int | None = None  # torch CPU threads; None: $KRONOS_THREADS, else runtime.default_threads (by width)
    cache_dir: str | None = None  # memory-mapped data cache, one entry per data hash; None: <run_dir>/cache
    tensorboard: bool = False  # also write the training and validation curves as TensorBoard scalars

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null (the kit's rule by model width), got {self.threads}")
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
        values = read_yaml(path)
        values.setdefault("name", path.stem)
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any] | None = None, **kwargs: Any) -> KitConfig:
        """A copy with dotted keys replaced, e.g. {"tokenizer.max_steps": 20}; see `apply_overrides`."""
        return apply_overrides(self, {**(overrides or {}), **kwargs})


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's top-level mapping; malformed YAML (syntax, a list, a `!!python` tag) is a ValueError
    naming the file and line. `yaml.safe_load` never builds Python objects from tags, it refuses them."""
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"config file {path}{where}: not valid YAML ({problem}); a config is a mapping of "
                         "sections such as `data:` and `tokenizer:` (see configs/default.yaml)") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: the top level must be a mapping of fields and sections (e.g. "
                         f"`seed: 0`, `data:`), got a {type(values).__name__}; see configs/default.yaml")
    return values


def apply_overrides(cfg: KitConfig, values: dict[str, Any]) -> KitConfig:
    """The one override path: a copy of `cfg` with notebook parameters and dotted keys applied.

    A key named in `NOTEBOOK_PARAMETERS` (`data`, `tokenizer_steps`, ...) sets its field, and a None
    value means "not given" (papermill's default), so the config keeps its value. Any other key is a
    dotted field (`predictor.lr`, `seed`); there None is an explicit null and sets the field to None.
    A dotted key may continue into a mapping field (`data.columns.Date`: one entry; null removes it).
    An unknown key is a ValueError naming the closest valid keys.
    """
    tree = cfg.to_dict()
    mappings = _mapping_fields(KitConfig)
    for key, value in values.items():
        if key in NOTEBOOK_PARAMETERS:
            if value is None:
                continue
            key = NOTEBOOK_PARAMETERS[key]
        mapping = next((m for m in mappings if key.startswith(m + ".")), None)
        if mapping is not None:  # data.columns.Date=timestamps: one entry of a mapping field
            section, field_name = mapping.rsplit(".", 1) if "." in mapping else ("", mapping)
            node = _walk(tree, section)
            entries = dict(node.get(field_name) or {})
            entry = key[len(mapping) + 1:]
            if value is None:
                entries.pop(entry, None)
            else:
                entries[entry] = value
            node[field_name] = entries or None
            continue
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ValueError(unknown_key_message(key))
            node = node[p]
        if leaf not in node or (isinstance(node[leaf], dict) and key not in mappings):
            raise ValueError(unknown_key_message(key))
        node[leaf] = value
    return KitConfig.from_dict(tree, source="overrides")


def _walk(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    for part in filter(None, dotted.split(".")):
        tree = tree[part]
    return tree


def _mapping_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the fields typed as mappings (e.g. `data.columns`)."""
    out = []
    for name, hint in _field_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out += _mapping_fields(hint, f"{prefix}{name}.")
        elif dict in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint))):
            out.append(prefix + name)
    return out


def _field_hints(cls: type) -> dict[str, Any]:
    """The type hint of each dataclass field of `cls` (class-level constants such as DEFAULT_TRAINABLE left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_fields(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted config field (`seed`, `data.source`, `tokenizer.max_steps`, ...), in declaration order."""
    cls = cls or KitConfig
    out = []
    for name, hint in _field_hints(cls).items():
        out += config_fields(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [prefix + name]
    return out


# names other tools use for a field, mapped to the kit's (a `-p learning_rate=...` gets `lr` suggested first)
FIELD_SYNONYMS = {
    "learning_rate": "lr", "lr_rate": "lr", "steps": "max_steps", "num_steps": "max_steps", "iterations": "max_steps",
    "max_iters": "max_steps", "num_epochs": "epochs", "n_epochs": "epochs", "batch": "batch_size", "bs": "batch_size",
    "wd": "weight_decay", "clip": "grad_clip", "max_grad_norm": "grad_clip", "warmup": "pct_start",
    "gradient_accumulation_steps": "grad_accum_steps", "accumulation": "grad_accum_steps", "horizon": "pred_len",
    "samples": "sample_count", "num_samples": "sample_count", "paths": "sample_count", "context": "max_context",
    "temp": "temperature", "topp": "top_p", "window": "lookback", "history": "lookback",
    "rank": "lora_rank", "early_stopping": "patience",
}


def unknown_key_message(key: str) -> str:
    """What to say about a mistyped parameter: the closest valid names first (a known synonym, then the fields of
    the section it names), then only the names that apply, never the whole list of fields on one line."""
    params, fields = [*NOTEBOOK_PARAMETERS, *RUN_PARAMETERS], config_fields()
    sections = [name for name, hint in _field_hints(KitConfig).items() if dataclasses.is_dataclass(hint)]
    head, _, leaf = key.rpartition(".")
    if head and head not in sections:  # a mistyped section: read the key in the closest one
        head = next(iter(difflib.get_close_matches(head, sections, n=1, cutoff=0.6)), head)
    prefix = f"{head}." if head else ""
    own = [f[len(prefix):] for f in fields if f.startswith(prefix) and "." not in f[len(prefix):]] if head else []
    if head in sections:
        names = own
    else:
        names = params + [f for f in fields if "." not in f] + [f.split(".")[-1] for f in fields]
    close = [FIELD_SYNONYMS[leaf]] if FIELD_SYNONYMS.get(leaf) in names else []
    close += [c for c in difflib.get_close_matches(leaf, names, n=3, cutoff=0.6) if c not in close]
    suggestions = list(dict.fromkeys(n for c in close[:3] for n in _full_names(prefix + c, fields)))
    hint = f"; did you mean {' or '.join(repr(c) for c in suggestions)}?" if suggestions else "."
    if head in sections:
        listing = f" The fields of {head}: {', '.join(own)}."
    else:
        listing = (f" Notebook parameters: {', '.join(params)}. Config sections: {', '.join(sections)} (e.g. "
                   f"-p predictor.lr=1e-5); other fields: {', '.join(f for f in fields if '.' not in f)}.")
    return (f"unknown parameter {key!r}{hint}{listing} `python -m kronos_kit pipeline --help` and the README's "
            "Configuration table describe every one.")


def _full_names(name: str, fields: list[str]) -> list[str]:
    """A bare field name as the dotted config fields that have it (`lookback` -> data.lookback; `lr` ->
    tokenizer.lr and predictor.lr); a parameter or a full field as it is."""
    if name in fields or name in NOTEBOOK_PARAMETERS or name in RUN_PARAMETERS:
        return [name]
    return [f for f in fields if f.endswith("." + name)] or [name]


def notebook_config(config: str | Path, run_dir: str | Path | None, **parameters: Any) -> KitConfig:
    """The config a notebook runs with: the YAML file, then its parameters (None = keep the file's).

    Relative paths resolve as `resolve_path` says, so the notebook runs the same from `notebooks/`
    (JupyterLab's working directory) and from the project root; `run_dir=None` means `runs/notebook`
    under the project root.
    """
    unknown = set(parameters) - set(NOTEBOOK_PARAMETERS)
    if unknown:
        raise ValueError(f"unknown notebook parameters {sorted(unknown)}; known: {sorted(NOTEBOOK_PARAMETERS)}")
    run_dir = resolve_path(run_dir or "runs/notebook", new=True)
    cfg = apply_overrides(KitConfig.from_file(resolve_path(config)), {**parameters, "run_dir": str(run_dir)})
    return resolve_paths(cfg)


# ---------------------------------------------------------------------------------------------
# paths: the same from any working directory


def project_root() -> Path:
    """The project folder: the one above the package when it holds `configs/` (a checkout or editable
    install), else the working directory (a plain install has no project folder of its own)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "configs").is_dir() else Path.cwd()


def resolve_path(path: str | Path, *, new: bool = False) -> Path:
    """A relative path from the working directory when it exists there, else from the project root.

    A path that exists in neither place comes back as given (so an error names it as the user wrote
    it), or under the project root when `new` (a folder about to be created, such as a run directory).
    Absolute paths and `~` paths are returned expanded.
    """
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    in_root = project_root() / path
    return in_root if new or in_root.exists() else path


def resolve_paths(cfg: KitConfig) -> KitConfig:
    """`cfg` with its relative data and checkpoint paths made absolute by `resolve_path`, so they hold
    from any working directory (a notebook kernel runs in `notebooks/`). Only sources that exist as
    paths change: sample names, presets, `embedded:` sources and hub ids stay as they are."""
    changes = {}
    for key in ("data.source", "tokenizer.start_from", "predictor.start_from", "predictor.tokenizer_from"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not isinstance(value, str) or value.startswith(("sample:", "embedded:")):
            continue
        if key != "data.source" and "/" not in value and os.sep not in value:
            continue  # a preset name such as "tiny", even if a folder of that name happens to exist here
        path = resolve_path(value)
        if path.exists() and str(path.resolve()) != value:
            changes[key] = str(path.resolve())
    for key, folder in (("cache_dir", cfg.cache_dir), ("predictor.token_cache_dir", cfg.predictor.token_cache_dir)):
        if folder and not Path(folder).expanduser().is_absolute():  # created on first use
            changes[key] = str(resolve_path(folder, new=True).resolve())
    return cfg.with_overrides(changes) if changes else cfg


def thread_count(cfg: KitConfig | None = None) -> int | None:
    """The torch CPU thread count asked for: `cfg.threads`, else $KRONOS_THREADS, else None (then
    `runtime.apply_threads` picks it by model width)."""
    if cfg is not None and cfg.threads is not None:
        return cfg.threads
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"${THREADS_ENV}={text!r}: set it to a whole number >= 1, or unset it")
    return int(text)


# ---------------------------------------------------------------------------------------------
# what a config changes


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {dotted field: value}; mapping fields stay one value."""
    out: dict[str, Any] = {}
    mappings = set(_mapping_fields(KitConfig))
    for key, value in values.items():
        name = prefix + key
        if isinstance(value, dict) and name not in mappings:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_diff(cfg: KitConfig, base: KitConfig | None = None, *,
                ignore: tuple[str, ...] = ("run_dir", "name")) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (base value, cfg value)} for every field where `cfg` differs from `base`
    (default: the kit's built-in defaults, `KitConfig()`); `ignore` leaves fields out."""
    ours, theirs = flatten(cfg.to_dict()), flatten((base or KitConfig()).to_dict())
    return {k: (theirs.get(k), v) for k, v in ours.items() if k not in ignore and theirs.get(k) != v}


def describe_config(cfg: KitConfig, base: KitConfig | None = None) -> str:
    """A few lines instead of the whole YAML: the run, then only the fields that differ from `base`
    (default: the kit's defaults; the full config is in the run directory's config.yaml)."""
    diff = config_diff(cfg, base)
    lines = [f"run {cfg.name!r} -> {cfg.run_dir}", f"data: {cfg.data.source}",
             f"{len(diff)} field(s) differ from the {'kit defaults' if base is None else 'base config'}:"]
    width = max((len(k) for k in diff), default=0)
    lines += [f"  {k:<{width}}  {v!r}   (default {d!r})" for k, (d, v) in diff.items()]
    return "\n".join(lines)


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
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"{where} must be a mapping of names to names (e.g. {{Date: timestamps}}), got {value!r}")
        return dict(value)
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
