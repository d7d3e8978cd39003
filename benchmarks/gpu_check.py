"""GPU check: the kit's training engine and forecaster on a GPU, at the published shapes, in one script.

Measures, through the same code a run uses (`load_data`, `train_tokenizer`, `train_predictor`,
`KronosPredictor`), on a small synthetic market written by `bench_market.generate`:

1. fp32 vs bf16 (the engine's `precision: bf16`, CUDA autocast) optimizer-step time and peak GPU memory
   of phase 1 (Tokenizer-base) and phase 2 (Kronos-small, Kronos-base on the frozen phase-1 tokenizer),
   lookback 90 + predict 10, batch 50 (the reference finetuning settings);
2. bf16 vs fp32 loss agreement: the per-step training losses of the same seeded run;
3. forecasting throughput, series x paths per second: the batched KV-cached generation against the
   reference algorithm (the whole window recomputed every bar, `use_cache=False`);
4. a `torchrun --nproc_per_node 1` smoke of both training stages through `python -m kronos_kit train`,
   with a process group on the GPU's backend (nccl; gloo on a CPU) checked by an all-reduce first.

    python benchmarks/gpu_check.py                # on a GPU; < 8 min on one H200-class card
    python benchmarks/gpu_check.py --reduced      # any machine: tiny shapes, a few steps (tests run this)

Prints a Markdown table and writes every figure to --out (JSON; default $OUT/gpu_check.json when $OUT
is set, else gpu_check.json in the work folder). On a CPU bf16 autocast is off in the engine (CUDA only),
so the bf16 rows there equal fp32: the reduced mode checks the plumbing, not bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_market import generate  # benchmarks/ is the script's folder, so on its path

HERE = Path(__file__).resolve()
FULL = {"shapes": {"small": ("tokenizer-base", "small"), "base": ("tokenizer-base", "base")}, "steps": 30,
        "batch": 50, "symbols": 10, "rows": 100_000, "series": 32, "paths": 8, "history": 256, "pred_len": 48}
REDUCED = {"shapes": {"tiny": ("tiny", "tiny")}, "steps": 3, "batch": 4, "symbols": 3, "rows": 6000,
           "series": 2, "paths": 2, "history": 32, "pred_len": 4}


def _config(data: Path, run_dir: Path, tokenizer: str, predictor: str, *, precision: str, device: str,
            steps: int, batch: int):
    from kronos_kit.config import KitConfig

    phase = {"max_steps": steps, "batch_size": batch, "eval_every": 10**6, "log_every": 10**6, "max_val_batches": 1}
    return KitConfig.from_dict({
        "run_dir": str(run_dir), "cache_dir": str(run_dir.parent / "cache"), "device": device,
        "precision": precision, "seed": 0, "data": {"source": str(data), "lookback": 90, "predict": 10},
        "tokenizer": {"start_from": tokenizer, **phase},
        "predictor": {"start_from": predictor, "skill_origins": 0, "select_metric": "val_loss", **phase},
        "gate": {"override": True},  # step times only: phase 2 without notebook 01's gate
    })


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_phases(cfg, device: torch.device) -> dict:
    """Both phases through the engine: seconds per step after the first, peak GPU memory, per-step losses."""
    import kronos_kit.train as train
    from kronos_kit.data import load_data

    bundle = load_data(cfg)
    out = {}
    for phase, run in (("phase1", train.train_tokenizer), ("phase2", train.train_predictor)):
        stamps: list[float] = []
        losses: list[float] = []

        def seen(step: int, parts: dict, stamps=stamps, losses=losses) -> None:
            _sync(device)
            stamps.append(time.perf_counter())
            losses.append(float(parts["loss"]))

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run(cfg, data=bundle, progress=False, on_step=seen)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out[phase] = {"s_per_step": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), "peak_gib": peak,
                      "losses": losses}
    return out


def forecast_rates(tokenizer_shape: str, predictor_shape: str, data: Path, device: torch.device, p: dict) -> dict:
    """Series x paths per second of the cached, batched forecaster and of the reference algorithm."""
    from kronos_kit.config import DataConfig
    from kronos_kit.data.bundle import load_source
    from kronos_kit.forecast import KronosPredictor
    from kronos_kit.model import Kronos, KronosTokenizer

    frame = load_source(DataConfig(source=str(data)))
    need = p["history"] + p["pred_len"]
    histories, hist_stamps, future_stamps = [], [], []
    for k, (_, rows) in enumerate(frame.groupby("symbol", sort=True)):
        for j in range(p["series"]):
            if len(histories) == p["series"]:
                break
            at = (k * 7919 + j * need) % (len(rows) - need)
            part = rows.iloc[at:at + need]
            histories.append(part.iloc[:p["history"]][["open", "high", "low", "close", "volume", "amount"]]
                             .reset_index(drop=True))
            hist_stamps.append(part["timestamps"].iloc[:p["history"]].reset_index(drop=True))
            future_stamps.append(part["timestamps"].iloc[p["history"]:].reset_index(drop=True))
    predictor = KronosPredictor(Kronos.from_pretrained(predictor_shape, seed=0),
                                KronosTokenizer.from_pretrained(tokenizer_shape, seed=0), device=str(device))
    out = {"series": p["series"], "paths": p["paths"], "history": p["history"], "pred_len": p["pred_len"]}
    paths = {}
    for name, use_cache in (("cached", True), ("reference", False)):
        def call(cache=use_cache):
            return predictor.predict_paths_batch(histories, hist_stamps, future_stamps, p["pred_len"],
                                                 sample_count=p["paths"], verbose=False, use_cache=cache, seed=0)
        call()  # warm-up: kernels, allocator
        _sync(device)
        t0 = time.perf_counter()
        paths[name] = call().paths
        _sync(device)
        seconds = time.perf_counter() - t0
        out[f"{name}_s"] = seconds
        out[f"{name}_series_paths_per_s"] = p["series"] * p["paths"] / seconds
    out["speedup"] = out["reference_s"] / out["cached_s"]
    out["paths_max_abs_diff"] = float(np.max(np.abs(paths["cached"] - paths["reference"])))
    # float rounding moves prices by ~1e-7 of themselves (the cached path decodes a series' history once, the
    # reference per path); a token sampled differently moves them by far more
    prices = slice(0, 4)  # open, high, low, close: never near zero, unlike volume and amount
    out["paths_max_rel_diff_prices"] = float(np.max(np.abs(paths["cached"] - paths["reference"])[..., prices]
                                                    / np.abs(paths["reference"][..., prices])))
    return out


def torchrun_smoke(data: Path, work: Path, tokenizer: str, predictor: str, device: torch.device) -> dict:
    """`torchrun --nproc_per_node 1`: a process group on the device's backend, then both training stages."""
    run_dir = work / "smoke"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    overrides = [f"data.source={data}", "data.lookback=90", "data.predict=10", f"cache_dir={work / 'cache'}",
                 f"device={device.type}", f"precision={'bf16' if device.type == 'cuda' else 'fp32'}",
                 f"tokenizer.start_from={tokenizer}", f"predictor.start_from={predictor}",
                 "tokenizer.max_steps=2", "predictor.max_steps=2", "tokenizer.batch_size=8", "predictor.batch_size=8",
                 "tokenizer.max_val_batches=1", "predictor.max_val_batches=1", "predictor.skill_origins=0",
                 "gate.override=true"]  # a smoke of the training stages: phase 2 without notebook 01's gate
    t0 = time.perf_counter()
    steps = [[*torchrun, str(HERE), "_process_group"]]
    steps += [[*torchrun, "-m", "kronos_kit", "train", phase, "--run-dir", str(run_dir), *overrides]
              for phase in ("tokenizer", "predictor")]
    outputs = []
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"torchrun smoke failed: {' '.join(command)}\n{done.stderr[-3000:]}")
        outputs.append(done.stdout.strip().splitlines()[-1])
    return {"seconds": time.perf_counter() - t0, "lines": outputs,
            "checkpoints": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("model.safetensors"))}


