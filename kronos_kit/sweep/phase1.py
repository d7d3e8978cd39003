"""Phase 1 shared between trials: trials with the same phase-1 settings use one tokenizer, trained once.

Phase 2 depends on phase 1 only through the frozen tokenizer, so a sweep trains each distinct phase-1
setting once: a unit `<sweep>/phase1/<key>/` is an ordinary run folder holding phase 1 exactly as
notebook 01 leaves it (tokenizer/best, training state, metrics log, codebook statistics before and after,
the reconstruction gate) plus `phase1.json`: the tokenizer's source and the sha256 of its weights file.
The key hashes what phase 1 depends on (`pipeline.STAGE_CONFIG["01"]`: seed, device, precision, data,
tokenizer, gate thresholds; with phase 1 off only the base tokenizer's source) and the data's bytes.

The first trial that needs a unit builds it (a killed build continues from its training state); trials
needing it meanwhile wait (`waiting_run_lock`). A trial refers to the unit's tokenizer by path
(`predictor.tokenizer_from`) after checking that its weights still have the recorded sha256, and copies the
unit's evidence files (gate, codebook statistics, phase-1 log records) into its own folder, so notebook 02,
`compare` and `report.md` find them there.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kronos_kit.binding import weights_sha256
from kronos_kit.codebook import codebook_stats
from kronos_kit.config import KitConfig, flatten
from kronos_kit.data import DataBundle
from kronos_kit.gate import reconstruction_gate
from kronos_kit.model import KronosTokenizer
from kronos_kit.pipeline import STAGE_CONFIG
from kronos_kit.reconstruction import reconstruction_report
from kronos_kit.run_lock import waiting_run_lock
from kronos_kit.runs import RunDir, atomic_write_bytes, atomic_write_text, load_json, save_json
from kronos_kit.train import train_tokenizer

__all__ = ["PHASE1_DIR", "PHASE1_FILE", "Phase1Unit", "attach_phase1", "ensure_phase1", "phase1_key"]

PHASE1_DIR = "phase1"
PHASE1_FILE = "phase1.json"
EVIDENCE = ("codebook_before", "codebook_after", "gate")  # RunDir files a trial copies from its unit
OFF_FIELDS = ("tokenizer.enabled", "tokenizer.start_from", "tokenizer.entropy_mode")  # what phase 1 off depends on


@dataclass
class Phase1Unit:
    """A built phase-1 unit: where its tokenizer is, the sha256 of its weights file, the gate's verdict."""

    folder: Path
    key: str
    tokenizer: str  # source phase 2 reads: <unit>/tokenizer/best, or the base when phase 1 is off
    sha256: str | None  # of the tokenizer's model.safetensors (None: a preset built in memory)
    gate_passed: bool
    gate_summary: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "tokenizer": self.tokenizer, "sha256": self.sha256, "gate_passed": self.gate_passed,
                "gate_summary": self.gate_summary, "seconds": self.seconds}

    @classmethod
    def load(cls, folder: Path) -> Phase1Unit | None:
        path = folder / PHASE1_FILE
        if not path.is_file():
            return None
        d = load_json(path)
        return cls(folder, d["key"], d["tokenizer"], d["sha256"], bool(d["gate_passed"]), d["gate_summary"],
                   float(d["seconds"]))

    def check(self) -> None:
        """Refuse a tokenizer whose weights changed since the unit recorded them."""
        now = weights_sha256(self.tokenizer)
        if now != self.sha256:
            raise ValueError(f"{self.folder / PHASE1_FILE}: the shared phase-1 tokenizer {self.tokenizer} has sha256 "
                             f"{str(now)[:12]}... now, not the recorded {str(self.sha256)[:12]}...: it changed after "
                             "phase 1 built it. Delete that phase1 folder (it is built again) or start a new sweep")


def phase1_key(cfg: KitConfig, data_key: str) -> str:
    """sha256 of what phase 1's result depends on (see the module docstring)."""
    values = flatten(cfg.to_dict())
    fields = [k for k in values if any(k == f or k.startswith(f + ".") for f in STAGE_CONFIG["01"])]
    if not cfg.tokenizer.enabled:  # no training: the tokenizer is the base, whatever its training settings say
        fields = [k for k in fields if not k.startswith("tokenizer.") or k in OFF_FIELDS]
    text = json.dumps({"data": data_key, **{k: values[k] for k in fields}}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def ensure_phase1(cfg: KitConfig, sweep_dir: Path, bundle: DataBundle, data_key: str) -> Phase1Unit:
    """The unit for `cfg`'s phase-1 settings, built first when no trial has built it yet."""
    key = phase1_key(cfg, data_key)
    folder = Path(sweep_dir) / PHASE1_DIR / key[:16]
    with waiting_run_lock(folder, "a sweep's shared phase 1"):
        unit = Phase1Unit.load(folder)
        if unit is None:
            unit = _build(cfg.with_overrides(run_dir=str(folder)), bundle, folder, key)
    unit.check()
    return unit


def _build(cfg: KitConfig, bundle: DataBundle, folder: Path, key: str) -> Phase1Unit:
    """Phase 1 as notebook 01 runs it: codebook and reconstruction of the base, training, again after, gate."""
    start = time.perf_counter()
    rd = RunDir(folder)
    atomic_write_text(rd.config, f"# a sweep's shared phase 1 (key {key[:16]})\n" + cfg.to_yaml())
    base = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from)
    stats_before = codebook_stats(base, bundle.val, progress=False)
    stats_before.save(rd.codebook_before)
    recon_before = reconstruction_report(base, bundle.val, progress=False)
    source = cfg.tokenizer.start_from
    if cfg.tokenizer.enabled:
        train_tokenizer(cfg, data=bundle, resume=True, progress=False)  # a killed build continues where it was
        source = str(rd.checkpoint("tokenizer", "best"))
    adapted = KronosTokenizer.from_pretrained(source)
    stats_after = codebook_stats(adapted, bundle.val, progress=False)
    stats_after.save(rd.codebook_after)
    recon_after = reconstruction_report(adapted, bundle.val, progress=False)
    gate = reconstruction_gate(recon_after, stats_after, cfg.gate, base=recon_before, base_stats=stats_before,
                               tokenizer=source)  # bound to the weights it judged: phase 2 of each trial checks that
    gate.save(rd.gate)
    unit = Phase1Unit(folder, key, source, weights_sha256(source), gate.passed, gate.summary(),
                      round(time.perf_counter() - start, 1))
    save_json(folder / PHASE1_FILE, unit.to_dict())  # last: a unit without it is built (or continued) again
    return unit


def attach_phase1(unit: Phase1Unit, run_dir: Path) -> dict[str, Any]:
    """Copy the unit's evidence (gate, codebook statistics, phase-1 log records) into a trial's run folder, so
    its notebooks and `compare` find them; the config overrides that point the trial's phase 2 at the unit."""
    source, target = RunDir(unit.folder), RunDir(run_dir)
    for name in EVIDENCE:
        path = getattr(source, name)
        if path.is_file():
            atomic_write_bytes(getattr(target, name), path.read_bytes())
    if source.metrics_log.is_file() and not target.metrics_log.is_file():
        lines = [line for line in source.metrics_log.read_text().splitlines()
                 if line.strip() and json.loads(line).get("phase") == "tokenizer"]
        atomic_write_text(target.metrics_log, "".join(line + "\n" for line in lines))
    return {"predictor.tokenizer_from": unit.tokenizer}
