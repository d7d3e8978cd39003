"""What a sweep trial's phase 2 saves with the shared token cache, and what the TensorBoard switch costs.

Phase 2 of the sweep's base config (configs/sweep-small.yaml: the kit's tiny base pair on the NASDAQ
sample, 120 steps, a forecast-skill probe at every 30) is run in three ways, interleaved in one process on
one thread so machine load hits them alike: tokens encoded on the fly (each trial of a sweep without the
cache), tokens from the on-disk token cache (`predictor.token_cache_dir`, built once before), and with the
cache plus `tensorboard: true`. Prints seconds per run and the ratios, and the one-time cost of the cache.

    .venv/bin/python benchmarks/bench_sweep.py [--repeats 3] [--steps 120]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from kronos_kit.config import KitConfig
from kronos_kit.data import load_data
from kronos_kit.model import KronosTokenizer
from kronos_kit.runtime import set_threads
from kronos_kit.token_cache import open_token_tables
from kronos_kit.train import train_predictor

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    set_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    base = KitConfig.from_file(ROOT / "configs" / "sweep-small.yaml").with_overrides(
        {"cache_dir": str(work / "cache"), "tensorboard": False, "predictor.max_steps": args.steps,
         "predictor.tokenizer_from": "embedded:base/tokenizer"})  # phase 2 on the base tokenizer (no phase 1)
    bundle = load_data(base)
    tokenizer = KronosTokenizer.from_pretrained(base.tokenizer.start_from)
    start = time.perf_counter()
    open_token_tables(work / "tokens", tokenizer, {"train": bundle.train, "val": bundle.val},
                      data_key=bundle.cache.name, cfg=base, progress=False)
    build = time.perf_counter() - start
    variants = {"on the fly": {}, "token cache": {"predictor.token_cache_dir": str(work / "tokens")},
                "token cache + tensorboard": {"predictor.token_cache_dir": str(work / "tokens"), "tensorboard": True}}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):
        for name, extra in variants.items():
            cfg = base.with_overrides({**extra, "run_dir": str(work / f"{r}-{name.replace(' ', '_')}")})
            start = time.perf_counter()
            train_predictor(cfg, data=bundle, progress=False)
            seconds[name].append(time.perf_counter() - start)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, 1 torch thread, load average {load:.1f} at the end; "
          f"phase 2: {args.steps} steps, {len(bundle.train)} training windows, probe every 30 steps")
    print(f"token cache built once: {build:.1f} s ({len(bundle.train)} + {len(bundle.val)} windows)")
    fly = seconds["on the fly"]
    for name, values in seconds.items():
        ratio = statistics.median(v / f for v, f in zip(values, fly))  # per interleaved repeat, then the median
        print(f"{name:<26} median {statistics.median(values):6.1f} s  ({', '.join(f'{v:.1f}' for v in values)})  "
              f"ratio to on the fly {ratio:.2f}")
    with_tb = statistics.median(a / b for a, b in zip(seconds["token cache + tensorboard"], seconds["token cache"]))
    print(f"tensorboard on / off (both with the token cache): median ratio {with_tb:.2f}")


if __name__ == "__main__":
    main()
