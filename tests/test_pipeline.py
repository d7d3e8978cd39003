"""The three notebooks run headless through papermill: from `notebooks/` as JupyterLab runs them, with
figures inline; a failing stage stops the pipeline and `--from` completes it; `--resume` continues an
interrupted training stage from its saved step and ends where an uninterrupted run ends.

One smoke pipeline run (module fixture) serves the tests that only read or copy it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from kronos_kit.config import KitConfig
from kronos_kit.pipeline import UsageError, run_pipeline
from kronos_kit.runs import RunDir, save_json

ROOT = Path(__file__).resolve().parent.parent
SMOKE = {"data": str(DATA / "ashare_5min_sample.csv"), "tokenizer_steps": 4, "predictor_steps": 4, "eval_origins": 3,
         "threads": 1, "tokenizer.eval_every": 2, "predictor.eval_every": 2, "evaluation.sample_count": 2,
         "evaluation.pred_len": 5, "evaluation.stride": 20}

pytestmark = pytest.mark.slow


def run(run_dir, **kwargs):
    return run_pipeline(ROOT / "configs" / "default.yaml", run_dir=run_dir, params=SMOKE, **kwargs)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    assert run(run_dir) == 0
    return run_dir


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def copy_run(smoke_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(smoke_run, copy)
    return copy


def png_cells(notebook: Path) -> list[str]:
    """The source of every code cell with an image/png output."""
    cells = json.loads(notebook.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"
            and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def test_pipeline_runs_all_notebooks_and_writes_artifacts(smoke_run):
    manifest = manifest_of(smoke_run)
    assert [manifest["stages"][s]["status"] for s in ("01", "02", "03")] == ["completed"] * 3
    for name in ("01_tokenizer_adaptation.ipynb", "02_predictor_finetune.ipynb", "03_diagnostics.ipynb",
                 "config.yaml", "metrics.jsonl", "codebook_before.json", "codebook_after.json",
                 "reconstruction_gate.json", "metrics.json", "report.md", "token_metrics.json", "promoted.json",
                 "calibration.json"):
        assert (smoke_run / name).is_file(), name
    assert set(manifest["checkpoints"]) >= {"tokenizer/best", "tokenizer/last", "predictor/best", "predictor/last"}
    assert manifest["data"]["sha256"] and manifest["versions"]["torch"] and "commit" in manifest["git"]
    assert manifest["kind"] == "kronos-kit run" and manifest["invocations"][0]["mode"] == "new"
    figures = {p.name for p in (smoke_run / "figures").glob("*.png")}
    assert len(figures) >= 10 and "01_candles.png" in figures
    report = (smoke_run / "report.md").read_text()
    assert "finetuned" in report and "persistence" in report
    # the verdict first, the decisions and tables after it, the phase sections last
    assert report.startswith(f"# Report: {smoke_run.name}\n\n**Bottom line.** ")
    phase1 = report.index("## Phase 1: tokenizer adaptation\n\n**Gate: passed.**")
    assert report.index("## Promotion") < phase1 < report.index("## Phase 2: predictor finetune")
    assert "| close_error_to_move |" in report and "| full_mse_vs_base |" in report and "Best validation step" in report
    gate = json.loads((smoke_run / "reconstruction_gate.json").read_text())
    assert gate["passed"] and {c["metric"] for c in gate["checks"]} >= {"full_mse_vs_base", "close_error_to_move"}
    assert all(c["value"] is not None and c["threshold"] is not None and c["base"] is not None for c in gate["checks"])
    assert "## Forecast calibration" in report and "as sampled vs calibrated" in report
    promoted = json.loads((smoke_run / "promoted.json").read_text())
    assert promoted["split"] == "validation" and promoted["reason"] in report
    # one series: no cross-section, so no universe files, section or figures
    assert not (smoke_run / "universe.json").exists() and not (smoke_run / "signals.parquet").exists()
    assert "## Universe" not in report and not list((smoke_run / "figures").glob("03_universe_*"))
    with pytest.raises(UsageError, match="--resume"):
        run(smoke_run)  # an existing run directory is never overwritten silently


def test_a_second_run_gives_the_same_checkpoints_and_metrics(smoke_run, tmp_path):
    again = tmp_path / "again"
    assert run(again) == 0
    assert manifest_of(again)["checkpoints"] == manifest_of(smoke_run)["checkpoints"]
    metrics, metrics_again = (json.loads((d / "metrics.json").read_text()) for d in (smoke_run, again))
    metrics.pop("timings_s"), metrics_again.pop("timings_s")
    assert metrics == metrics_again


def test_notebooks_run_from_the_notebooks_folder_with_figures_inline(smoke_run, tmp_path):
    """As JupyterLab runs them: working directory notebooks/, the parameters cell's relative paths."""
    import papermill

    run_dir = tmp_path / "lab"
    params = {"run_dir": str(run_dir), "data": "tests/data/ashare_5min_sample.csv",  # relative to the project
              "tokenizer_steps": 2, "predictor_steps": 2, "eval_origins": 2, "threads": 1}
    for name in ("01_tokenizer_adaptation.ipynb", "02_predictor_finetune.ipynb", "03_diagnostics.ipynb"):
        papermill.execute_notebook(str(ROOT / "notebooks" / name), str(tmp_path / name), parameters=params,
                                   cwd=str(ROOT / "notebooks"), progress_bar=False, kernel_name="python3")
    assert {p.name for p in run_dir.iterdir()} >= {"tokenizer", "predictor", "report.md", "figures"}
    used = KitConfig.from_file(ROOT / "configs" / "default.yaml")
    assert used.name == "default"  # notebooks found configs/default.yaml from notebooks/
    for name in ("01_tokenizer_adaptation.ipynb", "02_predictor_finetune.ipynb", "03_diagnostics.ipynb"):
        assert png_cells(tmp_path / name), f"{name} shows no figure inline"
    shown = "\n".join(png_cells(tmp_path / "01_tokenizer_adaptation.ipynb"))
    for figure in ("01_candles", "01_rank_frequency_s1", "01_s1_heatmap", "01_bit_balance", "01_reconstruction",
                   "01_worst_windows", "01_window_errors", "01_tokenizer_curves"):
        assert figure in shown, f"{figure} is not shown inline"
    assert "02_predictor_curves" in "\n".join(png_cells(tmp_path / "02_predictor_finetune.ipynb"))
    # the curves of both phases draw the base: each phase logged its start checkpoint's validation at step 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for phase in ("tokenizer", "predictor"):
        assert [r["step"] for r in records if r["phase"] == phase and r["kind"] == "reference"] == [0], phase

    # a run made without the pipeline is a first-class run: config.yaml and a manifest with every stage complete,
    # which forecast --run, compare and pipeline --resume accept
    from kronos_kit.__main__ import main

    manifest = manifest_of(run_dir)
    assert manifest["kind"] == "kronos-kit run" and (run_dir / "config.yaml").is_file()
    assert [manifest["stages"][s]["status"] for s in ("01", "02", "03")] == ["completed"] * 3
    assert {i["by"] for i in manifest["invocations"]} == {"notebook 01", "notebook 02", "notebook 03"}
    saved = KitConfig.from_file(run_dir / "config.yaml")
    assert saved.tokenizer.max_steps == 2 and saved.evaluation.max_origins == 2
    assert "`best` is picked by val_crps" in (run_dir / "report.md").read_text()  # configs/default.yaml's metric
    out = tmp_path / "next.csv"
    assert main(["forecast", "--run", str(run_dir), "--data", str(DATA / "ashare_5min_sample.csv"), "--horizon", "3",
                 "--out", str(out), "--samples", "4", "--threads", "1"]) == 0 and out.is_file()
    assert main(["compare", str(run_dir), str(smoke_run)]) == 0
    assert run_pipeline(run_dir=run_dir, resume=True) == 0  # every stage completed with unchanged inputs: skipped
    assert [i["mode"] for i in manifest_of(run_dir)["invocations"]][-1] == "resume"


