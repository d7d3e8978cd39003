"""Command line: `python -m kronos_kit <command>` (see `--help`).

Mistakes in a call (a mistyped parameter, a missing file, a run folder that cannot be used) print
`error: <what to do>` and exit with code 2, without a traceback and without creating anything.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

USAGE_EXIT = 2  # argparse's own exit code for usage errors


def _config(path: str | None, overrides: list[str], run_dir: str | None = None):
    from kronos_kit.config import KitConfig, apply_overrides, parse_overrides, resolve_path, resolve_paths

    cfg = KitConfig.from_file(resolve_path(path)) if path else KitConfig()
    given = {"run_dir": run_dir} if run_dir is not None else {}  # --run-dir left out keeps the config's
    return resolve_paths(apply_overrides(cfg, {**parse_overrides(overrides), **given}))


def _parameters_help() -> str:
    from kronos_kit.config import NOTEBOOK_PARAMETERS

    rows = [f"  {name:<16} -> {field}" for name, field in NOTEBOOK_PARAMETERS.items()]
    return ("notebook parameters (-p NAME=VALUE; or any dotted config field, e.g. -p predictor.lr=1e-5,\n"
            "-p data.columns.Date=timestamps):\n" + "\n".join(rows) +
            "\n\nrelative paths: tried from the working directory, then from the project root.\n"
            "examples:\n"
            "  python -m kronos_kit pipeline -p data=bars.csv -p tokenizer_steps=500\n"
            "  python -m kronos_kit pipeline --run-dir runs/default-nasdaq-20260101-120000 --resume\n"
            "  python -m kronos_kit pipeline --run-dir runs/default-nasdaq-20260101-120000 --from 02 "
            "-p ignore_gate=true")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kronos_kit", description="kronos-kit command line")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one finetuning phase (works under torchrun)")
    train.add_argument("phase", choices=["tokenizer", "predictor"])
    train.add_argument("--config", help="YAML config (default: built-in defaults)")
    train.add_argument("--run-dir", help="run directory (overrides the config's run_dir)")
    train.add_argument("--resume", action="store_true", help="continue from <run_dir>/state/<phase>.pt")
    train.add_argument("--overwrite", action="store_true",
                       help="retrain a phase the run folder already holds from step 0 (replaces its best, last, state)")
    train.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. tokenizer.max_steps=20")

    judge = sub.add_parser("gate", help="judge a run's adapted tokenizer against its base (what notebook 01 ends "
                                        "with); exit 1 when the gate fails")
    judge.add_argument("--config", help="YAML config (default: built-in defaults)")
    judge.add_argument("--run-dir", help="run directory (overrides the config's run_dir)")
    judge.add_argument("overrides", nargs="*", help="key=value config overrides")

    pipe = sub.add_parser("pipeline", help="run notebooks 01 -> 02 -> 03 with papermill into a run directory",
                          epilog=_parameters_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    pipe.add_argument("--config", help="YAML config of a new run (default: configs/default.yaml)")
    pipe.add_argument("--run-dir", help="run folder (default: runs/<config>-<data>-<timestamp> at the project root)")
    pipe.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                      help="notebook parameter or dotted config override, repeatable (listed below)")
    pipe.add_argument("--resume", action="store_true",
                      help="continue the --run-dir run with its saved config: skip completed stages, continue an "
                           "interrupted training stage from its state")
    pipe.add_argument("--from", dest="from_stage", metavar="STAGE",
                      help="rerun the --run-dir run from this stage (01, 02 or 03) with its saved config")
    pipe.add_argument("--overwrite", action="store_true", help="allow reusing an existing run directory")

    fc = sub.add_parser("forecast", help="forecast the bars after the end of each symbol's data into a CSV")
    models = fc.add_argument_group("models (give --run, or --tokenizer and --predictor)")
    models.add_argument("--run", help="a pipeline run: its promoted pair and calibrated sampling when present")
    models.add_argument("--tokenizer", help="tokenizer checkpoint (folder, embedded:..., hub id)")
    models.add_argument("--predictor", help="predictor checkpoint (folder, embedded:..., hub id)")
    fc.add_argument("--data", required=True, help="CSV/Parquet file or folder, or sample:nasdaq / sample:sp500")
    fc.add_argument("--column", action="append", default=[], metavar="SOURCE=CANONICAL",
                    help="map a column name, e.g. --column Date=timestamps (repeatable)")
    fc.add_argument("--symbol", help="symbol name for a file without a symbol column (or: keep only this symbol)")
    fc.add_argument("--adj-close", action="store_true",
                    help="use the 'Adj Close' column: open/high/low/close scaled by Adj Close / Close")
    fc.add_argument("--horizon", type=int, required=True, help="bars to forecast after each symbol's last bar")
    fc.add_argument("--out", required=True, help="output CSV")
    fc.add_argument("--samples", type=int, default=32, help="sample paths per symbol (default 32)")
    fc.add_argument("--quantiles", default="0.1,0.5,0.9", help="comma-separated levels (default 0.1,0.5,0.9)")
    fc.add_argument("--seed", type=int, default=0)
    fc.add_argument("--temperature", type=float, help="sampling temperature (default: the run's calibrated one)")
    fc.add_argument("--top-p", type=float, help="nucleus sampling (default: the run's calibrated one)")
    fc.add_argument("--uncalibrated", action="store_true",
                    help="skip the run's path calibration (calibration.json) and write the paths as sampled")
    fc.add_argument("--model-only", action="store_true",
                    help="write the run's calibrated model alone, not its handed-over forecast (ensemble + tails)")
    fc.add_argument("--max-context", type=int,
                    help="bars of history per symbol (default: the run's data.lookback, else 512)")
    fc.add_argument("--device", default="cpu")
    fc.add_argument("--threads", type=int, help="torch CPU threads (default: $KRONOS_THREADS, else torch's)")

    _add_sweep_parser(sub)

    cmp = sub.add_parser("compare", help="one table of several runs: config differences, gate, codebook, metrics")
    cmp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--out", help="folder for comparison.md and comparison.csv (default: print only)")

    pre = sub.add_parser("pretrain", help="pretrain the embedded base checkpoints (make base)")
    pre.add_argument("--config", default="configs/pretrain_base.yaml")
    pre.add_argument("--out", default="kronos_kit/assets/base")
    pre.add_argument("overrides", nargs="*")

    strip = sub.add_parser("strip-notebooks", help="remove outputs from notebooks")
    strip.add_argument("paths", nargs="+")
    strip.add_argument("--check", action="store_true", help="fail if any notebook has outputs")
    return parser


def _add_sweep_parser(sub: Any) -> None:
    sweep = sub.add_parser("sweep", help="search the finetuning settings on validation (Optuna); each trial is a run",
                           epilog="examples:\n  python -m kronos_kit sweep --config configs/sweep-small.yaml --space "
                                  "configs/sweeps/default.yaml --workers 2\n  python -m kronos_kit sweep --config "
                                  "configs/sweep-universe.yaml --space configs/sweeps/universe.yaml --workers 2   "
                                  "(a panel: the validation RankIC)\n"
                                  "  python -m kronos_kit sweep --sweep-dir sweeps/NAME --resume\n"
                                  "  python -m kronos_kit sweep --space S.yaml --storage postgresql://host/db   "
                                  "(machine 1)\n  python -m kronos_kit sweep --storage postgresql://host/db --study "
                                  "NAME --sweep-dir sweeps/NAME --resume   (machine 2)",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--config", help="base config; trial 0 runs it as it is (default: configs/default.yaml)")
    sweep.add_argument("--space", help="search space file (ranges, choices, conditions, sweep settings)")
    sweep.add_argument("--sweep-dir", help="sweep folder (default: sweeps/<config>-<data>-<timestamp>)")
    sweep.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                       help="override of the base config for every trial, repeatable (as in pipeline -p)")
    sweep.add_argument("--trials", type=int, help="trials to finish (overrides the space file's sweep.trials)")
    sweep.add_argument("--timeout", type=float, help="seconds this call may start new trials for")
    sweep.add_argument("--workers", type=int, default=1, help="worker processes on this machine (threads split)")
    sweep.add_argument("--storage", help="Optuna storage: a database URL or a journal file (default: SQLite in the "
                                         "sweep folder)")
    sweep.add_argument("--study", help="study name (default: the sweep folder's name); to join one with --resume")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the --sweep-dir sweep (interrupted trials continue), or join a --storage study")
    sweep.add_argument("--report", action="store_true", help="only rewrite the leaderboard, figures and report.md")


# ---------------------------------------------------------------------------------------------
# forecast


def run_models(run_dir: str | Path) -> dict[str, Any]:
    """What `forecast --run` uses from a run (`runs.run_choice`): the promoted pair, calibrated sampling and
    path calibration when the run has decided them, else its own `best` checkpoints (the base ones for a phase
    it skipped) and its configured sampling. Reads plain JSON and YAML only."""
    from kronos_kit.binding import check_stages
    from kronos_kit.config import KitConfig
    from kronos_kit.runs import RunDir, run_choice

    rd = RunDir(run_dir)
    if not rd.config.is_file():
        raise FileNotFoundError(f"--run {rd.path}: no config.yaml there; give the folder of a pipeline run")
    cfg = KitConfig.from_file(rd.config)
    decided = rd.promoted.is_file()
    if not decided:  # the promoted pair's reader checks every stage itself
        check_stages(rd.path, cfg, reader="forecast --run", stages=("01", "02"), external=False)
    choice = run_choice(rd.path, cfg, model="promoted" if decided else "finetuned")
    return {"max_context": choice.max_context, "top_k": choice.top_k, "lookback": choice.lookback,
            "model": choice.promoted, "tokenizer": choice.tokenizer_source,
            "predictor": choice.predictor_source, "sampling": choice.sampling, "calibrated": choice.calibrated,
            "path_calibration": choice.path_calibration,  # plain JSON, read by calibration.PathCalibration
            "handover": choice.handover,  # plain JSON, read by calibration.Handover
            "chosen": f"promoted ({rd.promoted.name})" if decided else "the run's best checkpoints"}


def _quantiles(text: str) -> list[float]:
    try:
        levels = [float(q) for q in text.split(",") if q.strip()]
    except ValueError:
        levels = []
    if not levels:
        raise ValueError(f"--quantiles {text!r}: give comma-separated levels in [0, 1], e.g. 0.1,0.5,0.9")
    return levels


def _check_forecast_args(args: argparse.Namespace) -> None:
    """Refuse bad options before any data is read or model runs."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: give a whole number >= 1, or leave it out")
    if args.max_context is not None and args.max_context < 2:
        raise ValueError(f"--max-context {args.max_context}: give at least 2 bars of history, or leave it out "
                         "(the run's data.lookback)")
    for flag, value in (("--horizon", args.horizon), ("--samples", args.samples)):
        if value < 1:
            raise ValueError(f"{flag} {value}: give a whole number >= 1")
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", "\\")):
        raise ValueError(f"--out {args.out}: a folder; give the CSV file to write, e.g. {out / 'forecast.csv'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {args.out}: {out.parent} is a file, not a folder")
    _quantiles(args.quantiles)
    from kronos_kit.runtime import check_device

    check_device(args.device)


