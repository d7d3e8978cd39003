"""The command line as a user meets it: errors are messages with exit code 2 that leave nothing behind,
run folders are named after what ran, --resume / --from check what they continue, forecast and
compare work without Python. Notebook execution is faked here (the slow tests run it for real)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import DATA

from kronos_kit.__main__ import main, run_models
from kronos_kit.binding import bind
from kronos_kit.config import KitConfig, project_root
from kronos_kit.pipeline import RUN_KIND, create_run_dir, pipeline_summary, run_name
from kronos_kit.runs import RunDir, save_json

ROOT = Path(__file__).resolve().parent.parent
CSV = str(DATA / "ashare_5min_sample.csv")


@pytest.fixture
def no_new_runs():
    """Fails the test if anything appears under <project>/runs (the default place for new runs)."""
    runs = project_root() / "runs"
    before = sorted(runs.iterdir()) if runs.is_dir() else []
    yield
    after = sorted(runs.iterdir()) if runs.is_dir() else []
    assert after == before, f"a run folder was left behind: {set(after) - set(before)}"


def pipeline(capsys, *args: str) -> tuple[int, str]:
    code = main(["pipeline", *args])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# user errors: a message, exit code 2, no folder


def test_mistyped_parameter_names_the_closest_ones(tmp_path, capsys, no_new_runs):
    code, err = pipeline(capsys, "--run-dir", str(tmp_path / "run"), "-p", "tokenizer_step=3")
    assert code == 2
    assert err.startswith("error: unknown parameter 'tokenizer_step'; did you mean 'tokenizer_steps'")
    assert "Notebook parameters: data, tokenizer_from" in err and "Config sections: data, tokenizer" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_mistyped_field_suggests_the_kits_name_first_and_lists_only_its_section(tmp_path, capsys, no_new_runs):
    """`predictor.learning_rate` once got `lora_rank` suggested before `lr`, and ~110 field names on one line."""
    code, err = pipeline(capsys, "--run-dir", str(tmp_path / "run"), "-p", "predictor.learning_rate=1e-5")
    assert code == 2 and err.startswith("error: unknown parameter 'predictor.learning_rate'; did you mean "
                                        "'predictor.lr'")
    assert "The fields of predictor: enabled, start_from" in err and "evaluation." not in err
    assert len(err.split(",")) < 45  # one section's fields, not every field of every section
    code, err = pipeline(capsys, "--run-dir", str(tmp_path / "run"), "-p", "predicter.max_step=3")
    assert "did you mean 'predictor.max_steps'" in err


def test_missing_data_path_is_the_loaders_message_and_creates_nothing(tmp_path, capsys, no_new_runs):
    code, err = pipeline(capsys, "-p", f"data={tmp_path / 'nope.csv'}")
    assert code == 2
    assert "nope.csv: no such file or folder" in err and "data.source" in err
    code, err = pipeline(capsys, "--run-dir", str(tmp_path / "run"), "-p", "data=nope.csv")
    assert code == 2 and "nope.csv: no such file or folder" in err
    assert not (tmp_path / "run").exists()


def test_an_existing_run_dir_is_refused(tmp_path, capsys, no_new_runs):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, err = pipeline(capsys, "--run-dir", str(taken), "-p", f"data={CSV}")
    assert code == 2 and "exists and is not empty; pass --resume" in err
    code, err = pipeline(capsys, "--run-dir", str(taken), "--overwrite", "-p", f"data={CSV}")
    assert code == 2 and "is not a kronos-kit run" in err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("stage", ["4", "1", "02_predictor"])
def test_a_bad_from_stage_is_refused(tmp_path, capsys, tiny_run, stage):
    code, err = pipeline(capsys, "--run-dir", str(tiny_run), "--from", stage)
    assert code == 2 and f"--from {stage!r}: not a stage; the stages are 01, 02, 03" in err


@pytest.mark.parametrize("flag", [["--resume"], ["--from", "02"]])
def test_resume_and_from_refuse_a_folder_that_is_not_a_kit_run(tmp_path, capsys, flag):
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "someone else\'s"}')
    code, err = pipeline(capsys, "--run-dir", str(other), *flag)
    assert code == 2 and "is not a kronos-kit run (no manifest.json of ours)" in err
    code, err = pipeline(capsys, "--run-dir", str(tmp_path / "missing"), *flag)
    assert code == 2 and "not found" in err
    assert not (tmp_path / "missing").exists()
    assert sorted(p.name for p in other.iterdir()) == ["manifest.json"]


def test_resume_refuses_a_parameter_that_changes_the_saved_config(tiny_run, capsys):
    code, err = pipeline(capsys, "--run-dir", str(tiny_run), "--resume", "-p", "tokenizer_steps=7")
    assert code == 2
    assert "-p changes it: tokenizer.max_steps: saved None, given 7" in err
    code, err = pipeline(capsys, "--run-dir", str(tiny_run), "--resume", "--config", "configs/default.yaml")
    assert code == 2 and "leave out --config" in err


def test_from_refuses_changes_to_earlier_stages(tiny_run, capsys):
    code, err = pipeline(capsys, "--run-dir", str(tiny_run), "--from", "02", "-p", "data=sample:sp500")
    assert code == 2 and "data.source: saved" in err and "cannot change" in err


def test_pipeline_help_lists_the_notebook_parameters(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("tokenizer_steps", "ignore_gate", "threads", "data.columns.Date=timestamps", "--resume"):
        assert name in out


# ---------------------------------------------------------------------------------------------
# what a run is called, and --resume / --from with the notebooks faked


def test_run_names_say_what_ran_and_never_collide(tmp_path):
    when = pd.Timestamp("2026-01-02 03:04:05").to_pydatetime()
    assert run_name(KitConfig(name="default"), when) == "default-nasdaq-20260102-030405"
    cfg = KitConfig(name="small").with_overrides({"data.source": "/x/My Bars.csv.gz"})
    assert run_name(cfg, when) == "small-My-Bars-20260102-030405"
    assert run_name(KitConfig().with_overrides({"data.source": "/x/folder/"}), when) == "run-folder-20260102-030405"

    made: list[Path] = []
    threads = [threading.Thread(target=lambda: made.append(create_run_dir(tmp_path, "same-second")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.name for p in made}) == 8
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["same-second", "same-second-2"]


@pytest.fixture
def fake_papermill(monkeypatch):
    """Record each notebook call instead of running it."""
    import papermill

    calls: list[dict] = []

    def execute(input_path, output_path, parameters, cwd, **kwargs):
        calls.append({"notebook": Path(input_path).name, "parameters": parameters, "cwd": cwd})
        Path(output_path).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    return calls


def test_resume_reuses_the_saved_config_and_continues_the_interrupted_stage(tiny_run, fake_papermill, capsys):
    rd = RunDir(tiny_run)
    manifest = json.loads(rd.manifest.read_text())
    manifest["stages"] = {"01": {"status": "running"}}  # as a killed pipeline leaves it
    save_json(rd.manifest, manifest)
    assert main(["pipeline", "--run-dir", str(tiny_run), "--resume"]) == 0
    assert [c["notebook"] for c in fake_papermill] == ["01_tokenizer_adaptation.ipynb", "02_predictor_finetune.ipynb",
                                                       "03_diagnostics.ipynb"]
    assert [c["parameters"]["resume"] for c in fake_papermill] == [True, False, False]
    assert {c["cwd"] for c in fake_papermill} == {str(ROOT / "notebooks")}  # as JupyterLab runs them
    used = yaml.safe_load(Path(fake_papermill[0]["parameters"]["config"]).read_text())
    assert used["data"]["source"] == CSV  # the saved data source, not the default config's sample
    assert used["run_dir"] == str(tiny_run.resolve())
    manifest = json.loads(rd.manifest.read_text())
    assert manifest["invocations"][-1]["mode"] == "resume" and manifest["stages"]["01"]["resumed"] is True
    out = capsys.readouterr().out
    assert "stage 01: 01_tokenizer_adaptation.ipynb (continuing its training)" in out
    assert "[pipeline] summary" in out and "this run" in out

    # resuming again: everything completed with unchanged inputs, nothing runs
    fake_papermill.clear()
    assert main(["pipeline", "--run-dir", str(tiny_run), "--resume", "-p", "threads=1"]) == 0
    assert fake_papermill == []
    assert "01 skipped (done before), 02 skipped (done before), 03 skipped (done before)" in capsys.readouterr().out


def test_a_new_run_is_named_after_config_and_data(tmp_path, fake_papermill, monkeypatch, capsys):
    monkeypatch.setattr("kronos_kit.pipeline.project_root", lambda: tmp_path)
    assert main(["pipeline", "--config", str(ROOT / "configs" / "default.yaml"), "-p", f"data={CSV}"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("default-ashare_5min_sample-") and (run / "manifest.json").is_file()
    assert json.loads((run / "manifest.json").read_text())["kind"] == RUN_KIND


def test_summary_has_gate_verdict_promotion_times_and_report(tiny_run):
    rd = RunDir(tiny_run)
    save_json(rd.gate, {"passed": True, "metrics": {"full_mse": 0.04, "s1_usage": 0.6},
                        "thresholds": {"max_full_mse": 0.5, "min_s1_usage": 0.2}, "reasons": []})
    save_json(rd.metrics_json, {"bottom_line": "Finetuning helped: ..."})
    # the summary reads promoted.json with its one schema (runs.Promotion), as the kit writes it
    save_json(rd.promoted, {"promoted": "finetuned", "tokenizer": "tokenizer/best", "predictor": "predictor/best",
                            "reason": "lower validation CRPS"})
    rd.report.write_text("# report")
    text = pipeline_summary(tiny_run, {"01": 41.0, "03": 30.0}, ["02"])
    assert "gate      passed (full_mse 0.04 <= 0.5 ok, s1_usage 0.6 >= 0.2 ok)" in text
    assert "verdict   Finetuning helped: ..." in text and "promoted  finetuned: lower validation CRPS" in text
    assert "01 41 s, 03 30 s, 02 skipped (done before); this run 71 s" in text
    assert f"report    {rd.report}" in text


def test_every_progress_bar_of_a_stage_reaches_the_terminal_with_its_eta(tmp_path, capsys, monkeypatch):
    """Under the pipeline a kernel's bars (runtime.tqdm) report to a file the pipeline prints: a walk-forward
    gets about a dozen lines with an ETA and a closing "done in", training validations come from the log."""
    from kronos_kit.pipeline import _StageProgress
    from kronos_kit.runtime import PROGRESS_ENV, tqdm

    bars, log = tmp_path / "progress.jsonl", tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"phase": "predictor", "kind": "eval", "step": 1, "val_loss": 9.0}) + "\n")  # earlier
    monkeypatch.setenv(PROGRESS_ENV, str(bars))
    with _StageProgress(bars, log, interval=0.01, quiet_below=0.0):
        with tqdm(total=40, desc="validation walk-forward (200 origins)", unit="batch", disable=False,
                  mininterval=0, miniters=1) as bar:
            for _ in range(40):
                bar._last_report = -1.0  # report every update: a fast loop would otherwise report once a second
                bar.update(1)
        with log.open("a") as f:
            f.write(json.dumps({"phase": "predictor", "kind": "eval", "step": 50, "val_loss": 2.2, "val_crps": 70.1,
                                "best": True}) + "\n")
    lines = capsys.readouterr().out.splitlines()
    walk = [line for line in lines if "walk-forward" in line]
    assert 8 <= len(walk) <= 13 and all(line.split()[5] == "batch" for line in walk)  # every tenth, not every batch
    assert "ETA" in walk[1] and walk[1].split()[4] != "40/40" and walk[-1].split()[4:] == ["40/40", "batch", "done",
                                                                                           "in", "0", "s"]
    assert lines[-1].split() == ["predictor", "validation", "at", "step", "50:", "val_loss", "2.2", "val_crps",
                                 "70.1", "(best", "so", "far)"]
    assert "9" not in "".join(line for line in lines if "val_loss" in line).split("2.2")[0]  # only this attempt's


def test_the_training_bar_shows_the_engines_eta_with_the_validations_to_come():
    """The phase's ETA counts the remaining validations at the cost of the step-0 one, so it does not jump when
    the first validation comes (stage 01's ETA once went from 13 s to 105 s)."""
    from types import SimpleNamespace

    from kronos_kit.engine import _Clock

    clock = _Clock(step_seconds=10 * 0.1, steps=10, eval_seconds=[5.0])  # 0.1 s a step; a validation takes 5 s
    run = SimpleNamespace(state=SimpleNamespace(step=10), total_steps=150, phase=SimpleNamespace(train_set=range(3904)),
                          ctx=SimpleNamespace(world_size=1), local_batch=32,
                          cfg=SimpleNamespace(eval_every=50, grad_accum_steps=1, epochs=2))
    # validations at 50, 100, 122 (the epoch's end) and 150; 140 steps at 0.1 s
    assert clock.eta(run) == pytest.approx(140 * 0.1 + 4 * 5.0)
    run.state.step = 122
    assert clock.eta(run) == pytest.approx(28 * 0.1 + 1 * 5.0)
    assert _Clock().eta(run) is None  # nothing timed yet: no guess


def test_times_are_rounded_once():
    from kronos_kit.runtime import format_seconds

    assert format_seconds(179.6) == "3 min 00 s"  # was "2 min 60 s"
    assert [format_seconds(s) for s in (0.4, 59.5, 119.4, 125, 3725)] == ["0 s", "60 s", "119 s", "2 min 05 s",
                                                                         "1 h 02 min"]


# ---------------------------------------------------------------------------------------------
# forecast and compare


def two_symbols(tmp_path) -> Path:
    bars = pd.read_csv(CSV).tail(300)
    both = pd.concat([bars.assign(symbol="AAA"), bars.assign(symbol="BBB", close=bars.close * 1.01,
                                                             high=bars.high * 1.01)])
    path = tmp_path / "two.csv"
    both.to_csv(path, index=False)
    return path


def forecast(tmp_path, capsys, *args: str) -> tuple[pd.DataFrame, str]:
    out = tmp_path / "fc.csv"
    assert main(["forecast", *args, "--horizon", "4", "--out", str(out), "--samples", "6", "--threads", "1"]) == 0
    return pd.read_csv(out), capsys.readouterr().out


def test_forecast_command_writes_a_tidy_csv(tmp_path, tiny_run, capsys):
    table, out = forecast(tmp_path, capsys, "--run", str(tiny_run), "--data", str(two_symbols(tmp_path)))
    assert len(table) == 2 * 4 and list(table["symbol"].unique()) == ["AAA", "BBB"]
    assert list(table.columns[:3]) == ["symbol", "timestamp", "step"]
    for channel in ("open", "high", "low", "close", "volume", "amount"):
        assert {f"{channel}_mean", f"{channel}_median", f"{channel}_q0.1", f"{channel}_q0.9"} <= set(table.columns)
    assert (table["close_q0.1"] <= table["close_q0.5"]).all() and (table["close_q0.5"] <= table["close_q0.9"]).all()
    assert pd.to_datetime(table["timestamp"]).gt(pd.Timestamp("2024-08-29 11:30")).all()  # after the data's end
    assert "the run's best checkpoints" in out and str(tiny_run / "predictor" / "best") in out
    # the history is the run's data.lookback (what its models were trained and evaluated with), and says so
    assert "history: the last 90 bars of each symbol (the run's data.lookback)" in out

    # explicit checkpoints with the same history give the same forecast as the run's own pair
    pair = ("--tokenizer", str(tiny_run / "tokenizer" / "best"), "--predictor", str(tiny_run / "predictor" / "best"))
    given, _ = forecast(tmp_path, capsys, *pair, "--data", str(two_symbols(tmp_path)), "--max-context", "90")
    pd.testing.assert_frame_equal(given, table)
    longer, out = forecast(tmp_path, capsys, *pair, "--data", str(two_symbols(tmp_path)))  # 512 bars: another forecast
    assert "history: the last 512 bars" in out and not np.allclose(longer["close_mean"], table["close_mean"])


def stage_03_completed(rd: RunDir) -> None:
    """Record stage 03 (which writes the decision files) as completed in the run's manifest."""
    manifest = json.loads(rd.manifest.read_text())
    manifest["stages"]["03"] = {"status": "completed"}
    save_json(rd.manifest, manifest)


def promote_embedded_base(rd: RunDir) -> dict:
    """Write a promoted.json choosing the kit's embedded base pair, bound to its weights; the binding, for the
    calibration.json a test writes next."""
    bound = bind({"tokenizer": "embedded:base/tokenizer", "predictor": "embedded:base/predictor"})
    save_json(rd.promoted, {"promoted": "base", "tokenizer": "embedded:base/tokenizer",
                            "predictor": "embedded:base/predictor", "checkpoints": bound})
    return bound


def test_forecast_uses_the_runs_promoted_pair_and_calibrated_sampling(tmp_path, tiny_run, capsys):
    rd = RunDir(tiny_run)
    bound = promote_embedded_base(rd)
    save_json(rd.calibration, {"temperature": 1e-6, "top_p": 1.0, "checkpoints": bound})  # greedy: paths all the same
    stage_03_completed(rd)
    table, out = forecast(tmp_path, capsys, "--run", str(tiny_run), "--data", CSV, "--quantiles", "0.05,0.95")
    assert "promoted (promoted.json): tokenizer embedded:base/tokenizer" in out and "calibrated" in out
    assert len(table) == 4 and np.allclose(table["close_q0.05"], table["close_q0.95"])
    assert run_models(tiny_run)["sampling"] == {"temperature": 1e-6, "top_p": 1.0}


def test_forecast_run_applies_the_runs_path_calibration(tmp_path, tiny_run, capsys):
    rd = RunDir(tiny_run)
    bound = promote_embedded_base(rd)
    wide = {"method": "spread", "scale": 3.0, "power": 0.0, "center": 1.0, "conformal": {}}
    save_json(rd.calibration, {"temperature": 1.0, "top_p": 0.9, "model": "base",
                               "paths": {"base": {"path_calibration": wide}}, "checkpoints": bound})
    stage_03_completed(rd)
    args = ("--run", str(tiny_run), "--data", CSV, "--quantiles", "0.1,0.9")
    calibrated, out = forecast(tmp_path, capsys, *args)
    raw, out_raw = forecast(tmp_path, capsys, *args, "--uncalibrated")
    assert "path calibration: spread: k_h = 3" in out and "path calibration: none" in out_raw
    width, raw_width = (t["close_q0.9"] - t["close_q0.1"] for t in (calibrated, raw))
    assert (width > 2.5 * raw_width).all()  # three times the spread around the same median
    np.testing.assert_allclose(calibrated["volume_median"], raw["volume_median"])  # volume as sampled


def test_forecast_run_hands_over_the_ensemble_and_model_only_leaves_it_out(tmp_path, tiny_run, capsys):
    from kronos_kit.data import load_ohlcv
    from kronos_kit.data.schema import FEATURE_COLUMNS
    from kronos_kit.naive import naive_paths

    rd = RunDir(tiny_run)
    bound = promote_embedded_base(rd)
    fit = {"ensemble": {"method": "linear_pool", "members": ["model", "garch_rw", "bootstrap"],
                        "weights": [0.0, 1.0, 0.0]}, "tails": {}}
    save_json(rd.calibration, {"temperature": 1.0, "top_p": 0.9, "model": "base", "handover": {"handover": fit},
                               "checkpoints": bound})
    save_json(rd.metrics_json, {"n_origins": 200, "table": {
        "base": {"close_crps": 80.0, "close_mae": 110.0, "coverage_80": 0.73},
        "handed_over": {"close_crps": 79.0, "close_mae": 109.0, "coverage_80": 0.8},
        "bootstrap": {"close_crps": 81.0}}, "paired_comparisons": [], "handover_comparisons": [
            {"model": "handed_over", "other": "bootstrap", "metric": "close_crps", "verdict": "better"}]})
    stage_03_completed(rd)
    args = ("--run", str(tiny_run), "--data", CSV, "--quantiles", "0.1,0.9")
    handed, out = forecast(tmp_path, capsys, *args)
    alone, out_alone = forecast(tmp_path, capsys, *args, "--model-only")
    assert "handed over: garch_rw alone: base has weight 0; tails: none (fitted on validation" in out
    assert "handed over: the model alone (--model-only)" in out_alone
    # how far to trust it: the test record of what the CSV holds (the handed-over forecast, or the model alone)
    assert "model handed_over" in out and "close CRPS 79 vs the best naive forecast (bootstrap) 81: 2.5% lower, " \
        "better in the run's paired test" in out
    assert "model base" in out_alone and "close CRPS 80 vs" in out_alone
    # the naive member comes from the series' own last 90 bars (the run's lookback) and the seed: the run folder
    # alone reproduces the forecast
    history = load_ohlcv(CSV).tail(90)[list(FEATURE_COLUMNS)].to_numpy(np.float64)[None]
    garch = naive_paths(("garch_rw",), history, 4, 6, np.random.default_rng(0))["garch_rw"][0, ..., 3]  # (S, H)
    np.testing.assert_allclose(handed["close_q0.9"], np.quantile(garch, 0.9, axis=0), rtol=1e-9)
    assert not np.allclose(handed["close_q0.9"], alone["close_q0.9"])
    np.testing.assert_allclose(handed["volume_median"], alone["volume_median"])  # volume: the model's paths
    err_args = ["forecast", "--tokenizer", "embedded:base/tokenizer", "--predictor", "embedded:base/predictor",
                "--data", CSV, "--horizon", "2", "--out", str(tmp_path / "x.csv"), "--model-only"]
    assert main(err_args) == 2 and "--model-only goes with --run" in capsys.readouterr().err


def test_forecast_says_how_far_to_trust_it_and_when_its_median_is_no_change(tmp_path, tiny_run, capsys):
    """The CSV's median was flat at the last close with no word, and nothing said how the model did on test: the
    command prints the run's test evidence and what the median is, and writes both beside the CSV."""
    rd = RunDir(tiny_run)
    bound = promote_embedded_base(rd)
    centered = {"method": "spread_center", "scale": 1.5, "power": 0.0, "center": 0.0, "conformal": {}}
    save_json(rd.calibration, {"temperature": 1.0, "top_p": 0.9, "model": "base",
                               "paths": {"base": {"path_calibration": centered}}, "checkpoints": bound})
    save_json(rd.metrics_json, {"n_origins": 200, "bottom_line": "Finetuning made no detectable difference: ...",
                                "table": {"base": {"close_crps": 80.0, "close_mae": 110.0, "coverage_80": 0.73},
                                          "persistence": {"close_crps": 111.0, "close_mae": 111.0},
                                          "garch_rw": {"close_crps": 82.0}, "bootstrap": {"close_crps": 81.0}},
                                "paired_comparisons": []})
    stage_03_completed(rd)
    table, out = forecast(tmp_path, capsys, "--run", str(tiny_run), "--data", CSV)
    last_close = pd.read_csv(CSV)["close"].iloc[-1]
    np.testing.assert_allclose(table["close_median"], last_close, rtol=1e-4)  # flat at the last close ...
    assert "point forecast (the *_median columns): no change: the path calibration" in out  # ... and it says so
    assert "close CRPS 80 vs the best naive forecast (bootstrap) 81: 1.2% lower, untested" in out
    assert "its 80% interval covered 0.73 of the realized closes (nominal 0.80)" in out
    assert "the run's verdict: Finetuning made no detectable difference" in out and "candles: every row" in out
    about = json.loads((tmp_path / "fc.about.json").read_text())
    assert about["test_evidence"]["best_naive"] == "bootstrap" and about["test_evidence"]["model"] == "base"
    assert about["forecast"]["point_forecast"].startswith("no change") and about["chosen"].startswith("promoted")
    # explicit checkpoints: nothing says how they did, and the command says that
    pair = ("--tokenizer", "embedded:base/tokenizer", "--predictor", "embedded:base/predictor")
    _, out = forecast(tmp_path, capsys, *pair, "--data", CSV)
    assert "how far to trust it: unknown (explicit checkpoints" in out


def test_forecast_resolves_promoted_sources_inside_the_run(tmp_path, tiny_run, capsys, monkeypatch):
    """The validation step writes sources relative to the run (`predictor/best`): they load from the run
    folder wherever the command runs, never as hub ids."""
    rd = RunDir(tiny_run)
    bound = bind({"tokenizer": str(rd.checkpoint("tokenizer")), "predictor": str(rd.checkpoint("predictor"))})
    save_json(rd.promoted, {"promoted": "finetuned", "tokenizer": "tokenizer/best", "predictor": "predictor/best",
                            "checkpoints": bound})
    stage_03_completed(rd)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    table, out = forecast(tmp_path, capsys, "--run", str(tiny_run), "--data", CSV)
    assert f"tokenizer {tiny_run / 'tokenizer' / 'best'}" in out and len(table) == 4


def test_forecast_usage_errors_exit_2(tmp_path, tiny_run, capsys):
    out = str(tmp_path / "x.csv")
    assert main(["forecast", "--data", CSV, "--horizon", "2", "--out", out]) == 2
    assert "give either --run RUN_DIR, or --tokenizer and --predictor" in capsys.readouterr().err
    assert main(["forecast", "--run", str(tiny_run), "--data", "missing.csv", "--horizon", "2", "--out", out]) == 2
    assert "missing.csv: no such file or folder" in capsys.readouterr().err
    assert not Path(out).exists()


def test_compare_runs_table_and_command(tmp_path, tiny_run, capsys):
    import shutil

    from kronos_kit.compare import compare_runs

    other = tmp_path / "other-run"
    shutil.copytree(tiny_run, other)
    cfg = KitConfig.from_file(RunDir(other).config).with_overrides({"seed": 3, "predictor.lr": 1e-5})
    RunDir(other).config.write_text(cfg.to_yaml())
    for path, crps, limit in ((tiny_run, 0.5, 0.2), (other, 0.4, 0.05)):  # the gate is decided by its numbers
        rd = RunDir(path)
        save_json(rd.gate, {"passed": True, "metrics": {"full_mse": 0.1}, "thresholds": {"max_full_mse": limit},
                            "reasons": []})
        save_json(rd.codebook_after, {"s1": {"usage": 0.6}, "s2": {"usage": 0.3}})
        save_json(rd.metrics_json, {"bottom_line": f"CRPS {crps}", "table": {
            "finetuned": {"close_crps": crps, "close_mae": 1.0}, "base": {"close_crps": 0.45}}})
    table = compare_runs([tiny_run, other])
    assert list(table.index) == [tiny_run.name, "other-run"]
    assert table.attrs["config_fields"] == ["seed", "predictor.lr"]  # run_dir differs by construction
    assert list(table["seed"]) == [0, 3] and list(table["gate"]) == ["passed", "FAILED"]
    assert list(table["finetuned close_crps"]) == [0.5, 0.4] and list(table["s1 usage after"]) == [0.6, 0.6]

    assert main(["compare", str(tiny_run), str(other), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"| | {tiny_run.name} | other-run |") and "| finetuned close_crps | 0.5 | 0.4 |" in out
    assert pd.read_csv(tmp_path / "cmp" / "comparison.csv", index_col=0).shape == table.shape
    assert "Config fields that differ: seed, predictor.lr" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
