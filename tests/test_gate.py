"""The tokenizer gate before phase 2: absolute checks, return units, the paired comparison with the base
tokenizer, what the JSON records; in-split counting of codebook usage and the BSQ validation term."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA
from test_codebook import StandInTokenizer, loader, make_windows, stats_of
from torch import nn

from kronos_kit.binding import file_sha256
from kronos_kit.codebook import codebook_stats
from kronos_kit.config import GateConfig, KitConfig
from kronos_kit.data import load_data
from kronos_kit.data.schema import NORM_EPS
from kronos_kit.gate import GateResult, TokenizerGateError, reconstruction_gate
from kronos_kit.model import KronosTokenizer
from kronos_kit.reconstruction import ReconstructionReport, reconstruction_report

ROOT = Path(__file__).resolve().parent.parent
ASHARE = {"data.source": str(DATA / "ashare_5min_sample.csv")}


class ScaledStandIn(nn.Module):
    """z = (1 + a) x, z_pre = (1 + 2a) x: a per-window error that varies with the window (a² mean x²)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a
        self.weight = nn.Parameter(torch.zeros(1))
        self.s1_bits = self.s2_bits = 2

    def forward(self, x):
        return ((1 + 2 * self.a) * x, (1 + self.a) * x), torch.zeros(()), torch.sign(x[..., :4]), None


