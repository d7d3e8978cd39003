"""Does finetuning pay off? Every finetune strategy on three datasets, judged on the test split.

For each dataset and each phase-2 strategy (full, freeze, lora, l2sp) this runs what the pipeline runs
after phase 1: phase 2 from the embedded base (`embedded:base/predictor`), the validation step
(promotion + sampling calibration, `evaluate.decide_on_validation`), then the walk-forward on the
test split with the calibrated sampling, and writes a Markdown table: test close CRPS and close MAE
relative to the base model and to persistence, the Diebold-Mariano verdicts, what was promoted, and
wall time.

Phase 1 is skipped (`tokenizer.enabled: false`): every strategy uses the embedded base tokenizer, so
the table isolates phase 2 and the base model is the same for every row of a dataset. Rows (`VARIANTS`):
today's default (full finetune, `best` by validation loss), then each strategy with `best` chosen by
forecast skill on validation (`predictor.select_metric: val_crps`).
Nothing is chosen on the test split: settings come from configs/default.yaml (plus the strategy),
selection / promotion / calibration use the validation split.

Datasets:
- `nasdaq`: the default run's data (`sample:nasdaq`, daily bars);
- `ashare5m`: the 5-minute A-share sample (`tests/data/ashare_5min_sample.csv`, one symbol);
- `synthetic1h`: hourly bars of 4 symbols generated here, seeded: GARCH(1,1) returns (volatility
  clustering) with mild mean reversion of the log price to a slow random-walk level, OHLC from an
  intrabar range, volume rising with |return|. Offline and a third bar interval; it is data the base
  model never saw, with structure (vol clustering) a finetune can learn.

    .venv/bin/python benchmarks/bench_strategies.py [--quick] [--threads 1] [--jobs 2] [--out PATH]
        [--datasets nasdaq ashare5m synthetic1h] [--variants full/val_loss full/val_crps ...] [--set KEY=VALUE ...]

`--set` applies dotted config overrides to every run (e.g. `--set predictor.lr=4e-4
predictor.select_metric=val_crps`): candidate defaults are compared by rerunning the table, and a
default is chosen from the validation columns (promotion), not from the test columns.

`--quick` runs tiny settings (a few steps, few origins, a 2 x 2 calibration grid): a smoke test of the
whole path, not evidence. Run directories go to `<out folder>/runs/<dataset>-<strategy>-<selection>/`;
each finished row is also written at once to `<out folder>/rows/` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("nasdaq", "ashare5m", "synthetic1h")
# a row of the table: a strategy, how phase 2 picks `best`, and the settings that go with the strategy. Today's
# default (full, val_loss) is the reference row; every strategy is then run with selection by forecast skill.
# LoRA trains ~1% of the weights from B = 0, so it gets 10x the full-finetune lr (the usual LoRA practice).
VARIANTS = {
    "full/val_loss": ("full", {"predictor.select_metric": "val_loss"}),
    "full/val_crps": ("full", {"predictor.select_metric": "val_crps"}),
    "freeze/val_crps": ("freeze", {"predictor.select_metric": "val_crps"}),
    "lora/val_crps": ("lora", {"predictor.select_metric": "val_crps", "predictor.lr": 4e-4}),
    "l2sp/val_crps": ("l2sp", {"predictor.select_metric": "val_crps"}),
}

# per dataset: data overrides on top of configs/default.yaml
DATA_SETTINGS = {
    "nasdaq": {"data.source": "sample:nasdaq"},
    "ashare5m": {"data.source": str(ROOT / "tests" / "data" / "ashare_5min_sample.csv"), "data.symbol": "ASHARE"},
    "synthetic1h": {},  # data.source: the generated CSV
}
QUICK = {
    "data.lookback": 40, "predictor.max_steps": 4, "predictor.eval_every": 2, "predictor.batch_size": 16,
    "predictor.skill_origins": 4, "predictor.skill_paths": 2, "predictor.skill_horizon": 5,
    "evaluation.max_origins": 8, "evaluation.val_origins": 8, "evaluation.sample_count": 2,
    "evaluation.pred_len": 5, "evaluation.stride": 10, "evaluation.calibration_temperatures": [0.85, 1.0],
}


def synthetic_hourly(path: Path, *, seed: int = 7, symbols: int = 4, bars: int = 3000) -> Path:
    """Write the seeded hourly multi-symbol series (see the module docstring) as a CSV; returns its path."""
    rng = np.random.default_rng(seed)
    stamps = pd.date_range("2023-01-02", periods=bars, freq="h")
    frames = []
    for k in range(symbols):
        omega, alpha, beta = 2e-6, 0.08, 0.9  # GARCH(1,1): persistent volatility clusters
        var, level, logp = omega / (1 - alpha - beta), np.log(50.0 + 25 * k), np.log(50.0 + 25 * k)
        closes, opens, highs, lows, vols = [], [], [], [], []
        prev_close = float(np.exp(logp))
        for _ in range(bars):
            shock = np.sqrt(var) * rng.standard_normal()
            level += 0.0005 * rng.standard_normal()  # slow drift of the fair value
            ret = -0.02 * (logp - level) + shock  # mild mean reversion toward it
            var = omega + alpha * shock**2 + beta * var
            logp += ret
            close = float(np.exp(logp))
            spread = abs(rng.standard_normal()) * np.sqrt(var) * close
            opens.append(prev_close)
            closes.append(close)
            highs.append(max(prev_close, close) + spread)
            lows.append(min(prev_close, close) - spread)
            vols.append(float(rng.lognormal(8.0, 0.3) * (1 + 40 * abs(ret))))
            prev_close = close
        frame = pd.DataFrame({"symbol": f"SYN{k}", "timestamps": stamps, "open": opens, "high": highs, "low": lows,
                              "close": closes, "volume": vols})
        frame["amount"] = frame["volume"] * frame[["open", "high", "low", "close"]].mean(axis=1)
        frames.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return path


def run_one(dataset: str, variant: str, out_dir: str, quick: bool, threads: int, overrides: dict) -> dict:
    """Phase 2 + validation step + test evaluation of one (dataset, variant); a row of the table."""
    import torch

    torch.set_num_threads(threads)
    from kronos_kit.config import KitConfig
    from kronos_kit.data import load_data
    from kronos_kit.evaluate import decide_on_validation, evaluate_models, paired_comparisons, write_report
    from kronos_kit.model import Kronos, KronosTokenizer
    from kronos_kit.runtime import resolve_device
    from kronos_kit.train import train_predictor

    start = time.perf_counter()
    strategy, variant_settings = VARIANTS[variant]
    run_dir = Path(out_dir) / "runs" / f"{dataset}-{variant.replace('/', '-')}"
    settings = dict(DATA_SETTINGS[dataset])
    if dataset == "synthetic1h":
        settings["data.source"] = str(Path(out_dir) / "data" / "synthetic_hourly.csv")
    cfg = KitConfig.from_file(ROOT / "configs" / "default.yaml").with_overrides({
        **settings, **(QUICK if quick else {}), **variant_settings, **overrides, "run_dir": str(run_dir),
        "tokenizer.enabled": False, "predictor.strategy": strategy,
    })
    bundle = load_data(cfg)
    phase2 = train_predictor(cfg, data=bundle, progress=False, overwrite=True)  # each variant reruns into its folder
    tokenizer_from = cfg.tokenizer.start_from
    models = {name: (Kronos.from_pretrained(source), KronosTokenizer.from_pretrained(tokenizer_from))
              for name, source in (("base", cfg.predictor.start_from), ("finetuned", phase2.best_dir))}
    device = resolve_device(cfg.device)
    decision = decide_on_validation(bundle.splits, models, cfg.evaluation, lookback=cfg.data.lookback, run_dir=run_dir,
                                    finetuned_sources=(tokenizer_from, phase2.best_dir),
                                    base_sources=(tokenizer_from, cfg.predictor.start_from), seed=cfg.seed,
                                    device=device)
    result = evaluate_models(bundle.splits.test, models, cfg.evaluation, lookback=cfg.data.lookback, seed=cfg.seed,
                             device=device, baselines=("persistence",), calibration=decision.calibration,
                             progress=False)
    write_report(result, run_dir, calibration=decision.calibration, promotion=decision.promotion)
    rows = paired_comparisons(result, "finetuned", ("base", "persistence"), seed=cfg.seed)
    rows = rows.set_index(["other", "metric"])
    table = result.table
    cal = decision.sampling
    val = decision.result.table
    crps_vs_base = table.at["finetuned", "close_crps"] / table.at["base", "close_crps"] - 1
    row = {
        "dataset": dataset, "strategy": variant, "seed": cfg.seed, "steps": phase2.steps, "origins": result.n_origins,
        "val_crps_vs_base": val.at["finetuned", "close_crps"] / val.at["base", "close_crps"] - 1,
        # what a user of the run gets: the promoted pair (the base itself when finetuning was not promoted)
        "promoted_crps_vs_base": crps_vs_base if decision.promotion.promoted == "finetuned" else 0.0,
        "crps_vs_base": crps_vs_base,
        "mae_vs_base": table.at["finetuned", "close_mae"] / table.at["base", "close_mae"] - 1,
        "crps_vs_persistence": table.at["finetuned", "close_crps"] / table.at["persistence", "close_crps"] - 1,
        "mae_vs_persistence": table.at["finetuned", "close_mae"] / table.at["persistence", "close_mae"] - 1,
        "dm_base": _verdict(rows, "base"), "dm_persistence": _verdict(rows, "persistence"),
        "promoted": decision.promotion.promoted,
        "sampling": f"T {cal['temperature']:g}, top-p {cal['top_p']:g}" if cal else "uncalibrated",
        "wall_s": time.perf_counter() - start,
    }
    rows_dir = Path(out_dir) / "rows"  # each row as soon as it is done: a cut-short run keeps what finished
    rows_dir.mkdir(parents=True, exist_ok=True)
    (rows_dir / f"{run_dir.name}.json").write_text(json.dumps(row, indent=1))
    return row


def _verdict(rows: pd.DataFrame, other: str) -> str:
    """'CRPS <verdict> (p), MAE <verdict> (p)' of finetuned vs `other` on the test split."""
    short = {"better": "better", "worse": "worse", "no detectable difference": "no diff.", "not testable": "n/a"}
    parts = []
    for metric, label in (("close_crps", "CRPS"), ("close_ae", "MAE")):
        r = rows.loc[(other, metric)]
        parts.append(f"{label} {short[r['verdict']]} (p {r['p_value']:.2g})")
    return ", ".join(parts)


def markdown(results: list[dict], command: str, quick: bool, threads: int, jobs: int) -> str:
    header = ["dataset", "strategy / selection", "steps", "val CRPS vs base", "promoted (validation)",
              "test origins", "CRPS vs base", "MAE vs base", "CRPS vs persistence", "MAE vs persistence",
              "DM vs base (test)", "DM vs persistence (test)", "promoted pair: CRPS vs base (test)", "test sampling",
              "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        lines.append("| " + " | ".join([
            r["dataset"], r["strategy"], str(r["steps"]), f"{r['val_crps_vs_base']:+.1%}", r["promoted"],
            str(r["origins"]), f"{r['crps_vs_base']:+.1%}",
            f"{r['mae_vs_base']:+.1%}", f"{r['crps_vs_persistence']:+.1%}", f"{r['mae_vs_persistence']:+.1%}",
            r["dm_base"], r["dm_persistence"], f"{r['promoted_crps_vs_base']:+.1%}", r["sampling"],
            f"{r['wall_s']:.0f}",
        ]) + " |")
    import torch

    note = ("Settings: `--quick` (tiny smoke settings: these numbers are not evidence)." if quick else
            "Settings: configs/default.yaml with `tokenizer.enabled: false` and `predictor.strategy` per row.")
    return "\n".join([
        f"Command: `{command}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {threads} torch thread(s) per job, {jobs} job(s) in "
        f"parallel; torch {torch.__version__}, Python {platform.python_version()}.", "",
        note + " Relative numbers are finetuned / other - 1 on the test split (negative: finetuned is better); "
        "DM: Diebold-Mariano with Newey-West variance at 5%, finetuned vs other; promotion and sampling were "
        "decided on the validation split.", "", *lines, ""])


def seed_summary(rows: list[dict]) -> str:
    """One line per (dataset, row) over several seeds' rows (`rows/*.json` of runs with `--set seed=N`).

    The validation columns are what a default may be chosen by; the test columns are reported, never used.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["strategy"]), []).append(r)
    header = ["dataset", "strategy / selection", "seeds", "val CRPS vs base (mean)", "promoted", "test CRPS vs base "
              "(per seed)", "test MAE vs base (mean)", "promoted pair: test CRPS vs base (mean)",
              "test CRPS vs persistence (mean)", "test MAE vs persistence (mean)", "DM vs base: better / worse"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (dataset, variant), rs in sorted(groups.items(), key=lambda kv: (DATASETS.index(kv[0][0]), kv[0][1])):
        def mean(key: str, rs: list[dict] = rs) -> float:
            return float(np.mean([r[key] for r in rs]))

        better = sum(r["dm_base"].startswith("CRPS better") for r in rs)
        worse = sum(r["dm_base"].startswith("CRPS worse") for r in rs)
        lines.append("| " + " | ".join([
            dataset, variant, str(len(rs)), f"{mean('val_crps_vs_base'):+.1%}",
            f"{sum(r['promoted'] == 'finetuned' for r in rs)}/{len(rs)} finetuned",
            " ".join(f"{r['crps_vs_base']:+.1%}" for r in sorted(rs, key=lambda r: r.get("seed", 0))),
            f"{mean('mae_vs_base'):+.1%}", f"{mean('promoted_crps_vs_base'):+.1%}",
            f"{mean('crps_vs_persistence'):+.1%}", f"{mean('mae_vs_persistence'):+.1%}", f"CRPS {better} / {worse}",
        ]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the whole path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=1, help="(dataset, strategy) runs in parallel processes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "strategies.md"),
                        help="Markdown table to write; run directories go beside it under runs/")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="strategy/selection rows (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--summarize", nargs="+", metavar="ROWS_DIR",
                        help="print the over-seeds table of finished runs' rows/ folders (no training)")
    args = parser.parse_args()
    if args.summarize:
        print(seed_summary([json.loads(f.read_text()) for d in args.summarize for f in sorted(Path(d).glob("*.json"))]))
        return
    from kronos_kit.config import parse_overrides

    overrides = parse_overrides(args.set)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = Path(args.out)
    out_dir = out.parent / (out.stem + "_work")
    if "synthetic1h" in args.datasets:
        synthetic_hourly(out_dir / "data" / "synthetic_hourly.csv", bars=800 if args.quick else 3000)
    tasks = [(d, v) for d in args.datasets for v in args.variants]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, d, s, str(out_dir), args.quick, args.threads, overrides) for d, s in tasks]
        results = [f.result() for f in futures]
    command = "python benchmarks/bench_strategies.py " + " ".join(
        (["--quick"] if args.quick else []) + [f"--threads {args.threads}", f"--jobs {args.jobs}"]
        + ([f"--datasets {' '.join(args.datasets)}"] if args.datasets != list(DATASETS) else [])
        + ([f"--variants {' '.join(args.variants)}"] if args.variants != list(VARIANTS) else [])
        + (["--set " + " ".join(args.set)] if args.set else []))
    text = markdown(results, command, args.quick, args.threads, args.jobs)
    text += f"\nTotal wall time: {time.perf_counter() - start:.0f} s.\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
