"""The one training engine both Kronos finetuning phases run on (`kronos_kit.train` holds the phases).

`run_phase` reads top to bottom: `setup_optimizer` (AdamW + OneCycle), `restore_state` (exact resume),
then `train_epoch` (gradient accumulation and clipping) with `validate` (best checkpoint, early
stopping) and `save_state` (`last` checkpoint + training state, the counters of `runs.TrainState` by
name) at every evaluation. Non-finite losses, gradients and validation metrics stop training
(gradients may be skipped instead), and nothing non-finite is ever saved. Resume checks that the saved
config matches the current one. Files go where `kronos_kit.runs.RunDir` says; seeding, devices and DDP
come from `kronos_kit.runtime`. A phase is a `Phase`: the model trained, a step function, an
evaluation function and the checkpoints they start from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kronos_kit import runs
from kronos_kit.config import HARMLESS_ON_RESUME, PhaseConfig
from kronos_kit.data import take
from kronos_kit.data.sampler import EpochSampler
from kronos_kit.model import (
    save_merged,
)
from kronos_kit.run_lock import run_lock
from kronos_kit.runs import (
    CHECKPOINT_KINDS,
    MetricsLog,
    RunDir,
    TrainState,
    check_finite,
    finish_swap,
    load_training_state,
    replace_dir,
    save_training_state,
)
from kronos_kit.runtime import DistContext, format_seconds, inference, seed_everything, tqdm, unwrap

__all__ = [
    "HARMLESS_ON_RESUME", "EpochSampler", "FrozenTokenizerChanged", "NonFiniteError", "NonFiniteGradientError",
    "NonFiniteLossError", "NonFiniteMetricError", "NonFiniteWeightsError", "OnStep", "OnValidate", "Phase",
    "PhaseExistsError",
    "PhaseResult",
    "ResumeMismatchError", "StepOutput", "TrainState", "check_batch", "planned_steps", "restore_state", "run_phase",
    "save_checkpoint", "save_state", "setup_optimizer", "train_epoch", "validate", "validation_loader",
    "write_reference",
]

logger = logging.getLogger("kronos_kit.train")  # one logger for the engine and the phases

OnStep = Callable[[int, dict[str, float]], None]
# called after each validation with (step, metrics); a returned reason (e.g. "pruned") stops the phase like early
# stopping does, and the phase's result and saved state record that reason
OnValidate = Callable[[int, dict[str, float]], str | None]


# phase config fields that decide which parameters train (and so which optimizer moment belongs to which
# weight, saved by position): never changed on resume, not even with resume_changed
STRUCTURAL_ON_RESUME = ("strategy", "trainable", "lora_rank", "lora_targets")
THREADS_KEY = "threads"  # torch's CPU thread count, saved with the resume config: it moves results by rounding


class NonFiniteError(RuntimeError):
    """Training met a NaN or inf and stopped; nothing non-finite was saved."""


class NonFiniteLossError(NonFiniteError):
    """A loss became NaN or inf."""


class NonFiniteGradientError(NonFiniteError):
    """A finite loss gave a NaN or inf gradient norm (`nonfinite_grad: stop`); no update was made."""


class NonFiniteMetricError(NonFiniteError):
    """A validation metric became NaN or inf."""


class NonFiniteWeightsError(NonFiniteError):
    """Weights or optimizer state with NaN or inf values, refused before writing anything."""


class PhaseExistsError(FileExistsError):
    """A fresh start of a phase that the run folder already holds, without `overwrite`."""


class ResumeMismatchError(ValueError):
    """Resume found a saved config that differs from the current one in fields that break exactness."""


class FrozenTokenizerChanged(RuntimeError):
    """The tokenizer's weights changed during phase 2, which must never happen."""


