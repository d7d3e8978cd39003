"""Training engine: both phases learn, resume is exact, failures are loud, the tokenizer stays frozen."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import DATA

from kronos_kit.config import KitConfig
from kronos_kit.data import load_data
from kronos_kit.model import Kronos, KronosTokenizer, weights_hash
from kronos_kit.runs import read_metrics
from kronos_kit.train import (
    FrozenTokenizerChanged,
    NonFiniteLossError,
    StepOutput,
    tokenizer_step,
    train_predictor,
    train_tokenizer,
)

SMOKE = {
    "data.source": str(DATA / "ashare_5min_sample.csv"), "data.symbol": "A", "data.lookback": 30, "data.predict": 5,
    "data.stride": 2, "tokenizer.batch_size": 16, "tokenizer.max_steps": 24, "tokenizer.eval_every": 8,
    "tokenizer.lr": 2e-3, "predictor.batch_size": 16, "predictor.max_steps": 24, "predictor.eval_every": 8,
    "predictor.lr": 2e-3, "tokenizer.max_val_batches": 4, "predictor.max_val_batches": 4,
}


def smoke_config(run_dir, **extra) -> KitConfig:
    return KitConfig(run_dir=str(run_dir), device="cpu").with_overrides({**SMOKE, **extra})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(smoke_config(tmp_path_factory.mktemp("data-run")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = smoke_config(run_dir, **{"gate.override": True})  # the engine's test: phase 2 without notebook 01's gate
    tok = train_tokenizer(cfg, data=data, progress=False)
    return run_dir, cfg, tok, train_predictor(cfg, data=data, progress=False)


def test_both_phases_lower_validation_loss(trained):
    _, _, tok, pred = trained
    assert tok.history[-1]["val_recon_full"] < 0.8 * tok.history[0]["val_recon_full"]
    assert pred.history[-1]["val_loss"] < pred.history[0]["val_loss"]
    assert tok.steps == pred.steps == 24 and tok.stopped == pred.stopped == "max_steps"


def test_run_directory_holds_reference_checkpoints_and_metrics(trained):
    run_dir, _, tok, pred = trained
    for phase in ("tokenizer", "predictor"):
        for kind in ("best", "last"):
            assert {p.name for p in (run_dir / phase / kind).iterdir()} == {"config.json", "model.safetensors"}
        assert (run_dir / "state" / f"{phase}.pt").is_file()
    KronosTokenizer.from_pretrained(tok.best_dir)
    Kronos.from_pretrained(pred.best_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train_lines = [r for r in records if r["kind"] == "train" and r["phase"] == "tokenizer"]
    assert {"lr", "loss", "recon_s1", "recon_full", "bsq", "grad_norm", "windows_per_s"} <= set(train_lines[0])
    # the BSQ loss is logged as its parts too, and they recombine to it (quantizer weights of the preset)
    q = KronosTokenizer.from_pretrained(tok.best_dir).quantizer
    for r in train_lines:
        parts = r["bsq_commitment"], r["bsq_per_sample_entropy"], r["bsq_codebook_entropy"]
        assert r["bsq"] == pytest.approx(q.beta * parts[0] + q.zeta * (q.gamma0 * parts[1] - q.gamma * parts[2]),
                                         rel=1e-5, abs=1e-7)
    evals = [r for r in records if r["kind"] == "eval" and r["phase"] == "tokenizer"]
    assert len(evals) == 3 and 0 < evals[-1]["s1_usage"] <= 1
    assert {"val_ce_s1", "val_ce_s2", "val_acc_s1"} <= set(read_metrics(run_dir / "metrics.jsonl", "predictor")[-1])


def test_phase_two_reads_the_phase_one_tokenizer_unchanged(trained):
    run_dir, _, _, _ = trained
    # phase 2 hashed the tokenizer it loaded before training (its state keeps the hash); that is the
    # phase-1 `best` file as it is now, so phase 2 read it and nothing changed it
    used = torch.load(run_dir / "state" / "predictor.pt", weights_only=True)["config"]["tokenizer_sha256"]
    assert weights_hash(KronosTokenizer.from_pretrained(run_dir / "tokenizer" / "best")) == used
    assert weights_hash(KronosTokenizer.from_preset("tiny")) != used  # not the untrained start


def test_frozen_tokenizer_check_catches_a_change(tmp_path, data, monkeypatch):
    import kronos_kit.train as train_module

    cfg = smoke_config(tmp_path, **{"tokenizer.enabled": False, "predictor.max_steps": 4, "predictor.eval_every": 2})
    original = train_module.make_predictor_step

    def sabotaged(tokens, *, teacher_forcing):
        step = original(tokens, teacher_forcing=teacher_forcing)

        def run(model, batch):
            with torch.no_grad():
                tokens.tokenizer.head.bias.add_(1e-3)  # what a buggy phase 2 might do
            return step(model, batch)

        return run

    monkeypatch.setattr(train_module, "make_predictor_step", sabotaged)
    with pytest.raises(FrozenTokenizerChanged, match="weights changed"):
        train_predictor(cfg, data=data, progress=False)


def with_dropout(cls, folder, p: float = 0.2):
    """The tiny preset with dropout on (the tiny presets have none), saved as a checkpoint folder."""
    from kronos_kit.model.checkpoint import PRESETS

    config = {**PRESETS[cls.__name__]["tiny"], **{k: p for k in PRESETS[cls.__name__]["tiny"] if "dropout" in k}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cls.from_config(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("phase", ["tokenizer", "predictor"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, data, phase):
    # dropout on, and phase 2 samples s1: both draw from the RNG that resume must restore
    cls = KronosTokenizer if phase == "tokenizer" else Kronos
    extra = {f"{phase}.start_from": with_dropout(cls, tmp_path / "start"), f"{phase}.max_steps": 12,
             f"{phase}.eval_every": 4}
    train = train_tokenizer if phase == "tokenizer" else train_predictor

    def run(run_dir, interrupt_at=None):
        cfg = smoke_config(run_dir, **extra, **{"tokenizer.enabled": phase == "tokenizer"})

        def on_step(step, parts):
            if step == interrupt_at:
                raise KeyboardInterrupt

        try:
            train(cfg, data=data, progress=False, on_step=on_step)
        except KeyboardInterrupt:
            train(cfg, data=data, progress=False, resume=True)
        return [weights_hash(cls.from_pretrained(run_dir / phase / k)) for k in ("last", "best")]

    assert run(tmp_path / "whole") == run(tmp_path / "killed", interrupt_at=10)


def test_two_runs_are_bit_identical(tmp_path, data, trained):
    run_dir, _, _, _ = trained
    cfg = smoke_config(tmp_path)
    train_tokenizer(cfg, data=data, progress=False)
    for kind in ("best", "last"):
        a = KronosTokenizer.from_pretrained(run_dir / "tokenizer" / kind)
        b = KronosTokenizer.from_pretrained(tmp_path / "tokenizer" / kind)
        assert weights_hash(a) == weights_hash(b)


def test_empty_validation_split_fails_clearly(tmp_path):
    cfg = smoke_config(tmp_path, **{"data.val_ratio": 0.001})
    with pytest.raises(ValueError, match="split 'val' is empty"):
        load_data(cfg)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, data, monkeypatch):
    import kronos_kit.train as train_module

    calls = {"n": 0}

    def poisoned(model, batch):
        out = tokenizer_step(model, batch)
        calls["n"] += 1
        if calls["n"] == 11:  # after the evaluation and checkpoint at step 8
            return StepOutput(out.loss * float("nan"), out.parts)
        return out

    monkeypatch.setattr(train_module, "tokenizer_step", poisoned)
    cfg = smoke_config(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"at step 10 .*parts \{'recon_s1'"):
        train_tokenizer(cfg, data=data, progress=False)
    last = KronosTokenizer.from_pretrained(tmp_path / "tokenizer" / "last")
    assert all(torch.isfinite(p).all() for p in last.parameters())
    state = torch.load(tmp_path / "state" / "tokenizer.pt", weights_only=True)
    assert state["step"] == 8


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path):
    overrides = [f"{k}={v}" for k, v in {**SMOKE, "tokenizer.max_steps": 6, "tokenizer.eval_every": 3,
                                         "predictor.max_steps": 6, "predictor.eval_every": 3,
                                         "predictor.teacher_forcing": True, "device": "cpu",
                                         "gate.override": True}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(run_dir, nproc):
        for phase in ("tokenizer", "predictor"):
            prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            cmd = [*prefix, "-m", "kronos_kit", "train", phase, "--run-dir", str(run_dir), *overrides]
            subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)

    launch(tmp_path / "ddp", 2)
    launch(tmp_path / "single", 1)
    for cls, phase in ((KronosTokenizer, "tokenizer"), (Kronos, "predictor")):
        a = cls.from_pretrained(tmp_path / "ddp" / phase / "last").state_dict()
        b = cls.from_pretrained(tmp_path / "single" / phase / "last").state_dict()
        for key in a:
            # the BSQ codebook entropy is all-reduced over ranks, so only float summation order differs
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=f"{phase} {key}")


def test_early_stopping_after_patience_evaluations(tmp_path, data, monkeypatch):
    import kronos_kit.train as train_module

    # a validation metric that never improves after the first evaluation
    monkeypatch.setattr(train_module, "evaluate_tokenizer", lambda model, loader, ctx: {"val_recon_full": 1.0})
    cfg = smoke_config(tmp_path, **{"tokenizer.eval_every": 2, "tokenizer.patience": 2})
    result = train_tokenizer(cfg, data=data, progress=False)
    assert result.stopped == "early_stopping"
    assert result.steps == 6  # evaluations at 2 (best), 4 and 6 (no improvement twice)
    assert [r["best"] for r in result.history] == [True, False, False]
    assert "best val_recon_full 1 at step 2 -> " in repr(result)  # the metric that picked it, and when


def test_live_curve_follows_training(tmp_path, data):
    from kronos_kit.widgets import LiveCurve

    live = LiveCurve(("loss", "ce_s1", "ce_s2"), every=4)
    cfg = smoke_config(tmp_path, **{"tokenizer.enabled": False, "predictor.max_steps": 8})
    train_predictor(cfg, data=data, progress=False, on_step=live)
    assert live.steps == list(range(1, 9))
    assert all(len(v) == 8 and all(x > 0 for x in v) for v in live.values.values())
    assert len(live.widget.outputs) == 1  # the figure is drawn into the Output widget
