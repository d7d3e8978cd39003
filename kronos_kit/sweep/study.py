"""The sweep's Optuna study: storage, a fixed number of trial slots, taking a slot, and recovering killed trials.

Storage: SQLite in the sweep folder by default; `--storage` takes any database URL Optuna supports
(`postgresql://...`, `mysql://...`, `sqlite:///...`) or a journal file path (Optuna's `JournalStorage`),
so processes on several machines share one study.

Slots. A sweep of N trials enqueues N waiting trials when it is created: trial 0 holds the base config's
values (`SearchSpace.defaults`), the others are empty and sampled when taken. A worker takes a slot with
one atomic state change in the storage (waiting -> running, `take_trial`), so two workers never run the
same trial, and a sweep ends with exactly N finished trials however many workers share it. Each trial
samples with a TPE sampler seeded from (sweep seed, trial number), so workers never draw the same random
start-up parameters and a single-worker sweep is reproducible.

Recovery. A trial killed while running (SIGKILL, a lost machine) stays "running" in the storage. On this
machine its run folder's lock tells: the kernel drops a `flock` when its holder dies, so a free lock on
a running trial's folder means its worker is gone. `recover_orphans` marks such a trial failed
(`interrupted`) and enqueues a copy with the same parameters, run folder and reported values, which the
next worker continues from the training state it saved (no trial lost, none repeated). For database URLs
Optuna's heartbeat does the same for trials of other machines (`HEARTBEAT_SECONDS`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from kronos_kit.run_lock import RunLockedError, run_lock, waiting_run_lock
from kronos_kit.sweep.probe import ProbePruner
from kronos_kit.sweep.space import SweepSettings

__all__ = ["HEARTBEAT_SECONDS", "STUDY_FILE", "add_slots", "heartbeat", "make_sampler", "open_storage", "open_study",
           "recover_orphans", "requeue", "storage_url", "take_trial"]

logger = logging.getLogger(__name__)

STUDY_FILE = "study.db"  # the default storage: SQLite inside the sweep folder
HEARTBEAT_SECONDS = 60  # database URLs: a running trial's heartbeat; stale after 3 missed beats
ORPHAN_GRACE = dt.timedelta(seconds=120)  # a trial taken but never locked this long ago: its worker died
SLOT, ROLE = "slot", "role"  # trial user attributes: which of the N slots, "default" (trial 0) or "search"

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial


def storage_url(sweep_dir: Path, storage: str | None) -> str:
    """The study's storage: `storage` as given, else SQLite in the sweep folder."""
    return storage or f"sqlite:///{(Path(sweep_dir) / STUDY_FILE).resolve()}"


def open_storage(url: str, *, heartbeat: bool = False) -> optuna.storages.BaseStorage:
    """A database URL (anything with `://`) as Optuna's RDBStorage, else a journal file path."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several processes on one file: wait for the writer instead of failing
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    if heartbeat:
        kwargs.update(heartbeat_interval=HEARTBEAT_SECONDS, grace_period=3 * HEARTBEAT_SECONDS,
                      heartbeat_stale_trial_callback=lambda study, trial: requeue(study, trial))
    return optuna.storages.RDBStorage(url, **kwargs)


def make_sampler(settings: SweepSettings, number: int) -> optuna.samplers.TPESampler:
    """TPE for trial `number`, seeded from (settings.seed, number): workers draw different random start-ups."""
    seed = int(np.random.SeedSequence([settings.seed, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials, multivariate=True,
                                      group=True, constant_liar=True)


def make_pruner(settings: SweepSettings) -> optuna.pruners.BasePruner:
    """The median rule on the probe's val_crps (lower is better in any study, `probe.ProbePruner`), or none."""
    if not settings.prune:
        return optuna.pruners.NopPruner()
    return ProbePruner(settings.prune_startup_trials, settings.prune_warmup_steps)


def open_study(storage: optuna.storages.BaseStorage, name: str, settings: SweepSettings, *,
               direction: str | None = None) -> optuna.Study:
    """Create the study (`direction` given) or load it (None: it must exist)."""
    sampler, pruner = make_sampler(settings, 0), make_pruner(settings)
    if direction is None:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    return optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                               pruner=pruner)


