"""The one training engine, and the two Kronos finetuning phases that run on it.

Phase 1 (`train_tokenizer`) adapts the tokenizer: loss = (mse(z_pre, x) + mse(z, x) + bsq_loss) / 2.
Phase 2 (`train_predictor`) finetunes the predictor on tokens of the frozen phase-1 tokenizer:
loss = (ce_s1 + ce_s2) / 2 on next-token targets. Never jointly. Both run `run_phase`, which owns
the loop: AdamW + OneCycle, gradient accumulation and clipping, evaluation, early stopping,
checkpoints (`<run_dir>/<phase>/best|last`, reference layout), exact resume
(`<run_dir>/state/<phase>.pt`), `metrics.jsonl`, progress bars and torchrun (DDP) support.
The phases differ only in their `Phase`: the model trained, a step function, an evaluation
function and the checkpoints they start from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from kronos_kit.config import KitConfig, PhaseConfig
from kronos_kit.model import Kronos, KronosTokenizer, check_pair, weights_hash

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; training stopped and the last good checkpoint was kept."""


class FrozenTokenizerChanged(RuntimeError):
    """The tokenizer's weights changed during phase 2, which must never happen."""


# ---------------------------------------------------------------------------------------------
# environment: seed, device, distributed


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum floats over ranks (validation totals)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices from (seed, epoch), strided over ranks, resumable mid-epoch.

    Rank r takes positions r, r + world, ... of the epoch's permutation, so the union of the ranks'
    k-th batches is the k-th global batch a single process would draw.
    """

    def __init__(self, n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world: int = 1,
                 skip: int = 0):
        order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
        usable = (n // world) * world  # equal shards keep DDP ranks in step
        self.indices = order[:usable][rank::world][skip:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# files: atomic checkpoints, training state, metrics log


def save_checkpoint(model: nn.Module, directory: Path) -> None:
    """Replace `directory` with a fresh checkpoint; a kill at any moment leaves a complete one."""
    directory = Path(directory)
    tmp, old = directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    recover_checkpoint(directory)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(directory: Path) -> Path:
    """Finish a checkpoint swap that a kill interrupted (the previous complete copy comes back)."""
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.exists():
        os.replace(old, directory)
    return directory


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSON lines (`metrics.jsonl`), written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool = True):
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


@dataclass
class PhaseResult:
    name: str
    steps: int
    best_metric: float
    best_dir: Path
    last_dir: Path
    stopped: str  # "max_steps", "epochs", "early_stopping"
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records


def _lr_schedule(optimizer, cfg: PhaseConfig, total_steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=cfg.pct_start, div_factor=cfg.div_factor,
    )


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> PhaseResult:
    """Train `phase.model` per `cfg`; checkpoints, state and metrics go under `run_dir`."""
    run_dir = Path(run_dir)
    ctx = DistContext.from_env(device)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=ctx.is_main)
    best_dir, last_dir = run_dir / phase.name / "best", run_dir / phase.name / "last"
    state_path = run_dir / "state" / f"{phase.name}.pt"
    if ctx.world_size > 1 and cfg.batch_size % ctx.world_size:
        raise ValueError(f"{phase.name}.batch_size={cfg.batch_size} must divide by the {ctx.world_size} ranks")
    local_batch = cfg.batch_size // ctx.world_size
    if len(phase.train_set) < cfg.batch_size:
        raise ValueError(f"{phase.name}: only {len(phase.train_set)} training windows for batch_size "
                         f"{cfg.batch_size}; lower the batch size or bring more data")
    if len(phase.val_set) == 0:
        raise ValueError(f"{phase.name}: the validation split has no windows; enlarge data.val_ratio or the data")
    batches_per_epoch = len(phase.train_set) // cfg.batch_size
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum_steps)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    seed_everything(seed)
    model = phase.model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    scheduler = _lr_schedule(optimizer, cfg, total_steps)
    step, epoch, batch_in_epoch = 0, 0, 0
    best, evals_since_best, history = math.inf, 0, []
    resumed = resume and state_path.is_file()
    if resumed:
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best, evals_since_best, history = state["best"], state["evals_since_best"], state["history"]
        _set_rng_state(state["rng"])
        logger.info("%s: resumed at step %d (epoch %d, batch %d)", phase.name, step, epoch, batch_in_epoch)
        if state.get("stopped"):
            return PhaseResult(phase.name, step, best, best_dir, last_dir, state["stopped"], history)
    elif resume:
        logger.info("%s: nothing to resume in %s; starting fresh", phase.name, state_path)
    train_model = model
    if ctx.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda")

    def save(stopped: str | None = None) -> None:
        phase.before_save()
        if ctx.is_main:
            save_checkpoint(model, last_dir)
            _atomic_torch_save({
                "phase": phase.name, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "best": best, "evals_since_best": evals_since_best, "history": history, "rng": _rng_state(),
                "stopped": stopped, "config": dataclasses.asdict(cfg),
            }, state_path)

    def evaluate() -> bool:
        """Validate, log, keep `best`; True when early stopping says stop."""
        nonlocal best, evals_since_best
        val_loader = DataLoader(phase.val_set, batch_size=local_batch, generator=torch.Generator(),
                                sampler=EpochSampler(len(phase.val_set), seed=seed, epoch=0, shuffle=False,
                                                     rank=ctx.rank, world=ctx.world_size))
        if cfg.max_val_batches is not None:
            val_loader = _take(val_loader, cfg.max_val_batches)
        model.eval()
        with torch.no_grad(), autocast:
            metrics = phase.evaluate(model, val_loader, ctx)
        model.train()
        value = metrics[phase.select_metric]
        improved = value < best
        if improved:
            best, evals_since_best = value, 0
            if ctx.is_main:
                save_checkpoint(model, best_dir)
        else:
            evals_since_best += 1
        record = {"phase": phase.name, "kind": "eval", "step": step, "epoch": epoch, **metrics, "best": improved}
        history.append(record)
        log.write(record)
        return cfg.patience is not None and evals_since_best >= cfg.patience

    if not resumed:
        save()  # a complete `last` from the start: a failure before the first evaluation keeps it
    bar = tqdm(total=total_steps, initial=step, desc=f"phase {phase.name}", unit="step", disable=not progress)
    stopped = "epochs"
    window_count, t0 = 0, time.perf_counter()
    while epoch < cfg.epochs and step < total_steps:
        if hasattr(phase.train_set, "set_epoch"):
            phase.train_set.set_epoch(epoch)
        sampler = EpochSampler(len(phase.train_set), seed=seed, epoch=epoch, shuffle=True, rank=ctx.rank,
                               world=ctx.world_size, skip=batch_in_epoch * local_batch)
        # an own generator: iterating a DataLoader must not draw from the global RNG (exact resume)
        loader = DataLoader(phase.train_set, batch_size=local_batch, sampler=sampler, drop_last=True,
                            generator=torch.Generator())
        optimizer.zero_grad(set_to_none=True)
        for batch in loader:
            with autocast:
                out = phase.step(train_model, batch)
            if not torch.isfinite(out.loss):
                parts = {k: float(v) for k, v in out.parts.items()}
                raise NonFiniteLossError(
                    f"{phase.name}: non-finite loss {out.loss.item()} at step {step} (epoch {epoch}, batch "
                    f"{batch_in_epoch}); parts {parts}. Training stopped; the last good checkpoint is {last_dir}. "
                    "Lower the learning rate or check the data for extreme values."
                )
            (out.loss / cfg.grad_accum_steps).backward()
            batch_in_epoch += 1
            window_count += len(batch["x"]) * ctx.world_size
            if batch_in_epoch % cfg.grad_accum_steps:
                continue
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            parts = {k: float(v) for k, v in out.parts.items()}
            bar.set_postfix(loss=f"{out.loss.item():.4f}")
            if on_step is not None:
                on_step(step, {"loss": out.loss.item(), **parts})
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t0
                log.write({"phase": phase.name, "kind": "train", "step": step, "epoch": epoch,
                           "lr": scheduler.get_last_lr()[0], "loss": out.loss.item(), **parts,
                           "grad_norm": grad_norm, "windows_per_s": window_count / max(elapsed, 1e-9)})
                window_count, t0 = 0, time.perf_counter()
            if step % cfg.eval_every == 0 or step == total_steps:
                if evaluate():
                    stopped = "early_stopping"
                    break
                save()
            if step >= total_steps:
                stopped = "max_steps" if cfg.max_steps is not None and step >= cfg.max_steps else "epochs"
                break
        if stopped == "early_stopping" or step >= total_steps:
            break
        epoch, batch_in_epoch = epoch + 1, 0
        if step % cfg.eval_every and evaluate():  # epoch end, unless just evaluated
            stopped = "early_stopping"
            break
        save()
    bar.close()
    save(stopped)
    if not best_dir.exists() and ctx.is_main:  # e.g. resumed a finished run with no improvement
        save_checkpoint(model, best_dir)
    return PhaseResult(phase.name, step, best, best_dir, last_dir, stopped, history)


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


# ---------------------------------------------------------------------------------------------
# phase 1: tokenizer


def tokenizer_step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
    """(mse(z_pre, x) + mse(z, x) + bsq_loss) / 2, as the reference trains the tokenizer."""
    x = batch["x"].to(_device_of(model))
    (z_pre, z), bsq_loss, _, _ = model(x)
    recon_pre, recon_full = F.mse_loss(z_pre, x), F.mse_loss(z, x)
    loss = (recon_pre + recon_full + bsq_loss) / 2
    return StepOutput(loss, {"recon_s1": recon_pre.detach(), "recon_full": recon_full.detach(),
                             "bsq": bsq_loss.detach()})


def evaluate_tokenizer(model: nn.Module, loader, ctx: DistContext) -> dict[str, float]:
    """Full-decoder and s1-only reconstruction MSE, loss, and s1/s2 codebook usage."""
    from kronos_kit.codebook import CodebookCounter

    device = _device_of(model)
    counter = CodebookCounter(model.s1_bits, model.s2_bits, joint=False)
    sums = [0.0, 0.0, 0.0, 0.0]  # full mse * n, s1 mse * n, loss * n, n
    for batch in loader:
        x = batch["x"].to(device)
        (z_pre, z), bsq_loss, quantized, _ = model(x)
        s1, s2 = model.quantizer.codes_to_indices(quantized)
        counter.update(s1.cpu(), s2.cpu())
        full, pre = F.mse_loss(z, x).item(), F.mse_loss(z_pre, x).item()
        n = len(x)
        sums = [sums[0] + full * n, sums[1] + pre * n, sums[2] + (full + pre + bsq_loss.item()) / 2 * n, sums[3] + n]
    sums = ctx.sum(sums, device)
    s1_counts, s2_counts, _ = counter.counts()
    if ctx.world_size > 1:
        merged = ctx.sum([*s1_counts.tolist(), *s2_counts.tolist()], device)
        s1_counts, s2_counts = np.array(merged[: len(s1_counts)]), np.array(merged[len(s1_counts):])
    n = max(sums[3], 1)
    return {"val_recon_full": sums[0] / n, "val_recon_s1": sums[1] / n, "val_loss": sums[2] / n,
            "s1_usage": float((s1_counts > 0).mean()), "s2_usage": float((s2_counts > 0).mean())}


# ---------------------------------------------------------------------------------------------
# phase 2: predictor on the frozen tokenizer


def freeze(module: nn.Module) -> dict[str, Any]:
    """Put a module in eval() with gradients off; return what shows it is frozen (for notebooks)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return {"mode": "eval" if not module.training else "train",
            "trainable parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in module.parameters()), "sha256": weights_hash(module)}


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
        device = _device_of(model)
        s1, s2 = tokens(batch, device)
        stamp = batch["stamp"].to(device)
        # inputs: tokens[:-1] with their time features; targets: tokens[1:]
        s1_logits, s2_logits = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=teacher_forcing,
                                     s1_targets=s1[:, 1:])
        loss, ce_s1, ce_s2 = unwrap(model).head.compute_loss(s1_logits, s2_logits, s1[:, 1:], s2[:, 1:])
        return StepOutput(loss, {"ce_s1": ce_s1.detach(), "ce_s2": ce_s2.detach()})

    return step


