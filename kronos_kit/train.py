"""The one training engine, and the two Kronos finetuning phases that run on it.

Phase 1 (`train_tokenizer`) adapts the tokenizer: loss = (mse(z_pre, x) + mse(z, x) + bsq_loss) / 2.
Phase 2 (`train_predictor`) finetunes the predictor on tokens of the frozen phase-1 tokenizer:
loss = (ce_s1 + ce_s2) / 2 on next-token targets. Never jointly. Both run `run_phase`, which reads
top to bottom: `setup_optimizer` (AdamW + OneCycle), `restore_state` (exact resume), then
`train_epoch` (gradient accumulation and clipping) with `validate` (best checkpoint, early stopping)
and `save_state` (`last` checkpoint + training state) at every evaluation. Non-finite losses,
gradients and validation metrics stop training (gradients may be skipped instead), and nothing
non-finite is ever saved. Resume checks that the saved config matches the current one. Files go where
`kronos_kit.runs.RunDir` says; seeding, devices and DDP come from `kronos_kit.runtime`.
The phases differ only in their `Phase`: the model trained, a step function, an evaluation
function and the checkpoints they start from.

Finetune strategies (`PhaseConfig.strategy`, per phase) are set up by `apply_strategy` on the bare
model before the engine builds the optimizer and the DDP wrapper: `full` trains every weight,
`freeze` only the parameter groups in `trainable`, `lora` only low-rank adapters (checkpoints hold
the merged weights in the reference layout, the adapter files beside them), `l2sp` every weight
with a penalty toward the starting weights added to the loss (logged as `l2sp`). Phase 2 also
scores forecast skill on the validation split at each validation (`forecast.ForecastSkill`: close
CRPS and MAE), the base model once beforehand as the reference level, and selects `best` by
`predictor.select_metric`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from kronos_kit import runs
from kronos_kit.codebook import CodebookCounter
from kronos_kit.config import KitConfig, PhaseConfig
from kronos_kit.data import DataBundle, load_data, take
from kronos_kit.forecast import ForecastSkill
from kronos_kit.model import (
    L2SP,
    Kronos,
    KronosTokenizer,
    apply_lora,
    check_pair,
    save_merged,
    set_trainable,
    weights_hash,
)
from kronos_kit.runs import (
    CHECKPOINT_KINDS,
    MetricsLog,
    RunDir,
    check_finite,
    finish_swap,
    load_training_state,
    replace_dir,
    run_choice,
    save_training_state,
)
from kronos_kit.runtime import DistContext, freeze, inference, module_device, resolve_device, seed_everything, unwrap

__all__ = [
    "HARMLESS_ON_RESUME", "EpochSampler", "FrozenTokenizerChanged", "FrozenTokens", "NonFiniteError",
    "NonFiniteGradientError", "NonFiniteLossError", "NonFiniteMetricError", "NonFiniteWeightsError", "Phase",
    "PhaseResult", "ResumeMismatchError", "StepOutput", "Strategy", "TrainState", "apply_strategy",
    "evaluate_tokenizer", "make_predictor_evaluate", "make_predictor_step", "planned_steps", "restore_state",
    "run_phase", "save_checkpoint", "save_state", "setup_optimizer", "tokenizer_source_for_phase2", "tokenizer_step",
    "train_epoch", "train_predictor", "train_tokenizer", "validate", "validation_loader",
]

logger = logging.getLogger(__name__)

OnStep = Callable[[int, dict[str, float]], None]


# phase config fields that may change between a run and its resume: they decide when to log,
# validate or stop, never what the weights become or what a validation metric means
HARMLESS_ON_RESUME = ("enabled", "log_every", "eval_every", "patience", "nonfinite_grad", "resume_changed")


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


class ResumeMismatchError(ValueError):
    """Resume found a saved config that differs from the current one in fields that break exactness."""


class FrozenTokenizerChanged(RuntimeError):
    """The tokenizer's weights changed during phase 2, which must never happen."""


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices from (seed, epoch), strided over ranks, resumable mid-epoch.

    Rank r takes positions r, r + world, ... of the epoch's permutation, so the union of the ranks'
    k-th batches is the k-th global batch a single process would draw.

    With `even` (training) every rank gets the same count, dropping up to world - 1 items so DDP
    ranks stay in step; without it (validation, whose sums are reduced over ranks) every item goes
    to exactly one rank, and a rank may get one item fewer, or none.
    """

    def __init__(self, n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world: int = 1,
                 skip: int = 0, even: bool = True):
        order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
        usable = (n // world) * world if even else n
        self.indices = order[:usable][rank::world][skip:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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
    inputs: dict[str, Any] = field(default_factory=dict)  # what else fixes the result (data config...); resume checks
    reference: Callable[[], dict[str, Any]] | None = None  # levels of the starting model: a `reference` record, step 0


@dataclass
class PhaseResult:
    name: str
    steps: int
    best_metric: float
    best_dir: Path
    last_dir: Path
    stopped: str  # "max_steps", "epochs", "early_stopping"
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records
    skipped_steps: int = 0  # steps without an update for a non-finite gradient (nonfinite_grad: skip)


@dataclass
class TrainState:
    """What resume restores besides weights, optimizer and RNG (saved under the runs.*_KEY names)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float = math.inf
    evals_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None  # set once the phase has finished
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient
    run_id: str = ""  # this phase run's id (metrics.jsonl `run`): new on a fresh start, kept on resume
    attempt: int = 1  # 1 for the fresh start, +1 for each resume


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

    @property
    def best_dir(self) -> Path:
        return self.rd.checkpoint(self.phase.name, "best")

    @property
    def last_dir(self) -> Path:
        return self.rd.checkpoint(self.phase.name, "last")

    def result(self, stopped: str) -> PhaseResult:
        st = self.state
        return PhaseResult(self.phase.name, st.step, st.best, self.best_dir, self.last_dir, stopped, st.history,
                           st.skipped_steps)

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
    progress: bool = True,
    on_step: OnStep | None = None,
) -> PhaseResult:
    """Train `phase.model` per `cfg`; checkpoints, state and metrics go under `run_dir`.

    With `resume`, `restore_state` continues exactly from `state/<phase>.pt` (see there for what it
    checks); a finished phase returns its result unchanged.
    """
    run = _plan(phase, cfg, RunDir(run_dir), seed=seed, device=device, precision=precision)
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
    if not resumed and phase.reference is not None:  # the starting model, once per run (a resume keeps it)
        run.log.write({"phase": phase.name, "kind": "reference", "step": 0, **phase.reference()})
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
    bar = tqdm(total=run.total_steps, initial=run.state.step, desc=f"phase {phase.name}", unit="step",
               disable=not progress)
    stopped, run.t0 = None, time.perf_counter()
    while run.state.epoch < cfg.epochs and run.state.step < run.total_steps:
        stopped = train_epoch(run, bar, on_step)
        if stopped is not None:
            break
        run.state.epoch, run.state.batch_in_epoch = run.state.epoch + 1, 0
        if run.state.step % cfg.eval_every and validate(run):  # epoch end, unless just evaluated
            stopped = "early_stopping"
            break
        save_state(run)
    bar.close()
    stopped = stopped or _length_reason(run)  # also when a resume starts at the end (killed before this save)
    save_state(run, stopped)
    if not run.best_dir.exists() and run.ctx.is_main:  # e.g. resumed a finished run with no improvement
        save_checkpoint(run.model, run.best_dir)
    return run.result(stopped)


