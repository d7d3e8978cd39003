"""Training speed: one optimizer step of each phase at the published shapes.

Phase 1: Tokenizer-base; phase 2: Kronos-small on tokens of a frozen Tokenizer-base. Batch 16,
window lookback 90 + predict 10 + 1 = 101 bars, random weights and data. Prints windows/s and,
for phase 2, the share of step time spent tokenizing with and without the token cache.

    .venv/bin/python benchmarks/bench_train.py [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from kronos_kit.config import PhaseConfig
from kronos_kit.model import Kronos, KronosTokenizer
from kronos_kit.train import FrozenTokens, make_predictor_step, tokenizer_step

BATCH, WINDOW = 16, 101


def batch(i: int, size: int = BATCH) -> dict:
    """A seeded random batch of `size` windows of WINDOW bars (x, time stamps, symbol, start)."""
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(size, WINDOW, 6, generator=g).clamp(-5, 5),
            "stamp": torch.stack([torch.randint(0, n, (size, WINDOW), generator=g) for n in (60, 24, 7, 32, 13)],
                                 -1).float(),
            "symbol": ["BENCH"] * size, "start": torch.arange(i * size, (i + 1) * size)}


def time_steps(model, step, batches, cfg: PhaseConfig) -> float:
    """Seconds per optimizer step (forward, backward, clip, AdamW), after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    model.train()
    times = []
    for b in batches:
        start = time.perf_counter()
        out = step(model, b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / len(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [batch(i) for i in range(args.steps + 1)]
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads; batch {BATCH}, "
          f"window {WINDOW}")

    tok = KronosTokenizer.from_preset("tokenizer-base")
    s = time_steps(tok, tokenizer_step, batches, PhaseConfig(lr=2e-4, grad_clip=2.0))
    print(f"phase 1, Tokenizer-base: {s * 1000:7.0f} ms/step  {BATCH / s:6.1f} windows/s")

    frozen = KronosTokenizer.from_preset("tokenizer-base")
    for cache in (False, True):
        tokens = FrozenTokens(frozen, cache=cache)
        model = Kronos.from_preset("small")
        step = make_predictor_step(tokens, teacher_forcing=False)
        epoch = batches + batches  # the second pass sees the same windows again, as a second epoch would
        tokens.encode_seconds = 0.0
        start = time.perf_counter()
        s = time_steps(model, step, epoch, PhaseConfig(lr=4e-5, grad_clip=3.0))
        total = time.perf_counter() - start
        share = tokens.encode_seconds / total
        label = "with token cache   " if cache else "without token cache"
        print(f"phase 2, Kronos-small, {label}: {s * 1000:7.0f} ms/step  {BATCH / s:6.1f} windows/s  "
              f"tokenizing {share:5.1%} of step time (over 2 epochs of {len(batches)} batches)")


if __name__ == "__main__":
    main()
