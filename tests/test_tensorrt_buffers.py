"""The TensorRT runtime's output buffers (allocated once, views per call), without TensorRT: the
runtime module imports TensorRT only when an engine loads."""

from __future__ import annotations

import pytest
import torch

from tandem.errors import TandemError
from tandem.runtimes.tensorrt import OutputBuffers
from tandem.stages import graph_specs


def test_output_buffers_are_allocated_once_at_the_largest_shape(tiny_config):
    specs = graph_specs(tiny_config)
    allocated: list[int] = []

    def allocate(numel, dtype):
        allocated.append(numel)
        return torch.zeros(numel, dtype=dtype)

    buffers = OutputBuffers(allocate)
    for graph in ("reasoning_prefill", "reasoning_decode"):
        spec = specs[graph]
        buffers.add(spec, {name: torch.float16 if name == "logits" else torch.float32 for name in spec.output_names})
    decode = specs["reasoning_decode"]
    assert buffers.allocations == len(allocated) == len(specs["reasoning_prefill"].outputs) + len(decode.outputs)
    largest = {name: r.max for name, r in decode.dims.items()}
    for batch in (1, 3, decode.dims["batch"].max, 2):  # any call: views, never a new allocation
        for t in decode.outputs:
            shape = t.concrete_shape({**largest, "batch": batch})
            view = buffers.view("reasoning_decode", t.name, shape)
            assert tuple(view.shape) == shape and view.is_contiguous()
            assert view.data_ptr() == buffers.buffers[("reasoning_decode", t.name)].data_ptr()
            assert view.dtype == (torch.float16 if t.name == "logits" else torch.float32)
    assert buffers.allocations == len(allocated)
    with pytest.raises(TandemError, match="larger than the stage description allows"):
        buffers.view("reasoning_decode", "logits", (decode.dims["batch"].max + 1, tiny_config.scene.codebook_size))