def test_failing_stage_stops_and_from_completes_it(smoke_run, tmp_path, capsys):
    run_dir = copy_run(smoke_run, tmp_path)
    started_01 = manifest_of(run_dir)["stages"]["01"]["started"]
    tokenizer_config = run_dir / "tokenizer" / "best" / "config.json"
    kept = tokenizer_config.read_text()
    tokenizer_config.write_text("{")  # what notebook 02 loads first fails inside it

    assert run_pipeline(run_dir=run_dir, from_stage="02") == 1
    manifest = manifest_of(run_dir)
    assert manifest["stages"]["02"]["status"] == "failed"
    executed = json.loads((run_dir / "02_predictor_finetune.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and "config.json" in errors[0]["evalue"]
    assert "stage 02 FAILED in code cell" in capsys.readouterr().err
    tokenizer_config.write_text(kept)

    # a gate that fails by its numbers ("passed": true is not believed) refuses --from 02 before anything runs
    gate = json.loads((run_dir / "reconstruction_gate.json").read_text())
    save_json(run_dir / "reconstruction_gate.json", {**gate, "metrics": {**gate["metrics"], "full_mse": 0.9}})
    with pytest.raises(UsageError, match="full_mse .* is above the maximum 0.2"):
        run_pipeline(run_dir=run_dir, from_stage="02")
    assert manifest_of(run_dir) == manifest

    assert run_pipeline(run_dir=run_dir, from_stage="02", params={"ignore_gate": True}) == 0
    manifest = manifest_of(run_dir)
    assert [manifest["stages"][s]["status"] for s in ("01", "02", "03")] == ["completed"] * 3
    assert manifest["stages"]["01"]["started"] == started_01  # phase 1 was not rerun
    assert manifest["config"]["gate"]["override"] is True


def test_resume_continues_an_interrupted_training_stage(smoke_run, tmp_path, capsys):
    """Kill phase 1 after step 3 (its state saved at step 2), resume: it continues at step 2 and ends
    bit-identical to the uninterrupted run, so stages 02 and 03 are skipped as unchanged."""
    from kronos_kit.train import train_tokenizer

    run_dir = copy_run(smoke_run, tmp_path)
    rd = RunDir(run_dir)
    shutil.rmtree(run_dir / "tokenizer")
    rd.state("tokenizer").unlink()
    cfg = KitConfig.from_file(rd.config).with_overrides(run_dir=str(run_dir))

    def killed_after_step_3(step: int, parts: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg, on_step=killed_after_step_3, progress=False)
    manifest = manifest_of(run_dir)
    manifest["stages"]["01"]["status"] = "running"  # as a killed pipeline leaves it
    save_json(rd.manifest, manifest)
    capsys.readouterr()

    assert run_pipeline(run_dir=run_dir, resume=True) == 0
    out, err = capsys.readouterr()
    assert "stage 01: 01_tokenizer_adaptation.ipynb (continuing its training)" in out
    assert "tokenizer: resumed at step 2" in err  # the kernel's message, shown in the terminal
    # the continued phase validates at its last step (the terminal relays metrics.jsonl), then later stages skip
    assert "tokenizer validation at step 4:" in out and "02 skipped (done before), 03 skipped (done before)" in out
    after = manifest_of(run_dir)
    assert after["checkpoints"] == manifest_of(smoke_run)["checkpoints"]  # as if never interrupted
    assert after["stages"]["02"]["started"] == manifest["stages"]["02"]["started"]


def test_a_panel_passed_with_data_gets_the_universe_evaluation(tmp_path):
    """`-p data=<panel>` with 6 symbols sharing dates: universe.json, signals.parquet, report.md's universe section
    and notebook 03's universe figures inline, with the default config otherwise."""
    rng = np.random.default_rng(0)
    days = pd.bdate_range("2018-01-01", periods=420)
    frames = []
    for k in range(6):
        close = 30 * np.exp(np.cumsum(rng.normal(0, 0.01, len(days))))
        opens = np.r_[close[0], close[:-1]]
        frames.append(pd.DataFrame({"symbol": f"P{k}", "timestamps": days, "open": opens,
                                    "high": np.maximum(opens, close) * 1.01, "low": np.minimum(opens, close) * 0.99,
                                    "close": close, "volume": 1e4}))
    source = tmp_path / "panel.csv"
    pd.concat(frames).to_csv(source, index=False)
    params = {**SMOKE, "data": str(source), "data.lookback": 32, "evaluation.universe_sample_count": 2,
              "evaluation.rebalance_stride": 3}
    run_dir = tmp_path / "run"
    assert run_pipeline(ROOT / "configs" / "default.yaml", run_dir=run_dir, params=params) == 0
    universe = json.loads((run_dir / "universe.json").read_text())
    assert universe["test"]["finetuned"]["n_dates"] >= 10 and "rank_ic" in universe["validation"]["finetuned"]
    signals = pd.read_parquet(run_dir / "signals.parquet")
    assert set(signals["split"]) == {"validation", "test"} and signals.index.names == ["datetime", "instrument"]
    report = (run_dir / "report.md").read_text()
    assert "## Universe: does the model rank the names" in report and "Universe (6 symbols" in report
    shown = "\n".join(png_cells(run_dir / "03_diagnostics.ipynb"))
    for name in ("cumulative", "ic_by_horizon", "quantiles", "ic_series", "turnover"):
        assert f'universe_figure(universe, "{name}"' in shown, f"{name} is not shown inline"
        assert (run_dir / "figures" / f"03_universe_{name}.png").is_file()
