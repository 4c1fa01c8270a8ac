"""Repository flavors for compiled targets, plugged into :mod:`tandem.serving.repository`.

* ``tensorrt``: refinement is a ``platform: "tensorrt_plan"`` model (Triton's TensorRT backend
  runs the wire-format refinement engine directly, KIND_GPU, the engine listed under its compute
  capability in ``cc_model_filenames``); reasoning is a python-backend model running
  :class:`tandem.pipeline.Pipeline` over the TensorRT runtime, i.e. the whole autoregressive loop
  over the prefill and decode-step engines in-process, KIND_GPU.
* ``neuron``: both stages are python-backend models over the Neuron runtime, KIND_MODEL instances
  each pinned to its own NeuronCores (``NEURON_RT_VISIBLE_CORES``).
* ``torch_aot``: both stages are python-backend models over AOTInductor packages (KIND_GPU for
  ``cuda-torch``, KIND_CPU for ``cpu-aot``).

Each version folder ships a manifest listing exactly the artifacts it holds, so the runtime's
hash and architecture checks run inside Triton too. Each toolchain (tandem.toolchains) hands its
flavor to :func:`~tandem.serving.repository.write_repository` as an object (nothing is registered:
they need ``compiled=<build>/compiled`` and make no sense to ``tandem repo`` over a plain export).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from tandem.formats.compiled_manifest import COMPILED_MANIFEST, CompiledManifest, read_compiled_manifest, verify_artifact
from tandem.formats.targets import sm_capability
from tandem.errors import ArtifactError, TandemError
from tandem.serving.interface import REASONING, REFINEMENT
from tandem.serving.repository import (
    ARTIFACTS_DIR,
    BuildContext,
    Flavor,
    ModelTarget,
    PythonRuntimeTarget,
    set_parameter,
    write_model_py,
)

PARAM_NEURON_CORES = "neuron_cores_per_instance"


def compiled_manifest(ctx: BuildContext) -> tuple[Path, CompiledManifest]:
    directory = ctx.target_options.get("compiled")
    if directory is None:
        raise TandemError(f"the {ctx.flavor} flavor serves compiled artifacts: pass compiled=<build dir>/compiled")
    directory = Path(directory)
    manifest = read_compiled_manifest(directory)
    if manifest.config_fingerprint != ctx.manifest.config_fingerprint:
        raise ArtifactError(
            f"{directory} was compiled from config {manifest.config.name} ({manifest.config_fingerprint}) but the export "
            f"in {ctx.artifacts} is {ctx.manifest.config.name} ({ctx.manifest.config_fingerprint}); build again"
        )
    return directory, manifest


class CompiledRuntimeTarget(PythonRuntimeTarget):
    """A python-backend model running a tandem runtime over compiled artifacts shipped in its version folder."""

    MODULES = {REASONING: "tandem.compiler.served.reasoning", REFINEMENT: "tandem.compiler.served.refinement"}
    option_names = ("compiled",)

    def __init__(self, runtime: str, default_instance_kind: str, toolchain: str):
        super().__init__(runtime=runtime, default_instance_kind=default_instance_kind)
        self.toolchain = toolchain

    def runtime_options(self, ctx: BuildContext, stage: str) -> dict[str, Any]:
        return {"graphs": list(self.GRAPHS[stage])}

    def configure(self, ctx: BuildContext, stage: str, config: mc.ModelConfig) -> None:
        super().configure(ctx, stage, config)
        _, manifest = compiled_manifest(ctx)
        if manifest.toolchain != self.toolchain:
            raise ArtifactError(f"the {ctx.flavor} flavor needs {self.toolchain} artifacts, got {manifest.toolchain} ({manifest.target})")
        if manifest.device == "cpu":  # a CPU-compiled package (cpu-aot) runs on CPU instances whatever the default
            for group in config.instance_group:
                group.kind = mc.ModelInstanceGroup.KIND_CPU
        set_parameter(config, "tandem.target", manifest.target)
        set_parameter(config, "tandem.arch", manifest.arch)
        set_parameter(config, "tandem.precision", manifest.precision)

    def populate(self, ctx: BuildContext, stage: str, version_dir: Path) -> None:
        directory, manifest = compiled_manifest(ctx)
        shipped = [a for graph in self.GRAPHS[stage] for a in manifest.for_graph(graph)]
        missing = [g for g in self.GRAPHS[stage] if not manifest.for_graph(g)]
        if missing:
            raise ArtifactError(f"{directory} has no artifacts for {missing}; build again")
        target_dir = version_dir / ARTIFACTS_DIR
        for artifact in shipped:
            ctx.place(verify_artifact(directory, artifact), target_dir / artifact.file, target_dir)
        manifest.model_copy(update={"artifacts": shipped}).write(target_dir)
        write_model_py(version_dir, self.MODULES[stage])

    def describe(self) -> str:
        return f"python backend + tandem {self.runtime} runtime over compiled artifacts"


class NeuronRuntimeTarget(CompiledRuntimeTarget):
    """KIND_MODEL instances: Triton does not place them, each pins itself to its NeuronCores."""

    option_names = ("compiled", PARAM_NEURON_CORES)

    def configure(self, ctx: BuildContext, stage: str, config: mc.ModelConfig) -> None:
        super().configure(ctx, stage, config)
        cores = int(ctx.target_options.get(PARAM_NEURON_CORES, 1))
        if cores < 1:
            raise TandemError(f"{PARAM_NEURON_CORES} must be >= 1, got {cores}")
        count = config.instance_group[0].count
        del config.instance_group[:]
        config.instance_group.add(count=count, kind=mc.ModelInstanceGroup.KIND_MODEL)
        set_parameter(config, PARAM_NEURON_CORES, str(cores))


class TensorRTPlanTarget(ModelTarget):
    """``platform: "tensorrt_plan"``: Triton's TensorRT backend runs the wire-format refinement engine."""

    default_instance_kind = "gpu"
    option_names = ("compiled",)

    def _served(self, ctx: BuildContext):
        directory, manifest = compiled_manifest(ctx)
        served = manifest.for_graph(REFINEMENT, served=True)
        if len(served) != 1:
            raise ArtifactError(f"{directory} has no served refinement engine (wire format); build the tensorrt target again")
        return directory, manifest, served[0]

    def configure(self, ctx: BuildContext, stage: str, config: mc.ModelConfig) -> None:
        if stage != REFINEMENT:
            raise TandemError(f"the tensorrt_plan target serves refinement only, not {stage}")
        _, manifest, engine = self._served(ctx)
        if manifest.toolchain != "tensorrt":
            raise ArtifactError(f"the tensorrt flavor needs TensorRT engines, got {manifest.toolchain} ({manifest.target})")
        max_batch = engine.profile["max"]["scene_tokens"][0] if engine.profile else 0
        if config.max_batch_size > max_batch:
            raise TandemError(f"max_batch_size {config.max_batch_size} exceeds the engine's profile (batch <= {max_batch})")
        config.platform = "tensorrt_plan"
        config.default_model_filename = engine.file
        # Triton picks the engine by the GPU's compute capability; on another GPU the load fails
        # in TensorRT with an "incompatible device" message instead of running a wrong engine.
        config.cc_model_filenames[sm_capability(manifest.arch)] = engine.file
        for instance_group in config.instance_group:
            if instance_group.kind != mc.ModelInstanceGroup.KIND_GPU:
                raise TandemError("a tensorrt_plan model runs on GPUs only: use instance kind gpu")
        set_parameter(config, "tandem.arch", manifest.arch)
        set_parameter(config, "tandem.precision", manifest.precision)
        set_parameter(config, "tandem.tensorrt_version", manifest.tool_versions.get("tensorrt", ""))

    def populate(self, ctx: BuildContext, stage: str, version_dir: Path) -> None:
        directory, _, engine = self._served(ctx)
        ctx.place(verify_artifact(directory, engine), version_dir / engine.file, version_dir)

    def describe(self) -> str:
        return "Triton tensorrt_plan backend"


