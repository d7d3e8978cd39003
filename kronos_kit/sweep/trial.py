"""One sweep trial: a config from the base and the trial's parameters, run into an ordinary run folder.

A trial runs what notebooks 01, 02 and 03's validation step compute, through the same library calls
(without papermill, which costs minutes a run on a CPU):

1. phase 1 through the shared unit of its phase-1 settings (`phase1.ensure_phase1`: trained once; its
   gate, codebook statistics and log records are copied into the trial's folder). A failed gate fails the
   trial (unless `gate.override`), as it stops notebook 02;
2. phase 2 (`train.train_predictor`, tokens from the sweep's token cache), reporting the forecast-skill
   probe's validation close CRPS (`val_crps`) at every validation to the pruner; a trial whose probe trails
   the median of earlier trials at the same step stops there (state `pruned`);
3. notebook 03's validation step (`evaluate.decide_on_validation`: promotion and calibration on the
   validation split, `promoted.json`, `calibration.json`) and, when the objective is the RankIC or the config
   promotes on it, the validation part of notebook 03's universe evaluation (`evaluate_universe(...,
   test=False)`: `universe.json` with the validation split only, the RankIC promotion), then the objective
   from the folder.

It skips the figures, the token metrics and the whole test split: a trial never reads test data. Its folder
is a run folder like the pipeline's (manifest.json with stages 01-03, config.yaml, checkpoints, decision
files) plus `trial.json`, which says which trial of which sweep it is, its parameters, and whether it was
pruned (at which step) or failed (why). `compare`, `forecast --run` and the notebooks open it; the test
evaluation of any trial is `pipeline --run-dir TRIAL --from 03`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from kronos_kit.config import KitConfig, apply_overrides
from kronos_kit.data import DataBundle, load_data
from kronos_kit.evaluate import decide_on_validation, evaluate_universe
from kronos_kit.model import Kronos, KronosTokenizer
from kronos_kit.provenance import RUN_KIND, run_provenance, update_manifest
from kronos_kit.run_lock import run_lock
from kronos_kit.runs import (
    CALIBRATION_FILE,
    PROMOTION_FILE,
    UNIVERSE_FILE,
    RunDir,
    atomic_write_text,
    run_choice,
    save_json,
)
from kronos_kit.runtime import resolve_device
from kronos_kit.sweep.objective import RANK_IC, Objective
from kronos_kit.sweep.phase1 import attach_phase1, ensure_phase1
from kronos_kit.sweep.space import SearchSpace
from kronos_kit.sweep.study import ROLE, SLOT, heartbeat, requeue
from kronos_kit.train import train_predictor

__all__ = ["TRIALS_DIR", "TRIAL_FILE", "SweepContext", "run_trial", "trial_dir", "validation_step"]

logger = logging.getLogger(__name__)

TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"  # in a trial's run folder: which trial of which sweep, parameters, state
PRUNED = "pruned"  # the phase-2 stop reason a pruned trial's state and log carry


@dataclass
class SweepContext:
    """What every trial of a sweep shares (a worker builds it once)."""

    sweep_dir: Path
    base: KitConfig  # the base config with the sweep's shared folders and this worker's threads
    space: SearchSpace
    objective: Objective
    study_name: str
    data_sha256: str


def trial_dir(sweep_dir: Path, slot: int) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / f"{int(slot):04d}"


def _say(text: str) -> None:
    print(text, flush=True)


def run_trial(ctx: SweepContext, study: optuna.Study, trial: optuna.Trial, storage: Any) -> str:
    """Run `trial` into its folder and tell the study how it ended; returns the state ("complete", "pruned",
    "failed"). An interrupt (Ctrl-C, SIGTERM) marks the trial interrupted and enqueues it again before
    re-raising, so the next worker continues it."""
    start = time.perf_counter()
    params = ctx.space.suggest(trial, ctx.base)
    run_dir = Path(trial.user_attrs.get("run_dir") or trial_dir(ctx.sweep_dir, trial.user_attrs[SLOT]))
    trial.set_user_attr("run_dir", str(run_dir))
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    _say(f"[sweep] trial {trial.number} ({trial.user_attrs.get(ROLE)}): {shown}")
    record = {"state": "running"}
    try:
        with run_lock(run_dir, f"sweep trial {trial.number}"), heartbeat(storage, trial):
            trial.set_user_attr("locked", True)
            record = _run(ctx, trial, params, run_dir)
    except (KeyboardInterrupt, SystemExit):
        seconds = round(time.perf_counter() - start + float(trial.user_attrs.get("seconds", 0.0)), 1)
        _write_trial_file(ctx, trial, params, run_dir, {"state": "interrupted", "seconds": seconds})
        _finish(study, trial, state=optuna.trial.TrialState.FAIL, note={"interrupted": True, "seconds": seconds})
        requeue(study, next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number))
        _say(f"[sweep] trial {trial.number}: interrupted; enqueued again (--resume continues it)")
        raise
    except Exception as err:  # a failed trial is recorded and the sweep goes on (its reason in trial.json)
        logger.debug("trial %d failed", trial.number, exc_info=True)
        record = {"state": "failed", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(limit=8)}
    seconds = round(time.perf_counter() - start + float(trial.user_attrs.get("seconds", 0.0)), 1)
    record.update(seconds=seconds)
    _write_trial_file(ctx, trial, params, run_dir, record)
    state = record["state"]
    note = {"seconds": seconds, **{k: record[k] for k in ("pruned_at_step", "error", "base_value", "promoted",
                                                         "phase1") if k in record}}
    if state == "complete":
        _finish(study, trial, value=record["value"], note=note)
        _say(f"[sweep] trial {trial.number}: {ctx.objective.label} {record['value']:.6g} ({seconds:.0f} s)")
    elif state == PRUNED:
        _finish(study, trial, state=optuna.trial.TrialState.PRUNED, note=note)
        _say(f"[sweep] trial {trial.number}: pruned at step {record['pruned_at_step']} ({seconds:.0f} s)")
    else:
        _finish(study, trial, state=optuna.trial.TrialState.FAIL, note=note)
        _say(f"[sweep] trial {trial.number}: FAILED ({record['error'].splitlines()[0]})")
    return state


def _finish(study: optuna.Study, trial: optuna.Trial, *, value: float | None = None,
            state: optuna.trial.TrialState | None = None, note: dict[str, Any]) -> None:
    for key, val in note.items():
        trial.set_user_attr(key, val)
    try:
        study.tell(trial, value, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:  # failed meanwhile by another machine's heartbeat check
        logger.warning("sweep: trial %d was marked failed by another worker meanwhile; its run folder is complete: "
                       "%s", trial.number, trial.user_attrs.get("run_dir"))


def _run(ctx: SweepContext, trial: optuna.Trial, params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Phases 1 and 2 and the validation step in the locked run folder; the trial's outcome record."""
    cfg = apply_overrides(ctx.base, {**params, "run_dir": str(run_dir)})
    _open_manifest(ctx, trial, cfg, params, run_dir)
    bundle = load_data(cfg)
    data_key = bundle.cache.name if bundle.cache is not None else ctx.data_sha256
    unit = ensure_phase1(cfg, ctx.sweep_dir, bundle, data_key)
    cfg = cfg.with_overrides(attach_phase1(unit, run_dir))
    atomic_write_text(RunDir(run_dir).config, f"# sweep {ctx.study_name}, trial {trial.number}\n" + cfg.to_yaml())
    update_manifest(run_dir, lambda data: data.update(config=cfg.to_dict()))
    shared = {"folder": str(unit.folder), **unit.to_dict()}
    _stage(run_dir, "01", "completed", shared=shared, seconds=unit.seconds)
    if not unit.gate_passed and not cfg.gate.override:
        _stage(run_dir, "02", "failed", error="the tokenizer gate failed")
        return {"state": "failed", "error": f"the tokenizer gate failed: {unit.gate_summary}", "phase1": unit.key[:16]}
    started = time.perf_counter()
    result = _phase2(ctx, trial, cfg, bundle)
    if result is not None and result.stopped == PRUNED:
        _stage(run_dir, "02", PRUNED, step=result.steps, seconds=round(time.perf_counter() - started, 1))
        return {"state": PRUNED, "pruned_at_step": result.steps, "phase1": unit.key[:16]}
    _stage(run_dir, "02", "completed", seconds=round(time.perf_counter() - started, 1))
    started = time.perf_counter()
    promotion, written = validation_step(cfg, bundle, run_dir, ctx.objective)
    _stage(run_dir, "03", "completed", seconds=round(time.perf_counter() - started, 1),
           scope=f"validation decisions only ({', '.join(written)}); the test split was not evaluated")
    value = ctx.objective.read(run_dir)
    return {"state": "complete", "value": value, "base_value": ctx.objective.read_reference(run_dir),
            "promoted": promotion.promoted, "phase1": unit.key[:16]}


