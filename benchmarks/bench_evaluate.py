"""Benchmark: walk-forward evaluation (origins x sample paths x horizon) on the A-share sample.

    .venv/bin/python benchmarks/bench_evaluate.py                 # tiny Kronos, 200 origins x 8 paths x 24 steps
    .venv/bin/python benchmarks/bench_evaluate.py --model stub --repeat 5
    .venv/bin/python benchmarks/bench_evaluate.py --origins 500 --samples 32

``--model tiny`` (default) evaluates two real Kronos models of the ``tiny`` preset shape (random init,
predictor seeds 0 and 1 as "base" and "finetuned", one ``tiny`` tokenizer) through ``evaluate_models``:
``KronosPredictor`` with the batched, KV-cached forecaster, 32 origins per batch. The figure splits
into forecasting (time inside the two models), building their inputs, the baselines (persistence,
drift, GARCH fits), the metrics and writing the report. torch runs on one thread unless ``--threads``
says otherwise (0 = torch's default): on the shared 2-core sandbox, 2 threads were a little faster
while it was idle (16.1 s vs 21.4 s at load average ~1) but 8x slower while other jobs ran (162.8 s
vs 20.4 s at load average 2.5-3.9), as each of the many small ops waits for a descheduled worker.

``--model stub`` is a seeded random-walk ForecastFn, so its figure is the evaluator's own cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kronos_kit.evaluate import ForecastFn, evaluate_models, walk_forward, write_report

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


def _load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "stub"], default="tiny")
    parser.add_argument("--origins", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--pred-len", type=int, default=24)
    parser.add_argument("--lookback", type=int, default=256)
    parser.add_argument("--max-context", type=int, default=512, help="tiny only")
    parser.add_argument("--batch-size", type=int, default=32, help="origins per forecast call")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for tiny (default 1; 0 keeps torch's default): on a busy shared "
                             "2-core machine 2 threads were ~8x slower than 1")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs, the median is reported (default: 1 for tiny, 3 for stub)")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.model == "tiny" else 3)

    path = args.data or next((p for p in DATA_CANDIDATES if p.exists()), None)
    if path is None:
        print("no A-share sample found; pass --data", file=sys.stderr)
        return 2
    frame = pd.read_csv(path)
    frame["symbol"] = "A"
    # one symbol: spread the origins over the whole file
    stride = max(1, (len(frame) - args.lookback - args.pred_len) // args.origins)
    common = dict(lookback=args.lookback, pred_len=args.pred_len, stride=stride, sample_count=args.samples,
                  max_origins=args.origins, progress=False, batch_size=args.batch_size)

    if args.model == "tiny":
        import torch

        from kronos_kit.model import Kronos, KronosTokenizer

        if args.threads:
            torch.set_num_threads(args.threads)
        tokenizer = KronosTokenizer.from_pretrained("tiny")
        pairs = {"base": (Kronos.from_pretrained("tiny", seed=0), tokenizer),
                 "finetuned": (Kronos.from_pretrained("tiny", seed=1), tokenizer)}
        runtime = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"

        def evaluate():
            return evaluate_models(frame, pairs, max_context=args.max_context, seed=0, device="cpu", **common)
    else:
        models = {"base": stub_model(0), "finetuned": stub_model(1)}
        runtime = "numpy stub"

        def evaluate():
            return walk_forward(frame, models, **common)

    runs, loads = [], []
    for _ in range(repeat):
        loads.append(_load_average())
        t0 = time.perf_counter()
        result = evaluate()
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            write_report(result, tmp)
        t2 = time.perf_counter()
        runs.append({"walk_forward": t1 - t0, "report": t2 - t1, **result.timings})
    loads.append(_load_average())

    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    model_s = med["model:base"] + med["model:finetuned"]
    total = med["walk_forward"] + med["report"]
    overhead = total - model_s
    print(f"bench_evaluate: model={args.model}, {result.n_origins} origins x {args.samples} paths x "
          f"{args.pred_len} steps, lookback {args.lookback}, stride {stride}, 2 models + persistence/drift/garch, "
          f"median of {repeat} on {platform.machine()} ({platform.python_version()}, {runtime})")
    for key, value in med.items():
        print(f"  {key:<22} {value:8.3f} s")
    print(f"  total (walk-forward + report): {total:.2f} s; forecasting (2 model calls): {model_s:.2f} s "
          f"({model_s / (2 * result.n_origins) * 1e3:.1f} ms per origin and model); everything else: "
          f"{overhead:.2f} s ({overhead / result.n_origins * 1e3:.1f} ms per origin); GARCH fallbacks: "
          f"{result.garch_fallbacks.get('total', 0)}")
    print(f"  load average (1/5/15 min) before each run and after the last: {' | '.join(loads)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
