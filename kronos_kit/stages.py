"""A stage notebook's run: the first call of notebooks 01-03 (`open_stage`) and the last (`NotebookStage.done`).

Under the pipeline, the pipeline writes the run's `config.yaml` and records each stage in `manifest.json`.
Run anywhere else (JupyterLab, or papermill without the pipeline), a notebook records itself the same way,
through the same functions (`kronos_kit.provenance`), so a run made in Lab is a kit run that `forecast --run`,
`compare` and `pipeline --resume / --from` accept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kronos_kit.config import (
    NOTEBOOK_PARAMETERS,
    KitConfig,
    config_diff,
    describe_config,
    notebook_config,
    resolve_path,
    thread_count,
)
from kronos_kit.model.checkpoint import config_width
from kronos_kit.provenance import (
    PIPELINE_ENV,
    STAGE_CONFIG,
    STAGE_PHASES,
    STAGES,
    finish_stage,
    is_kit_run,
    load_manifest,
    open_run,
    start_stage,
)
from kronos_kit.run_lock import run_lock
from kronos_kit.runs import RunDir
from kronos_kit.runtime import apply_threads

__all__ = ["NotebookStage", "open_stage"]


@dataclass
class NotebookStage:
    """One stage notebook's run (`open_stage`): its config and run folder, and whether it records itself."""

    stage: str  # "01", "02" or "03"
    cfg: KitConfig
    rd: RunDir
    overwrite: bool  # what the training cell passes on: the notebook's `overwrite`, or True under the pipeline
    recorded: bool  # True: this notebook writes config.yaml and its manifest entries (no pipeline runs it)
    threads: str  # the thread count in effect, in words
    continued: str | None = None  # the run's saved config.yaml this notebook continues, if any

    def describe(self) -> str:
        """What the first cell prints: the config's differences from the defaults, threads, where it is recorded."""
        who = (f"recorded in {self.rd.manifest} as stage {self.stage} (the last cell marks it complete)"
               if self.recorded else "the pipeline records this stage")
        lines = [describe_config(self.cfg), self.threads, who]
        if self.continued:
            lines.append(f"continues the run's saved {self.continued} (`config` is read for a new run or notebook 01)")
        return "\n".join(lines)

    def done(self) -> str:
        """Mark the stage complete in the run's manifest (under the pipeline, the pipeline does); say so."""
        if not self.recorded:
            return f"stage {self.stage} done; the pipeline records it"
        with run_lock(self.rd.path, f"notebook {self.stage}"):
            finish_stage(self.rd.path, self.stage, status="completed")
        return f"stage {self.stage} recorded complete in {self.rd.manifest}"


def open_stage(stage: str, config: str | Path, run_dir: str | Path | None, *, resume: bool = False,
               overwrite: bool = False, **parameters: Any) -> NotebookStage:
    """Start stage `stage`'s notebook: its config, threads, and (outside the pipeline) its record.

    Under the pipeline (its kernels see `provenance.PIPELINE_ENV` naming this run folder) the config is the
    run's saved `config.yaml` the pipeline passes, the pipeline records the stage, and the stage may retrain
    what the folder holds. Run anywhere else, the notebook records itself as the pipeline would
    (`provenance.open_run`, `start_stage`; `NotebookStage.done` in its last cell):

    - notebooks 02 and 03, and 01 with `resume`, continue the run's saved `config.yaml` when it has one
      (parameters left at None keep its values; one that changes an earlier stage's field is refused);
      otherwise `config` is read;
    - a training stage the folder already holds is refused up front unless `overwrite` or `resume`, so Run
      All in a pipeline run's executed notebook (which carries no `overwrite`) cannot retrain that run.

    Threads: `threads` (or $KRONOS_THREADS) when given, else `runtime.default_threads` by model width.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    folder = resolve_path(run_dir or "runs/notebook", new=True)
    rd = RunDir(folder)
    piped = os.environ.get(PIPELINE_ENV) == str(folder.resolve())
    continued = not piped and rd.config.is_file() and is_kit_run(folder) and (stage != "01" or resume)
    source = rd.config if continued else resolve_path(config)
    cfg = notebook_config(source, folder, **parameters)
    if not piped:
        if continued:
            _refuse_earlier_changes(stage, cfg, KitConfig.from_file(rd.config), parameters)
        if not (overwrite or resume):
            _refuse_retraining(stage, cfg, rd)
    threads = apply_threads(thread_count(cfg), config_width(cfg))
    if not piped:
        given = {k: v for k, v in parameters.items() if v is not None}
        given.update({k: v for k, v in (("resume", resume), ("overwrite", overwrite)) if v})
        with run_lock(folder, f"notebook {stage}"):
            open_run(folder, cfg, by=f"notebook {stage}", mode="lab", config_source=str(source), parameters=given)
            start_stage(folder, stage, cfg, by=f"notebook {stage}", resumed=resume)
    return NotebookStage(stage, cfg, rd, overwrite or piped, not piped, threads,
                         str(rd.config) if continued else None)


def _refuse_earlier_changes(stage: str, cfg: KitConfig, saved: KitConfig, parameters: dict[str, Any]) -> None:
    """A parameter that would change what an earlier stage already produced is refused, naming it."""
    earlier = [f for s in list(STAGES)[:list(STAGES).index(stage)] for f in STAGE_CONFIG[s]]
    changes = {k: v for k, v in config_diff(cfg, saved, ignore=("run_dir", "threads", "name")).items()
               if any(k == f or k.startswith(f + ".") for f in earlier)}
    if changes:
        listing = "; ".join(f"{k}: the run has {old!r}, this notebook {new!r}" for k, (old, new) in changes.items())
        named = [p for p, field in NOTEBOOK_PARAMETERS.items() if parameters.get(p) is not None
                 and any(field == k or k.startswith(field + ".") for k in changes)]
        raise ValueError(f"notebook {stage} would change fields of an earlier stage of {saved.run_dir}: {listing}. "
                         f"Set {', '.join(named) or 'those parameters'} back to None (the run's values), rerun the "
                         "earlier notebook first, or use another run_dir")


def _refuse_retraining(stage: str, cfg: KitConfig, rd: RunDir) -> None:
    """A training stage whose phase the folder already holds is not run again without `overwrite` / `resume`."""
    for phase in STAGE_PHASES[stage]:
        held = rd.phase_files(phase) if getattr(cfg, phase).enabled else []
        if not held:
            continue
        listing = ", ".join(str(p.relative_to(rd.path)) for p in held)
        callers = [i.get("by", "pipeline") for i in load_manifest(rd.path).get("invocations", [])]
        rerun = (f"rerun the stage with `python -m kronos_kit pipeline --run-dir {rd.path} --from {stage}`, or "
                 if "pipeline" in callers else "")
        raise FileExistsError(
            f"{rd.path} already holds stage {stage}'s {phase} ({listing}); running this notebook again would retrain "
            f"it. To keep it, go on with the next notebook; to redo it, {rerun}set overwrite = True here (recorded "
            "in manifest.json); or start a new run with another run_dir")
