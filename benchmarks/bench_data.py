"""Benchmark of the data layer on a 1,000,000-row long CSV (10 symbols x 100,000 5-minute bars).

Times `load_ohlcv` (read + validate into the canonical frame), building `WindowDataset`
(lookback 90, predict 10) and reading 10,000 random items, and reports peak memory as the
process's maximum resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the whole
process, imports of torch and pandas included; the CSV is written by a child process so its
memory is not counted).

Run: ``.venv/bin/python benchmarks/bench_data.py [--symbols 10] [--bars 100000] [--items 10000]``
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kronos_kit.data import WindowDataset, load_ohlcv


def max_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def write_csv(path: Path, symbols: int, bars: int, seed: int = 0) -> None:
    """A long CSV with valid candles: random-walk closes, open = previous close, wicks outside."""
    rng = np.random.default_rng(seed)
    times = pd.date_range("2015-01-05 09:35", periods=bars, freq="5min").strftime("%Y-%m-%d %H:%M:%S")
    frames = []
    for k in range(symbols):
        close = 10.0 * np.exp(np.cumsum(rng.normal(0, 0.002, bars)))
        open_ = np.r_[close[0], close[:-1]]
        high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.001, bars)))
        low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.001, bars)))
        volume = rng.integers(100, 10_000, bars).astype(np.float64)
        frames.append(pd.DataFrame({
            "symbol": f"S{k:03d}", "timestamps": times, "open": open_.round(4), "high": high.round(4),
            "low": low.round(4), "close": close.round(4), "volume": volume,
            "amount": (volume * (open_ + high + low + close) / 4).round(2),
        }))
    frame = pd.concat(frames, ignore_index=True)
    # round-trip safety: rounding may push a price past high/low by 1e-4, so re-widen the wicks
    frame["high"] = frame[["open", "high", "close"]].max(axis=1)
    frame["low"] = frame[["open", "low", "close"]].min(axis=1)
    frame.to_csv(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--bars", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_only:
        write_csv(args.write_only, args.symbols, args.bars)
        return

    baseline = max_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.csv"
        t0 = time.perf_counter()
        # written by a child process so that its memory does not count in this process's peak
        subprocess.run([sys.executable, __file__, "--write-only", str(path), "--symbols", str(args.symbols),
                        "--bars", str(args.bars)], check=True)
        t_write = time.perf_counter() - t0
        size_mib = path.stat().st_size / 2**20

        t0 = time.perf_counter()
        frame = load_ohlcv(path)
        t_load = time.perf_counter() - t0
        rss_load = max_rss_mib()

    t0 = time.perf_counter()
    ds = WindowDataset(frame, lookback=90, predict=10)
    t_build = time.perf_counter() - t0
    rss_build = max_rss_mib()

    picks = np.random.default_rng(1).integers(0, len(ds), args.items)
    t0 = time.perf_counter()
    for i in picks:
        item = ds[int(i)]
    t_items = time.perf_counter() - t0
    assert item["x"].shape == (101, 6)

    print(f"machine: {platform.machine()}, {platform.python_version()}, {len(frame):,} rows, "
          f"{frame['symbol'].nunique()} symbols, CSV {size_mib:.0f} MiB (written in {t_write:.1f} s)")
    print(f"load_ohlcv             {t_load:7.2f} s   max RSS {rss_load:7.0f} MiB")
    print(f"WindowDataset build    {t_build:7.2f} s   max RSS {rss_build:7.0f} MiB   {len(ds):,} windows")
    print(f"{args.items:,} items          {t_items:7.2f} s   ({1e6 * t_items / args.items:.0f} us/item)")
    print(f"max RSS after imports  {baseline:7.0f} MiB   (resource.getrusage ru_maxrss, whole process)")


if __name__ == "__main__":
    main()
