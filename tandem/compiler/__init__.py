"""``tandem build``: deployable artifacts for one target (CPU/ONNX Runtime, TensorRT for H100/A100,
Neuron for Inferentia2, AOTInductor for CUDA or CPU) through status-reporting steps
(:mod:`.steps`): export -> optimise -> compile -> Triton model repository."""

from tandem.compiler.core import BuildOptions, BuildResult, run_build
from tandem.formats.targets import TARGETS, Target, get_target

__all__ = ["BuildOptions", "BuildResult", "TARGETS", "Target", "get_target", "run_build"]
