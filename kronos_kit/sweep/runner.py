"""`run_sweep`: check the call, create or reopen the sweep folder and its study, run the workers, report.

Everything a user can get wrong is checked before anything is created (`pipeline.UsageError`: the command
line prints `error: ...` and exits with code 2): the config and space files, every parameter against the
config, the base config inside the space (it is trial 0), the data, the sweep folder.

Workers. `workers=1` runs the trials in this process; `workers=K` starts K processes on this machine, each
with `threads // K` torch threads (`threads`: the config's, else $KRONOS_THREADS, else the CPU count), and
waits for them. A worker takes waiting trials until none is left (or the time budget is spent) and ends
with its parent: a killed sweep leaves no worker behind. Another machine joins a study in a shared
database with `--storage URL --resume` and its own `--sweep-dir`. The report is written at the end.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import multiprocessing
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from kronos_kit.config import KitConfig, apply_overrides, parse_overrides, project_root, resolve_path, resolve_paths
from kronos_kit.data import load_data
from kronos_kit.data.store import source_sha256
from kronos_kit.pipeline import (  # the pipeline's own checks of a call, reused
    UsageError,
    _check_origins,
    _usage,
    run_name,
)
from kronos_kit.provenance import run_provenance
from kronos_kit.runtime import check_device, set_threads, tqdm
from kronos_kit.sweep.folder import SweepDir, load_sweep_study
from kronos_kit.sweep.objective import OBJECTIVES, RANK_IC, choose_objective
from kronos_kit.sweep.space import SearchSpace
from kronos_kit.sweep.study import (
    add_slots,
    open_slot,
    open_storage,
    open_study,
    recover_orphans,
    storage_url,
    take_trial,
)
from kronos_kit.sweep.trial import SweepContext, run_trial
from kronos_kit.train import check_phases

__all__ = ["DEFINITION_ATTR", "run_sweep", "worker_loop"]

logger = logging.getLogger(__name__)

DEFINITION_ATTR = "kronos_kit_sweep"  # the study's user attribute holding the sweep's definition (for joining)
POLL_SECONDS = 2.0


@dataclass
class _Plan:
    sweep: SweepDir
    mode: str  # "new", "resume" (this folder) or "join" (a study in a shared storage, from another machine)
    url: str
    name: str
    definition: dict[str, Any]  # what sweep.json and the study record: config, space, objective, data hash
    trials: int | None
    timeout: float | None


def _new_definition(config: str | Path | None, space: str | Path | None, values: dict[str, Any]) -> dict[str, Any]:
    """Check a new sweep's config, space and data; the definition it will record."""
    if space is None:
        raise UsageError("--space: give the search space file of a new sweep (e.g. configs/sweep.yaml)")
    config_path = resolve_path(config or "configs/default.yaml").resolve()
    base = _usage(lambda: resolve_paths(apply_overrides(KitConfig.from_file(config_path), values)), "--config: ")
    space_path = resolve_path(space).resolve()
    searched = _usage(lambda: SearchSpace.from_file(space_path), "--space: ")
    _usage(lambda: searched.check(base), "--space: ")
    if searched.settings.prune and not base.predictor.skill_origins:
        raise UsageError("pruning (sweep.prune) follows the forecast-skill probe: set predictor.skill_origins >= 1 "
                         "in the config, or sweep.prune: false")
    _usage(lambda: check_device(base.device), "device: ")
    bundle = _usage(lambda: load_data(base.with_overrides(run_dir=None, cache_dir=None)),
                    f"data.source {base.data.source!r}: ")
    _check_origins(base, bundle)
    _usage(lambda: check_phases(base, len(bundle.train)))
    objective = _usage(lambda: choose_objective(searched.settings.objective, base, bundle.splits), "sweep.objective: ")
    return {"config_file": str(config_path), "space_file": str(space_path), "parameters": values,
            "config_yaml": base.to_yaml(), "space": searched.to_dict(), "objective": objective.name,
            "direction": objective.direction, "data": {"source": base.data.source,
                                                         "sha256": source_sha256(base.data.source)},
            "created": dt.datetime.now().isoformat(timespec="seconds")}


