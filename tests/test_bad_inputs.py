"""Bad inputs, category by category, as a break-it review feeds them to the command line: every one must
end in an `error: ...` line (exit 2 for a mistake in the call, 1 for a run that failed), never in a
traceback or an exit 0, and a refused pipeline call must leave no run folder behind.

The categories are the ones of issue 20's count (CSV, forecast arguments, tampered runs, compare, YAML,
strategy values, phase values, evaluation values, resume changes); `pytest tests/test_bad_inputs.py -q`
reports how many are handled well.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import DATA

from kronos_kit.__main__ import main
from kronos_kit.config import KitConfig
from kronos_kit.runs import RunDir, save_json

CSV = str(DATA / "ashare_5min_sample.csv")
HEADER = "timestamps,open,high,low,close,volume"
GOOD_ROWS = [f"2024-01-{d:02d} 10:00:00,10,11,9,10.5,100" for d in range(1, 29)]
# a fast pipeline call on the sample: stops at the first check that fails, before anything is trained
# (tiny steps, so that a kit which let a bad value through would fail fast instead of training for minutes)
PIPELINE = ["-p", f"data={CSV}", "-p", "data.symbol=A", "-p", "data.lookback=30", "-p", "data.predict=5",
            "-p", "tokenizer_steps=1", "-p", "predictor_steps=1", "-p", "predictor.skill_origins=2",
            "-p", "tokenizer.batch_size=8", "-p", "predictor.batch_size=8"]


def _expect_error(capsys, argv: list[str], code: int = 2) -> str:
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, f"exit {got}, wanted {code}; stderr: {err[-600:]}"
    assert "error: " in err and "Traceback" not in err, err[-600:]
    return err


def _no_folder(path: Path) -> None:
    assert not path.exists() or not any(p.name != ".lock" for p in path.iterdir()), sorted(path.iterdir())


# ---------------------------------------------------------------------------------------------
# CSV


CSV_CASES = {
    "no file": None,
    "empty file": "",
    "header only": HEADER + "\n",
    "text price": HEADER + "\n" + "\n".join(GOOD_ROWS[:-1] + ["2024-01-28 10:00:00,ten,11,9,10.5,100"]),
    "negative price": HEADER + "\n" + "\n".join(GOOD_ROWS[:-1] + ["2024-01-28 10:00:00,-1,11,9,10.5,100"]),
    "NaN close": HEADER + "\n" + "\n".join(GOOD_ROWS[:-1] + ["2024-01-28 10:00:00,10,11,9,,100"]),
    "inf volume": HEADER + "\n" + "\n".join(GOOD_ROWS[:-1] + ["2024-01-28 10:00:00,10,11,9,10.5,inf"]),
    "price near 1e303": HEADER + "\n" + "\n".join(GOOD_ROWS[:-1] + ["2024-01-28 10:00:00,1e303,1e303,1e303,1e303,1"]),
    "timestamp after 2262": HEADER + "\n" + "\n".join(GOOD_ROWS[:-1] + ["2300-01-28 10:00:00,10,11,9,10.5,100"]),
    "unparseable time": HEADER + "\n" + "\n".join(GOOD_ROWS[:-1] + ["yesterday,10,11,9,10.5,100"]),
    "duplicate time": HEADER + "\n" + "\n".join(GOOD_ROWS + [GOOD_ROWS[-1]]),
    "no close column": "timestamps,open,high,low,volume\n2024-01-01,1,2,0.5,3\n",
    "mixed zones": HEADER + "\n2024-01-01T10:00:00+08:00,10,11,9,10.5,100\n2024-01-02T10:00:00Z,10,11,9,10.5,100\n",
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv_is_an_error_naming_the_file(case, tmp_path, capsys):
    path = tmp_path / "bars.csv"
    if CSV_CASES[case] is not None:
        path.write_text(CSV_CASES[case])
    err = _expect_error(capsys, ["forecast", "--tokenizer", "embedded:base/tokenizer", "--predictor",
                                 "embedded:base/predictor", "--data", str(path), "--horizon", "2",
                                 "--out", str(tmp_path / "out.csv")])
    assert "bars.csv" in err
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------------------------------------
# forecast arguments


FORECAST_CASES = {
    "threads 0": ["--threads", "0"],
    "max-context 0": ["--max-context", "0"],
    "max-context 1": ["--max-context", "1"],
    "quantiles comma": ["--quantiles", ","],
    "quantiles text": ["--quantiles", "low,high"],
    "quantile above 1": ["--quantiles", "0.5,1.5"],
    "samples 0": ["--samples", "0"],
    "horizon 0": ["--horizon", "0"],
    "temperature negative": ["--temperature", "-1"],
    "top-p 0": ["--top-p", "0"],
    "device cuda without CUDA": ["--device", "cuda:7"],
    "device nonsense": ["--device", "gpu0"],
    "out is a folder": ["--out", "{tmp}"],
    "only a tokenizer": ["--predictor", None],
    "missing checkpoint folder": ["--predictor", "{tmp}/nope/model"],
}


@pytest.mark.parametrize("case", list(FORECAST_CASES))
def test_bad_forecast_arguments_are_refused_before_forecasting(case, tmp_path, capsys):
    args = {"--tokenizer": "embedded:base/tokenizer", "--predictor": "embedded:base/predictor", "--data": CSV,
            "--symbol": "A", "--horizon": "2", "--out": str(tmp_path / "out.csv"), "--samples": "2"}
    flag, value = FORECAST_CASES[case]
    if value is None:
        args.pop(flag)
    else:
        args[flag] = value.format(tmp=tmp_path)
    _expect_error(capsys, ["forecast", *(w for kv in args.items() for w in kv)])
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------------------------------------
# tampered runs


def _tamper(rd: RunDir, case: str) -> None:
    if case == "config.yaml deleted":
        rd.config.unlink()
    elif case == "config.yaml not YAML":
        rd.config.write_text("data: [unclosed\n")
    elif case == "config.yaml a list":
        rd.config.write_text("- 1\n- 2\n")
    elif case == "config.yaml python tag":
        rd.config.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    elif case == "config.yaml unknown field":
        rd.config.write_text(rd.config.read_text() + "surprise: 1\n")
    elif case == "promoted.json broken":
        rd.promoted.write_text("{not json")
    elif case == "predictor weights replaced":
        (rd.checkpoint("predictor") / "model.safetensors").write_bytes(b"not safetensors")
    elif case == "predictor config not JSON":
        (rd.checkpoint("predictor") / "config.json").write_text("{")
    elif case == "tokenizer folder deleted":
        shutil.rmtree(rd.checkpoint("tokenizer"))


TAMPER_CASES = ["config.yaml deleted", "config.yaml not YAML", "config.yaml a list", "config.yaml python tag",
                "config.yaml unknown field", "promoted.json broken", "predictor weights replaced",
                "predictor config not JSON", "tokenizer folder deleted"]


@pytest.mark.parametrize("case", TAMPER_CASES)
def test_forecast_refuses_a_tampered_run(case, tmp_path, tiny_run, capsys):
    rd = RunDir(tiny_run)
    _tamper(rd, case)
    _expect_error(capsys, ["forecast", "--run", str(tiny_run), "--data", CSV, "--symbol", "A", "--horizon", "2",
                           "--samples", "2", "--out", str(tmp_path / "out.csv")])
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------------------------------------
# compare


COMPARE_CASES = {
    "gate without passed": ("gate", {"metrics": {}}),
    "gate a list": ("gate", [1, 2]),
    "codebook without s1": ("codebook_after", {"s2": {"usage": 0.1}}),
    "metrics broken JSON": ("metrics_json", "{"),
    "config.yaml not YAML": ("config", "a: [b"),
    "config.yaml a list": ("config", "- 1\n"),
    "not a run folder": (None, None),
}


@pytest.mark.parametrize("case", list(COMPARE_CASES))
def test_compare_refuses_malformed_run_files(case, tmp_path, tiny_run, capsys):
    rd = RunDir(tiny_run)
    attr, content = COMPARE_CASES[case]
    target = tiny_run
    if attr is None:
        target = tmp_path / "empty"
        target.mkdir()
    elif isinstance(content, str):
        getattr(rd, attr).write_text(content)
    else:
        save_json(getattr(rd, attr), content)
    _expect_error(capsys, ["compare", str(target), str(tiny_run)])


# ---------------------------------------------------------------------------------------------
# YAML configs (pipeline --config)


YAML_CASES = {
    "syntax error": "data: [unclosed\n",
    "top-level list": "- seed: 1\n",
    "python tag": "seed: !!python/object/apply:os.system ['echo hacked']\n",
    "unknown section": "tokeniser:\n  lr: 1\n",
    "unknown key": "tokenizer:\n  learning_rate: 1\n",
    "section not a mapping": "tokenizer: 3\n",
    "text for a number": "seed: one\n",
    "bool for a number": "tokenizer:\n  max_steps: true\n",
    "name with a slash": "name: a/b\n",
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_malformed_yaml_config_is_an_error_naming_the_file(case, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(YAML_CASES[case])
    err = _expect_error(capsys, ["pipeline", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    assert "bad.yaml" in err or case in ("name with a slash", "text for a number", "bool for a number")
    _no_folder(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# config values: strategy, phase, evaluation (all refused before a run folder exists)


STRATEGY_CASES = {
    "unknown strategy": "predictor.strategy=adapter",
    "lora rank 0": "predictor.lora_rank=0",
    "lora rank 100000": "predictor.lora_rank=100000",
    "lora alpha 0": "predictor.lora_alpha=0",
    "lora dropout 1": "predictor.lora_dropout=1",
    "lora unknown target": "predictor.lora_targets=[q_proj,fc9]",
    "lora targets a string": "predictor.lora_targets=q_proj",
    "l2sp negative": "predictor.l2sp_strength=-1",
    "l2sp nan": "predictor.l2sp_strength=.nan",
    "trainable empty": "predictor.trainable=[]",
    "trainable a string": "predictor.trainable=head",
    "trainable with full": "tokenizer.trainable=[head]",
    "freeze unknown group": "tokenizer.strategy=freeze tokenizer.trainable=[heads]",
    "freeze layer out of range": "predictor.strategy=freeze predictor.trainable=[layers.99]",
    "lora rank above the layer width": "predictor.strategy=lora predictor.lora_rank=1000",
}
PHASE_CASES = {
    "grad_clip negative": "tokenizer.grad_clip=-3",
    "grad_clip zero": "predictor.grad_clip=0",
    "grad_clip inf": "tokenizer.grad_clip=.inf",
    "lr zero": "tokenizer.lr=0",
    "lr nan": "predictor.lr=.nan",
    "patience zero": "tokenizer.patience=0",
    "patience negative": "predictor.patience=-2",
    "max_steps zero": "tokenizer.max_steps=0",
    "batch_size zero": "predictor.batch_size=0",
    "epochs zero": "tokenizer.epochs=0",
    "eval_every zero": "tokenizer.eval_every=0",
    "max_val_batches zero": "tokenizer.max_val_batches=0",
    "nonfinite_grad typo": "tokenizer.nonfinite_grad=ignore",
    "select_metric typo": "predictor.select_metric=val_mse",
    "skill_paths zero": "predictor.skill_paths=0",
    "batch above the data": "tokenizer.batch_size=100000",
    "device cuda without CUDA": "device=cuda:7",
    "threads zero": "threads=0",
    "DEFAULT_TRAINABLE": "tokenizer.DEFAULT_TRAINABLE=[head]",
}
EVALUATION_CASES = {
    "temperature 0": "evaluation.temperature=0",
    "temperature negative": "evaluation.temperature=-1",
    "top_p 0": "evaluation.top_p=0",
    "top_p above 1": "evaluation.top_p=1.5",
    "top_k negative": "evaluation.top_k=-1",
    "stride 0": "evaluation.stride=0",
    "pred_len 0": "evaluation.pred_len=0",
    "sample_count 0": "evaluation.sample_count=0",
    "max_origins 0": "evaluation.max_origins=0",
    "val_origins 0": "evaluation.val_origins=0",
    "max_context 1": "evaluation.max_context=1",
    "calibration grid nan": "evaluation.calibration_temperatures=[1.0,.nan]",
    "calibration grid true": "evaluation.calibration_temperatures=[true]",
    "calibration grid empty": "evaluation.calibration_top_ps=[]",
    "calibration top_p 0": "evaluation.calibration_top_ps=[0]",
    "ensemble method typo": "evaluation.ensemble_methods=[stacking]",
    "ensemble members empty": "evaluation.ensemble_members=[]",
    "ensemble member persistence": "evaluation.ensemble_members=[persistence]",
    "ensemble member twice": "evaluation.ensemble_members=[garch_rw,garch_rw]",
    "tails not true or false": "evaluation.tails=maybe",
    "promotion_level 0": "evaluation.promotion_level=0",
    "promotion_level above 1": "evaluation.promotion_level=1.5",
    "pred_len above the validation split": "evaluation.pred_len=5000",
    "skill horizon above the validation split": "predictor.skill_horizon=5000",
    "promote_on unknown": "evaluation.promote_on=sharpe",
    "promote on RankIC without a panel": "evaluation.promote_on=rank_ic",
    "signal unknown": "evaluation.signal=median",
    "rebalance_stride 0": "evaluation.rebalance_stride=0",
    "universe_sample_count 0": "evaluation.universe_sample_count=0",
    "n_quantiles 1": "evaluation.n_quantiles=1",
    "universe_min_symbols below n_quantiles": "evaluation.universe_min_symbols=3",
    "topk 0": "evaluation.topk=0",
    "n_drop 0": "evaluation.n_drop=0",
    "hold_bars 0": "evaluation.hold_bars=0",
    "buy cost negative": "evaluation.buy_cost_bps=-1",
    "sell cost nan": "evaluation.sell_cost_bps=.nan",
    "account 0": "evaluation.account=0",
    "ratio_split unknown": "data.ratio_split=dates",
}


def _pipeline_refuses(capsys, tmp_path: Path, words: str) -> str:
    params = [w for word in words.split() for w in ("-p", word)]
    err = _expect_error(capsys, ["pipeline", "--run-dir", str(tmp_path / "run"), *PIPELINE, *params])
    _no_folder(tmp_path / "run")
    return err


@pytest.mark.parametrize("case", list(STRATEGY_CASES))
def test_bad_strategy_values_are_refused_before_the_run(case, tmp_path, capsys):
    _pipeline_refuses(capsys, tmp_path, STRATEGY_CASES[case])


@pytest.mark.parametrize("case", list(PHASE_CASES))
def test_bad_phase_values_are_refused_before_the_run(case, tmp_path, capsys):
    _pipeline_refuses(capsys, tmp_path, PHASE_CASES[case])


@pytest.mark.parametrize("case", list(EVALUATION_CASES))
def test_bad_evaluation_values_are_refused_before_the_run(case, tmp_path, capsys):
    _pipeline_refuses(capsys, tmp_path, EVALUATION_CASES[case])


@pytest.mark.parametrize("case", ["grad_clip negative", "patience zero", "lr zero"])
def test_bad_phase_values_are_refused_by_train_too(case, tmp_path, capsys):
    _expect_error(capsys, ["train", "tokenizer", "--run-dir", str(tmp_path / "run"), PHASE_CASES[case]])
    _no_folder(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# resume changes


SMALL = ["data.source=" + CSV, "data.symbol=A", "data.lookback=30", "data.predict=5", "data.stride=2",
         "tokenizer.batch_size=16", "tokenizer.max_steps=4", "tokenizer.eval_every=2", "tokenizer.max_val_batches=2"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run folder whose tokenizer phase trained 4 steps with the `train` command."""
    run = tmp_path_factory.mktemp("trained")
    assert main(["train", "tokenizer", "--run-dir", str(run), *SMALL]) == 0
    return run