def process_group() -> None:
    """Under torchrun: init the device's backend and all-reduce one tensor (the engine skips a group at world 1)."""
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend)
    value = torch.ones(1, device=device)
    dist.all_reduce(value)
    print(json.dumps({"backend": backend, "world": dist.get_world_size(), "all_reduce": value.item()}))
    dist.destroy_process_group()


def check(args) -> dict:
    cuda = torch.cuda.is_available()
    if not cuda and not args.reduced:
        raise SystemExit("no CUDA device: run with --reduced (tiny shapes, a few steps) on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    p = REDUCED if args.reduced else FULL
    torch.set_num_threads(args.threads)
    work = args.work
    data = work / "market"
    if not data.exists():
        generate(data, p["symbols"], p["rows"], seed=0)
    figures = {"device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()})",
               "torch": torch.__version__, "reduced": args.reduced, "settings": {k: v for k, v in p.items()
                                                                                if k != "shapes"}, "shapes": {}}
    t_start = time.perf_counter()
    for shape, (tok, pred) in p["shapes"].items():
        row = {}
        for precision in ("fp32", "bf16"):
            print(f"[gpu_check] {shape}: training, {precision}", flush=True)
            cfg = _config(data, work / f"{shape}-{precision}", tok, pred, precision=precision, device=device.type,
                          steps=p["steps"], batch=p["batch"])
            row[precision] = train_phases(cfg, device)
        for phase in ("phase1", "phase2"):
            a, b = (np.array(row[x][phase]["losses"]) for x in ("fp32", "bf16"))
            row[f"{phase}_loss_rel_diff_max"] = float(np.max(np.abs(b - a) / np.maximum(np.abs(a), 1e-12)))
        print(f"[gpu_check] {shape}: forecasting", flush=True)
        row["forecast"] = forecast_rates(tok, pred, data, device, p)
        figures["shapes"][shape] = row
    print("[gpu_check] torchrun smoke", flush=True)
    tok, pred = next(iter(p["shapes"].values()))
    figures["torchrun"] = torchrun_smoke(data, work, tok, pred, device)
    figures["seconds"] = time.perf_counter() - t_start
    return figures


def table(f: dict) -> str:
    lines = [f"device: {f['device']}, torch {f['torch']}{' (reduced mode)' if f['reduced'] else ''}; "
             f"{f['seconds']:.0f} s in all", "",
             "| shape | phase | fp32 ms/step | bf16 ms/step | bf16 speed-up | fp32 peak GiB | bf16 peak GiB | "
             "max loss rel. diff |", "|---|---|---|---|---|---|---|---|"]
    for shape, row in f["shapes"].items():
        for phase in ("phase1", "phase2"):
            a, b = row["fp32"][phase], row["bf16"][phase]
            peak = [f"{x['peak_gib']:.2f}" if x["peak_gib"] is not None else "n/a" for x in (a, b)]
            lines.append(f"| {shape} | {phase} | {a['s_per_step'] * 1e3:.0f} | {b['s_per_step'] * 1e3:.0f} | "
                         f"{a['s_per_step'] / b['s_per_step']:.2f}x | {peak[0]} | {peak[1]} | "
                         f"{row[f'{phase}_loss_rel_diff_max']:.2e} |")
    lines += ["", "| shape | series x paths | cached (series x paths/s) | reference, uncached | speed-up |",
              "|---|---|---|---|---|"]
    for shape, row in f["shapes"].items():
        r = row["forecast"]
        lines.append(f"| {shape} | {r['series']} x {r['paths']} (history {r['history']}, {r['pred_len']} bars) | "
                     f"{r['cached_series_paths_per_s']:.1f} | {r['reference_series_paths_per_s']:.1f} | "
                     f"{r['speedup']:.1f}x |")
    t = f["torchrun"]
    lines += ["", f"torchrun smoke ({t['seconds']:.0f} s): {t['lines'][0]}; {t['lines'][1]}; {t['lines'][2]}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="check", choices=("check", "_process_group"))
    parser.add_argument("--reduced", action="store_true", help="tiny shapes and a few steps (runs on a CPU)")
    parser.add_argument("--work", type=Path, help="work folder (default: a fresh temporary folder)")
    parser.add_argument("--out", type=Path, help="JSON of every figure")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.mode == "_process_group":
        process_group()
        return
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    figures = check(args)
    print(table(figures))
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else args.work) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
