"""The universe evaluation on a synthetic panel with stub forecasters: a planted signal is found and trades, a
shuffled one does not, no decision at a date depends on later prices, signals skip the center shrink, the files
a run writes (universe.json, signals.parquet, report.md's section) agree with each other and with the raw
prices, a single series is left as it was, and promotion can decide on the validation RankIC."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from kronos_kit.calibration import PathCalibration
from kronos_kit.config import EvalConfig
from kronos_kit.data import DataNotice, load_ohlcv, split
from kronos_kit.evaluate import walk_forward, write_report
from kronos_kit.evaluate.decisions import ValidationDecision
from kronos_kit.evaluate.universe import universe_walk_forward
from kronos_kit.evaluate.universe_evaluation import PortfolioRules, analyze, run_universe
from kronos_kit.runs import Promotion

LOOKBACK, HORIZON, STRIDE, PATHS = 30, 5, 5, 4
N_SYMBOLS = 12
BASE_SOURCES = ("embedded:base/tokenizer", "embedded:base/predictor")


def panel(n_days: int = 800, seed: int = 0) -> pd.DataFrame:
    """12 random walks with drifts from -0.1% to +0.1% a day; opens gap from the previous close."""
    rng = np.random.default_rng(seed)
    drift = np.linspace(-0.001, 0.001, N_SYMBOLS)
    close = 50 * np.exp(np.cumsum(drift + rng.normal(0, 0.01, (n_days, N_SYMBOLS)), axis=0))
    open_ = np.vstack([close[:1], close[:-1]]) * np.exp(rng.normal(0, 0.002, (n_days, N_SYMBOLS)))
    days = pd.bdate_range("2015-01-01", periods=n_days)
    frame = pd.concat([pd.DataFrame({"symbol": f"S{k:02d}", "timestamps": days, "open": open_[:, k],
                                     "high": np.maximum(open_[:, k], close[:, k]) * 1.003,
                                     "low": np.minimum(open_[:, k], close[:, k]) * 0.997, "close": close[:, k],
                                     "volume": 1e5}) for k in range(N_SYMBOLS)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataNotice)
        return load_ohlcv(frame)


class Oracle:
    """A stub forecaster that sees a noisy version of the future: its paths end near the realized return over
    the horizon plus ``noise`` x N(0, 1), drawn per (date, symbol) so batching changes nothing."""

    def __init__(self, frame: pd.DataFrame, noise: float, seed: int = 0):
        self.close = frame.pivot(index="timestamps", columns="symbol", values="close")
        self.noise, self.seed = noise, seed

    def __call__(self, hists, hstamps, fstamps, pred_len, samples):
        out = np.empty((len(hists), samples, pred_len, 6))
        for i, (hist, stamps) in enumerate(zip(hists, hstamps)):
            pos = self.close.index.get_loc(stamps.iloc[-1])
            k = self.close.columns.get_loc(hist.attrs["symbol"])
            close = self.close.iloc[:, k].to_numpy()
            rng = np.random.default_rng((self.seed, pos, k))
            end = close[pos + pred_len] / close[pos] - 1 + self.noise * rng.normal()
            path = close[pos] * (1 + end * np.arange(1, pred_len + 1) / pred_len
                                 + rng.normal(0, 0.002, (samples, pred_len)))
            out[i, :, :, :4] = path[..., None]
            out[i, :, :, 4:] = hist.to_numpy()[-1, 4:]
        return out


def momentum_model(hists, hstamps, fstamps, pred_len, samples):
    """A stub that sees only its history: paths continue the history's last 10-bar trend."""
    out = np.empty((len(hists), samples, pred_len, 6))
    for i, hist in enumerate(hists):
        close = hist["close"].to_numpy()
        step = close[-1] / close[-11] - 1
        out[i, :, :, :4] = (close[-1] * (1 + step * np.arange(1, pred_len + 1) / 10))[None, :, None]
        out[i, :, :, 4:] = hist.to_numpy()[-1, 4:]
    return out


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return panel()


@pytest.fixture(scope="module")
def parts(frame):
    return split(frame, lookback=LOOKBACK, predict=HORIZON, ratios=(0.5, 0.25, 0.25))


