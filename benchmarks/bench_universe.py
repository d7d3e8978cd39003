"""Forecaster speed for a universe walk-forward: symbols x rebalance dates x sample paths (issue 25, item 10).

At the embedded base shape (`embedded:base/tokenizer` + `embedded:base/predictor`), one torch thread,
lookback 90 bars, horizon 10, on bench_market's synthetic market (its `generate`, seeded: 5-minute bars,
symbols listed and delisted at different dates, halts, missing bars):

1. **The walk-forward.** Rebalance at the last bar of each of `--dates` consecutive trading days; every
   symbol that traded that day with 90 bars up to it and 10 after forecasts `--paths` paths. All symbols
   of `--dates-per-call` dates go into one `KronosPredictor.predict_paths_batch` call, as a universe
   walk-forward calls it. Reported: wall and CPU time, series x paths per second, and where the time goes
   (the library's stages, timed by wrapping them; "other" is `predict_paths_batch`'s own code: stacking,
   tensors to NumPy, de-normalising).
2. **Before vs now.** `predict_paths_batch` against the code before this work, pinned in
   `pinned_forecast.py`, interleaved in this process on the same series (B series x S paths, the same
   seed): CPU seconds per call, the ratio of the medians, whether every sampled token is the same, and
   the largest difference of the paths (normalised by each series' std, and in price units). At B in
   {1, 8, 32, 128} x S = 32 and at the universe call shape.
3. **Memory.** Peak RSS above the loaded models of one call at 128 series x 32 paths, old and new, each
   in a fresh process.

    .venv/bin/python benchmarks/bench_universe.py                  # 300 symbols x 60 dates x 8 paths (~5 min)
    .venv/bin/python benchmarks/bench_universe.py --symbols 20 --dates 3 --repeats 1 --series 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pinned_forecast  # benchmarks/ is the script's folder, so on its path
import torch
from bench_market import BARS_PER_DAY, generate, memory_mib

import kronos_kit.forecast as forecast
import kronos_kit.generation as generation
from kronos_kit.data.schema import FEATURE_COLUMNS
from kronos_kit.forecast import KronosPredictor, Sampler, decode_forecast, generate_tokens
from kronos_kit.model import Kronos, KronosTokenizer

LOOKBACK, HORIZON = 90, 10
HERE = Path(__file__).resolve()


def load_predictor() -> KronosPredictor:
    return KronosPredictor(Kronos.from_pretrained("embedded:base/predictor"),
                           KronosTokenizer.from_pretrained("embedded:base/tokenizer"))


# --------------------------------------------------------------------------------------------
# the walk-forward's inputs


def read_market(folder: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}


def rebalance_inputs(market: dict[str, pd.DataFrame], dates: int) -> list[list[tuple]]:
    """Per rebalance date, (history, x_timestamp, y_timestamp) of every symbol that traded that day with
    LOOKBACK bars up to its last bar of the day and HORIZON after it. The dates are the `dates` consecutive
    trading days with the most such symbols."""
    stamps = {name: frame["timestamps"].to_numpy() for name, frame in market.items()}
    days = np.unique(np.concatenate([s.astype("datetime64[D]") for s in stamps.values()]))
    counts = np.zeros(len(days), int)
    last_bar = {}
    for name, ts in stamps.items():
        day_of = ts.astype("datetime64[D]")
        ends = np.flatnonzero(np.r_[day_of[1:] != day_of[:-1], True])  # each day's last bar
        ok = (ends + 1 >= LOOKBACK) & (ends + HORIZON < len(ts))
        last_bar[name] = dict(zip(day_of[ends[ok]], ends[ok]))
        counts[np.searchsorted(days, day_of[ends[ok]])] += 1
    window = np.convolve(counts, np.ones(dates, int), "valid")
    first = int(np.argmax(window))
    columns = list(FEATURE_COLUMNS)
    out = []
    for day in days[first : first + dates]:
        batch = []
        for name, frame in market.items():
            end = last_bar[name].get(day)
            if end is not None:
                ts = frame["timestamps"]
                batch.append((frame[columns].iloc[end + 1 - LOOKBACK : end + 1], ts.iloc[end + 1 - LOOKBACK : end + 1],
                              ts.iloc[end + 1 : end + 1 + HORIZON]))
        out.append(batch)
    return out


# --------------------------------------------------------------------------------------------
# where the time goes


STAGES = (  # (owner, attribute, stage): the library's steps of one predict_paths_batch call
    (forecast.KronosPredictor, "predict_paths_batch", "other"),
    (forecast.KronosPredictor, "_prepare", "inputs"),
    (forecast, "_stacked_time_stamps", "inputs"),
    (forecast.KronosTokenizer, "encode", "encode"),
    (generation._CachedStepper, "_rebuild", "predictor prefill"),
    (generation._CachedStepper, "advance", "decode steps"),
    (forecast.Kronos, "decode_s2_step", "decode steps"),
    (forecast.Sampler, "__call__", "sampling"),
    (forecast, "decode_forecast", "tokenizer decode"),
)

STAGES_BEFORE = (  # the same steps of the pinned code before
    (pinned_forecast, "old_predict_paths_batch", "other"),
    (pinned_forecast, "_old_prepare", "inputs"),
    (forecast.KronosTokenizer, "encode", "encode"),
    (pinned_forecast.OldStepper, "_rebuild", "predictor prefill"),
    (generation._CachedStepper, "advance", "decode steps"),
    (forecast.Kronos, "decode_s2_step", "decode steps"),
    (forecast.Sampler, "__call__", "sampling"),
    (pinned_forecast, "old_decode_forecast", "tokenizer decode"),
)


@contextmanager
def stage_timer(stages=STAGES):
    """Exclusive CPU seconds per stage while the block runs (a stage's time excludes the stages it calls); CPU
    time, as wall time on a shared machine counts the other jobs too."""
    spent: dict[str, float] = defaultdict(float)
    stack: list[list[float]] = []  # [start, time in nested stages]

    def wrap(fn, stage):
        def timed(*args, **kwargs):
            stack.append([time.process_time(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, nested = stack.pop()
                elapsed = time.process_time() - start
                spent[stage] += elapsed - nested
                if stack:
                    stack[-1][1] += elapsed
        return timed

    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in stages]
    for (owner, name, stage), (_, _, fn) in zip(stages, saved):
        setattr(owner, name, wrap(fn, stage))
    try:
        yield spent
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def walk_forward(predictor: KronosPredictor, per_date: list[list[tuple]], paths: int, dates_per_call: int) -> dict:
    """Every symbol of every date, `dates_per_call` dates per call."""
    series = sum(len(b) for b in per_date)
    calls = [sum(per_date[i : i + dates_per_call], []) for i in range(0, len(per_date), dates_per_call)]
    predictor.predict_paths_batch(*zip(*calls[0][:8]), HORIZON, sample_count=paths, verbose=False, seed=0)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    with stage_timer() as spent:
        for batch in calls:
            predictor.predict_paths_batch(*zip(*batch), HORIZON, sample_count=paths, verbose=False, seed=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"series": series, "paths": paths, "calls": len(calls), "dates": len(per_date),
            "symbols_per_date": [len(b) for b in per_date], "wall_s": wall, "cpu_s": cpu,
            "series_paths_per_s": series * paths / wall, "series_paths_per_cpu_s": series * paths / cpu,
            "stages_s": dict(spent)}


# --------------------------------------------------------------------------------------------
# before vs now


def compare(predictor: KronosPredictor, batch: list[tuple], paths: int, repeats: int) -> dict:
    """The pinned old `predict_paths_batch` and today's, alternately on the same inputs: CPU seconds per call,
    identical tokens, the largest path difference."""
    histories, x_ts, y_ts = zip(*batch)
    sampler, seed = Sampler(), 0

    def old():
        return pinned_forecast.old_predict_paths_batch(predictor, histories, x_ts, y_ts, HORIZON, sampler=sampler,
                                       sample_count=paths, seed=seed)

    def new():
        return predictor.predict_paths_batch(histories, x_ts, y_ts, HORIZON, sample_count=paths, verbose=False,
                                             seed=seed).paths

    old_paths, old1, old2, old_decoded = old()
    new_paths = new()
    new1, new2, new_decoded = _generated_now(predictor, batch, paths, sampler, seed)
    times = {"old": [], "new": []}
    for _ in range(repeats):
        for name, fn in (("old", old), ("new", new)):
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
    stages = {}
    for name, fn, table in (("old", old, STAGES_BEFORE), ("new", new, STAGES)):
        with stage_timer(table) as spent:
            fn()
        stages[name] = dict(spent)
    return {"series": len(batch), "paths": paths, "old_s": old_s, "new_s": new_s, "ratio": old_s / new_s,
            "stages_s": stages,
            "old_series_paths_per_s": len(batch) * paths / old_s, "new_series_paths_per_s": len(batch) * paths / new_s,
            "tokens_identical": bool(torch.equal(old1, new1) and torch.equal(old2, new2)),
            "max_abs_diff_decoded": float((new_decoded - old_decoded).abs().max()),
            "max_rel_diff_prices": float((np.abs(new_paths - old_paths) / np.abs(old_paths))[..., :4].max()),
            "bit_identical": bool(np.array_equal(new_paths, old_paths))}


def _generated_now(predictor, batch, paths, sampler, seed):
    """Today's `generate_tokens` and `decode_forecast` on the inputs as the pinned code prepares them
    (bit-identical to today's, a test checks it): tokens and decoded bars to compare with the pinned code's."""
    prepared = [pinned_forecast._old_prepare(predictor, *args) for args in batch]
    x = torch.from_numpy(np.stack([p[0] for p in prepared]))
    stamps = torch.from_numpy(np.stack([p[1] for p in prepared]))
    with torch.no_grad():
        s1, s2 = predictor.tokenizer.encode(x, half=True)
        tokens1, tokens2 = generate_tokens(predictor.model, s1, s2, stamps, HORIZON, max_context=predictor.max_context,
                                           sample_count=paths, sampler=sampler,
                                           generator=torch.Generator().manual_seed(seed))
        decoded = decode_forecast(predictor.tokenizer, tokens1, tokens2, HORIZON, max_context=predictor.max_context,
                                  sample_count=paths)
    return tokens1, tokens2, decoded


# --------------------------------------------------------------------------------------------
# memory, in a fresh process


def memory_probe(impl: str, series: int, paths: int, data: Path) -> dict:
    """Peak RSS of one call above the RSS before it; the inputs come from a few symbols (reading the whole market
    would set the peak)."""
    torch.set_num_threads(1)
    predictor = load_predictor()
    market = {p.stem: pd.read_parquet(p) for p in sorted(data.glob("*.parquet"))[:20]}
    batch = sum(rebalance_inputs(market, 8), [])
    batch = (batch * (series // len(batch) + 1))[:series]
    predictor.predict_paths_batch(*zip(*batch[:2]), HORIZON, sample_count=2, verbose=False, seed=0)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak (VmHWM) restarts from here
    before = memory_mib()["rss"]
    if impl == "old":
        pinned_forecast.old_predict_paths_batch(predictor, *zip(*batch), HORIZON, sampler=Sampler(),
                                                sample_count=paths, seed=0)
    else:
        predictor.predict_paths_batch(*zip(*batch), HORIZON, sample_count=paths, verbose=False, seed=0)
    peak = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return {"impl": impl, "series": series, "paths": paths, "rss_before_mib": before, "peak_above_mib": peak - before}


def _probe(impl: str, data: Path) -> dict:
    done = subprocess.run([sys.executable, str(HERE), "--probe", impl, "--data", str(data)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"memory probe {impl} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# --------------------------------------------------------------------------------------------
# the driver


def run(args, data: Path) -> dict:
    torch.set_num_threads(1)
    figures = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
               "load_average_start": os.getloadavg()}
    predictor = load_predictor()
    print(f"[bench] reading {data}", flush=True)
    market = read_market(data)
    cpu = time.process_time()
    per_date = rebalance_inputs(market, args.dates)
    slicing = time.process_time() - cpu
    print(f"[bench] walk-forward: {sum(map(len, per_date))} series over {len(per_date)} dates x {args.paths} paths",
          flush=True)
    figures["walk_forward"] = {**walk_forward(predictor, per_date, args.paths, args.dates_per_call),
                               "slicing_cpu_s": slicing}
    pool = sum(per_date, [])
    figures["compare"] = []
    for series in args.series:
        print(f"[bench] before vs now: {series} series x {args.compare_paths} paths", flush=True)
        figures["compare"].append(compare(predictor, pool[:series], args.compare_paths,
                                          args.repeats + 2 * (series == 32)))
    call = sum(per_date[: args.dates_per_call], [])
    print(f"[bench] before vs now at the walk-forward's call: {len(call)} series x {args.paths} paths", flush=True)
    figures["compare_call"] = compare(predictor, call, args.paths, args.repeats)
    if not args.skip_memory:
        print("[bench] memory at 128 series x 32 paths (fresh processes)", flush=True)
        figures["memory"] = [_probe(impl, data) for impl in ("old", "new")]
    figures["load_average_end"] = os.getloadavg()
    return figures


def table(f: dict) -> str:
    w = f["walk_forward"]
    stages = w["stages_s"]
    order = ["inputs", "encode", "predictor prefill", "decode steps", "sampling", "tokenizer decode", "other"]
    inside = sum(stages.values())
    lines = [f"machine: {f['machine']}; load average {f['load_average_start']} at the start, "
             f"{f['load_average_end']} at the end", "",
             f"**Walk-forward**: {w['series']:,} series ({min(w['symbols_per_date'])}-{max(w['symbols_per_date'])} "
             f"symbols on each of {w['dates']} dates) x {w['paths']} paths x {HORIZON} bars in {w['calls']} calls: "
             f"{w['wall_s']:.1f} s wall, {w['cpu_s']:.1f} s CPU: {w['series_paths_per_s']:,.0f} series x paths per "
             f"second of wall time, **{w['series_paths_per_cpu_s']:,.0f} per CPU second**", "",
             "| stage (CPU time) | seconds | share |", "|---|---|---|"]
    lines += [f"| {s} | {stages.get(s, 0):.2f} | {stages.get(s, 0) / w['cpu_s']:.0%} |" for s in order]
    lines += [f"| the loop over calls, outside `predict_paths_batch` | {w['cpu_s'] - inside:.2f} | "
              f"{(w['cpu_s'] - inside) / w['cpu_s']:.0%} |",
              f"| (not in the total: slicing every symbol's history at every date, done before) | "
              f"{w['slicing_cpu_s']:.2f} | |", "",
              "**Before vs now** (same series, same seed, interleaved, CPU seconds per call, median):", "",
              "| series x paths | before | now | before / now | series x paths/s before / now | same tokens | "
              "max diff: decoded bars (normalised) / prices (relative) |", "|---|---|---|---|---|---|---|"]
    for c in [*f["compare"], f["compare_call"]]:
        lines.append(f"| {c['series']} x {c['paths']} | {c['old_s']:.3f} s | {c['new_s']:.3f} s | "
                     f"**{c['ratio']:.2f}x** | {c['old_series_paths_per_s']:,.0f} / "
                     f"{c['new_series_paths_per_s']:,.0f} | "
                     f"{'yes' if c['tokens_identical'] else 'NO'} | {c['max_abs_diff_decoded']:.1e} / "
                     f"{c['max_rel_diff_prices']:.1e} |")
    lines += ["", "**Where one call's CPU time goes, before / now** (milliseconds, one call each):", "",
              "| series x paths | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for c in [*f["compare"], f["compare_call"]]:
        before, now = c["stages_s"]["old"], c["stages_s"]["new"]
        lines.append(f"| {c['series']} x {c['paths']} | " + " | ".join(
            f"{1e3 * before.get(s, 0):,.0f} / {1e3 * now.get(s, 0):,.0f}" for s in order) + " |")
    for m in f.get("memory", []):
        lines.append(f"\npeak RSS above the loaded models, {m['series']} x {m['paths']}, {m['impl']}: "
                     f"{m['peak_above_mib']:,.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=300)
    parser.add_argument("--days", type=int, default=100, help="trading days of the generated market")
    parser.add_argument("--dates", type=int, default=60, help="rebalance dates (consecutive trading days)")
    parser.add_argument("--paths", type=int, default=8, help="sample paths per series in the walk-forward")
    parser.add_argument("--dates-per-call", type=int, default=2)
    parser.add_argument("--series", type=int, nargs="+", default=[1, 8, 32, 128], help="before vs now: series")
    parser.add_argument("--compare-paths", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, help="a market folder from bench_market's generate (default: new)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path, help="print the tables of a --json file again")
    parser.add_argument("--probe", choices=("old", "new"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.probe:
        print(json.dumps(memory_probe(args.probe, 128, 32, args.data)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "market"
            print(f"[bench] generating {args.symbols} symbols x ~{args.days} days", flush=True)
            generate(data, args.symbols, int(args.symbols * BARS_PER_DAY * args.days * 0.84), seed=0)
        figures = run(args, data)
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
