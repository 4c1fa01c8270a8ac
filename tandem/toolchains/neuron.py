"""AWS Neuron (the ``inf2`` target): torch-neuronx artifacts compiled from PyTorch for static-shape
buckets; both stages served by python-backend models pinned to NeuronCores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem.compiler import neuron as neuron_build
from tandem.errors import ToolchainMissingError
from tandem.formats.compiled_manifest import CompiledManifest
from tandem.formats.targets import NEURON, Target
from tandem.stages import GraphSpec
from tandem.toolchains.base import Toolchain


class NeuronToolchain(Toolchain):
    name = runtime = NEURON
    entry_modules = ("tandem.compiler.neuron", "tandem.compiler.repository")

    def probe(self, target: Target, precision: str | None = None) -> None:
        neuron_build.require_neuron()
        if not any(Path("/dev").glob("neuron*")):
            raise ToolchainMissingError(
                f"target {target.name} compiles with neuronx-cc and loads on NeuronCores: no /dev/neuron* device here (run it on an inf2 instance)"
            )

    def versions(self) -> dict[str, str | None]:
        return {k: neuron_build.installed_versions().get(k) for k in ("torch-neuronx", "neuronx-cc")}

    def optimise_what(self, target: Target, precision: str) -> str:
        return "static-shape bucket plan"

    def compile_what(self, target: Target, precision: str) -> str:
        return f"torch-neuronx artifacts for inf2 ({precision} matmuls)"

    def optimise(self, build, staging: Path) -> str:
        buckets = neuron_build.write_bucket_plan(build.export_manifest().config, staging, build.precision)
        return f"{len(buckets)} static-shape buckets planned for neuronx-cc ({neuron_build.BUCKETS_FILE})"

    def compile_inputs(self, build) -> dict[str, Any]:
        return {"neuron": neuron_build.installed_versions()}

    def compile(self, build, staging: Path, inputs: dict[str, str]) -> CompiledManifest:
        return neuron_build.compile_buckets(
            build.target,
            build.optimised_dir(),
            staging,
            build.export_manifest(),
            build.precision,
            build.options.checkpoint,
            inputs,
            workdir=build.cache_dir() / "neuronx-cc",
        )

    def graph_shapes(self, spec: GraphSpec) -> dict[str, Any]:
        return {"buckets": {axis: neuron_build.axis_buckets(axis, r) for axis, r in spec.dims.items()}}

    def flavor(self):
        from tandem.compiler.repository import neuron_flavor

        return neuron_flavor()
