"""The run directory, defined once: its layout, the metrics log, JSON files, the training state, the decisions.

The folder's layout is described once, in the README ("What appears in `runs/`"); `RunDir` below
names every file in it. The run's decisions (`promoted.json`, `calibration.json`) have their schema
here (`Promotion`, `SamplingCalibration`), and `run_choice` is the one answer to "which tokenizer,
predictor and sampling does this run use".

Every file the kit writes into a run directory goes through an atomic helper (`kronos_kit.atomic`,
re-exported here: a temporary file renamed over the target), so a killed process never leaves half a
file; checkpoint folders are swapped whole (`replace_dir`, `recover_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kronos_kit.atomic import (  # noqa: F401 (re-exported: every file of a run is written through these)
    DiskFullError,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_finite,
    finish_swap,
    recover_dir,
    replace_dir,
)
from kronos_kit.binding import check_bound, check_stage_complete, check_stages, decision_source
from kronos_kit.binding import run_relative as relative_source  # noqa: F401 (a source inside the run, relative)
from kronos_kit.config import DEFAULT_MAX_CONTEXT, DEFAULT_TOP_K, DataConfig, KitConfig
from kronos_kit.jsonl import log_records

# ---------------------------------------------------------------------------------------------
# layout

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
STATE_DIR = "state"
METRICS_LOG = "metrics.jsonl"
FIGURES_DIR = "figures"
CODEBOOK_BEFORE = "codebook_before.json"
CODEBOOK_AFTER = "codebook_after.json"
GATE = "reconstruction_gate.json"
TOKEN_METRICS = "token_metrics.json"
METRICS_JSON = "metrics.json"
METRICS_TABLE = "metrics_table.csv"
REPORT = "report.md"
FORECASTS = "forecasts.parquet"  # per-origin test forecasts of every model, for downstream backtests
CALIBRATION_FILE = "calibration.json"  # sampling and the sample-path calibration, fitted on validation
PROMOTION_FILE = "promoted.json"  # which tokenizer + predictor the run promotes, and why
UNIVERSE_FILE = "universe.json"  # a panel's universe evaluation: per split and signal, IC, quantiles, portfolios
SIGNALS_FILE = "signals.parquet"  # a panel's per-date signals, indexed by (datetime, instrument)
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files, one folder per phase (config `tensorboard`)
CHECKPOINT_KINDS = ("best", "last")

# the parts of the training state (`state/<phase>.pt`) besides the counters of `TrainState`
PHASE_KEY = "phase"
MODEL_KEY = "model"
OPT_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
RNG_KEY = "rng"
CONFIG_KEY = "config"
STATE_PARTS = (PHASE_KEY, MODEL_KEY, OPT_KEY, SCHEDULER_KEY, RNG_KEY, CONFIG_KEY)


@dataclasses.dataclass
class TrainState:
    """The counters resume restores besides weights, optimizer and RNG: saved and restored by field name
    (`state_counters`, `restore_counters`), so a field added here is saved and restored with no other edit."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float = math.inf
    evals_since_best: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: str | None = None  # set once the phase has finished
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient
    run_id: str = ""  # this phase run's id (metrics.jsonl `run`): new on a fresh start, kept on resume
    attempt: int = 1  # 1 for the fresh start, +1 for each resume


