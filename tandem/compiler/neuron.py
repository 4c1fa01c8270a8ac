"""AWS Inferentia2 artifacts: the stages traced with torch-neuronx at static-shape buckets.

Neuron compiles every input shape separately, so each graph is compiled once per *bucket*: a
fixed size for every dynamic axis of the stage description (batch sizes, prompt lengths). The
runtime pads a request up to the smallest bucket that holds it. Matmuls are auto-cast to bf16
(``--auto-cast matmult --auto-cast-type bf16``, passed explicitly because neuronx-cc's default is
announced to change to ``none``). Bucket planning runs anywhere; the compiler (neuronx-cc, via
``torch_neuronx.trace``) needs the Neuron SDK, which installs on any x86-64 Linux host; running
the artifacts needs an inf2/trn1 instance.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.formats.compiled_manifest import CompiledArtifact, CompiledManifest
from tandem.compiler.steps import StepFailed
from tandem.formats.targets import Target
from tandem.config import ModelConfig
from tandem.errors import ToolchainMissingError
from tandem.formats.export_manifest import Manifest, TensorEntry
from tandem.stages import DimRange, GraphSpec, graph_specs
from tandem.runtimes.neuron import INSTALL_HINT, installed_versions
from tandem.util import atomic_write_path, atomic_write_text, sha256_file

BUCKETS_FILE = "buckets.json"
MIN_PROMPT_BUCKET = 16  # shorter prompts share the 16-token bucket: padding a few tokens is cheaper than a compile
MODEL_TYPES = {"reasoning": "transformer", "refinement": "generic"}


def require_neuron():
    try:
        import torch_neuronx
    except ImportError as exc:
        raise ToolchainMissingError(INSTALL_HINT) from exc
    return torch_neuronx


def compiler_args(stage: str, precision: str) -> list[str]:
    """neuronx-cc options: the instance family, the model type, and the cast policy for FP32 ops."""
    args = ["--target", "inf2", "--model-type", MODEL_TYPES[stage]]
    if precision == "bf16":
        args += ["--auto-cast", "matmult", "--auto-cast-type", "bf16"]
    else:
        args += ["--auto-cast", "none"]
    return args


# ----------------------------------------------------------------------------- buckets


def axis_buckets(name: str, r: DimRange) -> list[int]:
    """Powers of two within the range, plus its opt and max (so the typical and the largest request
    need no padding). Prompt lengths below MIN_PROMPT_BUCKET share one bucket."""
    floor = max(r.min, MIN_PROMPT_BUCKET) if name == "prompt_len" else r.min
    floor = min(floor, r.max)
    sizes = {r.opt, r.max, floor}
    size = 1
    while size <= r.max:
        if size >= floor:
            sizes.add(size)
        size *= 2
    return sorted(s for s in sizes if floor <= s <= r.max)


@dataclass(frozen=True)
class Bucket:
    graph: str
    stage: str
    dims: dict[str, int]

    @property
    def key(self) -> str:
        return ".".join(f"{axis}{size}" for axis, size in sorted(self.dims.items()))

    def file(self, precision: str) -> str:
        return f"{self.graph}.{self.key}.{precision}.inf2.pt"

    def input_shapes(self, spec: GraphSpec) -> dict[str, list[int]]:
        return {t.name: list(t.concrete_shape(self.dims)) for t in spec.inputs}


def plan_buckets(config: ModelConfig) -> list[Bucket]:
    buckets = []
    for spec in graph_specs(config).values():
        axes = sorted(spec.dims)
        for sizes in itertools.product(*(axis_buckets(a, spec.dims[a]) for a in axes)):
            buckets.append(Bucket(spec.name, spec.stage, dict(zip(axes, sizes))))
    return buckets


def write_bucket_plan(config: ModelConfig, out: Path, precision: str) -> list[Bucket]:
    """The optimise step for Neuron: which static shapes get compiled, with which compiler options."""
    specs = graph_specs(config)
    buckets = plan_buckets(config)
    plan = {
        "precision": precision,
        "compiler_args": {stage: compiler_args(stage, precision) for stage in MODEL_TYPES},
        "axes": {name: {axis: axis_buckets(axis, r) for axis, r in spec.dims.items()} for name, spec in specs.items()},
        "buckets": [
            {"graph": b.graph, "stage": b.stage, "dims": b.dims, "file": b.file(precision), "inputs": b.input_shapes(specs[b.graph])}
            for b in buckets
        ],
    }
    atomic_write_text(out / BUCKETS_FILE, json.dumps(plan, indent=2) + "\n")
    return buckets


def read_bucket_plan(optimised: Path) -> dict[str, Any]:
    path = optimised / BUCKETS_FILE
    if not path.exists():
        raise StepFailed(f"{path} is missing: the optimise step did not finish; run the build again")
    return json.loads(path.read_text())


def compile_buckets(
    target: Target,
    optimised: Path,
    staging: Path,
    export_manifest: Manifest,
    precision: str,
    checkpoint: str | Path | None,
    inputs: dict[str, str],
    workdir: Path,
) -> CompiledManifest:
    torch_neuronx = require_neuron()
    import torch
    from tqdm.auto import tqdm

    from tandem.models import build_stages

    plan = read_bucket_plan(optimised)
    config = export_manifest.config
    specs = graph_specs(config)
    stages = build_stages(config, checkpoint)
    artifacts = []
    for entry in tqdm(plan["buckets"], desc="neuron inf2", unit="bucket"):
        spec = specs[entry["graph"]]
        module = spec.make_module(stages).eval()
        example = spec.sample_inputs(entry["dims"], seed=0)
        args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
        traced = torch_neuronx.trace(
            module,
            args,
            compiler_workdir=str(workdir / Path(entry["file"]).stem),  # neuronx-cc's logs and NEFFs, kept for debugging
            compiler_args=plan["compiler_args"][spec.stage],
        )
        target_path = staging / entry["file"]
        with atomic_write_path(target_path) as tmp:
            torch.jit.save(traced, str(tmp))
        artifacts.append(
            CompiledArtifact(
                graph=spec.name,
                stage=spec.stage,
                file=entry["file"],
                sha256=sha256_file(target_path),
                size=target_path.stat().st_size,
                inputs=[TensorEntry(name=n, dtype=t.dtype, shape=s) for (n, s), t in zip(entry["inputs"].items(), spec.inputs)],
                outputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.outputs],
                bucket=entry["dims"],
            )
        )
    versions = installed_versions() | {"torch": torch.__version__}
    return CompiledManifest(
        target=target.name,
        toolchain=target.toolchain,
        arch="inf2",
        device="neuron",
        precision=precision,
        config=config,
        config_fingerprint=export_manifest.config_fingerprint,
        weights=export_manifest.weights,
        tool_versions=versions,
        pinned=["torch-neuronx"],
        inputs=inputs,
        builder={"compiler_args": plan["compiler_args"], "axes": plan["axes"]},
        artifacts=artifacts,
    )
