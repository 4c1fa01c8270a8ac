"""PyTorch eager runtime: the reference every other runtime is validated against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tandem.config import ModelConfig
from tandem.models import Stages, build_stages
from tandem.runtimes.base import Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, config: ModelConfig, stages: Stages | None = None, checkpoint: str | Path | None = None):
        super().__init__(config)
        self.stages = stages if stages is not None else build_stages(config, checkpoint)
        self.modules = {name: spec.make_module(self.stages).eval() for name, spec in self.specs.items()}

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.check_feeds(graph, feeds)
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names]
        outputs = self.modules[graph](*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return {name: out.numpy() for name, out in zip(spec.output_names, outputs)}

    def decode_engine(self, capacity: int):
        from tandem.decoding import TorchDecodeEngine

        return TorchDecodeEngine(self, capacity)

    @torch.inference_mode()
    def run_tensors(self, graph: str, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The graph's module on torch tensors in the spec's input order (decode engines)."""
        outputs = self.modules[graph](*tensors)
        return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
