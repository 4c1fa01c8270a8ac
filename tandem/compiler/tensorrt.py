"""TensorRT 11 engines for H100 (sm90) and A100 (sm80) from the precision graphs.

TensorRT 11 builds strongly typed networks only: every layer runs at the type its ONNX graph
gives it, and the FP16/BF16/INT8/FP8 builder flags are gone. So the precision of an engine is
decided before TensorRT, by the precision step (:mod:`tandem.compiler.precision`: casts for
fp16/bf16, Q/DQ nodes for int8/fp8), whose graphs are checked on this machine against PyTorch and
gated on accuracy. Everything up to the TensorRT call runs anywhere: the precision graphs are
prepared (shape inference, I/O checked against the stage description, the served refinement graph
wrapped into Triton's wire format) and one optimization profile per graph is planned from the
stage description's min/opt/max dims. The build itself uses TensorRT's Python API
(``trt.Builder``, a network created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` -- the
only mode in 11.x, an opt-in in 10.12+ -- ``trt.OnnxParser``, a persisted timing cache and the
builder optimisation level) and must run on a GPU of the target architecture: an engine only runs
on the compute capability, and in the TensorRT version, that built it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from tandem.formats.compiled_manifest import CompiledArtifact, CompiledManifest
from tandem.compiler.steps import StepFailed
from tandem.compiler.tensorrt_moe import ROUTED_PRECISIONS, register_plugins, route_moe_layers
from tandem.formats.targets import Target, describe_arch, sm_arch
from tandem.config import ModelConfig
from tandem.errors import ToolchainMissingError
from tandem.formats.export_manifest import Manifest, TensorEntry
from tandem.stages import MAX_BATCH, GraphSpec, graph_specs
from tandem.runtimes.tensorrt import installed_version, supported_version
from tandem.util import atomic_write_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: pip install 'tensorrt>=11,<12' (TensorRT 11 needs an NVIDIA GPU and a recent CUDA "
    "driver; TensorRT 10.12 or newer also works, its strongly typed mode; NVIDIA's containers nvcr.io/nvidia/tensorrt "
    "and nvcr.io/nvidia/tritonserver ship it). {graphs_note}Run `tandem build --target {target} --precision {precision}` "
    "on a machine with an {arch} GPU"
)
# Before any step ran (pre-flight, `tandem doctor`) nothing is written yet: say how to write the graphs here.
GRAPHS_NOT_WRITTEN = (
    "No graphs were written for it yet. The {precision} graphs TensorRT builds from can be written and checked on this machine: "
    "`tandem build --target {target} --precision {precision} --no-preflight` runs export, precision and optimise "
    "and stops at the TensorRT call. "
)
GRAPHS_WRITTEN = "The {precision} graphs TensorRT would build from were written to {graphs}. "
PROFILES_FILE = "profiles.json"
SERVED_REFINEMENT = "refinement_served"  # the refinement graph in the served wire format (tensorrt_plan model)
EXTERNAL_DATA_THRESHOLD = 1 << 30
DEFAULT_OPT_LEVEL = 3  # TensorRT's default; 4-5 search longer for faster engines
DEFAULT_WORKSPACE_GIB = 4.0
_NP_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def engine_name(graph: str, precision: str, arch: str) -> str:
    """Engines are named by stage graph, precision and compute capability: reasoning_decode.fp16.sm90.plan."""
    return f"{graph}.{precision}.{arch}.plan"


def require_tensorrt(target: Target, precision: str = "fp16", graphs: str | None = None):
    """TensorRT, or ToolchainMissingError naming what to install; ``graphs`` is the folder of precision
    graphs already written (None before any step ran: the message then says how to write them here)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        note = (GRAPHS_WRITTEN if graphs else GRAPHS_NOT_WRITTEN).format(target=target.name, precision=precision, graphs=graphs)
        raise ToolchainMissingError(
            INSTALL_HINT.format(target=target.name, arch=describe_arch(target.arch or "?"), precision=precision, graphs_note=note)
        ) from exc
    if not supported_version(trt.__version__):
        raise ToolchainMissingError(
            f"TensorRT {trt.__version__} is installed; tandem builds strongly typed networks, which need TensorRT 11 "
            "(or 10.12+): pip install 'tensorrt>=11,<12'"
        )
    return trt