def state_counters(state: TrainState) -> dict[str, Any]:
    """`state`'s fields by name, as `state/<phase>.pt` holds them beside the `STATE_PARTS`."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}


def restore_counters(saved: Mapping[str, Any]) -> TrainState:
    """The `TrainState` a saved training state holds (its fields by name)."""
    return TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState)})


def state_keys() -> tuple[str, ...]:
    """Every key of a training state the kit writes: the parts and the counters."""
    return STATE_PARTS + tuple(f.name for f in dataclasses.fields(TrainState))


class RunFileError(ValueError):
    """A file in a run directory that the kit refuses to read (not plain data, or not the kit's)."""


class RunDir:
    """The files of one run directory; `rd / name` for anything else (e.g. an executed notebook)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def checkpoint(self, phase: str, kind: str = "best") -> Path:
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, not {kind!r}")
        return self.path / phase / kind

    def state(self, phase: str) -> Path:
        return self.path / STATE_DIR / f"{phase}.pt"

    def phase_files(self, phase: str) -> list[Path]:
        """What the folder holds of a training phase (its state, `best`, `last`): a fresh start would replace it."""
        return [p for p in (self.state(phase), *(self.checkpoint(phase, k) for k in CHECKPOINT_KINDS)) if p.exists()]

    @property
    def figures(self) -> Path:
        folder = self.path / FIGURES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    manifest = property(lambda self: self.path / MANIFEST)
    config = property(lambda self: self.path / CONFIG)
    metrics_log = property(lambda self: self.path / METRICS_LOG)
    codebook_before = property(lambda self: self.path / CODEBOOK_BEFORE)
    codebook_after = property(lambda self: self.path / CODEBOOK_AFTER)
    gate = property(lambda self: self.path / GATE)
    token_metrics = property(lambda self: self.path / TOKEN_METRICS)
    metrics_json = property(lambda self: self.path / METRICS_JSON)
    metrics_table = property(lambda self: self.path / METRICS_TABLE)
    report = property(lambda self: self.path / REPORT)
    forecasts = property(lambda self: self.path / FORECASTS)
    calibration = property(lambda self: self.path / CALIBRATION_FILE)
    promoted = property(lambda self: self.path / PROMOTION_FILE)
    universe = property(lambda self: self.path / UNIVERSE_FILE)
    signals = property(lambda self: self.path / SIGNALS_FILE)
    tensorboard = property(lambda self: self.path / TENSORBOARD_DIR)


# ---------------------------------------------------------------------------------------------
# the training state


def save_training_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write a training state (plain data: tensors, numbers, strings, lists, dicts) atomically."""
    return atomic_torch_save(state, path)


def load_training_state(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read `state/<phase>.pt` as plain data (`weights_only=True`): a crafted pickle is refused, never run."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFileError(
            f"{path} is not a training state the kit wrote: it does not load as plain data ({first}). "
            "A run folder is data and loading it never runs code, so this file is refused. Delete it (and "
            "train without resume), or resume only from a run folder the kit wrote."
        ) from err
    missing = [k for k in state_keys() if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunFileError(f"{path} lacks the training-state keys {missing}: it was written by another kit "
                           "version or is not a kit state; delete it and train without resume")
    return state


# ---------------------------------------------------------------------------------------------
# JSON files


def json_float(v: float | None) -> float | None:
    """A float JSON can hold: NaN and inf become None (null)."""
    return None if v is None or not math.isfinite(v) else float(v)


def save_json(path: str | Path, obj: Any, *, indent: int = 2, newline: bool = True, **dumps: Any) -> Path:
    """Write `obj` as JSON atomically (`dumps` go to `json.dumps`: sort_keys, default, allow_nan)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps) + ("\n" if newline else ""))


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a broken one raises a ValueError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or rerun the step that writes it") from err


class JsonFile:
    """`save(path)` / `load(path)` for results with `to_dict()` / `from_dict()`."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        return save_json(path, self.to_dict(), indent=1, newline=False)

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(load_json(path))


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON data: numpy scalars and arrays to numbers and lists, NaN / inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


# ---------------------------------------------------------------------------------------------
# the metrics log


class MetricsLog:
    """JSON lines (`metrics.jsonl`), written by rank 0 only; each record names its phase run and attempt.

    A phase run (`run`) begins with a fresh start and continues over resumes (`attempt` 1, 2, ...);
    `drop_after` removes what an interrupted attempt logged past the step a resume restarts from.
    `mirror` (e.g. `tracking.TensorBoardLog`) gets every record too; `close` closes it.
    """

    def __init__(self, path: str | Path, enabled: bool = True, *, run: str | None = None, attempt: int | None = None,
                 mirror: Any = None):
        self.path, self.enabled, self.run, self.attempt = Path(path), enabled, run, attempt
        self.mirror = mirror if enabled else None
        self.mended = False  # whether a line an earlier writer left cut short was cut off the file

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        tags = {k: v for k, v in (("run", self.run), ("attempt", self.attempt)) if v is not None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.mended:  # a line an earlier writer left cut short must not swallow this record
            log_records(self.path, mend=True)
            self.mended = True
        with self.path.open("a") as f:
            f.write(json.dumps({**record, **tags}, default=float) + "\n")
        if self.mirror is not None:
            self.mirror.write(record)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()

    def drop_after(self, phase: str, step: int) -> None:
        """Remove this run's records of `phase` past `step` (a resume replays from `step`)."""
        if not self.enabled or not self.path.is_file():
            return
        records = log_records(self.path, mend=True)
        keep = [r for r in records if not _superseded(r, phase, self.run, step)]
        if len(keep) < len(records):
            atomic_write_text(self.path, "".join(json.dumps(r, default=float) + "\n" for r in keep))


def _superseded(record: dict[str, Any], phase: str, run: str | None, step: int) -> bool:
    return record.get("phase") == phase and record.get("run") == run and record.get("step", -1) > step


def current_records(records: list[dict[str, Any]], phase: str | None = None) -> list[dict[str, Any]]:
    """The records of each phase's latest run, the last one per (phase, kind, step), in log order.

    Earlier runs of a phase (a rerun after `--from` / `--overwrite`) and records an interrupted
    attempt wrote twice are left out, so curves show one run.
    """
    latest = {r.get("phase"): r.get("run") for r in records}
    kept = {}
    for i, r in enumerate(records):
        if (phase is None or r.get("phase") == phase) and r.get("run") == latest[r.get("phase")]:
            kept[(r.get("phase"), r.get("kind"), r.get("step"))] = (i, r)
    return [r for _, r in sorted(kept.values(), key=lambda ir: ir[0])]


def read_metrics(path: str | Path, phase: str | None = None) -> list[dict[str, Any]]:
    """The current records of `metrics.jsonl` (see `current_records`), optionally of one phase."""
    return current_records(log_records(Path(path)), phase)


# ---------------------------------------------------------------------------------------------
# the run's decisions (promoted.json, calibration.json) and what the run uses


class DecisionFile:
    """Plain-JSON save/load of a decision dataclass: a run folder is data, loading it runs no code.

    ``save``/``load`` take the run directory (the file name is the class's ``FILE``) or a ``.json`` path;
    ``load`` checks every field and names the file and field at fault. A new field with a default
    extends the schema without breaking older files.
    """

    FILE: ClassVar[str]

    @classmethod
    def _path(cls, path: str | Path) -> Path:
        path = Path(path)
        return path if path.suffix == ".json" else path / cls.FILE

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def save(self, path: str | Path) -> Path:
        return save_json(self._path(path), self.to_dict(), allow_nan=False)

    @classmethod
    def load(cls, path: str | Path):
        path = cls._path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {cls.__name__} is written by the validation step of "
                                    "notebook 03 (promoted.json and calibration.json), or call .save on one")
        data = load_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        unknown = set(data) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; expected {sorted(f.name for f in fields)}")
        for f in fields:
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"{path}: field {f.name!r} is missing; rerun notebook 03's validation step")
                continue
            kinds, what = _JSON_TYPES[f.type]
            value = data[f.name]
            if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
                raise ValueError(f"{path}: field {f.name!r} must be {what}, got {type(value).__name__} {value!r}; "
                                 "rerun notebook 03's validation step to rewrite it")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


# dataclass field annotations (strings under `from __future__ import annotations`) -> JSON types
_JSON_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"), "float": ((int, float), "a number"), "int": ((int,), "a whole number"),
    "dict[str, Any]": ((dict,), "a JSON object"), "list[dict[str, Any]]": ((list,), "a JSON list"),
}