@torch.no_grad()
def score_next_tokens(model: nn.Module, s1: torch.Tensor, s2: torch.Tensor, stamp: torch.Tensor) -> list[float]:
    """[s1 NLL sum, s2 NLL sum, s1 hits, s2 hits, tokens] of next-token prediction on one batch.

    The causal path with s2 conditioned on the true next s1: no RNG, no leak of the s2 target.
    """
    # Kronos.forward is causal in the s2 layer by default (causal_s2=True)
    l1, l2 = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=True, s1_targets=s1[:, 1:])
    t1, t2 = s1[:, 1:], s2[:, 1:]
    n = t1.numel()
    return [F.cross_entropy(l1.reshape(n, -1).float(), t1.reshape(-1), reduction="sum").item(),
            F.cross_entropy(l2.reshape(n, -1).float(), t2.reshape(-1), reduction="sum").item(),
            (l1.argmax(-1) == t1).sum().item(), (l2.argmax(-1) == t2).sum().item(), n]


def make_predictor_evaluate(tokens: FrozenTokens) -> Callable[[nn.Module, Any, DistContext], dict[str, float]]:
    def evaluate(model: nn.Module, loader, ctx: DistContext) -> dict[str, float]:
        device = _device_of(model)
        sums = [0.0] * 5
        for batch in loader:
            s1, s2 = tokens(batch, device)
            scores = score_next_tokens(model, s1, s2, batch["stamp"].to(device))
            sums = [a + b for a, b in zip(sums, scores)]
        sums = ctx.sum(sums, device)
        n = max(sums[4], 1)
        ce1, ce2 = sums[0] / n, sums[1] / n
        return {"val_loss": (ce1 + ce2) / 2, "val_ce_s1": ce1, "val_ce_s2": ce2, "val_acc_s1": sums[2] / n,
                "val_acc_s2": sums[3] / n}

    return evaluate


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# entry points


