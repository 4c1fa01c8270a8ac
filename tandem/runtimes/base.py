"""The runtime interface: load an artifact, run named inputs -> named outputs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from tandem.config import ModelConfig
from tandem.decoding import CacheDecodeEngine
from tandem.errors import TandemError
from tandem.formats import folders
from tandem.formats.compiled_manifest import CompiledManifest, check_toolchain, read_compiled_manifest
from tandem.stages import GraphSpec, graph_specs


class Runtime(ABC):
    """Runs the graphs described in :mod:`tandem.stages` by name.

    Every implementation takes and returns numpy arrays keyed by the spec's tensor names, so the
    pipeline, the Triton models and the benchmarks work over any of them unchanged."""

    name: str = "abstract"

    def __init__(self, config: ModelConfig):
        self.config = config
        self.specs: dict[str, GraphSpec] = graph_specs(config)

    @abstractmethod
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def check_feeds(self, graph: str, feeds: dict[str, np.ndarray]) -> GraphSpec:
        if graph not in self.specs:
            raise TandemError(f"unknown graph {graph!r}; this model has {sorted(self.specs)}")
        spec = self.specs[graph]
        missing = [n for n in spec.input_names if n not in feeds]
        extra = [n for n in feeds if n not in spec.input_names]
        if missing or extra:
            raise TandemError(f"{graph}: inputs must be {spec.input_names} (missing {missing}, unexpected {extra})")
        return spec

    def decode_engine(self, capacity: int):
        """A :class:`tandem.decoding.DecodeEngine` of ``capacity`` slots over this runtime's graphs
        (host cache buffers passed to :meth:`run`); runtimes with a faster path override it."""
        return CacheDecodeEngine(self, capacity)

    def describe(self) -> str:
        return self.name


def open_compiled(artifacts: str | Path, toolchain: str) -> tuple[Path, CompiledManifest]:
    """The compiled folder in or around ``artifacts`` (a build folder or its ``compiled/``; found as
    every command finds folders, :mod:`tandem.formats.folders`) and its manifest, refused when it was
    built for another toolchain. A runtime then calls
    :func:`~tandem.formats.compiled_manifest.check_compatible` on the artifacts it loads."""
    directory = folders.compiled_dir(artifacts)
    manifest = read_compiled_manifest(directory)
    check_toolchain(manifest, directory, toolchain)
    return directory, manifest
