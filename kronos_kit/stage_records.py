"""The stages of a run write down what they consumed (issue 28): the writers of `binding.StageRecord`.

`binding` holds the record's schema and its one reader and checker (`binding.check_stages`); this module
holds what the stages call to write it, so a stage run from JupyterLab records the same as one the pipeline
runs: phase 1 and phase 2 (`train.train_tokenizer`, `train.train_predictor`: a record when training starts,
its outputs when it ends) and the evaluation (`start_evaluation`, the first call of notebook 03, which also
checks what stages 01 and 02 left behind before anything is evaluated).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kronos_kit.binding import StageRecord, check_stages, stage_record_path
from kronos_kit.config import KitConfig
from kronos_kit.runs import RunChoice, run_choice, save_json

__all__ = ["record_stage_finish", "record_stage_start", "save_stage_record", "start_evaluation"]

EVALUATED = ("base", "finetuned")  # the pairs stage 03 evaluates


def save_stage_record(run_dir: str | Path, record: StageRecord) -> Path:
    """Write a stage's record into `<run_dir>/stages/<NN>.json` (atomically)."""
    return save_json(stage_record_path(run_dir, record.stage), record.to_dict(), sort_keys=True)


def record_stage_start(run_dir: str | Path, stage: str, cfg: KitConfig, *, data_sha256: str | None,
                       inputs: Mapping[str, str | None], by: str) -> StageRecord:
    """Record that `stage` starts on `cfg`, the data `data_sha256` and `inputs` (role -> checkpoint or file)."""
    record = StageRecord.start(stage, cfg, data_sha256=data_sha256, inputs=inputs, run_dir=run_dir, by=by)
    save_stage_record(run_dir, record)
    return record


def record_stage_finish(run_dir: str | Path, record: StageRecord, outputs: Mapping[str, str]) -> StageRecord:
    """Record that the stage of `record` finished and wrote `outputs` (role -> checkpoint or file)."""
    finished = record.finish(outputs, run_dir)
    save_stage_record(run_dir, finished)
    return finished


def start_evaluation(cfg: KitConfig, data: Any) -> dict[str, RunChoice]:
    """Stage 03 begins: the base and finetuned pairs it evaluates (`runs.run_choice`), once the records of
    stages 01 and 02 show they consumed this data (`data.source_sha256`) and config and wrote the checkpoints
    the run holds (`binding.check_stages`, a `StaleRunError` naming what changed); then stage 03's own record
    names the data, the config and the four checkpoints."""
    if cfg.run_dir is None:
        raise ValueError("run_dir is not set: the evaluation reads and writes a run folder")
    run_dir = Path(cfg.run_dir)
    check_stages(run_dir, cfg, reader="stage 03 (the evaluation)", stages=("01", "02"),
                 data_sha256=data.source_sha256)
    sources = {name: run_choice(run_dir, cfg, model=name) for name in EVALUATED}
    inputs = {f"{name} {role}": getattr(sources[name], f"{role}_source")
              for name in EVALUATED for role in ("tokenizer", "predictor")}
    record_stage_start(run_dir, "03", cfg, data_sha256=data.source_sha256, inputs=inputs, by="start_evaluation")
    return sources
