"""Tiny sweeps end to end: every trial is a valid run, a pruned trial says so, SIGKILL during a trial then
--resume loses and repeats nothing, and changing the test split changes no objective and not the best trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import DATA

from kronos_kit.pipeline import is_kit_run
from kronos_kit.runs import run_choice
from kronos_kit.sweep import SweepDir, load_sweep_study

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SMALL = ["data.symbol=A", "data.lookback=30", "data.predict=5", "tokenizer.max_steps=4", "tokenizer.eval_every=2",
         "tokenizer.batch_size=16", "predictor.max_steps=8", "predictor.eval_every=2", "predictor.batch_size=16",
         "predictor.skill_origins=4", "predictor.skill_paths=2", "predictor.skill_horizon=5",
         "evaluation.val_origins=12", "evaluation.max_origins=12", "evaluation.sample_count=4", "evaluation.pred_len=5",
         "evaluation.calibration_methods=[none,spread]", "threads=1"]
SPACE = {"sweep": {"trials": 4, "seed": 0, "startup_trials": 2, "prune_startup_trials": 1},
         "space": {"predictor.lr": {"low": 1e-5, "high": 2e-4, "log": True},
                   "predictor.strategy": {"choices": ["full", "lora", "l2sp"]},
                   "predictor.lora_rank": {"choices": [2, 4], "when": {"predictor.strategy": "lora"}},
                   "tokenizer.enabled": {"choices": [True, False]}}}


def sweep_command(folder: Path, space: Path, data: Path, *extra: str) -> list[str]:
    words = [f"-p={w}" for w in [f"data={data}", *SMALL]]
    return [sys.executable, "-m", "kronos_kit", "sweep", "--space", str(space), "--sweep-dir", str(folder), *words,
            *extra]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KRONOS_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, **kwargs)


def write_space(tmp_path: Path, **sweep) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "sweep": {**SPACE["sweep"], **sweep}}, sort_keys=False))
    return path


def finished(folder: Path) -> list:
    study = load_sweep_study(SweepDir(folder))
    return [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    folder = tmp / "sweep"
    done = run(sweep_command(folder, write_space(tmp), DATA / "ashare_5min_sample.csv"))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_a_four_trial_sweep_finishes_and_every_trial_is_a_run(tiny_sweep, tmp_path):
    from kronos_kit.__main__ import main, run_models
    from kronos_kit.compare import compare_runs

    trials = finished(tiny_sweep)
    assert len(trials) == 4 and {t.user_attrs["role"] for t in trials} == {"default", "search"}
    folders = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert len(set(folders)) == 4
    for t, folder in zip(trials, folders):
        assert is_kit_run(folder)
        record = json.loads((folder / "trial.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
        assert record["trial"] == t.number and record["params"] == t.params
        if t.state.name == "PRUNED":  # the folder says so, and at which step
            assert record["state"] == "pruned" and record["pruned_at_step"] == t.user_attrs["pruned_at_step"]
            assert manifest["stages"]["02"]["status"] == "pruned"
        else:
            assert manifest["stages"]["03"]["status"] == "completed"
            assert run_choice(folder).promoted in ("base", "finetuned")  # decisions bound to the weights
            assert run_models(folder)["chosen"].startswith("promoted")
    assert any(t.state.name == "PRUNED" for t in trials)  # pruning started after one finished trial
    table = compare_runs(folders)
    assert "predictor.lr" in table.columns and len(table) == 4
    complete = next(f for t, f in zip(trials, folders) if t.state.name == "COMPLETE")
    out = tmp_path / "next.csv"
    assert main(["forecast", "--run", str(complete), "--data", str(DATA / "ashare_5min_sample.csv"), "--symbol",
                 "A", "--horizon", "3", "--samples", "2", "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 3
    sweep = SweepDir(tiny_sweep)
    report = sweep.report.read_text()
    assert "## Test split" in report and "Evaluated once on 12 test origins" in report
    assert len(pd.read_csv(sweep.leaderboard_csv)) == 4
    assert {p.name for p in sweep.figures.glob("*.png")} >= {"sweep_history.png", "sweep_importances.png",
                                                            "sweep_slices.png", "sweep_parallel.png"}


def test_sigkill_during_a_trial_then_resume_loses_and_repeats_nothing(tmp_path):
    folder, data = tmp_path / "sweep", DATA / "ashare_5min_sample.csv"
    space = write_space(tmp_path, prune=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KRONOS_THREADS": "1"}
    proc = subprocess.Popen(sweep_command(folder, space, data), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = folder / "trials" / "0001" / "metrics.jsonl"  # kill trial 1 inside phase 2
    while proc.poll() is None and not (log.is_file() and '"phase": "predictor", "kind": "train"' in log.read_text()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = run([*sweep_command(folder, space, data)[:4], "--sweep-dir", str(folder), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_sweep_study(SweepDir(folder))
    trials = finished(folder)
    assert len(trials) == 4  # as many as an uninterrupted sweep
    params = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(set(params)) == 4  # none repeated
    killed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert [t.number for t in killed] == [1] and killed[0].user_attrs["interrupted"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.params == killed[0].params and retry.user_attrs["run_dir"] == killed[0].user_attrs["run_dir"]
    attempts = {json.loads(line).get("attempt") for line in log.read_text().splitlines()
                if json.loads(line).get("phase") == "predictor"}
    assert attempts == {1, 2}  # phase 2 continued from its saved state, not from step 0
    assert json.loads((log.parent / "trial.json").read_text())["attempts"] == 2


def test_changing_the_test_split_changes_no_objective_and_not_the_best_trial(tmp_path):
    frame = pd.read_csv(DATA / "ashare_5min_sample.csv")
    test_rows = np.arange(len(frame)) >= int(len(frame) * 0.9)  # the ratio split's test part (train 0.8, val 0.1)
    changed = frame.copy()
    prices = ["open", "high", "low", "close"]
    changed.loc[test_rows, prices] *= 1.5  # another market on the test dates
    changed.loc[test_rows, "volume"] = changed.loc[test_rows, "volume"][::-1].to_numpy()
    data = {"same": DATA / "ashare_5min_sample.csv", "changed": tmp_path / "changed.csv"}
    changed.to_csv(data["changed"], index=False)
    space = write_space(tmp_path, evaluate_test=False, trials=3)
    values = {}
    for name, path in data.items():
        done = run(sweep_command(tmp_path / name, space, path))
        assert done.returncode == 0, done.stderr[-3000:]
        study = load_sweep_study(SweepDir(tmp_path / name))
        values[name] = ([(t.number, t.state.name, t.value, t.params) for t in study.get_trials()],
                        study.best_trial.number)
    assert values["same"] == values["changed"]


PANEL = ["data.lookback=30", "data.predict=5", "data.train_ratio=0.6", "data.val_ratio=0.2", "tokenizer.max_steps=4",
         "tokenizer.eval_every=2", "tokenizer.batch_size=16", "predictor.max_steps=8", "predictor.eval_every=2",
         "predictor.batch_size=16", "predictor.skill_origins=4", "predictor.skill_paths=2", "predictor.skill_horizon=5",
         "evaluation.val_origins=60", "evaluation.max_origins=12", "evaluation.sample_count=4", "evaluation.pred_len=5",
         "evaluation.calibration_methods=[none,spread]", "evaluation.promote_on=rank_ic",
         "evaluation.rebalance_stride=10", "evaluation.universe_sample_count=2", "evaluation.topk=2",
         "evaluation.n_drop=1", "threads=1"]


def test_a_panel_sweep_ranks_on_validation_and_the_test_split_changes_no_objective_and_not_the_best(tmp_path):
    """Six stocks of sample:us15 from 2009 (a panel, so auto picks the RankIC objective): every trial's universe.json
    holds the validation split only; another market on the test dates (each name's prices on its own random walk,
    so the ranking changes) gives the same objectives, states and best trial; the report compares the best trial
    and trial 0 once on the test split's universe metrics."""
    from kronos_kit.data import load_ohlcv, load_sample, split

    frame = load_sample("us15")
    frame = frame[frame["symbol"].isin(sorted(frame["symbol"].unique())[:6])
                  & (frame["timestamps"] >= "2009-01-01")].reset_index(drop=True)
    parts = split(load_ohlcv(frame), lookback=30, predict=5, ratios=(0.6, 0.2, 0.2))
    test_start = parts.test.loc[~parts.test["is_context"], "timestamps"].min()
    rows = (frame["timestamps"] >= test_start).to_numpy()
    changed = frame.copy()
    rng = np.random.default_rng(0)
    for _, group in changed[rows].groupby("symbol"):  # each name on its own random walk from the test start
        factor = np.exp(np.cumsum(rng.normal(0, 0.02, len(group))))
        changed.loc[group.index, ["open", "high", "low", "close"]] *= factor[:, None]
    changed.loc[rows, "volume"] = changed.loc[rows, "volume"][::-1].to_numpy()
    data = {"same": tmp_path / "same.csv", "changed": tmp_path / "changed.csv"}
    frame.to_csv(data["same"], index=False)
    changed.to_csv(data["changed"], index=False)
    space = write_space(tmp_path, trials=3)
    values = {}
    for name, path in data.items():
        words = [f"-p={w}" for w in [f"data={path}", *PANEL]]
        command = [sys.executable, "-m", "kronos_kit", "sweep", "--space", str(space), "--sweep-dir",
                   str(tmp_path / name), *words]
        done = run(command)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "a proxy for the RankIC objective" in done.stdout  # pruning is on: the sweep says what it follows
        sweep = SweepDir(tmp_path / name)
        assert sweep.definition()["objective"] == "rank_ic"
        study = load_sweep_study(sweep)
        for t in study.get_trials():
            if t.state.name == "COMPLETE":
                universe = json.loads((Path(t.user_attrs["run_dir"]) / "universe.json").read_text())
                assert universe["splits"] == ["validation"] and "test" not in universe
                assert t.value == universe["validation"]["finetuned"]["rank_ic"]
                assert json.loads((Path(t.user_attrs["run_dir"]) / "promoted.json").read_text())["metric"] == "rank_ic"
        values[name] = ([(t.number, t.state.name, t.value, t.params) for t in study.get_trials()],
                        study.best_trial.number)
    assert values["same"] == values["changed"]
    sweep = SweepDir(tmp_path / "same")
    look = sweep.definition()["test_evaluations"][0]
    assert look["objective"] == "rank_ic" and look["n_symbols"] == 6 and look["n_dates"] > 10
    table = pd.read_csv(sweep.test_table, index_col="signal")
    assert {"best", "base", "momentum", "reversal", "placebo"} <= set(table.index)
    assert table["rank_ic"].between(-1, 1).all() and "topk_excess" in table
    report = sweep.report.read_text()
    assert f"{look['n_dates']} rebalance dates every 10 bars x 6 symbols" in report
    assert "**Selection optimism.**" in report or "The base config was the best trial" in report
    assert "## Pruning: did the probe order the trials as the objective?" in report


def test_notebook_04_shows_a_sweep_and_notebook_03_evaluates_a_trial(tiny_sweep, tmp_path):
    """From notebooks/ as JupyterLab runs it: notebook 04 on the finished sweep shows the leaderboard, every figure
    inline and the report; `pipeline --from 03` runs notebook 03 on a trial folder (its test evaluation)."""
    import shutil

    import papermill

    from kronos_kit.pipeline import run_pipeline

    out = tmp_path / "04.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "04_sweep.ipynb"), str(out), cwd=str(ROOT / "notebooks"),
                               parameters={"sweep_dir": str(tiny_sweep), "run_trials": False}, progress_bar=False,
                               kernel_name="kronos-kit")
    cells = [c for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code"]
    images = [c for c in cells if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert len(images) == 5  # history, intermediate values, importances, slices, parallel coordinates
    assert any("text/markdown" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
    best = next(t for t in finished(tiny_sweep) if t.state.name == "COMPLETE")
    trial = tmp_path / "trial"
    shutil.copytree(best.user_attrs["run_dir"], trial)
    assert run_pipeline(run_dir=trial, from_stage="03", progress=False) == 0
    assert (trial / "report.md").is_file() and (trial / "metrics.json").is_file()
