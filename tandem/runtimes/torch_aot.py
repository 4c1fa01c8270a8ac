"""AOTInductor runtime: runs the ``.pt2`` packages of a ``cuda-torch`` or ``cpu-aot`` build.

The compiled manifest is checked first: toolchain, the device's architecture (the GPU's compute
capability, or a CPU instruction set this machine supports), torch's exact version, and every
package's sha256. On a GPU the decode step (fixed shapes per batch size thanks to the static KV
cache) is captured once per batch size as a CUDA graph and replayed for every later token.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tandem.formats.compiled_manifest import (
    CompiledArtifact,
    CompiledManifest,
    Environment,
    check_compatible,
    check_profile,
)
from tandem.formats.targets import TORCH_AOT, sm_arch
from tandem.errors import ArtifactError, TandemError, ToolchainMissingError
from tandem.runtimes.base import Runtime, open_compiled

log = logging.getLogger(__name__)

GRAPHED = ("reasoning_decode",)  # called once per scene token with the same shapes: worth a CUDA graph


def supported_cpu_archs() -> tuple[str, ...]:
    from torch._inductor import cpu_vec_isa

    return tuple(f"cpu-{isa}" for isa in map(str, cpu_vec_isa.valid_vec_isa_list())) + ("cpu-scalar",)


def torch_aot_environment(manifest: CompiledManifest, device_index: int | None = None) -> Environment:
    versions = {"torch": torch.__version__}
    if manifest.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ToolchainMissingError(
                f"{manifest.target} packages need a CUDA GPU ({manifest.arch}); torch {torch.__version__} here sees none"
            )
        index = torch.cuda.current_device() if device_index is None else device_index
        return Environment((sm_arch(torch.cuda.get_device_capability(index)),), torch.cuda.get_device_name(index), versions)
    return Environment(supported_cpu_archs(), "cpu", versions)


class _CudaGraphed:
    """Replays a fixed-shape call as a CUDA graph, one graph per input shape signature. Inputs that
    live at fixed addresses (a decode engine's cache and step buffers: ``fixed_inputs=True``) are
    captured in place, so a replay copies nothing into the graph; others are copied into static
    buffers first."""

    def __init__(self, model):
        self.model = model
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    def __call__(self, *tensors: torch.Tensor, fixed_inputs: bool = False):
        if self.failed:
            return self.model(*tensors)
        key = tuple(tuple(t.shape) for t in tensors)
        if fixed_inputs:
            key += tuple(t.data_ptr() for t in tensors)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(tensors, fixed_inputs)
            except RuntimeError as exc:  # capture is an optimisation; fall back to plain launches
                log.warning("CUDA graph capture failed (%s); running without CUDA graphs", exc)
                self.failed = True
                return self.model(*tensors)
        graph, static_in, static_out = self.graphs[key]
        if not fixed_inputs:
            for dst, src in zip(static_in, tensors):
                dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in static_out)

    def _capture(self, tensors, fixed_inputs: bool = False):
        static_in = list(tensors) if fixed_inputs else [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocations, lazy initialisation)
            for _ in range(2):
                self.model(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(*static_in)
        static_out = out if isinstance(out, (tuple, list)) else (out,)
        return graph, static_in, static_out


class TorchAOTRuntime(Runtime):
    name = "torch_aot"

    def __init__(
        self, artifacts: str | Path, graphs: list[str] | None = None, device: int | None = None, cuda_graphs: bool = True
    ):
        self.artifacts, self.manifest = open_compiled(artifacts, TORCH_AOT)
        super().__init__(self.manifest.config)
        wanted = graphs or sorted({a.graph for a in self.manifest.artifacts})
        self.entries: dict[str, CompiledArtifact] = {}
        for graph in wanted:
            found = self.manifest.for_graph(graph)
            if len(found) != 1:
                raise ArtifactError(f"{self.artifacts} has no AOTInductor package for {graph!r}; build again")
            self.entries[graph] = found[0]
        self.on_gpu = self.manifest.device.startswith("cuda")
        shipped = self.manifest.model_copy(update={"artifacts": list(self.entries.values())})
        check_compatible(shipped, self.artifacts, TORCH_AOT, lambda: torch_aot_environment(self.manifest, device))
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device) if self.on_gpu else torch.device("cpu")
        self.models = {}
        for graph, entry in self.entries.items():
            path = self.artifacts / entry.file  # verified above
            model = torch._inductor.aoti_load_package(str(path), device_index=self.device.index if self.on_gpu else -1)
            self.models[graph] = _CudaGraphed(model) if (self.on_gpu and cuda_graphs and graph in GRAPHED) else model

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.check_feeds(graph, feeds)
        if graph not in self.models:
            raise TandemError(f"graph {graph!r} was not loaded by this runtime")
        entry = self.entries[graph]
        check_profile(entry, feeds)  # the packages were compiled for the stage description's dim ranges
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in spec.input_names]
        outputs = self.models[graph](*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {name: out.cpu().numpy() for name, out in zip(spec.output_names, outputs)}

    def decode_engine(self, capacity: int):
        """The cache as tensors on this runtime's device, at a fixed address for the engine's life
        (the decode step's CUDA graph is captured on them)."""
        from tandem.decoding import TorchDecodeEngine

        return TorchDecodeEngine(self, capacity, device=self.device)

    @torch.inference_mode()
    def run_tensors(self, graph: str, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """A package on tensors already on this runtime's device (decode engines' fixed buffers)."""
        spec = self.specs[graph]
        if graph not in self.models:
            raise TandemError(f"graph {graph!r} was not loaded by this runtime")
        check_profile(self.entries[graph], dict(zip(spec.input_names, tensors)))
        model = self.models[graph]
        outputs = model(*tensors, fixed_inputs=True) if isinstance(model, _CudaGraphed) else model(*tensors)
        return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

    def describe(self) -> str:
        return f"torch_aot (AOTInductor, torch {self.manifest.tool_versions.get('torch')}, {self.manifest.arch})"
