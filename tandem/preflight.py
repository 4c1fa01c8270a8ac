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
from tandem.errors import TandemError, ToolchainMissingError

from tandem.memory import available_memory, gib, memory_estimate, memory_problem, require_memory  # noqa: F401  (the memory pre-flight beside the others)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


# -- targets and runtimes ------------------------------------------------------------------------


def target_problem(target_name: str, precision: str | None = None) -> str | None:
    """Why ``tandem build --target`` cannot run here (toolchain, device, architecture), or None."""
    from tandem.formats.targets import get_target
    from tandem.toolchains import get_toolchain

    target = get_target(target_name)
    try:
        get_toolchain(target.toolchain).probe(target, precision)
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
    from tandem.formats.targets import TARGETS
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
    checks["environment"].append(Check("memory", have is not None, f"{gib(have)} available" if have else "unknown"))
    checks["environment"].append(Check("cpus", True, f"{len(os.sched_getaffinity(0))} usable cores"))
    if config is not None:
        for work in ("export", "train", "inference"):
            problem = memory_problem(config, work)
            need = memory_estimate(config, work)
            checks["environment"].append(
                Check(f"{work} {config.name}", problem is None, problem or f"needs about {gib(need)}: fits")
            )
    return checks
