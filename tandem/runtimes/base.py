"""The runtime interface: load an artifact, run named inputs -> named outputs."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from tandem.config import ModelConfig
from tandem.decoding import CacheDecodeEngine
from tandem.errors import TandemError
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
