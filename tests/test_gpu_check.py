"""benchmarks/gpu_check.py in its reduced mode (tiny shapes, a few steps): the GPU check runs anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_the_gpu_check_runs_in_reduced_mode(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--reduced", "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    row = figures["shapes"]["tiny"]
    for precision in ("fp32", "bf16"):
        for phase in ("phase1", "phase2"):
            result = row[precision][phase]
            assert len(result["losses"]) == 3 and np.isfinite(result["losses"]).all() and result["s_per_step"] > 0
    if not figures["device"].startswith("CPU"):
        pytest.skip("on a GPU the figures are measurements, checked by reading them")
    # on a CPU the engine's bf16 autocast is off, so the two runs are the same seeded run
    assert row["phase1_loss_rel_diff_max"] == 0 and row["phase2_loss_rel_diff_max"] == 0
    forecast = row["forecast"]
    assert forecast["paths_max_rel_diff_prices"] < 1e-5  # the cached forecaster reproduces the reference algorithm
    assert forecast["cached_series_paths_per_s"] > 0 and forecast["reference_series_paths_per_s"] > 0
    smoke = figures["torchrun"]
    assert json.loads(smoke["lines"][0]) == {"backend": "gloo", "world": 1, "all_reduce": 1.0}
    assert {"tokenizer/best/model.safetensors", "predictor/best/model.safetensors"} <= set(smoke["checkpoints"])
    assert "| tiny | phase2 |" in done.stdout
