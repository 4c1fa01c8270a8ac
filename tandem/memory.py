"""How much memory a job needs, estimated before it starts from parameter counts on the meta device
(nothing allocated), and the pre-flights that refuse work that would not fit: one estimate
(:func:`memory_estimate`) for every kind of job, the export's in the export dtype.

The export holds the PyTorch stages (the weights once, :func:`tandem.models.build_stages`), and at
its peak, while whole greedy generations are checked, ONNX Runtime sessions over the prefill and
decode graphs, each with its own copy of the reasoning weights, and the allocator's leftovers from
earlier sessions. ``EXPORT_PEAK_FACTOR`` is that peak as a multiple of the weights' bytes, measured
on the medium config (benchmarks/results/export-medium/: 4.19x) and rounded up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandem.config import ModelConfig
from tandem.errors import EnvironmentProblem, TandemError

EXPORT_PEAK_FACTOR = 4.5  # peak RSS / weight bytes: 4.19 measured (medium, fp32, benchmarks/results/export-medium)
RUNTIME_OVERHEAD_BYTES = 1 << 30  # the interpreter, torch, onnxruntime and the exporter themselves
# Peak resident memory of a job, as a multiple of the model's fp32 weights. Export (and build, which
# exports) uses the factor measured on the medium export; training holds weights, gradients and two
# Adam moments; inference holds the weights once plus activations.
MEMORY_FACTOR = {"export": EXPORT_PEAK_FACTOR, "build": EXPORT_PEAK_FACTOR, "train": 4.5, "inference": 1.5}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class NotEnoughMemory(EnvironmentProblem):
    """The export would not fit in this machine's available memory (exit 3)."""


@dataclass(frozen=True)
class ExportMemoryEstimate:
    config: str
    dtype: str
    parameters: int
    weight_bytes: int
    peak_bytes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def export_memory_estimate(config: ModelConfig, dtype: str = "fp32") -> ExportMemoryEstimate:
    if dtype not in DTYPE_BYTES:
        raise TandemError(f"unknown export dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}")
    parameters = parameter_count(config)
    return ExportMemoryEstimate(
        config.name, dtype, parameters, parameters * DTYPE_BYTES[dtype], memory_estimate(config, "export", dtype)
    )


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def require_export_memory(config: ModelConfig, dtype: str = "fp32", available: int | None = None) -> ExportMemoryEstimate:
    """Refuse, before anything is allocated, an export whose estimated peak exceeds the memory
    available now; the message gives both figures and the ways out."""
    estimate = export_memory_estimate(config, dtype)
    if available is None:
        import psutil

        available = available_memory()
        available = int(psutil.virtual_memory().available) if available is None else available
    if estimate.peak_bytes > available:
        raise NotEnoughMemory(
            f"exporting {config.name} ({estimate.parameters / 1e9:.2f}B parameters, {gib(estimate.weight_bytes)} of "
            f"{dtype} weights) needs about {gib(estimate.peak_bytes)} of memory at its peak and {gib(available)} is "
            f"available: run it on a machine with more memory (or stop other jobs); "
            "the README's memory table lists each config's figure"
        )
    return estimate


# -- every job's pre-flight ----------------------------------------------------------------------


def parameter_count(config: ModelConfig) -> int:
    """Both stages' parameters, counted on the meta device (nothing allocated)."""
    from tandem.models import count_parameters

    return sum(c.total for c in count_parameters(config))


def memory_estimate(config: ModelConfig, work: str, dtype: str = "fp32") -> int:
    """Bytes ``work`` (export, build, train, inference) needs for ``config`` at its peak, its weights in ``dtype``."""
    return int(parameter_count(config) * DTYPE_BYTES[dtype] * MEMORY_FACTOR[work]) + RUNTIME_OVERHEAD_BYTES


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


def memory_problem(config: ModelConfig, work: str) -> str | None:
    need, have = memory_estimate(config, work), available_memory()
    if have is None or need <= have:
        return None
    return (
        f"{work} of config {config.name} ({parameter_count(config) / 1e9:.2f}B parameters) needs about {gib(need)} of "
        f"memory and {gib(have)} is available here; run it on a machine with more memory, or use a smaller config "
        "(tandem params CONFIG shows the sizes)"
    )


def require_memory(config: ModelConfig, work: str) -> None:
    problem = memory_problem(config, work)
    if problem:
        raise EnvironmentProblem(problem)
