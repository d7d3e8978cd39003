"""End-to-end runs: notebooks 01 -> 02 -> 03 executed by papermill into one run directory.

`run_pipeline` checks everything a user can get wrong before it creates anything (parameter names,
the config, the data source, the run folder; a `UsageError` says what to do), then resolves the
config and parameters, writes `<run_dir>/config.yaml`, executes each notebook with papermill (the
executed copy lands in the run directory, errors visible) with its working directory in
`notebooks/` as JupyterLab has it, and keeps `<run_dir>/manifest.json` up to date: parameters,
seed, package versions, git commit and dirty flag, a hash of the input data, hashes of every
checkpoint written, and each stage's status, duration and input hash.

While a stage trains, its progress (step, loss, ETA) is printed from the run's metrics log; the run
ends with a summary (gate, verdict, promotion, time per stage, report path).

`--resume` continues the run it is given with that run's saved config (a `-p` that would change it
is refused): completed stages with unchanged inputs are skipped, and an interrupted training stage
continues from its saved state. `--from STAGE` reruns from a stage with the saved config (a `-p`
may change later stages' fields only). Both refuse a folder that is not a kit run.
Notebooks pass results to each other only through files in the run directory.

The run directory's layout lives in
`kronos_kit.runs`; notebook parameters and overrides go through `kronos_kit.config.apply_overrides`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kronos_kit.binding import STAGE_CONFIG, check_stages, file_sha256, recorded_config
from kronos_kit.config import (
    NOTEBOOK_PARAMETERS,
    KitConfig,
    apply_overrides,
    config_diff,
    parse_overrides,
    project_root,
    resolve_path,
    resolve_paths,
    thread_count,
)
from kronos_kit.data import load_data
from kronos_kit.data.origins import forecast_origins, walk_forward_frame
from kronos_kit.evaluate.universe_evaluation import check_promote_on
from kronos_kit.model.checkpoint import config_width
from kronos_kit.provenance import (
    NOTEBOOK_DIR,
    PIPELINE_ENV,
    RUN_KIND,
    STAGES,
    checkpoint_hashes,
    finish_stage,
    is_kit_run,
    load_manifest,
    open_run,
    stage_input_hash,
    start_stage,
)
from kronos_kit.run_lock import RunLockedError, run_lock
from kronos_kit.runs import Promotion, RunDir, load_json
from kronos_kit.runtime import PROGRESS_ENV, apply_threads, check_device, format_seconds
from kronos_kit.train import check_phases

# the run's record (config.yaml, manifest.json) is written by kronos_kit.provenance, which notebook runs and sweep
# trials share; what each stage consumed is its own record (kronos_kit.binding, stages/<NN>.json)
__all__ = ["NOTEBOOK_DIR", "RUN_KIND", "STAGES", "STAGE_CONFIG", "UsageError", "checkpoint_hashes", "create_run_dir",
           "file_sha256", "is_kit_run", "pipeline_summary", "run_name", "run_pipeline"]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/default.yaml"
KERNEL_NAME = "kronos-kit"
# the kernel process's own log (a TCP-transport warning at start, a KeyboardInterrupt note at shutdown) is
# noise in the terminal; what fails inside a notebook reaches the pipeline as a cell error instead
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]


# ---------------------------------------------------------------------------------------------
# checking a call before anything is created


class UsageError(ValueError):
    """A mistake in how the pipeline was called (a parameter, a path, a run folder). Nothing was
    created; the message says what to do. The command line prints it and exits with code 2."""


def run_name(cfg: KitConfig, when: dt.datetime | None = None) -> str:
    """`<config name>-<data name>-<YYYYmmdd-HHMMSS>`: the sample name, or the data file's / folder's stem."""
    source = cfg.data.source
    data = source.removeprefix("sample:") if source.startswith("sample:") else Path(source).name
    data = re.sub(r"\.(csv|csv\.gz|txt|parquet|pq)$", "", data, flags=re.IGNORECASE)
    data = re.sub(r"[^A-Za-z0-9._-]+", "-", data).strip("-.") or "data"
    return f"{cfg.name}-{data}-{(when or dt.datetime.now()):%Y%m%d-%H%M%S}"


def create_run_dir(parent: str | Path, name: str) -> Path:
    """Create `parent/name`, or `name-2`, `name-3`, ... when it exists: `mkdir` is atomic, so two
    pipelines started in the same second get different folders."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = parent / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