def _plan(phase: Phase, cfg: PhaseConfig, rd: RunDir, *, seed: int, device: torch.device, precision: str) -> _Run:
    """Check the sizes and work out batches and steps; nothing is trained or written yet."""
    ctx = DistContext.from_env(device)
    name = phase.name
    if ctx.world_size > 1 and cfg.batch_size % ctx.world_size:
        raise ValueError(f"{name}.batch_size={cfg.batch_size} must divide by the {ctx.world_size} ranks")
    per_step = cfg.batch_size * cfg.grad_accum_steps
    if len(phase.train_set) < per_step:
        raise ValueError(f"{name}: {len(phase.train_set)} training windows per epoch cannot fill one optimizer step "
                         f"of {name}.batch_size={cfg.batch_size} x {name}.grad_accum_steps={cfg.grad_accum_steps} = "
                         f"{per_step} windows; lower batch_size or grad_accum_steps, or bring more data")
    if len(phase.val_set) == 0:
        raise ValueError(f"{name}: the validation split has no windows; enlarge data.val_ratio or the data")
    total_steps = planned_steps(cfg, len(phase.train_set))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda")
    return _Run(phase, cfg, rd, seed, device, ctx, MetricsLog(rd.metrics_log, enabled=ctx.is_main),
                cfg.batch_size // ctx.world_size, total_steps, precision, autocast)


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
    run.state = TrainState(state[runs.STEP_KEY], state[runs.EPOCH_KEY], state[runs.BATCH_KEY], state[runs.BEST_KEY],
                           state[runs.EVALS_SINCE_BEST_KEY], state[runs.HISTORY_KEY], state[runs.STOPPED_KEY],
                           state[runs.SKIPPED_KEY], state[runs.RUN_ID_KEY], state[runs.ATTEMPT_KEY] + 1)
    run.saved_step = run.state.step
    _set_rng_state(state[runs.RNG_KEY])
    logger.info("%s: resumed at step %d (epoch %d, batch %d)", run.phase.name, run.state.step, run.state.epoch,
                run.state.batch_in_epoch)
    return True


def _resume_config(run: _Run) -> dict[str, Any]:
    """What fixes a phase's result, flat: `<phase>.<field>`, seed, precision and the phase's inputs."""
    flat = {f"{run.phase.name}.{k}": v for k, v in dataclasses.asdict(run.cfg).items()}
    flat.update(seed=run.seed, precision=run.precision)
    for key, value in run.phase.inputs.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _config_changes(run: _Run, state: dict[str, Any], path: Path) -> list[str]:
    """The saved config's fields that changed and break exactness ("field: old -> new"); raises unless allowed."""
    name, saved, now, absent = run.phase.name, state[runs.CONFIG_KEY], _resume_config(run), "<absent>"
    harmless = {f"{name}.{f}" for f in HARMLESS_ON_RESUME}
    keys = [*now, *(k for k in saved if k not in now)]
    changed = [k for k in keys if saved.get(k, absent) != now.get(k, absent)]
    breaking = [f"{k}: {saved.get(k, absent)!r} -> {now.get(k, absent)!r}" for k in changed if k not in harmless]
    if changed and not breaking:
        logger.info("%s: resuming with changed %s (they do not change the weights)", name, changed)
    if not breaking:
        return []
    listing = "; ".join(breaking)
    new_run = (f"start a new run (another run_dir) from this one's checkpoint with "
               f"{name}.start_from={run.last_dir} (or its best)")
    if state[runs.STOPPED_KEY]:
        raise ResumeMismatchError(
            f"{path}: the {name} phase already finished ({state[runs.STOPPED_KEY]} at step {state[runs.STEP_KEY]}), "
            f"so resume cannot extend or change it; changed: {listing}. To train further, {new_run}.")
    if not run.cfg.resume_changed:
        raise ResumeMismatchError(
            f"{path}: resuming would not continue the same run; changed since it was saved: {listing}. Resume "
            f"with the saved values, or set {name}.resume_changed=true to continue with the new ones (not an exact "
            f"continuation: optimizer settings and the lr schedule are rebuilt for {run.total_steps} steps), or "
            f"{new_run}.")
    logger.warning("%s: resuming with changed settings (%s): this is not an exact continuation; optimizer "
                   "settings and the lr schedule follow the new config from step %d", name, listing,
                   state[runs.STEP_KEY])
    return breaking


def _restore_optimizer_with_new_settings(run: _Run, state: dict[str, Any]) -> None:
    """Optimizer moments from the state; its settings and the schedule (new length) from the config."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(state[runs.OPT_KEY])
    for group, fresh in zip(run.optimizer.param_groups, settings):
        group.update(fresh)
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps, on purpose
        warnings.simplefilter("ignore")
        for _ in range(min(state[runs.STEP_KEY], run.scheduler.total_steps)):
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
        bar.update(1)
        bar.set_postfix(loss=f"{out.loss.item():.4f}")
        _log_step(run, out, grad_norm, on_step)
        if st.step % cfg.eval_every == 0 or st.step == run.total_steps:
            if validate(run):
                return "early_stopping"
            save_state(run)
        if st.step >= run.total_steps:
            return _length_reason(run)
    return None


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


def validate(run: _Run) -> bool:
    """Validate, log, keep `best`; True when early stopping says stop. A non-finite metric stops training.

    Every validation window goes to exactly one rank (uneven shards; the evaluate functions reduce
    sums over ranks), so several processes score the same windows as one.
    """
    phase, cfg, st = run.phase, run.cfg, run.state
    with inference(run.model), run.autocast:
        metrics = phase.evaluate(run.model, validation_loader(phase.val_set, run.local_batch, run.ctx,
                                                              cfg.max_val_batches), run.ctx)
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
    record = {"phase": phase.name, "kind": "eval", "step": st.step, "epoch": st.epoch, **metrics, "best": improved}
    st.history.append(record)
    run.log.write(record)
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
        runs.PHASE_KEY: run.phase.name, runs.STEP_KEY: st.step, runs.EPOCH_KEY: st.epoch,
        runs.BATCH_KEY: st.batch_in_epoch, runs.MODEL_KEY: model_state, runs.OPT_KEY: optimizer_state,
        runs.SCHEDULER_KEY: run.scheduler.state_dict(), runs.BEST_KEY: st.best,
        runs.EVALS_SINCE_BEST_KEY: st.evals_since_best, runs.HISTORY_KEY: st.history, runs.RNG_KEY: _rng_state(),
        runs.STOPPED_KEY: stopped, runs.CONFIG_KEY: _resume_config(run), runs.SKIPPED_KEY: st.skipped_steps,
        runs.RUN_ID_KEY: st.run_id, runs.ATTEMPT_KEY: st.attempt,
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


# ---------------------------------------------------------------------------------------------
# finetune strategies



@dataclass
class Strategy:
    """A phase's finetune strategy applied to its model: which parameters train, and the L2-SP anchor."""

    name: str  # full, freeze, lora or l2sp
    trainable: list[str]  # names of the parameters that train, in model order
    l2sp: L2SP | None = None  # the penalty toward the starting weights (strategy l2sp)

    def wrap_step(self, step: Callable[[nn.Module, dict], StepOutput]) -> Callable[[nn.Module, dict], StepOutput]:
        """`step` with the L2-SP penalty added to its loss and logged (`task_loss`, `l2sp`); else `step`."""
        if self.l2sp is None:
            return step
        l2sp = self.l2sp

        def penalized(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
            out = step(model, batch)
            penalty = l2sp.penalty(model)
            parts = {**out.parts, "task_loss": out.loss.detach(), "l2sp": penalty.detach()}
            return StepOutput(out.loss + penalty, parts)

        return penalized


def apply_strategy(model: nn.Module, cfg: PhaseConfig, *, phase: str, seed: int) -> Strategy:
    """Set up `cfg.strategy` on the freshly loaded bare `model`, before the optimizer and the DDP wrap.

    freeze: `set_trainable(cfg.trainable_groups)`; lora: `apply_lora` with the configured rank, alpha,
    dropout and targets (A drawn from a generator seeded by `seed`, so a resumed run rebuilds the same
    modules before its state is loaded); l2sp: every weight trains and `L2SP` anchors them at their
    starting values (the base checkpoint, also on resume); full: the model as loaded.
    """
    if cfg.strategy == "freeze":
        try:
            set_trainable(model, cfg.trainable_groups)
        except ValueError as err:
            raise ValueError(f"{phase}.trainable: {err}") from err
    elif cfg.strategy == "lora":
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                   generator=torch.Generator().manual_seed(seed))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    l2sp = L2SP(model, strength=cfg.l2sp_strength) if cfg.strategy == "l2sp" else None
    counts = [sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())]
    logger.info("%s: strategy %s, %d of %d parameters train", phase, cfg.strategy, *counts)
    return Strategy(cfg.strategy, trainable, l2sp)



