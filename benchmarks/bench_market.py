"""Market-scale benchmark: a whole market of intraday bars through the kit's own data layer, engine and
forecaster (nothing here is a benchmark-only path: `load_data`, `train_tokenizer`, `train_predictor`,
`evaluate_models`).

`generate` writes, offline and seeded, one Parquet (or CSV) file per symbol: 5-minute bars of a
09:30-16:00 session on business days less market holidays, symbols listed and delisted at different
dates (lengths vary ~3x), missing bars, multi-day trading halts (no bars), suspended stretches printed
as flat bars with volume 0, GARCH-like volatility, prices on a 0.01 tick, whole-number volumes.

`run` then measures, each step in a fresh process so that no step's memory counts in another's:
1. cold load: read + validate every file, compute calendar features, write the cache entry;
   warm load: hash the files and memory-map the entry (what every later rank and notebook does);
2. resident memory per rank under `torchrun --nproc_per_node 1` and `2` (gloo): after the imports,
   after `load_data`, after phase-1 training steps, and after reading every page of the data (what a
   long run reaches once its windows have visited all rows); RSS and PSS from /proc/self/smaps_rollup,
   the same runs on a tiny data set giving the part that is the data's;
3. window sampling rate (random `ds[i]`, and a shuffled DataLoader of batch 32);
4. phase-1 and phase-2 optimizer steps/s at the tiny and Kronos-mini shapes (Tokenizer-2k for mini);
5. a walk-forward evaluation of a tiny Kronos pair over every symbol's test split.

    .venv/bin/python benchmarks/bench_market.py generate --out /tmp/kronos-market            # ~20M rows
    .venv/bin/python benchmarks/bench_market.py run --data /tmp/kronos-market --work /tmp/kronos-market-work

Figures print as a Markdown table (and JSON with --json). Reduced sizes (`--symbols 20 --rows 200000`)
run in a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

BARS_PER_DAY = 78  # 09:30 .. 15:55 bar starts
HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------
# the data


def _one_symbol(rng: np.random.Generator, days: pd.DatetimeIndex) -> pd.DataFrame:
    """One symbol's bars over `days`: halts, suspended flat stretches, missing bars, clustered volatility."""
    n_days = len(days)
    keep_day = np.ones(n_days, bool)
    for _ in range(rng.integers(0, 4)):  # trading halts: whole days without a bar
        a = rng.integers(0, n_days)
        keep_day[a:a + rng.integers(1, 11)] = False
    days = days[keep_day]
    times = (days.values[:, None] + (np.timedelta64(570, "m") + np.arange(BARS_PER_DAY) * np.timedelta64(5, "m"))
             ).ravel()
    times = times[rng.random(len(times)) > 0.002]  # bars the feed missed
    n = len(times)
    # GARCH(1,1)-like returns
    shocks = rng.standard_normal(n)
    var = np.empty(n)
    v, omega, alpha, beta = 1e-6, 2e-8, 0.08, 0.9
    r = np.empty(n)
    for i in range(0, n, 4096):  # the recursion in blocks: per block a fixed variance, then updated
        block = shocks[i:i + 4096]
        var[i:i + 4096] = v
        r[i:i + 4096] = np.sqrt(v) * block
        v = omega + alpha * float(np.mean(r[i:i + 4096] ** 2)) + beta * v
    price = np.round(np.exp(rng.uniform(np.log(5), np.log(200))) * np.exp(np.cumsum(r)), 2)
    close = np.maximum(price, 0.01)
    open_ = np.r_[close[0], close[:-1]]
    volume = np.round(rng.lognormal(7, 1, n))
    for _ in range(rng.integers(0, 3)):  # suspended: flat bars, nothing traded
        a = rng.integers(1, n)
        b = min(n, a + rng.integers(20, 200))
        close[a:b] = open_[a:b] = close[a - 1]
        volume[a:b] = 0
        if b < n:
            open_[b] = close[b - 1]
    spread = np.round(np.abs(rng.normal(0, 0.002, (2, n))) * close, 2)
    high = np.maximum(open_, close) + spread[0] * (volume > 0)
    low = np.maximum(np.minimum(open_, close) - spread[1] * (volume > 0), 0.01)
    low = np.minimum(low, np.minimum(open_, close))
    amount = np.round(volume * (open_ + high + low + close) / 4, 2)
    return pd.DataFrame({"timestamps": times, "open": open_, "high": high, "low": low, "close": close,
                         "volume": volume, "amount": amount})