def price_windows(n=40, length=16, context=3, seed=0):
    """Windows whose prices stay positive, with the first `context` bars of the first half borrowed."""
    out = make_windows(n=n, length=length, symbols=("AAA",), seed=seed)
    for i, w in enumerate(out):
        w["mean"][:4] = 100.0
        w["std"][:4] = 1.5
        w["start"] = i
        w["in_split"] = torch.arange(length) >= (context if i < n // 2 else 0)
    return out


@pytest.fixture()
def good_and_bad():
    windows = make_windows(n=6)
    good = reconstruction_report(StandInTokenizer(s1_offset=[0.3] * 6, full_offset=[0.1] * 6), windows, progress=False)
    bad = reconstruction_report(StandInTokenizer(s1_offset=[0.5] * 6, full_offset=[0.8] * 6), windows, progress=False)
    return good, bad


HEALTHY = stats_of(torch.arange(16).repeat(4), torch.arange(16).repeat(4), 4, 4)


def test_absolute_checks_pass_and_fail_with_advice(good_and_bad, tmp_path):
    good, bad = good_and_bad
    collapsed = stats_of(torch.tensor([1, 2] * 32), torch.arange(16).repeat(4), 4, 4)  # bits 0, 2, 3 stuck
    ok = reconstruction_gate(good, HEALTHY)
    assert ok.passed and bool(ok) and ok.reasons == [] and ok.failed == []
    assert ok.metrics["full_mse"] == pytest.approx(0.01, rel=1e-4) and ok.thresholds["max_full_mse"] == 0.2

    fail = reconstruction_gate(bad, collapsed)
    assert not fail.passed
    assert fail.failed == ["full_mse", "full_to_s1_mse_ratio", "s1_usage", "min_bit_balance"]
    assert "full_mse (full-decoder normalized MSE) 0.64 is above the maximum 0.2" in fail.reasons[0]
    assert "Try: train longer (tokenizer_steps); or a lower tokenizer.lr" in fail.summary()
    assert "\n" not in fail.advice  # one line

    # thresholds by keyword or from the run's gate section; None disables a check
    assert reconstruction_gate(bad, collapsed, max_full_mse=1.0, min_s1_usage=0.1, max_full_to_s1_mse_ratio=None,
                               min_bit_balance=None).passed
    assert not reconstruction_gate(good, HEALTHY, GateConfig(max_full_mse=0.005)).passed
    assert reconstruction_gate(good, None).passed  # codebook checks skipped without stats
    with pytest.raises(TypeError, match="unknown thresholds"):
        reconstruction_gate(good, None, max_mse=1.0)

    back = GateResult.load(fail.save(tmp_path / "gate.json"))
    assert back == fail
    with pytest.raises(TokenizerGateError, match="full_mse .* Try: "):
        fail.raise_if_failed()
    with pytest.warns(UserWarning, match="overridden"):
        fail.raise_if_failed(override=True)


def test_each_check_is_printed_as_number_against_threshold(good_and_bad):
    good, bad = good_and_bad
    lines = reconstruction_gate(bad, HEALTHY).report().splitlines()
    assert lines[0].startswith("Tokenizer gate FAILED: full_mse (full-decoder normalized MSE) 0.64")
    assert lines[1:] == ["  close_error_to_move 0.8882 <= 1 ok", "  high_low_error_to_move 0.5756 <= 1.25 ok",
                         "  full_mse 0.64 <= 0.2 FAIL", "  full_to_s1_mse_ratio 2.56 <= 1 FAIL",
                         "  s1_usage 1 >= 0.2 ok", "  s2_usage 1 >= 0.05 ok", "  min_bit_balance 0.5 >= 0.05 ok"]
    # a gate file of an older run (no `failed`, fewer checks) still reads and prints
    old = GateResult.from_dict({"passed": True, "metrics": {"full_mse": 0.04, "s1_usage": 0.6},
                                "thresholds": {"max_full_mse": 0.5, "min_s1_usage": 0.2}})
    assert old.checks() == ["full_mse 0.04 <= 0.5 ok", "s1_usage 0.6 >= 0.2 ok"]


def test_non_finite_fails(good_and_bad):
    broken = ReconstructionReport.from_dict(good_and_bad[0].to_dict())
    broken.overall["full"].mse = [float("nan")] * 6
    res = reconstruction_gate(broken, None)
    assert not res.passed and "not finite" in res.reasons[0]
    assert json.loads(json.dumps(res.to_dict()))["metrics"]["full_mse"] is None


def test_return_units_match_numpy_and_count_in_split_bars_only():
    windows = price_windows()
    a = 0.05
    rep = reconstruction_report(ScaledStandIn(a), windows, progress=False)
    x = np.stack([w["x"].numpy() for w in windows]).astype(np.float64)
    mean = np.stack([w["mean"].numpy() for w in windows])[:, None, :].astype(np.float64)
    scale = np.stack([w["std"].numpy() for w in windows])[:, None, :].astype(np.float64) + NORM_EPS
    keep = np.stack([w["in_split"].numpy() for w in windows])
    price, fit = x * scale + mean, (1 + a) * x * scale + mean
    prev = price[:, :-1, 3]
    valid = keep[:, 1:]
    close_err = np.abs(fit[:, 1:, 3] - price[:, 1:, 3]) / prev * 1e4
    move = np.abs(price[:, 1:, 3] - prev) / prev * 1e4
    assert rep.returns["close_error_bp"] == pytest.approx(close_err[valid].mean(), rel=1e-6)
    assert rep.returns["median_move_bp"] == pytest.approx(np.median(move[valid]), rel=1e-6)
    assert rep.error_to_move("close") == pytest.approx(close_err[valid].mean() / np.median(move[valid]))
    per_window = np.array([close_err[i][valid[i]].mean() for i in range(len(windows))])
    np.testing.assert_allclose(rep.windows.array("close_bp"), per_window, rtol=1e-5)
    # the normalized errors count in-split bars only as well
    np.testing.assert_allclose(rep.overall["full"].mse, ((a * x) ** 2)[keep].mean(0), rtol=1e-5)
    assert rep.overall["full"].n_bars == int(keep.sum())
    np.testing.assert_allclose(rep.windows.array("full_mse"), [((a * x[i]) ** 2)[keep[i]].mean() for i in range(40)],
                               rtol=1e-5)
    assert list(rep.windows.worst(3, spacing=0)) == list(np.argsort(-per_window)[:3])
    distinct = rep.windows.worst(3)  # windows start 1 bar apart and span 16: picks are >= 8 bars apart
    assert distinct[0] == np.argmax(per_window) and np.diff(np.sort(distinct)).min() >= 8
    assert ReconstructionReport.from_dict(json.loads(json.dumps(rep.to_dict()))).to_dict() == rep.to_dict()


def test_a_tokenizer_worse_than_the_base_fails_the_relative_check(tmp_path):
    """The absolute checks (the whole gate before) pass it; the paired comparison with the base does not."""
    windows = price_windows(n=60)
    base = reconstruction_report(ScaledStandIn(0.05), windows, progress=False)
    worse = reconstruction_report(ScaledStandIn(0.15), windows, progress=False)  # 9x the base's MSE
    absolute = reconstruction_gate(worse, HEALTHY, max_close_error_to_move=None, max_high_low_error_to_move=None)
    assert absolute.passed and absolute.metrics["full_mse"] < 0.2

    gate = reconstruction_gate(worse, HEALTHY, base=base, base_stats=HEALTHY, max_close_error_to_move=None,
                               max_high_low_error_to_move=None)
    assert not gate.passed and gate.failed == ["full_mse_vs_base"]
    assert gate.metrics["full_mse_vs_base"] == pytest.approx(9.0, rel=1e-4)
    assert gate.paired["significant"] and gate.paired["p_value"] < 0.05
    assert gate.paired["test"].startswith("one-sided Diebold-Mariano")
    assert "full_mse_vs_base (adapted / base full-decoder MSE) 9 is above the maximum 1.05, significantly" in \
        gate.reasons[0]
    assert "keep the base tokenizer (train_tokenizer=False)" in gate.summary()

    # the file records every check's value, threshold and the base's value
    saved = json.loads(gate.save(tmp_path / "reconstruction_gate.json").read_text())
    checks = {c["metric"]: c for c in saved["checks"]}
    assert checks["full_mse_vs_base"] == {"check": "max_full_mse_vs_base", "metric": "full_mse_vs_base",
                                          "value": pytest.approx(9.0, rel=1e-4), "threshold": 1.05, "base": 1.0,
                                          "passed": False}
    assert checks["full_mse"]["base"] == pytest.approx(base.full_mse) and checks["full_mse"]["passed"]
    assert saved["paired"]["n_windows"] == 60

    # within the tolerance, or better than the base: passes
    close = reconstruction_report(ScaledStandIn(0.051), windows, progress=False)  # ratio 1.04
    assert reconstruction_gate(close, HEALTHY, base=base).passed
    assert reconstruction_gate(base, HEALTHY, base=worse).passed
    with pytest.raises(ValueError, match="same windows"):
        reconstruction_gate(worse, HEALTHY, base=reconstruction_report(ScaledStandIn(0.05), windows[:30],
                                                                       progress=False))


def test_close_error_as_large_as_a_move_fails():
    windows = price_windows()
    coarse = reconstruction_report(ScaledStandIn(2.0), windows, progress=False)
    gate = reconstruction_gate(coarse, HEALTHY, max_full_mse=None)
    assert coarse.error_to_move("close") > 1.0
    assert "close_error_to_move" in gate.failed and "close error / median bar move" in gate.summary()


# ------------------------------------------------------------------------------------------------
# the real tokenizer: the default thresholds pass the base, a damaged one fails
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ashare():
    cfg = KitConfig.from_file(ROOT / "configs" / "default.yaml").with_overrides(ASHARE)
    return cfg, load_data(cfg)


def _gate(tokenizer, base_report, base_stats, data, cfg):
    report = reconstruction_report(tokenizer, data.val, progress=False)
    return reconstruction_gate(report, codebook_stats(tokenizer, data.val, progress=False), cfg.gate,
                               base=base_report, base_stats=base_stats)


def test_default_gate_passes_the_base_and_fails_a_damaged_tokenizer(ashare):
    cfg, data = ashare
    base = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from)
    base_report = reconstruction_report(base, data.val, progress=False)
    base_stats = codebook_stats(base, data.val, progress=False)
    assert _gate(base, base_report, base_stats, data, cfg).passed

    damaged = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # noise of 10% of each weight tensor's spread
        for p in damaged.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1 * p.std())
    gate = _gate(damaged, base_report, base_stats, data, cfg)
    assert not gate.passed
    assert {"full_mse_vs_base", "close_error_to_move"} <= set(gate.failed)
    assert "full_mse_vs_base (adapted / base full-decoder MSE)" in gate.summary()
    assert "close_error_to_move (close error / median bar move)" in gate.summary()