def walk(split_frame, models, **kwargs):
    args = dict(lookback=LOOKBACK, pred_len=HORIZON, stride=STRIDE, sample_count=PATHS, progress=False, **kwargs)
    return universe_walk_forward(split_frame, models, **args)


def rules(**kwargs) -> PortfolioRules:
    return PortfolioRules.of(EvalConfig(**{"topk": 3, "n_drop": 1, **kwargs}), N_SYMBOLS)


@pytest.fixture(scope="module")
def planted(frame, parts):
    oracle = Oracle(frame, noise=0.03)
    return walk(parts.test, {"base": oracle, "finetuned": oracle})


def test_a_planted_signal_ranks_trades_and_its_breakeven_falls_as_turnover_rises(planted):
    name = "finetuned_expected_return"
    breakevens, turnovers = [], []
    for n_drop in (1, 2, 3):
        a = analyze(planted, rules(n_drop=n_drop), horizon=HORIZON)
        stats, book = a.statistics[name], a.performance[name]["topk"]
        assert stats["rank_ic"] > 0.3 and stats["rank_ic_t"] > 3 and stats["spread"] > 0
        assert book["excess_return"] > 0 and a.performance[name]["long_short"]["excess_return"] > 0
        breakevens.append(book["breakeven_bps"])
        turnovers.append(book["turnover"])
    assert turnovers[0] < turnovers[1] < turnovers[2]
    assert breakevens[0] > breakevens[1] > breakevens[2] > 0
    # the naive placebo has no skill here
    placebo = analyze(planted, rules(), horizon=HORIZON).statistics["placebo"]
    assert abs(placebo["rank_ic_t"]) < 2.5


def test_a_shuffled_signal_has_no_ic_and_its_excess_is_minus_the_costs(planted):
    rng = np.random.default_rng(1)
    signal = planted.signals["finetuned_expected_return"]
    shuffled = np.array([row[rng.permutation(len(row))] for row in signal])
    planted_copy = type(planted)(**{**planted.__dict__, "signals": {"shuffled": shuffled, "planted": signal}})
    a = analyze(planted_copy, rules(), horizon=HORIZON)
    stats, book = a.statistics["shuffled"], a.books["shuffled"]["topk"]
    assert abs(stats["rank_ic"]) < 0.1 and abs(stats["rank_ic_t"]) < 2.5
    gross = book.excess_gross
    assert abs(gross.mean()) < 2.5 * gross.std(ddof=1) / np.sqrt(len(gross))  # no edge before costs ...
    perf = a.performance["shuffled"]["topk"]
    assert perf["excess_return"] == pytest.approx(perf["excess_return_gross"] - perf["cost"])  # ... minus costs
    assert perf["cost"] > 0.01
    assert a.performance["planted"]["topk"]["excess_return_gross"] > 5 * abs(perf["excess_return_gross"])


def changed_after(frame: pd.DataFrame, when: pd.Timestamp, factor: float = 1.7) -> pd.DataFrame:
    out = frame.copy()
    later = out["timestamps"] > when
    out.loc[later, ["open", "high", "low", "close"]] *= factor
    return out