def generate(out: Path, symbols: int, rows: int, *, seed: int = 0, fmt: str = "parquet") -> dict:
    """One file per symbol under `out`; about `rows` rows in all; symbols listed/delisted at different dates."""
    rng = np.random.default_rng(seed)
    full_days = int(rows / symbols / BARS_PER_DAY / 0.84) + 1  # 60% full history, 40% 30-100% of it
    days = pd.bdate_range("2020-01-02", periods=int(full_days * 1.02))
    days = days[rng.random(len(days)) > 0.02]  # market holidays
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for k in range(symbols):
        share = 1.0 if rng.random() < 0.6 else rng.uniform(0.3, 1.0)
        length = min(len(days), max(30, int(share * len(days))))
        first = rng.integers(0, len(days) - length + 1)
        frame = _one_symbol(rng, days[first:first + length])
        name = f"SYM{k:04d}"
        if fmt == "csv":
            frame.to_csv(out / f"{name}.csv", index=False)
        else:
            frame.to_parquet(out / f"{name}.parquet", index=False)
        total += len(frame)
    info = {"symbols": symbols, "rows": total, "format": fmt, "seed": seed,
            "bytes": sum(p.stat().st_size for p in out.iterdir())}
    (out.parent / f"{out.name}.json").write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------------------------
# measuring one process


