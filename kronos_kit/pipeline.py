"""End-to-end runs: notebooks 01 -> 02 -> 03 executed by papermill into one run directory.

`run_pipeline` resolves the config and parameters, writes `<run_dir>/config.yaml`, executes each
notebook with papermill (the executed copy lands in the run directory, errors visible), and keeps
`<run_dir>/manifest.json` up to date: parameters, seed, package versions, git commit and dirty
flag, a hash of the input data, hashes of every checkpoint written, and each stage's status,
duration and input hash. `--resume` skips stages that completed with unchanged inputs.
Notebooks pass results to each other only through files in the run directory.

Also here: `pretrain_base` (the command behind `make base`). The run directory's layout lives in
`kronos_kit.runs`; notebook parameters and overrides go through `kronos_kit.config.apply_overrides`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kronos_kit.config import KitConfig, apply_overrides, parse_overrides
from kronos_kit.model.checkpoint import WEIGHTS_NAME
from kronos_kit.runs import RunDir, atomic_write_text, load_json, save_json

__all__ = ["STAGES", "Manifest", "checkpoint_hashes", "data_hash", "file_sha256", "pretrain_base", "run_pipeline"]

logger = logging.getLogger(__name__)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
STAGES = {
    "01": "01_tokenizer_adaptation.ipynb",
    "02": "02_predictor_finetune.ipynb",
    "03": "03_diagnostics.ipynb",
}
KERNEL_NAME = "kronos-kit"
# the config a stage's outputs depend on; its input hash also covers the previous stage's outputs
STAGE_CONFIG = {
    "01": ("seed", "device", "precision", "data", "tokenizer", "gate.max_full_mse", "gate.min_s1_usage"),
    "02": ("predictor", "gate.override"),
    "03": ("evaluation",),
}
PACKAGES = ["kronos-kit", "torch", "numpy", "pandas", "matplotlib", "papermill", "safetensors", "arch"]


# ---------------------------------------------------------------------------------------------
# hashes and provenance


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_hash(source: str) -> str:
    """Hash of the input data: file bytes (every file of a folder), or the sample's canonical frame."""
    if source.startswith("sample:"):
        from kronos_kit.data import load_sample

        frame = load_sample(source.removeprefix("sample:"))
        return hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def checkpoint_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every model.safetensors under the run directory, by relative folder."""
    return {str(p.parent.relative_to(run_dir)): file_sha256(p) for p in sorted(run_dir.rglob(WEIGHTS_NAME))
            if not any(part.startswith(".") for part in p.relative_to(run_dir).parts)}


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any]

    @classmethod
    def load_or_new(cls, run_dir: Path) -> Manifest:
        path = RunDir(run_dir).manifest
        return cls(path, load_json(path) if path.is_file() else {"stages": {}})

    def save(self) -> None:
        save_json(self.path, self.data, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# running the notebooks


def _kernel_name() -> str:
    """The kernel `make setup` registers, else the default Python kernel of this environment."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def _failed_cell(notebook: Path) -> str:
    nb = load_json(notebook)
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(code_cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"code cell {i} ({out.get('ename')}: {out.get('evalue')})\n{''.join(cell['source'])[:300]}"
    return "unknown cell"


def run_pipeline(
    config: str | Path,
    *,
    run_dir: str | Path | None = None,
    params: list[str] | dict[str, Any] | None = None,
    resume: bool = False,
    from_stage: str | None = None,
    overwrite: bool = False,
    notebooks: Path = NOTEBOOK_DIR,
    progress: bool = True,
) -> int:
    """Run the stages in order; 0 on success, 1 when a stage failed (its notebook is kept)."""
    import papermill

    values = parse_overrides(params) if isinstance(params, list) else dict(params or {})
    cfg = apply_overrides(KitConfig.from_file(config), values)
    if run_dir is None:
        run_dir = cfg.run_dir or f"runs/{cfg.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(run_dir)
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from {from_stage!r}: stages are {list(STAGES)}")
    if run_dir.exists() and any(run_dir.iterdir()) and not (resume or overwrite or from_stage):
        raise FileExistsError(f"{run_dir} exists and is not empty; pass --resume to continue it, --overwrite to "
                              "reuse it, or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.with_overrides(run_dir=str(run_dir))
    resolved = atomic_write_text(RunDir(run_dir).config, f"# resolved from {config} with {values}\n" + cfg.to_yaml())
    manifest = Manifest.load_or_new(run_dir)
    manifest.data.update({
        "config_file": str(config), "parameters": values, "config": cfg.to_dict(), "seed": cfg.seed,
        "versions": _versions(), "git": _git_state(), "platform": platform.platform(),
        "data": {"source": cfg.data.source, "sha256": data_hash(cfg.data.source)},
    })
    manifest.save()
    kernel = _kernel_name()
    upstream = manifest.data["data"]["sha256"]
    names = list(STAGES)
    for stage in names[names.index(from_stage) if from_stage else 0:]:
        notebook = STAGES[stage]
        stage_hash = _stage_hash(stage, cfg, upstream, notebooks / notebook)
        record = manifest.data["stages"].get(stage, {})
        if resume and record.get("status") == "completed" and record.get("inputs") == stage_hash:
            logger.info("stage %s: completed with unchanged inputs, skipped", stage)
            upstream = record.get("outputs", stage_hash)
            continue
        output = run_dir / notebook
        record = {"notebook": notebook, "status": "running", "inputs": stage_hash, "started": dt.datetime.now()}
        manifest.data["stages"][stage] = record
        manifest.save()
        start = time.perf_counter()
        print(f"[pipeline] stage {stage}: {notebook} -> {output}", flush=True)
        try:
            papermill.execute_notebook(
                str(notebooks / notebook), str(output), parameters={"run_dir": str(run_dir), "config": str(resolved)},
                kernel_name=kernel, cwd=str(Path.cwd()), progress_bar=progress, log_output=False,
            )
        except papermill.PapermillExecutionError as err:
            record.update(status="failed", seconds=round(time.perf_counter() - start, 1),
                          error=f"{err.ename}: {err.evalue}")
            manifest.data["checkpoints"] = checkpoint_hashes(run_dir)
            manifest.save()
            print(f"[pipeline] stage {stage} FAILED in {_failed_cell(output)}\n"
                  f"[pipeline] executed notebook with the error: {output}", file=sys.stderr, flush=True)
            return 1
        checkpoints = checkpoint_hashes(run_dir)
        outputs = hashlib.sha256((stage_hash + json.dumps(checkpoints, sort_keys=True)).encode()).hexdigest()
        record.update(status="completed", seconds=round(time.perf_counter() - start, 1), outputs=outputs)
        manifest.data["checkpoints"] = checkpoints
        manifest.save()
        upstream = outputs
    total = sum(r.get("seconds", 0) for r in manifest.data["stages"].values())
    print(f"[pipeline] done in {total:.0f} s: {run_dir}", flush=True)
    return 0


def _stage_hash(stage: str, cfg: KitConfig, upstream: str, notebook: Path) -> str:
    values = cfg.to_dict()
    picked = {}
    for key in STAGE_CONFIG[stage]:
        node = values
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    text = json.dumps(picked, sort_keys=True, default=str) + upstream + file_sha256(notebook)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the embedded base checkpoints


def pretrain_base(cfg: KitConfig, out: str | Path) -> Path:
    """Pretrain the shipped base tokenizer and predictor with the kit's own engine; record provenance."""
    from kronos_kit.data import load_data
    from kronos_kit.train import train_predictor, train_tokenizer

    out = Path(out)
    work = out.parent / f".{out.name}-run"
    shutil.rmtree(work, ignore_errors=True)
    cfg = cfg.with_overrides({"run_dir": str(work), "predictor.tokenizer_from": None})
    data = load_data(cfg)
    tok = train_tokenizer(cfg, data=data)
    pred = train_predictor(cfg, data=data)
    for name, result in (("tokenizer", tok), ("predictor", pred)):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(result.best_dir, out / name)
    provenance = {
        "what": "kronos-kit embedded base checkpoints, pretrained from scratch by the kit's own engine",
        "command": "make base  (python -m kronos_kit pretrain --config configs/pretrain_base.yaml)",
        "data": {"source": cfg.data.source, "sha256": data_hash(cfg.data.source),
                 "note": "S&P 500 daily OHLCV 1999-2018 from the arch package"},
        "seed": cfg.seed, "config": cfg.to_dict(),
        "tokenizer": {"steps": tok.steps, "best_val_recon_full": tok.best_metric,
                      "sha256": file_sha256(out / "tokenizer" / WEIGHTS_NAME)},
        "predictor": {"steps": pred.steps, "best_val_loss": pred.best_metric,
                      "sha256": file_sha256(out / "predictor" / WEIGHTS_NAME)},
        "versions": _versions(), "git": _git_state(), "created": dt.datetime.now().isoformat(timespec="seconds"),
    }
    save_json(out / "PROVENANCE.json", provenance, default=str)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("base checkpoints written to %s", out)
    return out
