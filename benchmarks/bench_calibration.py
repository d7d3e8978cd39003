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

Datasets: `nasdaq` (the default run's daily data), `ashare5m` (the 5-minute A-share sample),
`synthetic1h` (bench_strategies.py's seeded hourly GARCH set, 4 symbols), `daily2000` (one seeded
daily series of 2,000 bars with GARCH(1,1) Student-t returns: ~200 test bars, data no model saw).

    .venv/bin/python benchmarks/bench_calibration.py [--quick] [--seeds 0 1] [--jobs 2] [--threads 1]
        [--datasets nasdaq ...] [--out PATH] [--set KEY=VALUE ...]
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
DATASETS = ("nasdaq", "ashare5m", "synthetic1h", "daily2000")
OPTIONS = ("none", "temp/top-p", "spread", "spread+center", "conformal", "chosen")
PATH_METHOD = {"spread": ("spread",), "spread+center": ("spread_center",), "conformal": ("conformal",),
               "chosen": None}  # None: every method, chosen by validation CV (the kit's default)
NAIVE = ("drift", "random_walk", "garch_rw", "bootstrap")
GRID = {"temperatures": (0.85, 1.0, 1.15), "top_ps": (0.9, 1.0), "max_origins": 100}
DATA_SETTINGS = {
    "nasdaq": {"data.source": "sample:nasdaq"},
    "ashare5m": {"data.source": str(ROOT / "tests" / "data" / "ashare_5min_sample.csv"), "data.symbol": "ASHARE"},
    "synthetic1h": {},  # the generated CSVs
    "daily2000": {"data.symbol": "DAILY"},
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


def run_one(dataset: str, seed: int, out_dir: str, quick: bool, threads: int, overrides: dict,
            checkpoints: str | None = None, options: tuple[str, ...] = OPTIONS) -> list[dict]:
    """Phase 2, validation, one test walk-forward, then every calibration option: rows of the table."""
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
    reused = Path(checkpoints) / run_dir.name / "predictor" / "best" if checkpoints else None
    if reused is not None and reused.is_dir():  # phase 2 of an earlier run of this script: sample again only
        best_dir, steps = reused, "reused"
    else:
        phase2 = train_predictor(cfg, data=bundle, progress=False)
        best_dir, steps = phase2.best_dir, phase2.steps
    tok = cfg.tokenizer.start_from
    models = {name: (Kronos.from_pretrained(src), KronosTokenizer.from_pretrained(tok))
              for name, src in (("base", cfg.predictor.start_from), ("finetuned", best_dir))}
    e, lookback = cfg.evaluation, cfg.data.lookback
    t0 = time.perf_counter()
    val = evaluate_models(bundle.splits.val, models, lookback=lookback, pred_len=e.pred_len, stride=e.stride,
                          sample_count=e.sample_count, max_origins=e.val_origins, baselines=(), seed=seed,
                          progress=False)
    promoted = decide_promotion(val, finetuned_sources=(tok, str(best_dir)),
                                base_sources=(tok, cfg.predictor.start_from), seed=seed).promoted
    t_val = time.perf_counter() - t0
    test = evaluate_models(bundle.splits.test, models, e, lookback=lookback, seed=seed, progress=False)
    t_test = time.perf_counter() - t0 - t_val
    rows = [_row(test, promoted, "none", 0.0, "as sampled")]
    if "temp/top-p" in options:
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
    args = parser.parse_args()
    if args.summarize:
        print(summary([r for d in args.summarize for f in sorted(Path(d).glob("*.json"))
                       for r in json.loads(f.read_text())]))
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
                               tuple(args.options)) for d, s in tasks]
        rows = [r for f in futures for r in f.result()]
    import torch

    text = "\n".join([
        f"Command: `python benchmarks/bench_calibration.py {' '.join(sys.argv[1:])}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s) per job, {args.jobs} "
        f"job(s) in parallel; torch {torch.__version__}. Total wall time {time.perf_counter() - start:.0f} s.", "",
        summary(rows)])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