@dataclass
class DataBundle:
    frame: Any  # the canonical long frame
    splits: Any  # data.Splits
    train: Dataset
    val: Dataset
    test: Dataset


def load_data(cfg: KitConfig) -> DataBundle:
    """Load, split and window the configured data (train windows per the epoch cap; val/test all)."""
    from kronos_kit.data import WindowDataset, load_ohlcv, load_sample, split

    d = cfg.data
    if d.source.startswith("sample:"):
        frame = load_sample(d.source.removeprefix("sample:"))
    else:
        frame = load_ohlcv(d.source, symbol=d.symbol, fill=d.fill)
    if d.val_start or d.test_start:
        if not (d.val_start and d.test_start):
            raise ValueError("data.val_start and data.test_start go together: set both, or neither to use ratios")
        splits = split(frame, lookback=d.lookback, predict=d.predict, dates=(d.val_start, d.test_start))
    else:
        ratios = (d.train_ratio, d.val_ratio, 1 - d.train_ratio - d.val_ratio)
        splits = split(frame, lookback=d.lookback, predict=d.predict, ratios=ratios)
    train = WindowDataset(splits.train, lookback=d.lookback, predict=d.predict, clip=d.clip, stride=d.stride,
                          max_samples=d.max_samples_per_epoch, seed=cfg.seed)
    val = WindowDataset(splits.val, lookback=d.lookback, predict=d.predict, clip=d.clip)
    test = WindowDataset(splits.test, lookback=d.lookback, predict=d.predict, clip=d.clip)
    return DataBundle(frame, splits, train, val, test)