# ---------------------------------------------------------------------------------------------
# phase 1: tokenizer


def tokenizer_step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
    """(mse(z_pre, x) + mse(z, x) + bsq_loss) / 2, as the reference trains the tokenizer.

    The log gets each reconstruction term, the BSQ loss and its unweighted parts (`LossBreakdown`).
    """
    x = batch["x"].to(module_device(model))
    ((z_pre, z), bsq_loss, _, _), bsq = model(x, return_loss_breakdown=True)
    recon_pre, recon_full = F.mse_loss(z_pre, x), F.mse_loss(z, x)
    loss = (recon_pre + recon_full + bsq_loss) / 2
    return StepOutput(loss, {"recon_s1": recon_pre.detach(), "recon_full": recon_full.detach(),
                             "bsq": bsq_loss.detach(), "bsq_commitment": bsq.commitment.detach(),
                             "bsq_per_sample_entropy": bsq.per_sample_entropy.detach(),
                             "bsq_codebook_entropy": bsq.codebook_entropy.detach()})


def _in_split(batch: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the bars of each window that belong to its split (all, for data without the mask)."""
    mask = batch.get("in_split")
    return torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)


def _require(count: float, what: str) -> float:
    if count <= 0:
        raise ValueError(f"validation saw no {what} over all ranks; the validation split or max_val_batches is "
                         "too small: enlarge data.val_ratio, or raise max_val_batches")
    return count


def evaluate_tokenizer(model: nn.Module, loader, ctx: DistContext) -> dict[str, float]:
    """Full-decoder and s1-only reconstruction MSE over the windows' in-split bars, loss, s1/s2 usage."""
    device = module_device(model)
    counter = CodebookCounter(model.s1_bits, model.s2_bits, joint=False)
    sums = [0.0] * 5  # full squared error, s1 squared error, bsq loss * windows, windows, in-split values
    for batch in loader:
        x = batch["x"].to(device)
        (z_pre, z), bsq_loss, quantized, _ = model(x)
        s1, s2 = model.quantizer.codes_to_indices(quantized)
        counter.update(s1.cpu(), s2.cpu())
        keep = _in_split(batch, x).to(device)[..., None].expand_as(x)  # (B, L, 6)
        sums = [a + b for a, b in zip(sums, (((z.float() - x) ** 2)[keep].sum().item(),
                                             ((z_pre.float() - x) ** 2)[keep].sum().item(),
                                             bsq_loss.item() * len(x), len(x), keep.sum().item()))]
    sums = ctx.sum(sums, device)
    s1_counts, s2_counts, _ = counter.counts()
    if ctx.world_size > 1:
        merged = ctx.sum([*s1_counts.tolist(), *s2_counts.tolist()], device)
        s1_counts, s2_counts = np.array(merged[: len(s1_counts)]), np.array(merged[len(s1_counts):])
    windows, values = _require(sums[3], "windows"), sums[4]
    full, pre = sums[0] / values, sums[1] / values
    return {"val_recon_full": full, "val_recon_s1": pre, "val_loss": (full + pre + sums[2] / windows) / 2,
            "s1_usage": float((s1_counts > 0).mean()), "s2_usage": float((s2_counts > 0).mean())}


# ---------------------------------------------------------------------------------------------
# phase 2: predictor on the frozen tokenizer


class FrozenTokens:
    """Tokens of windows from a frozen tokenizer (eval mode, no grad), optionally cached per window.

    The cache key is the window's (symbol, start), so each window is encoded once across epochs.
    """

    def __init__(self, tokenizer: KronosTokenizer, *, cache: bool = True):
        self.tokenizer = tokenizer
        freeze(tokenizer)
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None
        self.encode_seconds = 0.0

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["x"]
        if self.cache is None:
            return self._encode(x.to(device))
        keys = list(zip(batch["symbol"], [int(s) for s in batch["start"]]))
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            s1, s2 = self._encode(x[missing].to(device))
            for j, i in enumerate(missing):
                self.cache[keys[i]] = (s1[j].cpu(), s2[j].cpu())
        s1 = torch.stack([self.cache[k][0] for k in keys]).to(device)
        s2 = torch.stack([self.cache[k][1] for k in keys]).to(device)
        return s1, s2

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        if self.tokenizer.training:
            raise FrozenTokenizerChanged("the frozen tokenizer was switched to train mode during phase 2")
        s1, s2 = self.tokenizer.encode(x, half=True)
        self.encode_seconds += time.perf_counter() - start
        return s1, s2


def make_predictor_step(tokens: FrozenTokens, *, teacher_forcing: bool) -> Callable[[nn.Module, dict], StepOutput]:
    def step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        device = module_device(model)
        s1, s2 = tokens(batch, device)
        stamp = batch["stamp"].to(device)
        # inputs: tokens[:-1] with their time features; targets: tokens[1:]
        s1_logits, s2_logits = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=teacher_forcing,
                                     s1_targets=s1[:, 1:])
        loss, ce_s1, ce_s2 = unwrap(model).head.compute_loss(s1_logits, s2_logits, s1[:, 1:], s2[:, 1:])
        return StepOutput(loss, {"ce_s1": ce_s1.detach(), "ce_s2": ce_s2.detach()})

    return step


