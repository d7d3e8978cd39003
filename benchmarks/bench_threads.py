"""Torch CPU threads by model width: one thread vs torch's default, measured as interleaved pairs.

For each model shape (the kit's embedded base, 64 wide; Tokenizer-base + Kronos-mini, 256; Tokenizer-base +
Kronos-small, 512) one round times the same work with 1 thread and with torch's default thread count, back to
back in this one process, so both see the same load: a few optimizer steps of phase 1 and phase 2 (batch 32,
window 101 bars, random weights and data) and a forecast of 8 origins x 8 paths x 10 bars. `--burn N` starts N
CPU-burning processes beside it (`python -c "while True: pass"`, stopped at the end), the "busy machine" case.
Prints per round the seconds of both settings, then the median ratio default / one thread per shape (above 1:
one thread is faster) and the load average before and after. `kronos_kit.runtime.default_threads` states the
rule these figures chose (benchmarks/RESULTS.md, "Threads").

    .venv/bin/python benchmarks/bench_threads.py [--rounds 3] [--burn 1] [--shapes tiny,mini,small]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch
from bench_train import batch  # benchmarks/ is the script's folder, so on its path

from kronos_kit.config import PhaseConfig
from kronos_kit.forecast import KronosPredictor
from kronos_kit.model import Kronos, KronosTokenizer
from kronos_kit.train import FrozenTokens, make_predictor_step, tokenizer_step

BATCH, STEPS = 32, 3
SHAPES = {  # name -> (tokenizer source, predictor source, width)
    "tiny": ("embedded:base/tokenizer", "embedded:base/predictor", 64),
    "mini": ("tokenizer-base", "mini", 256),
    "small": ("tokenizer-base", "small", 512),
}


def _train(model, step, batches, lr: float) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for b in batches:
        out = step(model, b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _forecast_inputs(n: int = 8, lookback: int = 90) -> tuple[list, list, list]:
    rng = np.random.default_rng(0)
    frames, xs, ys = [], [], []
    for k in range(n):
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, lookback)))
        frames.append(pd.DataFrame({"open": close, "high": close * 1.01, "low": close * 0.99, "close": close,
                                    "volume": rng.uniform(1e5, 2e5, lookback), "amount": close * 1.5e5}))
        times = pd.bdate_range("2024-01-01", periods=lookback + 10) + pd.Timedelta(days=k)
        xs.append(pd.Series(times[:lookback]))
        ys.append(pd.Series(times[lookback:]))
    return frames, xs, ys


def work(shape: str) -> float:
    """Seconds for one unit of work at `shape` (models built before the clock starts)."""
    tok_source, pred_source, _ = SHAPES[shape]
    tokenizer = KronosTokenizer.from_pretrained(tok_source)
    frozen = KronosTokenizer.from_pretrained(tok_source)
    predictor = Kronos.from_pretrained(pred_source)
    batches = [batch(i, BATCH) for i in range(STEPS)]
    inputs = _forecast_inputs()
    step2 = make_predictor_step(FrozenTokens(frozen, cache=False), teacher_forcing=False)
    start = time.perf_counter()
    _train(tokenizer, tokenizer_step, batches, PhaseConfig().lr)
    _train(predictor, step2, batches, 4e-5)
    KronosPredictor(predictor, frozen, max_context=512).predict_paths_batch(*inputs, 10, 1.0, 0, 0.9, 8,
                                                                            verbose=False, seed=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes to start beside the benchmark")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    default = torch.get_num_threads()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burn)]
    try:
        time.sleep(2 if burners else 0)
        load_before = os.getloadavg()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, default threads "
              f"{default}; {args.burn} burner process(es); load average {load_before[0]:.2f} {load_before[1]:.2f}")
        ratios: dict[str, list[float]] = {s: [] for s in shapes}
        for r in range(args.rounds):
            for shape in shapes:
                seconds = {}
                for threads in ((1, default) if r % 2 == 0 else (default, 1)):  # alternate which goes first
                    torch.set_num_threads(threads)
                    seconds[threads] = work(shape)
                ratios[shape].append(seconds[default] / seconds[1])
                print(f"round {r + 1} {shape:<5} (d_model {SHAPES[shape][2]:>3}): 1 thread {seconds[1]:6.2f} s, "
                      f"{default} threads {seconds[default]:6.2f} s, ratio {seconds[default] / seconds[1]:.2f}",
                      flush=True)
        load_after = os.getloadavg()
        for shape in shapes:
            print(f"{shape:<5} d_model {SHAPES[shape][2]:>3}: median time({default} threads) / time(1 thread) = "
                  f"{statistics.median(ratios[shape]):.2f} over {len(ratios[shape])} rounds")
        print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f}")
    finally:
        for p in burners:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
