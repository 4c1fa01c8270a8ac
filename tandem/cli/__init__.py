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


class UsageError(Exception):
    """An argument error argparse found, with the parser that found it (for the usage line and hints)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class TandemArgumentParser(argparse.ArgumentParser):
    """argparse, except that an argument error is raised (not printed and exited) so that main()
    can print it with the fix and, under --json, as the one JSON object on stdout."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(self, message)


def _command_in(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    names = sub.choices if sub is not None else {}
    return next((arg for arg in argv if arg in names), None)


def usage_message(exc: UsageError, argv: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's message plus the fix: the flag meant, the value to give, the help to read."""
    import difflib

    message = str(exc)
    command = _command_in(argv, parser)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    target = sub.choices[command] if command and sub is not None else exc.parser
    if message.startswith("unrecognized arguments:"):
        known = [o for a in target._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
        hints = []
        for word in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1) if word.startswith("-") else []
            if close:
                hints.append(f"{word}: did you mean {close[0]}?")
        if hints:
            message += "; " + "; ".join(hints)
    elif message.startswith("the following arguments are required:"):
        missing = [name.strip() for name in message.split(":", 1)[1].split(",")]
        shown = []
        for name in missing:
            action = next((a for a in target._actions if name in a.option_strings or name in (a.dest, a.metavar)), None)
            if action is not None and action.choices:
                shown.append(f"{name} {'|'.join(map(str, action.choices))}" if action.option_strings else f"{name} ({'|'.join(map(str, action.choices))})")
            elif action is not None and action.option_strings:
                shown.append(f"{name} {action.metavar or action.dest.upper()}")
            else:
                shown.append(f'{name.upper()} (e.g. {target.prog} "a red circle")' if name == "prompt" else name.upper())
        return f"{message}; add {' '.join(shown)} (`{target.prog} --help` says what each takes)"
    elif command is None:
        return f"{message}; run `tandem --help` for the commands"
    return f"{message}; see `{target.prog} --help`"


def build_parser() -> argparse.ArgumentParser:
    from tandem import __version__
    from tandem.cli.common import add_verbose_everywhere

    parser = TandemArgumentParser(
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
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:  # exit 2, the fix named; under --json also as the one JSON object
        from tandem.errors import EXIT_USAGE

        message = usage_message(exc, argv, parser)
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {message}", file=sys.stderr)
        if "--json" in argv[: argv.index("--") if "--" in argv else len(argv)]:
            emit_json(envelope(_command_in(argv, parser) or "tandem", EXIT_USAGE, {"error": message}))
        return EXIT_USAGE
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
