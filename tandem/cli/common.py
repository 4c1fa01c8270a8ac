"""What every subcommand shares: the flag vocabulary, list syntax, hidden aliases and JSON results.

Conventions (every command follows them; see the README's "In CI" section):

- ``--config NAME|YAML`` names the model config; ``--artifacts DIR`` is any tandem output folder to
  read from (an export, a ``tandem build`` output, its ``compiled/``), ``--repository DIR`` a Triton
  model repository, ``--out`` what the command writes. Old spellings stay as hidden aliases
  (:func:`add_alias`) for one release.
- Lists are comma-separated and the flag may be repeated: ``--runtime torch,onnxruntime`` equals
  ``--runtime torch --runtime onnxruntime`` (:func:`add_list_argument`).
- With ``--json`` (:func:`add_json_argument`) a command prints exactly one JSON object on stdout
  (:func:`finish`) and everything a person reads on stderr; the CLI entry point arranges the
  redirection, so handlers keep using ``print``.
- A handler returns ``finish(args, payload, code)``; failures are exceptions from
  :mod:`tandem.errors`, whose class decides the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from tandem.errors import EXIT_OK, TandemError

SCHEMA_VERSION = 1  # bump when a key of a command's JSON changes meaning or disappears
DEFAULT_CONFIG = "small"

_json_stream: TextIO | None = None  # the real stdout while a --json command runs


# -- flags ---------------------------------------------------------------------------------------


def add_alias(p: argparse.ArgumentParser | argparse._ArgumentGroup, *old: str, dest: str, **kwargs: Any) -> None:
    """Old spellings of a flag, accepted for one release and hidden from --help."""
    p.add_argument(*old, dest=dest, help=argparse.SUPPRESS, **kwargs)


def add_config_argument(p: argparse.ArgumentParser, required: bool = False, default: str | None = DEFAULT_CONFIG, help: str = "") -> None:
    extra = "" if required or default is None else f" (default {default})"
    p.add_argument(
        "--config",
        required=required,
        default=None if required else default,
        help=help or f"model config: a bundled name ({bundled_names()}) or a YAML path{extra}",
    )


def bundled_names() -> str:
    """The bundled config names for help texts, read from configs/models (medium included)."""
    from tandem.config import bundled_configs

    order = {"tiny": 0, "small": 1, "medium": 2, "seed": 3}
    return ", ".join(sorted(bundled_configs(), key=lambda n: (order.get(n, 9), n)))


def add_json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (messages go to stderr)")


def split_list(values: Iterable[str] | str | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: the one list syntax (commas, and/or repeated flags)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


class _ListAction(argparse.Action):
    """Comma-separated values; the flag may repeat (values accumulate)."""

    def __init__(self, *args: Any, item_type: Callable[[str], Any] = str, **kwargs: Any):
        self.item_type = item_type
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = []
        for text in split_list(values):
            try:
                items.append(self.item_type(text))
            except (TypeError, ValueError):
                parser.error(f"{option_string}: {text!r} is not a valid {getattr(self.item_type, '__name__', 'value')}")
        if not items:
            parser.error(f"{option_string} needs at least one value (comma-separated)")
        # Values given on the command line are a list and accumulate; a default (None or a tuple, shared
        # by a hidden alias writing the same dest) is replaced.
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*current, *items] if isinstance(current, list) else items)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"


def add_list_argument(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    *flags: str,
    item_type: Callable[[str], Any] = str,
    legacy_spaces: bool = False,
    **kwargs: Any,
) -> None:
    """A list flag: ``--x a,b`` (repeatable). ``legacy_spaces`` also accepts the old ``--x a b``.
    A default must be None or a tuple (a list would be taken for values already given)."""
    if isinstance(kwargs.get("default"), list):
        kwargs["default"] = tuple(kwargs["default"])
    p.add_argument(*flags, action=_ListAction, item_type=item_type, nargs="+" if legacy_spaces else None, **kwargs)


def add_verbose_everywhere(subparsers: argparse._SubParsersAction) -> None:
    """``-v`` after the subcommand too (``tandem build -v ...``), not only before it."""
    for parser in subparsers.choices.values():
        if not any("-v" in action.option_strings for action in parser._actions):
            parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


# -- runtimes ------------------------------------------------------------------------------------

# A target name given as a runtime means the runtime that loads that target's artifacts.
RUNTIME_ALIASES = {
    "cpu": "onnxruntime",
    "ort": "onnxruntime",
    "h100": "tensorrt",
    "a100": "tensorrt",
    "inf2": "neuron",
    "cpu-aot": "torch_aot",
    "cuda-torch": "torch_aot",
    "torch-aot": "torch_aot",
}


def runtime_name(name: str) -> str:
    """Runtime names as users write them (target names included) -> tandem.runtimes names."""
    from tandem.runtimes import RUNTIME_NAMES

    canonical = RUNTIME_ALIASES.get(name.strip().lower(), name.strip().lower())
    if canonical not in RUNTIME_NAMES:
        targets = ", ".join(sorted(RUNTIME_ALIASES))
        raise TandemError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIME_NAMES)} (or a target name: {targets})")
    return canonical


# -- prompts -------------------------------------------------------------------------------------


def prompt_warning(prompt: str) -> str | None:
    """A warning for a prompt the bundled models were not trained to follow: the byte tokenizer
    encodes any text, but the reference checkpoint learned only the synthetic-scene grammar, so a
    prompt outside it ("a purple elephant") still gives an image, just not of what it says."""
    from tandem.data.scenes import parse_caption

    if not prompt.strip():
        return None  # refused later with its own message
    try:
        parse_caption(prompt)
    except TandemError as exc:
        return (
            f"{exc}. The prompt is still encoded and generated (the tokenizer takes any UTF-8 text), but the bundled "
            "checkpoints were trained on that grammar alone, so the image will not follow it"
        )
    return None


# -- output paths --------------------------------------------------------------------------------


def check_output_path(path: str | Path | None, suffixes: tuple[str, ...], flag: str) -> Path | None:
    """Refuse a bad output path before any work: wrong suffix, a directory, an unwritable folder."""
    if path is None:
        return None
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise TandemError(f"{flag} must name a {' or '.join(suffixes)} file, got {path}")
    if path.is_dir():
        raise TandemError(f"{flag} {path} is a directory; name a file inside it, e.g. {path / ('out' + suffixes[0])}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise TandemError(f"{flag} {path}: cannot write under {parent}; choose a writable folder")
    return path


def default_build_dir(config_name: str) -> Path:
    """Where a command writes for a config when given no --out: build/<config> under the current folder."""
    return Path("build") / config_name


# -- JSON results --------------------------------------------------------------------------------


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def envelope(command: str, code: int, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    from tandem import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "tandem_version": __version__,
        "ok": code == EXIT_OK,
        "exit_code": code,
        **(payload or {}),
    }


def emit_json(data: dict[str, Any]) -> None:
    stream = _json_stream or sys.stdout
    stream.write(json.dumps(data, indent=2, default=_json_default) + "\n")
    stream.flush()


def finish(args: argparse.Namespace, payload: dict[str, Any], code: int = EXIT_OK) -> int:
    """End a handler: with --json, print the command's result object; return the exit code. A
    failure's object always carries ``error`` (the payload's own, else what the exit code means)."""
    if code != EXIT_OK and not payload.get("error"):
        from tandem.errors import EXIT_CODES

        payload = {**payload, "error": EXIT_CODES.get(code, f"exit {code}")}
    if wants_json(args):
        emit_json(envelope(args.command, code, payload))
    return code


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot serialise {type(value).__name__}")


class StdoutToStderr:
    """While a --json command runs, file descriptor 1 points at stderr (so progress from Python,
    C++ libraries and child processes cannot corrupt the JSON) and the JSON goes to the real stdout."""

    def __enter__(self) -> TextIO:
        global _json_stream
        sys.stdout.flush()
        self._saved_fd = os.dup(1)
        os.dup2(2, 1)
        self._saved_stdout = sys.stdout
        sys.stdout = sys.stderr
        _json_stream = os.fdopen(os.dup(self._saved_fd), "w", encoding="utf-8")
        return _json_stream

    def __exit__(self, *exc: object) -> None:
        global _json_stream
        sys.stderr.flush()
        sys.stdout = self._saved_stdout
        os.dup2(self._saved_fd, 1)
        os.close(self._saved_fd)
        if _json_stream is not None:
            _json_stream.close()
        _json_stream = None


def add_decoding_arguments(p: argparse.ArgumentParser, where: str = "in-process") -> None:
    from tandem.parallel import DEFAULT_BLOCK, DEFAULT_PROPOSER, DECODINGS, SOURCES

    g = p.add_argument_group(f"decoding ({where})")
    g.add_argument("--decoding", choices=DECODINGS, default="sequential",
                   help="sequential: one scene token per step (default); jacobi: greedy parallel decoding, several "
                   "tokens per step, the same tokens (needs an export with the reasoning_verify graph; sampled "
                   "requests stay sequential)")
    g.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                   help=f"jacobi: tokens per row per step, guesses included (default {DEFAULT_BLOCK})")
    g.add_argument("--proposer", default=DEFAULT_PROPOSER,
                   help=f"jacobi: proposal sources in order, comma-separated among {', '.join(SOURCES)} "
                   f"(default {DEFAULT_PROPOSER})")


def decoding_summary(pipeline) -> dict | None:
    """Sequential steps of a jacobi pipeline's generations so far (None for sequential decoding)."""
    stats = getattr(pipeline, "stats", None)
    if stats is None or not stats.steps:
        return None
    return {
        "decoding": "jacobi",
        "block": pipeline.block,
        "proposer": ",".join(pipeline.sources),
        "images": len(stats.steps),
        "mean_steps_per_image": stats.mean_steps,
        "max_steps_per_image": max(stats.steps),
        "sequential_steps_per_image": pipeline.config.scene.num_tokens,
    }
