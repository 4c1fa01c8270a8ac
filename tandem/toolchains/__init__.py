"""The toolchains, one object each (:class:`~tandem.toolchains.base.Toolchain`): the registry that
``tandem build``, ``tandem doctor``, the pre-flight and the repository writer read. Adding a
toolchain is its module plus one line here (and its targets in tandem.formats.targets)."""

from __future__ import annotations

from tandem.errors import TandemError
from tandem.toolchains.base import Toolchain
from tandem.toolchains.neuron import NeuronToolchain
from tandem.toolchains.onnxruntime import OnnxRuntimeToolchain
from tandem.toolchains.tensorrt import TensorRTToolchain
from tandem.toolchains.torch_aot import TorchAOTToolchain

TOOLCHAINS: dict[str, Toolchain] = {
    t.name: t
    for t in (
        OnnxRuntimeToolchain(),
        TensorRTToolchain(),
        NeuronToolchain(),
        TorchAOTToolchain(),
    )
}


def get_toolchain(name: str) -> Toolchain:
    if name not in TOOLCHAINS:
        raise TandemError(f"unknown toolchain {name!r}; tandem knows {', '.join(TOOLCHAINS)}")
    return TOOLCHAINS[name]


__all__ = ["TOOLCHAINS", "Toolchain", "get_toolchain"]