def require_gpu_arch(target: Target) -> str:
    """TensorRT tunes kernels for the GPU it builds on, so an sm90 engine must be built on an sm90 GPU."""
    import torch

    if not torch.cuda.is_available():
        raise ToolchainMissingError(
            f"building TensorRT engines for {target.name} needs an NVIDIA {describe_arch(target.arch)} GPU and a CUDA "
            f"build of torch (torch {torch.__version__} here sees no GPU)"
        )
    here = sm_arch(torch.cuda.get_device_capability())
    if here != target.arch:
        raise StepFailed(
            f"target {target.name} needs engines for {describe_arch(target.arch)} but this GPU "
            f"({torch.cuda.get_device_name()}) is {describe_arch(here)}; TensorRT builds for the GPU it runs on: "
            f"build on an {target.arch} GPU or choose the target matching this one"
        )
    return here


# ----------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class EnginePlan:
    graph: str  # file stem of the ONNX graph and of the engine
    stage: str
    onnx_file: str
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    profile: dict[str, dict[str, list[int]]]  # min/opt/max -> input -> shape
    served: bool = False


def graph_profile(spec: GraphSpec) -> dict[str, dict[str, list[int]]]:
    """One optimization profile per graph: the min, opt and max of every dynamic axis (batch, prompt
    length) from the stage description; static inputs get min = opt = max."""
    return {which: {name: list(shape) for name, shape in spec.profile(which).items()} for which in ("min", "opt", "max")}


def served_refinement_plan(config: ModelConfig) -> EnginePlan:
    """The refinement engine Triton's tensorrt_plan backend serves: the served interface of
    refinement (INT32 tokens [B, h*w] -> UINT8 image [B, H, W, 3] and the tokens it rendered), the
    same wire format as the python-backend model."""
    from tandem.serving.interface import REFINEMENT, served_models

    spec = graph_specs(config)["refinement"]
    batch = spec.dims["batch"]
    served = served_models(config)[REFINEMENT]

    def entries(tensors) -> list[TensorEntry]:
        return [TensorEntry(name=t.name, dtype=t.numpy_dtype.name, shape=["batch", *t.dims]) for t in tensors]

    profile = {which: {t.name: [getattr(batch, which), *t.dims] for t in served.inputs} for which in ("min", "opt", "max")}
    return EnginePlan(
        graph=SERVED_REFINEMENT,
        stage="refinement",
        onnx_file=f"{SERVED_REFINEMENT}.onnx",
        inputs=entries(served.inputs),
        outputs=entries(served.outputs),
        profile=profile,
        served=True,
    )


def engine_plans(config: ModelConfig) -> list[EnginePlan]:
    plans = [
        EnginePlan(
            graph=spec.name,
            stage=spec.stage,
            onnx_file=f"{spec.name}.onnx",
            inputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.inputs],
            outputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.outputs],
            profile=graph_profile(spec),
        )
        for spec in graph_specs(config).values()
    ]
    return [*plans, served_refinement_plan(config)]


# ----------------------------------------------------------------------------- optimise (no TensorRT needed)


