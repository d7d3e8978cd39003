"""SIGKILL both phases at random moments and inside checkpoint saves, resume each time with no cleanup:
the run ends bit-identical (weights, training state, metrics log) to one that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA
from test_train import with_dropout

from kronos_kit.model import Kronos, KronosTokenizer, weights_hash
from kronos_kit.runs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
PHASES = (("tokenizer", KronosTokenizer), ("predictor", Kronos))

# runs the command line with os.replace wrapped: SIGKILL itself just before (KILL_AT > 0) or just after
# (KILL_AT < 0) the |KILL_AT|-th rename, i.e. inside an atomic write or between a swap's two renames
KILLED_AT_RENAME = """
import os, signal, sys
at, real, calls = int(os.environ["KILL_AT"]), os.replace, [0]
def replace(src, dst):
    calls[0] += 1
    if calls[0] == -at:
        real(src, dst)
    if calls[0] == abs(at):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
from kronos_kit.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def overrides(start: dict[str, str]) -> list[str]:
    values = {"device": "cpu", "data.source": str(DATA / "ashare_5min_sample.csv"), "data.symbol": "A",
              "data.lookback": 30, "data.predict": 5, "data.stride": 2,
              "gate.override": True}  # the engine under kills: phase 2 without notebook 01's gate
    for phase, _ in PHASES:
        values |= {f"{phase}.start_from": start[phase], f"{phase}.batch_size": 16, f"{phase}.max_steps": 10,
                   f"{phase}.eval_every": 2, f"{phase}.log_every": 1, f"{phase}.max_val_batches": 2}
    return [f"{k}={v}" for k, v in values.items()]


def launch(phase: str, run_dir: Path, words: list[str], *, kill_at: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    head = [sys.executable, "-m", "kronos_kit"]
    if kill_at is not None:
        head, env["KILL_AT"] = [sys.executable, "-c", KILLED_AT_RENAME], str(kill_at)
    return subprocess.Popen([*head, "train", phase, "--run-dir", str(run_dir), "--resume", *words], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _lines(run_dir: Path) -> int:
    log = run_dir / "metrics.jsonl"
    return log.read_text().count("\n") if log.is_file() else 0


def state_of(run_dir: Path, phase: str) -> dict:
    state = torch.load(run_dir / "state" / f"{phase}.pt", weights_only=True)
    return {k: v for k, v in state.items() if k not in ("run_id", "attempt")}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def log_of(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("run", "attempt", "windows_per_s")}
            for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path):
    start = {phase: with_dropout(cls, tmp_path / f"start_{phase}") for phase, cls in PHASES}
    words = overrides(start)
    for phase, _ in PHASES:  # the uninterrupted run
        done = launch(phase, tmp_path / "whole", words)
        assert done.wait(timeout=300) == 0, done.stderr.read()

    rng, killed, kills = random.Random(0), tmp_path / "killed", 0
    for phase, _ in PHASES:
        # a kill at a random moment of training, two inside saves (just before / just after a rename),
        # then to the end; every launch is the same command with --resume, nothing is cleaned up
        plan = [("log", rng.randint(3, 9)), ("rename", rng.randint(6, 14)), ("rename", -rng.randint(6, 14)),
                (None, None)]
        for how, when in plan:
            proc = launch(phase, killed, words, kill_at=when if how == "rename" else None)
            if how == "log":  # SIGKILL once `when` more lines are logged, plus a random fraction of a step
                lines = _lines(killed)
                while proc.poll() is None and _lines(killed) < lines + when:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.2))
                proc.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=300)
            assert code in ((0, -signal.SIGKILL) if how else (0,)), proc.stderr.read()
            kills += code == -signal.SIGKILL
    assert kills >= 4  # most planned kills landed before their process finished

    for phase, cls in PHASES:
        for kind in ("best", "last"):
            a, b = (weights_hash(cls.from_pretrained(d / phase / kind)) for d in (tmp_path / "whole", killed))
            assert a == b, f"{phase}/{kind}"
        assert same(state_of(killed, phase), state_of(tmp_path / "whole", phase)), phase
        assert sorted(os.listdir(killed / phase)) == ["best", "last"]  # no swap leftovers
    assert log_of(killed) == log_of(tmp_path / "whole")
