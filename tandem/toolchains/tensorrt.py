"""TensorRT 11 (the ``h100`` and ``a100`` targets): strongly typed engines built from ONNX whose
precision lives in the graph; refinement is served by Triton's tensorrt_plan backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem.compiler import tensorrt as trt_build
from tandem.compiler.precision import cast_to, qdq, weights_int8
from tandem.compiler.tensorrt_moe import ROUTED_PRECISIONS, require_triton
from tandem.formats.compiled_manifest import CompiledManifest
from tandem.formats.targets import TENSORRT, Target
from tandem.formats.export_manifest import read_manifest
from tandem.stages import GraphSpec
from tandem.toolchains.base import Toolchain


class TensorRTToolchain(Toolchain):
    name = runtime = TENSORRT
    # TensorRT int8: the reasoning stage's activations have outlier channels that per-tensor int8
    # activation scales cannot hold (static W8A8 Q/DQ: 40-50% of the logits' range off on small), so
    # its graphs get weight-only int8; the refinement UNet's convolutions take full W8A8 Q/DQ.
    precision_rules = {
        "fp16": lambda spec: cast_to("fp16"),
        "bf16": lambda spec: cast_to("bf16"),
        # The verify graph (parallel decoding) stays fp32 at int8: over k tokens per row a routing
        # flip somewhere is likely, and its max logit error (0.1-0.2 on tiny) exceeds the gate's.
        "int8": lambda spec: None if "block" in spec.dims else weights_int8 if spec.stage == "reasoning" else qdq("int8"),
        "fp8": lambda spec: qdq("fp8"),
    }
    calibrated_precisions = frozenset({"int8", "fp8"})
    routed_precisions = frozenset(ROUTED_PRECISIONS)  # the routed plugin pair; int8/fp8 graphs stay dense
    entry_modules = ("tandem.compiler.tensorrt", "tandem.compiler.repository")

    def probe(self, target: Target, precision: str | None = None) -> None:
        trt_build.require_tensorrt(target, precision or target.default_precision)
        trt_build.require_gpu_arch(target)
        require_triton()

    def versions(self) -> dict[str, str | None]:
        return {"tensorrt": trt_build.installed_version()}

    def optimise_what(self, target: Target, precision: str) -> str:
        return "ONNX for TensorRT + optimization profiles"

    def compile_what(self, target: Target, precision: str) -> str:
        return f"TensorRT engines for {target.arch} ({precision})"

    def optimise(self, build, staging: Path) -> str:
        plans = trt_build.prepare_onnx(build.graphs_dir(), read_manifest(build.graphs_dir()), staging, build.precision)
        shapes = ", ".join(f"{p.graph} {p.profile['min'][p.inputs[0].name][0]}..{p.profile['max'][p.inputs[0].name][0]}" for p in plans)
        return f"{len(plans)} graphs ready for TensorRT's ONNX parser; profiles (batch min..max): {shapes}"

    def builder_settings(self, build) -> trt_build.BuilderSettings:
        timing_cache = build.options.timing_cache
        return trt_build.BuilderSettings(
            precision=build.precision,
            opt_level=build.options.opt_level,
            workspace_gib=build.options.workspace_gib,
            timing_cache=Path(timing_cache) if timing_cache is not None else build.cache_dir() / f"tensorrt-{build.target.arch}.timing",
        )

    def compile_inputs(self, build) -> dict[str, Any]:
        settings = self.builder_settings(build)
        return {
            "builder": {k: v for k, v in settings.describe().items() if k != "timing_cache"},
            "tensorrt": trt_build.installed_version(),
        }

    def compile(self, build, staging: Path, inputs: dict[str, str]) -> CompiledManifest:
        return trt_build.compile_engines(
            build.target, build.optimised_dir(), staging, build.export_manifest(), self.builder_settings(build), inputs
        )

    def build_options(self, build) -> dict[str, Any]:
        return {"builder": self.builder_settings(build).describe()}

    def graph_shapes(self, spec: GraphSpec) -> dict[str, Any]:
        return {"profile": trt_build.graph_profile(spec)}

    def extra_shapes(self, build, shapes: dict[str, Any]) -> dict[str, Any]:
        served = trt_build.served_refinement_plan(build.config)
        return {served.graph: {"dims": shapes["refinement"]["dims"], "profile": served.profile}}

    def flavor(self):
        from tandem.compiler.repository import tensorrt_flavor

        return tensorrt_flavor()
