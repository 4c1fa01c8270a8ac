"""`tandem` command line. Each module in COMMAND_MODULES registers its own subcommands.

Exit codes are decided here, once, from the exception a handler raises (tandem.errors.exit_code_for):
0 success, 1 a check failed, 2 usage error, 3 missing toolchain or environment, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tandem.errors import EXIT_INTERRUPTED, exit_code_for, interrupted

COMMAND_MODULES = [
    "tandem.cli.core",
    "tandem.cli.serving",
    "tandem.cli.train",
    "tandem.cli.bench",
    "tandem.cli.build",
    "tandem.cli.doctor",
    "tandem.cli.deploy",
]


def build_parser() -> argparse.ArgumentParser:
    from tandem import __version__
    from tandem.cli.common import add_verbose_everywhere

    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Export, compile and serve tandem's two-stage model.",
        epilog="exit codes: 0 success, 1 a check failed, 2 usage error, 3 missing toolchain or environment, 130 interrupted",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (also accepted after the command)")
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    add_verbose_everywhere(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tandem.cli.common import StdoutToStderr, emit_json, envelope, wants_json

    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits 2 here (argparse)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    json_mode = wants_json(args)
    redirect = StdoutToStderr() if json_mode else None
    if redirect is not None:
        redirect.__enter__()
    try:
        try:
            return int(args.handler(args) or 0)
        except BaseException as exc:  # noqa: BLE001 - mapped to an exit code below, bugs re-raised
            if isinstance(exc, (SystemExit, GeneratorExit)):
                raise
            if not interrupted(exc) and args.verbose:
                logging.getLogger("tandem").debug("traceback", exc_info=exc)
            code = exit_code_for(exc)  # re-raises an unexpected exception (a bug: Python prints the traceback)
            message = "interrupted" if code == EXIT_INTERRUPTED else f"error: {exc}"
            print(f"tandem {args.command}: {message}", file=sys.stderr)
            if json_mode:
                emit_json(envelope(args.command, code, {"error": "interrupted" if code == EXIT_INTERRUPTED else str(exc)}))
            return code
    finally:
        if redirect is not None:
            redirect.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
