"""`tandem` command line. Each module in COMMAND_MODULES registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tandem.errors import TandemError

COMMAND_MODULES = ["tandem.cli.core", "tandem.cli.serving", "tandem.cli.train", "tandem.cli.bench", "tandem.cli.build", "tandem.cli.deploy"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Export, compile and serve tandem's two-stage model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except TandemError as exc:
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tandem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
