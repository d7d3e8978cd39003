"""A run's files bound to what they were made from: decisions to the weights they chose (issue 20), and each
stage to what it consumed (issue 28).

Every decision file (`promoted.json`, `calibration.json`, any later one) records in `checkpoints` the
tokenizer and predictor it was decided for: each one's source and the sha256 of its
`model.safetensors` (`bind`). The reader (`runs.run_choice`) refuses the decisions (`StaleDecisionError`)
when a recorded file is missing or differs now (`check_bound`), when the run's stage 03 did not
complete after its last start (`check_stage_complete`), and resolves the sources a decision names inside
the run folder only, or as the run's own configured base (`decision_source`): never relative to the
working directory, never as a hub id or preset the run did not configure.

Each stage writes a record of what it consumed, `stages/<NN>.json` (`StageRecord`): the data's sha256, the
config fields its outputs depend on, the sha256 of every checkpoint and file it read, and, once finished, of
the checkpoints it wrote. `stage_problems` / `check_stages` is the one reader and checker: every later stage,
`--resume`, `--from`, `forecast --run` and `compare` call it, and a mismatch names what changed and how to go
on (`--from NN` with the new input, or a new run).

Plain JSON and file hashes only: nothing here loads a model or executes code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from kronos_kit.config import HARMLESS_ON_RESUME, GateConfig, KitConfig, flatten

__all__ = ["EMBEDDED_DIR", "EMBEDDED_PREFIX", "STAGE_CONFIG", "STAGES_DIR", "StageRecord", "StaleDecisionError",
           "StaleRunError", "WEIGHTS_FILE", "bind", "check_bound", "check_stage_complete", "check_stages",
           "decision_source", "embedded_folder", "file_sha256", "read_stage_records", "record_config",
           "recorded_config", "run_relative", "source_sha256", "stage_problems", "weights_sha256"]

WEIGHTS_FILE = "model.safetensors"
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path(__file__).resolve().parent / "assets"  # the kit's own base checkpoints (embedded:NAME)
DECISION_STAGE = "03"  # the pipeline stage that writes the decisions (notebook 03's validation step)
RERUN = "rerun the decisions with `python -m kronos_kit pipeline --run-dir RUN --from 03`"


class StaleDecisionError(ValueError):
    """A run's decision file no longer describes the weights the run holds, or was never completed."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embedded_folder(source: str) -> Path:
    """The folder of `embedded:NAME`, which must lie inside the kit's assets (no `..` out of them)."""
    name = source.removeprefix(EMBEDDED_PREFIX)
    folder = (EMBEDDED_DIR / name).resolve()
    if ".." in PurePosixPath(name).parts or not folder.is_relative_to(EMBEDDED_DIR.resolve()):
        raise ValueError(f"{source!r}: an embedded checkpoint is named inside the kit's assets (e.g. "
                         "embedded:base/predictor), without '..'")
    return folder


def weights_sha256(source: str) -> str | None:
    """sha256 of a checkpoint source's `model.safetensors` (a folder or `embedded:`); None for a preset or hub id."""
    folder = embedded_folder(source) if source.startswith(EMBEDDED_PREFIX) else Path(source).expanduser()
    weights = folder / WEIGHTS_FILE
    return file_sha256(weights) if weights.is_file() else None