@dataclasses.dataclass
class Promotion(DecisionFile):
    """Which tokenizer + predictor a run hands on (`evaluate.decide_promotion`), with the validation evidence.

    Sources inside the run directory are written relative to it (`predictor/best`), so the folder can move.
    """

    FILE: ClassVar[str] = PROMOTION_FILE

    promoted: str  # "finetuned" or "base"
    tokenizer: str
    predictor: str
    metric: str = "close_crps"
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    rule: str = ""
    reason: str = ""
    split: str = "validation"
    checkpoints: dict[str, Any] = dataclasses.field(default_factory=dict)  # binding.bind: the weights it chose


@dataclasses.dataclass
class SamplingCalibration(DecisionFile):
    """Sampling temperature and top-p fitted on the validation split (`evaluate.calibrate_sampling`).

    ``before`` / ``after`` hold temperature, top_p, close CRPS and the coverage of the 50/80/95% close
    intervals of ``model`` as sampled at the configured setting and after the whole calibration (sampling,
    then its path calibration); ``grid`` holds the temperature / top-p grid when one was searched. ``paths``
    maps each model name to its path calibration fitted on the validation paths
    (:meth:`kronos_kit.calibration.PathCalibrationFit.to_dict`: the transform, every candidate's held-out
    CRPS and coverage, the rule); :meth:`path_calibration` reads one back. ``handover``: the handed-over forecast
    of ``model`` (:meth:`kronos_kit.calibration.HandoverFit.to_dict`), read back by :meth:`handover_choice`.
    """

    FILE: ClassVar[str] = CALIBRATION_FILE

    temperature: float
    top_p: float
    model: str = ""  # the promoted model it was fitted for
    before: dict[str, Any] = dataclasses.field(default_factory=dict)
    after: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    n_origins: int = 0
    rule: str = ""
    metric: str = "close_crps"
    split: str = "validation"
    checkpoints: dict[str, Any] = dataclasses.field(default_factory=dict)  # binding.bind: the weights it is for
    paths: dict[str, Any] = dataclasses.field(default_factory=dict)
    handover: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.paths:
            self.path_calibration(name)  # a malformed entry fails at load, naming it
        self.handover_choice()

    def handover_choice(self, model: str | None = None) -> dict[str, Any]:
        """The plain JSON of the handed-over forecast of ``model`` (``{}``: none; `calibration.Handover.from_dict`)."""
        fit = self.handover.get("handover", None if self.handover else {})
        if not isinstance(fit, dict) or fit and model not in (None, self.model):
            raise ValueError(f"{CALIBRATION_FILE}: 'handover' must hold a 'handover' object fitted for the promoted "
                             f"{model or self.model!r} (it names {self.model!r}); rerun notebook 03's validation step")
        return dict(fit)

    def path_calibration(self, model: str | None = None) -> dict[str, Any]:
        """The plain-JSON path calibration fitted for ``model`` (default: the promoted ``model``), ``{}`` (the
        identity) when none; `kronos_kit.calibration.PathCalibration.from_dict` turns it into the transform
        (this module stays below the calibration code, so it only checks the shape)."""
        name = self.model if model is None else model
        entry = self.paths.get(name, {})
        fit = entry.get("path_calibration", {}) if isinstance(entry, dict) else None
        if not isinstance(fit, dict):
            raise ValueError(f"{CALIBRATION_FILE} paths[{name!r}] must be a JSON object with a 'path_calibration' "
                             f"object, got {entry!r}; rerun notebook 03's validation step to rewrite it")
        return dict(fit)

    def sampling(self) -> dict[str, float]:
        """Keyword arguments for `evaluate.evaluate_models` / `KronosPredictor.as_forecast_fn`."""
        return {"temperature": self.temperature, "top_p": self.top_p}

    def table(self):
        """Rows ``before`` / ``after``: temperature, top_p, close CRPS and 50/80/95% interval coverage (validation)."""
        import pandas as pd

        table = pd.DataFrame.from_dict({"before": self.before, "after": self.after}, orient="index")
        table.index.name = "setting"
        return table