def _forecast(args: argparse.Namespace) -> int:
    from kronos_kit.calibration import Handover, PathCalibration
    from kronos_kit.config import (
        DEFAULT_MAX_CONTEXT,
        DEFAULT_TOP_K,
        DataConfig,
        KitConfig,
        PredictorPhaseConfig,
        TokenizerPhaseConfig,
        parse_overrides,
        resolve_path,
        resolve_paths,
        thread_count,
    )
    from kronos_kit.data.bundle import load_source
    from kronos_kit.forecast import DEFAULT_SAMPLING, KronosPredictor, forecast_frame
    from kronos_kit.model import Kronos, KronosTokenizer
    from kronos_kit.runtime import resolve_device, set_threads

    if (args.run is None) == (args.tokenizer is None and args.predictor is None):
        raise ValueError("give either --run RUN_DIR, or --tokenizer and --predictor")
    if args.run is None and (args.tokenizer is None or args.predictor is None):
        raise ValueError("--tokenizer and --predictor go together (a predictor needs the tokenizer it was trained on)")
    if args.model_only and args.run is None:
        raise ValueError("--model-only goes with --run: only a run has a handed-over forecast to leave out")
    _check_forecast_args(args)
    set_threads(args.threads if args.threads is not None else thread_count())
    if args.run is not None:
        chosen = run_models(resolve_path(args.run))
    else:
        chosen = {"tokenizer": args.tokenizer, "predictor": args.predictor, "chosen": "given",
                  "sampling": dict(DEFAULT_SAMPLING), "calibrated": False, "max_context": DEFAULT_MAX_CONTEXT,
                  "top_k": DEFAULT_TOP_K, "lookback": DEFAULT_MAX_CONTEXT}
    sampling = {"temperature": args.temperature if args.temperature is not None else chosen["sampling"]["temperature"],
                "top_p": args.top_p if args.top_p is not None else chosen["sampling"]["top_p"]}
    columns = {k: str(v) for k, v in parse_overrides(args.column).items()} or None
    # the same path rule and loader as a pipeline run's data.source
    sources = resolve_paths(KitConfig(data=DataConfig(source=args.data, symbol=args.symbol, columns=columns,
                                                      adj_close=args.adj_close),
                                      tokenizer=TokenizerPhaseConfig(start_from=chosen["tokenizer"]),
                                      predictor=PredictorPhaseConfig(start_from=chosen["predictor"])))
    frame = load_source(sources.data)
    device = resolve_device(args.device)
    tokenizer = KronosTokenizer.from_pretrained(sources.tokenizer.start_from, device=device)
    model = Kronos.from_pretrained(sources.predictor.start_from, device=device)
    # history per symbol: the run's data.lookback (what its models were trained and evaluated with), or --max-context
    history = args.max_context if args.max_context is not None else chosen["lookback"]
    why_history = "--max-context" if args.max_context is not None else "the run's data.lookback" if args.run \
        else "the default"
    predictor = KronosPredictor(model, tokenizer, device=str(device), max_context=max(history, chosen["max_context"]))
    _check_forecast_size(args, model, predictor.max_context, history)
    calibration = None if args.uncalibrated else PathCalibration.from_dict(chosen.get("path_calibration", {}),
                                                                            where="--run calibration.json")
    handover = None if args.uncalibrated or args.model_only else Handover.from_dict(chosen.get("handover", {}),
                                                                                   where="--run calibration.json")
    table = forecast_frame(predictor, frame, horizon=args.horizon, sample_count=args.samples, lookback=history,
                           quantiles=_quantiles(args.quantiles), seed=args.seed, top_k=chosen["top_k"],
                           calibration=calibration, handover=handover, progress=True, **sampling)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    n_symbols = table["symbol"].nunique()
    about = table.attrs["forecast"]
    print(f"wrote {len(table)} rows ({n_symbols} symbol(s) x {args.horizon} steps) to {out}\n"
          f"models: {chosen['chosen']}: tokenizer {chosen['tokenizer']}, predictor {chosen['predictor']}\n"
          f"history: {_history_used(frame, history, why_history)}\n"
          f"sampling: temperature {sampling['temperature']:g}, top_p {sampling['top_p']:g}"
          f"{' (calibrated on validation)' if chosen['calibrated'] else ''}, {args.samples} paths, seed {args.seed}\n"
          f"path calibration: {about['path_calibration']}\n"
          f"handed over: {_handed_over_line(args, chosen, handover)}\n"
          f"point forecast (the *_median columns): {about['point_forecast']}\n"
          f"candles: every row is a valid candle ({about['candles']['rule']}; "
          f"{about['candles']['repaired_share']:.1%} of the sampled bars needed it)")
    print(_write_about(out, chosen, args, about, handed_over=handover is not None and bool(chosen.get("handover"))))
    return 0