def _io_entries(values) -> list[tuple[str, str, list[int | str]]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append((v.name, _NP_DTYPES.get(t.elem_type, str(t.elem_type)), dims))
    return out


def check_graph_interface(model: onnx.ModelProto, plan: EnginePlan) -> None:
    """The graph's inputs and outputs must be exactly the plan's (names, dtypes, named dynamic axes),
    or the profile would bind the wrong tensors."""
    expected_in = [(t.name, t.dtype, list(t.shape)) for t in plan.inputs]
    expected_out = [(t.name, t.dtype, list(t.shape)) for t in plan.outputs]
    actual_in, actual_out = _io_entries(model.graph.input), _io_entries(model.graph.output)
    if actual_in != expected_in or actual_out != expected_out:
        raise StepFailed(
            f"{plan.onnx_file}: graph interface {actual_in} -> {actual_out} does not match the stage description "
            f"{expected_in} -> {expected_out}; export again with this tandem"
        )


def quantize_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def check_precision_graphs(graphs_dir: Path, manifest: Manifest, precision: str) -> None:
    """The graphs must be the precision step's, for this precision, and have passed its gate:
    a strongly typed build runs exactly what the graph says."""
    from tandem.compiler.precision import get_precision

    recorded = (manifest.precision or {}).get("precision", "fp32")
    if recorded != precision:
        raise StepFailed(
            f"{graphs_dir} holds {recorded} graphs but this build is for {precision}; TensorRT 11 takes the precision "
            "from the graph: run the precision step for this precision (tandem build --precision ...)"
        )
    if not manifest.passed:
        raise StepFailed(f"{graphs_dir}: the {precision} graphs did not pass their accuracy gate (see its manifest.json)")
    if get_precision(precision).kind == "qdq":
        for entry in manifest.graphs.values():
            model = onnx.load(str(graphs_dir / entry.file), load_external_data=False)
            if not quantize_nodes(model):
                raise StepFailed(
                    f"{entry.file} has no QuantizeLinear/DequantizeLinear nodes: a strongly typed {precision} engine needs "
                    "explicit quantization in the graph; run the precision step again"
                )


def prepare_onnx(graphs_dir: Path, manifest: Manifest, out: Path, precision: str) -> list[EnginePlan]:
    """The optimise step for TensorRT: from the precision graphs (the export itself for fp32),
    graphs TensorRT's ONNX parser gets (strict shape inference, standard-domain ops only,
    interfaces checked), the served refinement wrapper, and the profiles."""
    from tandem.serving.native import wrap_refinement

    check_precision_graphs(graphs_dir, manifest, precision)
    plans = engine_plans(manifest.config)
    for plan in plans:
        entry = manifest.graphs["refinement" if plan.served else plan.graph]
        source = graphs_dir / entry.file
        model = onnx.load(str(source))  # external data next to it is loaded too
        if plan.served:
            model = wrap_refinement(model, manifest.config, precision)
        foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise StepFailed(
                f"{source.name} uses operator domains {foreign} that TensorRT's ONNX parser does not know; "
                "build from the portable export (<graph>.onnx), not ONNX Runtime's optimised copy"
            )
        if plan.stage == "reasoning" and precision in ROUTED_PRECISIONS:
            # TensorRT's own MoE layer is Blackwell-only: on Hopper and Ampere each MoE layer becomes
            # the routed plugin pair (tandem.compiler.tensorrt_moe), reading only the routed experts.
            try:
                model, routed = route_moe_layers(model)
            except ValueError as exc:
                raise StepFailed(f"{source.name}: its MoE layers cannot be routed for TensorRT: {exc}") from exc
            if routed != manifest.config.reasoning.n_layers:
                raise StepFailed(
                    f"{source.name}: {routed} of {manifest.config.reasoning.n_layers} MoE layers found to route for TensorRT"
                )
        try:
            large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
        except ValueError:  # protobuf refuses to size messages over 2 GiB
            large = True
        if not large:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        check_graph_interface(model, plan)
        target = out / plan.onnx_file
        with atomic_write_path(target) as tmp:
            if large:
                onnx.save_model(model, str(tmp), save_as_external_data=True, location=f"{target.name}.data")
            else:
                onnx.save_model(model, str(tmp))
        if large:
            onnx.shape_inference.infer_shapes_path(str(target), str(target))
        onnx.checker.check_model(str(target))
    profiles = {plan.graph: plan_to_json(plan) for plan in plans}
    atomic_write_text(out / PROFILES_FILE, json.dumps(profiles, indent=2) + "\n")
    return plans


def plan_to_json(plan: EnginePlan) -> dict[str, Any]:
    return {
        "stage": plan.stage,
        "onnx": plan.onnx_file,
        "served": plan.served,
        "inputs": [t.model_dump() for t in plan.inputs],
        "outputs": [t.model_dump() for t in plan.outputs],
        "profile": plan.profile,
    }


def read_plans(optimised: Path) -> list[EnginePlan]:
    path = optimised / PROFILES_FILE
    if not path.exists():
        raise StepFailed(f"{path} is missing: the optimise step did not finish; run the build again")
    return [
        EnginePlan(
            graph=graph,
            stage=entry["stage"],
            onnx_file=entry["onnx"],
            inputs=[TensorEntry.model_validate(t) for t in entry["inputs"]],
            outputs=[TensorEntry.model_validate(t) for t in entry["outputs"]],
            profile=entry["profile"],
            served=entry["served"],
        )
        for graph, entry in json.loads(path.read_text()).items()
    ]


# ----------------------------------------------------------------------------- compile (TensorRT)


@dataclass(frozen=True)
class BuilderSettings:
    precision: str
    opt_level: int = DEFAULT_OPT_LEVEL
    workspace_gib: float = DEFAULT_WORKSPACE_GIB
    timing_cache: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "network": "strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED); no precision builder flags",
            "precision": f"{self.precision}, from the ONNX graph's casts and Q/DQ nodes (tandem.compiler.precision)",
            "builder_optimization_level": self.opt_level,
            "workspace_bytes": int(self.workspace_gib * (1 << 30)),
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
        }


