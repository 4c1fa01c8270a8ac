"""Cheap checks before long work: can this machine build the target, run the runtime, hold the
model, reach the server? Each check returns the reason it cannot (None when it can); the
``require_*`` functions raise :class:`~tandem.errors.EnvironmentProblem` (exit 3) with that reason,
before a command exports, optimises or generates anything. ``tandem doctor`` lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tandem.config import ModelConfig
from tandem.errors import EnvironmentProblem, TandemError, ToolchainMissingError

from tandem.export.memory import EXPORT_PEAK_FACTOR, RUNTIME_OVERHEAD_BYTES

# Peak resident memory of a job, as a multiple of the model's fp32 weights. Export (and build, which
# exports) uses the factor measured on the medium export (tandem.export.memory); training holds
# weights, gradients and two Adam moments; inference holds the weights once plus activations.
MEMORY_FACTOR = {"export": EXPORT_PEAK_FACTOR, "build": EXPORT_PEAK_FACTOR, "train": 4.5, "inference": 1.5}
MEMORY_OVERHEAD_BYTES = RUNTIME_OVERHEAD_BYTES  # the interpreter, torch and onnxruntime themselves


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


# -- memory --------------------------------------------------------------------------------------


def parameter_count(config: ModelConfig) -> int:
    """Both stages' parameters, counted on the meta device (nothing allocated)."""
    from tandem.models import count_parameters

    return sum(c.total for c in count_parameters(config))


def memory_estimate(config: ModelConfig, work: str) -> int:
    """Bytes ``work`` (export, build, train, inference) needs for ``config`` at its peak."""
    return int(parameter_count(config) * 4 * MEMORY_FACTOR[work]) + MEMORY_OVERHEAD_BYTES


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup limit; None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            free = max(int(limit) - usage, 0)
            available = free if available is None else min(available, free)
        break
    return available


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def memory_problem(config: ModelConfig, work: str) -> str | None:
    need, have = memory_estimate(config, work), available_memory()
    if have is None or need <= have:
        return None
    return (
        f"{work} of config {config.name} ({parameter_count(config) / 1e9:.2f}B parameters) needs about {_gib(need)} of "
        f"memory and {_gib(have)} is available here; run it on a machine with more memory, or use a smaller config "
        "(tandem params CONFIG shows the sizes)"
    )


def require_memory(config: ModelConfig, work: str) -> None:
    problem = memory_problem(config, work)
    if problem:
        raise EnvironmentProblem(problem)


# -- targets and runtimes ------------------------------------------------------------------------


def target_problem(target_name: str, precision: str | None = None) -> str | None:
    """Why ``tandem build --target`` cannot run here (toolchain, device, architecture), or None."""
    from tandem.compiler.targets import CPU, NEURON, TENSORRT, TORCH_AOT, get_target

    target = get_target(target_name)
    try:
        if target.toolchain == CPU:
            import onnxruntime  # noqa: F401
        elif target.toolchain == TENSORRT:
            from tandem.compiler import tensorrt as trt_build

            trt_build.require_tensorrt(target, precision or target.default_precision)
            trt_build.require_gpu_arch(target)
        elif target.toolchain == NEURON:
            from tandem.compiler import neuron as neuron_build

            neuron_build.require_neuron()
            if not any(Path("/dev").glob("neuron*")):
                return f"target {target.name} compiles with neuronx-cc and loads on NeuronCores: no /dev/neuron* device here (run it on an inf2 instance)"
        elif target.toolchain == TORCH_AOT:
            from tandem.compiler import torch_aot

            torch_aot.require_device(target)
    except ImportError as exc:
        return f"target {target.name}: {exc}"
    except TandemError as exc:
        return str(exc)
    return None


def require_target(target_name: str, precision: str | None = None) -> None:
    problem = target_problem(target_name, precision)
    if problem:
        raise ToolchainMissingError(problem)


def runtime_problem(name: str) -> str | None:
    """Why runtime ``name`` cannot load here (ignoring which artifacts it would load), or None."""
    import importlib.util

    if name == "torch":
        return None
    if name == "onnxruntime":
        return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed: pip install onnxruntime"
    if name == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU)"
        return None if _cuda_available() else "TensorRT engines run on an NVIDIA GPU; torch sees none here"
    if name == "neuron":
        if importlib.util.find_spec("torch_neuronx") is None:
            return "torch-neuronx is not installed (AWS Neuron SDK, on an inf2 instance)"
        return None if any(Path("/dev").glob("neuron*")) else "no NeuronCore device (/dev/neuron*) here"
    if name == "torch_aot":
        import torch

        return None if hasattr(torch, "_inductor") else f"torch {torch.__version__} has no AOTInductor"
    return f"unknown runtime {name!r}"


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install reads as no GPU
        return False


# -- server --------------------------------------------------------------------------------------


def require_server(url: str, model: str | None = None) -> None:
    """The server answers and reports ``model`` (or itself) ready, before any long work."""
    from tandem.serving.client import TandemClient

    with TandemClient(url) as client:
        client.check_ready(model)


# -- doctor --------------------------------------------------------------------------------------


def doctor_checks(config: ModelConfig | None = None) -> dict[str, list[Check]]:
    from tandem.compiler.targets import TARGETS
    from tandem.runtimes import RUNTIME_NAMES

    checks: dict[str, list[Check]] = {"targets": [], "runtimes": [], "environment": []}
    for name in TARGETS:
        problem = target_problem(name)
        checks["targets"].append(Check(name, problem is None, problem or f"`tandem build --target {name}` can run here"))
    for name in RUNTIME_NAMES:
        problem = runtime_problem(name)
        checks["runtimes"].append(Check(name, problem is None, problem or "can load its artifacts here"))
    try:
        from tandem.serving.server import libpython_directory, tritonserver_binary

        binary = tritonserver_binary()
        libpython_directory()
        checks["environment"].append(Check("tritonserver", True, f"{binary} (nvidia-pytriton)"))
    except TandemError as exc:
        checks["environment"].append(Check("tritonserver", False, str(exc)))
    have = available_memory()
    checks["environment"].append(Check("memory", have is not None, f"{_gib(have)} available" if have else "unknown"))
    checks["environment"].append(Check("cpus", True, f"{len(os.sched_getaffinity(0))} usable cores"))
    if config is not None:
        for work in ("export", "train", "inference"):
            problem = memory_problem(config, work)
            need = memory_estimate(config, work)
            checks["environment"].append(
                Check(f"{work} {config.name}", problem is None, problem or f"needs about {_gib(need)}: fits")
            )
    return checks
