"""Command line: `python -m kronos_kit <command>`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kronos_kit")
    sub = parser.add_subparsers(dest="command", required=True)
    strip = sub.add_parser("strip-notebooks", help="remove outputs from notebooks")
    strip.add_argument("paths", nargs="+")
    strip.add_argument("--check", action="store_true", help="fail if any notebook has outputs")
    sub.add_parser("pipeline", help="run the notebooks end to end (not implemented yet)")
    args, _ = parser.parse_known_args(argv)
    if args.command == "strip-notebooks":
        from kronos_kit.notebooks import strip_notebooks

        return strip_notebooks(args.paths, check=args.check)
    print("pipeline: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