def _history_used(frame: Any, history: int, why: str) -> str:
    """What history the forecast used: the last `history` bars of each symbol, or all of a shorter one's."""
    bars = frame.groupby("symbol", sort=True).size()
    short = bars[bars < history]
    text = f"the last {history} bars of each symbol ({why})"
    if short.empty:
        return text
    listing = ", ".join(f"{name} {n}" for name, n in short.head(5).items()) + (", ..." if len(short) > 5 else "")
    return (f"{text}; {len(short)} symbol(s) have fewer and are forecast from all the bars they have, less "
            f"history than asked ({listing})")


def _available_memory() -> int | None:
    """Bytes of memory this machine can still give: Linux's MemAvailable (free plus reclaimable caches), else the
    free pages; None where the OS does not say."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_forecast_size(args: argparse.Namespace, model: Any, max_context: int, history: int) -> None:
    """Refuse before generating a forecast this machine cannot hold: each symbol's sample paths are generated in
    one batch, each with its key/value cache, its tokens and its decoded bars."""
    available = _available_memory()
    context = min(history + args.horizon, max_context)
    per_path = (4 * context * model.d_model * (2 * model.n_layers + 8) + 4 * 4 * model.s1_vocab_size
                + 16 * (history + args.horizon) + 6 * 12 * args.horizon)
    need = per_path * args.samples
    if available is not None and need > available:
        raise ValueError(f"--samples {args.samples} with --horizon {args.horizon}: each symbol's paths are generated "
                         f"together and need about {need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
                         "this machine has free; lower --samples (32 to 1000 is usual) or --horizon")


def _handed_over_line(args: argparse.Namespace, chosen: dict[str, Any], handover: Any) -> str:
    """What the CSV holds beyond the model's own paths, in words (the ensemble's weights, the tails)."""
    if handover is not None and chosen.get("handover"):
        return f"{handover.describe(chosen.get('model', 'the model'))} (fitted on validation, calibration.json)"
    why = "--uncalibrated" if args.uncalibrated else "--model-only" if args.model_only else \
        "the run has no handed-over forecast" if args.run else "explicit checkpoints"
    return f"the model alone ({why})"


def _write_about(out: Path, chosen: dict[str, Any], args: argparse.Namespace, about: dict[str, Any], *,
                 handed_over: bool) -> str:
    """Write `<csv stem>.about.json` beside the CSV (what made it, what its median is, the run's test evidence);
    return the lines the command prints about how far to trust it."""
    from kronos_kit.evaluate.evidence import TestEvidence, test_evidence
    from kronos_kit.evaluate.scores import HANDED_OVER
    from kronos_kit.runs import save_json

    if args.run is not None:
        # the CSV holds the handed-over forecast when the run hands one over: its test record is the one to trust
        evidence = test_evidence(args.run, HANDED_OVER) if handed_over else None
        if evidence is None or not evidence.available:
            evidence = test_evidence(args.run, chosen["model"])
    else:
        evidence = TestEvidence("given", False, "explicit checkpoints: no run says how they did on held-out data")
    path = out.with_name(f"{out.stem}.about.json")
    save_json(path, {"csv": str(out), "run": args.run, "data": args.data, **{k: chosen[k] for k in
                     ("chosen", "tokenizer", "predictor", "calibrated")}, "forecast": about,
                     "test_evidence": evidence.to_dict()}, allow_nan=False)
    return "\n".join([*evidence.lines(), f"about this forecast: {path}"])


# ---------------------------------------------------------------------------------------------
# entry point


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "strip-notebooks":
        from kronos_kit.notebooks import strip_notebooks

        return strip_notebooks(args.paths, check=args.check)
    if args.command == "train":
        from kronos_kit.config import thread_count
        from kronos_kit.runtime import check_device, set_threads
        from kronos_kit.train import train_predictor, train_tokenizer

        cfg = _config(args.config, args.overrides, run_dir=args.run_dir)
        check_device(cfg.device)
        set_threads(thread_count(cfg))
        fn = train_tokenizer if args.phase == "tokenizer" else train_predictor
        result = fn(cfg, resume=args.resume, overwrite=args.overwrite)
        print(repr(result))
        return 0
    if args.command == "gate":
        from kronos_kit.gate import gate_run

        gate = gate_run(_config(args.config, args.overrides, run_dir=args.run_dir))
        print(gate.report())
        return 0 if gate.passed else 1
    if args.command == "pretrain":
        from kronos_kit.pretrain import pretrain_base

        pretrain_base(_config(args.config, args.overrides), args.out)
        return 0
    if args.command == "forecast":
        return _forecast(args)
    if args.command == "sweep":
        from kronos_kit.sweep import SweepDir, finish_sweep, run_sweep

        if args.report:
            finish_sweep(SweepDir(args.sweep_dir or "."), storage=args.storage)
            return 0
        run_sweep(args.config, args.space, sweep_dir=args.sweep_dir, params=args.param, trials=args.trials,
                  timeout=args.timeout, workers=args.workers, storage=args.storage, study_name=args.study,
                  resume=args.resume)
        return 0
    if args.command == "compare":
        from kronos_kit.compare import compare_runs, comparison_markdown, write_comparison

        table = compare_runs(args.runs)
        print(comparison_markdown(table))
        if args.out:
            paths = write_comparison(table, args.out)
            print(f"\nwrote {paths['markdown']} and {paths['csv']}")
        return 0
    from kronos_kit.pipeline import run_pipeline

    return run_pipeline(args.config, run_dir=args.run_dir, params=args.param, resume=args.resume,
                        from_stage=args.from_stage, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    # key=value overrides may come before or after options; argparse alone leaves later ones over
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if "=" not in w or w.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command} takes no key=value overrides; use -p KEY=VALUE")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("papermill").setLevel(logging.WARNING)  # the pipeline prints its own stage lines
    from kronos_kit.binding import StaleRunError
    from kronos_kit.data.schema import DataError
    from kronos_kit.gate import TokenizerGateError
    from kronos_kit.pipeline import UsageError
    from kronos_kit.run_lock import RunLockedError
    from kronos_kit.runs import DiskFullError
    from kronos_kit.train import NonFiniteError

    try:
        return _dispatch(args)
    except (UsageError, DataError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            RunLockedError, StaleRunError, TokenizerGateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
    except (NonFiniteError, DiskFullError) as err:  # the run failed; what it saved before is finite and kept
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        # bad values in a call (config fields, options); the pipeline's own checks raise UsageError above
        if args.command in ("train", "gate", "forecast", "compare", "pretrain", "sweep"):
            print(f"error: {err}", file=sys.stderr)
            return USAGE_EXIT
        raise


if __name__ == "__main__":
    sys.exit(main())