def tokenizer_source_for_phase2(cfg: KitConfig, run_dir: Path) -> str:
    """The tokenizer phase 2 uses: explicit, else this run's phase-1 best, else the base tokenizer."""
    if cfg.predictor.tokenizer_from:
        return cfg.predictor.tokenizer_from
    own = recover_checkpoint(run_dir / "tokenizer" / "best")
    if cfg.tokenizer.enabled or own.exists():
        if not own.exists():
            raise FileNotFoundError(f"{own} not found: run phase 1 first, or set predictor.tokenizer_from")
        return str(own)
    return cfg.tokenizer.start_from


def _run_dir(cfg: KitConfig) -> Path:
    if cfg.run_dir is None:
        raise ValueError("run_dir is not set: pass run_dir in the config or as a parameter")
    return Path(cfg.run_dir)


def train_tokenizer(cfg: KitConfig, *, resume: bool = False, data: DataBundle | None = None, progress: bool = True,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> PhaseResult:
    """Phase 1: adapt the tokenizer to the configured data."""
    run_dir = _run_dir(cfg)
    device = resolve_device(cfg.device)
    data = data or load_data(cfg)
    tokenizer = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from, seed=cfg.seed)
    tokenizer.quantizer.entropy_mode = cfg.tokenizer.entropy_mode
    phase = Phase("tokenizer", tokenizer, tokenizer_step, evaluate_tokenizer, "val_recon_full", data.train, data.val)
    return run_phase(phase, cfg.tokenizer, run_dir=run_dir, seed=cfg.seed, device=device, precision=cfg.precision,
                     resume=resume, progress=progress, on_step=on_step)


def train_predictor(cfg: KitConfig, *, resume: bool = False, data: DataBundle | None = None, progress: bool = True,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> PhaseResult:
    """Phase 2: finetune the predictor on tokens of the frozen phase-1 tokenizer."""
    run_dir = _run_dir(cfg)
    device = resolve_device(cfg.device)
    data = data or load_data(cfg)
    tokenizer = KronosTokenizer.from_pretrained(tokenizer_source_for_phase2(cfg, run_dir), device=device)
    predictor = Kronos.from_pretrained(cfg.predictor.start_from, seed=cfg.seed)
    check_pair(tokenizer, predictor)
    frozen_hash = weights_hash(tokenizer)
    train_tokens = FrozenTokens(tokenizer, cache=cfg.predictor.token_cache)
    val_tokens = FrozenTokens(tokenizer, cache=cfg.predictor.token_cache)

    def check_frozen() -> None:
        if weights_hash(tokenizer) != frozen_hash:
            raise FrozenTokenizerChanged(
                "the tokenizer's weights changed during phase 2 (hash differs from the one taken before "
                "training); phase 2 must never update the tokenizer"
            )

    step = make_predictor_step(train_tokens, teacher_forcing=cfg.predictor.teacher_forcing)
    phase = Phase("predictor", predictor, step, make_predictor_evaluate(val_tokens), "val_loss", data.train, data.val,
                  before_save=check_frozen)
    result = run_phase(phase, cfg.predictor, run_dir=run_dir, seed=cfg.seed, device=device, precision=cfg.precision,
                       resume=resume, progress=progress, on_step=on_step)
    check_frozen()
    logger.info("predictor: tokenizer weights unchanged (sha256 %s...)", frozen_hash[:12])
    return result