def tensorrt_flavor() -> Flavor:
    return Flavor(
        "tensorrt",
        "refinement on Triton's tensorrt_plan backend, reasoning's decode loop in the python backend over TensorRT engines",
        {REASONING: CompiledRuntimeTarget("tensorrt", "gpu", "tensorrt"), REFINEMENT: TensorRTPlanTarget()},
    )


def neuron_flavor() -> Flavor:
    return Flavor(
        "neuron",
        "python-backend models over torch-neuronx artifacts, instances pinned to NeuronCores",
        {REASONING: NeuronRuntimeTarget("neuron", "cpu", "neuron"), REFINEMENT: NeuronRuntimeTarget("neuron", "cpu", "neuron")},
    )


def torch_aot_flavor() -> Flavor:
    return Flavor(
        "torch_aot",
        "python-backend models over AOTInductor packages (GPU for cuda-torch, CPU for cpu-aot)",
        {
            REASONING: CompiledRuntimeTarget("torch_aot", "gpu", "torch_aot"),
            REFINEMENT: CompiledRuntimeTarget("torch_aot", "gpu", "torch_aot"),
        },
    )


__all__ = ["COMPILED_MANIFEST", "CompiledRuntimeTarget", "NeuronRuntimeTarget", "TensorRTPlanTarget", "neuron_flavor", "tensorrt_flavor", "torch_aot_flavor"]