def memory_mib() -> dict[str, float]:
    """This process's resident (RSS) and proportional (PSS) set size and peak RSS, MiB."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_config(data: Path, work: Path, label: str, **overrides):
    from kronos_kit.config import KitConfig

    values = {
        "run_dir": str(work / f"run-{label}"), "cache_dir": str(work / "cache"), "device": "cpu", "seed": 0,
        "threads": 1, "data": {"source": str(data), "lookback": 90, "predict": 10},
        "tokenizer": {"start_from": "tiny", "max_steps": 10, "batch_size": 32, "eval_every": 1000,
                      "max_val_batches": 2, "log_every": 1000},
        "predictor": {"start_from": "tiny", "max_steps": 10, "batch_size": 32, "eval_every": 1000,
                      "max_val_batches": 2, "log_every": 1000, "skill_origins": 0},
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        values.setdefault(section, {})[name] = value
    return KitConfig.from_dict(values)


def step_load(args) -> dict:
    """Cold (build the entry) or warm (hash + map) `cached_arrays`, timed by part."""
    import kronos_kit.data.store as store
    from kronos_kit.data.load import load_validated

    cache = args.work / "cache"
    timings = {}
    if args.cold:
        t0 = time.perf_counter()
        validated = load_validated(str(args.data))
        timings["read_validate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        arrays = store.MarketArrays.from_validated(validated)
        timings["calendar_s"] = time.perf_counter() - t0
        del validated, arrays
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    arrays = store.cached_arrays(str(args.data), cache)
    timings["cached_arrays_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.source_key(str(args.data), symbol=None, fill=None, columns=None)
    timings["hash_s"] = time.perf_counter() - t0
    entry_mib = sum(p.stat().st_size for p in arrays.folder.iterdir()) / 2**20
    out = {"rows": arrays.rows, "symbols": len(arrays.names), "entry_mib": entry_mib, **timings,
           "dtypes": {c: str(v.dtype) for c, v in arrays.features.items()}}
    if args.cold:
        out["peak_mib_cold"] = memory_mib()["peak"]
    return out


def step_rank(args) -> dict:
    """One torchrun rank: memory after imports, load_data, phase-1 steps and a read of every data page."""
    import torch
    import torch.distributed as dist

    import kronos_kit.train as train
    from kronos_kit.data import load_data

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    marks = {"imports": memory_mib()}
    cfg = bench_config(args.data, args.work, f"{args.label}-w{os.environ.get('WORLD_SIZE', 1)}",
                       **{"tokenizer.max_steps": args.steps})
    t0 = time.perf_counter()
    bundle = load_data(cfg)
    load_s = time.perf_counter() - t0
    marks["load_data"] = memory_mib()
    train.train_tokenizer(cfg, data=bundle, progress=False)
    marks["phase1"] = memory_mib()
    a = bundle.arrays  # every page, as a long run's windows reach them
    touched = sum(float(np.asarray(v, np.float64).sum()) for v in (*a.features.values(), a.timestamps))
    touched += float(a.stamps.sum())
    if dist.is_initialized():
        dist.barrier()  # all ranks hold their maps when each measures
    marks["all_pages"] = memory_mib()
    if dist.is_initialized():
        dist.barrier()
    return {"rank": rank, "rows": a.rows, "load_s": load_s, "windows": len(bundle.train), "marks": marks,
            "checksum": touched}


def step_sample(args) -> dict:
    """Window sampling: random items one by one, and a shuffled DataLoader of batch 32."""
    import torch
    from torch.utils.data import DataLoader

    from kronos_kit.data import load_data

    torch.set_num_threads(1)
    bundle = load_data(bench_config(args.data, args.work, "sample"))
    ds = bundle.train
    picks = np.random.default_rng(1).integers(0, len(ds), args.items)
    t0 = time.perf_counter()
    for i in picks:
        ds[int(i)]
    items_s = time.perf_counter() - t0
    loader = iter(DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    next(loader)  # the shuffle draws a permutation of every window first
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = args.items // 32
    for _ in range(batches):
        next(loader)
    loader_s = time.perf_counter() - t0
    return {"windows": len(ds), "items_per_s": args.items / items_s, "loader_windows_per_s": batches * 32 / loader_s,
            "loader_first_batch_s": first_s}


def step_train(args) -> dict:
    """Phase 1 then phase 2 (on phase 1's frozen tokenizer) through the engine; steps/s after the first step."""
    import torch

    import kronos_kit.train as train
    from kronos_kit.data import load_data

    torch.set_num_threads(1)
    shapes = {"tiny": ("tiny", "tiny"), "mini": ("tokenizer-2k", "mini")}
    tok, pred = shapes[args.shape]
    cfg = bench_config(args.data, args.work, f"train-{args.shape}", **{
        "tokenizer.start_from": tok, "predictor.start_from": pred, "tokenizer.max_steps": args.steps,
        "predictor.max_steps": args.steps, "gate.override": True})  # throughput only: phase 2 without a gate
    bundle = load_data(cfg)
    out = {"shape": args.shape, "batch": 32, "steps": args.steps}
    for phase, run in (("phase1", train.train_tokenizer), ("phase2", train.train_predictor)):
        stamps: list[float] = []
        run(cfg, data=bundle, progress=False, on_step=lambda step, parts, seen=stamps: seen.append(time.perf_counter()))
        out[f"{phase}_steps_per_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return out


def step_evaluate(args) -> dict:
    """Walk-forward evaluation of a tiny Kronos pair over every symbol's test split."""
    import torch

    from kronos_kit.data import load_data
    from kronos_kit.evaluate import evaluate_models
    from kronos_kit.model import Kronos, KronosTokenizer

    torch.set_num_threads(1)
    bundle = load_data(bench_config(args.data, args.work, "evaluate"))
    test = bundle.splits.test
    models = {"tiny": (Kronos.from_pretrained("tiny", seed=0), KronosTokenizer.from_pretrained("tiny", seed=0))}
    t0 = time.perf_counter()
    result = evaluate_models(test, models, lookback=90, pred_len=10, stride=args.stride, sample_count=8,
                             seed=0, progress=False)
    wall = time.perf_counter() - t0
    origins = len(result.symbols)
    model_s = result.timings["model:tiny"]  # time inside the forecaster; inputs and baselines are timed apart
    return {"origins": origins, "symbols": int(pd.unique(result.symbols).size), "paths": 8, "pred_len": 10,
            "wall_s": wall, "timings": result.timings, "series_paths_per_s": origins * 8 / model_s,
            "test_rows": len(test)}


# --------------------------------------------------------------------------------------------
# the driver


def _child(step: str, args, *extra: str, torchrun: int | None = None) -> list[dict]:
    """Run one step in fresh processes; each prints one JSON line starting with BENCH."""
    base = [str(HERE), "_" + step, "--data", str(args.data), "--work", str(args.work), *extra]
    if torchrun is None:
        command = [sys.executable, *base]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                   "--master_port", str(29500 + torchrun), *base]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KRONOS_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{step} failed:\n{done.stderr[-4000:]}")
    return [json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("BENCH")]


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def run(args) -> dict:
    figures = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "load_average_start": os.getloadavg()}
    print(f"[bench] cold load of {args.data}", flush=True)
    figures["cold"] = _child("load", args, "--cold")[0]
    figures["warm"] = _child("load", args)[0]
    tiny = args.work / "tiny-data"
    if not tiny.exists():
        generate(tiny, 3, 6000, seed=1)
    figures["memory"] = {}
    for label, data in (("market", args.data), ("tiny", tiny)):
        for world in (1, 2):
            print(f"[bench] memory: {label}, {world} rank(s)", flush=True)
            sub = argparse.Namespace(**{**vars(args), "data": data})
            figures["memory"][f"{label}-{world}"] = _child("rank", sub, "--label", label, "--steps", str(args.steps),
                                                           torchrun=world)
    print("[bench] sampling", flush=True)
    figures["sampling"] = _child("sample", args, "--items", str(args.items))[0]
    figures["train"] = {}
    for shape, steps in (("tiny", args.steps), ("mini", args.mini_steps)):
        print(f"[bench] training steps, {shape}", flush=True)
        figures["train"][shape] = _child("train", args, "--shape", shape, "--steps", str(steps))[0]
    print("[bench] walk-forward evaluation", flush=True)
    figures["evaluate"] = _child("evaluate", args, "--stride", str(args.stride))[0]
    figures["load_average_end"] = os.getloadavg()
    return figures