def test_a_few_steps_at_a_huge_lr_fail_the_gate(ashare, tmp_path):
    from kronos_kit.train import train_tokenizer

    cfg, data = ashare
    cfg = cfg.with_overrides({"run_dir": str(tmp_path), "tokenizer.max_steps": 3, "tokenizer.eval_every": 3,
                              "tokenizer.lr": 0.05, "tokenizer.batch_size": 16})
    result = train_tokenizer(cfg, data=data, progress=False)
    base = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from)
    base_report = reconstruction_report(base, data.val, progress=False)
    gate = _gate(KronosTokenizer.from_pretrained(result.best_dir), base_report,
                 codebook_stats(base, data.val, progress=False), data, cfg)
    assert not gate.passed and "full_mse_vs_base" in gate.failed, gate.report()


# ------------------------------------------------------------------------------------------------
# in-split counting: codebook usage and the BSQ validation term
# ------------------------------------------------------------------------------------------------


def test_codebook_usage_and_bsq_term_count_in_split_bars_only(ashare):
    from kronos_kit.runtime import DistContext
    from kronos_kit.train import evaluate_tokenizer

    cfg, data = ashare
    tok = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from)
    batch = next(iter(loader([data.val[i] for i in range(8)], batch_size=8)))
    keep = batch["in_split"]
    assert not keep.all() and keep.any()  # the first validation windows borrow training bars
    with torch.no_grad():
        s1, s2 = tok.encode(batch["x"], half=True)
        latent = tok._encode_latent(batch["x"])
        per_window = [tok.quantizer(z[m][None]).loss.item() for z, m in zip(latent, keep)]
        expected_bsq = float(np.average(per_window, weights=keep.sum(1).numpy()))
        metrics = evaluate_tokenizer(tok, [batch], DistContext.from_env(torch.device("cpu")))
    assert metrics["val_bsq"] == pytest.approx(expected_bsq, rel=1e-5)
    assert metrics["s1_usage"] == len(torch.unique(s1[keep])) / 2**tok.s1_bits
    stats = codebook_stats(tok, [batch], progress=False)
    assert stats.n_tokens == int(keep.sum())
    np.testing.assert_array_equal(stats.s1.counts, np.bincount(s1[keep].numpy(), minlength=2**tok.s1_bits))


