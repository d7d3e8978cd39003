"""Finetune strategies through the real engine: each trains only what it says, resumes exactly, and phase 2
selects by forecast skill against the base model's level."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_train import smoke_config

from kronos_kit.config import KitConfig
from kronos_kit.data import load_data
from kronos_kit.evaluate import evaluate_models
from kronos_kit.forecast import ForecastSkill, load_run_forecaster
from kronos_kit.model import Kronos, KronosTokenizer, select_trainable, weights_hash
from kronos_kit.runs import read_metrics
from kronos_kit.train import train_predictor, train_tokenizer

# a short phase with a small skill probe: 6 steps, validations at 3 and 6
SHORT = {"predictor.max_steps": 6, "predictor.eval_every": 3, "tokenizer.max_steps": 6, "tokenizer.eval_every": 3,
         "predictor.skill_origins": 4, "predictor.skill_paths": 2, "predictor.skill_horizon": 5}
LORA = {"lora_rank": 2, "lora_alpha": 4.0, "lora_targets": ["q_proj", "v_proj", "w2"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(smoke_config(tmp_path_factory.mktemp("data-run")))


def phase_config(run_dir, phase: str, strategy: str, **extra) -> KitConfig:
    settings = {f"{phase}.strategy": strategy, **{f"{phase}.{k}": v for k, v in LORA.items()}}
    if phase == "predictor":
        settings["tokenizer.enabled"] = False
    return smoke_config(run_dir, **{**SHORT, **settings, **extra})


def start_model(cfg: KitConfig, phase: str):
    if phase == "predictor":
        return Kronos.from_pretrained(cfg.predictor.start_from, seed=cfg.seed)
    return KronosTokenizer.from_pretrained(cfg.tokenizer.start_from, seed=cfg.seed)


def train(cfg: KitConfig, phase: str, data, **kwargs):
    return (train_predictor if phase == "predictor" else train_tokenizer)(cfg, data=data, progress=False, **kwargs)


def saved_state(run_dir, phase: str, kind: str = "best") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / phase / kind / "model.safetensors"))


@pytest.mark.parametrize("phase,groups", [("predictor", None), ("predictor", ["head", "layers.0"]),
                                          ("tokenizer", None)])
def test_freeze_trains_only_the_chosen_groups(tmp_path, data, phase, groups):
    cfg = phase_config(tmp_path, phase, "freeze", **({f"{phase}.trainable": groups} if groups else {}))
    train(cfg, phase, data)
    start = start_model(cfg, phase)
    chosen = set(select_trainable(start, getattr(cfg, phase).trainable_groups))
    for kind in ("best", "last"):
        saved = saved_state(tmp_path, phase, kind)
        assert set(saved) == set(start.state_dict())  # the reference layout
        for name, value in start.state_dict().items():
            if name not in chosen:
                assert torch.equal(saved[name], value), f"{kind}: frozen {name} changed"
    last = saved_state(tmp_path, phase, "last")
    assert any(not torch.equal(last[n], start.state_dict()[n]) for n in chosen), "nothing trained"


@pytest.mark.parametrize("phase", ["predictor", "tokenizer"])
def test_lora_checkpoints_are_base_plus_scaled_ba_and_load_plainly(tmp_path, data, phase):
    cfg = phase_config(tmp_path, phase, "lora")
    train(cfg, phase, data)
    start = start_model(cfg, phase).state_dict()
    cls = Kronos if phase == "predictor" else KronosTokenizer
    for kind in ("best", "last"):
        folder = tmp_path / phase / kind
        assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "adapter.safetensors",
                                                      "adapter_config.json"}
        saved, adapter = saved_state(tmp_path, phase, kind), load_file(str(folder / "adapter.safetensors"))
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["rank"], config["alpha"], config["targets"]) == (2, 4.0, ["q_proj", "v_proj", "w2"])
        adapted = {k.removesuffix(".lora_a") for k in adapter if k.endswith(".lora_a")}
        assert adapted and all(k.rsplit(".", 1)[-1] in LORA["lora_targets"] for k in adapted)
        for name, value in start.items():
            prefix = name.removesuffix(".weight")
            if prefix in adapted:
                a, b = adapter[f"{prefix}.lora_a"], adapter[f"{prefix}.lora_b"]
                assert torch.equal(saved[name], value + (4.0 / 2) * (b @ a)), name
            else:
                assert torch.equal(saved[name], value), f"{kind}: {name} outside the adapters changed"
        loaded = cls.from_pretrained(folder).state_dict()  # plain layout: loads with no adapter code
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(adapter[k].abs().sum() > 0 for k in adapter if k.endswith(".lora_b")), "the adapters did not train"


def test_l2sp_penalty_is_logged_and_zero_at_the_start(tmp_path, data):
    cfg = phase_config(tmp_path, "predictor", "l2sp", **{"predictor.log_every": 1, "predictor.l2sp_strength": 10.0})
    parts = []
    train(cfg, "predictor", data, on_step=lambda step, p: parts.append(p))
    assert parts[0]["l2sp"] == 0.0  # step 1's loss is computed at the starting weights
    assert all(p["l2sp"] > 0 for p in parts[1:])
    assert all(p["loss"] == pytest.approx(p["task_loss"] + p["l2sp"], rel=1e-6) for p in parts)
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl", "predictor") if r["kind"] == "train"]
    assert [r["l2sp"] for r in logged] == [p["l2sp"] for p in parts]


@pytest.mark.parametrize("phase,strategy", [("predictor", "freeze"), ("predictor", "lora"), ("predictor", "l2sp"),
                                            ("tokenizer", "lora")])
def test_each_strategy_resumes_exactly(tmp_path, data, phase, strategy):
    extra = {f"{phase}.max_steps": 8, f"{phase}.eval_every": 4, f"{phase}.lora_dropout": 0.1}

    def run(run_dir, interrupt_at=None):
        cfg = phase_config(run_dir, phase, strategy, **extra)

        def on_step(step, parts):
            if step == interrupt_at:
                raise KeyboardInterrupt

        try:
            train(cfg, phase, data, on_step=on_step)
        except KeyboardInterrupt:
            train(cfg, phase, data, resume=True)
        names = ("model.safetensors", "adapter.safetensors")
        files = [run_dir / phase / k / f for k in ("last", "best") for f in names]
        return [f.read_bytes() if f.exists() else None for f in files]

    assert run(tmp_path / "whole") == run(tmp_path / "killed", interrupt_at=6)


def test_resume_refuses_another_strategy(tmp_path, data):
    cfg = phase_config(tmp_path, "predictor", "freeze")
    train(cfg, "predictor", data)
    other = phase_config(tmp_path, "predictor", "lora")
    with pytest.raises(ValueError, match=r"predictor.strategy: 'freeze' -> 'lora'"):
        train(other, "predictor", data, resume=True)


def test_selection_by_forecast_skill_with_the_base_level(tmp_path, data):
    cfg = phase_config(tmp_path, "predictor", "full", **{"predictor.select_metric": "val_crps"})
    result = train(cfg, "predictor", data)
    records = read_metrics(tmp_path / "metrics.jsonl", "predictor")
    reference = [r for r in records if r["kind"] == "reference"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(reference) == 1 and reference[0]["step"] == 0 and records[0] is reference[0]
    assert all({"val_loss", "val_crps", "val_mae"} <= set(r) for r in evals)
    # `best` follows val_crps: flags and the saved checkpoint
    running, flags = float("inf"), []
    for r in evals:
        flags.append(r["val_crps"] < running)
        running = min(running, r["val_crps"])
    assert [r["best"] for r in evals] == flags and result.best_metric == running
    # the reference is the base model on the same origins, and the probe scores `best` to its logged value
    skill = ForecastSkill(data.splits.val, lookback=cfg.data.lookback, pred_len=5, stride=cfg.predictor.skill_stride,
                          max_origins=4, sample_count=2, seed=cfg.seed)
    tokenizer = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from)
    assert skill(start_model(cfg, "predictor"), tokenizer)["val_crps"] == reference[0]["val_crps"]
    assert skill(Kronos.from_pretrained(result.best_dir), tokenizer)["val_crps"] == pytest.approx(running, rel=1e-6)


def test_forecast_skill_equals_the_walk_forward_evaluation(data):
    model, tokenizer = Kronos.from_pretrained("tiny"), KronosTokenizer.from_pretrained("tiny")
    settings = {"lookback": 30, "pred_len": 5, "stride": 7, "max_origins": 40, "sample_count": 3}
    skill = ForecastSkill(data.splits.val, **settings, seed=4, batch_size=16)
    result = evaluate_models(data.splits.val, {"m": (model, tokenizer)}, **settings, seed=4, baselines=(),
                             batch_size=16, progress=False)
    scores = skill(model, tokenizer)
    assert skill.n_origins == result.n_origins > 16  # more than one batch
    assert scores["val_crps"] == pytest.approx(result.table.loc["m", "close_crps"], rel=1e-12)
    assert scores["val_mae"] == pytest.approx(result.table.loc["m", "close_mae"], rel=1e-12)


@pytest.mark.parametrize("values,message", [
    ({"predictor.strategy": "adapters"}, "strategy must be one of"),
    ({"predictor.trainable": "head"}, "trainable must be a non-empty list"),
    ({"tokenizer.lora_rank": 0}, "lora_rank must be a whole number"),
    ({"predictor.lora_alpha": -1.0}, "lora_alpha must be a positive"),
    ({"predictor.lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"predictor.lora_targets": ["q_proj", "gate"]}, "lora_targets must be a non-empty list drawn from"),
    ({"predictor.l2sp_strength": -0.1}, "l2sp_strength must be a finite number >= 0"),
    ({"predictor.select_metric": "val_mae"}, "select_metric must be one of"),
    ({"predictor.select_metric": "val_crps", "predictor.skill_origins": 0}, "needs the forecast-skill probe"),
    ({"evaluation.calibration_top_ps": [0.9, 1.5]}, r"calibration_top_ps must be a non-empty list of numbers in"),
    ({"evaluation.calibration_temperatures": []}, "calibration_temperatures must be a non-empty list"),
])
def test_strategy_settings_are_validated(values, message):
    with pytest.raises(ValueError, match=message):
        KitConfig().with_overrides(values)


def test_unknown_freeze_group_names_the_field(tmp_path, data):
    cfg = phase_config(tmp_path, "predictor", "freeze", **{"predictor.trainable": ["heads"]})
    with pytest.raises(ValueError, match=r"predictor.trainable: unknown parameter group 'heads'"):
        train(cfg, "predictor", data)


# ------------------------------------------------------------------------------ loading a run's forecaster


def write_run(run_dir, promoted: str, calibration: dict | None):
    base, tuned = Kronos.from_pretrained("tiny", seed=0), Kronos.from_pretrained("tiny", seed=1)
    tokenizer = KronosTokenizer.from_pretrained("tiny")
    base.save_pretrained(run_dir / "base_predictor")
    tuned.save_pretrained(run_dir / "predictor" / "best")
    tokenizer.save_pretrained(run_dir / "tokenizer" / "best")
    from kronos_kit.binding import bind
    from kronos_kit.config import KitConfig

    # the run's configured base: tokenizer `tiny`, predictor the base_predictor folder
    cfg = KitConfig(run_dir=str(run_dir)).with_overrides({"predictor.start_from": str(run_dir / "base_predictor")})
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    sources = {"finetuned": ("tokenizer/best", "predictor/best"), "base": ("tiny", str(run_dir / "base_predictor"))}
    tok, pred = sources[promoted]
    bound = bind({"tokenizer": tok if tok == "tiny" else str(run_dir / tok),
                  "predictor": pred if promoted == "base" else str(run_dir / pred)})
    (run_dir / "promoted.json").write_text(json.dumps({"promoted": promoted, "tokenizer": tok, "predictor": pred,
                                                       "metric": "close_crps", "evidence": {}, "rule": "",
                                                       "reason": "", "checkpoints": bound}))
    if calibration is not None:
        (run_dir / "calibration.json").write_text(json.dumps({**calibration, "checkpoints": bound}))
    return base, tuned


@pytest.mark.parametrize("promoted", ["finetuned", "base"])
def test_load_run_forecaster_uses_promotion_and_calibration(tmp_path, data, promoted):
    base, tuned = write_run(tmp_path, promoted, {"temperature": 0.85, "top_p": 1.0, "model": promoted})
    rf = load_run_forecaster(tmp_path)
    assert (rf.promoted, rf.calibrated, rf.sampling) == (promoted, True, {"temperature": 0.85, "top_p": 1.0})
    expected = tuned if promoted == "finetuned" else base
    assert weights_hash(rf.predictor.model) == weights_hash(expected)
    assert weights_hash(rf.predictor.tokenizer) == weights_hash(KronosTokenizer.from_pretrained("tiny"))
    frame = data.splits.val[data.splits.val["timestamps"] < data.splits.val["timestamps"].iloc[60]]
    ours = rf.forecast_frame(frame.drop(columns="is_context"), horizon=3, sample_count=4, lookback=30)
    assert ours.attrs["forecast"]["temperature"] == 0.85 and ours.attrs["forecast"]["top_p"] == 1.0
    # without lookback=, the history is the run's data.lookback (90 here), as the run was trained and evaluated
    assert rf.lookback == 90 and rf.predictor.max_context >= 90
    assert rf.forecast_frame(frame.drop(columns="is_context"), horizon=2, sample_count=2).attrs["forecast"][
        "lookback"] == 90
    assert not load_run_forecaster(tmp_path, calibrated=False).calibrated


def test_the_run_forecaster_hands_over_its_ensemble(tmp_path, data):
    import numpy as np

    from kronos_kit.calibration import Handover

    fit = {"ensemble": {"method": "quantile_average", "members": ["model", "bootstrap"], "weights": [0.25, 0.75]},
           "tails": {"tail": 2.0}}
    write_run(tmp_path, "finetuned", {"temperature": 1.0, "top_p": 0.9, "model": "finetuned",
                                      "handover": {"handover": fit}})
    rf = load_run_forecaster(tmp_path)
    assert rf.handover == Handover.from_dict(fit) and "75% bootstrap" in rf.handover.describe()
    history = data.splits.val.iloc[:40].drop(columns="is_context")
    args = (history, history["timestamps"], pd.Series(pd.date_range("2030-01-01", periods=3, freq="D")), 3)
    alone = rf.predict_paths(*args, sample_count=8, seed=4, model_only=True)
    handed = rf.predict_paths(*args, sample_count=8, seed=4)
    values = history[["open", "high", "low", "close", "volume", "amount"]].to_numpy(np.float64)[None]
    np.testing.assert_array_equal(handed.paths, rf.handover.forecast(alone.paths, values, seed=4))
    assert not np.allclose(handed.paths[..., 3], alone.paths[..., 3])
    assert load_run_forecaster(tmp_path, calibrated=False).handover.identity


def test_load_run_forecaster_moves_with_the_run_and_names_bad_files(tmp_path):
    write_run(tmp_path / "run", "finetuned", None)
    (tmp_path / "run").rename(tmp_path / "moved")
    rf = load_run_forecaster(tmp_path / "moved")
    assert rf.predictor_source == str(tmp_path / "moved" / "predictor" / "best") and not rf.calibrated
    assert rf.sampling == {"temperature": 1.0, "top_p": 0.9}
    (tmp_path / "moved" / "calibration.json").write_text(json.dumps({"temperature": "hot", "top_p": 0.9}))
    with pytest.raises(ValueError, match=r"calibration.json: field 'temperature' must be a number"):
        load_run_forecaster(tmp_path / "moved")
    (tmp_path / "moved" / "promoted.json").unlink()
    with pytest.raises(FileNotFoundError, match="promoted.json not found.*notebook 03"):
        load_run_forecaster(tmp_path / "moved")


# ------------------------------------------------------------------------------ the validation step


def _check_path_calibration(tmp_path, data, models, evaluation, cal, rf):
    """Each model's path calibration is fitted on validation, applied by the test evaluation to the price
    channels of that model's paths only, and loaded by the run's forecaster; the test split is never read."""
    import numpy as np

    from kronos_kit.calibration import PathCalibration, apply_path_calibration
    from kronos_kit.data import Splits
    from kronos_kit.evaluate import decide_on_validation

    assert set(cal.paths) == {"base", "finetuned"}
    assert rf.path_calibration == PathCalibration.from_dict(cal.path_calibration(cal.model))
    assert cal.path_calibration()["method"] != "none"
    result = evaluate_models(data.splits.test, models, evaluation, lookback=30, baselines=(), calibration=cal,
                             progress=False)
    for name in ("base", "finetuned"):
        raw, done = result.uncalibrated[name], result.samples[name]
        expected = apply_path_calibration(raw, result.last_close, PathCalibration.from_dict(cal.path_calibration(name)))
        np.testing.assert_allclose(done, expected)  # skipped calibration or another model's fit: red
        np.testing.assert_array_equal(done[..., 4:], raw[..., 4:])  # volume / amount as sampled
        assert not np.allclose(done[..., 3], raw[..., 3])  # the close did move
    # the handed-over forecast: the promoted model's calibrated paths with the naive members of this walk-forward
    from kronos_kit.calibration import Handover
    from kronos_kit.evaluate import HANDED_OVER

    handover = Handover.from_dict(cal.handover_choice())
    assert rf.handover == handover and cal.handover["n_origins"] == 12 and cal.handover["candidates"]
    members = {m: result.samples[m] for m in handover.ensemble.naive_members}  # drawn although baselines=()
    np.testing.assert_array_equal(result.samples[HANDED_OVER],
                                  handover.apply(result.samples[cal.model], result.last_close, members))
    # an absurd test split (prices x 1000, volumes negative) leaves every decision unchanged
    absurd = data.splits.test.copy()
    absurd[["open", "high", "low", "close"]] *= 1000.0
    absurd["volume"] = -absurd["volume"]
    splits = Splits(train=data.splits.train, val=data.splits.val, test=absurd)
    again = decide_on_validation(splits, models, evaluation, lookback=30, run_dir=tmp_path / "absurd", seed=2,
                                 finetuned_sources=("tiny", tmp_path / "predictor" / "best"),
                                 base_sources=("tiny", "tiny"))
    assert again.calibration.paths == cal.paths and again.promotion.promoted == cal.model
    assert again.calibration.handover == cal.handover  # the handed-over forecast too: fitted on validation only


def test_decide_on_validation_writes_what_the_run_forecaster_loads(tmp_path, data):
    from kronos_kit.config import EvalConfig
    from kronos_kit.evaluate import Promotion, SamplingCalibration, decide_on_validation

    tokenizer = KronosTokenizer.from_pretrained("tiny")
    tuned = Kronos.from_pretrained("tiny", seed=1)
    tuned.save_pretrained(tmp_path / "predictor" / "best")
    models = {"base": (Kronos.from_pretrained("tiny", seed=0), tokenizer), "finetuned": (tuned, tokenizer)}
    evaluation = EvalConfig(stride=15, pred_len=5, sample_count=3, val_origins=12,
                            calibration_temperatures=[0.5, 1.0], calibration_top_ps=[0.9, 1.0])
    decision = decide_on_validation(data.splits, models, evaluation, lookback=30, run_dir=tmp_path, seed=2,
                                    finetuned_sources=("tiny", tmp_path / "predictor" / "best"),
                                    base_sources=("tiny", "tiny"))
    p = decision.promotion
    assert decision.result.n_origins == 12 and set(decision.result.names) == {"base", "finetuned"}
    assert Promotion.load(tmp_path) == p and p.split == "validation"
    if p.promoted == "finetuned":  # inside the run folder: written relative to it
        assert (p.tokenizer, p.predictor) == ("tiny", "predictor/best")
    cal = SamplingCalibration.load(tmp_path)
    assert cal == decision.calibration and cal.model == p.promoted and len(cal.grid) == 4
    assert (cal.temperature, cal.top_p) in {(0.5, 0.9), (0.5, 1.0), (1.0, 0.9), (1.0, 1.0)}
    rf = load_run_forecaster(tmp_path)
    assert rf.promoted == p.promoted and rf.sampling == cal.sampling()
    # the test evaluation samples with the calibrated setting
    result = evaluate_models(data.splits.test, {"m": models["base"]}, evaluation, lookback=30, baselines=(),
                             calibration=cal, progress=False)
    sampling = result.config["sampling"]
    assert (sampling["temperature"], sampling["top_p"], sampling["calibrated"]) == (cal.temperature, cal.top_p, True)
    assert not result.uncalibrated  # "m" has no path calibration of its own: its paths stay as sampled
    _check_path_calibration(tmp_path, data, models, evaluation, cal, rf)
    # calibration switched off: no stale calibration.json survives
    decide_on_validation(data.splits, models, EvalConfig(stride=15, pred_len=5, sample_count=3, val_origins=12,
                                                         calibrate=False), lookback=30, run_dir=tmp_path,
                         finetuned_sources=("tiny", "tiny"), base_sources=("tiny", "tiny"))
    assert not (tmp_path / "calibration.json").exists() and not load_run_forecaster(tmp_path).calibrated