def make_predictor_evaluate(
    tokens: FrozenTokens, skill: ForecastSkill | None = None
) -> Callable[[nn.Module, Any, DistContext], dict[str, float]]:
    """Token-level validation (loss, cross-entropies, accuracies) plus, with `skill`, forecast skill
    (`val_crps`, `val_mae`) of the current weights with the frozen tokenizer on fixed validation origins
    (every rank scores the same origins with the same seed, so ranks agree without a reduction)."""

    def evaluate(model: nn.Module, loader, ctx: DistContext) -> dict[str, float]:
        device = module_device(model)
        sums = [0.0] * 5
        for batch in loader:
            s1, s2 = tokens(batch, device)
            scores = model.score_next_tokens(s1, s2, batch["stamp"].to(device), batch.get("in_split"))
            sums = [a + b for a, b in zip(sums, scores)]
        sums = ctx.sum(sums, device)  # only targets inside the validation split count
        n = _require(sums[4], "target tokens")
        ce1, ce2 = sums[0] / n, sums[1] / n
        out = {"val_loss": (ce1 + ce2) / 2, "val_ce_s1": ce1, "val_ce_s2": ce2, "val_acc_s1": sums[2] / n,
               "val_acc_s2": sums[3] / n}
        if skill is not None:
            out.update(skill(unwrap(model), tokens.tokenizer))
        return out

    return evaluate


