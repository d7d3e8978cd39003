"""One writer per run folder: `run_lock(run_dir, what)` holds the folder's advisory lock while a block runs.

The lock is a `flock` on `<run_dir>/.lock` (`LOCK_FILE`), whose content names the holder (pid, what,
since). A second writer gets `RunLockedError` naming the holder's pid. The kernel drops a flock when its
holder exits, however it exits, so a killed process never leaves the folder locked: the record it
leaves behind is reported as a stale lock and taken over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, run folders are not locked
    fcntl = None

__all__ = ["LOCK_ENV", "LOCK_FILE", "RunLockedError", "run_lock", "waiting_run_lock"]

LOCK_FILE = ".lock"  # the writer's advisory lock (flock) with its pid
LOCK_ENV = "KRONOS_RUN_LOCK"  # the run folder this process's parent holds locked (papermill kernels inherit it)

logger = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another live process is writing this run folder (it holds the folder's lock)."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold `run_dir`'s advisory lock while the block runs: a second writer gets `RunLockedError` naming
    the holder's pid. The lock is a `flock` on `<run_dir>/.lock`, so the kernel releases it when the
    holder exits, even when killed; a lock file left by a process that is gone is stale, is taken over,
    and says so. Child processes (the pipeline's notebook kernels) inherit the lock through $KRONOS_RUN_LOCK;
    under torchrun only rank 0 writes, so only rank 0 locks.
    """
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if fcntl is None or os.environ.get(LOCK_ENV) == key or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
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
        record = {"pid": os.getpid(), "what": what, "since": dt.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
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
                if not told:
                    logger.info("waiting: %s", err)
                    told = True
                time.sleep(poll)
        yield
