"""Runtimes: one interface (run named inputs -> named outputs), several implementations."""

from __future__ import annotations

from pathlib import Path

from tandem.config import ModelConfig
from tandem.errors import TandemError
from tandem.runtimes.base import Runtime

RUNTIME_NAMES = ("torch", "onnxruntime", "tensorrt", "neuron", "torch_aot")
# Runtimes over `tandem build` output (<build>/compiled): name -> (module, class).
COMPILED_RUNTIMES = {
    "tensorrt": ("tandem.runtimes.tensorrt", "TensorRTRuntime"),
    "neuron": ("tandem.runtimes.neuron", "NeuronRuntime"),
    "torch_aot": ("tandem.runtimes.torch_aot", "TorchAOTRuntime"),
}


def make_runtime(
    name: str, artifacts: str | Path | None = None, config: ModelConfig | None = None, **options
) -> Runtime:
    """``torch`` builds the stages from ``config`` (or the config recorded with ``artifacts``);
    ``onnxruntime`` loads the exported graphs in ``artifacts``. ``artifacts`` may be any tandem output
    folder (an export, a build, its compiled/): the runtime finds what it loads inside (tandem.formats.folders)."""
    from tandem.formats import folders
    if name == "torch":
        from tandem.runtimes.torch_eager import TorchRuntime

        if config is None:
            if artifacts is None:
                raise TandemError("the torch runtime needs a config or an export directory")
            from tandem.formats.export_manifest import read_manifest

            config = read_manifest(folders.export_dir(artifacts)).config
        return TorchRuntime(config, **options)
    if name == "onnxruntime":
        from tandem.runtimes.onnxruntime import OnnxRuntime

        if artifacts is None:
            raise TandemError("the onnxruntime runtime needs an export directory (tandem export --out DIR)")
        return OnnxRuntime(folders.export_dir(artifacts), **options)
    if name in COMPILED_RUNTIMES:
        import importlib

        if artifacts is None:
            raise TandemError(f"the {name} runtime needs a compiled directory (tandem build --out DIR -> DIR/compiled)")
        module, cls = COMPILED_RUNTIMES[name]
        return getattr(importlib.import_module(module), cls)(folders.compiled_dir(artifacts), **options)
    raise TandemError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIME_NAMES)}")


__all__ = ["Runtime", "RUNTIME_NAMES", "make_runtime"]