# ------------------------------------------------------------------------------------------------
# where it fails: worst windows (figure and browser mode), error distributions, base on the curves
# ------------------------------------------------------------------------------------------------


def test_window_browser_walks_the_worst_windows_first_half_a_window_apart_with_dates():
    """The worst order once stepped through overlapping neighbours (one event seen again and again) and named
    windows by bar numbers."""
    from kronos_kit.widgets import window_browser

    windows = price_windows(n=12)  # 16 bars each, one bar apart
    frame = pd.DataFrame({"symbol": "AAA", "timestamps": pd.date_range("2024-03-01", periods=40, freq="D")})
    tokenizers = {"before": StandInTokenizer(seed=0, full_offset=[0.1] * 6),
                  "after": StandInTokenizer(seed=1, full_offset=[0.3] * 6)}
    reports = {name: reconstruction_report(tok, windows, progress=False) for name, tok in tokenizers.items()}
    box = window_browser(tokenizers, windows, reports=reports, frame=frame)
    (_, which, order), position, info = box.children[0].children, box.children[1], box.children[2]
    assert "(2024-03-01 .. 2024-03-16)" in info.value  # in time order first, by date
    order.value = "worst close error"
    ranking = reports["before"].windows.worst(12)  # worst first, at least 8 bars (half a window) apart
    assert len(ranking) < 12 and np.all(np.abs(np.diff(np.sort(ranking))) >= 8)
    assert position.max == len(ranking) - 1 and "rank 1 of" in info.value
    shown = []
    for k in range(len(ranking)):
        position.value = k
        shown.append(pd.Timestamp(info.value.split("(")[1].split(" ..")[0]))
    assert [(d - pd.Timestamp("2024-03-01")).days for d in shown] == list(ranking)  # the windows the ranking names
    which.value = "after"  # the ranking follows the selected tokenizer, from its worst
    first = reports["after"].windows.worst(12)[0]
    assert f"({(pd.Timestamp('2024-03-01') + pd.Timedelta(days=int(first))):%Y-%m-%d} .." in info.value
    with pytest.raises(ValueError, match="same 12 windows"):
        window_browser(tokenizers, windows, reports={n: reconstruction_report(t, windows[:5], progress=False)
                                                      for n, t in tokenizers.items()})