def save_checkpoint(model: nn.Module, directory: Path) -> None:
    """Replace `directory` with a fresh checkpoint of `model` (atomic swap, see `runs.replace_dir`).

    Written with `save_merged`: the reference layout always (LoRA merged in, adapter files beside).
    Non-finite weights are refused (`NonFiniteWeightsError`) and the previous checkpoint stays.
    """
    model = unwrap(model)
    check_finite(model.state_dict(), directory, NonFiniteWeightsError)
    replace_dir(directory, lambda tmp: save_merged(model, tmp))


def _optimizer_tensors(optimizer_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"optimizer.{i}.{k}": v for i, per_param in optimizer_state["state"].items()
            for k, v in per_param.items() if torch.is_tensor(v)}


# ---------------------------------------------------------------------------------------------
# the engine


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to backpropagate
    parts: dict[str, torch.Tensor]  # named loss terms, for the log


@dataclass
class Phase:
    """What a phase trains and how: everything else is the shared engine."""

    name: str  # "tokenizer" or "predictor": checkpoint folder and log label
    model: nn.Module  # the module whose weights are trained
    step: Callable[[nn.Module, dict[str, Any]], StepOutput]  # training loss of one batch
    evaluate: Callable[[nn.Module, DataLoader, DistContext], dict[str, float]]  # validation metrics
    select_metric: str  # key of `evaluate`'s result that picks `best` (lower is better)
    train_set: Dataset
    val_set: Dataset
    before_save: Callable[[], None] = lambda: None  # hook run before each checkpoint (checks)
    on_start: Callable[[], None] = lambda: None  # rank 0, once resume or start passed its checks (the stage record)
    inputs: dict[str, Any] = field(default_factory=dict)  # what else fixes the result (data config...); resume checks
    reference: Callable[[], dict[str, Any]] | None = None  # more about the starting model for its `reference` record


@dataclass(repr=False)
class PhaseResult:
    name: str
    steps: int
    best_metric: float
    best_dir: Path
    last_dir: Path
    stopped: str  # "max_steps", "epochs", "early_stopping"
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records
    skipped_steps: int = 0  # steps without an update for a non-finite gradient (nonfinite_grad: skip)
    select_metric: str = ""  # the validation metric that picked `best` (Phase.select_metric)

    def __repr__(self) -> str:  # one line in a notebook, not the whole history: which metric, which step
        skipped = f", {self.skipped_steps} skipped" if self.skipped_steps else ""
        picked = [r["step"] for r in self.history if r.get("best")]
        metric = f"{self.select_metric} " if self.select_metric else ""
        at = f" at step {picked[-1]}" if picked else ""
        return (f"{self.name}: {self.steps} steps ({self.stopped}{skipped}), best {metric}{self.best_metric:.6g}{at} "
                f"-> {self.best_dir}")


@dataclass
class _Clock:
    """Seconds spent in optimizer steps and in validations (with their saves), so the ETA counts both: the
    validations still to come often cost more than the steps (phase 2's forecast-skill probe)."""

    step_seconds: float = 0.0
    steps: int = 0
    eval_seconds: list[float] = field(default_factory=list)  # the step-0 reference validation first

    def step_done(self, seconds: float) -> None:
        self.step_seconds, self.steps = self.step_seconds + seconds, self.steps + 1

    def eta(self, run: _Run) -> float | None:
        """Seconds left: the remaining steps at the mean step time plus the remaining validations at the mean
        validation time; None before the first timed step."""
        if not self.steps:
            return None
        step, total, every = run.state.step, run.total_steps, run.cfg.eval_every
        per_epoch = len(run.phase.train_set) // run.ctx.world_size // run.local_batch // run.cfg.grad_accum_steps
        points = {s for s in range(every, total + 1, every)} | {total}
        points |= {k * per_epoch for k in range(1, run.cfg.epochs + 1) if 0 < k * per_epoch <= total}
        evals = sum(p > step for p in points)
        per_eval = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else 0.0
        return (total - step) * self.step_seconds / self.steps + evals * per_eval


