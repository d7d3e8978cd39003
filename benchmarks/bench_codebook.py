"""Benchmark: codebook statistics over 10 million tokens (s1_bits = s2_bits = 10).

Random indices are generated up front (not timed), then streamed through ``CodebookCounter`` in
batches shaped like tokenizer output (B, T); the timed part is every ``update`` plus the final
``stats()`` (entropy, perplexity, top-1% share, bit balance for s1, s2 and the 2**20 joint code).

    .venv/bin/python benchmarks/bench_codebook.py [--tokens N] [--batch-tokens N] [--repeats N]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from kronos_kit.codebook import CodebookCounter


def run(tokens: int, batch_tokens: int, bits: int, seed: int = 0) -> tuple[float, float, float]:
    """Seconds for all updates, for stats(), and in total."""
    g = torch.Generator().manual_seed(seed)
    seq = 500  # window length; each batch is (rows, seq) like tokenizer.encode output
    s1_all = torch.randint(0, 2**bits, (tokens,), generator=g)
    s2_all = torch.randint(0, 2**bits, (tokens,), generator=g)
    s1 = [c.reshape(-1, seq) if c.numel() % seq == 0 else c for c in s1_all.split(batch_tokens)]
    s2 = [c.reshape(-1, seq) if c.numel() % seq == 0 else c for c in s2_all.split(batch_tokens)]
    counter = CodebookCounter(bits, bits)
    t0 = time.perf_counter()
    for a, b in zip(s1, s2):
        counter.update(a, b)
    t1 = time.perf_counter()
    stats = counter.stats()
    t2 = time.perf_counter()
    assert stats.n_tokens == tokens
    return t1 - t0, t2 - t1, t2 - t0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--batch-tokens", type=int, default=1_000_000)
    p.add_argument("--bits", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(
        f"machine: {_cpu()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    best = None
    for i in range(args.repeats):
        upd, st, total = run(args.tokens, args.batch_tokens, args.bits, seed=i)
        print(f"run {i + 1}: updates {upd:.3f} s + stats() {st:.3f} s = {total:.3f} s")
        best = total if best is None else min(best, total)
    rate = args.tokens / best / 1e6
    print(
        f"codebook statistics, {args.tokens:,} tokens, s1_bits = s2_bits = {args.bits}: "
        f"best {best:.3f} s ({rate:.1f} M tokens/s)"
    )


if __name__ == "__main__":
    main()