def test_worst_windows_figure_and_error_distribution():
    from kronos_kit.plots import plot_window_errors, plot_worst_windows
    from kronos_kit.reconstruction import worst_windows

    windows = price_windows(n=30)
    tokenizers = {"before": StandInTokenizer(seed=0, full_offset=[0.1] * 6),
                  "after": StandInTokenizer(seed=1, full_offset=[0.3] * 6)}
    reports = {name: reconstruction_report(tok, windows, progress=False) for name, tok in tokenizers.items()}
    worst = worst_windows(reports, tokenizers, windows, k=3)
    assert [w.rank for w in worst] == [1, 2, 3]
    assert worst[0].position == int(np.nanargmax(reports["after"].windows.array("close_bp")))
    assert worst[0].close_bp["after"] > worst[1].close_bp["after"] > worst[2].close_bp["after"]
    fig = plot_worst_windows(worst, median_move_bp=reports["after"].returns["median_move_bp"])
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_visible() and ax.get_title(loc="left")]
    assert titles[0].startswith("#1 AAA start") and "x move" in titles[0] and len(titles) == 3
    # the titles' numbers are window means, the ring one bar: in Lab "after 67 bp" sat beside a ring 300 bp off,
    # unlabelled; the title says mean and the ring carries its own error
    assert all("mean close error:" in t for t in titles)
    for ax, w in zip(fig.axes, worst):
        ring = [t.get_text() for t in ax.texts if t.get_text().endswith(" bp")]
        assert len(ring) == 1 and float(ring[0][:-3]) >= w.close_bp["after"] - 0.5, (ring, w.close_bp)
    assert hasattr(fig, "_repr_png_") and fig._repr_png_()[:4] == b"\x89PNG"  # displays inline
    dist = plot_window_errors(reports)
    labels = dist.axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("median |bar move|") for label in labels)
    assert "of windows worse after" in dist.axes[1].get_title()


def test_curves_show_the_base_at_step_zero():
    from kronos_kit.plots import plot_training_curves

    records = [{"phase": "tokenizer", "kind": "reference", "step": 0, "val_recon_full": 0.09, "val_recon_s1": 0.12},
               {"phase": "tokenizer", "kind": "train", "step": 5, "loss": 0.3},
               {"phase": "tokenizer", "kind": "eval", "step": 5, "val_recon_full": 0.08, "val_recon_s1": 0.11}]
    fig = plot_training_curves(records, "tokenizer")
    validation = fig.axes[-1]
    labels = validation.get_legend_handles_labels()[1]
    assert "val_recon_full, base (step 0) = 0.09" in labels
    diamonds = [ln for ln in validation.lines if ln.get_marker() == "D"]
    assert [tuple(ln.get_xydata()[0]) for ln in diamonds] == [(0.0, 0.09), (0.0, 0.12)]
    assert not any("base" in label for label in plot_training_curves(records, "tokenizer", base=False)
                   .axes[-1].get_legend_handles_labels()[1])