@dataclasses.dataclass
class RunChoice:
    """Which tokenizer, predictor and sampling a run uses (`run_choice`)."""

    promoted: str  # "finetuned" or "base": the model these sources are
    tokenizer_source: str  # resolved: a source written relative to the run directory points inside it
    predictor_source: str
    sampling: dict[str, float]  # temperature, top_p
    calibrated: bool  # True when `sampling` comes from calibration.json
    top_k: int = DEFAULT_TOP_K
    max_context: int = DEFAULT_MAX_CONTEXT
    lookback: int = DataConfig.lookback  # bars of history the run's models were trained and evaluated with
    # applied to the sample paths after sampling (calibration.json's fit for this model; identity otherwise)
    path_calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # plain JSON; {}: identity
    # then the handed-over forecast: ensemble with naive forecasts and tails (calibration.json; {}: none)
    handover: dict[str, Any] = dataclasses.field(default_factory=dict)


RUN_MODELS = ("promoted", "finetuned", "base")


def run_choice(run_dir: str | Path, cfg: KitConfig | None = None, *, model: str = "promoted",
               calibrated: bool = True) -> RunChoice:
    """The one answer to "which tokenizer, predictor and sampling does this run use".

    ``model``:

    - ``"promoted"``: the pair `promoted.json` names (FileNotFoundError until the validation step wrote
      it), sampled and its paths calibrated as `calibration.json` says when present and ``calibrated``; both
      files must still match the weights they were decided for and stage 03 must be complete (`binding`:
      `StaleDecisionError`);
    - ``"finetuned"``: the run's own pair: ``predictor.tokenizer_from`` if set, else phase 1's best
      tokenizer when phase 1 is on or has run (it must exist), else ``tokenizer.start_from``; phase 2's
      best predictor when phase 2 is on or has run (the folder it writes), else ``predictor.start_from``;
    - ``"base"``: ``tokenizer.start_from`` and ``predictor.start_from``.

    Sampling that no calibration decided is ``cfg.evaluation``'s. ``cfg`` defaults to the run's
    `config.yaml` (the kit's defaults without one). Reads plain JSON and YAML only.
    """
    if model not in RUN_MODELS:
        raise ValueError(f"model must be one of {RUN_MODELS}, got {model!r}")
    rd = RunDir(run_dir)
    if cfg is None:
        cfg = KitConfig.from_file(rd.config) if rd.config.is_file() else KitConfig()
    e = cfg.evaluation
    sampling, is_calibrated = {"temperature": e.temperature, "top_p": e.top_p}, False
    path_calibration: dict[str, Any] = {}
    handover: dict[str, Any] = {}
    if model == "promoted":
        promotion = Promotion.load(rd.path)
        name = promotion.promoted
        tokenizer, predictor = _decided_sources(rd, cfg, promotion)
        if calibrated and rd.calibration.is_file():
            calibration = SamplingCalibration.load(rd.path)
            check_bound(calibration.checkpoints, {"tokenizer": tokenizer, "predictor": predictor}, rd.calibration)
            sampling, is_calibrated = calibration.sampling(), True
            path_calibration = calibration.path_calibration(name)
            handover = calibration.handover_choice(name)
    elif model == "finetuned":
        name = model
        tokenizer = cfg.predictor.tokenizer_from or _trained(rd, "tokenizer", cfg.tokenizer.enabled,
                                                              cfg.tokenizer.start_from, must_exist=True)
        predictor = _trained(rd, "predictor", cfg.predictor.enabled, cfg.predictor.start_from, must_exist=False)
    else:
        name, tokenizer, predictor = model, cfg.tokenizer.start_from, cfg.predictor.start_from
    return RunChoice(name, tokenizer, predictor, {k: float(v) for k, v in sampling.items()}, is_calibrated,
                     top_k=e.top_k, max_context=e.max_context, lookback=cfg.data.lookback,
                     path_calibration=path_calibration, handover=handover)


