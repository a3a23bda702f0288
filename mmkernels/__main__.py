"""`python -m mmkernels demo [...]` runs the demo; `python -m mmkernels env` prints the backend report."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels")
    sub = parser.add_subparsers(dest="command")
    from .demo.cli import build_parser

    build_parser(
        sub.add_parser(
            "demo",
            help="modality imbalance and every method's fix: a synthetic audio-visual set or UCI Multiple Features "
            "(--data mfeat, 6 real views)",
        )
    )
    sub.add_parser("env", help="versions and available backends")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.cli import run

        return run(args)
    if args.command == "env":
        import mmkernels

        mmkernels.env_report()
        return 0
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