def bind(sources: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`{role: {"source", "sha256"}}` for the (resolved) sources a decision chose, e.g. tokenizer and predictor."""
    return {role: {"source": str(source), "sha256": weights_sha256(str(source))} for role, source in sources.items()}


def check_bound(checkpoints: Mapping[str, Any], resolved: Mapping[str, str], decision: Path) -> None:
    """Refuse `decision` unless it recorded a hash for every role and each file still has it."""
    if not checkpoints:
        raise StaleDecisionError(f"{decision} records no checkpoint hashes (written before decisions were bound to "
                                 f"weights), so it cannot be checked against the run's files; {RERUN}")
    for role, source in resolved.items():
        record = checkpoints.get(role)
        if not isinstance(record, Mapping) or "sha256" not in record:
            raise StaleDecisionError(f"{decision}: no recorded hash for the {role}; {RERUN}")
        now = weights_sha256(source)
        if now != record["sha256"]:
            found = "missing" if now is None and record["sha256"] is not None else f"sha256 {str(now)[:12]}..."
            raise StaleDecisionError(
                f"{decision} was decided for a {role} whose weights had sha256 {str(record['sha256'])[:12]}..., "
                f"but {source} is now {found}: the weights changed after the decision (retrained, rerun, or "
                f"replaced), so it no longer applies. {RERUN}, or forecast with --tokenizer/--predictor")


def check_stage_complete(manifest: Mapping[str, Any] | None, decision: Path) -> None:
    """Refuse a decision of a pipeline run whose stage 03 is not recorded complete (None: not a pipeline run)."""
    if manifest is None:
        return  # a run made in JupyterLab has no manifest; the hashes alone bind it
    record = (manifest.get("stages") or {}).get(DECISION_STAGE) or {}
    status = record.get("status", "never run")
    if status != "completed":
        raise StaleDecisionError(f"{decision}: the run's stage {DECISION_STAGE} (which writes it) is {status!r}, not "
                                 f"completed, so its decisions may belong to other weights or settings; {RERUN}")


def decision_source(source: str, run_dir: Path, configured: Iterable[str | None], role: str, decision: Path) -> str:
    """Where a decision's `source` is: a folder inside the run (written relative to it), or one of the run's
    `configured` sources for that role (its base, as config.yaml names it). Anything else is refused."""
    text = str(source)
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if text and not Path(text).is_absolute() and ".." not in parts and not text.startswith(EMBEDDED_PREFIX) \
            and (run_dir / text).is_dir():
        return str(run_dir / text)
    if text in {str(c) for c in configured if c}:
        return text
    inside = not Path(text).is_absolute() and ".." not in parts and "/" in text
    why = (f"names {text!r} inside the run, which is missing" if inside and not text.startswith(EMBEDDED_PREFIX)
           else f"names {text!r}, which is neither a folder inside the run nor the run's configured {role}")
    raise StaleDecisionError(f"{decision} {why}; a decision only hands on the run's own checkpoints or its "
                             f"configured base. {RERUN}")


# ---------------------------------------------------------------------------------------------
# what each stage consumed (issue 28)

STAGES_DIR = "stages"  # <run>/stages/<NN>.json: one StageRecord per stage
STAGE_TITLES = {"01": "phase 1, the tokenizer", "02": "phase 2, the predictor", "03": "the evaluation"}
# the config a stage's outputs depend on beyond the earlier stages' (the pipeline reruns a stage when they change);
# a stage's record holds its own fields and every earlier stage's
STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "01": ("seed", "device", "precision", "data", "tokenizer",  # the gate's thresholds: all of gate but override
           *(f"gate.{f.name}" for f in dataclasses.fields(GateConfig) if f.name != "override")),
    "02": ("predictor", "gate.override"),
    "03": ("evaluation",),
}
# recorded otherwise or not at all: the data by its bytes (a moved file is the same data); the device decides
# where the arithmetic runs, not what the weights mean
NOT_RECORDED = ("data.source", "device")
# a phase's schedule fields, which may change after it ran (they decided when to log, validate or stop)
NOT_COMPARED = tuple(f"{phase}.{f}" for phase in ("tokenizer", "predictor") for f in HARMLESS_ON_RESUME)


class StaleRunError(ValueError):
    """A run whose stages consumed other data, config or checkpoints than the run holds now."""


def run_relative(source: str | Path, run_dir: str | Path | None) -> str:
    """A checkpoint folder or file inside the run directory as a path relative to it (the run folder can move);
    anything else (a preset, an embedded name, a hub id, a folder elsewhere) as given."""
    path = Path(source)
    if run_dir is None or not path.exists():
        return str(source)
    try:
        return str(path.resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(source)


def source_sha256(source: str, run_dir: str | Path | None = None) -> str | None:
    """sha256 of what a recorded source names now: a checkpoint folder's model.safetensors (also `embedded:`),
    a file's bytes; None when it names nothing on disk (a preset, a hub id, a missing path). A relative source
    lies inside `run_dir`."""
    text = str(source)
    if text.startswith(EMBEDDED_PREFIX):
        return weights_sha256(text)
    path = Path(text).expanduser()
    if not path.is_absolute():
        if run_dir is None:
            return None
        path = Path(run_dir) / path
    if path.is_dir():
        path = path / WEIGHTS_FILE
    return file_sha256(path) if path.is_file() else None


def record_config(cfg: KitConfig, stage: str) -> dict[str, Any]:
    """The config fields stage `stage`'s outputs depend on (its own and every earlier stage's), flat, as JSON
    holds them."""
    wanted = [f for s, fields in STAGE_CONFIG.items() if s <= stage for f in fields]
    picked = {k: v for k, v in flatten(cfg.to_dict()).items()
              if k not in NOT_RECORDED and any(k == f or k.startswith(f + ".") for f in wanted)}
    return json.loads(json.dumps(picked, sort_keys=True))


def _hashed(sources: Mapping[str, str | None], run_dir: str | Path) -> dict[str, dict[str, Any]]:
    return {role: {"source": run_relative(s, run_dir), "sha256": source_sha256(str(s), run_dir)}
            for role, s in sources.items() if s is not None}


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


@dataclasses.dataclass
class StageRecord:
    """What one stage of a run consumed and, once finished, wrote: `<run>/stages/<NN>.json`, written by the
    stage itself (`train_tokenizer`, `train_predictor`, `evaluate.evaluation_inputs`), so a stage run from
    JupyterLab records the same as one run by the pipeline."""

    stage: str  # "01", "02" or "03" (STAGE_TITLES)
    data: dict[str, Any]  # {"source", "sha256"}: the data's bytes (`data.store.source_sha256`)
    config: dict[str, Any]  # `record_config`: every config field its outputs depend on
    inputs: dict[str, dict[str, Any]]  # role -> {"source", "sha256"}: checkpoints and files it read
    outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # what it wrote, once finished
    by: str = ""  # the library function that ran it
    started: str = ""
    finished: str | None = None

    @classmethod
    def start(cls, stage: str, cfg: KitConfig, *, data_sha256: str | None, inputs: Mapping[str, str | None],
              run_dir: str | Path, by: str) -> StageRecord:
        """The record of `stage` starting now on the data `data_sha256` with `inputs` (role -> source)."""
        return cls(stage, {"source": cfg.data.source, "sha256": data_sha256}, record_config(cfg, stage),
                   _hashed(inputs, run_dir), by=by, started=_now())

    def finish(self, outputs: Mapping[str, str], run_dir: str | Path) -> StageRecord:
        """This record, finished, with the sha256 of what the stage wrote (role -> source)."""
        return dataclasses.replace(self, outputs=_hashed(outputs, run_dir), finished=_now())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: Path) -> StageRecord:
        entries = ("inputs", "outputs")
        if not isinstance(d, dict) or not {"stage", "data", "config", "inputs"} <= set(d) \
                or set(d) - {f.name for f in dataclasses.fields(cls)} \
                or not all(isinstance(d.get(k, {}), dict) for k in ("data", "config", *entries)) \
                or not all(isinstance(e, dict) and "source" in e for k in entries for e in d.get(k, {}).values()):
            raise StaleRunError(f"{where} is not a stage record the kit wrote; "
                                f"to go on, {_rerun(where.parent.parent, where.stem)}")
        return cls(**d)


def stage_record_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / STAGES_DIR / f"{stage}.json"


def read_stage_records(run_dir: str | Path) -> dict[str, StageRecord]:
    """The run's stage records by stage ({} for a run from before them); a damaged one is a `StaleRunError`."""
    records = {}
    for stage in STAGE_CONFIG:
        path = stage_record_path(run_dir, stage)
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise StaleRunError(f"{path} is not valid JSON ({err}); to go on, {_rerun(run_dir, stage)}") from None
        record = StageRecord.from_dict(data, path)
        if record.stage != stage:
            raise StaleRunError(f"{path} holds the record of stage {record.stage!r}; to go on, "
                                f"{_rerun(run_dir, stage)}")
        records[stage] = record
    return records


