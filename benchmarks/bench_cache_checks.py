"""What checking a data-cache entry costs when it is opened (issue 28): `MarketArrays.open` verifies that
meta.json names the key and that every array has its recorded dtype, shape and CRC-32 (of up to 64 blocks of
64 KiB spread through it) before memory-mapping it. This times that open against memory-mapping the same
arrays without any check (what an open did before), interleaved in one process, on a synthetic entry.

    .venv/bin/python benchmarks/bench_cache_checks.py --rows 20000000 --repeat 20

Prints the median of each and the ratio; the figures go to benchmarks/RESULTS.md with the machine and load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_entry(folder: Path, rows: int, symbols: int = 300) -> str:
    """A cache entry of `rows` 5-minute bars over `symbols` symbols, written by the kit's own `save`."""
    from kronos_kit.data.schema import FEATURE_COLUMNS
    from kronos_kit.data.store import MarketArrays, calendar_stamps

    rng = np.random.default_rng(0)
    timestamps = np.datetime64("2020-01-02T09:30", "ns").astype(np.int64) + np.arange(rows) * 300_000_000_000
    close = 10 * np.exp(np.cumsum(rng.normal(0, 1e-3, rows)))
    features = {c: close.copy() for c in FEATURE_COLUMNS}
    features["volume"] = rng.integers(0, 10_000, rows).astype(np.float32)
    offsets = np.linspace(0, rows, symbols + 1).astype(np.int64)
    arrays = MarketArrays([f"S{k:03d}" for k in range(symbols)], offsets, timestamps, None, features,
                          calendar_stamps(timestamps, None), [], [], source_sha256="0" * 64)
    arrays.save(folder, key="bench", source="bench")
    return "bench"


def main() -> None:
    from kronos_kit.data.store import MarketArrays

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        entry = Path(tmp) / "data-bench"
        key = synthetic_entry(entry, args.rows)
        names = [p.stem for p in entry.glob("*.npy")]
        size = sum(p.stat().st_size for p in entry.glob("*.npy"))
        checked, bare = [], []
        for _ in range(args.repeat):  # interleaved, so load on the machine hits both alike
            t = time.perf_counter()
            MarketArrays.open(entry, key=key)
            checked.append(time.perf_counter() - t)
            t = time.perf_counter()
            [np.load(entry / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in names]
            bare.append(time.perf_counter() - t)
    c, b = statistics.median(checked), statistics.median(bare)
    print(f"entry: {args.rows:,} rows, {size / 2**30:.2f} GiB, {len(names)} arrays; {args.repeat} opens each, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| open with the checks (MarketArrays.open) | {c * 1e3:.1f} ms |")
    print(f"| memory-map only (np.load mmap of each array) | {b * 1e3:.1f} ms |")
    print(f"| ratio | {c / b:.1f}x, {1e3 * (c - b):.1f} ms more per open |")


if __name__ == "__main__":
    main()