def test_both_phases_log_the_start_checkpoint_at_step_zero(tmp_path, ashare):
    """The engine's `reference` record is the phase's own validation of the starting checkpoint."""
    from kronos_kit.runs import read_metrics
    from kronos_kit.runtime import DistContext
    from kronos_kit.train import evaluate_tokenizer, train_predictor, train_tokenizer, validation_loader

    cfg, data = ashare
    cfg = cfg.with_overrides({"run_dir": str(tmp_path), "tokenizer.max_steps": 2, "tokenizer.eval_every": 2,
                              "tokenizer.batch_size": 16, "tokenizer.max_val_batches": 2, "predictor.max_steps": 2,
                              "predictor.eval_every": 2, "predictor.batch_size": 16, "predictor.max_val_batches": 2,
                              "predictor.skill_origins": 2, "predictor.skill_paths": 2,
                              "predictor.select_metric": "val_crps",
                              "gate.override": True})  # no gate here: phase 2 on the ungated tokenizer, warned
    train_tokenizer(cfg, data=data, progress=False)
    with pytest.warns(UserWarning, match="no reconstruction gate judged it"):
        train_predictor(cfg, data=data, progress=False)
    for phase, keys, select in (("tokenizer", ("val_recon_full", "val_loss", "s1_usage"), "val_recon_full"),
                                ("predictor", ("val_loss", "val_ce_s1", "val_crps"), "val_crps")):
        records = read_metrics(tmp_path / "metrics.jsonl", phase)
        (ref,) = [r for r in records if r["kind"] == "reference"]
        assert ref["step"] == 0 and set(keys) <= set(ref) and records.index(ref) == 0
        # each validation says what picks `best` (the report reads it there)
        assert {r["select_metric"] for r in records if r["kind"] == "eval"} == {select}
    base = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from)
    ctx = DistContext.from_env(torch.device("cpu"))
    expected = evaluate_tokenizer(base, validation_loader(data.val, 16, ctx, 2), ctx)
    (ref,) = [r for r in read_metrics(tmp_path / "metrics.jsonl", "tokenizer") if r["kind"] == "reference"]
    assert ref["val_recon_full"] == pytest.approx(expected["val_recon_full"], rel=1e-6)


def test_phase_sections_read_the_run_files(tmp_path, good_and_bad):
    from kronos_kit.phase_report import phase_sections
    from kronos_kit.runs import MetricsLog, RunDir, save_json

    rd = RunDir(tmp_path)
    assert phase_sections(tmp_path) == []  # not a training run's folder: no phase sections
    good, bad = good_and_bad
    reconstruction_gate(bad, HEALTHY, base=good, base_stats=HEALTHY).save(rd.gate)
    HEALTHY.save(rd.codebook_before)
    HEALTHY.save(rd.codebook_after)
    log = MetricsLog(rd.metrics_log, run="r1", attempt=1)
    for record in ({"phase": "tokenizer", "kind": "reference", "step": 0, "val_recon_full": 0.05},
                   {"phase": "tokenizer", "kind": "eval", "step": 10, "val_recon_full": 0.06, "best": True},
                   {"phase": "predictor", "kind": "reference", "step": 0, "val_loss": 2.5, "val_crps": 30.0},
                   {"phase": "predictor", "kind": "eval", "step": 5, "val_loss": 2.4, "val_crps": 31.0, "best": True},
                   {"phase": "predictor", "kind": "eval", "step": 10, "val_loss": 2.45, "val_crps": 32.0}):
        log.write(record)
    save_json(rd.token_metrics, {"base": {"s1_accuracy": 0.1}, "finetuned": {"s1_accuracy": 0.12}})
    text = "\n".join(phase_sections(tmp_path))
    assert text.startswith("## Phase 1: tokenizer adaptation\n\n**Gate: FAILED.** full_mse_vs_base")
    assert "Try: " in text and "| check | adapted | base | threshold | result |" in text
    assert "| full_mse_vs_base | 64 | 1 | <= 1.05 | FAIL |" in text
    assert "| close error (bp of the previous close) |" in text and "| s1 usage | 1 | 1 |" in text
    assert "one-sided Diebold-Mariano" in text
    # phase 1's best is above the base's step 0: the report says so
    assert "val_recon_full 0.06 vs the base's 0.05 at step 0 (+20.0%): not below the base." in text
    phase2 = text[text.index("## Phase 2"):]
    assert "`best` is picked by val_loss. Best validation step 5 (of 10): val_loss 2.4 vs the base's 2.5" in phase2
    assert "| val_crps | 30 | 31 | +3.3% |" in phase2 and "| s1_accuracy | 0.1 | 0.12 |" in phase2


