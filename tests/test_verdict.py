"""Per-origin losses, paired verdicts, the report's bottom line, sampling calibration and promotion.

Models are fake ForecastFns built on the known future, so which one is better is known in advance.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kronos_kit import metrics as M
from kronos_kit.evaluate import (
    CALIBRATION_FILE,
    PROMOTION_FILE,
    Promotion,
    SamplingCalibration,
    bottom_line,
    calibrate_sampling,
    comparison_lag,
    decide_promotion,
    ic_significance,
    overlap_lag,
    paired_comparisons,
    paired_losses,
    verdict,
    walk_forward,
    write_report,
)

FEATS = ["open", "high", "low", "close", "volume", "amount"]
SIGMA = 0.01  # per-bar log-return std of the synthetic market


def market(symbols=("X",), n=400, seed=0) -> pd.DataFrame:
    """Geometric random walks with log-return std SIGMA on a shared 5-minute calendar."""
    rng = np.random.default_rng(seed)
    stamps = pd.date_range("2024-01-02 09:30", periods=n, freq="5min")
    parts = []
    for k, sym in enumerate(symbols):
        close = (10 + k) * np.exp(np.cumsum(rng.normal(0, SIGMA, n)))
        vol = rng.integers(100, 1000, n).astype(float)
        parts.append(pd.DataFrame({"symbol": sym, "timestamps": stamps, "open": close, "high": close, "low": close,
                                   "close": close, "volume": vol, "amount": vol * close}))
    return pd.concat(parts, ignore_index=True)


def around_truth(frame: pd.DataFrame, offsets):
    """ForecastFn whose paths are the realized future times (1 + offset); ``offsets(history, S)`` -> (S,).

    Offsets are a function of the history only, so two such models see the same per-origin numbers.
    """
    by_symbol = {s: g.set_index(pd.to_datetime(g["timestamps"]))[FEATS] for s, g in frame.groupby("symbol")}

    def fn(histories, hist_stamps, future_stamps, pred_len, sample_count):
        out = []
        for h, f in zip(histories, future_stamps):
            truth = by_symbol[h.attrs["symbol"]].loc[pd.DatetimeIndex(f)].to_numpy()
            scale = 1 + np.asarray(offsets(h, sample_count))[:, None, None]
            out.append(truth[None] * np.broadcast_to(scale, (len(scale), pred_len, 6)))
        return np.stack(out)

    return fn


def size(history: pd.DataFrame) -> float:
    # a per-origin error size in (0.005, 0.015), a deterministic function of the history
    return 0.01 * (1 + 0.5 * np.sin(history["close"].iloc[-1] * 1000))


def good(frame):
    return around_truth(frame, lambda h, s: size(h) * (0.1 + np.linspace(-0.2, 0.2, s)))


def bad(frame):
    return around_truth(frame, lambda h, s: size(h) * (3 + np.linspace(-0.2, 0.2, s)))


# -------------------------------------------------------------------------- per-origin losses


@pytest.fixture(scope="module")
def result():
    frame = market(("X", "Y"), n=300)
    models = {"base": bad(frame), "finetuned": good(frame)}
    return walk_forward(frame, models, lookback=40, pred_len=6, stride=4, sample_count=5, seed=0, progress=False)


def test_origin_losses_average_to_the_table(result):
    t = result.table
    for name in ("base", "finetuned", "persistence", "drift"):
        crps = result.origin_loss(name, "close_crps")
        assert crps.shape == (result.n_origins,)
        assert crps.mean() == pytest.approx(t.loc[name, "close_crps"], rel=1e-12)
        assert result.origin_loss(name, "close_ae").mean() == pytest.approx(t.loc[name, "close_mae"], rel=1e-12)
        assert result.origin_loss(name, "vol_ae").mean() == pytest.approx(t.loc[name, "vol_mae"], rel=1e-12)
    # by hand for one origin: the point (median) close vs realized, averaged over the horizon
    point = np.median(result.samples["base"][3, :, :, 3], axis=0)
    assert result.origin_loss("base", "close_ae")[3] == pytest.approx(np.abs(point - result.realized[3, :, 3]).mean())
    assert result.origin_loss("garch", "vol_ae").mean() == pytest.approx(t.loc["garch", "vol_mae"])
    with pytest.raises(ValueError, match="volatility only"):
        result.origin_loss("garch", "close_crps")
    frame = result.origin_losses()
    assert len(frame) == result.n_origins * len(result.names)
    assert frame.loc[frame.model == "garch", "close_crps"].isna().all()
    drift = frame.loc[frame.model == "drift", "close_ae"]
    np.testing.assert_array_equal(drift, result.origin_loss("drift", "close_ae"))


def test_overlap_lag_counts_origins_sharing_targets(result):
    # stride 4, horizon 6: the next origin's targets overlap (gap 4 < 6), the one after does not (8)
    assert overlap_lag(result) == 1
    assert comparison_lag(result, np.zeros(2)) == 0  # too short to test
    d = np.random.default_rng(0).normal(size=60)
    assert comparison_lag(result, d) == max(1, M.newey_west_lag(60), M.andrews_lag(d))


def test_paired_losses_average_symbols_at_one_time(result):
    a, b, used = paired_losses(result, "finetuned", "base", "close_crps")
    times = np.unique(result.origin_time)
    assert used == result.n_origins and len(a) == len(times) == result.n_origins // 2
    first = result.origin_time == times[0]
    assert a[0] == pytest.approx(result.origin_loss("finetuned", "close_crps")[first].mean())


# ------------------------------------------------------------------------------- verdicts


def test_verdict_rule():
    assert verdict(0.01, -0.2) == "better" and verdict(0.01, 0.2) == "worse"
    assert verdict(0.2, -0.2) == "no detectable difference" and verdict(0.049, 1, level=0.01) != "worse"
    assert verdict(float("nan"), 1.0) == "not testable"


def test_paired_comparisons_rows_match_the_tests(result):
    table = paired_comparisons(result, "finetuned", n_boot=300)
    assert [(r.other, r.metric) for r in table.itertuples()] == [
        ("base", "close_crps"), ("base", "close_ae"), ("persistence", "close_crps"), ("persistence", "close_ae"),
        ("drift", "close_crps"), ("drift", "close_ae"), ("garch", "vol_ae")]
    row = table.iloc[0]
    a, b, _ = paired_losses(result, "finetuned", "base", "close_crps")
    lag = comparison_lag(result, a - b)
    dm = M.diebold_mariano(a, b, lag=lag)
    ci = M.moving_block_bootstrap_ci(a, b, block=row["block"], n_boot=300, level=0.95)
    assert (row["dm_stat"], row["p_value"], row["lag"]) == (dm.statistic, dm.p_value, lag)
    assert (row["ci_low"], row["ci_high"]) == (ci.low, ci.high)
    assert row["block"] == max(lag + 1, round(len(a) ** (1 / 3)))
    assert row["model_mean"] == pytest.approx(result.table.loc["finetuned", "close_crps"])
    assert row["relative_skill"] == pytest.approx(1 - row["model_mean"] / row["other_mean"])
    # the good model (errors ~ size/10) beats the bad one (errors ~ 3 size) everywhere: certain
    assert (table.loc[table.other == "base", "verdict"] == "better").all()
    assert row["p_value"] < 1e-6 and row["ci_low"] > 0.8
    assert row["test"].startswith("Diebold-Mariano, Newey-West lag")
    # the bad model is worse than the oracle-like one, seen from its side
    worse = paired_comparisons(result, "base", ("finetuned",), n_boot=100)
    assert (worse["verdict"] == "worse").all() and (worse["relative_skill"] < 0).all()
    with pytest.raises(ValueError, match="no sample paths"):
        paired_comparisons(result, "garch")


def _rows(*specs) -> pd.DataFrame:
    # (other, metric, label, model_mean, other_mean, p, verdict)
    cols = ["model", "other", "metric", "label", "model_mean", "other_mean", "change_pct", "p_value", "verdict",
            "ci_level", "n_origins"]
    return pd.DataFrame([["finetuned", o, m, lab, a, b, (a / b - 1) * 100, p, v, 0.95, 60]
                         for o, m, lab, a, b, p, v in specs], columns=cols)


def test_bottom_line_sentences():
    hurt = _rows(("base", "close_crps", "close CRPS", 1.031, 1.0, 0.02, "worse"),
                 ("base", "close_ae", "close MAE", 1.0, 1.0, 0.9, "no detectable difference"),
                 ("persistence", "close_ae", "close MAE", 1.0, 0.8, 0.0004, "worse"),
                 ("drift", "close_crps", "close CRPS", 1.0, 1.1, 0.5, "no detectable difference"),
                 ("random_walk", "close_crps", "close CRPS", 1.25, 1.0, 0.003, "worse"))
    assert bottom_line(hurt, coverage_80=0.52) == (
        "Finetuning did not help: on 60 test origins the finetuned model's close CRPS is 3.1% higher than the base "
        "model's (significantly, DM p = 0.02). Against naive forecasts, its close CRPS is 25.0% higher than the best "
        "naive probabilistic baseline's (random_walk) (significantly, DM p = 0.003); its close MAE is 25.0% higher "
        "than persistence's (significantly, DM p < 0.001); its 80% interval covers 0.52 of the realized closes (too "
        "narrow: the model is overconfident).")
    same = _rows(("base", "close_crps", "close CRPS", 0.99, 1.0, 0.41, "no detectable difference"),
                 ("persistence", "close_ae", "close MAE", 0.98, 1.0, 0.7, "no detectable difference"))
    same["mde"] = [0.083, 0.02]
    assert bottom_line(same, coverage_80=0.78) == (
        "Finetuning made no detectable difference: on 60 test origins the finetuned model's close CRPS is 1.0% lower "
        "than the base model's (not significant, DM p = 0.41; underpowered: these origins detect only differences of "
        "8.3% or more). Against naive forecasts, its close MAE is 2.0% lower than persistence's (not significant, "
        "DM p = 0.70; these origins detect only differences of 2.0% or more); its 80% interval covers 0.78 of the "
        "realized closes (calibrated).")
    alone = _rows(("base", "close_crps", "close CRPS", 0.9, 1.0, 0.003, "better"))
    assert bottom_line(alone).endswith("(significantly, DM p = 0.003); no baseline was evaluated.")


def test_report_opens_with_the_verdict_and_metrics_json_carries_it(tmp_path):
    # a "finetuned" model whose point forecast is biased: persistence beats it on MAE, certainly
    frame = market(("X",), n=500, seed=2)
    models = {"base": good(frame), "finetuned": bad(frame)}
    res = walk_forward(frame, models, lookback=40, pred_len=6, stride=6, sample_count=5, seed=0, progress=False)
    from kronos_kit.runs import MetricsLog

    MetricsLog(tmp_path / "metrics.jsonl").write({"phase": "tokenizer", "kind": "reference", "step": 0})  # a run
    paths = write_report(res, tmp_path, n_boot=200)
    lines = paths["report"].read_text().splitlines()
    assert lines[0] == f"# Report: {tmp_path.name}"  # the verdict first: the title, then the bottom line
    assert lines.index("## Did finetuning help?") < lines.index("## Phase 1: tokenizer adaptation")  # phases last
    assert lines[2].startswith("**Bottom line.** Finetuning did not help: on 76 test origins the finetuned model's "
                               "close CRPS is ")
    assert "its close MAE is" in lines[2] and "than persistence's (significantly, DM p < 0.001)" in lines[2]
    assert "best naive probabilistic baseline's" in lines[2] and "its 80% interval covers" in lines[2]
    verdicts = [ln for ln in lines if ln.startswith("- finetuned vs ")]
    assert len(verdicts) == 13  # close CRPS and MAE vs base and the five path baselines, vol MAE vs GARCH
    assert all("minimum detectable effect" in v for v in verdicts)
    assert verdicts[0].startswith("- finetuned vs base, close CRPS: **worse** at 5%.")
    assert any(v.startswith("- finetuned vs persistence, close MAE: **worse** at 5%.") for v in verdicts)
    assert lines.index("### Headline metrics") > lines.index(verdicts[-1])  # the old content stays, below
    assert "### IC significance (Newey-West t)" in lines and "### finetuned vs base" in lines
    # "Did finetuning help?" speaks with the verdict's voice: no counts of wins, the tested rows carry their test
    helped = lines[lines.index("## Did finetuning help?"):lines.index("### finetuned vs persistence")]
    assert not any(" is better on " in line or "finetuned is better" in line for line in helped)
    crps = next(line for line in helped if line.startswith("- Finetuned close CRPS "))
    assert crps.endswith("Paired test: **worse** (p < 0.001).")
    rmse = next(line for line in helped if line.startswith("- Finetuned close RMSE "))
    assert "higher" in rmse and "better" not in rmse and "worse" not in rmse  # untested: described only
    payload = json.loads(paths["json"].read_text())
    assert payload["bottom_line"] == lines[2].removeprefix("**Bottom line.** ")
    rows = {(r["other"], r["metric"]): r for r in payload["paired_comparisons"]}
    assert rows[("persistence", "close_ae")]["verdict"] == "worse"
    assert rows[("base", "close_crps")]["p_value"] < 0.001
    assert set(payload["ic_significance"]) == {"base", "finetuned", "persistence", "drift", "random_walk", "garch_rw",
                                               "bootstrap"}
    assert payload["promotion"] is None and payload["calibration"] is None


def test_ic_significance_table(result):
    table = ic_significance(result)
    assert list(table.index) == ["base", "finetuned", "persistence", "drift", "random_walk", "garch_rw", "bootstrap"]
    assert table.loc["finetuned", "ic"] == pytest.approx(result.scores["finetuned"]["ic"])
    assert table.loc["finetuned", "ic_t"] > 10  # the near-perfect model's IC is certain
    assert np.isnan(table.loc["persistence", "ic_t"])


# ------------------------------------------------------------------------ sampling calibration


def gaussian_sampler(best_temperature: float):
    """(temperature, top_p) -> ForecastFn: Gaussian log-return paths with std SIGMA * T / best_temperature.

    The market's true std is SIGMA, so ``best_temperature`` gives the calibrated spread; top-p is ignored
    (so every top-p ties). A fresh generator per setting: common random numbers across the grid.
    """

    def make(temperature, top_p):
        rng = np.random.default_rng(0)
        spread = SIGMA * temperature / best_temperature

        def fn(histories, hist_stamps, future_stamps, pred_len, sample_count):
            last = np.array([h["close"].iloc[-1] for h in histories])
            steps = rng.normal(0, spread, (len(histories), sample_count, pred_len))
            close = last[:, None, None] * np.exp(np.cumsum(steps, axis=-1))
            return np.repeat(close[..., None], 6, axis=-1)

        return fn

    return make


@pytest.mark.slow  # ~12 s: 16 walk-forwards (make test-fast stays under ~10 s per test)
def test_calibration_picks_the_known_best_temperature(tmp_path):
    frame = market(("X",), n=1500, seed=5)
    kw = dict(lookback=10, pred_len=4, stride=4, sample_count=64, max_origins=300)
    cal = calibrate_sampling(gaussian_sampler(0.85), frame, **kw)
    assert (cal.temperature, cal.top_p) == (0.85, 0.9)  # top-p ties: the starting 0.9 is kept
    assert len(cal.grid) == 15 and cal.n_origins == 300 and cal.split == "validation"
    crps = {(g["temperature"], g["top_p"]): g["close_crps"] for g in cal.grid}
    assert min(crps.values()) == crps[(0.85, 0.9)] == cal.after["close_crps"] < cal.before["close_crps"]
    # before (T = 1, spread 1.18 x the truth) over-covers; after sits near nominal
    assert cal.before["temperature"] == 1.0 and cal.before["coverage_80"] > 0.84
    for level in (50, 80, 95):
        assert abs(cal.after[f"coverage_{level}"] - level / 100) < 0.04
    assert cal.sampling() == {"temperature": 0.85, "top_p": 0.9}
    # another truth, another answer (a smaller grid around it, to keep the test quick)
    other = calibrate_sampling(gaussian_sampler(1.15), frame, temperatures=(0.85, 1.0, 1.15, 1.3), top_ps=(0.9,), **kw)
    assert other.temperature == 1.15

    path = cal.save(tmp_path)
    assert path == tmp_path / CALIBRATION_FILE
    assert json.loads(path.read_text())["temperature"] == 0.85  # plain JSON
    assert SamplingCalibration.load(tmp_path) == cal


def test_calibration_with_a_kronos_predictor_runs_the_grid():
    from conftest import FIXTURES

    from kronos_kit.data import load_ohlcv, split
    from kronos_kit.forecast import KronosPredictor
    from kronos_kit.model import Kronos, KronosTokenizer

    predictor = KronosPredictor(Kronos.from_pretrained(FIXTURES / "predictor"),
                                KronosTokenizer.from_pretrained(FIXTURES / "tokenizer"), max_context=40)
    splits = split(load_ohlcv(FIXTURES.parent.parent / "data" / "ashare_5min_sample.csv", symbol="A"),
                   lookback=32, predict=8)
    cal = calibrate_sampling(predictor, splits, lookback=32, pred_len=4, stride=40, sample_count=3, max_origins=3,
                             temperatures=(0.7, 1.0), top_ps=(0.9,))
    assert [(g["temperature"], g["top_p"]) for g in cal.grid] == [(0.7, 0.9), (1.0, 0.9)]
    assert cal.grid[0]["close_crps"] != cal.grid[1]["close_crps"]  # the temperature reached the sampler
    assert cal.n_origins == 3


def test_run_files_reject_bad_content(tmp_path):
    cal = SamplingCalibration(temperature=1.0, top_p=0.9, model="finetuned", before={}, after={}, grid=[],
                              n_origins=1, rule="r")
    path = cal.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "temperature": "hot"}))
    with pytest.raises(ValueError, match="c.json: field 'temperature' must be a number"):
        SamplingCalibration.load(path)
    path.write_text(json.dumps({**data, "code": "import os"}))
    with pytest.raises(ValueError, match="unknown field"):
        SamplingCalibration.load(path)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "top_p"}))
    with pytest.raises(ValueError, match="'top_p' is missing"):
        SamplingCalibration.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingCalibration.load(path)
    with pytest.raises(FileNotFoundError, match=PROMOTION_FILE):
        Promotion.load(tmp_path)


# ------------------------------------------------------------------------------ promotion


SOURCES = {"finetuned_sources": ("run/tokenizer/best", "run/predictor/best"),
           "base_sources": ("NeoQuasar/Kronos-Tokenizer-base", "NeoQuasar/Kronos-small")}


def validation_result(finetuned_fn, base_fn, frame):
    return walk_forward(frame, {"base": base_fn, "finetuned": finetuned_fn}, lookback=40, pred_len=6, stride=6,
                        sample_count=5, baselines=(), seed=0, progress=False)


def test_promotion_keeps_base_when_finetuned_is_worse_on_validation(tmp_path):
    frame = market(("X",), n=300, seed=3)
    promo = decide_promotion(validation_result(bad(frame), good(frame), frame), **SOURCES)
    assert promo.promoted == "base"
    assert (promo.tokenizer, promo.predictor) == SOURCES["base_sources"]
    ev = promo.evidence["metric"]
    assert ev["model_mean"] > ev["other_mean"] and ev["verdict"] == "worse" and ev["n_origins"] == 43
    assert promo.reason.startswith("Promoted base: finetuned did not beat it on the validation close CRPS")
    assert promo.split == "validation" and "never on test" in promo.rule
    promo.save(tmp_path)
    assert Promotion.load(tmp_path / PROMOTION_FILE) == promo


def test_promotion_picks_finetuned_when_better_on_validation():
    frame = market(("X",), n=300, seed=3)
    promo = decide_promotion(validation_result(good(frame), bad(frame), frame), **SOURCES)
    assert promo.promoted == "finetuned"
    assert (promo.tokenizer, promo.predictor) == SOURCES["finetuned_sources"]
    assert promo.evidence["metric"]["relative_skill"] > 0.5
    # judged by MAE instead, same answer
    assert decide_promotion(validation_result(good(frame), bad(frame), frame), metric="close_ae",
                            **SOURCES).promoted == "finetuned"


def test_promotion_refuses_a_crps_gain_bought_with_a_worse_point_forecast():
    # base: one path at truth (1 + a); finetuned: two paths at truth (1 + 1.5a -+ 1.8a). Per origin the
    # finetuned CRPS is (0.3a + 3.3a)/2 - 1.8a/2 = 0.9a < a, but its median sits 1.5a off: MAE 1.5a > a.
    frame = market(("X",), n=300, seed=3)
    base = around_truth(frame, lambda h, s: np.array([size(h)]))
    tuned = around_truth(frame, lambda h, s: size(h) * np.array([1.5 - 1.8, 1.5 + 1.8]))
    res = validation_result(tuned, base, frame)
    crps = res.origin_loss("finetuned", "close_crps") / res.origin_loss("base", "close_crps")
    np.testing.assert_allclose(crps, 0.9, rtol=1e-3)
    promo = decide_promotion(res, **SOURCES)
    assert promo.evidence["metric"]["model_mean"] < promo.evidence["metric"]["other_mean"]
    assert promo.evidence["close_mae"]["verdict"] == "worse"
    assert promo.promoted == "base" and "close MAE is significantly worse" in promo.reason


def test_promotion_needs_the_lower_crps_even_with_a_better_point_forecast():
    # finetuned: two paths at truth (1 -+ 3a): median exactly on the truth (MAE 0 < a) but CRPS
    # (3a + 3a)/2 - 6a/4 = 1.5a > a: worse on the promotion metric, so the base stays
    frame = market(("X",), n=300, seed=3)
    base = around_truth(frame, lambda h, s: np.array([size(h)]))
    wide = around_truth(frame, lambda h, s: size(h) * np.array([-3.0, 3.0]))
    res = validation_result(wide, base, frame)
    promo = decide_promotion(res, **SOURCES)
    assert promo.evidence["close_mae"]["verdict"] == "better"
    assert promo.evidence["metric"]["model_mean"] == pytest.approx(1.5 * promo.evidence["metric"]["other_mean"],
                                                                   rel=1e-3)
    assert promo.promoted == "base" and promo.tokenizer == SOURCES["base_sources"][0]


# ------------------------------------------------------------------------------ too few validation origins


@pytest.mark.parametrize("n_bars", [52, 58, 90])  # 1, 2 and 9 validation origins
def test_promotion_on_too_few_origins_keeps_the_base_and_says_why(n_bars, caplog):
    """Item 7 of issue 20: a clearly better finetuned model on a handful of origins is not promoted, and a
    "not testable" MAE test never counts as "not worse"."""
    from kronos_kit.evaluate.decisions import MIN_DECISION_ORIGINS

    frame = market(("X",), n=n_bars, seed=3)
    res = validation_result(good(frame), bad(frame), frame)
    n = res.n_origins
    assert 1 <= n < MIN_DECISION_ORIGINS
    with caplog.at_level("WARNING", logger="kronos_kit.evaluate.decisions"):
        promo = decide_promotion(res, **SOURCES)
    assert promo.evidence["metric"]["model_mean"] < promo.evidence["metric"]["other_mean"]  # it looks better
    assert promo.promoted == "base" and (promo.tokenizer, promo.predictor) == SOURCES["base_sources"]
    assert f"{n} validation origins are fewer than the {MIN_DECISION_ORIGINS}" in promo.reason
    assert "promotion:" in caplog.text


def test_calibration_on_too_few_origins_keeps_the_configured_sampling(caplog):
    frame = market(("X",), n=80, seed=5)
    with caplog.at_level("WARNING", logger="kronos_kit.evaluate.decisions"):
        cal = calibrate_sampling(gaussian_sampler(0.85), frame, lookback=10, pred_len=4, stride=20, sample_count=16,
                                 temperatures=(0.7, 0.85, 1.3), top_ps=(0.9,), current=(1.0, 0.9))
    assert cal.n_origins < 10
    assert cal.sampling() == {"temperature": 1.0, "top_p": 0.9} and cal.after == cal.before
    assert cal.rule.startswith("not calibrated:") and "kept the configured sampling" in caplog.text


def test_promotion_needs_evidence_not_a_lower_point_estimate():
    """Issue 26, item 4: a finetuned model whose validation CRPS is a little lower by chance is not promoted; the
    one-sided test at evaluation.promotion_level decides, and promotion_level 1 restores the point-estimate rule."""
    frame = market(("X",), n=300, seed=3)
    base = around_truth(frame, lambda h, s: np.array([size(h)]))
    noisy = around_truth(frame, lambda h, s: np.array([size(h) * (0.9 + 0.6 * np.sin(h["close"].iloc[-1] * 7e3))]))
    res = validation_result(noisy, base, frame)
    promo = decide_promotion(res, **SOURCES)
    ev = promo.evidence["metric"]
    assert ev["model_mean"] < ev["other_mean"] and ev["p_one_sided"] > 0.05  # lower, but no evidence
    assert promo.promoted == "base" and "not significantly" in promo.reason
    assert f"one-sided DM p = {ev['p_one_sided']:.2f}" in promo.reason and "minimum detectable effect" in promo.reason
    assert decide_promotion(res, promotion_level=1.0, **SOURCES).promoted == "finetuned"
    clear = decide_promotion(validation_result(good(frame), base, frame), **SOURCES)
    assert clear.promoted == "finetuned" and clear.evidence["metric"]["p_one_sided"] < 0.05
    assert "one-sided DM p < 0.001, below the level 0.05" in clear.reason


def test_the_report_says_what_is_handed_over_and_whether_the_model_adds_anything(tmp_path):
    """Issue 26, item 5: the bottom line states the model's weight and tests the handed-over forecast against the
    best naive forecast on test; report.md has the section, metrics.json the rows, forecasts.parquet the paths."""
    from kronos_kit.calibration import Ensemble, Handover

    frame = market(("X",), n=500, seed=2)
    res = walk_forward(frame, {"base": bad(frame), "finetuned": good(frame)}, lookback=40, pred_len=6, stride=6,
                       sample_count=4, seed=0, progress=False)
    handover = Handover(Ensemble("linear_pool", ["model", "garch_rw"], [0.75, 0.25]))
    res.hand_over(handover, "finetuned")
    paths = write_report(res, tmp_path, n_boot=200)
    payload = json.loads(paths["json"].read_text())
    line = payload["handover_line"]
    assert payload["bottom_line"].endswith(line)  # the bottom line ends with it
    assert line.startswith("What is handed over (linear pool: 75% finetuned, 25% garch_rw; tails: none): the model "
                           "adds ") and "the model's weight is 75%" in line and "lower, significantly, DM p" in line
    rows = {(r["other"], r["metric"]) for r in payload["handover_comparisons"]}
    assert {("garch_rw", "close_crps"), ("bootstrap", "close_crps"), ("finetuned", "close_crps")} <= rows
    report = paths["report"].read_text()
    assert "## What is handed over (ensemble and tails fitted on the validation split)" in report
    # one voice: the verdict first, what is handed over after the decisions, the tables after it
    order = [report.index(h) for h in ("**Bottom line.**", "## The tests behind it", "## Did finetuning help?",
                                       "## What is handed over", "## The test evaluation")]
    assert order == sorted(order)
    assert "- handed_over vs garch_rw, close CRPS: **better** at 5%." in report
    forecasts = pd.read_parquet(paths["forecasts"])
    assert "handed_over" in set(forecasts["model"])
def no_change(frame):
    """A model whose median is exactly the last close (a calibration that centered its median move at 0), with
    a spread around it: its point forecast is persistence's."""
    def fn(histories, hist_stamps, future_stamps, pred_len, sample_count):
        last = np.stack([h.to_numpy()[-1] for h in histories])  # (n, 6)
        spread = np.linspace(-0.02, 0.02, sample_count)  # symmetric: the median is the middle path, spread 0
        return last[:, None, None, :] * (1 + spread[None, :, None, None]) * np.ones((1, 1, pred_len, 1))

    return fn


