"""Benchmark: walk-forward evaluation overhead (origins x sample paths x horizon) on the A-share sample.

    .venv/bin/python benchmarks/bench_evaluate.py                 # 200 origins x 8 paths x 24 steps
    .venv/bin/python benchmarks/bench_evaluate.py --origins 500 --samples 32

``--model stub`` (the only choice until the Kronos forecaster lands) is a seeded random-walk ForecastFn,
so the figure is the evaluator's own cost: building inputs, baselines (persistence, drift, GARCH fits)
and every metric, plus writing the report. The integrator adds ``--model tiny`` for the real model.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kronos_kit.evaluate import ForecastFn, walk_forward, write_report

ROOT = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = (ROOT / "tests" / "data" / "ashare_5min_sample.csv", Path("/work/shared/data/ashare_5min_sample.csv"))


def stub_model(seed: int = 0) -> ForecastFn:
    """Seeded random walk on the log close with the history's return std; volume/amount carried."""
    rng = np.random.default_rng(seed)

    def forecast(histories, hist_stamps, future_stamps, pred_len, sample_count):
        out = np.empty((len(histories), sample_count, pred_len, 6))
        for i, h in enumerate(histories):
            close = h["close"].to_numpy()
            sigma = np.diff(np.log(close)).std()
            path = close[-1] * np.exp(np.cumsum(rng.normal(0, sigma, (sample_count, pred_len)), axis=1))
            out[i, ..., :4] = path[..., None]
            out[i, ..., 4:] = h[["volume", "amount"]].to_numpy()[-1]
        return out

    return forecast


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["stub"], default="stub")
    parser.add_argument("--origins", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--pred-len", type=int, default=24)
    parser.add_argument("--lookback", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args(argv)

    path = args.data or next((p for p in DATA_CANDIDATES if p.exists()), None)
    if path is None:
        print("no A-share sample found; pass --data", file=sys.stderr)
        return 2
    frame = pd.read_csv(path)
    frame["symbol"] = "A"
    # one symbol: spread the origins over the whole file
    stride = max(1, (len(frame) - args.lookback - args.pred_len) // args.origins)
    models = {"base": stub_model(0), "finetuned": stub_model(1)}

    runs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = walk_forward(frame, models, lookback=args.lookback, pred_len=args.pred_len, stride=stride,
                              sample_count=args.samples, max_origins=args.origins, progress=False)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            write_report(result, tmp)
        t2 = time.perf_counter()
        runs.append({"walk_forward": t1 - t0, "report": t2 - t1, **result.timings})

    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    stub_s = med["model:base"] + med["model:finetuned"]
    overhead = med["walk_forward"] + med["report"] - stub_s
    print(f"bench_evaluate: model={args.model}, {result.n_origins} origins x {args.samples} paths x "
          f"{args.pred_len} steps, lookback {args.lookback}, 2 models + persistence/drift/garch, "
          f"median of {args.repeat} on {platform.machine()} ({platform.python_version()})")
    for key, value in med.items():
        print(f"  {key:<22} {value:8.3f} s")
    print(f"  evaluator overhead (everything but the 2 stub model calls): {overhead:.2f} s "
          f"({overhead / result.n_origins * 1e3:.1f} ms per origin); GARCH fallbacks: "
          f"{result.garch_fallbacks.get('total', 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
