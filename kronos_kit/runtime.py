"""Where and how code runs: one seed, the device, the torchrun (DDP) context, and inference mode.

Every module that seeds, picks a device, runs a model for inference or asks where a module lives
comes here, so each of these exists once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PROGRESS_ENV", "SMALL_MODEL_WIDTH", "DistContext", "apply_threads", "check_device", "default_threads",
           "format_seconds", "freeze", "inference", "module_device", "resolve_device", "seed_everything", "set_threads",
           "state_dict_hash", "tqdm", "unwrap", "weights_hash"]


def format_seconds(seconds: float) -> str:
    """`42 s`, `2 min 05 s`, `1 h 02 min`: rounded once, so 179.6 s reads 3 min 00 s, never 2 min 60 s."""
    total = int(round(max(seconds, 0.0)))
    if total < 120:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    return f"{total // 3600} h {total % 3600 // 60:02d} min"


PROGRESS_ENV = "KRONOS_PROGRESS_FILE"  # set by the pipeline for its kernels: where their progress bars report


def tqdm(*args: Any, **kwargs: Any):
    """The kit's progress bar: `tqdm.auto`, except inside a Jupyter kernel, where it is tqdm's text bar on
    stdout. A widget bar freezes at its first frame in a notebook opened without a kernel; a text bar
    redraws in place and what the notebook keeps is its last state.

    Its rate is the average since the start (`smoothing=0`), so the ETA does not jump with a slow or fast
    moment. A caller that knows better sets `bar.eta_s` (the training engine counts the validations still to
    come). Under the pipeline ($KRONOS_PROGRESS_FILE) every bar also reports its state to that file, which the
    pipeline prints in the terminal.
    """
    kwargs.setdefault("smoothing", 0)
    if "ipykernel" in sys.modules:
        from tqdm.std import tqdm as bar_class

        kwargs.setdefault("file", sys.stdout)
    else:
        from tqdm.auto import tqdm as bar_class
    path = os.environ.get(PROGRESS_ENV)
    if path:
        bar_class = _reporting(bar_class, path)
    return bar_class(*args, **kwargs)


def _reporting(bar_class: type, path: str) -> type:
    """`bar_class` whose every redraw (at most one a second) and close appends its state to `path` as a JSON line:
    id, desc, n, total, unit, elapsed and ETA seconds, postfix, closed."""

    class ReportingBar(bar_class):
        _last_report = -1.0

        def display(self, *args: Any, **kwargs: Any):
            shown = super().display(*args, **kwargs)
            if not getattr(self, "_closed_report", False):  # close() redraws once more after its own report
                self._report(closed=False)
            return shown

        def close(self) -> None:
            if not self.disable and not getattr(self, "_closed_report", False):
                self._closed_report = True
                self._report(closed=True)
            super().close()

        def _report(self, *, closed: bool) -> None:
            now = time.monotonic()
            if not closed and now - self._last_report < 1.0 and self.n != self.total:
                return
            self._last_report = now
            elapsed = self.format_dict.get("elapsed", 0.0)
            eta = getattr(self, "eta_s", None)
            if eta is None and self.total and self.n:
                eta = (self.total - self.n) * elapsed / self.n
            record = {"id": id(self), "pid": os.getpid(), "desc": self.desc, "n": self.n, "total": self.total,
                      "unit": self.unit, "elapsed": round(elapsed, 2), "eta": None if eta is None else round(eta, 1),
                      "postfix": self.postfix or "", "closed": closed}
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError:
                pass  # progress is a courtesy: never fail the work for it

    return ReportingBar


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    """Use `threads` torch CPU threads (None: leave torch's default); returns the count in effect.

    On a busy shared CPU one thread can be many times faster than several: each small op waits for
    every OpenMP worker, and a descheduled worker stalls them all (benchmarks/RESULTS.md: 16 s vs 163 s).
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# The default thread rule, measured (benchmarks/bench_threads.py, benchmarks/RESULTS.md "Threads"): models
# at most this wide (d_model) run on one thread, because their matrices are too small for a second thread to
# share work (it only waits, and on a busy CPU a descheduled one stalls every op); wider models keep torch's
# default. The rule depends on the model only, so a rerun picks the same count and stays bit-identical.
SMALL_MODEL_WIDTH = 256
_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anything set it


def default_threads(width: int | None) -> int | None:
    """The thread count used when none is asked for: 1 for models at most `SMALL_MODEL_WIDTH` wide, else None
    (torch's default, one per core). `width` is the widest model's d_model (None: unknown, torch's default)."""
    return 1 if width is not None and width <= SMALL_MODEL_WIDTH else None


def apply_threads(requested: int | None, width: int | None) -> str:
    """Set torch's CPU threads: `requested` when given (the `threads` config field or $KRONOS_THREADS), else
    `default_threads(width)`; returns one line saying how many and why."""
    if requested is not None:
        return f"threads: {set_threads(requested)} (asked for)"
    rule = default_threads(width)
    if rule is not None:
        return (f"threads: {set_threads(rule)} (the models are {width} wide, at most {SMALL_MODEL_WIDTH}: a second "
                "thread would only wait; set `threads` to change it)")
    count = set_threads(_TORCH_DEFAULT_THREADS)
    why = f"the models are {width} wide" if width is not None else "the model width is unknown"
    return f"threads: {count} (torch's default: {why}; set `threads` to change it){_busy_note(count)}"


def _busy_note(count: int) -> str:
    """A warning when several threads meet a machine whose cores are already taken (load average >= CPUs)."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return ""
    if count < 2 or load < cpus:
        return ""
    return (f"; the machine is busy now (load average {load:.1f} on {cpus} CPUs): threads=1 may be several times "
            "faster (benchmarks/RESULTS.md, Threads)")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA (this torchrun rank's GPU), then MPS, then CPU; any other name as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(name: str) -> torch.device:
    """`resolve_device(name)`, refusing with a ValueError a device name torch does not know or this machine
    lacks (`cuda` without CUDA, `mps` off Apple silicon) before anything runs on it."""
    try:
        device = resolve_device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a device name ({err}); use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise ValueError(f"device {name!r}: this machine has {found} (torch {torch.__version__}); use auto or cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: MPS is not available here; use auto or cpu")
    return device


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
            _end_with_parent()
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum floats over ranks (validation totals)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def _end_with_parent() -> None:
    """Ask Linux to SIGTERM this torchrun worker when its launcher dies: a SIGKILLed torchrun cannot stop its
    workers itself, and orphans would keep writing the run folder (elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def module_device(module: Any) -> torch.device | None:
    """The device of a module's first parameter; None for anything without parameters."""
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None


@contextmanager
def inference(*modules: Any, device: str | torch.device | None = None) -> Iterator[torch.device]:
    """eval() + no_grad(), restoring each module's mode afterwards; yields the device to run on.

    With `device`, modules living elsewhere move there for the block and back afterwards; without
    it the block runs where the first module lives (CPU for modules without parameters).
    """
    homes = [module_device(m) for m in modules]
    target = torch.device(device) if device is not None else next((h for h in homes if h is not None),
                                                                  torch.device("cpu"))
    # "cuda" and "cuda:0" name the same place; only move when the device really differs
    moved = [h is not None and (h.type != target.type or (target.index is not None and h != target)) for h in homes]
    modes = [getattr(m, "training", False) for m in modules]
    for m, move in zip(modules, moved):
        if hasattr(m, "eval"):
            m.eval()
        if move:
            m.to(target)
    try:
        with torch.no_grad():
            yield target
    finally:
        for m, home, move, mode in zip(modules, homes, moved, modes):
            if move:
                m.to(home)
            if hasattr(m, "train"):
                m.train(mode)


def freeze(module: nn.Module) -> dict[str, Any]:
    """Put a module in eval() with gradients off for good; return what shows it is frozen (notebooks).

    `inference` is the temporary form (mode restored afterwards); this one is for the phase-2
    tokenizer, which must never train.
    """
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return {"mode": "eval" if not module.training else "train",
            "trainable parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in module.parameters()), "sha256": weights_hash(module)}


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names, dtypes, shapes and bytes)."""
    return state_dict_hash(model.state_dict())


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """`weights_hash` of a bare name -> tensor mapping (e.g. the base part of a LoRA model)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