RESUME_CASES = {
    "strategy to lora": ["tokenizer.strategy=lora"],
    "strategy to lora, resume_changed": ["tokenizer.strategy=lora", "tokenizer.resume_changed=true"],
    "strategy to freeze, resume_changed": ["tokenizer.strategy=freeze", "tokenizer.trainable=[head]",
                                           "tokenizer.resume_changed=true"],
    "lr changed": ["tokenizer.lr=1e-3"],
    "seed changed": ["seed=5"],
    "lookback changed": ["data.lookback=40"],
    "fresh start over the finished phase": None,
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_changes_are_refused(case, trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    before = (RunDir(run).checkpoint("tokenizer") / "model.safetensors").read_bytes()
    extra = RESUME_CASES[case]
    resume = [] if extra is None else ["--resume"]
    err = _expect_error(capsys, ["train", "tokenizer", "--run-dir", str(run), *resume, *SMALL, *(extra or [])])
    assert "Missing key" not in err
    assert (RunDir(run).checkpoint("tokenizer") / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("case", ["-p changes lr", "-p changes the data", "--from 02 changes phase 1"])
def test_pipeline_resume_changes_are_refused(case, tiny_run, capsys):
    manifest = json.loads(RunDir(tiny_run).manifest.read_text())
    words = {"-p changes lr": ["--resume", "-p", "tokenizer.lr=1e-3"],
             "-p changes the data": ["--resume", "-p", "data.lookback=40"],
             "--from 02 changes phase 1": ["--from", "02", "-p", "tokenizer_steps=3"]}[case]
    _expect_error(capsys, ["pipeline", "--run-dir", str(tiny_run), *words])
    assert json.loads(RunDir(tiny_run).manifest.read_text()) == manifest
    KitConfig.from_file(RunDir(tiny_run).config)  # untouched and still valid


def test_class_constants_are_not_listed_as_settable_fields():
    from kronos_kit.config import config_fields, unknown_key_message

    assert not [f for f in config_fields() if "DEFAULT" in f]
    assert "DEFAULT_TRAINABLE" not in unknown_key_message("tokenizer.trainabl")


# ---------------------------------------------------------------------------------------------
# tampered decisions (items 3 and 4): bound to the weights they chose, sources inside the run only


def _decide(rd: RunDir, tokenizer: str, predictor: str, *, stage: str = "completed") -> None:
    """Decision files as notebook 03 writes them (bound to the chosen weights), stage 03 in the manifest."""
    from kronos_kit.binding import bind

    bound = bind({"tokenizer": str(rd.path / tokenizer), "predictor": str(rd.path / predictor)})
    save_json(rd.promoted, {"promoted": "finetuned", "tokenizer": tokenizer, "predictor": predictor,
                            "checkpoints": bound})
    save_json(rd.calibration, {"temperature": 1.0, "top_p": 1.0, "checkpoints": bound})
    manifest = json.loads(rd.manifest.read_text())
    manifest["stages"]["03"] = {"status": stage}
    save_json(rd.manifest, manifest)


def _retrained(rd: RunDir) -> None:
    """Other weights in predictor/best (as `train predictor` into the finished run, or --from 02, leaves it)."""
    import torch

    from kronos_kit.model import Kronos

    model = Kronos.from_pretrained(rd.checkpoint("predictor"))
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    shutil.rmtree(rd.checkpoint("predictor"))
    model.save_pretrained(rd.checkpoint("predictor"))


DECISION_CASES = {
    "weights retrained after the decision": lambda rd: _retrained(rd),
    "stage 03 killed (running)": lambda rd: _decide(rd, "tokenizer/best", "predictor/best", stage="running"),
    "stage 03 failed": lambda rd: _decide(rd, "tokenizer/best", "predictor/best", stage="failed"),
    "decision without hashes": lambda rd: save_json(rd.promoted, {
        "promoted": "finetuned", "tokenizer": "tokenizer/best", "predictor": "predictor/best"}),
    "calibration bound to other weights": lambda rd: save_json(rd.calibration, {
        "temperature": 1.0, "top_p": 1.0, "checkpoints": {"tokenizer": {"sha256": "0" * 64},
                                                          "predictor": {"sha256": "0" * 64}}}),
    "predictor/best missing (another run's in the cwd)": lambda rd: shutil.rmtree(rd.checkpoint("predictor")),
    "source /etc": lambda rd: _decide(rd, "tokenizer/best", "/etc"),
    "source ../../..": lambda rd: _decide(rd, "tokenizer/best", "../../.."),
    "source tiny (random init)": lambda rd: _decide(rd, "tokenizer/best", "tiny"),
    "source embedded:../..": lambda rd: _decide(rd, "tokenizer/best",
                                                "embedded:../../../kronos_kit/assets/base/predictor"),
    "source a hub id": lambda rd: _decide(rd, "tokenizer/best", "NeoQuasar/Kronos-small"),
}


@pytest.mark.parametrize("case", list(DECISION_CASES))
def test_forecast_refuses_stale_or_escaping_decisions(case, tmp_path, tiny_run, capsys, monkeypatch):
    rd = RunDir(tiny_run)
    _decide(rd, "tokenizer/best", "predictor/best")
    args = ["forecast", "--run", str(tiny_run), "--data", CSV, "--symbol", "A", "--horizon", "2", "--samples", "2",
            "--out", str(tmp_path / "out.csv")]
    assert main(args) == 0  # bound and complete: used
    assert "promoted (promoted.json)" in capsys.readouterr().out
    other = tmp_path / "cwd"  # another run's predictor/best where the command runs
    shutil.copytree(rd.path, other / "run")
    shutil.copytree(rd.checkpoint("predictor"), other / "predictor" / "best")
    monkeypatch.chdir(other)
    (tmp_path / "out.csv").unlink()
    DECISION_CASES[case](rd)
    err = _expect_error(capsys, args)
    assert "promoted.json" in err or "calibration.json" in err
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------------------------------------
# a run whose stages consumed other inputs than it holds now (issue 28, items 1-3): every reader refuses it


def _data_file(run: Path) -> Path:
    return Path(KitConfig.from_file(RunDir(run).config).data.source)


def _edit_data(run: Path) -> None:
    """One volume corrected in the run's data file, as an edit of the CSV after the stages ran."""
    lines = _data_file(run).read_text().splitlines()
    cells = lines[7].split(",")
    cells[5] = str(float(cells[5]) + 1)
    _data_file(run).write_text("\n".join([*lines[:7], ",".join(cells), *lines[8:]]) + "\n")


def _edit_config(run: Path, **changes) -> None:
    """config.yaml changed by hand (sed) after the stages ran."""
    rd = RunDir(run)
    rd.config.write_text(KitConfig.from_file(rd.config).with_overrides(changes).to_yaml())


def _edit_gate(run: Path, change) -> None:
    gate = json.loads(RunDir(run).gate.read_text())
    change(gate)
    save_json(RunDir(run).gate, gate)


def _replace_tokenizer(run: Path) -> None:
    """Other weights in tokenizer/best (copied in by hand, or trained outside the run's stage 01)."""
    import torch

    from kronos_kit.model import KronosTokenizer

    model = KronosTokenizer.from_pretrained(RunDir(run).checkpoint("tokenizer"))
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    shutil.rmtree(RunDir(run).checkpoint("tokenizer"))
    model.save_pretrained(RunDir(run).checkpoint("tokenizer"))


def _retrain_tokenizer(run: Path) -> None:
    """`train tokenizer --overwrite tokenizer.lr=0.5` into the finished run (stage 01's own code, other settings)."""
    rd = RunDir(run)
    assert main(["train", "tokenizer", "--config", str(rd.config), "--run-dir", str(run), "--overwrite",
                 "tokenizer.lr=0.5"]) == 0


def _pipeline(*words: str):
    return lambda run, out: ["pipeline", "--run-dir", str(run), *words]


def _forecast(run: Path, out: Path) -> list[str]:
    return ["forecast", "--run", str(run), "--data", CSV, "--symbol", "A", "--horizon", "2", "--samples", "2",
            "--out", str(out)]


def _train_predictor(run: Path, out: Path) -> list[str]:
    return ["train", "predictor", "--config", str(RunDir(run).config), "--run-dir", str(run), "--overwrite"]


STALE_CASES = {  # (what was done to the finished run, the call that reads it, what the error names)
    "data edited, --from 02": (_edit_data, _pipeline("--from", "02"), "the data changed since"),
    "data edited, --from 03": (_edit_data, _pipeline("--from", "03"), "the data changed since"),
    "data edited, --resume": (_edit_data, _pipeline("--resume"), "the data changed since"),
    "data edited, train predictor": (_edit_data, _train_predictor, "the data changed since"),
    "lookback edited in config.yaml, --from 03": (lambda r: _edit_config(r, **{"data.lookback": 20}),
                                                  _pipeline("--from", "03"), "data.lookback"),
    "lookback edited in config.yaml, --resume": (lambda r: _edit_config(r, **{"data.lookback": 20}),
                                                 _pipeline("--resume"), "data.lookback = 30"),
    "lookback edited in config.yaml, forecast --run": (lambda r: _edit_config(r, **{"data.lookback": 20}),
                                                       _forecast, "data.lookback = 30"),
    "lookback edited in config.yaml, compare": (lambda r: _edit_config(r, **{"data.lookback": 20}),
                                                lambda run, out: ["compare", str(run)], "data.lookback = 30"),
    "tokenizer retrained with another lr, --from 02": (_retrain_tokenizer, _pipeline("--from", "02"),
                                                       "tokenizer.lr"),
    "tokenizer/best replaced, --from 02": (_replace_tokenizer, _pipeline("--from", "02"), "tokenizer/best"),
    "tokenizer/best replaced, forecast --run": (_replace_tokenizer, _forecast, "tokenizer/best"),
    "gate says passed, its numbers fail, --from 02": (
        lambda r: _edit_gate(r, lambda g: g["metrics"].update(full_mse=0.9)), _pipeline("--from", "02"),
        "full_mse (full-decoder normalized MSE) 0.9 is above the maximum 0.2"),
    "gate thresholds loosened in the file, --from 02": (
        lambda r: _edit_gate(r, lambda g: g["thresholds"].update(max_full_mse=1e9)), _pipeline("--from", "02"),
        "other thresholds"),
    "gate of other weights, --from 02": (
        lambda r: _edit_gate(r, lambda g: g["tokenizer"].update(sha256="0" * 64)), _pipeline("--from", "02"),
        "judged"),
    "gate from before the binding, --from 02": (lambda r: _edit_gate(r, lambda g: g.pop("tokenizer")),
                                                _pipeline("--from", "02"), "does not name the tokenizer"),
    "gate deleted, --from 02": (lambda r: RunDir(r).gate.unlink(), _pipeline("--from", "02"),
                                "no reconstruction gate judged it"),
    "gate deleted, train predictor": (lambda r: RunDir(r).gate.unlink(), _train_predictor,
                                      "no reconstruction gate judged it"),
    "stage record not JSON, forecast --run": (lambda r: (r / "stages" / "01.json").write_text("{"), _forecast,
                                              "01.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(STALE_CASES))
def test_a_run_whose_stages_consumed_other_inputs_is_refused(case, recorded_run, tmp_path, capsys):
    from conftest import copy_run

    run = copy_run(recorded_run, tmp_path)
    change, call, named = STALE_CASES[case]
    change(run)
    before = {p: p.read_bytes() for p in (RunDir(run).manifest, RunDir(run).config, *(run / "stages").iterdir())}
    err = _expect_error(capsys, call(run, tmp_path / "out.csv"))
    assert named in err, err
    assert "--from 01" in err or "ignore_gate" in err or "stage 01" in err or "--from 02" in err, err
    assert {p: p.read_bytes() for p in before} == before  # nothing the run holds was rewritten
    assert not (tmp_path / "out.csv").exists()


def test_the_values_the_stages_ran_with_are_accepted_again(recorded_run, tmp_path):
    """config.yaml edited after the stages ran: --from 03 takes the value they ran with (-p), not the edit."""
    from conftest import copy_run

    from kronos_kit.pipeline import UsageError, _check_inputs, _plan

    run = copy_run(recorded_run, tmp_path)
    plan = _plan(None, run, {}, resume=False, from_stage="02", overwrite=False)
    _check_inputs(plan)  # an untouched run: every check passes
    _edit_config(run, **{"data.lookback": 20})
    with pytest.raises(UsageError, match="data.lookback: saved 30, given 20"):
        _plan(None, run, {}, resume=False, from_stage="03", overwrite=False)
    plan = _plan(None, run, {"data.lookback": 30}, resume=False, from_stage="03", overwrite=False)
    _check_inputs(plan)
    assert plan.cfg.data.lookback == 30


def test_a_resume_on_edited_data_is_refused_by_the_training_phase(tmp_path, capsys):
    """Killed in phase 1, the data edited, then --resume: the saved step would go on on other data."""
    from kronos_kit.config import apply_overrides, parse_overrides
    from kronos_kit.train import train_tokenizer

    run, data = tmp_path / "run", tmp_path / "bars.csv"
    data.write_bytes(Path(CSV).read_bytes())
    words = [*SMALL, f"data.source={data}", f"run_dir={run}", "device=cpu"]

    def killed(step, parts):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(apply_overrides(KitConfig(), parse_overrides(words)), progress=False, on_step=killed)
    state = RunDir(run).state("tokenizer").read_bytes()
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines[:-1], lines[-1].rsplit(",", 1)[0] + ",1"]) + "\n")  # one amount edited
    err = _expect_error(capsys, ["train", "tokenizer", "--resume", *words])
    assert "data.sha256" in err and "would not continue the same run" in err
    assert RunDir(run).state("tokenizer").read_bytes() == state


# calibration.json values outside any fit (issue 28, item 4; issue 26's ensemble and tail fields)


LEVELS = [0.025, 0.1, 0.5, 0.9, 0.975]
KNOTS = [-2.0, -1.0, 0.0, 1.0, 2.0]


def _conformal(target=KNOTS, floor=0.01, model=KNOTS) -> dict:
    return {"method": "conformal", "conformal": {"levels": LEVELS, "model": [list(model)], "target": [list(target)],
                                                 "floor": [floor]}}


def _handover(ensemble=None, tails=None) -> dict:
    """calibration.json's "handover" as the validation step writes it: the fit under "handover", evidence beside."""
    fit = {"ensemble": ensemble or {"method": "model", "members": ["model"], "weights": [1.0]}, "tails": tails or {}}
    return {"handover": {"handover": fit, "candidates": [], "rule": "r"}}


CALIBRATION_VALUE_CASES = {
    "scale 1e300": ({"paths": {"finetuned": {"path_calibration": {"method": "spread", "scale": 1e300}}}}, "scale"),
    "power 1000": ({"paths": {"finetuned": {"path_calibration": {"method": "spread", "power": 1000}}}}, "power"),
    "conformal floor 1e300": ({"paths": {"finetuned": {"path_calibration": _conformal(floor=1e300)}}}, "floor"),
    "conformal knots not increasing": ({"paths": {"finetuned": {"path_calibration": _conformal(
        target=[-2.0, 1.0, 0.0, 1.0, 2.0])}}}, "must not decrease"),
    "inside the bounds, inf prices": ({"paths": {"finetuned": {"path_calibration": _conformal(
        target=[-1000.0, -500.0, 0.0, 500.0, 1000.0], floor=1.0, model=[-2e-3, -1e-3, 0.0, 1e-3, 2e-3])}}},
        "not finite and > 0"),
    "ensemble weights sum to 1.8": (_handover({"method": "linear_pool", "members": ["model", "garch_rw"],
                                               "weights": [0.9, 0.9]}), "weights"),
    "ensemble member unknown": (_handover({"method": "linear_pool", "members": ["model", "oracle"],
                                           "weights": [0.5, 0.5]}), "members"),
    "tail factor 1e300": (_handover(tails={"tail": 1e300}), "'tail'"),
    "tail factor 0": (_handover(tails={"body": 0}), "'body'"),
    "handover without its fit": ({"handover": {"ensemble": {"method": "linear_pool"}}}, "'handover'"),
}


@pytest.mark.parametrize("case", list(CALIBRATION_VALUE_CASES))
def test_forecast_refuses_calibration_values_outside_any_fit(case, tmp_path, tiny_run, capsys):
    rd = RunDir(tiny_run)
    _decide(rd, "tokenizer/best", "predictor/best")
    entry, words = CALIBRATION_VALUE_CASES[case]
    bound = json.loads(rd.calibration.read_text())["checkpoints"]
    save_json(rd.calibration, {"temperature": 1.0, "top_p": 1.0, "model": "finetuned", "checkpoints": bound,
                               **entry})
    out = tmp_path / "out.csv"
    err = _expect_error(capsys, ["forecast", "--run", str(tiny_run), "--data", CSV, "--symbol", "A", "--horizon",
                                 "3", "--samples", "4", "--out", str(out)])
    assert "calibration" in err and words in err, err
    assert not out.exists()
