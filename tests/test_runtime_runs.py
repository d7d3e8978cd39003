"""The shared homes: runtime (inference mode, module device), runs (layout, atomic writes, JSON), batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from kronos_kit.data import loop_batches, take, unpack_batch
from kronos_kit.model import KronosTokenizer
from kronos_kit.runs import (
    JsonFile,
    MetricsLog,
    RunDir,
    atomic_write,
    atomic_write_text,
    read_metrics,
    recover_dir,
    replace_dir,
    save_json,
)
from kronos_kit.runtime import freeze, inference, module_device


def test_inference_is_eval_and_no_grad_and_restores_each_mode():
    a, b = nn.Linear(2, 2), nn.Dropout(0.5)
    b.eval()
    with inference(a, b) as device:
        assert not a.training and not b.training and not torch.is_grad_enabled()
        assert device == torch.device("cpu")
    assert a.training and not b.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), inference(a):
        raise RuntimeError("boom")
    assert a.training  # restored on errors too


def test_module_device_and_freeze():
    layer = nn.Linear(2, 2)
    assert module_device(layer) == torch.device("cpu") and module_device(object()) is None
    status = freeze(layer)
    assert status["mode"] == "eval" and status["trainable parameters"] == 0 and len(status["sha256"]) == 64


def test_run_dir_layout_is_the_documented_one(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.checkpoint("tokenizer") == tmp_path / "tokenizer" / "best"
    assert rd.checkpoint("predictor", "last") == tmp_path / "predictor" / "last"
    assert rd.state("predictor") == tmp_path / "state" / "predictor.pt"
    names = [rd.manifest, rd.config, rd.metrics_log, rd.codebook_before, rd.codebook_after, rd.gate,
             rd.token_metrics, rd.metrics_json, rd.metrics_table, rd.report]
    assert [p.name for p in names] == ["manifest.json", "config.yaml", "metrics.jsonl", "codebook_before.json",
                                       "codebook_after.json", "reconstruction_gate.json", "token_metrics.json",
                                       "metrics.json", "metrics_table.csv", "report.md"]
    assert rd.figures.is_dir()
    with pytest.raises(ValueError, match="best"):
        rd.checkpoint("tokenizer", "newest")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text() == "old" and os.listdir(path.parent) == ["a.txt"]


def test_saved_weights_are_readable_like_every_other_file_of_the_run(tmp_path):
    """safetensors creates its file 0600: every model.safetensors of a run was unreadable to the group while
    config.json beside it was 0644."""
    import stat

    from kronos_kit.model import Kronos

    folder = Kronos.from_preset("tiny").save_pretrained(tmp_path / "predictor")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    expected = 0o666 & ~_umask()
    assert modes == {"model.safetensors": expected, "config.json": expected}


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_replace_dir_swaps_whole_and_recover_finishes_an_interrupted_swap(tmp_path):
    target = tmp_path / "best"
    replace_dir(target, lambda d: (d.mkdir(), (d / "w").write_text("1")))
    replace_dir(target, lambda d: (d.mkdir(), (d / "w").write_text("2")))
    assert (target / "w").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["best"]
    os.replace(target, tmp_path / ".best.old")  # killed between the two renames
    assert (recover_dir(target) / "w").read_text() == "2"


def test_json_helpers_and_metrics_log(tmp_path):
    class Thing(JsonFile):
        def __init__(self, v):
            self.v = v

        def to_dict(self):
            return {"v": self.v}

        @classmethod
        def from_dict(cls, d):
            return cls(d["v"])

    path = Thing([1, 2]).save(tmp_path / "t.json")
    assert path.read_text() == json.dumps({"v": [1, 2]}, indent=1) and Thing.load(path).v == [1, 2]
    assert save_json(tmp_path / "m.json", {"b": 1, "a": 2}, sort_keys=True).read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"phase": "tokenizer", "loss": torch.tensor(0.5)})
    log.write({"phase": "predictor", "loss": 1.0})
    MetricsLog(tmp_path / "metrics.jsonl", enabled=False).write({"phase": "tokenizer"})
    assert read_metrics(tmp_path / "metrics.jsonl", "tokenizer") == [{"phase": "tokenizer", "loss": 0.5}]
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2 and read_metrics(tmp_path / "none.jsonl") == []


def test_the_one_batch_loop():
    windows = [{"x": torch.full((4, 6), float(i)), "mean": torch.zeros(6), "std": torch.ones(6), "symbol": "A"}
               for i in range(10)]
    batches = list(loop_batches(windows, max_batches=2))  # a window dataset is batched (64 per batch)
    assert len(batches) == 1 and batches[0]["x"].shape == (10, 4, 6)
    raw = [torch.zeros(3, 4, 6)] * 5
    assert len(list(loop_batches(raw, max_batches=2))) == 2 and len(list(take(iter(raw), 3))) == 3
    x, mean, std, symbols = unpack_batch(windows[0])  # a single window becomes a batch of one
    assert x.shape == (1, 4, 6) and mean.shape == (1, 6) and symbols == ["A"]
    assert unpack_batch((torch.zeros(2, 4, 6), "label")).x.shape == (2, 4, 6)


def test_bsq_loss_breakdown_recombines_to_the_loss():
    tok = KronosTokenizer.from_preset("tiny", seed=0)
    x = torch.randn(3, 16, 6, generator=torch.Generator().manual_seed(0))
    out, parts = tok(x, return_loss_breakdown=True)
    q = tok.quantizer
    torch.testing.assert_close(out.bsq_loss, q.beta * parts.commitment + q.zeta * (
        q.gamma0 * parts.per_sample_entropy - q.gamma * parts.codebook_entropy))
    torch.testing.assert_close(out.bsq_loss, tok(x).bsq_loss, rtol=0, atol=0)  # the plain call is unchanged
    assert parts.commitment > 0 and 0 < parts.codebook_entropy <= q.bits * torch.log(torch.tensor(2.0))


def test_the_default_thread_count_follows_the_model_width(monkeypatch):
    """The embedded base's matrices are 64 wide: a second thread only waits (on a busy CPU many times slower,
    benchmarks/RESULTS.md "Threads"); wider models keep torch's default. Asked-for counts always win."""
    import torch

    from kronos_kit.config import KitConfig
    from kronos_kit.model import config_width, source_width
    from kronos_kit.runtime import _TORCH_DEFAULT_THREADS, SMALL_MODEL_WIDTH, apply_threads, default_threads

    before = torch.get_num_threads()
    try:
        default = KitConfig.from_file(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
        assert config_width(default) == 64 and source_width("small") == 512
        assert source_width("tokenizer-base", "KronosTokenizer") == 256 == SMALL_MODEL_WIDTH
        assert source_width("NeoQuasar/Kronos-small") is None or source_width("NeoQuasar/Kronos-small") == 512
        assert default_threads(64) == default_threads(256) == 1 and default_threads(512) is None
        assert default_threads(None) is None  # unknown width (an uncached hub id): torch's default
        assert apply_threads(None, 64).startswith("threads: 1 (the models are 64 wide") and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert apply_threads(None, 512).startswith(f"threads: {_TORCH_DEFAULT_THREADS} (torch's default")
        assert "busy" not in apply_threads(None, 512)
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
        if _TORCH_DEFAULT_THREADS > 1:
            assert "the machine is busy now (load average 9.0" in apply_threads(None, 512)
        assert apply_threads(3, 64) == "threads: 3 (asked for)" and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