def _plan(config, space, *, sweep_dir, values, trials, timeout, storage, study_name, resume) -> _Plan:
    if trials is not None and trials < 1:
        raise UsageError(f"--trials {trials}: give a whole number >= 1")
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout {timeout}: give seconds > 0")
    if not resume:
        definition = _new_definition(config, space, values)
        base = KitConfig.from_dict(yaml.safe_load(definition["config_yaml"]))
        folder = Path(sweep_dir) if sweep_dir else project_root() / "sweeps" / run_name(base)
        if folder.exists() and any(folder.iterdir()):
            raise UsageError(f"--sweep-dir {folder} exists and is not empty: pass --resume to continue that sweep, "
                             "or choose another --sweep-dir")
        url = storage_url(folder, storage)
        return _Plan(SweepDir(folder), "new", url, study_name or folder.name, definition, trials, timeout)
    if sweep_dir is None:
        raise UsageError("--resume needs --sweep-dir: the sweep folder to continue (or to create on this machine "
                         "when joining a study in a shared --storage)")
    if config is not None or space is not None or values:
        raise UsageError("--resume continues the sweep as it was defined (its config.yaml and space.yaml): leave out "
                         "--config, --space and -p; --trials may raise the number of trials")
    sweep = SweepDir(sweep_dir)
    if sweep.exists():
        known = sweep.definition()
        url = storage or known["storage"]
        name = study_name or known["study"]
        return _Plan(sweep, "resume", url, name, known, trials, timeout)
    if storage is None or study_name is None:
        raise UsageError(f"--resume: {sweep.path} is not a sweep folder. To continue a sweep give its folder; to "
                         "join a study on another machine give --storage URL and --study NAME with a new --sweep-dir")
    stored = _usage(lambda: optuna.load_study(study_name=study_name, storage=open_storage(storage)).user_attrs,
                    f"--storage {storage}, --study {study_name}: ")
    if DEFINITION_ATTR not in stored:
        raise UsageError(f"study {study_name!r} in {storage} was not created by a kronos-kit sweep")
    return _Plan(sweep, "join", storage, study_name, stored[DEFINITION_ATTR], trials, timeout)