def test_prices_after_t_plus_the_horizon_leave_every_decision_at_t_unchanged(frame, parts, planted):
    t0 = planted.dates[len(planted.dates) // 2]
    cut = planted.grid.dates[planted.grid.dates.get_loc(t0) + HORIZON]
    other = changed_after(frame, cut)
    parts2 = split(other, lookback=LOOKBACK, predict=HORIZON, ratios=(0.5, 0.25, 0.25))
    oracle = Oracle(other, noise=0.03)
    again = walk(parts2.test, {"base": oracle, "finetuned": oracle})
    upto = planted.dates <= t0
    assert upto.sum() >= 3 and (~upto).sum() >= 3
    for name, grid in planted.signals.items():
        np.testing.assert_array_equal(grid[upto], again.signals[name][upto], err_msg=name)
        if name != "placebo":
            assert not np.allclose(grid[~upto], again.signals[name][~upto], equal_nan=True), name
    # the trades decided at t0 or before (filled at the next open) are the same orders
    before = planted.grid.dates.get_loc(t0) + 1
    a, b = (analyze(r, rules(), horizon=HORIZON).books["finetuned_expected_return"]["topk"].trades
            for r in (planted, again))
    a, b = a[a["day"] <= before], b[b["day"] <= before]
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_a_model_that_sees_only_its_history_and_the_factors_ignore_everything_after_the_date(frame, parts):
    first = walk(parts.test, {"base": momentum_model, "finetuned": momentum_model})
    t0 = first.dates[len(first.dates) // 2]
    other = changed_after(frame, t0)  # from the bar right after t0 on
    again = walk(split(other, lookback=LOOKBACK, predict=HORIZON, ratios=(0.5, 0.25, 0.25)).test,
                 {"base": momentum_model, "finetuned": momentum_model})
    upto = first.dates <= t0
    for name in first.signals:
        np.testing.assert_array_equal(first.signals[name][upto], again.signals[name][upto], err_msg=name)
    # forward returns at t0 see the change (the realized side), the signals did not
    at = int(np.flatnonzero(upto)[-1])
    assert not np.allclose(first.forward[:, at], again.forward[:, at])


def test_signals_are_taken_before_the_center_shrink(frame, parts):
    oracle = Oracle(frame, noise=0.03)
    spread = PathCalibration(method="spread", scale=1.5)
    shrunk = PathCalibration(method="spread_center", scale=1.5, center=0.0)
    a = walk(parts.test, {"base": oracle, "finetuned": oracle}, calibrations={"finetuned": spread})
    b = walk(parts.test, {"base": oracle, "finetuned": oracle}, calibrations={"finetuned": shrunk})
    for kind in ("expected_return", "risk_adjusted", "prob_up"):
        np.testing.assert_allclose(a.signals[f"finetuned_{kind}"], b.signals[f"finetuned_{kind}"], rtol=1e-12)
    # the scores use the full calibration: the shrink toward no change moves the median forecast
    assert a.forecast_scores["finetuned"]["close_mae_bp"] != b.forecast_scores["finetuned"]["close_mae_bp"]
    assert a.forecast_scores["base"] == b.forecast_scores["base"]


def evaluation(**kwargs) -> EvalConfig:
    return EvalConfig(pred_len=HORIZON, rebalance_stride=STRIDE, sample_count=PATHS, topk=3, n_drop=1, **kwargs)


@pytest.fixture(scope="module")
def universe_run(frame, parts, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("universe")
    models = {"base": Oracle(frame, noise=0.2, seed=1), "finetuned": Oracle(frame, noise=0.03)}
    ev = run_universe(parts, models, evaluation(), lookback=LOOKBACK, run_dir=run_dir, progress=False, n_boot=200)
    result = walk_forward(parts.test, {"finetuned": models["finetuned"], "base": models["base"]}, lookback=LOOKBACK,
                          pred_len=HORIZON, stride=20, sample_count=PATHS, baselines=("persistence",),
                          progress=False)
    paths = write_report(result, run_dir, n_boot=50, universe=ev)
    return ev, run_dir, paths


def test_universe_json_holds_the_sweep_contract_and_both_splits(universe_run):
    ev, run_dir, _ = universe_run
    data = json.loads((run_dir / "universe.json").read_text())
    for split_name in ("validation", "test"):
        for name in ("base", "finetuned", "momentum", "reversal", "placebo"):
            entry = data[split_name][name]
            assert isinstance(entry["rank_ic"], float) and isinstance(entry["ic"], float)
            assert entry["n_dates"] == ev.results[split_name].config["n_dates"] > 10
        assert data[split_name]["finetuned"] == data[split_name]["signals"]["finetuned_expected_return"]
    assert data["validation"]["finetuned"]["rank_ic"] > data["validation"]["base"]["rank_ic"] > 0
    assert {r["metric"] for r in data["comparisons"]} == {"rank_ic", "topk_excess"}
    assert data["bottom_line"].startswith("Universe (12 symbols")


def test_ic_recomputed_from_signals_parquet_and_raw_prices_matches_the_report(universe_run, frame):
    ev, run_dir, paths = universe_run
    signals = pd.read_parquet(run_dir / "signals.parquet")
    assert signals.index.names == ["datetime", "instrument"]
    test = signals[signals["split"] == "test"]
    close = frame.pivot(index="timestamps", columns="symbol", values="close")
    forward = close.shift(-HORIZON) / close - 1  # the split's calendar is the panel's calendar here
    ric, ic = [], []
    for date, rows in test.groupby(level="datetime"):
        score = rows["finetuned_expected_return"].droplevel("datetime")
        realized = forward.loc[date, score.index]
        ric.append(spearmanr(score, realized).statistic)
        ic.append(np.corrcoef(score, realized)[0, 1])
    data = json.loads((run_dir / "universe.json").read_text())["test"]["finetuned"]
    assert np.mean(ric) == pytest.approx(data["rank_ic"], rel=1e-9)
    assert np.mean(ic) == pytest.approx(data["ic"], rel=1e-9)
    # report.md's signals table prints the same numbers (4 significant digits)
    lines = paths["report"].read_text().splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("### Signals at horizon"))
    row = next(line for line in lines[table:] if line.startswith("| finetuned | "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(np.mean(ric), rel=1e-3)
    assert float(cells[4]) == pytest.approx(np.mean(ic), rel=1e-3)


def test_the_report_carries_the_universe_section_and_bottom_line(universe_run):
    ev, run_dir, paths = universe_run
    report = paths["report"].read_text()
    for heading in ("## Universe: does the model rank the names", "### IC decay", "### Quantile returns",
                    "### Portfolios", "### Verdicts (paired tests on the test split)"):
        assert heading in report
    # the universe's word is in the verdict at the top; its section comes before the per-series tables
    assert report.index(ev.bottom_line) < report.index("## Universe") < report.index("## The test evaluation")
    metrics = json.loads(paths["json"].read_text())
    assert metrics["bottom_line"].endswith(ev.bottom_line)
    assert "finetuned vs base, RankIC: **better" in report  # the oracle with less noise ranks better
    assert ev.summary().loc["finetuned_expected_return", "topk_excess"] > 0


def test_a_single_series_has_no_universe_and_its_report_is_unchanged(parts, tmp_path):
    one = parts.test[parts.test["symbol"] == "S00"].reset_index(drop=True)
    splits = type(parts)(parts.train, parts.val[parts.val["symbol"] == "S00"].reset_index(drop=True), one)
    ev = run_universe(splits, {"base": momentum_model, "finetuned": momentum_model}, evaluation(),
                      lookback=LOOKBACK, run_dir=tmp_path / "run", progress=False)
    assert not ev.exists and "no cross-section" in ev.reason and "1 symbol" in ev.reason
    assert not (tmp_path / "run").exists()
    result = walk_forward(one, {"finetuned": momentum_model, "base": momentum_model}, lookback=LOOKBACK,
                          pred_len=HORIZON, stride=20, sample_count=PATHS, baselines=("persistence",), progress=False)
    # the same folder name: report.md's title names the run folder
    with_universe = write_report(result, tmp_path / "a" / "run", n_boot=20, universe=ev)
    without = write_report(result, tmp_path / "b" / "run", n_boot=20)
    assert with_universe["report"].read_text() == without["report"].read_text()
    assert with_universe["json"].read_bytes() == without["json"].read_bytes()
    with pytest.raises(ValueError, match="promote_on=rank_ic needs a panel, but no cross-section"):
        run_universe(splits, {"base": momentum_model, "finetuned": momentum_model},
                     evaluation(promote_on="rank_ic"), lookback=LOOKBACK, progress=False)


@pytest.mark.parametrize("better", ["finetuned", "base"])
def test_promotion_on_the_validation_rank_ic(frame, parts, tmp_path, better):
    sharp, blunt = Oracle(frame, noise=0.03), Oracle(frame, noise=0.3, seed=1)
    models = {"finetuned": sharp, "base": blunt} if better == "finetuned" else {"finetuned": blunt, "base": sharp}
    first = Promotion(promoted="base", tokenizer=BASE_SOURCES[0], predictor=BASE_SOURCES[1], reason="by CRPS")
    decision = ValidationDecision(None, first, None)
    ev = run_universe(parts, models, evaluation(promote_on="rank_ic"), lookback=LOOKBACK, decision=decision,
                      finetuned_sources=BASE_SOURCES, base_sources=BASE_SOURCES, run_dir=tmp_path, progress=False,
                      n_boot=50)
    promotion = Promotion.load(tmp_path)
    assert promotion.promoted == better == ev.decision.promotion.promoted
    assert promotion.metric == "rank_ic" and promotion.checkpoints  # bound to the weights like the first
    assert "validation RankIC" in promotion.reason and "never on test" in promotion.rule
    evidence = promotion.evidence["rank_ic"]
    assert evidence["n"] == ev.results["validation"].config["n_dates"]


def test_rank_ic_promotion_needs_evidence_not_a_higher_mean():
    """A finetuned RankIC higher by a hair (p far from 5%) keeps the base pair, as the CRPS promotion does; the same
    series with promotion_level 1 (a higher mean suffices) promotes it."""
    from kronos_kit.evaluate.universe_verdicts import rank_ic_promotion

    rng = np.random.default_rng(0)
    base, noise = rng.normal(0.02, 0.1, 120), rng.normal(0, 0.1, 120)
    stats = {"finetuned": {"series": {"rank_ic": base + 0.002 + noise - noise.mean()}},
             "base": {"series": {"rank_ic": base}}}
    kw = dict(finetuned_sources=("t", "p"), base_sources=BASE_SOURCES, stride=5, horizon=10, signal="expected_return")
    assert stats["finetuned"]["series"]["rank_ic"].mean() > base.mean()
    strict = rank_ic_promotion(stats, **kw)
    assert strict.promoted == "base" and "not with evidence" in strict.reason
    assert strict.evidence["rank_ic"]["p_one_sided"] > 0.05
    assert rank_ic_promotion(stats, **kw, promotion_level=1.0).promoted == "finetuned"


def test_a_rerun_writes_the_same_files(frame, parts, universe_run, tmp_path):
    _, run_dir, _ = universe_run
    models = {"base": Oracle(frame, noise=0.2, seed=1), "finetuned": Oracle(frame, noise=0.03)}
    run_universe(parts, models, evaluation(), lookback=LOOKBACK, run_dir=tmp_path, progress=False, n_boot=200)
    assert (tmp_path / "universe.json").read_bytes() == (run_dir / "universe.json").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "signals.parquet"),
                                  pd.read_parquet(run_dir / "signals.parquet"))


def test_universe_figures_show_each_compared_signal_and_nothing_without_a_cross_section(universe_run, tmp_path):
    from matplotlib.figure import Figure

    from kronos_kit.evaluate.universe_evaluation import UniverseEvaluation
    from kronos_kit.plots import UNIVERSE_FIGURES, universe_figure

    ev, _, _ = universe_run
    for name, (_, file) in UNIVERSE_FIGURES.items():
        fig = universe_figure(ev, name, tmp_path)
        assert isinstance(fig, Figure) and (tmp_path / file).stat().st_size > 10_000
        labels = {t.get_text().split(":")[0].split(" ")[0] for ax in fig.axes if ax.get_legend()
                  for t in ax.get_legend().get_texts()}
        expected = {"finetuned", "base"} if name == "ic_series" else {"finetuned", "base", "momentum", "reversal",
                                                                      "placebo"}
        assert expected <= labels, (name, labels)
        assert all(ax.get_title() for ax in fig.axes)
    assert universe_figure(UniverseEvaluation("no cross-section"), "cumulative", tmp_path / "none") is None
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="unknown universe figure"):
        universe_figure(ev, "sharpe", tmp_path)


def test_evaluate_universe_samples_kronos_pairs_alike_and_applies_each_models_calibration(tmp_path):
    """The notebook's call on the kit's embedded pair, given twice: the same seed gives both the same paths, and
    only the finetuned one has a path calibration (a full shrink toward no change), which moves its scores but
    not its signals."""
    from kronos_kit.evaluate import evaluate_universe
    from kronos_kit.model import Kronos, KronosTokenizer
    from kronos_kit.runs import SamplingCalibration

    small = panel(n_days=260)
    small = small[small["symbol"].isin([f"S{k:02d}" for k in range(6)])].reset_index(drop=True)
    parts = split(small, lookback=LOOKBACK, predict=3, ratios=(0.6, 0.2, 0.2))
    pair = (Kronos.from_pretrained("embedded:base/predictor"),
            KronosTokenizer.from_pretrained("embedded:base/tokenizer"))
    shrink = {"path_calibration": {"method": "spread_center", "scale": 1.0, "power": 0.0, "center": 0.0}}
    calibration = SamplingCalibration(temperature=1.0, top_p=0.9, model="finetuned", paths={"finetuned": shrink})
    decision = ValidationDecision(None, Promotion(promoted="base", tokenizer="t", predictor="p"), calibration)
    e = EvalConfig(pred_len=3, rebalance_stride=10, sample_count=2, topk=2, n_drop=1)
    ev = evaluate_universe(parts, {"base": pair, "finetuned": pair}, e, lookback=LOOKBACK, decision=decision,
                           progress=False, n_boot=50)
    assert ev.exists and ev.settings["calibrated"] and ev.decision is decision
    test = ev.results["test"]
    assert test.config["path_calibration"] == {"finetuned": PathCalibration.from_dict(shrink["path_calibration"])
                                               .describe()}
    for kind in ("expected_return", "risk_adjusted", "prob_up"):
        np.testing.assert_array_equal(test.signals[f"base_{kind}"], test.signals[f"finetuned_{kind}"])
    assert test.forecast_scores["base"]["close_mae_bp"] != test.forecast_scores["finetuned"]["close_mae_bp"]


class Unread:
    """A split that fails the test the moment anything reads it (a column, its length, a copy)."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __getitem__(self, key):
        raise AssertionError(f"the test split was read ([{key!r}])")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


def test_the_validation_part_never_reads_the_test_split_and_equals_the_full_runs(frame, parts, universe_run,
                                                                                  tmp_path):
    """A sweep trial's call (test=False): with a test split that cannot be read it still writes universe.json (the
    validation split only) and the validation signals, equal to what the full run wrote for validation; with
    promote_on: rank_ic its promotion is the full run's."""
    _, run_dir, _ = universe_run
    blind = type(parts)(parts.train, parts.val, Unread())
    models = {"base": Oracle(frame, noise=0.2, seed=1), "finetuned": Oracle(frame, noise=0.03)}
    ev = run_universe(blind, models, evaluation(), lookback=LOOKBACK, run_dir=tmp_path / "part", progress=False,
                      test=False)
    assert not ev.exists and list(ev.analyses) == ["validation"] and "validation only" in ev.reason
    part = json.loads((tmp_path / "part" / "universe.json").read_text())
    full = json.loads((run_dir / "universe.json").read_text())
    assert part["splits"] == ["validation"] and "test" not in part and full["splits"] == ["validation", "test"]
    assert part["validation"] == full["validation"] and part["best_naive"] == full["best_naive"]
    signals = pd.read_parquet(run_dir / "signals.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "part" / "signals.parquet"),
                                  signals[signals["split"] == "validation"])
    first = Promotion(promoted="base", tokenizer=BASE_SOURCES[0], predictor=BASE_SOURCES[1], reason="by CRPS")
    promoted = {}
    for name, splits, test in (("part", blind, False), ("whole", parts, True)):
        run_universe(splits, models, evaluation(promote_on="rank_ic"), lookback=LOOKBACK, run_dir=tmp_path / name,
                     decision=ValidationDecision(None, first, None), finetuned_sources=BASE_SOURCES,
                     base_sources=BASE_SOURCES, progress=False, n_boot=50, test=test)
        promoted[name] = Promotion.load(tmp_path / name)
    assert promoted["part"].metric == "rank_ic" and promoted["part"] == promoted["whole"]
