"""How a run folder was made: its `config.yaml` and `manifest.json`, written the same way by every caller.

The pipeline (`kronos_kit.pipeline`) and a notebook run in JupyterLab (`kronos_kit.notebooks.open_stage`)
call the same three functions, so a run made either way is the same kind of folder (`forecast --run`,
`compare`, `--resume` and `--from` accept both):

- `open_run`: the resolved `config.yaml` and the manifest's header (the kit-run marker `kind`, config,
  seed, package versions, git commit + dirty flag, platform, data hash), plus one entry in `invocations`
  for this call (who: `pipeline` or `notebook NN`, its mode and parameters);
- `start_stage`: the stage's record, `running`, with its input hash (`stage_input_hash`: the config fields
  the stage's outputs depend on, the previous stage's outputs, the notebook file);
- `finish_stage`: the status (`completed`, `failed`, `interrupted`), duration, the hash of the stage's
  outputs (its inputs and the checkpoints it wrote) and the sha256 of every checkpoint.

Every write reads the manifest afresh and replaces it atomically (`update_manifest`), so the pipeline
process and a notebook kernel that write the same folder one after the other never drop each other's
entries. Plain JSON and YAML only: reading a manifest executes nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from kronos_kit.binding import STAGE_CONFIG, WEIGHTS_FILE, file_sha256
from kronos_kit.config import KitConfig
from kronos_kit.runs import RunDir, atomic_write_text, load_json, save_json

__all__ = ["NOTEBOOK_DIR", "PIPELINE_ENV", "RUN_KIND", "STAGES", "STAGE_CONFIG", "STAGE_PHASES", "checkpoint_hashes",
           "finish_stage", "git_state", "is_kit_run", "load_manifest", "open_run", "package_versions",
           "run_provenance", "stage_input_hash", "start_stage", "update_manifest"]

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# set by the pipeline for the kernels it starts: the run folder whose stages it executes and records itself
PIPELINE_ENV = "KRONOS_PIPELINE_RUN"
RUN_KIND = "kronos-kit run"  # the manifest's marker: --resume / --from / --overwrite only touch such folders
STAGES = {
    "01": "01_tokenizer_adaptation.ipynb",
    "02": "02_predictor_finetune.ipynb",
    "03": "03_diagnostics.ipynb",
}
STAGE_PHASES = {"01": ("tokenizer",), "02": ("predictor",), "03": ()}  # the checkpoints each stage writes
# a stage's input hash covers its config fields (`binding.STAGE_CONFIG`, the one list of them) and the previous
# stage's outputs
PACKAGES = ["kronos-kit", "torch", "numpy", "pandas", "matplotlib", "papermill", "safetensors", "arch"]


# ---------------------------------------------------------------------------------------------
# hashes and versions


def checkpoint_hashes(run_dir: str | Path) -> dict[str, str]:
    """sha256 of every model.safetensors under the run directory, by relative folder."""
    run_dir = Path(run_dir)
    return {str(p.parent.relative_to(run_dir)): file_sha256(p) for p in sorted(run_dir.rglob(WEIGHTS_FILE))
            if not any(part.startswith(".") for part in p.relative_to(run_dir).parts)}


def git_state(root: str | Path | None = None) -> dict[str, Any]:
    """The kit checkout's commit and whether it differs from it (None outside a git checkout).

    Dirty means a tracked file whose content, as git's filters see it, differs from HEAD (`git diff HEAD`), or an
    untracked file. Not `git status` alone: it flags a notebook that JupyterLab saved with outputs although the
    nbstripout filter hands git exactly the committed file (the file's size changed, its content for git did not).
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "diff", "HEAD", "--quiet"], cwd=root, capture_output=True)
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=root,
                                   capture_output=True, text=True, check=True)
        if changed.returncode not in (0, 1):
            raise subprocess.CalledProcessError(changed.returncode, "git diff")
        return {"commit": commit.stdout.strip(), "dirty": changed.returncode == 1 or bool(untracked.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def run_provenance() -> dict[str, Any]:
    """What a manifest records about the code and machine (versions, git commit + dirty flag, platform)."""
    return {"versions": package_versions(), "git": git_state(), "platform": platform.platform()}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------------------
# the manifest


def load_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest (a new, empty one when the folder has none)."""
    path = RunDir(run_dir).manifest
    return load_json(path) if path.is_file() else {"stages": {}}


def update_manifest(run_dir: str | Path, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Read the manifest afresh, apply `change` to it in place, write it atomically; returns it."""
    data = load_manifest(run_dir)
    data.setdefault("stages", {})
    change(data)
    save_json(RunDir(run_dir).manifest, data, sort_keys=True, default=str)
    return data


def is_kit_run(path: str | Path) -> bool:
    """True when `path` holds a run directory written by this kit (its manifest carries our marker)."""
    manifest = RunDir(path).manifest
    if not manifest.is_file():
        return False
    try:
        data = load_json(manifest)
    except ValueError:
        return False
    # manifests from before the marker have the same keys
    return isinstance(data, dict) and (data.get("kind") == RUN_KIND or {"stages", "config", "versions"} <= set(data))


def open_run(run_dir: str | Path, cfg: KitConfig, *, by: str, mode: str, config_source: str,
             parameters: dict[str, Any], from_stage: str | None = None,
             data_sha256: str | None = None) -> dict[str, Any]:
    """Write the run's resolved `config.yaml` and the manifest's header, and record this call.

    `by` says who runs it (`pipeline`, `notebook 01`, ...), `mode` how (`new`, `resume`, `from`, `lab`);
    `config_source` is the YAML file the config was read from and `parameters` what was given on top.
    A new run (`mode == "new"`, or the manifest's first call) also records `config_file` and `parameters`.
    `data_sha256` is the data's hash as its loader computed it (`data.store.source_sha256`, computed here when
    not given): the same hash the stage records (`binding.StageRecord`) hold.
    """
    from kronos_kit.data.store import source_sha256

    data_sha256 = data_sha256 or source_sha256(cfg.data.source)
    rd = RunDir(run_dir)
    atomic_write_text(rd.config, f"# resolved by {by} from {config_source} with {parameters}\n" + cfg.to_yaml())

    def header(data: dict[str, Any]) -> None:
        if mode == "new" or "config_file" not in data:
            data.update({"config_file": config_source, "parameters": parameters})
        data.update({
            "kind": RUN_KIND, "config": cfg.to_dict(), "seed": cfg.seed,
            **run_provenance(), "data": {"source": cfg.data.source, "sha256": data_sha256},
        })
        data.setdefault("invocations", []).append(
            {"by": by, "mode": mode, "from": from_stage, "parameters": parameters, "started": dt.datetime.now()})

    return update_manifest(rd.path, header)


def stage_input_hash(stage: str, cfg: KitConfig, manifest: dict[str, Any], notebooks: Path = NOTEBOOK_DIR) -> str:
    """What a stage's outputs depend on: its config fields (`STAGE_CONFIG`), the previous stage's recorded
    outputs (the data hash for stage 01) and its notebook file."""
    names = list(STAGES)
    previous = manifest.get("stages", {}).get(names[names.index(stage) - 1], {}) if stage != names[0] else {}
    upstream = previous.get("outputs") or manifest.get("data", {}).get("sha256", "")
    values = cfg.to_dict()
    picked = {}
    for key in STAGE_CONFIG[stage]:
        node = values
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    text = json.dumps(picked, sort_keys=True, default=str) + upstream + file_sha256(notebooks / STAGES[stage])
    return hashlib.sha256(text.encode()).hexdigest()


def start_stage(run_dir: str | Path, stage: str, cfg: KitConfig, *, by: str, resumed: bool = False,
                notebooks: Path = NOTEBOOK_DIR) -> str:
    """Record `stage` as running (its input hash, who runs it, when); returns the input hash. (A later stage's
    record keeps its input hash, which no longer matches once this stage's outputs change: `--resume` reruns it,
    and the decisions of stage 03 are bound to the weights they chose.)"""
    inputs: dict[str, str] = {}

    def running(data: dict[str, Any]) -> None:
        inputs["hash"] = stage_input_hash(stage, cfg, data, notebooks)
        data["stages"][stage] = {"notebook": STAGES[stage], "status": "running", "inputs": inputs["hash"],
                                 "started": dt.datetime.now(), "resumed": resumed, "by": by}

    update_manifest(run_dir, running)
    return inputs["hash"]


def finish_stage(run_dir: str | Path, stage: str, *, status: str = "completed", seconds: float | None = None,
                 error: str | None = None) -> dict[str, Any]:
    """Record how `stage` ended; a completed stage gets its outputs hash (its inputs and the checkpoints it
    wrote: a later stage's are not its own). Every checkpoint's sha256 is refreshed. Returns the record."""

    def ended(data: dict[str, Any]) -> None:
        record = data["stages"].setdefault(stage, {"notebook": STAGES[stage]})
        checkpoints = checkpoint_hashes(run_dir)
        record.update(status=status, finished=dt.datetime.now())
        if seconds is not None:
            record["seconds"] = round(seconds, 1)
        if error is not None:
            record["error"] = error
        if status == "completed":
            own = {k: v for k, v in checkpoints.items() if k.split("/")[0] in STAGE_PHASES[stage]}
            record["outputs"] = hashlib.sha256((record.get("inputs", "") + json.dumps(own, sort_keys=True))
                                               .encode()).hexdigest()
        data["checkpoints"] = checkpoints

    return update_manifest(run_dir, ended)["stages"][stage]
