"""How much memory an export needs, estimated before it starts from parameter counts on the meta
device (nothing allocated), and the pre-flight that refuses an export that would not fit.

The export holds the PyTorch stages (the weights once, :func:`tandem.models.build_stages`), and at
its peak, while whole greedy generations are checked, ONNX Runtime sessions over the prefill and
decode graphs, each with its own copy of the reasoning weights, and the allocator's leftovers from
earlier sessions. ``EXPORT_PEAK_FACTOR`` is that peak as a multiple of the weights' bytes, measured
on the medium config (benchmarks/results/export-medium/: 4.19x) and rounded up."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.config import ModelConfig
from tandem.errors import EnvironmentProblem, TandemError

EXPORT_PEAK_FACTOR = 4.5  # peak RSS / weight bytes: 4.19 measured (medium, fp32, benchmarks/results/export-medium)
RUNTIME_OVERHEAD_BYTES = 1 << 30  # the interpreter, torch, onnxruntime and the exporter themselves
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
    from tandem.models import count_parameters

    if dtype not in DTYPE_BYTES:
        raise TandemError(f"unknown export dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}")
    parameters = sum(c.total for c in count_parameters(config))
    weight_bytes = parameters * DTYPE_BYTES[dtype]
    return ExportMemoryEstimate(
        config.name, dtype, parameters, weight_bytes, int(weight_bytes * EXPORT_PEAK_FACTOR) + RUNTIME_OVERHEAD_BYTES
    )


def available_memory() -> int:
    """MemAvailable capped by a cgroup limit (the pre-flight's figure), else psutil's."""
    import psutil

    from tandem.preflight import available_memory as preflight_available

    available = preflight_available()
    return int(psutil.virtual_memory().available) if available is None else available


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def require_export_memory(config: ModelConfig, dtype: str = "fp32", available: int | None = None) -> ExportMemoryEstimate:
    """Refuse, before anything is allocated, an export whose estimated peak exceeds the memory
    available now; the message gives both figures and the ways out."""
    estimate = export_memory_estimate(config, dtype)
    available = available_memory() if available is None else available
    if estimate.peak_bytes > available:
        raise NotEnoughMemory(
            f"exporting {config.name} ({estimate.parameters / 1e9:.2f}B parameters, {gib(estimate.weight_bytes)} of "
            f"{dtype} weights) needs about {gib(estimate.peak_bytes)} of memory at its peak and {gib(available)} is "
            f"available: run it on a machine with more memory (or stop other jobs); "
            "the README's memory table lists each config's figure"
        )
    return estimate
