"""Errors tandem raises for bad input: each message names the problem and the fix."""


class TandemError(Exception):
    """A user-facing error; the CLI prints its message without a traceback."""


class ArtifactError(TandemError):
    """A build artifact is missing, corrupt, or was built for something else."""


class ToolchainMissingError(TandemError):
    """A vendor toolchain (TensorRT, Neuron) is not installed on this machine."""