def add_slots(study: optuna.Study, total: int, defaults: dict[str, Any]) -> int:
    """Enqueue slots until the study has `total` (slot 0: the base config's `defaults`); the number added."""
    have = {t.user_attrs.get(SLOT) for t in study.get_trials(deepcopy=False)} - {None}
    added = 0
    for slot in range(total):
        if slot in have:
            continue
        role = "default" if slot == 0 else "search"
        study.enqueue_trial(defaults if slot == 0 else {}, user_attrs={SLOT: slot, ROLE: role})
        added += 1
    return added


def open_slot(study: optuna.Study) -> None:
    """One more empty slot (a sweep bounded by time only has as many as it gets to)."""
    slots = [t.user_attrs.get(SLOT) for t in study.get_trials(deepcopy=False)]
    study.enqueue_trial({}, user_attrs={SLOT: max((s for s in slots if s is not None), default=0) + 1,
                                        ROLE: "search"})


@contextlib.contextmanager
def _serialized(storage: optuna.storages.BaseStorage) -> Iterator[None]:
    """Hold a lock beside an SQLite file while changing trial states. Optuna checks "still waiting?" and sets
    "running" in one transaction, which a database server serializes (row locks) and the journal replays in
    order, but SQLite does not lock rows: two processes may both read "waiting" and both take the trial
    (tests/test_sweep_pieces.py caught it). Other storages need no lock."""
    url = getattr(storage, "url", "")
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        yield
        return
    with waiting_run_lock(Path(url.removeprefix("sqlite:///") + ".lock"), "changing sweep trial states", poll=0.05):
        yield


def take_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, settings: SweepSettings
               ) -> optuna.Trial | None:
    """Take a waiting trial (retries of killed trials first, then in number order) with one atomic state change,
    so no other process gets it; None when none is waiting."""
    study_id = storage.get_study_id_from_name(study.study_name)
    with _serialized(storage):
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        for frozen in sorted(waiting, key=lambda t: ("retry_of" not in t.user_attrs, t.number)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    break
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker took it first
        else:
            return None
    study.sampler = make_sampler(settings, frozen.number)
    trial = optuna.Trial(study, trial_id)
    trial.set_user_attr("host", socket.gethostname())
    return trial


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a failed (killed) trial again: same parameters, run folder and reported values; it continues."""
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={**{k: v for k, v in trial.user_attrs.items() if k != "locked"}, "retry_of": trial.number,
                    "attempt": trial.user_attrs.get("attempt", 1) + 1},
        system_attrs=trial.system_attrs, intermediate_values=trial.intermediate_values))


def recover_orphans(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Fail and requeue this machine's running trials whose worker is gone; the numbers recovered."""
    if hasattr(storage, "get_heartbeat_interval") and storage.get_heartbeat_interval():
        optuna.storages.fail_stale_trials(study)  # other machines' dead trials (its callback requeues them)
    recovered = []
    study_id = storage.get_study_id_from_name(study.study_name)
    now = dt.datetime.now()
    with _serialized(storage):  # one process recovers a trial, and enqueues it once
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.user_attrs.get("host") != socket.gethostname() or not _worker_gone(frozen, now):
                continue
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            try:
                storage.set_trial_user_attr(trial_id, "interrupted", True)
                storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # it just finished (the leaderboard goes by its state, not by this mark)
            requeue(study, frozen)
            recovered.append(frozen.number)
            logger.warning("sweep: trial %d was interrupted (its worker is gone); enqueued again, it continues in "
                           "%s", frozen.number, frozen.user_attrs.get("run_dir"))
    return recovered


def _worker_gone(trial: FrozenTrial, now: dt.datetime) -> bool:
    """The trial's run folder lock is free (its holder died), or it was taken long ago and never locked."""
    folder = trial.user_attrs.get("run_dir")
    if not trial.user_attrs.get("locked") or not folder or not Path(folder).is_dir():
        return trial.datetime_start is not None and now - trial.datetime_start > ORPHAN_GRACE
    try:
        with run_lock(folder, "sweep: checking for an interrupted trial"):
            return True
    except RunLockedError:
        return False


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Record the running trial's heartbeat while the block runs (database URLs with heartbeats only)."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(trial.study.study_name), trial.number)

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