def _decided_sources(rd: RunDir, cfg: KitConfig, promotion: Promotion) -> tuple[str, str]:
    """The promoted pair, checked: stage 03 complete, sources inside the run or its configured base, and
    the weights and the stages' records unchanged since (`binding`); a `StaleDecisionError` / `StaleRunError`."""
    check_stage_complete(load_json(rd.manifest) if rd.manifest.is_file() else None, rd.promoted)
    check_stages(rd.path, cfg, reader=rd.promoted.name, external=False)
    configured = {"tokenizer": (cfg.tokenizer.start_from, cfg.predictor.tokenizer_from),
                  "predictor": (cfg.predictor.start_from,)}
    resolved = {role: decision_source(getattr(promotion, role), rd.path, configured[role], role, rd.promoted)
                for role in ("tokenizer", "predictor")}
    check_bound(promotion.checkpoints, resolved, rd.promoted)
    return resolved["tokenizer"], resolved["predictor"]


def _trained(rd: RunDir, phase: str, enabled: bool, start_from: str, *, must_exist: bool) -> str:
    """The best checkpoint of ``phase`` when the phase is on or has run, else its ``start_from``."""
    own = recover_dir(rd.checkpoint(phase, "best"))
    if not (enabled or own.exists()):
        return start_from
    if must_exist and not own.exists():
        hint = "set predictor.tokenizer_from" if phase == "tokenizer" else "set predictor.enabled: false"
        raise FileNotFoundError(f"{own} not found: run phase {1 if phase == 'tokenizer' else 2} first, or {hint}")
    return str(own)
