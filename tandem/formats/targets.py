"""Build targets: what hardware an artifact is for, which toolchain builds it, which runtime loads it.

``arch`` is what a loaded artifact is checked against: a CUDA compute capability (``sm90`` for
H100, ``sm80`` for A100), ``inf2`` for Inferentia2 NeuronCores, or the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.errors import TandemError

# Toolchain names (tandem.toolchains); `cpu` is a target, ONNX Runtime its toolchain.
ONNXRUNTIME, TENSORRT, NEURON, TORCH_AOT = "onnxruntime", "tensorrt", "neuron", "torch_aot"


@dataclass(frozen=True)
class Target:
    name: str
    toolchain: str  # a name in tandem.toolchains.TOOLCHAINS
    arch: str | None  # fixed architecture, or None when it is the machine that builds (cuda-torch, cpu-aot)
    device: str  # "cpu" | "cuda" | "neuron"
    precisions: tuple[str, ...]  # the first is the default; cpu/TensorRT precisions live in the ONNX graph (tandem.compiler.precision)
    flavor: str  # repository flavor (tandem.serving.repository)
    description: str

    @property
    def default_precision(self) -> str:
        return self.precisions[0]

    def check_precision(self, precision: str | None) -> str:
        precision = precision or self.default_precision
        if precision not in self.precisions:
            hint = ""
            if precision == "fp8" and self.toolchain == TENSORRT:
                hint = " (FP8 tensor cores need compute capability 8.9 or newer: build for h100)"
            raise TandemError(
                f"precision {precision!r} is not available for target {self.name}{hint}; "
                f"choose one of {', '.join(self.precisions)}"
            )
        return precision


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", ONNXRUNTIME, "cpu", "cpu", ("fp32", "int8"), "local", "ONNX Runtime on CPU (python-backend models; runs on the bundled tritonserver); int8 decode step"),
        Target("h100", TENSORRT, "sm90", "cuda", ("fp16", "bf16", "fp32", "fp8", "int8"), "tensorrt", "TensorRT 11 strongly typed engines for NVIDIA H100 (sm90)"),
        Target("a100", TENSORRT, "sm80", "cuda", ("fp16", "bf16", "fp32", "int8"), "tensorrt", "TensorRT 11 strongly typed engines for NVIDIA A100 (sm80)"),
        Target("inf2", NEURON, "inf2", "neuron", ("bf16", "fp32"), "neuron", "AWS Inferentia2 (torch-neuronx, static-shape buckets)"),
        Target("cuda-torch", TORCH_AOT, None, "cuda", ("fp32",), "torch_aot", "PyTorch AOTInductor packages for the local NVIDIA GPU, CUDA graphs for decode"),
        Target("cpu-aot", TORCH_AOT, None, "cpu", ("fp32",), "torch_aot", "PyTorch AOTInductor packages compiled for this CPU with the system C++ compiler"),
    )
}

# CUDA compute capability -> arch label, for messages and Triton's cc_model_filenames.
ARCH_NAMES = {"sm90": "Hopper: H100, H200", "sm80": "Ampere: A100", "sm89": "Ada: L4, L40S", "sm86": "Ampere: A10, RTX 30xx"}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise TandemError(f"unknown build target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def sm_arch(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def sm_capability(arch: str) -> str:
    """``sm90`` -> ``9.0`` (Triton's cc_model_filenames keys)."""
    digits = arch.removeprefix("sm")
    return f"{digits[:-1]}.{digits[-1]}"


def describe_arch(arch: str) -> str:
    return f"{arch} ({ARCH_NAMES[arch]})" if arch in ARCH_NAMES else arch
