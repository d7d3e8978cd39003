"""Command line: `python -m kronos_kit <command>` (see `--help`)."""

from __future__ import annotations

import argparse
import logging
import sys


def _config(path: str | None, overrides: list[str], run_dir: str | None = None):
    from kronos_kit.config import KitConfig, apply_overrides, parse_overrides

    cfg = KitConfig.from_file(path) if path else KitConfig()
    given = {"run_dir": run_dir} if run_dir is not None else {}  # --run-dir left out keeps the config's
    return apply_overrides(cfg, {**parse_overrides(overrides), **given})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kronos_kit", description="kronos-kit command line")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one finetuning phase (works under torchrun)")
    train.add_argument("phase", choices=["tokenizer", "predictor"])
    train.add_argument("--config", help="YAML config (default: built-in defaults)")
    train.add_argument("--run-dir", help="run directory (overrides the config's run_dir)")
    train.add_argument("--resume", action="store_true", help="continue from <run_dir>/state/<phase>.pt")
    train.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. tokenizer.max_steps=20")

    pipe = sub.add_parser("pipeline", help="run notebooks 01 -> 02 -> 03 with papermill into a run directory")
    pipe.add_argument("--config", default="configs/default.yaml")
    pipe.add_argument("--run-dir")
    pipe.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                      help="notebook parameter or dotted config override, repeatable")
    pipe.add_argument("--resume", action="store_true", help="skip stages that completed with unchanged inputs")
    pipe.add_argument("--from", dest="from_stage", help="start at this stage (01, 02 or 03)")
    pipe.add_argument("--overwrite", action="store_true", help="allow reusing an existing run directory")

    pre = sub.add_parser("pretrain", help="pretrain the embedded base checkpoints (make base)")
    pre.add_argument("--config", default="configs/pretrain_base.yaml")
    pre.add_argument("--out", default="kronos_kit/assets/base")
    pre.add_argument("overrides", nargs="*")

    strip = sub.add_parser("strip-notebooks", help="remove outputs from notebooks")
    strip.add_argument("paths", nargs="+")
    strip.add_argument("--check", action="store_true", help="fail if any notebook has outputs")

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
    if args.command == "strip-notebooks":
        from kronos_kit.notebooks import strip_notebooks

        return strip_notebooks(args.paths, check=args.check)
    if args.command == "train":
        from kronos_kit.train import train_predictor, train_tokenizer

        cfg = _config(args.config, args.overrides, run_dir=args.run_dir)
        fn = train_tokenizer if args.phase == "tokenizer" else train_predictor
        result = fn(cfg, resume=args.resume)
        print(f"{args.phase}: {result.steps} steps ({result.stopped}), "
              f"best {result.best_metric:.6f} -> {result.best_dir}")
        return 0
    if args.command == "pretrain":
        from kronos_kit.pipeline import pretrain_base

        pretrain_base(_config(args.config, args.overrides), args.out)
        return 0
    from kronos_kit.pipeline import run_pipeline

    return run_pipeline(args.config, run_dir=args.run_dir, params=args.param, resume=args.resume,
                        from_stage=args.from_stage, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