def test_the_phase_2_section_names_the_metric_that_picked_best_from_the_log(tmp_path):
    """A Lab run once had no config.yaml, and its report said val_loss picked `best` although val_crps did: the
    validations now log what picks `best`, and the report reads it there before any config."""
    from kronos_kit.phase_report import phase_two_lines
    from kronos_kit.runs import MetricsLog, RunDir

    rd = RunDir(tmp_path)
    log = MetricsLog(rd.metrics_log, run="r1", attempt=1)
    for record in ({"phase": "predictor", "kind": "reference", "step": 0, "val_loss": 2.5, "val_crps": 30.0},
                   {"phase": "predictor", "kind": "eval", "step": 5, "val_loss": 2.4, "val_crps": 29.0, "best": True,
                    "select_metric": "val_crps"},
                   {"phase": "predictor", "kind": "eval", "step": 10, "val_loss": 2.3, "val_crps": 31.0, "best": False,
                    "select_metric": "val_crps"}):
        log.write(record)
    assert not rd.config.is_file()
    from kronos_kit.phase_report import predictor_select_metric

    text = "\n".join(phase_two_lines(rd, predictor_select_metric(rd)))
    assert "`best` is picked by val_crps. Best validation step 5 (of 10): val_crps 29 vs the base's 30" in text


def test_above_the_tolerance_by_chance_is_not_a_failure():
    """Ratio 1.11 > 1.05, but the per-window differences scatter around it: the paired test does not reject."""
    windows = price_windows(n=8)
    base = reconstruction_report(ScaledStandIn(0.05), windows, progress=False)
    noisy = ReconstructionReport.from_dict(base.to_dict())
    noisy.windows.full_mse = [m * f for m, f in zip(base.windows.full_mse, (0.4, 2.1, 0.5, 1.9, 0.6, 1.8, 0.5, 1.1))]
    gate = reconstruction_gate(noisy, HEALTHY, base=base)
    assert gate.metrics["full_mse_vs_base"] > 1.05 and not gate.paired["significant"]
    assert gate.passed and "full_mse_vs_base" not in gate.failed


def test_the_gate_command_lets_phase_2_start_on_a_run_trained_from_the_command_line(tmp_path, capsys):
    """`train tokenizer`, then `train predictor` is refused (no gate judged the tokenizer); `gate` judges it as
    notebook 01 does, and `train predictor` goes on. A tokenizer retrained after the gate is refused again."""
    from conftest import DATA

    from kronos_kit.__main__ import main

    words = ["--run-dir", str(tmp_path), f"data.source={DATA / 'ashare_5min_sample.csv'}", "data.symbol=A",
             "data.lookback=30", "data.predict=5", "tokenizer.start_from=embedded:base/tokenizer",
             "predictor.start_from=embedded:base/predictor", "tokenizer.max_steps=2", "predictor.max_steps=2",
             "tokenizer.batch_size=16", "predictor.batch_size=16", "tokenizer.max_val_batches=2",
             "predictor.max_val_batches=2", "predictor.skill_origins=0"]
    assert main(["train", "tokenizer", *words]) == 0
    assert main(["train", "predictor", *words]) == 2
    assert "no reconstruction gate judged it" in capsys.readouterr().err
    assert main(["gate", *words]) == 0
    assert "Tokenizer gate passed." in capsys.readouterr().out
    gate = json.loads((tmp_path / "reconstruction_gate.json").read_text())
    assert gate["tokenizer"]["sha256"] == file_sha256(tmp_path / "tokenizer" / "best" / "model.safetensors")
    assert (tmp_path / "codebook_before.json").is_file() and (tmp_path / "codebook_after.json").is_file()
    assert main(["train", "predictor", *words]) == 0
    assert main(["train", "tokenizer", *words, "--overwrite", "tokenizer.lr=1e-3"]) == 0
    assert main(["train", "predictor", *words, "--overwrite"]) == 2  # phase 1 ran with another lr than this config
    assert "it ran with tokenizer.lr = 0.001, the config says 0.0002 now" in capsys.readouterr().err
    assert main(["train", "predictor", *words, "--overwrite", "tokenizer.lr=1e-3"]) == 2  # the gate judged others
    assert "reconstruction_gate.json judged" in capsys.readouterr().err
