"""Training curves as TensorBoard scalars (config `tensorboard: true`), beside `metrics.jsonl`.

`TensorBoardLog` mirrors the records `runs.MetricsLog` writes: each phase gets its own event folder,
`<run>/tensorboard/<phase>/`, and each number of a record becomes the scalar `<phase>_<kind>/<name>` at
the record's optimizer step (`predictor_train/loss`, `predictor_val/val_crps`; the starting model's
validation, the `reference` record, is the validation curves' point at step 0). So `tensorboard --logdir
runs/` lists every run's phases and overlays the same curve of several runs, as PyTorch users compare runs.

A resumed phase must not show the interrupted attempt's steps twice: the writer opens lazily with
TensorBoard's `purge_step` at the first step it writes, which hides every older event at that step or
later (a fresh start writes step 0 first, so an earlier run of the phase in the same folder is hidden too).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["FLUSH_SECONDS", "TensorBoardLog", "scalar_tag"]

FLUSH_SECONDS = 10  # a live `tensorboard` sees new points within this many seconds
KINDS = {"train": "train", "eval": "val", "reference": "val"}  # metrics.jsonl record kind -> scalar group
SKIPPED_KEYS = ("step", "epoch", "best", "attempt")  # bookkeeping numbers of a record, not curves


def scalar_tag(phase: str, kind: str, name: str) -> str:
    """The TensorBoard tag of `name` in a `kind` record of `phase`, e.g. `predictor_val/val_crps`."""
    return f"{phase}_{KINDS[kind]}/{name}"


class TensorBoardLog:
    """A `runs.MetricsLog` mirror writing TensorBoard event files under `folder/<phase>/`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.writers: dict[str, Any] = {}

    def write(self, record: dict[str, Any]) -> None:
        phase, kind = record.get("phase"), record.get("kind")
        if not isinstance(phase, str) or kind not in KINDS:
            return
        step = int(record.get("step", 0))
        writer = self._writer(phase, step)
        for name, value in record.items():
            if name in SKIPPED_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                writer.add_scalar(scalar_tag(phase, kind, name), float(value), step)

    def _writer(self, phase: str, step: int) -> Any:
        if phase not in self.writers:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package; only when switched on

            # purge_step: events of an earlier attempt at this step or later are hidden (see the module docstring)
            self.writers[phase] = SummaryWriter(str(self.folder / phase), purge_step=step, flush_secs=FLUSH_SECONDS)
        return self.writers[phase]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