# ---------------------------------------------------------------------------------------------
# entry points


def tokenizer_source_for_phase2(cfg: KitConfig, run_dir: Path) -> str:
    """The tokenizer phase 2 uses (`runs.run_choice(..., model="finetuned")`): explicit, else this run's
    phase-1 best, else the base tokenizer."""
    return run_choice(run_dir, cfg, model="finetuned").tokenizer_source


def _run_dir(cfg: KitConfig) -> Path:
    if cfg.run_dir is None:
        raise ValueError("run_dir is not set: pass run_dir in the config or as a parameter")
    return Path(cfg.run_dir)


def train_tokenizer(cfg: KitConfig, *, resume: bool = False, data: DataBundle | None = None, progress: bool = True,
                    on_step: OnStep | None = None) -> PhaseResult:
    """Phase 1: adapt the tokenizer to the configured data."""
    run_dir = _run_dir(cfg)
    device = resolve_device(cfg.device)
    data = data or load_data(cfg)
    tokenizer = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from, seed=cfg.seed)
    tokenizer.quantizer.entropy_mode = cfg.tokenizer.entropy_mode
    strategy = apply_strategy(tokenizer, cfg.tokenizer, phase="tokenizer", seed=cfg.seed)
    phase = Phase("tokenizer", tokenizer, strategy.wrap_step(tokenizer_step), evaluate_tokenizer, "val_recon_full",
                  data.train, data.val, inputs={"data": dataclasses.asdict(cfg.data)})
    return run_phase(phase, cfg.tokenizer, run_dir=run_dir, seed=cfg.seed, device=device, precision=cfg.precision,
                     resume=resume, progress=progress, on_step=on_step)