def recorded_config(run_dir: str | Path, stages: Iterable[str]) -> dict[str, Any]:
    """The config fields the records of `stages` say those stages ran with (later stages win)."""
    records = read_stage_records(run_dir)
    return {k: v for s in sorted(stages) if s in records for k, v in records[s].config.items()}


def _rerun(run_dir: str | Path, stage: str) -> str:
    """How to go on from a stage whose record no longer matches (after "to go on, ")."""
    return (f"rerun from stage {stage} with the new inputs (python -m kronos_kit pipeline --run-dir {run_dir} "
            f"--from {stage}), put back what changed, or start a new run")


def _short(sha: str | None) -> str:
    return "missing" if sha is None else f"sha256 {sha[:12]}..."


def stage_problems(run_dir: str | Path, cfg: KitConfig, *, stages: Iterable[str] = tuple(STAGE_CONFIG),
                   data_sha256: str | None = None, external: bool = True,
                   files: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(stage, what changed) for every way the run differs now from what the records of `stages` say those
    stages consumed and wrote: a config field (`cfg`, the run's config.yaml or what a call passes), the data
    (`data_sha256`, the bytes a loader reads now; without it the records must agree with each other), a
    checkpoint or file they read or wrote (of the stages in `files` only, default all: a stage about to run
    again rewrites them). `external`: also sources outside the run (a base checkpoint)."""
    records = read_stage_records(run_dir)
    chosen = [s for s in STAGE_CONFIG if s in set(stages) and s in records]
    files = set(chosen if files is None else files)
    now = record_config(cfg, max(STAGE_CONFIG))
    problems = []
    for stage in chosen:
        record = records[stage]
        for field, then in record.config.items():
            if field not in NOT_COMPARED and now.get(field, "<absent>") != then:
                problems.append((stage, f"it ran with {field} = {then!r}, the config says {now.get(field)!r} now"))
        then = record.data.get("sha256")
        if data_sha256 is not None and then is not None and data_sha256 != then:
            problems.append((stage, f"it read the data ({record.data.get('source')}) with {_short(then)}, which "
                                    f"has {_short(data_sha256)} now: the data changed since"))
        for verb, entries in (("read", record.inputs), ("wrote", record.outputs)) if stage in files else ():
            for entry in entries.values():
                source, then = str(entry["source"]), entry.get("sha256")
                inside = not Path(source).is_absolute() and not source.startswith(EMBEDDED_PREFIX)
                if then is None or not (inside or external or verb == "wrote"):
                    continue
                if (current := source_sha256(source, run_dir)) != then:
                    problems.append((stage, f"it {verb} {source} with {_short(then)}, which is {_short(current)} "
                                            "now (replaced, retrained or deleted since)"))
    if data_sha256 is None:
        shas = {records[s].data.get("sha256") for s in chosen} - {None}
        if len(shas) > 1:
            problems.append((chosen[0], f"stages {', '.join(chosen)} read different data "
                                        f"({', '.join(map(_short, shas))})"))
    return problems


def check_stages(run_dir: str | Path, cfg: KitConfig, *, reader: str, stages: Iterable[str] = tuple(STAGE_CONFIG),
                 data_sha256: str | None = None, external: bool = True, files: Iterable[str] | None = None) -> None:
    """Refuse (`StaleRunError`) a run whose stages consumed other inputs than it holds now (`stage_problems`):
    the message names `reader`, every change, and how to go on."""
    problems = stage_problems(run_dir, cfg, stages=stages, data_sha256=data_sha256, external=external, files=files)
    if not problems:
        return
    lines = "".join(f"\n  - stage {s} ({STAGE_TITLES[s]}): {what}" for s, what in problems)
    raise StaleRunError(f"{reader}: {run_dir} no longer holds what its stages consumed:{lines}\n"
                        f"To go on, {_rerun(run_dir, min(s for s, _ in problems))}.")
