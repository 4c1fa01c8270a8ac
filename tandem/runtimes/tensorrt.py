"""TensorRT runtime: deserializes the engines of a compiled build directory and runs them by tensor
name on a CUDA stream (TensorRT 10/11's name-based I/O: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``), with torch CUDA tensors as device buffers. The engines are strongly typed
(TensorRT 11): their precision is the precision graph's, recorded in the compiled manifest.

Before anything is deserialized, the compiled manifest is checked: toolchain, the GPU's compute
capability against the engines' (``sm90`` engines refuse to load on an ``sm80`` GPU), the TensorRT
version against the one that built them, and every engine's sha256. Requests outside an engine's
optimization profile are refused with the profile's range.

One bind-and-execute path (:meth:`TensorRTRuntime.run_tensors`; :meth:`~TensorRTRuntime.run` moves
numpy feeds to the device, calls it and copies the outputs back) over output buffers allocated once
per engine output at load, at the stage description's largest shape (:class:`OutputBuffers`): a call
binds views of their first elements, as TensorRT's ``demo/Diffusion`` ``Engine`` does.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tandem.formats.compiled_manifest import (
    CompiledArtifact,
    CompiledManifest,
    Environment,
    check_compatible,
    check_profile,
)
from tandem.formats.targets import TENSORRT, get_target, sm_arch
from tandem.errors import ArtifactError, TandemError, ToolchainMissingError
from tandem.runtimes.base import Runtime, open_compiled
from tandem.stages import GraphSpec

log = logging.getLogger(__name__)

# Strongly typed networks: required from TensorRT 11 on, available as an opt-in from 10.12.
MIN_VERSION = (10, 12)


def installed_version() -> str | None:
    """The installed TensorRT's version without importing it (importing needs the CUDA libraries)."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt_cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def supported_version(version: str) -> bool:
    """TensorRT 11.x, or 10.12+ (the first 10.x with strongly typed networks tandem relies on)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return major == 11 or (major == 10 and (major, minor) >= MIN_VERSION)


def tensorrt_environment(trt, device_index: int) -> Environment:
    import torch

    return Environment(
        archs=(sm_arch(torch.cuda.get_device_capability(device_index)),),
        description=torch.cuda.get_device_name(device_index),
        versions={"tensorrt": trt.__version__},
    )


def _load_tensorrt(manifest: CompiledManifest):
    try:
        import tensorrt as trt
    except ImportError as exc:
        target = get_target(manifest.target)
        raise ToolchainMissingError(
            f"{target.name} engines need TensorRT {manifest.tool_versions.get('tensorrt', '11')} to run: "
            f"pip install tensorrt=={manifest.tool_versions.get('tensorrt', '11.*')} on a machine with an "
            f"{target.arch} NVIDIA GPU (or use NVIDIA's Triton/TensorRT containers)"
        ) from exc
    if not supported_version(trt.__version__):
        raise ToolchainMissingError(
            f"TensorRT {trt.__version__} cannot run strongly typed engines built by TensorRT "
            f"{manifest.tool_versions.get('tensorrt')}: pip install tensorrt=={manifest.tool_versions.get('tensorrt')}"
        )
    return trt


def _to_numpy(tensor, dtype: str) -> np.ndarray:
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy().astype(dtype, copy=False)


class OutputBuffers:
    """Device memory for every output of every graph, allocated once (``allocate(numel, dtype)``, a
    flat tensor) at the largest shape the stage description allows; :meth:`view` hands out a
    contiguous view of a buffer's first elements in the shape a call produces. The views are
    overwritten by the graph's next call: callers copy (``run``) or consume them (a decode engine's
    row writes are ordered before the next call on the runtime's stream) before then."""

    def __init__(self, allocate: Callable[[int, object], object]):
        self.allocate = allocate
        self.buffers: dict[tuple[str, str], object] = {}
        self.allocations = 0

    def add(self, spec: GraphSpec, dtypes: dict[str, object]) -> None:
        """Allocate ``spec``'s outputs (``dtypes``: each output's dtype in the engine) at their max shape."""
        largest = {name: r.max for name, r in spec.dims.items()}
        for tensor in spec.outputs:
            self.buffers[(spec.name, tensor.name)] = self.allocate(math.prod(tensor.concrete_shape(largest)), dtypes[tensor.name])
            self.allocations += 1

    def view(self, graph: str, name: str, shape: tuple[int, ...]):
        buffer = self.buffers[(graph, name)]
        numel = math.prod(shape)
        if numel > buffer.numel():
            raise TandemError(
                f"{graph}: output {name} of shape {list(shape)} is larger than the stage description allows; "
                "the engine and the description disagree: build again"
            )
        return buffer[:numel].view(shape)


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, artifacts: str | Path, graphs: list[str] | None = None, device: int | None = None):
        self.artifacts, self.manifest = open_compiled(artifacts, TENSORRT)
        super().__init__(self.manifest.config)
        wanted = graphs or sorted({a.graph for a in self.manifest.artifacts if not a.served})
        self.entries: dict[str, CompiledArtifact] = {}
        for graph in wanted:
            found = self.manifest.for_graph(graph)
            if len(found) != 1:
                raise ArtifactError(f"{self.artifacts} has no TensorRT engine for {graph!r}; build again")
            self.entries[graph] = found[0]
        shipped = self.manifest.model_copy(update={"artifacts": list(self.entries.values())})
        import torch

        def environment() -> Environment:  # after the hashes: TensorRT is imported for engines that will load
            self._trt = _load_tensorrt(self.manifest)
            if not torch.cuda.is_available():
                raise ToolchainMissingError("the tensorrt runtime needs an NVIDIA GPU and a CUDA build of torch for its buffers")
            self.device = torch.device("cuda", device if device is not None else torch.cuda.current_device())
            return tensorrt_environment(self._trt, self.device.index)

        check_compatible(shipped, self.artifacts, TENSORRT, environment)
        trt = self._trt
        dt = trt.DataType
        self._dtypes = {
            dt.FLOAT: torch.float32,
            dt.HALF: torch.float16,
            dt.BF16: torch.bfloat16,
            dt.INT64: torch.int64,
            dt.INT32: torch.int32,
            dt.INT8: torch.int8,
            dt.UINT8: torch.uint8,
            dt.BOOL: torch.bool,
        }
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines, self.contexts = {}, {}
        self.outputs = OutputBuffers(lambda numel, dtype: torch.empty(numel, dtype=dtype, device=self.device))
        with torch.cuda.device(self.device):
            for graph, entry in self.entries.items():
                path = self.artifacts / entry.file  # verified above
                engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise ArtifactError(f"TensorRT could not deserialize {path} (see the TensorRT log); build again")
                self.engines[graph] = engine
                self.contexts[graph] = engine.create_execution_context()
                spec = self.specs[graph]
                self.outputs.add(spec, {name: self._dtypes[engine.get_tensor_dtype(name)] for name in spec.output_names})
            self.stream = torch.cuda.Stream(self.device)

    def decode_engine(self, capacity: int):
        """The cache as CUDA tensors at a fixed address for the engine's life, bound to the engine's
        inputs by address every step: the cache never crosses PCIe."""
        from tandem.decoding import TorchDecodeEngine

        return TorchDecodeEngine(self, capacity, device=self.device)

    def run_tensors(self, graph: str, tensors: list) -> tuple:
        """Run ``graph`` on CUDA tensors (in the spec's input order) by address: the one
        bind-and-execute path. Outputs are views of this runtime's buffers (see
        :class:`OutputBuffers`), on the device, in the engine's own dtypes."""
        import torch

        spec = self.specs.get(graph)
        if spec is None or graph not in self.engines:
            raise TandemError(f"graph {graph!r} was not loaded by this runtime")
        check_profile(self.entries[graph], dict(zip(spec.input_names, tensors)))
        engine, context = self.engines[graph], self.contexts[graph]
        # The caller wrote the inputs (e.g. a decode engine's index_copy_) on its stream: order them before this run.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        keep = []  # converted inputs must outlive the asynchronous execution
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for name, tensor in zip(spec.input_names, tensors):
                dtype = self._dtypes[engine.get_tensor_dtype(name)]
                if tensor.dtype != dtype or not tensor.is_contiguous():  # e.g. an fp16 engine's cache
                    tensor = tensor.to(dtype).contiguous()
                    keep.append(tensor)
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise TandemError(f"{graph}: TensorRT refused shape {list(tensor.shape)} for input {name}")
                context.set_tensor_address(name, tensor.data_ptr())
            outputs = []
            for name in spec.output_names:
                buffer = self.outputs.view(graph, name, tuple(context.get_tensor_shape(name)))
                context.set_tensor_address(name, buffer.data_ptr())
                outputs.append(buffer)
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise TandemError(f"TensorRT failed to run {graph} (see the TensorRT log)")
        self.stream.synchronize()
        return tuple(outputs)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        spec = self.check_feeds(graph, feeds)
        with torch.cuda.device(self.device):
            tensors = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device) for name in spec.input_names]
        outputs = self.run_tensors(graph, tensors)
        # Engines built with reduced precision may return fp16/bf16; callers get the spec's dtypes.
        return {t.name: _to_numpy(out.cpu(), t.dtype) for t, out in zip(spec.outputs, outputs)}

    def describe(self) -> str:
        m = self.manifest
        return f"tensorrt {m.tool_versions.get('tensorrt')} ({m.arch}, {m.precision} strongly typed)"