@dataclass
class _Plan:
    """A checked call: the config to run, where, and how."""

    cfg: KitConfig
    values: dict[str, Any]
    config_source: str
    run_dir: Path | None  # None: a new folder named by `run_name` under <project>/runs
    mode: str  # "new", "resume" or "from"
    from_stage: str | None
    train_windows: int = 0  # set by _check_inputs once the data is loaded
    data_sha256: str | None = None  # the data's bytes (`data.store.source_sha256`), set with it


def _usage(fn: Callable[[], Any], what: str = "") -> Any:
    """Run `fn`; a ValueError / FileNotFoundError (a config, parameter or data problem) becomes a UsageError."""
    try:
        return fn()
    except UsageError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        raise UsageError(f"{what}{err}") from None


def _saved_config(run_dir: Path, flag: str) -> KitConfig:
    if not run_dir.is_dir():
        raise UsageError(f"{flag}: run folder {run_dir} not found; give the folder of a pipeline run (runs/<name>)")
    if not is_kit_run(run_dir):
        raise UsageError(f"{flag}: {run_dir} is not a kronos-kit run (no manifest.json of ours); give the folder "
                         "of a pipeline run, or start a new run with another --run-dir")
    return _usage(lambda: KitConfig.from_file(RunDir(run_dir).config), f"{flag}: the run's saved config: ")


def _describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: saved {old!r}, given {new!r}" for key, (old, new) in changes.items())


def _stage_fields(stages: list[str]) -> tuple[str, ...]:
    return tuple(f for s in stages for f in STAGE_CONFIG[s])


