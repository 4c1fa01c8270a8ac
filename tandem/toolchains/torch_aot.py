"""PyTorch AOTInductor (the ``cuda-torch`` and ``cpu-aot`` targets): torch.export programs compiled
into packages for the machine that builds them; both stages served by python-backend models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tandem.formats.compiled_manifest import CompiledManifest
from tandem.formats.targets import TORCH_AOT, Target
from tandem.toolchains.base import Toolchain


class TorchAOTToolchain(Toolchain):
    name = runtime = TORCH_AOT
    # Each expert over only its rows (data-dependent shapes, which torch.export and Inductor take).
    graph_rewrites = ("routed_experts",)
    # On CUDA (cuda-torch) the decode step's experts take the static, capturable routed form (no
    # nonzero, no host synchronisation: the runtime replays the whole step as one CUDA graph);
    # prefill and verify keep routed_experts (tandem.export.rewrites).
    cuda_graph_rewrites = ("capturable_experts",)
    routed_precisions = frozenset({"fp32"})
    entry_modules = ("tandem.compiler.torch_aot", "tandem.compiler.repository")

    def probe(self, target: Target, precision: str | None = None) -> None:
        from tandem.compiler import torch_aot

        torch_aot.require_device(target)

    def optimise_what(self, target: Target, precision: str) -> str:
        return "torch.export programs"

    def compile_what(self, target: Target, precision: str) -> str:
        return f"AOTInductor packages for {target.device}"

    def rewrites_for_target(self, target: Target) -> tuple[str, ...]:
        return self.cuda_graph_rewrites if target.device == "cuda" else self.graph_rewrites

    def optimise(self, build, staging: Path) -> str:
        from tandem.compiler import torch_aot

        written = torch_aot.export_programs(
            build.export_manifest().config, build.options.checkpoint, staging, rewrites=self.rewrites_for_target(build.target)
        )
        return f"{len(written)} graphs exported with torch.export and checked against eager PyTorch"

    def compile_inputs(self, build) -> dict[str, Any]:
        import torch

        from tandem.compiler.torch_aot import inductor_configs

        return {"torch": torch.__version__, "device": build.target.device, "inductor": json.dumps(inductor_configs(build.target.device), sort_keys=True)}

    def compile(self, build, staging: Path, inputs: dict[str, str]) -> CompiledManifest:
        from tandem.compiler import torch_aot

        return torch_aot.compile_packages(build.target, build.optimised_dir(), staging, build.export_manifest(), inputs)

    def flavor(self):
        from tandem.compiler.repository import torch_aot_flavor

        return torch_aot_flavor()
