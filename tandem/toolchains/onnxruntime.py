"""ONNX Runtime (the ``cpu`` target): graphs compiled when a session loads them, so there is
nothing to optimise or compile ahead of time; int8 lives in the decode graph (QMoE kernels)."""

from __future__ import annotations

from tandem.compiler.precision import cpu_int8, is_decode
from tandem.formats.export_manifest import ONNXRUNTIME_GRAPH_REWRITES
from tandem.formats.targets import ONNXRUNTIME, Target
from tandem.toolchains.base import Toolchain


class OnnxRuntimeToolchain(Toolchain):
    name = runtime = ONNXRUNTIME
    compiles_ahead = False
    graph_rewrites = ONNXRUNTIME_GRAPH_REWRITES
    routed_precisions = frozenset({"fp32", "int8"})
    precision_rules = {"int8": lambda spec: cpu_int8 if is_decode(spec) else None}
    reads_onnxruntime_graph = frozenset({"int8"})

    def probe(self, target: Target, precision: str | None = None) -> None:
        import onnxruntime  # noqa: F401

    def optimise_what(self, target: Target, precision: str) -> str:
        return "ONNX Runtime graphs"

    def compile_what(self, target: Target, precision: str) -> str:
        return "nothing ahead of time for ONNX Runtime"
