"""The three notebooks run headless through papermill; failures stop the pipeline; resume completes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA

from kronos_kit.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
SMOKE = {"data": str(DATA / "ashare_5min_sample.csv"), "tokenizer_steps": 3, "predictor_steps": 3, "eval_origins": 3,
         "tokenizer.eval_every": 3, "predictor.eval_every": 3, "evaluation.sample_count": 2,
         "evaluation.pred_len": 5, "evaluation.stride": 20}

pytestmark = pytest.mark.slow


def run(run_dir, **params):
    return run_pipeline(ROOT / "configs" / "default.yaml", run_dir=run_dir, params={**SMOKE, **params},
                        progress=False)


def test_pipeline_runs_all_notebooks_and_writes_artifacts(tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, ignore_gate=True) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("01", "02", "03")] == ["completed"] * 3
    for name in ("01_tokenizer_adaptation.ipynb", "02_predictor_finetune.ipynb", "03_diagnostics.ipynb",
                 "config.yaml", "metrics.jsonl", "codebook_before.json", "codebook_after.json",
                 "reconstruction_gate.json", "metrics.json", "report.md", "token_metrics.json", "promoted.json",
                 "calibration.json"):
        assert (run_dir / name).is_file(), name
    assert set(manifest["checkpoints"]) >= {"tokenizer/best", "tokenizer/last", "predictor/best", "predictor/last"}
    assert manifest["data"]["sha256"] and manifest["versions"]["torch"] and "commit" in manifest["git"]
    assert len(list((run_dir / "figures").glob("*.png"))) >= 10
    report = (run_dir / "report.md").read_text()
    assert "finetuned" in report and "persistence" in report
    assert report.startswith("# Forecast evaluation\n\n**Bottom line.** ") and "## Promotion" in report
    assert "## Sampling calibration" in report
    promoted = json.loads((run_dir / "promoted.json").read_text())
    assert promoted["split"] == "validation" and promoted["reason"] in report
    with pytest.raises(FileExistsError, match="--resume"):
        run(run_dir)  # an existing run directory is never overwritten silently

    # reproducible: a second run gives the same checkpoints and the same metrics
    again = tmp_path / "again"
    assert run(again, ignore_gate=True) == 0
    manifest_again = json.loads((again / "manifest.json").read_text())
    assert manifest_again["checkpoints"] == manifest["checkpoints"]
    metrics, metrics_again = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, again))
    metrics.pop("timings_s"), metrics_again.pop("timings_s")
    assert metrics == metrics_again


def test_failing_stage_stops_and_resume_completes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # an impossible gate: notebook 02 must refuse to start
    assert run(run_dir, **{"gate.max_full_mse": 0.0}) == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["01"]["status"] == "completed"
    assert manifest["stages"]["02"]["status"] == "failed" and "03" not in manifest["stages"]
    executed = json.loads((run_dir / "02_predictor_finetune.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and "Gate" in errors[0]["ename"]
    assert "stage 02 FAILED in code cell" in capsys.readouterr().err
    started_01 = manifest["stages"]["01"]["started"]

    assert run_pipeline(ROOT / "configs" / "default.yaml", run_dir=run_dir, resume=True, progress=False,
                        params={**SMOKE, "gate.max_full_mse": 0.0, "ignore_gate": True}) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("01", "02", "03")] == ["completed"] * 3
    assert manifest["stages"]["01"]["started"] == started_01  # phase 1 was not rerun
