"""One writer per run folder: `run_lock(run_dir, what)` holds the folder's advisory lock while a block runs.

The lock is a `flock` on `<run_dir>/.lock` (`LOCK_FILE`), whose content names the holder (pid, what,
since). A second writer gets `RunLockedError` naming the holder's pid. The kernel drops a flock when its
holder exits, however it exits, so a killed process never leaves the folder locked: the record it
leaves behind is reported as a stale lock and taken over.

The lock file is opened without following links and must be a regular file of its own: a `.lock` that is a
link, a folder, a pipe or a second name of another file is refused (`BadLockFileError`), so the kit never
writes where such a name points. Only two kinds of process write under a lock they do not take themselves:
a child of the holder (the pipeline's notebook kernels, told by $KRONOS_RUN_LOCK, checked against the lock's
record), and a torchrun worker of rank > 0 while rank 0 of the same job holds the lock (`torchrun_rank`:
every variable torchrun sets, checked against the record rank 0 wrote). A bare `RANK` is no rank.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, run folders are not locked
    fcntl = None

__all__ = ["LOCK_ENV", "LOCK_FILE", "BadLockFileError", "RunLockedError", "run_lock", "torchrun_rank",
           "waiting_run_lock"]

LOCK_FILE = ".lock"  # the writer's advisory lock (flock) with its pid
LOCK_ENV = "KRONOS_RUN_LOCK"  # the run folder this process's parent holds locked (papermill kernels inherit it)
# what torchrun sets for each worker; all of them together make a process a rank
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
RANK_WAIT_S = 300.0  # how long a rank > 0 waits for rank 0 of its job to take the lock

logger = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another live process is writing this run folder (it holds the folder's lock)."""


class BadLockFileError(RunLockedError):
    """The run folder's `.lock` is not a regular file of its own (a link, a folder, a pipe, a hard link)."""


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started it (every one of `TORCHRUN_VARS` set, the ranks whole numbers
    within the world size), else None: a `RANK` set by hand does not make a rank."""
    values = {name: os.environ.get(name) for name in TORCHRUN_VARS}
    if any(v is None for v in values.values()):
        return None
    numbers = [values[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK")]
    if not all(v.isdigit() for v in numbers) or int(values["RANK"]) >= int(values["WORLD_SIZE"]):
        return None
    return int(values["RANK"])


def _job() -> dict[str, Any]:
    """Who this torchrun worker's job is (what rank 0 writes into the lock's record, and the others check)."""
    return {"job": [os.environ.get(k) for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")],
            "node": os.environ.get("GROUP_RANK"), "launcher": os.getppid()}


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold `run_dir`'s advisory lock while the block runs: a second writer gets `RunLockedError` naming
    the holder's pid. The lock is a `flock` on `<run_dir>/.lock`, so the kernel releases it when the
    holder exits, even when killed; a lock file left by a process that is gone is stale, is taken over,
    and says so. Child processes (the pipeline's notebook kernels) inherit the lock through $KRONOS_RUN_LOCK;
    under torchrun rank 0 locks and the other ranks of its job go on under its lock.
    """
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    path = folder / LOCK_FILE
    if fcntl is None or (os.environ.get(LOCK_ENV) == key and _held_by(path, {"pid": (os.getpid(), os.getppid())})):
        yield
        return
    rank = torchrun_rank()
    if rank is not None and rank > 0:
        _wait_for_rank0(path, folder)
        yield
        return
    fd = _open_lock(path, folder)
    try:
        _take(fd, folder, what, job=_job() if rank == 0 else {})
        before, os.environ[LOCK_ENV] = os.environ.get(LOCK_ENV), key
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = before
            os.ftruncate(fd, 0)  # released cleanly: an empty lock file names no holder
    finally:
        os.close(fd)  # closing drops the flock


def _open_lock(path: Path, folder: Path, *, create: bool = True) -> int:
    """The lock file, opened without following a link; refused unless it is a regular file with one name."""
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
            kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
            raise BadLockFileError(_bad(path, folder, kind)) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"one of {info.st_nlink} names of a file"
        raise BadLockFileError(_bad(path, folder, kind))
    return fd


def _bad(path: Path, folder: Path, kind: str) -> str:
    return (f"{path} is {kind}, not the lock file the kit writes: a run folder's lock must be a regular file of "
            f"its own (the kit never writes through another name). Remove it (rm -r {path}) and try again; nothing "
            f"in {folder} was changed")


def _take(fd: int, folder: Path, what: str, *, job: dict[str, Any]) -> None:
    """flock the open lock file (else `RunLockedError` naming the holder) and write this process's record."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        holder = _lock_holder(fd)
        raise RunLockedError(
            f"{folder} is in use: process {holder.get('pid', '?')} holds its lock ({holder.get('what', '?')}, "
            f"since {holder.get('since', '?')}). A run folder has one writer at a time: wait for it to end, "
            f"stop it (kill {holder.get('pid', '<pid>')}), or use another run folder") from None
    previous = _lock_holder(fd)
    if previous.get("pid") and previous["pid"] != os.getpid():
        logger.warning("%s: stale lock of process %s (%s) taken over: that process is gone without releasing "
                       "it (killed?); its files are repaired as resume and saves do", folder, previous["pid"],
                       previous.get("what", "?"))
    record = {"pid": os.getpid(), "what": what, "since": dt.datetime.now().isoformat(timespec="seconds"), **job}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def _held_by(path: Path, expected: dict[str, Any]) -> bool:
    """True when the lock is held now and its record matches ``expected`` (a tuple: any of those values)."""
    try:
        fd = _open_lock(path, path.parent, create=False)
    except (OSError, BadLockFileError):
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            record = _lock_holder(fd)
            return all(record.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in expected.items())
        fcntl.flock(fd, fcntl.LOCK_UN)  # nobody holds it
        return False
    finally:
        os.close(fd)


def _wait_for_rank0(path: Path, folder: Path) -> None:
    """A torchrun worker of rank > 0 goes on under the lock of rank 0 of its own job (same job id, master and,
    on rank 0's node, launcher); it waits for rank 0 to take it, and is refused if rank 0 never does."""
    job = _job()
    expected = {"job": job["job"], **({"launcher": job["launcher"]} if job["node"] == "0" else {})}
    deadline = time.monotonic() + RANK_WAIT_S
    while time.monotonic() < deadline:
        if _held_by(path, expected):
            return
        time.sleep(0.1)
    raise RunLockedError(f"{folder}: this torchrun worker (rank {os.environ.get('RANK')}) waited {RANK_WAIT_S:.0f} s "
                         "for rank 0 of its job to take the run folder's lock, and it did not (another process holds "
                         "it, or rank 0 stopped); start the job again when the folder is free")


def _lock_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def waiting_run_lock(run_dir: str | Path, what: str, *, poll: float = 1.0) -> Iterator[None]:
    """`run_lock`, waiting while another live process holds it instead of refusing: for folders several
    processes may each want to build once (a sweep's shared phase 1, a token cache), where the second
    should wait for the first and then use what it built. Says once, at INFO, whom it waits for."""
    told = False
    with contextlib.ExitStack() as held:
        while True:
            try:
                held.enter_context(run_lock(run_dir, what))
                break
            except RunLockedError as err:
                if isinstance(err, BadLockFileError):  # waiting would never end: the file is not a lock
                    raise
                if not told:
                    logger.info("waiting: %s", err)
                    told = True
                time.sleep(poll)
        yield