def train_predictor(cfg: KitConfig, *, resume: bool = False, data: DataBundle | None = None, progress: bool = True,
                    on_step: OnStep | None = None) -> PhaseResult:
    """Phase 2: finetune the predictor on tokens of the frozen phase-1 tokenizer."""
    run_dir = _run_dir(cfg)
    device = resolve_device(cfg.device)
    data = data or load_data(cfg)
    tokenizer = KronosTokenizer.from_pretrained(tokenizer_source_for_phase2(cfg, run_dir), device=device)
    predictor = Kronos.from_pretrained(cfg.predictor.start_from, seed=cfg.seed)
    check_pair(tokenizer, predictor)
    frozen_hash = weights_hash(tokenizer)
    skill = _skill_probe(cfg, data)
    strategy = apply_strategy(predictor, cfg.predictor, phase="predictor", seed=cfg.seed)
    train_tokens = FrozenTokens(tokenizer, cache=cfg.predictor.token_cache)
    val_tokens = FrozenTokens(tokenizer, cache=cfg.predictor.token_cache)

    def check_frozen() -> None:
        if weights_hash(tokenizer) != frozen_hash:
            raise FrozenTokenizerChanged(
                "the tokenizer's weights changed during phase 2 (hash differs from the one taken before "
                "training); phase 2 must never update the tokenizer"
            )

    step = strategy.wrap_step(make_predictor_step(train_tokens, teacher_forcing=cfg.predictor.teacher_forcing))
    phase = Phase("predictor", predictor, step, make_predictor_evaluate(val_tokens, skill), cfg.predictor.select_metric,
                  data.train, data.val, before_save=check_frozen,
                  inputs={"data": dataclasses.asdict(cfg.data), "tokenizer_sha256": frozen_hash},
                  reference=None if skill is None else _reference_skill(cfg, skill, predictor, tokenizer))
    result = run_phase(phase, cfg.predictor, run_dir=run_dir, seed=cfg.seed, device=device, precision=cfg.precision,
                       resume=resume, progress=progress, on_step=on_step)
    check_frozen()
    logger.info("predictor: tokenizer weights unchanged (sha256 %s...)", frozen_hash[:12])
    return result


def _skill_probe(cfg: KitConfig, data: DataBundle) -> ForecastSkill | None:
    """Phase 2's forecast-skill probe on the validation split (None when `predictor.skill_origins` is 0)."""
    p = cfg.predictor
    if not p.skill_origins:
        return None
    return ForecastSkill(data.splits.val, lookback=cfg.data.lookback, pred_len=p.skill_horizon, stride=p.skill_stride,
                         max_origins=p.skill_origins, sample_count=p.skill_paths, seed=cfg.seed)


def _reference_skill(cfg: KitConfig, skill: ForecastSkill, predictor: Kronos,
                     tokenizer: KronosTokenizer) -> Callable[[], dict[str, Any]]:
    """The starting predictor scored on the probe's origins: the level a finetune must beat (`reference`)."""

    def reference() -> dict[str, Any]:
        with inference(predictor):
            scores = skill(predictor, tokenizer)
        return {"model": "base", "source": cfg.predictor.start_from, **scores, "origins": skill.n_origins,
                "paths": skill.sample_count, "horizon": skill.pred_len}

    return reference
