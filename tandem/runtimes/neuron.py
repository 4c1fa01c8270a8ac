"""Neuron runtime: runs the torch-neuronx artifacts of a compiled build on Inferentia2 NeuronCores.

Every graph was compiled at static-shape buckets. A request is padded up to the smallest bucket
that holds it (extra batch rows repeat the first row; extra prompt positions are PAD tokens to the
right, which the prompt lengths already mask), run, and the outputs are cut back to the request's
size. Padding is pure numpy (:func:`pad_to_bucket`, :func:`trim_outputs`) and tested against eager
PyTorch; loading the artifacts needs torch-neuronx on an inf2/trn1 instance. Which NeuronCores a
process uses is set by ``NEURON_RT_VISIBLE_CORES`` before the first artifact loads.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tandem.formats.compiled_manifest import (
    CompiledArtifact,
    Environment,
    check_compatible,
)
from tandem.formats.targets import NEURON
from tandem.errors import ArtifactError, TandemError, ToolchainMissingError
from tandem.runtimes.base import Runtime, open_compiled
from tandem.stages import GraphSpec
from tandem.tokenizer import PAD

INSTALL_HINT = (
    "torch-neuronx is not installed: it comes with the AWS Neuron SDK, "
    "pip install torch-neuronx neuronx-cc --extra-index-url https://pip.repos.neuron.amazonaws.com "
    "(x86-64 Linux, matching torch release; preinstalled in the AWS Deep Learning AMI Neuron and the Neuron DLCs). "
    "Compiling runs on any such host; the artifacts run on inf2 (or trn1) instances"
)


def installed_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch-neuronx", "neuronx-cc"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def select_bucket(available: list[dict[str, int]], dims: dict[str, int]) -> dict[str, int] | None:
    """The smallest bucket (fewest padded elements) at least as large as ``dims`` on every axis."""
    fitting = [b for b in available if all(b[a] >= dims[a] for a in dims)]
    if not fitting:
        return None
    return min(fitting, key=lambda b: (_volume(b), tuple(sorted(b.items()))))


def _volume(dims: dict[str, int]) -> int:
    volume = 1
    for size in dims.values():
        volume *= size
    return volume


# ----------------------------------------------------------------------------- compile (torch-neuronx)

PAD_VALUES = {"prompt_len": PAD}  # what fills a padded position of each axis (batch rows repeat row 0)


def request_dims(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The size of every dynamic axis in this request, checked for consistency across inputs."""
    dims: dict[str, int] = {}
    for tensor in spec.inputs:
        shape = np.shape(feeds[tensor.name])
        if len(shape) != len(tensor.shape):
            raise TandemError(f"{spec.name}: input {tensor.name} must have {len(tensor.shape)} dims, got shape {list(shape)}")
        for axis, (want, got) in enumerate(zip(tensor.shape, shape)):
            if isinstance(want, str):
                if dims.setdefault(want, got) != got:
                    raise TandemError(f"{spec.name}: inputs disagree on {want} ({dims[want]} vs {got} in {tensor.name})")
            elif want != got:
                raise TandemError(f"{spec.name}: input {tensor.name} axis {axis} must be {want}, got {got}")
    return dims


def pad_to_bucket(spec: GraphSpec, feeds: dict[str, np.ndarray], bucket: dict[str, int]) -> dict[str, np.ndarray]:
    padded = {}
    for tensor in spec.inputs:
        value = np.ascontiguousarray(feeds[tensor.name])
        for axis, name in tensor.dynamic_axes().items():
            extra = bucket[name] - value.shape[axis]
            if extra <= 0:
                continue
            if name in PAD_VALUES:
                widths = [(0, 0)] * value.ndim
                widths[axis] = (0, extra)
                value = np.pad(value, widths, constant_values=PAD_VALUES[name])
            else:  # repeat a real row: padding rows must be valid inputs (prompt lengths >= 1, codebook ids)
                first = np.take(value, [0], axis=axis)
                value = np.concatenate([value, np.repeat(first, extra, axis=axis)], axis=axis)
        padded[tensor.name] = value
    return padded


def trim_outputs(spec: GraphSpec, outputs: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
    trimmed = {}
    for tensor in spec.outputs:
        value = outputs[tensor.name]
        index = tuple(slice(0, dims[d]) if isinstance(d, str) else slice(None) for d in tensor.shape)
        trimmed[tensor.name] = np.ascontiguousarray(value[index])
    return trimmed


def run_bucketed(
    spec: GraphSpec,
    feeds: dict[str, np.ndarray],
    buckets: list[dict[str, int]],
    execute: Callable[[dict[str, int], dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Pad a request to the smallest bucket that holds it, ``execute`` it there, trim the outputs."""
    dims = request_dims(spec, feeds)
    bucket = select_bucket(buckets, dims)
    if bucket is None:
        largest = max(buckets, key=lambda b: sorted(b.items()))
        raise TandemError(f"{spec.name}: no compiled bucket holds {dims} (largest {largest}); split the batch")
    return trim_outputs(spec, execute(bucket, pad_to_bucket(spec, feeds, bucket)), dims)


def neuron_environment() -> Environment:
    devices = sorted(Path("/dev").glob("neuron[0-9]*"))
    return Environment(
        archs=("inf2",) if devices else (),
        description=f"{len(devices)} Neuron devices" if devices else "no Neuron devices in /dev",
        versions=installed_versions(),
    )


class NeuronRuntime(Runtime):
    name = "neuron"

    def __init__(self, artifacts: str | Path, graphs: list[str] | None = None):
        self.artifacts, self.manifest = open_compiled(artifacts, NEURON)
        super().__init__(self.manifest.config)
        wanted = graphs or sorted({a.graph for a in self.manifest.artifacts})
        self.buckets: dict[str, list[CompiledArtifact]] = {}
        for graph in wanted:
            found = [a for a in self.manifest.for_graph(graph) if a.bucket]
            if not found:
                raise ArtifactError(f"{self.artifacts} has no Neuron artifacts for {graph!r}; build again")
            self.buckets[graph] = found
        shipped = self.manifest.model_copy(update={"artifacts": [a for b in self.buckets.values() for a in b]})

        def environment() -> Environment:  # after the hashes: the toolchain is imported for artifacts that will load
            try:
                import torch_neuronx  # noqa: F401  (registers the Neuron ops torch.jit.load needs)
            except ImportError as exc:
                raise ToolchainMissingError(INSTALL_HINT) from exc
            return neuron_environment()

        check_compatible(shipped, self.artifacts, NEURON, environment)
        import torch
        self.modules = {}
        for graph, entries in self.buckets.items():
            for entry in entries:
                self.modules[(graph, _key(entry.bucket))] = torch.jit.load(str(self.artifacts / entry.file))

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        spec = self.check_feeds(graph, feeds)
        if graph not in self.buckets:
            raise TandemError(f"graph {graph!r} was not loaded by this runtime")

        def execute(bucket: dict[str, int], padded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                outputs = self.modules[(graph, _key(bucket))](*(torch.from_numpy(padded[n]) for n in spec.input_names))
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            return {n: o.numpy() for n, o in zip(spec.output_names, outputs)}

        return run_bucketed(spec, feeds, [e.bucket for e in self.buckets[graph]], execute)

    def describe(self) -> str:
        return f"neuron (torch-neuronx {self.manifest.tool_versions.get('torch-neuronx')}, {self.manifest.precision} matmuls)"


def _key(bucket: dict[str, int] | None) -> tuple:
    return tuple(sorted((bucket or {}).items()))