def _phase2(ctx: SweepContext, trial: optuna.Trial, cfg: KitConfig, bundle: DataBundle) -> Any:
    """Phase 2, reporting the probe's `val_crps` to the pruner at each validation (trial 0 is never pruned)."""
    if not cfg.predictor.enabled:
        return None
    prunable = trial.user_attrs.get(ROLE) != "default"

    def on_validate(step: int, metrics: dict[str, float]) -> str | None:
        value = metrics.get("val_crps")
        if value is None:
            return None
        trial.report(float(value), step)
        return PRUNED if prunable and trial.should_prune() else None

    # resume: a retried (killed) trial continues phase 2 from the training state it saved
    return train_predictor(cfg, data=bundle, resume=True, progress=False, on_validate=on_validate)


def validation_step(cfg: KitConfig, bundle: DataBundle, run_dir: Path, objective: Objective) -> tuple[Any, list[str]]:
    """Notebook 03's validation step: promotion and calibration on the validation split, and for the RankIC
    objective (or `evaluation.promote_on: rank_ic`) the universe evaluation's validation part, which never reads
    the test split. Returns the run's `Promotion` (the RankIC one when the config promotes on it) and the files
    written."""
    sources = {name: run_choice(run_dir, cfg, model=name) for name in ("base", "finetuned")}
    models = {name: (Kronos.from_pretrained(s.predictor_source), KronosTokenizer.from_pretrained(s.tokenizer_source))
              for name, s in sources.items()}
    pairs = {f"{name}_sources": (sources[name].tokenizer_source, sources[name].predictor_source)
             for name in ("base", "finetuned")}
    common = dict(lookback=cfg.data.lookback, run_dir=run_dir, seed=cfg.seed, device=resolve_device(cfg.device))
    decision = decide_on_validation(bundle.splits, models, cfg.evaluation, **pairs, **common)
    written = [PROMOTION_FILE, CALIBRATION_FILE] if decision.calibration else [PROMOTION_FILE]
    if objective is RANK_IC or cfg.evaluation.promote_on == "rank_ic":
        universe = evaluate_universe(bundle.splits, models, cfg.evaluation, decision=decision, test=False,
                                     progress=False, **pairs, **common)
        if not universe.analyses:  # this trial's look-back leaves no cross-section on validation
            raise ValueError(f"no validation RankIC: {universe.reason}")
        decision = universe.decision
        written.append(UNIVERSE_FILE)
    return decision.promotion, written


