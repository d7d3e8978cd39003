"""A run made by the notebooks outside the pipeline (JupyterLab) is a first-class run: the notebook's first call
(`stages.open_stage`) writes config.yaml and the manifest through the functions the pipeline uses, its last call
marks the stage complete, and a pipeline run's executed notebook cannot retrain that run by Run All.

The notebooks themselves run in tests/test_pipeline.py (slow); here `open_stage` is called as their first cell
calls it, in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import DATA

from kronos_kit.config import KitConfig
from kronos_kit.provenance import PIPELINE_ENV, RUN_KIND, finish_stage, open_run, start_stage, update_manifest
from kronos_kit.runs import RunDir
from kronos_kit.stages import open_stage

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
PARAMS = {"data": str(DATA / "ashare_5min_sample.csv"), "threads": 1}


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_a_notebook_outside_the_pipeline_writes_config_and_manifest_like_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.delenv(PIPELINE_ENV, raising=False)
    run = tmp_path / "lab"
    stage = open_stage("01", str(CONFIG), str(run), tokenizer_steps=3, **PARAMS)
    assert stage.recorded and stage.overwrite is False and stage.cfg.tokenizer.max_steps == 3
    saved = KitConfig.from_file(run / "config.yaml")
    assert saved.tokenizer.max_steps == 3 and saved.run_dir == str(run) and saved.name == "default"
    data = manifest(run)
    assert data["kind"] == RUN_KIND and data["config_file"] == str(CONFIG)
    assert data["parameters"] == {"tokenizer_steps": 3, **PARAMS}
    assert data["data"]["sha256"] and data["versions"]["torch"] and "commit" in data["git"]
    assert data["invocations"][-1]["by"] == "notebook 01" and data["invocations"][-1]["mode"] == "lab"
    assert data["stages"]["01"]["status"] == "running" and data["stages"]["01"]["inputs"]
    assert "recorded in" in stage.describe() and "threads: 1 (asked for)" in stage.describe()

    assert "recorded complete" in stage.done()
    assert manifest(run)["stages"]["01"]["status"] == "completed" and manifest(run)["stages"]["01"]["outputs"]


def test_later_notebooks_continue_the_runs_saved_config(tmp_path, monkeypatch):
    monkeypatch.delenv(PIPELINE_ENV, raising=False)
    run = tmp_path / "lab"
    open_stage("01", str(CONFIG), str(run), tokenizer_steps=3, **PARAMS).done()
    # notebook 02 left at its defaults (config = configs/default.yaml, tokenizer_steps None) keeps notebook 01's run
    stage = open_stage("02", str(CONFIG), str(run), threads=1, predictor_steps=5)
    assert stage.cfg.tokenizer.max_steps == 3 and stage.cfg.data.source == PARAMS["data"]
    assert stage.cfg.predictor.max_steps == 5 and stage.continued == str(run / "config.yaml")
    assert yaml.safe_load((run / "config.yaml").read_text().split("\n", 1)[1])["predictor"]["max_steps"] == 5
    # a parameter that would change what notebook 01 produced is refused, naming it
    with pytest.raises(ValueError, match=r"tokenizer\.max_steps: the run has 3, this notebook 9.*tokenizer_steps"):
        open_stage("03", str(CONFIG), str(run), tokenizer_steps=9, threads=1)


def test_an_executed_pipeline_notebook_refuses_to_retrain_its_run(tmp_path, monkeypatch):
    """What papermill injects into a pipeline stage (run_dir, the run's config.yaml, no overwrite): Run All in the
    executed copy stops in its first cell instead of retraining the run without the pipeline's record."""
    monkeypatch.delenv(PIPELINE_ENV, raising=False)
    run = tmp_path / "run"
    cfg = KitConfig.from_file(CONFIG).with_overrides({"run_dir": str(run), "data.source": PARAMS["data"]})
    open_run(run, cfg, by="pipeline", mode="new", config_source=str(CONFIG), parameters={})
    start_stage(run, "01", cfg, by="pipeline")
    (run / "tokenizer" / "best").mkdir(parents=True)
    finish_stage(run, "01", status="completed")
    before = manifest(run)
    with pytest.raises(FileExistsError, match=r"already holds stage 01's tokenizer \(tokenizer/best\).*--from 01"):
        open_stage("01", str(run / "config.yaml"), str(run), threads=1)
    assert manifest(run) == before  # refused before anything was written

    # under the pipeline (its kernels see PIPELINE_ENV) the same call may retrain and records nothing itself
    monkeypatch.setenv(PIPELINE_ENV, str(run.resolve()))
    stage = open_stage("01", str(run / "config.yaml"), str(run), threads=1)
    assert stage.overwrite and not stage.recorded and manifest(run) == before
    assert "the pipeline records it" in stage.done() and manifest(run) == before


def test_the_manifest_is_read_afresh_for_every_write(tmp_path):
    """The pipeline process and a notebook kernel write one manifest in turn: neither drops the other's entries."""
    update_manifest(tmp_path, lambda m: m["stages"].update({"01": {"status": "completed"}}))
    update_manifest(tmp_path, lambda m: m["stages"].update({"02": {"status": "running"}}))
    assert set(manifest(tmp_path)["stages"]) == {"01", "02"}


def test_a_stage_input_hash_is_the_same_from_the_pipeline_and_a_notebook(tmp_path, monkeypatch):
    """`--resume` skips a stage a notebook completed with unchanged inputs: both write the same input hash."""
    monkeypatch.delenv(PIPELINE_ENV, raising=False)
    lab, piped = tmp_path / "lab", tmp_path / "piped"
    stage = open_stage("01", str(CONFIG), str(lab), **PARAMS)
    cfg = stage.cfg.with_overrides(run_dir=str(piped))
    open_run(piped, cfg, by="pipeline", mode="new", config_source=str(CONFIG), parameters={})
    start_stage(piped, "01", cfg, by="pipeline")
    assert manifest(lab)["stages"]["01"]["inputs"] == manifest(piped)["stages"]["01"]["inputs"]
    assert RunDir(lab).config.is_file() and RunDir(piped).config.is_file()
