"""Files written whole or not at all: atomic file writes and whole-folder swaps (re-exported by `runs`).

Every file the kit writes into a run directory goes through a helper here (a temporary file, fsynced, renamed
over the target), so a killed process never leaves half a file; checkpoint folders are swapped whole
(`replace_dir`, `recover_dir`), and the next swap finishes or undoes one that a kill interrupted at any point.
A full disk is a `DiskFullError` naming the file, with the previous version kept.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["DiskFullError", "atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "check_finite", "finish_swap", "recover_dir", "replace_dir"]




def check_finite(tensors: Mapping[str, Any], target: str | Path, error: type[Exception] = ValueError) -> None:
    """Refuse (raise `error`) before writing `target` when a floating tensor holds NaN or inf: never save those."""
    bad = [k for k, v in tensors.items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise error(
            f"refusing to write {target}: non-finite values in {len(bad)} tensor(s), e.g. {bad[:5]}; the files "
            "already there are kept. Training diverged: lower the learning rate or check the data."
        )


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path`.

    Temporaries that killed writers left behind (their process is gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            write(tmp)
            # a writer that creates its file 0600 (safetensors does) would leave the weights unreadable to the
            # group while every other file of the run is 0644: every file gets the mode a plain open() gives
            os.chmod(tmp, 0o666 & ~_UMASK)
            _fsync(tmp)  # the data on disk before the rename makes it visible (power loss, not only kills)
        except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError
            _raise_if_disk_full(err, path)
            raise
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _process_umask()


class DiskFullError(OSError):
    """A write into a run folder ran out of disk space; the previous file was kept."""


def _raise_if_disk_full(err: BaseException, target: Path) -> None:
    # torch.save reports a full disk as a RuntimeError ("unexpected pos ..."), safetensors as a SafetensorError
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err)
    if not full:
        try:
            full = shutil.disk_usage(target.parent).free < (1 << 20)
        except OSError:
            full = False
    if full:
        raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {target}; the previous "
                            "version of the file is kept. Free some space, then continue with --resume") from err


def _fsync(path: Path) -> None:
    """Flush a written file (or a folder's entries) to disk; a no-op where the OS cannot fsync folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _swap_names(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")


def replace_dir(directory: str | Path, write: Callable[[Path], Any]) -> Path:
    """Replace `directory` with what `write(tmp_dir)` creates; a kill at any moment leaves a complete one.

    The swap is: write `.<name>.tmp`, rename `<name>` -> `.<name>.old`, rename `.<name>.tmp` -> `<name>`,
    delete `.<name>.old`. `finish_swap` first repairs whatever state a kill left (see there).
    """
    directory = Path(directory)
    tmp, old = _swap_names(directory)
    finish_swap(directory)
    try:
        write(tmp)
        for written in [*tmp.rglob("*"), tmp]:
            _fsync(written)
    except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        _raise_if_disk_full(err, directory)
        raise
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)  # what a failure leaves here, the next swap removes
    return directory


def finish_swap(directory: str | Path) -> Path:
    """Repair a `replace_dir` swap that a kill interrupted at any point (writers only).

    `<name>` present: the swap finished or never began, so `.old` (possibly half deleted) and `.tmp`
    (possibly half written) are leftovers and go. `<name>` missing with `.old` present: killed
    between the two renames; `.old` is the previous complete copy and comes back. `.tmp` alone is
    never trusted (it may be half written).
    """
    directory = recover_dir(directory)
    tmp, old = _swap_names(directory)
    for leftover in (old, tmp):
        if leftover.exists():
            shutil.rmtree(leftover)
    return directory


def recover_dir(directory: str | Path) -> Path:
    """Bring back the previous complete copy when a kill fell between a swap's two renames (readers too)."""
    directory = Path(directory)
    old = _swap_names(directory)[1]
    if not directory.exists() and old.exists():
        os.replace(old, directory)
    return directory