@dataclass
class _Run:
    """One phase in flight: what the engine's functions share."""

    phase: Phase
    cfg: PhaseConfig
    rd: RunDir
    seed: int
    device: torch.device
    ctx: DistContext
    log: MetricsLog
    local_batch: int  # per-rank batch
    total_steps: int
    precision: str
    autocast: torch.autocast
    model: nn.Module = None  # the bare model: checkpoints, validation
    train_model: nn.Module = None  # what a training step calls (DDP-wrapped under torchrun)
    trainable: list[nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer = None
    scheduler: Any = None
    state: TrainState = field(default_factory=TrainState)
    window_count: int = 0  # windows since the last log line (throughput)
    t0: float = 0.0
    saved_step: int | None = None  # step of the last `save_state` (for error messages)
    on_validate: OnValidate | None = None
    stop_request: str | None = None  # the reason `on_validate` gave to stop
    clock: _Clock = field(default_factory=lambda: _Clock())  # step and validation seconds, for an honest ETA

    @property
    def best_dir(self) -> Path:
        return self.rd.checkpoint(self.phase.name, "best")

    @property
    def last_dir(self) -> Path:
        return self.rd.checkpoint(self.phase.name, "last")

    def result(self, stopped: str) -> PhaseResult:
        st = self.state
        return PhaseResult(self.phase.name, st.step, st.best, self.best_dir, self.last_dir, stopped, st.history,
                           st.skipped_steps, self.phase.select_metric)

    def saved_note(self) -> str:
        """Where training can go on from, for error messages (what is saved is always finite)."""
        if self.saved_step is None:
            return "Nothing was saved in this attempt."
        return (f"The last saved checkpoint (step {self.saved_step}) is {self.last_dir}; --resume continues from "
                "its training state.")


def run_phase(
    phase: Phase,
    cfg: PhaseConfig,
    *,
    run_dir: str | Path,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: OnStep | None = None,
    on_validate: OnValidate | None = None,
    tensorboard: bool = False,
) -> PhaseResult:
    """Train `phase.model` per `cfg`; checkpoints, state and metrics go under `run_dir`.

    With `resume`, `restore_state` continues exactly from `state/<phase>.pt` (see there for what it
    checks); a finished phase returns its result unchanged. A phase `run_dir` already holds is
    retrained from step 0 only with `overwrite` (else `PhaseExistsError`). The run folder is locked
    for the whole phase (`run_lock.run_lock`): a second writer is refused. `on_validate` may stop the phase
    after a validation (a sweep prunes a trial so); `tensorboard` mirrors the log as TensorBoard scalars.
    """
    run = _plan(phase, cfg, RunDir(run_dir), seed=seed, device=device, precision=precision, tensorboard=tensorboard)
    run.on_validate = on_validate
    if not resume and not overwrite:
        _refuse_existing(run)
    try:
        with run_lock(run_dir, f"training the {phase.name}"):
            return _run_locked(run, resume=resume, progress=progress, on_step=on_step)
    finally:
        run.log.close()


def _refuse_existing(run: _Run) -> None:
    """A fresh start would replace a phase this run folder holds: refuse unless asked to (overwrite)."""
    name = run.phase.name
    held = run.rd.phase_files(name)
    if held:
        listing = ", ".join(str(p.relative_to(run.rd.path)) for p in held)
        raise PhaseExistsError(
            f"{run.rd.path} already holds the {name} phase ({listing}); "
            "a fresh start would replace it. Continue it (or get its result) with resume (--resume), retrain "
            "it from step 0 with overwrite (--overwrite; the notebooks' `overwrite = True`), or use another run_dir")


def _run_locked(run: _Run, *, resume: bool, progress: bool, on_step: OnStep | None) -> PhaseResult:
    phase, cfg, device, seed = run.phase, run.cfg, run.device, run.seed
    seed_everything(seed)
    setup_optimizer(run)
    if run.ctx.is_main:
        for kind in CHECKPOINT_KINDS:  # a kill during a checkpoint swap: finish or undo it
            finish_swap(run.rd.checkpoint(phase.name, kind))
    resumed = resume and restore_state(run)
    if resume and not resumed:
        logger.info("%s: nothing to resume in %s; starting fresh", phase.name, run.rd.state(phase.name))
    if not resumed:
        run.state.run_id = uuid.uuid4().hex[:12]  # os entropy: the seeded RNGs stay untouched
    run.log.run, run.log.attempt = run.state.run_id, run.state.attempt
    if run.ctx.is_main:
        phase.on_start()
    if not resumed:  # the starting model's validation, once per run (a resume keeps it): the base level
        write_reference(run)
    if resumed:
        run.log.drop_after(phase.name, run.state.step)  # the interrupted attempt's records past the state
        if run.state.stopped:
            logger.info("%s: already finished (%s at step %d); nothing to do", phase.name, run.state.stopped,
                        run.state.step)
            return run.result(run.state.stopped)
    run.train_model = run.model
    if run.ctx.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        run.train_model = nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
    if not resumed:
        save_state(run)  # a complete `last` from the start: a failure before the first evaluation keeps it
    # the bar's own remaining-time guess ignores the validations ahead: it shows the engine's ETA instead
    bar = tqdm(total=run.total_steps, initial=run.state.step, desc=f"phase {phase.name}", unit="step",
               disable=not progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                "[{elapsed}{postfix}]")
    stopped, run.t0 = None, time.perf_counter()
    while run.state.epoch < cfg.epochs and run.state.step < run.total_steps:
        stopped = train_epoch(run, bar, on_step)
        if stopped is not None:
            break
        run.state.epoch, run.state.batch_in_epoch = run.state.epoch + 1, 0
        if run.state.step % cfg.eval_every and validate(run):  # epoch end, unless just evaluated
            stopped = run.stop_request or "early_stopping"
            break
        save_state(run)
    bar.close()
    stopped = stopped or _length_reason(run)  # also when a resume starts at the end (killed before this save)
    save_state(run, stopped)
    if not run.best_dir.exists() and run.ctx.is_main:  # e.g. resumed a finished run with no improvement
        save_checkpoint(run.model, run.best_dir)
    return run.result(stopped)


def _plan(phase: Phase, cfg: PhaseConfig, rd: RunDir, *, seed: int, device: torch.device, precision: str,
          tensorboard: bool = False) -> _Run:
    """Check the sizes and work out batches and steps; nothing is trained or written yet."""
    ctx = DistContext.from_env(device)
    name = phase.name
    if ctx.world_size > 1 and cfg.batch_size % ctx.world_size:
        raise ValueError(f"{name}.batch_size={cfg.batch_size} must divide by the {ctx.world_size} ranks")
    check_batch(name, cfg, len(phase.train_set))
    if len(phase.val_set) == 0:
        raise ValueError(f"{name}: the validation split has no windows; enlarge data.val_ratio or the data")
    total_steps = planned_steps(cfg, len(phase.train_set))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda")
    mirror = None
    if tensorboard and ctx.is_main:
        from kronos_kit.tracking import TensorBoardLog

        mirror = TensorBoardLog(rd.tensorboard)
    return _Run(phase, cfg, rd, seed, device, ctx, MetricsLog(rd.metrics_log, enabled=ctx.is_main, mirror=mirror),
                cfg.batch_size // ctx.world_size, total_steps, precision, autocast)


def check_batch(name: str, cfg: PhaseConfig, train_windows: int) -> None:
    """Refuse (ValueError) a phase whose `train_windows` training windows per epoch cannot fill one optimizer step."""
    per_step = cfg.batch_size * cfg.grad_accum_steps
    if train_windows < per_step:
        raise ValueError(f"{name}: {train_windows} training windows per epoch cannot fill one optimizer step of "
                         f"{name}.batch_size={cfg.batch_size} x {name}.grad_accum_steps={cfg.grad_accum_steps} = "
                         f"{per_step} windows; lower batch_size or grad_accum_steps, or bring more data")


def planned_steps(cfg: PhaseConfig, train_windows: int) -> int:
    """Optimizer steps a phase will take on `train_windows` training windows (epochs, capped by max_steps)."""
    total = cfg.epochs * (train_windows // cfg.batch_size // cfg.grad_accum_steps)  # _plan refuses 0 per epoch
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def setup_optimizer(run: _Run) -> None:
    """The model on its device in train mode; AdamW over its trainable parameters; the OneCycle schedule."""
    cfg = run.cfg
    run.model = run.phase.model.to(run.device)
    run.model.train()
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(run.trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
    run.scheduler = torch.optim.lr_scheduler.OneCycleLR(
        run.optimizer, max_lr=cfg.lr, total_steps=max(run.total_steps, 2), pct_start=cfg.pct_start,
        div_factor=cfg.div_factor,
    )


def restore_state(run: _Run) -> bool:
    """Load `state/<phase>.pt` if there is one: weights, optimizer, schedule, counters and RNG.

    The file is read as plain data (`runs.load_training_state`: a crafted pickle is refused). The
    saved config must match the current one (`_config_changes`) except for `HARMLESS_ON_RESUME`
    fields; other changes are refused with a list of them, unless `resume_changed` continues with
    the new values (optimizer settings and the lr schedule rebuilt for the new length, at the saved
    step). A finished phase cannot be changed or extended by resume.
    """
    path = run.rd.state(run.phase.name)
    if not path.is_file():
        return False
    state = load_training_state(path, map_location=run.device)
    changed = _config_changes(run, state, path)
    run.model.load_state_dict(state[runs.MODEL_KEY])
    if changed:
        _restore_optimizer_with_new_settings(run, state)
    else:
        run.optimizer.load_state_dict(state[runs.OPT_KEY])
        run.scheduler.load_state_dict(state[runs.SCHEDULER_KEY])
    saved = runs.restore_counters(state)
    run.state = dataclasses.replace(saved, attempt=saved.attempt + 1)
    run.saved_step = run.state.step
    _set_rng_state(state[runs.RNG_KEY])
    logger.info("%s: resumed at step %d (epoch %d, batch %d)", run.phase.name, run.state.step, run.state.epoch,
                run.state.batch_in_epoch)
    return True


def _resume_config(run: _Run) -> dict[str, Any]:
    """What fixes a phase's result, flat: `<phase>.<field>`, seed, precision and the phase's inputs."""
    flat = {f"{run.phase.name}.{k}": v for k, v in dataclasses.asdict(run.cfg).items()}
    flat.update(seed=run.seed, precision=run.precision)
    flat[THREADS_KEY] = torch.get_num_threads()
    for key, value in run.phase.inputs.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _config_changes(run: _Run, state: dict[str, Any], path: Path) -> list[str]:
    """The saved config's fields that changed and break exactness ("field: old -> new"); raises unless allowed."""
    name, saved, now, absent = run.phase.name, state[runs.CONFIG_KEY], _resume_config(run), "<absent>"
    harmless = {f"{name}.{f}" for f in HARMLESS_ON_RESUME} | {THREADS_KEY}
    keys = [*now, *(k for k in saved if k not in now)]
    changed = [k for k in keys if saved.get(k, absent) != now.get(k, absent)]
    breaking = [f"{k}: {saved.get(k, absent)!r} -> {now.get(k, absent)!r}" for k in changed if k not in harmless]
    if THREADS_KEY in changed and THREADS_KEY in saved and not state["stopped"]:
        logger.warning("%s: resuming with %s CPU threads, saved with %s: the result will differ from an "
                       "uninterrupted run by rounding (about 1e-9; the thread count changes the order of float "
                       "sums); resume with threads=%s for a bit-identical continuation", name, now[THREADS_KEY],
                       saved[THREADS_KEY], saved[THREADS_KEY])
    if changed and not breaking:
        logger.info("%s: resuming with changed %s (they do not change the weights)", name, changed)
    if not breaking:
        return []
    listing = "; ".join(breaking)
    new_run = (f"start a new run (another run_dir) from this one's checkpoint with "
               f"{name}.start_from={run.last_dir} (or its best)")
    structural = [b for b in breaking if b.split(":")[0] in {f"{name}.{f}" for f in STRUCTURAL_ON_RESUME}]
    if structural:
        raise ResumeMismatchError(
            f"{path}: the saved state trains other parameters than this config ({'; '.join(structural)}), so it "
            f"cannot be resumed, not even with {name}.resume_changed=true (the optimizer's moments would land on "
            f"other weights). Resume with the saved strategy, or {new_run}.")
    if state["stopped"]:
        raise ResumeMismatchError(
            f"{path}: the {name} phase already finished ({state['stopped']} at step {state['step']}), "
            f"so resume cannot extend or change it; changed: {listing}. To train further, {new_run}.")
    if not run.cfg.resume_changed:
        raise ResumeMismatchError(
            f"{path}: resuming would not continue the same run; changed since it was saved: {listing}. Resume "
            f"with the saved values, or set {name}.resume_changed=true to continue with the new ones (not an exact "
            f"continuation: optimizer settings and the lr schedule are rebuilt for {run.total_steps} steps), or "
            f"{new_run}.")
    logger.warning("%s: resuming with changed settings (%s): this is not an exact continuation; optimizer "
                   "settings and the lr schedule follow the new config from step %d", name, listing,
                   state["step"])
    return breaking


def _restore_optimizer_with_new_settings(run: _Run, state: dict[str, Any]) -> None:
    """Optimizer moments from the state; its settings and the schedule (new length) from the config."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(state[runs.OPT_KEY])
    for group, fresh in zip(run.optimizer.param_groups, settings):
        group.update(fresh)
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps, on purpose
        warnings.simplefilter("ignore")
        for _ in range(min(state["step"], run.scheduler.total_steps)):
            run.scheduler.step()


def train_epoch(run: _Run, bar: tqdm, on_step: OnStep | None) -> str | None:
    """Train the rest of the current epoch; the stop reason when training ends inside it, else None."""
    phase, cfg, st = run.phase, run.cfg, run.state
    if hasattr(phase.train_set, "set_epoch"):
        phase.train_set.set_epoch(st.epoch)
    sampler = EpochSampler(len(phase.train_set), seed=run.seed, epoch=st.epoch, shuffle=True, rank=run.ctx.rank,
                           world=run.ctx.world_size, skip=st.batch_in_epoch * run.local_batch)
    # an own generator: iterating a DataLoader must not draw from the global RNG (exact resume)
    loader = DataLoader(phase.train_set, batch_size=run.local_batch, sampler=sampler, drop_last=True,
                        generator=torch.Generator())
    run.optimizer.zero_grad(set_to_none=True)
    mark = time.perf_counter()
    for batch in loader:
        out = _forward_backward(run, batch)
        st.batch_in_epoch += 1
        run.window_count += len(batch["x"]) * run.ctx.world_size
        if st.batch_in_epoch % cfg.grad_accum_steps:
            continue
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip))
        if math.isfinite(grad_norm):
            run.optimizer.step()
        else:
            _nonfinite_gradient(run, out, grad_norm)  # "stop" raises; "skip" spends the step without an update
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        run.clock.step_done(time.perf_counter() - mark)
        _show_progress(run, bar, out.loss.item())
        _log_step(run, out, grad_norm, on_step)
        if st.step % cfg.eval_every == 0 or st.step == run.total_steps:
            start = time.perf_counter()
            if validate(run):
                return run.stop_request or "early_stopping"
            save_state(run)
            run.clock.eval_seconds.append(time.perf_counter() - start)
        if st.step >= run.total_steps:
            return _length_reason(run)
        mark = time.perf_counter()
    return None


def _show_progress(run: _Run, bar: tqdm, loss: float) -> None:
    """Advance the bar with the loss and the engine's ETA (the remaining steps and validations)."""
    bar.eta_s = run.clock.eta(run)
    eta = "" if bar.eta_s is None else f", ETA {format_seconds(bar.eta_s)}"
    bar.set_postfix_str(f"loss {loss:.4f}{eta}", refresh=False)
    bar.update(1)


def _length_reason(run: _Run) -> str:
    cfg = run.cfg
    return "max_steps" if cfg.max_steps is not None and run.state.step >= cfg.max_steps else "epochs"


def _nonfinite_gradient(run: _Run, out: StepOutput, grad_norm: float) -> None:
    st, name = run.state, run.phase.name
    where = f"step {st.step + 1} (epoch {st.epoch}, batch {st.batch_in_epoch})"
    if run.cfg.nonfinite_grad == "stop":
        raise NonFiniteGradientError(
            f"{name}: non-finite gradient norm {grad_norm} at {where} with a finite loss {out.loss.item():.6g}; "
            f"training stopped before the update. {run.saved_note()} Lower the learning rate, check the data "
            f"for extreme values, or set {name}.nonfinite_grad=skip to skip such steps (logged).")
    st.skipped_steps += 1
    logger.warning("%s: non-finite gradient norm at %s; step skipped without an update (%d so far)", name, where,
                   st.skipped_steps)
    run.log.write({"phase": name, "kind": "skip", "step": st.step + 1, "epoch": st.epoch,
                   "loss": out.loss.item(), "grad_norm": None, "skipped_steps": st.skipped_steps})


def _forward_backward(run: _Run, batch: dict[str, Any]) -> StepOutput:
    with run.autocast:
        out = run.phase.step(run.train_model, batch)
    if not torch.isfinite(out.loss):
        st, parts = run.state, {k: float(v) for k, v in out.parts.items()}
        raise NonFiniteLossError(
            f"{run.phase.name}: non-finite loss {out.loss.item()} at step {st.step} (epoch {st.epoch}, batch "
            f"{st.batch_in_epoch}); parts {parts}. Training stopped. {run.saved_note()} "
            "Lower the learning rate or check the data for extreme values."
        )
    (out.loss / run.cfg.grad_accum_steps).backward()
    return out


def _log_step(run: _Run, out: StepOutput, grad_norm: float, on_step: OnStep | None) -> None:
    st, parts = run.state, {k: float(v) for k, v in out.parts.items()}
    if on_step is not None:
        on_step(st.step, {"loss": out.loss.item(), **parts})
    if st.step % run.cfg.log_every == 0 or st.step == run.total_steps:
        elapsed = time.perf_counter() - run.t0
        run.log.write({"phase": run.phase.name, "kind": "train", "step": st.step, "epoch": st.epoch,
                       "lr": run.scheduler.get_last_lr()[0], "loss": out.loss.item(), **parts,
                       "grad_norm": runs.json_float(grad_norm),
                       "windows_per_s": run.window_count / max(elapsed, 1e-9)})
        run.window_count, run.t0 = 0, time.perf_counter()


def validation_loader(val_set: Dataset, batch_size: int, ctx: DistContext, max_batches: int | None = None):
    """This rank's validation batches: its uneven share of the windows, in order, at most `max_batches`."""
    sampler = EpochSampler(len(val_set), seed=0, epoch=0, shuffle=False, rank=ctx.rank, world=ctx.world_size,
                           even=False)
    loader = DataLoader(val_set, batch_size=batch_size, sampler=sampler, generator=torch.Generator())
    return loader if max_batches is None else take(loader, max_batches)


def _validation_metrics(run: _Run) -> dict[str, float]:
    with inference(run.model), run.autocast:
        return run.phase.evaluate(run.model, validation_loader(run.phase.val_set, run.local_batch, run.ctx,
                                                               run.cfg.max_val_batches), run.ctx)


def write_reference(run: _Run) -> None:
    """Validate the starting model (the base checkpoint) before the first step and log it as the phase's
    `reference` record at step 0: the level every later validation is drawn and judged against. It
    takes no random numbers, so training is the same with or without it."""
    start = time.perf_counter()
    metrics = {k: runs.json_float(v) if isinstance(v, float) else v for k, v in _validation_metrics(run).items()}
    run.clock.eval_seconds.append(time.perf_counter() - start)  # what every later validation will cost
    extra = run.phase.reference() if run.phase.reference is not None else {}
    run.log.write({"phase": run.phase.name, "kind": "reference", "step": 0, "epoch": 0, "model": "start",
                   **metrics, **extra})


def validate(run: _Run) -> bool:
    """Validate, log, keep `best`; True when early stopping (or `on_validate`) says stop. A non-finite metric
    stops training.

    Every validation window goes to exactly one rank (uneven shards; the evaluate functions reduce
    sums over ranks), so several processes score the same windows as one.
    """
    phase, cfg, st = run.phase, run.cfg, run.state
    metrics = _validation_metrics(run)
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        run.log.write({"phase": phase.name, "kind": "eval", "step": st.step, "epoch": st.epoch,
                       **{k: runs.json_float(v) if isinstance(v, float) else v for k, v in metrics.items()}})
        raise NonFiniteMetricError(
            f"{phase.name}: validation at step {st.step} gave non-finite {sorted(bad)} ({bad}); training stopped "
            f"and `best` keeps the evaluation of {st.best:.6g}. {run.saved_note()} The model's outputs overflow "
            "or the validation data holds extreme values: lower the learning rate or check the data.")
    improved = metrics[phase.select_metric] < st.best
    if improved:
        st.best, st.evals_since_best = metrics[phase.select_metric], 0
        if run.ctx.is_main:
            save_checkpoint(run.model, run.best_dir)
    else:
        st.evals_since_best += 1
    record = {"phase": phase.name, "kind": "eval", "step": st.step, "epoch": st.epoch, **metrics, "best": improved,
              "select_metric": phase.select_metric}  # what `best` means, for reports read from the log alone
    st.history.append(record)
    run.log.write(record)
    if run.on_validate is not None:
        run.stop_request = run.on_validate(st.step, metrics)
        if run.stop_request:
            return True
    return cfg.patience is not None and st.evals_since_best >= cfg.patience


def save_state(run: _Run, stopped: str | None = None) -> None:
    """The `last` checkpoint and everything resume needs, each written atomically (rank 0).

    The state is plain data (tensors, numbers, strings), so resume reads it with weights_only=True.
    Non-finite weights or optimizer moments are refused before anything is written.
    """
    run.phase.before_save()
    if not run.ctx.is_main:
        return
    st = run.state
    model_state, optimizer_state = run.model.state_dict(), run.optimizer.state_dict()
    check_finite({**model_state, **_optimizer_tensors(optimizer_state)}, run.rd.state(run.phase.name),
                 NonFiniteWeightsError)
    save_checkpoint(run.model, run.last_dir)
    save_training_state({
        runs.PHASE_KEY: run.phase.name, runs.MODEL_KEY: model_state, runs.OPT_KEY: optimizer_state,
        runs.SCHEDULER_KEY: run.scheduler.state_dict(), runs.RNG_KEY: _rng_state(),
        runs.CONFIG_KEY: _resume_config(run), **runs.state_counters(dataclasses.replace(st, stopped=stopped)),
    }, run.rd.state(run.phase.name))
    run.saved_step = st.step


def _rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain data (lists, ints, tensors)."""
    version, internal, gauss_next = random.getstate()
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    np.random.set_state(("MT19937", npy["key"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