def test_a_no_change_point_forecast_has_no_direction_ic_or_test_against_persistence(tmp_path):
    """The issue's run: validation shrank the median to no change, and the report still computed IC 0.084 (t 1.39)
    on float rounding. IC, RankIC and direction are undefined there, and its close MAE equals persistence's."""
    frame = market(("X",), n=300, seed=3)
    res = walk_forward(frame, {"base": good(frame), "finetuned": no_change(frame)}, lookback=40, pred_len=6,
                       stride=4, sample_count=5, seed=0, progress=False)
    row = res.table.loc["finetuned"]
    assert np.isnan(row["ic"]) and np.isnan(row["rank_ic"]) and np.isnan(row["directional_accuracy"])
    assert res.scores["finetuned"]["point_is_no_change"] and not res.scores["base"]["point_is_no_change"]
    assert np.isfinite(res.table.loc["base", "ic"])
    assert ic_significance(res).loc["finetuned", ["ic_t", "rank_ic_t"]].isna().all()
    rows = paired_comparisons(res, "finetuned", ("base", "persistence"), n_boot=50)
    mae = rows[(rows["other"] == "persistence") & (rows["metric"] == "close_ae")].iloc[0]
    assert mae["verdict"] == "identical" and np.isnan(mae["p_value"])
    assert "its close MAE is the same as persistence's (the two point forecasts coincide: no test)" in bottom_line(rows)
    text = write_report(res, tmp_path, n_boot=50)["report"].read_text()
    assert "Finetuned IC n/a vs base" in text and "a no-change point forecast" in text


def test_a_calibration_that_centers_the_median_at_zero_makes_the_point_forecast_no_change():
    """With an even number of paths np.median lands a hair above the last close (cosh of half the middle gap):
    the IC of that hair is what the issue's report printed. The calibration says what the median is."""
    from kronos_kit.calibration import PathCalibration

    frame = market(("X",), n=300, seed=4)
    res = walk_forward(frame, {"finetuned": good(frame)}, lookback=40, pred_len=6, stride=4, sample_count=6,
                       seed=0, progress=False)
    assert np.isfinite(res.table.loc["finetuned", "ic"])
    res.calibrate({"finetuned": PathCalibration(method="spread_center", scale=1.0, center=0.0)})
    drift = res.point("finetuned")[..., 3] / res.last_close[:, None] - 1
    assert 0 < np.abs(drift).max() < 1e-3  # not exactly no change ...
    assert res.scores["finetuned"]["point_is_no_change"] and np.isnan(res.table.loc["finetuned", "ic"])  # ... but so
    rows = paired_comparisons(res, "finetuned", ("persistence",), n_boot=50)
    assert rows.set_index("metric").loc["close_ae", "verdict"] == "identical"