def _plan(config: str | Path | None, run_dir: str | Path | None, values: dict[str, Any], *, resume: bool,
          from_stage: str | None, overwrite: bool) -> _Plan:
    """Every check a call needs, in order; raises UsageError and creates nothing."""
    if from_stage is not None and from_stage not in STAGES:
        raise UsageError(f"--from {from_stage!r}: not a stage; the stages are {', '.join(STAGES)} "
                         f"({', '.join(f'{k} = {v}' for k, v in STAGES.items())})")
    if resume and from_stage is not None:
        raise UsageError("--resume and --from do not combine: --resume continues where the run stopped, "
                         "--from STAGE reruns the run from STAGE")
    mode = "resume" if resume else "from" if from_stage else "new"
    flag = {"resume": "--resume", "from": f"--from {from_stage}"}.get(mode)
    if flag and run_dir is None:
        raise UsageError(f"{flag} needs --run-dir: the run folder to continue (e.g. runs/default-nasdaq-...)")
    if flag and config is not None:
        raise UsageError(f"{flag} uses the run's saved config.yaml; leave out --config (and give -p only for what "
                         f"{'may change' if mode == 'from' else 'you want to check'})")
    run_dir = Path(run_dir) if run_dir is not None else None
    if mode == "new":
        config = resolve_path(config or DEFAULT_CONFIG)
        cfg = _usage(lambda: apply_overrides(KitConfig.from_file(config), values))
        if run_dir is None and cfg.run_dir:
            run_dir = resolve_path(cfg.run_dir, new=True)
        if run_dir is not None and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            if not overwrite:
                raise UsageError(f"--run-dir {run_dir} exists and is not empty; pass --resume to continue it, "
                                 "--overwrite to reuse it, or choose another --run-dir")
            if not is_kit_run(run_dir):
                raise UsageError(f"--overwrite: {run_dir} is not a kronos-kit run (no manifest.json of ours); "
                                 "the pipeline only reuses folders it wrote. Choose another --run-dir")
        config_source = str(config)
    else:
        saved = _saved_config(run_dir, flag)
        cfg = _usage(lambda: apply_overrides(saved, values), f"{flag}: ")
        changes = config_diff(cfg, saved, ignore=("run_dir", "threads"))  # threads never change a result
        if mode == "resume" and changes:
            raise UsageError(f"--resume continues {run_dir} as it was configured, but -p changes it: "
                             f"{_describe_changes(changes)}. Drop those -p, rerun later stages with changes by "
                             "--from STAGE, or start a new run")
        if mode == "from":  # the earlier stages' fields as they ran (their records), not as config.yaml says now
            earlier = list(STAGES)[:list(STAGES).index(from_stage)]
            ran = _usage(lambda: saved.with_overrides(recorded_config(run_dir, earlier)), f"{flag}: ")
            frozen = {k: v for k, v in config_diff(cfg, ran, ignore=("run_dir", "threads")).items()
                      if any(k == f or k.startswith(f + ".") for f in _stage_fields(earlier))}
            if frozen:
                keep = " ".join(f"-p {k}={json.dumps(old)}" for k, (old, _) in frozen.items())
                raise UsageError(f"{flag} keeps the earlier stages' outputs, so their fields cannot change: "
                                 f"{_describe_changes(frozen)} (config.yaml or -p). Pass what they ran with ({keep}), "
                                 f"rerun from an earlier stage (--from {earlier[0]}), or start a new run")
        config_source = str(RunDir(run_dir).config)
        cfg = cfg.with_overrides(run_dir=str(run_dir.resolve()))  # the folder opened (moved or not) holds the cache
    cfg = resolve_paths(cfg)
    _usage(lambda: check_device(cfg.device), "device: ")
    _usage(lambda: thread_count(cfg))  # a bad $KRONOS_THREADS, before the run folder exists
    return _Plan(cfg, values, config_source, run_dir, mode, from_stage)


def _check_inputs(plan: _Plan) -> None:
    """What needs the data: origins, batches, strategies (`_check_origins`, `train.check_phases`) and, for --resume /
    --from, what the earlier stages consumed (`_check_consumed`); sets `plan.train_windows`. Loading the data
    writes its cache: the caller holds the run folder's lock when the folder exists."""
    bundle = _usage(lambda: load_data(plan.cfg), f"data.source {plan.cfg.data.source!r}: ")
    _check_origins(plan.cfg, bundle)
    _usage(lambda: check_promote_on(bundle.splits, plan.cfg.evaluation, lookback=plan.cfg.data.lookback))
    _usage(lambda: check_phases(plan.cfg, len(bundle.train)))
    plan.train_windows, plan.data_sha256 = len(bundle.train), bundle.source_sha256
    if plan.mode != "new":
        _check_consumed(plan)


def _check_consumed(plan: _Plan) -> None:
    """--resume / --from go on from stages that ran: their records must match the data, config and checkpoints
    the run holds now (`binding.check_stages`), and a phase 2 about to run needs its gate (`gate_for_phase2`)."""
    from kronos_kit.gate import TokenizerGateError, gate_for_phase2

    names = list(STAGES)
    done = {s for s, r in load_manifest(plan.run_dir).get("stages", {}).items()
            if r.get("status") == "completed"}
    flag = "--resume" if plan.mode == "resume" else f"--from {plan.from_stage}"
    earlier = names if plan.mode == "resume" else names[:names.index(plan.from_stage)]
    # a resumed stage rewrites its files (and so may the ones after it): their data and config must still match
    kept = names[:next((i for i, s in enumerate(names) if s not in done), len(names))]
    _usage(lambda: check_stages(plan.run_dir, plan.cfg, reader=flag, stages=earlier, data_sha256=plan.data_sha256,
                                files=kept if plan.mode == "resume" else None))
    phase2_next = plan.from_stage == "02" or (plan.mode == "resume" and "01" in done and "02" not in done)
    if phase2_next and plan.cfg.predictor.enabled:
        try:
            gate_for_phase2(plan.run_dir, plan.cfg)
        except TokenizerGateError as err:
            raise UsageError(f"{flag}: {err}") from None


