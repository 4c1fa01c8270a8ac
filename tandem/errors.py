"""Errors tandem raises for bad input: each message names the problem and the fix."""

import re


class TandemError(Exception):
    """A user-facing error; the CLI prints its message without a traceback."""


class ArtifactError(TandemError):
    """A build artifact is missing, corrupt, or was built for something else."""


class ToolchainMissingError(TandemError):
    """A vendor toolchain (TensorRT, Neuron) is not installed on this machine."""


_NUMBERS = re.compile(r"\d+")


def failure_message(what: str, exc: BaseException) -> str:
    """The message of a failure while running a batch, safe to send and log. A TandemError was
    written for the client and never quotes token values; anything else (ONNX Runtime's own errors
    print offending indices, e.g. "idx=777", i.e. scene-token values) keeps its type and text with
    every number masked."""
    if isinstance(exc, TandemError):
        return str(exc)
    return f"{what} failed: {type(exc).__name__}: {_NUMBERS.sub('#', str(exc))[:500]}"
