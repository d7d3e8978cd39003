"""Can the kit hand over a forecast distribution a researcher can trust? Calibration options x datasets.

For each dataset and seed this runs what the pipeline runs after phase 1: phase 2 from the embedded
base (`embedded:base/predictor`, configs/default.yaml's strategy and steps; phase 1 skipped, so every
row of a dataset shares the base tokenizer), the validation step (base and finetuned forecast the
validation origins; promotion), then ONE test walk-forward of base, finetuned and every naive
baseline at the configured sampling. Every calibration option is then fitted on the validation
paths only and applied to the same test paths (the layer is post-hoc on sample paths, so sampling
happens once):

- `none`: the paths as sampled;
- `temp/top-p`: temperature x top-p grid of the promoted model fitted on validation CRPS
  (`evaluate.calibrate_sampling`, grid 0.85 / 1.0 / 1.15 x 0.9 / 1.0 on at most 100 validation
  origins); the test is forecast again at the chosen setting (only this option samples twice);
- `spread`, `spread+center`, `conformal`: that path calibration (`kronos_kit.calibration`) forced;
- `chosen`: what the kit does by default: the method picked by blocked cross-validation of the
  validation CRPS among none / spread / spread+center / conformal.

Each model gets its own fit of the option (base and finetuned alike, so "vs base" compares like with
like; under `temp/top-p` the base stays at the configured sampling). Columns: the validation gain of
the option (held-out validation CRPS / uncalibrated - 1: what a default may be chosen by), then the
promoted model's test coverage 50/80/95, test close CRPS vs base, vs the best naive probabilistic
baseline (lowest test CRPS among drift, random_walk, garch_rw, bootstrap) with the DM verdict and
the minimum detectable effect, and close MAE vs persistence.

Option `handover` (issue 26) runs what notebook 03 hands over instead: the kit's own
`evaluate.calibrate_forecasts` on the validation paths (path calibration, then the ensemble with the naive
members and the tails, cross-fitted), applied to the one test walk-forward (`EvaluationResult.calibrate`,
`.hand_over`). Its table (`handover_summary`) has per dataset the calibrated model alone, the best naive
forecast on test and the handed-over forecast: close CRPS, MAE, coverage 80 / 95, the weights, the held-out
validation coverage before / after, and the paired test of the handed-over forecast against the best naive.

Datasets: `nasdaq` (the default run's daily data), `ashare5m` (the 5-minute A-share sample),
`synthetic1h` (bench_strategies.py's seeded hourly GARCH set, 4 symbols), `daily2000` (one seeded
daily series of 2,000 bars with GARCH(1,1) Student-t returns: ~200 test bars, data no model saw),
`us15` (the 15-stock US daily panel in ../shared/data, pooled over the symbols as the walk-forward does;
`US15_ORIGINS` origins per split, i.e. 80 dates x 15 symbols) and `sp500` (the S&P 500 sample the kit's
base model was pretrained on: real, but not unseen by the base).

    .venv/bin/python benchmarks/bench_calibration.py [--quick] [--seeds 0 1] [--jobs 2] [--threads 1]
        [--datasets nasdaq ...] [--out PATH] [--set KEY=VALUE ...] [--options none handover ...]
        [--checkpoints OUT_work/runs] [--reuse]
    .venv/bin/python benchmarks/bench_calibration.py --summarize OUT_work/rows
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("nasdaq", "ashare5m", "synthetic1h", "daily2000", "us15", "sp500")
OPTIONS = ("none", "temp/top-p", "spread", "spread+center", "conformal", "chosen", "handover")
US15_ORIGINS = 1200  # us15: origins per split, 80 dates x 15 symbols (max_origins keeps whole cross-sections)
PATH_METHOD = {"spread": ("spread",), "spread+center": ("spread_center",), "conformal": ("conformal",),
               "chosen": None}  # None: every method, chosen by validation CV (the kit's default)
NAIVE = ("drift", "random_walk", "garch_rw", "bootstrap")
GRID = {"temperatures": (0.85, 1.0, 1.15), "top_ps": (0.9, 1.0), "max_origins": 100}
DATA_SETTINGS = {
    "nasdaq": {"data.source": "sample:nasdaq"},
    "ashare5m": {"data.source": str(ROOT / "tests" / "data" / "ashare_5min_sample.csv"), "data.symbol": "ASHARE"},
    "synthetic1h": {},  # the generated CSVs
    "daily2000": {"data.symbol": "DAILY"},
    "us15": {"data.source": str(ROOT.parent / "shared" / "data" / "us_stocks_daily_15.csv"),
             "evaluation.max_origins": US15_ORIGINS, "evaluation.val_origins": US15_ORIGINS},
    "sp500": {"data.source": "sample:sp500"},
}
QUICK = {
    "data.lookback": 40, "predictor.max_steps": 4, "predictor.eval_every": 2, "predictor.batch_size": 16,
    "predictor.skill_origins": 4, "predictor.skill_paths": 2, "predictor.skill_horizon": 5,
    "evaluation.max_origins": 16, "evaluation.val_origins": 16, "evaluation.sample_count": 8,
    "evaluation.pred_len": 5,
}


def _bench_strategies():
    spec = importlib.util.spec_from_file_location("bench_strategies", ROOT / "benchmarks" / "bench_strategies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_daily(path: Path, *, seed: int = 11, bars: int = 2000) -> Path:
    """One daily series (business days) of GARCH(1,1) returns with Student-t(5) shocks; OHLC from a range."""
    rng = np.random.default_rng(seed)
    omega, alpha, beta = 4e-6, 0.07, 0.9
    var = omega / (1 - alpha - beta)
    shocks = rng.standard_t(5, bars) / np.sqrt(5 / 3)
    rets = np.empty(bars)
    for t in range(bars):
        rets[t] = 0.0002 + np.sqrt(var) * shocks[t]
        var = omega + alpha * (rets[t] - 0.0002) ** 2 + beta * var
    close = 40.0 * np.exp(np.cumsum(rets))
    opens = np.concatenate([[40.0], close[:-1]]) * np.exp(0.002 * rng.standard_normal(bars))
    wick = np.abs(rng.standard_normal((2, bars))) * 0.006 * close
    frame = pd.DataFrame({"timestamps": pd.bdate_range("2015-01-02", periods=bars), "open": opens,
                          "high": np.maximum(opens, close) + wick[0], "low": np.minimum(opens, close) - wick[1],
                          "close": close, "volume": rng.lognormal(12, 0.4, bars) * (1 + 30 * np.abs(rets))})
    frame["amount"] = frame["volume"] * frame[["open", "high", "low", "close"]].mean(axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def _with_paths(result, samples: dict):
    """A copy of an EvaluationResult whose sample paths of some models are replaced, rescored."""
    from kronos_kit import metrics as M

    out = copy.copy(result)
    out.samples = {**result.samples, **samples}
    out.vol_pred = {**result.vol_pred, **{k: M.predicted_vol(v, result.last_close) for k, v in samples.items()}}
    out.config = dict(result.config)
    out.rescore()
    return out


def _option_paths(option: str, val, test, models: tuple[str, ...]) -> tuple[dict, dict]:
    """Test paths of each model under a path option (fitted on validation) and the promoted fit's summary."""
    from kronos_kit.calibration import METHODS, apply_path_calibration, fit_path_calibration

    paths, fits = {}, {}
    for name in models:
        methods = METHODS if PATH_METHOD[option] is None else PATH_METHOD[option]
        fit = fit_path_calibration(val.samples[name], val.realized, val.last_close, methods=methods,
                                   order=val.origin_time)
        paths[name] = apply_path_calibration(test.samples[name], test.last_close, fit.calibration)
        chosen = next(c for c in fit.candidates if c["method"] == fit.calibration.method)
        fits[name] = {"val_gain": chosen["cv_crps"] / fit.before["fair_crps"] - 1,
                      "describe": fit.calibration.describe()}
    return paths, fits


