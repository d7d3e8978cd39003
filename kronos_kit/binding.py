"""A run's decisions bound to the weights they chose (issue 20).

Every decision file (`promoted.json`, `calibration.json`, any later one) records in `checkpoints` the
tokenizer and predictor it was decided for: each one's source and the sha256 of its
`model.safetensors` (`bind`). The reader (`runs.run_choice`) refuses the decisions (`StaleDecisionError`)
when a recorded file is missing or differs now (`check_bound`), when the run's stage 03 did not
complete after its last start (`check_stage_complete`), and resolves the sources a decision names inside
the run folder only, or as the run's own configured base (`decision_source`): never relative to the
working directory, never as a hub id or preset the run did not configure.

Plain JSON and file hashes only: nothing here loads a model or executes code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["EMBEDDED_DIR", "EMBEDDED_PREFIX", "StaleDecisionError", "WEIGHTS_FILE", "bind", "check_bound",
           "check_stage_complete", "decision_source", "embedded_folder", "file_sha256", "weights_sha256"]

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