def table(f: dict) -> str:
    mem = f["memory"]

    def per_rank(key: str, mark: str, what: str = "rss") -> list[float]:
        return [r["marks"][mark][what] - r["marks"]["imports"][what] for r in mem[key]]

    def pss_sum(key: str, mark: str) -> float:
        return sum(r["marks"][mark]["pss"] for r in mem[key])

    lines = [f"machine: {f['machine']}; load average {f['load_average_start']} at the start, "
             f"{f['load_average_end']} at the end",
             f"data: {f['cold']['rows']:,} rows, {f['cold']['symbols']} symbols; cache entry "
             f"{_gib(f['cold']['entry_mib'])} (dtypes {f['cold']['dtypes']})", "",
             "| figure | value |", "|---|---|",
             f"| cold load: read + validate (`load_validated`) | {f['cold']['read_validate_s']:.1f} s |",
             f"| cold load: calendar features | {f['cold']['calendar_s']:.1f} s |",
             f"| cold `cached_arrays` (read + validate + write the entry) | {f['cold']['cached_arrays_s']:.1f} s |",
             f"| warm `cached_arrays` (hash the files + map the entry) | {f['warm']['cached_arrays_s']:.1f} s "
             f"(hashing {f['warm']['hash_s']:.1f} s) |",
             f"| peak RSS of the cold load (whole process) | {_gib(f['cold']['peak_mib_cold'])} |"]
    for world in (1, 2):
        for mark in ("load_data", "phase1", "all_pages"):
            rss = per_rank(f"market-{world}", mark)
            lines.append(f"| RSS above imports per rank, {world} rank(s), after {mark} | "
                         f"{', '.join(_gib(x) for x in rss)} |")
    warm_loads = ", ".join(f"{r['load_s']:.1f} s" for r in mem["market-2"])
    base1, base2 = pss_sum("tiny-1", "all_pages"), pss_sum("tiny-2", "all_pages")
    one, two = pss_sum("market-1", "all_pages") - base1, pss_sum("market-2", "all_pages") - base2
    lines += [f"| sum of PSS minus the tiny-data run, 1 rank / 2 ranks (all pages read) | {_gib(one)} / {_gib(two)}"
              f" = **{two / one:.2f}x** |",
              f"| `load_data` in a rank (warm), 2 ranks | {warm_loads} |"]
    s = f["sampling"]
    lines.append(f"| window sampling: random `ds[i]` / shuffled DataLoader (batch 32) | {s['items_per_s']:,.0f} / "
                 f"{s['loader_windows_per_s']:,.0f} windows/s ({s['windows']:,} train windows; the DataLoader's "
                 f"first batch, which draws the permutation, {s['loader_first_batch_s']:.1f} s) |")
    for shape, t in f["train"].items():
        lines.append(f"| {shape}: phase-1 / phase-2 steps/s (batch 32) | {t['phase1_steps_per_s']:.2f} / "
                     f"{t['phase2_steps_per_s']:.2f} |")
    e = f["evaluate"]
    t = e["timings"]
    lines.append(f"| walk-forward (tiny pair): {e['origins']} origins over {e['symbols']} symbols x {e['paths']} "
                 f"paths x {e['pred_len']} bars | {e['wall_s']:.0f} s wall: forecaster {t['model:tiny']:.0f} s "
                 f"(**{e['origins'] * e['paths'] / t['model:tiny']:.0f} series x paths/s**), inputs "
                 f"{t['inputs:tiny']:.0f} s, GARCH baseline {t['baseline:garch']:.0f} s, "
                 f"metrics {t['metrics']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write the synthetic market (one file per symbol)")
    g.add_argument("--out", type=Path, default=Path("/tmp/kronos-market"))
    g.add_argument("--symbols", type=int, default=300)
    g.add_argument("--rows", type=int, default=20_000_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    t = sub.add_parser("table", help="print the table of a --json file again")
    t.add_argument("json_file", type=Path)
    r = sub.add_parser("run", help="measure (see the module docstring)")
    for p in (r, *(sub.add_parser(f"_{s}") for s in ("load", "rank", "sample", "train", "evaluate"))):
        p.add_argument("--data", type=Path, default=Path("/tmp/kronos-market"))
        p.add_argument("--work", type=Path, default=Path("/tmp/kronos-market-work"))
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--mini-steps", type=int, default=4)
        p.add_argument("--items", type=int, default=5000)
        p.add_argument("--stride", type=int, default=2500)
        p.add_argument("--cold", action="store_true")
        p.add_argument("--label", default="market")
        p.add_argument("--shape", default="tiny")
        p.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "table":
        print(table(json.loads(args.json_file.read_text())))
    elif args.command == "generate":
        print(json.dumps(generate(args.out, args.symbols, args.rows, seed=args.seed, fmt=args.format)))
    elif args.command == "run":
        figures = run(args)
        print(table(figures))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
    else:
        step = {"_load": step_load, "_rank": step_rank, "_sample": step_sample, "_train": step_train,
                "_evaluate": step_evaluate}[args.command]
        print("BENCH" + json.dumps(step(args)), flush=True)


if __name__ == "__main__":
    main()
