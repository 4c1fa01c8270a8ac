"""Errors tandem raises for bad input, and the exit code each one means.

Every message names the problem and the fix. The CLI entry point (:func:`tandem.cli.main`) maps an
exception to its exit code in one place, :func:`exit_code_for`, so a code means the same thing in
every command (the README's "In CI" section lists them):

====  ==========================================================================================
0     success
1     a check failed: export validation, accuracy below ``--min-accuracy``, runtimes disagree,
      a bench target missed under ``--fail-on-target``, a build step failed (:class:`CheckFailed`)
2     usage error: bad arguments, bad or missing input files (:class:`TandemError`, the default)
3     missing toolchain or environment: TensorRT/Neuron/GPU/compiler absent, not enough memory,
      server unreachable (:class:`EnvironmentProblem`, :class:`ToolchainMissingError`)
130   interrupted (Ctrl-C / SIGINT), also when a library wrapped the KeyboardInterrupt
====  ==========================================================================================
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_CHECK_FAILED: "a check failed (validation, --min-accuracy, runtimes disagree, --fail-on-target, a build step)",
    EXIT_USAGE: "usage error (bad arguments or input files)",
    EXIT_ENVIRONMENT: "missing toolchain or environment (toolchain, GPU, memory, server unreachable)",
    EXIT_INTERRUPTED: "interrupted",
}


class TandemError(Exception):
    """A user-facing error; the CLI prints its message without a traceback and exits 2 (usage)."""

    exit_code = EXIT_USAGE


class ArtifactError(TandemError):
    """A build artifact is missing, corrupt, or was built for something else (exit 2: fix the input)."""


class CheckFailed(TandemError):
    """A check the user asked for did not pass: validation, accuracy, agreement, a target (exit 1)."""

    exit_code = EXIT_CHECK_FAILED


class EnvironmentProblem(TandemError):
    """This machine cannot do the work: a missing toolchain, device, memory or server (exit 3)."""

    exit_code = EXIT_ENVIRONMENT


class ToolchainMissingError(EnvironmentProblem):
    """A vendor toolchain (TensorRT, Neuron) or the device it needs is not available here (exit 3)."""


def interrupted(exc: BaseException) -> bool:
    """True for a KeyboardInterrupt, also one that a library (torch.export, the ONNX exporter)
    caught and re-raised as its own error (found in the ``__cause__`` / ``__context__`` chain)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def exit_code_for(exc: BaseException) -> int:
    """The one mapping from an exception to the process exit code."""
    if interrupted(exc):
        return EXIT_INTERRUPTED
    if isinstance(exc, TandemError):
        return int(exc.exit_code)
    if isinstance(exc, MemoryError):
        return EXIT_ENVIRONMENT
    raise exc  # a bug: let Python print the traceback (exit 1 would read as "a check failed")


_NUMBERS = re.compile(r"\d+")


def failure_message(what: str, exc: BaseException) -> str:
    """The message of a failure while running a batch, safe to send and log. A TandemError was
    written for the client and never quotes token values; anything else (ONNX Runtime's own errors
    print offending indices, e.g. "idx=777", i.e. scene-token values) keeps its type and text with
    every number masked."""
    if isinstance(exc, TandemError):
        return str(exc)
    return f"{what} failed: {type(exc).__name__}: {_NUMBERS.sub('#', str(exc))[:500]}"