def _open_manifest(ctx: SweepContext, trial: optuna.Trial, cfg: KitConfig, params: dict[str, Any],
                   run_dir: Path) -> None:
    """The trial folder's manifest.json, as the pipeline writes one (`provenance`), with what the sweep knows."""

    def header(data: dict[str, Any]) -> None:
        data.update({
            "kind": RUN_KIND, "config_file": str(ctx.sweep_dir / "config.yaml"), "parameters": params,
            "config": cfg.to_dict(), "seed": cfg.seed, **run_provenance(),
            "data": {"source": cfg.data.source, "sha256": ctx.data_sha256},
            "sweep": {"folder": str(ctx.sweep_dir), "study": ctx.study_name, "trial": trial.number,
                      "slot": trial.user_attrs.get(SLOT), "role": trial.user_attrs.get(ROLE)},
        })
        data.setdefault("invocations", []).append({"by": f"sweep trial {trial.number}", "mode": "sweep trial",
                                                   "parameters": params, "started": dt.datetime.now()})

    update_manifest(run_dir, header)


def _stage(run_dir: Path, stage: str, status: str, **extra: Any) -> None:
    record = {"status": status, "by": "sweep trial (library calls, no notebook)", "finished": dt.datetime.now(),
              **extra}
    update_manifest(run_dir, lambda data: data["stages"].__setitem__(stage, record))


def _write_trial_file(ctx: SweepContext, trial: optuna.Trial, params: dict[str, Any], run_dir: Path,
                      record: dict[str, Any]) -> None:
    path = Path(run_dir) / TRIAL_FILE
    attempts = trial.user_attrs.get("attempt", 1)  # 1 + how often it was killed and enqueued again
    save_json(path, {"sweep": str(ctx.sweep_dir), "study": ctx.study_name, "trial": trial.number,
                     "retry_of": trial.user_attrs.get("retry_of"), "attempts": attempts,
                     "slot": trial.user_attrs.get(SLOT), "role": trial.user_attrs.get(ROLE), "params": params,
                     "objective": ctx.objective.name, **{k: v for k, v in record.items() if k != "traceback"},
                     "host": trial.user_attrs.get("host")}, default=str)