def build_engine(trt, onnx_path: Path, plan: EnginePlan, settings: BuilderSettings, logger) -> bytes:
    """One engine with TensorRT 11's builder: a strongly typed network parsed from the precision
    graph, one optimization profile, timing cache (read, extended, written back), builder
    optimisation level. No precision flags: the graph's types are the engine's."""
    if plan.stage == "reasoning":
        register_plugins()  # the routed MoE plugins the reasoning graphs use (AOT Triton kernels)
    builder = trt.Builder(logger)
    # The only mode in TensorRT 11 (the flag is accepted there); required to opt in on 10.12+.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a path, so external weights are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StepFailed(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
    config.builder_optimization_level = settings.opt_level
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        shapes = [plan.profile[which][name] for which in ("min", "opt", "max")]
        profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    cache_bytes = settings.timing_cache.read_bytes() if settings.timing_cache and settings.timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s was made by another TensorRT or GPU; starting a new one", settings.timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StepFailed(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above)")
    if settings.timing_cache is not None:
        with atomic_write_path(settings.timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def engine_artifact(plan: EnginePlan, directory: Path, file: str) -> CompiledArtifact:
    path = directory / file
    return CompiledArtifact(
        graph="refinement" if plan.served else plan.graph,
        stage=plan.stage,
        file=file,
        sha256=sha256_file(path),
        size=path.stat().st_size,
        inputs=plan.inputs,
        outputs=plan.outputs,
        profile=plan.profile,
        served=plan.served,
    )


def engines_manifest(
    target: Target,
    arch: str,
    device: str,
    settings: BuilderSettings,
    export_manifest: Manifest,
    inputs: dict[str, str],
    artifacts: list[CompiledArtifact],
    versions: dict[str, str],
) -> CompiledManifest:
    return CompiledManifest(
        target=target.name,
        toolchain=target.toolchain,
        arch=arch,
        device=device,
        precision=settings.precision,
        config=export_manifest.config,
        config_fingerprint=export_manifest.config_fingerprint,
        weights=export_manifest.weights,
        tool_versions=versions,
        pinned=["tensorrt"],
        inputs=inputs,
        builder=settings.describe() | {"max_batch": MAX_BATCH},
        artifacts=artifacts,
    )


def compile_engines(
    target: Target, optimised: Path, staging: Path, export_manifest: Manifest, settings: BuilderSettings, inputs: dict[str, str]
) -> CompiledManifest:
    """The compile step: fails with the install hint where TensorRT is missing, before any engine file exists."""
    trt = require_tensorrt(target, settings.precision, str(optimised))
    arch = require_gpu_arch(target)
    import torch
    from tqdm.auto import tqdm

    logger = trt.Logger(trt.Logger.WARNING)
    artifacts = []
    for plan in tqdm(read_plans(optimised), desc=f"tensorrt {target.name}", unit="engine"):
        data = build_engine(trt, optimised / plan.onnx_file, plan, settings, logger)
        name = engine_name(plan.graph, settings.precision, arch)
        (staging / name).write_bytes(data)  # ``staging`` is swapped into place only when every engine is built
        artifacts.append(engine_artifact(plan, staging, name))
    versions = {"tensorrt": trt.__version__, "torch": torch.__version__, "onnx": onnx.__version__}
    device = f"cuda ({torch.cuda.get_device_name()})"
    return engines_manifest(target, arch, device, settings, export_manifest, inputs, artifacts, versions)