def run_sweep(config: str | Path | None = None, space: str | Path | None = None, *, sweep_dir: str | Path | None = None,
              params: list[str] | dict[str, Any] | None = None, trials: int | None = None,
              timeout: float | None = None, workers: int = 1, storage: str | None = None,
              study_name: str | None = None, resume: bool = False, progress: bool = True) -> SweepDir:
    """Run (or continue) a sweep; returns its folder. `config`: the base config (default configs/default.yaml),
    `space`: the search space file, `params`: `-p` overrides of the base config, `trials` / `timeout`: override
    the space's settings, `workers`: processes on this machine, `storage`: an Optuna storage URL or journal
    file (default: SQLite in the sweep folder). Raises `UsageError` (creating nothing) for a bad call."""
    if workers < 1:
        raise UsageError(f"--workers {workers}: give a whole number >= 1")
    values = _usage(lambda: parse_overrides(params)) if isinstance(params, list) else dict(params or {})
    plan = _plan(config, space, sweep_dir=sweep_dir, values=values, trials=trials, timeout=timeout, storage=storage,
                 study_name=study_name, resume=resume)
    _open(plan, workers)
    if plan.sweep.objective() is RANK_IC and plan.sweep.space().settings.prune:
        print("[sweep] note: the pruner follows phase 2's probe (validation close CRPS per series), a proxy for the "
              "RankIC objective; report.md says how well it ordered the trials (sweep.prune: false runs every trial "
              "to its objective)", flush=True)
    deadline = time.time() + plan.timeout if plan.timeout else (
        time.time() + plan.sweep.space().settings.timeout if plan.sweep.space().settings.timeout else None)
    threads = max(1, _total_threads(plan.sweep) // workers)
    if workers == 1:
        worker_loop(str(plan.sweep.path), plan.url, threads, deadline)
    else:
        _run_workers(plan, workers, threads, deadline, progress)
    from kronos_kit.sweep.report import finish_sweep

    finish_sweep(plan.sweep, storage=plan.url)
    return plan.sweep


def _total_threads(sweep: SweepDir) -> int:
    from kronos_kit.config import thread_count

    return thread_count(sweep.base_config()) or os.cpu_count() or 1


def _open(plan: _Plan, workers: int) -> None:
    """Write the sweep folder and create (or load) the study with its slots; recover killed trials."""
    sweep, d = plan.sweep, plan.definition
    if plan.mode != "new" and d["data"]["sha256"] != source_sha256(d["data"]["source"]):
        raise UsageError(f"--resume: the data {d['data']['source']} differs from the data the sweep started with "
                         "(sha256): its trials would not be comparable. Restore the data, or start a new sweep")
    sweep.path.mkdir(parents=True, exist_ok=True)
    if plan.mode != "resume":
        base = KitConfig.from_dict(yaml.safe_load(d["config_yaml"]))
        base = base.with_overrides({"run_dir": None, "cache_dir": base.cache_dir or str(sweep.cache.resolve()),
                                    "predictor.token_cache_dir": base.predictor.token_cache_dir
                                    or str(sweep.tokens.resolve())})
        sweep.config.write_text(f"# the base config of sweep {plan.name} (trial 0 runs it as it is)\n" + base.to_yaml())
        sweep.space_file.write_text(yaml.safe_dump(d["space"], sort_keys=False))
    space = sweep.space()
    settings = dataclasses.replace(space.settings, trials=plan.trials or space.settings.trials)
    storage = open_storage(plan.url, heartbeat="://" in plan.url and plan.url != storage_url(sweep.path, None))
    study = open_study(storage, plan.name, settings, direction=d["direction"] if plan.mode == "new" else None)
    if plan.mode == "new":
        study.set_user_attr(DEFINITION_ATTR, d)
    if settings.trials is not None:
        add_slots(study, settings.trials, space.defaults(sweep.base_config()))
    calls = d.get("calls", []) + [{"mode": plan.mode, "trials": settings.trials, "timeout": plan.timeout,
                                   "workers": workers, "host": socket.gethostname(),
                                   "started": dt.datetime.now().isoformat(timespec="seconds")}]
    sweep.save_definition({**d, "study": plan.name, "storage": plan.url, "trials": settings.trials, "calls": calls,
                           **run_provenance(), "optuna": optuna.__version__})
    recovered = recover_orphans(study, storage)
    if recovered:
        print(f"[sweep] continuing interrupted trial(s) {recovered}", flush=True)


def worker_loop(sweep_dir: str, url: str, threads: int, deadline: float | None) -> None:
    """Take and run waiting trials until none is left or `deadline` (epoch seconds) has passed."""
    sweep = SweepDir(sweep_dir)
    d, space = sweep.definition(), sweep.space()
    set_threads(threads)
    base = sweep.base_config().with_overrides(threads=threads)
    storage = open_storage(url, heartbeat="://" in url and url != storage_url(sweep.path, None))
    study = open_study(storage, d["study"], space.settings)
    ctx = SweepContext(sweep.path.resolve(), base, space, OBJECTIVES[d["objective"]], d["study"], d["data"]["sha256"])
    kit_log = logging.getLogger("kronos_kit")
    level = kit_log.level
    kit_log.setLevel(logging.WARNING)  # one line per trial ([sweep] ...), not every model load and phase
    try:
        while deadline is None or time.time() < deadline:
            recover_orphans(study, storage)
            trial = take_trial(study, storage, space.settings)
            if trial is None:
                if d.get("trials") is not None:
                    return
                open_slot(study)  # bounded by time only: one more slot
                continue
            run_trial(ctx, study, trial, storage)
    finally:
        kit_log.setLevel(level)


def _worker_main(sweep_dir: str, url: str, threads: int, deadline: float | None) -> None:
    from kronos_kit.runtime import _end_with_parent  # a killed sweep must not leave workers writing its trials

    _end_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    worker_loop(sweep_dir, url, threads, deadline)


def _run_workers(plan: _Plan, workers: int, threads: int, deadline: float | None, progress: bool) -> None:
    """K worker processes (spawned: safe from a notebook kernel too), a progress bar of finished trials."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker_main, args=(str(plan.sweep.path), plan.url, threads, deadline),
                             name=f"sweep-worker-{k}") for k in range(workers)]
    for p in procs:
        p.start()
    print(f"[sweep] {workers} workers, {threads} torch thread(s) each: {plan.sweep.path}", flush=True)
    study = load_sweep_study(plan.sweep, plan.url)
    total = plan.trials or plan.sweep.space().settings.trials
    bar = tqdm(total=total, desc="sweep trials", unit="trial", disable=not progress)
    try:
        while any(p.is_alive() for p in procs):
            done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                optuna.trial.TrialState.PRUNED)))
            if done != bar.n:
                bar.update(done - bar.n)
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()  # their running trials are recovered by the next --resume
        raise
    finally:
        bar.close()
        for p in procs:
            p.join()
    failed = [p.name for p in procs if p.exitcode not in (0, None)]
    if failed:
        print(f"[sweep] worker(s) {failed} ended with an error; --resume continues their trials", flush=True)