def _check_origins(cfg: KitConfig, bundle: Any) -> None:
    """Refuse up front a horizon the validation or test split cannot hold (stage 03 would fail after training)."""
    e, lookback = cfg.evaluation, cfg.data.lookback
    checks = [("validation", bundle.splits.val, e.pred_len, e.stride, "evaluation.pred_len"),
              ("test", bundle.splits.test, e.pred_len, e.stride, "evaluation.pred_len")]
    if cfg.predictor.enabled and cfg.predictor.skill_origins:
        p = cfg.predictor
        checks.append(("validation", bundle.splits.val, p.skill_horizon, p.skill_stride, "predictor.skill_horizon"))
    from kronos_kit.evaluate.decisions import MIN_DECISION_ORIGINS

    val = forecast_origins(walk_forward_frame(bundle.splits.val), lookback=lookback, pred_len=e.pred_len,
                           stride=e.stride, max_origins=e.val_origins)
    if 0 < val["origin_time"].nunique() < MIN_DECISION_ORIGINS:
        _say(f"[pipeline] warning: the validation split holds {val['origin_time'].nunique()} forecast origin times "
             f"(fewer than {MIN_DECISION_ORIGINS}): stage 03 will keep the base pair and the configured sampling. "
             "Raise evaluation.val_origins, lower evaluation.stride, or enlarge the validation split", err=True)
    for split, frame, horizon, stride, field in checks:
        origins = forecast_origins(walk_forward_frame(frame), lookback=lookback, pred_len=horizon, stride=stride)
        if origins.empty:
            own = frame[~frame["is_context"].astype(bool)] if "is_context" in frame else frame
            longest = int(own.groupby("symbol").size().max()) if len(own) else 0
            raise UsageError(f"{field}={horizon}: the {split} split has no forecast origin (its longest symbol "
                             f"has {longest} bars of its own; an origin needs {horizon} bars after "
                             f"data.lookback={lookback} bars of history). Lower {field}, or enlarge the {split} "
                             "split (data.val_ratio / data.train_ratio) or the data")


# ---------------------------------------------------------------------------------------------
# what the terminal shows