def _row(result, promoted: str, option: str, val_gain: float, describe: str) -> dict:
    from kronos_kit.evaluate import paired_comparisons

    table = result.table
    naive = min((n for n in NAIVE if n in table.index), key=lambda n: table.at[n, "close_crps"])
    cmp = paired_comparisons(result, promoted, (naive,), seed=0).set_index("metric")
    crps = table.at[promoted, "close_crps"]
    return {
        "option": option, "val_gain": val_gain, "describe": describe, "origins": result.n_origins,
        **{f"cov{lvl}": float(table.at[promoted, f"coverage_{lvl}"]) for lvl in (50, 80, 95)},
        "crps_vs_base": crps / table.at["base", "close_crps"] - 1 if promoted != "base" else 0.0,
        "best_naive": naive, "crps_vs_naive": crps / table.at[naive, "close_crps"] - 1,
        "dm_naive": cmp.at["close_crps", "verdict"], "p_naive": float(cmp.at["close_crps", "p_value"]),
        "mde_naive": float(cmp.at["close_crps", "mde"]) if "mde" in cmp.columns else float("nan"),
        "mae_vs_persistence": table.at[promoted, "close_mae"] / table.at["persistence", "close_mae"] - 1,
    }


def _save_result(result, path: Path, **extra) -> None:
    """The arrays of a walk-forward (no pickle), so `--reuse` refits calibrations without sampling again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kinds": result.kinds, "config": result.config, **extra}
    np.savez(path, symbols=result.symbols.astype(str), origin_time=result.origin_time, origin_pos=result.origin_pos,
             history=result.history, realized=result.realized, meta=np.array(json.dumps(meta, default=str)),
             **{f"samples__{k}": v for k, v in result.samples.items()},
             **{f"vol__{k}": v for k, v in result.vol_pred.items()})


def _load_result(path: Path):
    from kronos_kit.evaluate import EvaluationResult

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        samples = {k.removeprefix("samples__"): z[k] for k in z.files if k.startswith("samples__")}
        vol = {k.removeprefix("vol__"): z[k] for k in z.files if k.startswith("vol__")}  # GARCH has only this
        result = EvaluationResult(symbols=z["symbols"].astype(object), origin_time=z["origin_time"],
                                  origin_pos=z["origin_pos"], history=z["history"], realized=z["realized"],
                                  samples=samples, vol_pred=vol, kinds=meta["kinds"], config=meta["config"])
    result.rescore()
    return result, meta


def run_one(dataset: str, seed: int, out_dir: str, quick: bool, threads: int, overrides: dict,
            checkpoints: str | None = None, options: tuple[str, ...] = OPTIONS, reuse: bool = False) -> list[dict]:
    """Phase 2, validation, one test walk-forward, then every calibration option: rows of the table.

    The two walk-forwards are kept under ``<out>_work/results``; with ``reuse`` they are read back instead
    of training and sampling again (the calibration options are refit on them)."""
    import torch

    torch.set_num_threads(threads)
    from kronos_kit.config import KitConfig
    from kronos_kit.data import load_data
    from kronos_kit.evaluate import decide_promotion, evaluate_models
    from kronos_kit.model import Kronos, KronosTokenizer
    from kronos_kit.train import train_predictor

    start = time.perf_counter()
    run_dir = Path(out_dir) / "runs" / f"{dataset}-seed{seed}"
    settings = dict(DATA_SETTINGS[dataset])
    if dataset == "synthetic1h":
        settings["data.source"] = str(Path(out_dir) / "data" / "synthetic_hourly.csv")
    if dataset == "daily2000":
        settings["data.source"] = str(Path(out_dir) / "data" / "synthetic_daily.csv")
    cfg = KitConfig.from_file(ROOT / "configs" / "default.yaml").with_overrides({
        **settings, **(QUICK if quick else {}), **overrides, "seed": seed, "run_dir": str(run_dir),
        "tokenizer.enabled": False})
    bundle = load_data(cfg)
    e, lookback = cfg.evaluation, cfg.data.lookback
    cache = Path(out_dir) / "results" / f"{dataset}-seed{seed}"
    if reuse and (cache / "test.npz").is_file():
        (val, meta), (test, _) = _load_result(cache / "val.npz"), _load_result(cache / "test.npz")
        promoted, steps, t_val, t_test = meta["promoted"], meta["steps"], meta["val_s"], meta["test_s"]
    else:
        reused = Path(checkpoints) / run_dir.name / "predictor" / "best" if checkpoints else None
        if reused is not None and reused.is_dir():  # phase 2 of an earlier run of this script: sample again only
            best_dir, steps = reused, "reused"
        else:
            phase2 = train_predictor(cfg, data=bundle, progress=False)
            best_dir, steps = phase2.best_dir, phase2.steps
        tok = cfg.tokenizer.start_from
        models = {name: (Kronos.from_pretrained(src), KronosTokenizer.from_pretrained(tok))
                  for name, src in (("base", cfg.predictor.start_from), ("finetuned", best_dir))}
        t0 = time.perf_counter()
        val = evaluate_models(bundle.splits.val, models, lookback=lookback, pred_len=e.pred_len, stride=e.stride,
                              sample_count=e.sample_count, max_origins=e.val_origins, baselines=(), seed=seed,
                              progress=False)
        promoted = decide_promotion(val, finetuned_sources=(tok, str(best_dir)),
                                    base_sources=(tok, cfg.predictor.start_from), seed=seed).promoted
        t_val = time.perf_counter() - t0
        test = evaluate_models(bundle.splits.test, models, e, lookback=lookback, seed=seed, progress=False)
        t_test = time.perf_counter() - t0 - t_val
        times = {"promoted": promoted, "steps": steps, "val_s": t_val, "test_s": t_test}
        _save_result(val, cache / "val.npz", **times)
        _save_result(test, cache / "test.npz", **times)
    rows = [_row(test, promoted, "none", 0.0, "as sampled")] if "none" in options else []
    if "handover" in options:
        rows_dir = Path(out_dir) / "rows"
        rows_dir.mkdir(parents=True, exist_ok=True)
        row = {"dataset": dataset, "seed": seed, "steps": steps, "val_s": t_val, "test_s": t_test,
               **_handover_row(val, test, promoted, e, lookback, bundle, seed)}
        (rows_dir / f"{dataset}-seed{seed}-handover.json").write_text(json.dumps(row, indent=1))
    if "temp/top-p" in options:
        if reuse:
            raise ValueError("--reuse has no models to sample the temperature grid with; leave out temp/top-p")
        rows.append(_temperature_row(bundle, models, e, lookback, seed, promoted, test))
    for option in [o for o in options if o in PATH_METHOD]:
        paths, fits = _option_paths(option, val, test, ("base", "finetuned"))
        rows.append(_row(_with_paths(test, paths), promoted, option, fits[promoted]["val_gain"],
                         fits[promoted]["describe"]))
    common = {"dataset": dataset, "seed": seed, "promoted": promoted, "steps": steps,
              "val_origins": val.n_origins, "wall_s": time.perf_counter() - start, "val_s": t_val, "test_s": t_test}
    rows = [{**common, **r} for r in rows]
    rows_dir = Path(out_dir) / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    (rows_dir / f"{dataset}-seed{seed}.json").write_text(json.dumps(rows, indent=1))
    return rows


def _temperature_row(bundle, models, e, lookback: int, seed: int, promoted: str, test) -> dict:
    """Temperature / top-p grid on validation, then the promoted model sampled again on test at the choice."""
    from kronos_kit.evaluate import calibrate_sampling, evaluate_models
    from kronos_kit.forecast import KronosPredictor

    predictor = KronosPredictor(*models[promoted], max_context=e.max_context)
    grid = calibrate_sampling(predictor, bundle.splits.val, lookback=lookback, pred_len=e.pred_len, stride=e.stride,
                              sample_count=e.sample_count, max_origins=GRID["max_origins"],
                              temperatures=GRID["temperatures"], top_ps=GRID["top_ps"],
                              current=(e.temperature, e.top_p), seed=seed, model=promoted)
    chosen = (grid.temperature, grid.top_p)
    resampled = test if chosen == (e.temperature, e.top_p) else evaluate_models(
        bundle.splits.test, {promoted: models[promoted]}, lookback=lookback, pred_len=e.pred_len, stride=e.stride,
        sample_count=e.sample_count, max_origins=e.max_origins, temperature=chosen[0], top_p=chosen[1],
        baselines=(), seed=seed, progress=False)
    return _row(_with_paths(test, {promoted: resampled.samples[promoted]}), promoted, "temp/top-p",
                grid.after["close_crps"] / grid.before["close_crps"] - 1, f"T {chosen[0]:g}, top-p {chosen[1]:g}")


def _handover_row(val, test, promoted: str, e, lookback: int, bundle, seed: int) -> dict:
    """What notebook 03 hands over, fitted on validation (the kit's calibrate_forecasts), scored on the test once."""
    from kronos_kit.calibration import Handover, PathCalibration
    from kronos_kit.evaluate import HANDED_OVER, calibrate_forecasts, paired_comparisons

    t0 = time.perf_counter()
    cal = calibrate_forecasts(val, bundle.splits.val, dict.fromkeys(("base", "finetuned")), e, lookback=lookback,
                              promoted=promoted, seed=seed)
    fit_s = time.perf_counter() - t0
    handed = _with_paths(test, {})
    handed.uncalibrated = {}
    handed.calibrate({promoted: PathCalibration.from_dict(cal.path_calibration(promoted))})
    handover = Handover.from_dict(cal.handover_choice())
    handed.hand_over(handover, promoted)
    table = handed.table
    naive = min(NAIVE, key=lambda n: table.at[n, "close_crps"])
    cmp = paired_comparisons(handed, HANDED_OVER, (naive,), seed=0).set_index("metric")
    alone = paired_comparisons(handed, promoted, (naive,), seed=0).set_index("metric")
    entries = {"model": promoted, "naive": naive, "handed": HANDED_OVER}
    scores = {f"{k}_{c}": float(table.at[name, c]) for k, name in entries.items()
              for c in ("close_crps", "close_mae", "coverage_50", "coverage_80", "coverage_95")}
    fit = cal.handover
    return {"promoted": promoted, "best_naive": naive, "val_origins": val.n_origins, "test_origins": test.n_origins,
            "symbols": int(len(set(test.symbols))), "fit_s": fit_s, **scores,
            "weights": dict(zip(handover.ensemble.members, handover.ensemble.weights)),
            "method": handover.ensemble.method, "tails": handover.tails.to_dict(), "tails_kept": fit["tails"]["kept"],
            "describe": handover.describe(promoted),
            "val_before": {k: fit["before"][k] for k in ("cv_crps", "coverage_50", "coverage_80", "coverage_95")},
            "val_after": {k: fit["after"][k] for k in ("cv_crps", "coverage_50", "coverage_80", "coverage_95")},
            "dm_handed": {k: _plain(cmp.at["close_crps", k]) for k in ("change_pct", "p_value", "mde", "verdict")},
            "dm_model": {k: _plain(alone.at["close_crps", k]) for k in ("change_pct", "p_value", "mde", "verdict")}}


def _coverages(entry: dict, key: str = "") -> str:
    prefix = f"{key}_" if key else ""
    return " / ".join(f"{entry.get(f'{prefix}coverage_{lvl}', float('nan')):.2f}" for lvl in (50, 80, 95))


def _plain(value):
    return value if isinstance(value, str) else float(value)


HANDOVER_HEADER = ["dataset", "forecast", "close CRPS", "vs best naive", "DM vs best naive (p, MDE)", "close MAE",
                   "cov 50 / 80 / 95", "weights (validation)", "validation, held out: cov 50 / 80 / 95"]


def handover_summary(rows: list[dict]) -> str:
    """Per dataset and seed: the calibrated model alone, the best naive forecast on test, the handed-over one."""
    lines = ["| " + " | ".join(HANDOVER_HEADER) + " |", "|" + "---|" * len(HANDOVER_HEADER)]
    for r in sorted(rows, key=lambda r: (DATASETS.index(r["dataset"]), r["seed"])):
        name = f"{r['dataset']} (seed {r['seed']})" if len({x["seed"] for x in rows}) > 1 else r["dataset"]
        naive = r["naive_close_crps"]
        weights = ", ".join(f"{m} {w:.2f}" for m, w in r["weights"].items() if w > 0) + \
            f" ({r['method'].replace('_', ' ')}{', tails' if r['tails_kept'] else ''})"
        for label, key, dm, val in (
                (f"model alone ({r['promoted']}, calibrated)", "model", r["dm_model"], r["val_before"]),
                (f"best naive ({r['best_naive']})", "naive", None, None),
                ("handed over", "handed", r["dm_handed"], r["val_after"])):
            test = (f"{dm['change_pct']:+.1f}% {dm['verdict']} (p {dm['p_value']:.2g}, MDE {dm['mde']:.1%})"
                    if dm else "")
            lines.append("| " + " | ".join([
                name, label, f"{r[f'{key}_close_crps']:.4g}", f"{r[f'{key}_close_crps'] / naive - 1:+.1%}", test,
                f"{r[f'{key}_close_mae']:.4g}", _coverages(r, key), weights if key == "handed" else "",
                _coverages(val) if val else ""]) + " |")
    return "\n".join(lines) + "\n"


HEADER = ["dataset", "calibration", "seeds", "val CRPS gain (held-out)", "test cov 50", "test cov 80", "test cov 95",
          "test CRPS vs base", "test CRPS vs best naive", "best naive", "DM vs naive (better/none/worse)",
          "MDE vs naive", "test MAE vs persistence", "test origins", "promoted", "fitted (seed 0)"]


def summary(rows: list[dict]) -> str:
    """One line per (dataset, option), means over seeds; validation gain first (what defaults follow)."""
    frame = pd.DataFrame(rows)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for dataset in [d for d in DATASETS if d in set(frame["dataset"])]:
        for option in OPTIONS:
            g = frame[(frame["dataset"] == dataset) & (frame["option"] == option)].sort_values("seed")
            if g.empty:
                continue
            verdicts = g["dm_naive"].tolist()
            counts = "/".join(str(sum(v == k for v in verdicts)) for k in ("better", "no detectable difference",
                                                                          "worse"))
            lines.append("| " + " | ".join([
                dataset, option, str(len(g)), f"{g['val_gain'].mean():+.1%}",
                *(f"{g[c].mean():.2f}" for c in ("cov50", "cov80", "cov95")),
                f"{g['crps_vs_base'].mean():+.1%}", f"{g['crps_vs_naive'].mean():+.1%}",
                ", ".join(sorted(set(g["best_naive"]))), counts, f"{g['mde_naive'].mean():.1%}",
                f"{g['mae_vs_persistence'].mean():+.1%}", f"{int(g['origins'].mean())}",
                f"{(g['promoted'] == 'finetuned').sum()}/{len(g)} finetuned", str(g["describe"].iloc[0]),
            ]) + " |")
    return "\n".join(lines) + "\n"


def _summaries(files: list[Path]) -> str:
    """The option table from the rows files, the handover table from the handover files (whichever exist)."""
    handover = [json.loads(f.read_text()) for f in files if f.stem.endswith("-handover")]
    options = [r for f in files if not f.stem.endswith("-handover") for r in json.loads(f.read_text())]
    return "\n".join(([summary(options)] if options else []) + ([handover_summary(handover)] if handover else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the whole path")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=1, help="(dataset, seed) runs in parallel processes")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "calibration.md"))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--summarize", nargs="+", metavar="ROWS_DIR", help="print the table of finished rows/")
    parser.add_argument("--checkpoints", help="an earlier run's <out>_work/runs folder: reuse its phase-2 checkpoints")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS, help="calibration rows")
    parser.add_argument("--reuse", action="store_true",
                        help="read back the walk-forwards an earlier run of this --out saved: refit, do not sample")
    args = parser.parse_args()
    if args.summarize:
        print(_summaries([f for d in args.summarize for f in sorted(Path(d).glob("*.json"))]))
        return
    from kronos_kit.config import parse_overrides

    overrides = parse_overrides(args.set)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = Path(args.out)
    out_dir = out.parent / (out.stem + "_work")
    if "synthetic1h" in args.datasets:
        _bench_strategies().synthetic_hourly(out_dir / "data" / "synthetic_hourly.csv",
                                             bars=800 if args.quick else 3000)
    if "daily2000" in args.datasets:
        synthetic_daily(out_dir / "data" / "synthetic_daily.csv", bars=600 if args.quick else 2000)
    tasks = [(d, s) for s in args.seeds for d in args.datasets]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, d, s, str(out_dir), args.quick, args.threads, overrides, args.checkpoints,
                               tuple(args.options), args.reuse) for d, s in tasks]
        for f in futures:
            f.result()
    import torch

    text = "\n".join([
        f"Command: `python benchmarks/bench_calibration.py {' '.join(sys.argv[1:])}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s) per job, {args.jobs} "
        f"job(s) in parallel; torch {torch.__version__}. Total wall time {time.perf_counter() - start:.0f} s.", "",
        _summaries(sorted((out_dir / "rows").glob("*.json")))])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
