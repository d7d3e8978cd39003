"""Forecast speed: KV-cached vs uncached generation, and 8 sample paths vs 1.

Kronos-small shape with Tokenizer-base (random weights), history 400 bars, 120 predicted,
max_context 512 (so the last 8 steps slide the window), greedy. Prints seconds and ratios.

    .venv/bin/python benchmarks/bench_forecast.py [--threads N] [--history 400] [--pred 120]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import pandas as pd
import torch

from kronos_kit.forecast import KronosPredictor
from kronos_kit.model import Kronos, KronosTokenizer


def synthetic_bars(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 10 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.001, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.001, n))
    volume = rng.uniform(100, 1000, n)
    ts = pd.date_range("2024-01-02 09:35", periods=n, freq="5min")
    return pd.DataFrame({"timestamps": ts, "open": open_, "high": high, "low": low, "close": close,
                         "volume": volume, "amount": volume * close})


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=400)
    parser.add_argument("--pred", type=int, default=120)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Kronos.from_preset("small")
    tokenizer = KronosTokenizer.from_preset("tokenizer-base")
    predictor = KronosPredictor(model, tokenizer, device=args.device, max_context=512)
    bars = synthetic_bars(args.history + args.pred)
    hist, fut = bars.iloc[: args.history], bars.iloc[args.history :]

    def run(**kw):
        return predictor.predict_paths(hist, hist["timestamps"], fut["timestamps"], args.pred, top_k=1,
                                       verbose=False, **kw)

    run(use_cache=True)  # warm-up
    cached = timed(lambda: run(use_cache=True), repeats=2)
    uncached = timed(lambda: run(use_cache=False))
    approx = timed(lambda: run(use_cache=True, sliding="approx"), repeats=2)
    eight = timed(lambda: run(use_cache=True, sample_count=8), repeats=2)
    same = np.allclose(run(use_cache=True).paths, run(use_cache=False).paths, rtol=1e-4)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, device {args.device}")
    print(f"Kronos-small + Tokenizer-base, history {args.history}, predict {args.pred}, max_context 512, greedy")
    print(f"uncached (reference algorithm): {uncached:8.2f} s")
    print(f"cached, exact sliding:          {cached:8.2f} s   speed-up {uncached / cached:5.1f}x")
    print(f"cached, approx sliding:         {approx:8.2f} s   speed-up {uncached / approx:5.1f}x (not exact)")
    print(f"8 sample paths, cached exact:   {eight:8.2f} s   {eight / cached:5.2f}x one path")
    print(f"cached == uncached forecast: {same}")


if __name__ == "__main__":
    main()