def _say(message: str, *, err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


class _StageProgress:
    """Prints a stage's progress in the terminal while papermill runs its notebook: every progress bar of the
    kernel (`runtime.tqdm` reports its state to `progress_file`: training steps with the loss and the engine's
    ETA, walk-forwards, GARCH fits, ...) and each training validation from the run's metrics log.

    A bar is shown once it has run `quiet_below` seconds (short steps stay quiet), then at each further tenth
    of its total or every 30 s, and when it ends ("done in ..."); about a dozen lines per long step."""

    def __init__(self, progress_file: Path, log: Path, *, interval: float = 0.5, quiet_below: float = 3.0):
        self.files = {"bars": progress_file, "log": log}
        self.offsets = {"bars": 0, "log": log.stat().st_size if log.is_file() else 0}  # only this attempt's records
        self.interval, self.quiet_below = interval, quiet_below
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.bars: dict[tuple[int, int], dict[str, float]] = {}

    def __enter__(self) -> _StageProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._read()

    def _follow(self) -> None:
        while not self.stop.wait(self.interval):
            self._read()

    def _read(self) -> None:
        for which, path in self.files.items():
            if not path.is_file():
                continue
            with path.open() as f:
                f.seek(self.offsets[which])
                text = f.read()
            complete = text[:text.rfind("\n") + 1]  # a line still being written waits for the next read
            self.offsets[which] += len(complete.encode())
            for line in complete.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self._bar(record) if which == "bars" else self._validation(record)

    def _validation(self, r: dict[str, Any]) -> None:
        shown = [k for k in ("val_recon_full", "val_loss", "val_crps") if r.get(k) is not None]
        if r.get("kind") == "eval" and shown:  # `best` follows the phase's select metric
            values = "  ".join(f"{k} {r[k]:.4g}" for k in shown)
            best = "  (best so far)" if r.get("best") else ""
            _say(f"    {r.get('phase', '')} validation at step {r.get('step')}:  {values}{best}")

    def _bar(self, r: dict[str, Any]) -> None:
        seen = self.bars.setdefault((r["pid"], r["id"]), {"shown": -1, "at": 0.0})
        total, n, now = r.get("total"), r.get("n", 0), time.monotonic()
        count = f"{n}/{total}" if total else f"{n}"
        what = f"    {r.get('desc', '')}  {count} {r.get('unit', 'it')}"
        if r.get("closed"):
            if seen["shown"] >= 0 or r.get("elapsed", 0) >= self.quiet_below:
                _say(f"{what}  done in {format_seconds(r.get('elapsed', 0))}")
            return
        if r.get("elapsed", 0) < self.quiet_below or (total and n >= total):  # the end is said by "done in"
            return
        tenth = int(10 * n / total) if total else -1
        if tenth <= seen["shown"] and now - seen["at"] < 30:
            return
        seen["shown"], seen["at"] = max(tenth, 0), now
        postfix = re.sub(r",?\s*ETA [^,]*", "", r.get("postfix") or "").strip(", ")  # the ETA is said once, last
        eta = f"  ETA {format_seconds(r['eta'])}" if r.get("eta") is not None else ""
        _say(f"{what}{'  ' + postfix if postfix else ''}{eta}")


class _KernelMessages:
    """papermill's `stderr_file` / `stdout_file`: the kit's warnings and resume messages from the kernel, to the
    terminal (in a kernel the kit logs INFO to stdout, warnings to stderr)."""

    SHOWN = re.compile(r"^(WARNING|ERROR)\b|^INFO kronos_kit\.train: .*(resumed|nothing to resume)")

    def __init__(self) -> None:
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if self.SHOWN.search(line):
                _say(f"    {line}", err=True)
        return len(text)

    def flush(self) -> None:
        pass


def pipeline_summary(run_dir: str | Path, ran: dict[str, float], skipped: list[str]) -> str:
    """The lines a pipeline ends with: gate, verdict, promotion, time per stage, where the report is."""
    from kronos_kit.gate import GateResult

    rd = RunDir(run_dir)
    lines = ["[pipeline] summary"]
    if rd.gate.is_file():
        gate = GateResult.load(rd.gate)
        lines.append(f"  gate      {'passed' if gate.passed else 'FAILED'} ({', '.join(gate.checks())})")
    if rd.metrics_json.is_file():
        lines.append(f"  verdict   {load_json(rd.metrics_json).get('bottom_line', '(no bottom line)')}")
    if rd.promoted.is_file():
        promotion = Promotion.load(rd.path)
        lines.append(f"  promoted  {promotion.promoted}: {promotion.reason}")
    times = [f"{s} {format_seconds(t)}" for s, t in ran.items()] + [f"{s} skipped (done before)" for s in skipped]
    lines.append(f"  stages    {', '.join(times)}; this run {format_seconds(sum(ran.values()))}")
    if rd.report.is_file():
        lines.append(f"  report    {rd.report}")
    lines.append(f"  run       {rd.path}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# running the notebooks


def _kernel_name() -> str:
    """The kernel `make setup` registers, else the default Python kernel of this environment."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def _failed_cell(notebook: Path) -> str:
    nb = load_json(notebook)
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(code_cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"code cell {i} ({out.get('ename')}: {out.get('evalue')})\n{''.join(cell['source'])[:300]}"
    return "unknown cell"


def run_pipeline(
    config: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    params: list[str] | dict[str, Any] | None = None,
    resume: bool = False,
    from_stage: str | None = None,
    overwrite: bool = False,
    notebooks: Path = NOTEBOOK_DIR,
    progress: bool = True,
) -> int:
    """Run the stages in order; 0 on success, 1 when a stage failed (its notebook is kept).

    `config` defaults to configs/default.yaml (a new run) and must be left out with `resume` /
    `from_stage`, which use the run's saved config. Raises `UsageError` (creating nothing) for a
    mistyped parameter, a missing config or data source, or a run folder that cannot be used.
    `progress` prints each training stage's progress and the summary.
    """
    values = _usage(lambda: parse_overrides(params)) if isinstance(params, list) else dict(params or {})
    plan = _plan(config, run_dir, values, resume=resume, from_stage=from_stage, overwrite=overwrite)
    what = f"pipeline ({plan.mode})"
    existing = plan.run_dir is not None and is_kit_run(plan.run_dir)  # locked before its data is read or cached
    try:
        with run_lock(plan.run_dir, what) if existing else contextlib.nullcontext():
            _check_inputs(plan)
            folder = _run_folder(plan)
            with run_lock(folder, what):
                return _run_stages(plan, values, folder, notebooks, progress)
    except RunLockedError as err:
        raise UsageError(str(err)) from None


def _run_stages(plan: _Plan, values: dict[str, Any], folder: Path, notebooks: Path, progress: bool) -> int:
    run_dir, cfg = _open_run(plan, values, folder)
    stage_run = _StageRun(run_dir, cfg, notebooks, _kernel_name(), progress)
    stage_run.say(f"[pipeline] run {run_dir}\n[pipeline] {apply_threads(thread_count(cfg), config_width(cfg))}")
    names = list(STAGES)
    ran: dict[str, float] = {}
    skipped: list[str] = []
    for stage in names[names.index(plan.from_stage) if plan.from_stage else 0:]:
        manifest = load_manifest(run_dir)
        record = manifest["stages"].get(stage, {})
        unchanged = record.get("inputs") == stage_input_hash(stage, cfg, manifest, notebooks)
        if plan.mode == "resume" and record.get("status") == "completed" and unchanged:
            stage_run.say(f"[pipeline] stage {stage}: completed before with unchanged inputs, skipped")
            skipped.append(stage)
            continue
        # an interrupted or failed training stage continues from its saved state, not from step 0
        continues = plan.mode == "resume" and record.get("status") in ("running", "failed", "interrupted")
        seconds = stage_run.execute(stage, continues=continues)
        if seconds is None:
            return 1
        ran[stage] = seconds
    stage_run.say(pipeline_summary(run_dir, ran, skipped))
    return 0


def _run_folder(plan: _Plan) -> Path:
    """The run folder, created when new (the kernels run in notebooks/, so the path is absolute)."""
    if plan.run_dir is None:
        return create_run_dir(project_root() / "runs", run_name(plan.cfg)).resolve()
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    return plan.run_dir.resolve()


def _open_run(plan: _Plan, values: dict[str, Any], run_dir: Path) -> tuple[Path, KitConfig]:
    """Write the (locked) run folder's resolved config.yaml and update manifest.json (`provenance.open_run`)."""
    cfg = plan.cfg.with_overrides(run_dir=str(run_dir))
    open_run(run_dir, cfg, by="pipeline", mode=plan.mode, config_source=plan.config_source, parameters=values,
             from_stage=plan.from_stage, data_sha256=plan.data_sha256)
    return run_dir, cfg


@dataclass
class _StageRun:
    """What executing one stage's notebook needs; `execute` runs it and records it in the manifest."""

    run_dir: Path
    cfg: KitConfig
    notebooks: Path
    kernel: str
    progress: bool

    def say(self, text: str) -> None:
        if self.progress:
            _say(text)

    def execute(self, stage: str, *, continues: bool) -> float | None:
        """Run `stage`'s notebook into the run folder and record it: its seconds, or None when it failed."""
        import papermill

        notebook = STAGES[stage]
        output = self.run_dir / notebook
        start_stage(self.run_dir, stage, self.cfg, by="pipeline", resumed=continues, notebooks=self.notebooks)
        start = time.perf_counter()
        self.say(f"[pipeline] stage {stage}: {notebook}{' (continuing its training)' if continues else ''}")
        rd = RunDir(self.run_dir)
        try:
            with _kernel_env(self.run_dir) as progress_file, \
                    _StageProgress(progress_file, rd.metrics_log) if self.progress else contextlib.nullcontext():
                papermill.execute_notebook(
                    str(self.notebooks / notebook), str(output), parameters=stage_parameters(self.run_dir, continues),
                    kernel_name=self.kernel, cwd=str(self.notebooks), progress_bar=False, log_output=False,
                    stderr_file=_KernelMessages() if self.progress else None,
                    stdout_file=_KernelMessages() if self.progress else None,  # the kit's INFO lines go to stdout
                    extra_arguments=KERNEL_ARGUMENTS,
                )
        except papermill.PapermillExecutionError as err:
            finish_stage(self.run_dir, stage, status="failed", seconds=time.perf_counter() - start,
                         error=f"{err.ename}: {err.evalue}")
            _say(f"[pipeline] stage {stage} FAILED in {_failed_cell(output)}\n"
                 f"[pipeline] executed notebook with the error: {output}", err=True)
            return None
        except KeyboardInterrupt:
            finish_stage(self.run_dir, stage, status="interrupted", seconds=time.perf_counter() - start)
            _say(f"[pipeline] interrupted in stage {stage}; continue with: python -m kronos_kit pipeline "
                 f"--run-dir {self.run_dir} --resume", err=True)
            raise
        seconds = time.perf_counter() - start
        finish_stage(self.run_dir, stage, status="completed", seconds=seconds)
        self.say(f"[pipeline] stage {stage} done in {format_seconds(seconds)}")
        return seconds


@contextmanager
def _kernel_env(run_dir: Path) -> Iterator[Path]:
    """What the stage's kernel learns from its environment (it inherits the pipeline's): that the pipeline runs and
    records this run (`PIPELINE_ENV`: its notebook writes no manifest entries and may retrain the stage,
    `stages.open_stage`), and the file its progress bars report to (`runtime.PROGRESS_ENV`); yields that file."""
    fd, name = tempfile.mkstemp(prefix="kronos-progress-", suffix=".jsonl")
    os.close(fd)
    before = {key: os.environ.get(key) for key in (PIPELINE_ENV, PROGRESS_ENV)}
    os.environ.update({PIPELINE_ENV: str(run_dir), PROGRESS_ENV: name})
    try:
        yield Path(name)
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        Path(name).unlink(missing_ok=True)


def stage_parameters(run_dir: Path, resume: bool) -> dict[str, Any]:
    """What papermill injects into a stage notebook: the run's folder and saved config, `resume`, and every
    notebook parameter as None, so values saved in the notebook's parameters cell (edited in Lab) never
    override the run's config.yaml; the pipeline's -p values reach the notebook through config.yaml. No
    `overwrite`: the kernel learns from its environment that the pipeline runs the stage (`_pipeline_env`), so
    the executed copy in the run folder keeps `overwrite = False` and Run All there cannot retrain the run."""
    return {**dict.fromkeys(NOTEBOOK_PARAMETERS), "run_dir": str(run_dir), "config": str(RunDir(run_dir).config),
            "resume": resume}
