"""The run directory, defined once: its layout, atomic writes, the metrics log, JSON files, state keys.

```
<run_dir>/
  manifest.json  config.yaml  <stage notebooks>
  tokenizer/best tokenizer/last predictor/best predictor/last   (config.json + model.safetensors)
  state/<phase>.pt           training state for exact resume (keys: the *_KEY names below)
  metrics.jsonl              training log, one JSON line per logged step / evaluation, append-only
  codebook_before.json codebook_after.json reconstruction_gate.json token_metrics.json
  calibration.json promoted.json   sampling fitted and the pair promoted, both on validation
  metrics.json metrics_table.csv report.md   figures/*.png
```

Every file the kit writes into a run directory goes through an atomic helper here (a temporary
file renamed over the target), so a killed process never leaves half a file; checkpoint folders
are swapped whole (`replace_dir`, `recover_dir`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

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
CALIBRATION_FILE = "calibration.json"  # sampling temperature / top-p fitted on validation
PROMOTION_FILE = "promoted.json"  # which tokenizer + predictor the run promotes, and why
CHECKPOINT_KINDS = ("best", "last")

# keys of the training state (`state/<phase>.pt`), in the order they are saved
PHASE_KEY = "phase"
STEP_KEY = "step"
EPOCH_KEY = "epoch"
BATCH_KEY = "batch_in_epoch"
MODEL_KEY = "model"
OPT_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
BEST_KEY = "best"
EVALS_SINCE_BEST_KEY = "evals_since_best"
HISTORY_KEY = "history"
RNG_KEY = "rng"
STOPPED_KEY = "stopped"
CONFIG_KEY = "config"


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
    calibration = property(lambda self: self.path / CALIBRATION_FILE)
    promoted = property(lambda self: self.path / PROMOTION_FILE)


# ---------------------------------------------------------------------------------------------
# atomic writes


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def replace_dir(directory: str | Path, write: Callable[[Path], Any]) -> Path:
    """Replace `directory` with what `write(tmp_dir)` creates; a kill at any moment leaves a complete one."""
    directory = Path(directory)
    tmp, old = directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    recover_dir(directory)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def recover_dir(directory: str | Path) -> Path:
    """Finish a `replace_dir` swap that a kill interrupted (the previous complete copy comes back)."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.exists():
        os.replace(old, directory)
    return directory


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


# ---------------------------------------------------------------------------------------------
# the metrics log


class MetricsLog:
    """Append-only JSON lines (`metrics.jsonl`), written by rank 0 only."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def read_metrics(path: str | Path, phase: str | None = None) -> list[dict[str, Any]]:
    """Records of `metrics.jsonl`, optionally of one phase."""
    path = Path(path)
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if phase is None or r.get("phase") == phase]
