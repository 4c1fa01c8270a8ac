"""``tandem build``: export -> optimise -> compile -> repository for one target, as status-reporting steps.

Layout of the build directory::

    <out>/build_manifest.json   the build: target, arch, precision, tool versions, every step's status,
                                input hash and output hashes, the artifacts with their shapes
    <out>/export/               ONNX graphs validated against PyTorch (tandem.export), manifest.json
    <out>/precision/            <graph>.<precision>.onnx: the precision in the graph (casts, Q/DQ),
                                checked against fp32 and gated on accuracy (tandem.compiler.precision_gate);
                                an export's layout, so everything after reads it as it reads an export
    <out>/optimised/            what the compiler reads: TensorRT-ready ONNX + profiles.json,
                                Neuron buckets.json, or torch.export programs
    <out>/compiled/             engines / Neuron artifacts / AOTInductor packages + manifest.json
                                (self-contained: runtimes and the repository read only this)
    <out>/model_repository/     the Triton model repository
    <out>/cache/                TensorRT timing cache, neuronx-cc work directories (never hashed)

Every directory is replaced atomically by the step that writes it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tandem.compiler import neuron as neuron_build
from tandem.compiler import tensorrt as trt_build
from tandem.formats.compiled_manifest import COMPILED_MANIFEST, read_compiled_manifest
from tandem.compiler.steps import (
    FAILED,
    Step,
    StepFailed,
    StepRecord,
    StepRunner,
    source_hash,
    tree_hashes,
)
from tandem.formats.targets import CPU, NEURON, TENSORRT, TORCH_AOT, Target, get_target
from tandem.config import ModelConfig
from tandem.formats.build_manifest import (
    CACHE_DIR,
    COMPILED_DIR,
    EXPORT_DIR,
    OPTIMISED_DIR,
    PRECISION_DIR,
    REPOSITORY_DIR,
    BuildManifest,
    read_build_manifest,
)
from tandem.errors import ArtifactError, TandemError
from tandem.formats.export_manifest import MANIFEST_NAME, graph_files, read_manifest
from tandem.util import atomic_directory, sha256_file

EXPORT, PRECISION, OPTIMISED, COMPILED, CACHE = EXPORT_DIR, PRECISION_DIR, OPTIMISED_DIR, COMPILED_DIR, CACHE_DIR  # step names
# Toolchains whose precision lives in the ONNX graph (the others compile from PyTorch).
GRAPH_PRECISION_TOOLCHAINS = (CPU, TENSORRT)
# The code each toolchain's optimise and compile steps run: a change re-runs them, an unrelated edit does not.
TOOLCHAIN_CODE = {
    CPU: ("tandem.formats.targets",),
    TENSORRT: ("tandem.compiler.tensorrt", "tandem.formats.compiled_manifest", "tandem.formats.targets", "tandem.serving.native"),
    NEURON: ("tandem.compiler.neuron", "tandem.formats.compiled_manifest", "tandem.formats.targets"),
    TORCH_AOT: ("tandem.compiler.torch_aot", "tandem.formats.compiled_manifest", "tandem.formats.targets"),
}


@dataclass
class BuildOptions:
    precision: str | None = None
    checkpoint: str | None = None
    reuse_export: Path | None = None  # an existing, validated `tandem export` directory
    force: bool = False
    opt_level: int = trt_build.DEFAULT_OPT_LEVEL
    workspace_gib: float = trt_build.DEFAULT_WORKSPACE_GIB
    timing_cache: Path | None = None  # default <out>/cache/tensorrt-<arch>.timing
    gate_captions: int | None = None  # held-out captions the precision gate generates from (None: all)
    accept_accuracy_loss: str | None = None  # ship a precision the gate refused; the reason is recorded
    repository: dict[str, Any] = field(default_factory=dict)  # tandem.serving.repository options


@dataclass
class BuildResult:
    out: Path
    target: Target
    records: list[StepRecord]
    manifest: BuildManifest

    @property
    def passed(self) -> bool:
        return self.manifest.passed


def tool_versions() -> dict[str, str | None]:
    """Installed versions (package metadata, so no toolchain is imported just to report it)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("tandem", "torch", "onnx", "onnxscript", "onnxruntime", "tritonclient", "nvidia-pytriton"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    versions["tensorrt"] = trt_build.installed_version()
    versions.update({k: neuron_build.installed_versions().get(k) for k in ("torch-neuronx", "neuronx-cc")})
    return versions


class Build:
    """The steps of one target's build, wired to the build directory."""

    def __init__(self, config: ModelConfig, target: Target, out: Path, options: BuildOptions):
        self.config = config
        self.target = target
        self.out = Path(out)
        self.options = options
        self.precision = target.check_precision(options.precision)
        self.runner: StepRunner | None = None

    # -- helpers --------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.out / name

    def outputs_of(self, step: str) -> dict[str, str]:
        assert self.runner is not None
        for record in reversed(self.runner.records):
            if record.name == step:
                return record.outputs
        return {}

    def export_manifest(self):
        return read_manifest(self.path(EXPORT))

    @property
    def graph_precision(self) -> bool:
        """Whether this build writes precision graphs (a non-fp32 precision on a graph toolchain)."""
        return self.target.toolchain in GRAPH_PRECISION_TOOLCHAINS and self.precision != "fp32"

    def graphs_dir(self) -> Path:
        """Where the graphs the later steps read live: the precision step's output, or the export."""
        return self.path(PRECISION) if self.graph_precision else self.path(EXPORT)

    # -- precision ------------------------------------------------------------------------

    def precision_inputs(self) -> dict[str, Any]:
        import importlib.metadata

        return {
            "export": self.outputs_of(EXPORT),
            "toolchain": self.target.toolchain,
            "precision": self.precision,
            "gate_captions": self.options.gate_captions,
            "accept_accuracy_loss": self.options.accept_accuracy_loss,
            "code": source_hash("tandem.compiler.precision", "tandem.compiler.precision_gate", "tandem.eval", "tandem.data", "tandem.pipeline"),
            "versions": {
                **{k: tool_versions()[k] for k in ("onnx", "onnxruntime", "torch")},
                "onnxconverter-common": importlib.metadata.version("onnxconverter-common"),
            },
        }

    def run_precision(self) -> tuple[list[Path], str]:
        from tandem.compiler.precision_gate import make_precision_graphs

        report = make_precision_graphs(
            self.path(EXPORT),
            self.path(PRECISION),
            self.target.toolchain,
            self.precision,
            checkpoint=self.options.checkpoint,
            captions=self.options.gate_captions,
            override=self.options.accept_accuracy_loss,
        )
        graphs = ", ".join(f"{g.graph} {g.precision} (error {g.max_output_error:.1e} of fp32's range)" for g in report.graphs.values())
        note = f"{graphs} vs PyTorch fp32"
        if report.generation is not None:
            note += f"; greedy tokens agree with fp32 on {report.generation.token_agreement:.2%} of positions ({report.generation.captions} held-out captions)"
        if report.accuracy is not None:
            note += f"; accuracy {report.accuracy.precision:.2%} vs fp32 {report.accuracy.fp32:.2%}"
        if report.override:
            note += f"; GATE OVERRIDDEN ({report.override}): " + " / ".join(report.refusals)
        return [self.path(PRECISION)], note

    # -- export ---------------------------------------------------------------------------

    def export_inputs(self) -> dict[str, Any]:
        inputs: dict[str, Any] = {"config": self.config.model_dump(mode="json")}
        if self.options.reuse_export is not None:
            inputs["reused_export"] = tree_hashes(self.options.reuse_export)
            return inputs
        checkpoint = self.options.checkpoint or self.config.checkpoint
        if checkpoint is not None:
            if not Path(checkpoint).exists():
                raise ArtifactError(f"checkpoint {checkpoint} does not exist; pass --checkpoint with a safetensors file")
            inputs["weights"] = sha256_file(Path(checkpoint))
        else:
            inputs["weights"] = f"seed:{self.config.seed}"
        inputs["code"] = source_hash("tandem.models", "tandem.stages", "tandem.export", "tandem.tokenizer", "tandem.pipeline")
        inputs["versions"] = {k: tool_versions()[k] for k in ("torch", "onnx", "onnxscript", "onnxruntime")}
        return inputs

    def run_export(self) -> tuple[list[Path], str]:
        target = self.path(EXPORT)
        if self.options.reuse_export is not None:
            source = Path(self.options.reuse_export)
            manifest = read_manifest(source)
            if not manifest.passed:
                raise StepFailed(f"{source} failed validation against PyTorch (see its {MANIFEST_NAME}); export again")
            if manifest.config_fingerprint != self.config.fingerprint():
                raise StepFailed(
                    f"{source} was exported from config {manifest.config.name} ({manifest.config_fingerprint}), not "
                    f"{self.config.name} ({self.config.fingerprint()}); pass the matching --config or drop --export"
                )
            from tandem.formats.export_manifest import verify_graph_files
            from tandem.export.onnx_export import _weights_label

            expected = _weights_label(self.config, self.options.checkpoint)
            if manifest.weights != expected:
                raise StepFailed(
                    f"{source} was exported with weights {manifest.weights[:24]}..., this build asks for {expected[:24]}...; "
                    "pass the matching --checkpoint or drop --export"
                )
            # Exactly the files the manifest names (graphs, optimised copies, external data), each
            # hash-checked and confined to the export folder, then the manifest itself.
            files = {MANIFEST_NAME}
            for entry in manifest.graphs.values():
                files.update(verify_graph_files(source, entry, optimized=False))
                if entry.optimized_file:
                    files.update(verify_graph_files(source, entry, optimized=True))
            with atomic_directory(target) as staging:
                for file in sorted(files):
                    shutil.copy2(source / file, staging / file)
            return [target], f"reused the validated export in {source}"
        from tandem.export.onnx_export import export_model

        result = export_model(self.config, target, checkpoint=self.options.checkpoint)
        g = result.manifest.generation
        tokens = f"; greedy tokens identical to PyTorch: {g.tokens_equal}" if g else ""
        return [target], f"{len(result.manifest.graphs)} graphs exported and validated against PyTorch{tokens}"

    # -- optimise -------------------------------------------------------------------------

    def optimise_inputs(self) -> dict[str, Any]:
        return {
            "export": self.outputs_of(EXPORT),
            "precision_graphs": self.outputs_of(PRECISION),
            "target": self.target.name,
            "precision": self.precision,
            "code": source_hash("tandem.stages", *TOOLCHAIN_CODE[self.target.toolchain]),
        }

    def run_optimise(self) -> tuple[list[Path], str]:
        toolchain = self.target.toolchain
        out = self.path(OPTIMISED)
        manifest = self.export_manifest()
        with atomic_directory(out) as staging:
            if toolchain == TENSORRT:
                plans = trt_build.prepare_onnx(self.graphs_dir(), read_manifest(self.graphs_dir()), staging, self.precision)
                shapes = ", ".join(
                    f"{p.graph} {p.profile['min'][p.inputs[0].name][0]}..{p.profile['max'][p.inputs[0].name][0]}" for p in plans
                )
                note = f"{len(plans)} graphs ready for TensorRT's ONNX parser; profiles (batch min..max): {shapes}"
            elif toolchain == NEURON:
                buckets = neuron_build.write_bucket_plan(manifest.config, staging, self.precision)
                note = f"{len(buckets)} static-shape buckets planned for neuronx-cc ({neuron_build.BUCKETS_FILE})"
            elif toolchain == TORCH_AOT:
                from tandem.compiler import torch_aot

                written = torch_aot.export_programs(manifest.config, self.options.checkpoint, staging)
                note = f"{len(written)} graphs exported with torch.export and checked against eager PyTorch"
            else:  # pragma: no cover - targets are a closed set
                raise StepFailed(f"no optimise step for toolchain {toolchain}")
        return [out], note

    # -- compile --------------------------------------------------------------------------

    def timing_cache(self) -> Path:
        if self.options.timing_cache is not None:
            return Path(self.options.timing_cache)
        return self.path(CACHE) / f"tensorrt-{self.target.arch}.timing"

    def builder_settings(self) -> trt_build.BuilderSettings:
        return trt_build.BuilderSettings(
            precision=self.precision,
            opt_level=self.options.opt_level,
            workspace_gib=self.options.workspace_gib,
            timing_cache=self.timing_cache(),
        )

    def compile_inputs(self) -> dict[str, Any]:
        inputs: dict[str, Any] = {
            "export": self.outputs_of(EXPORT),
            "optimised": self.outputs_of(OPTIMISED),
            "target": self.target.name,
            "precision": self.precision,
            "code": source_hash(*TOOLCHAIN_CODE[self.target.toolchain]),
        }
        if self.target.toolchain == TENSORRT:
            settings = self.builder_settings()
            inputs["builder"] = {k: v for k, v in settings.describe().items() if k != "timing_cache"}
            inputs["tensorrt"] = trt_build.installed_version()
        elif self.target.toolchain == NEURON:
            inputs["neuron"] = neuron_build.installed_versions()
        elif self.target.toolchain == TORCH_AOT:
            import torch

            inputs["torch"] = torch.__version__
            inputs["device"] = self.target.device
        return inputs

    def artifact_inputs(self) -> dict[str, str]:
        """What the compiled artifacts were built from, for the compiled manifest."""
        hashes = {f"export/{k}": v for k, v in self.outputs_of(EXPORT).items() if k.endswith((".onnx", ".json"))}
        hashes.update(self.outputs_of(PRECISION))
        hashes.update(self.outputs_of(OPTIMISED))
        return hashes

    def run_compile(self) -> tuple[list[Path], str]:
        toolchain = self.target.toolchain
        out = self.path(COMPILED)
        manifest = self.export_manifest()
        inputs = self.artifact_inputs()
        with atomic_directory(out) as staging:
            if toolchain == TENSORRT:
                compiled = trt_build.compile_engines(
                    self.target, self.path(OPTIMISED), staging, manifest, self.builder_settings(), inputs
                )
            elif toolchain == NEURON:
                compiled = neuron_build.compile_buckets(
                    self.target,
                    self.path(OPTIMISED),
                    staging,
                    manifest,
                    self.precision,
                    self.options.checkpoint,
                    inputs,
                    workdir=self.path(CACHE) / "neuronx-cc",
                )
            elif toolchain == TORCH_AOT:
                from tandem.compiler import torch_aot

                compiled = torch_aot.compile_packages(self.target, self.path(OPTIMISED), staging, manifest, inputs)
            else:  # pragma: no cover
                raise StepFailed(f"no compile step for toolchain {toolchain}")
            compiled.write(staging)
        total = sum(a.size for a in compiled.artifacts)
        return [out], f"{len(compiled.artifacts)} artifacts for {compiled.arch} ({total / 1e6:.1f} MB), manifest {COMPILED}/{COMPILED_MANIFEST}"

    # -- repository -----------------------------------------------------------------------

    def repository_inputs(self) -> dict[str, Any]:
        return {
            "export": self.outputs_of(EXPORT),
            "precision_graphs": self.outputs_of(PRECISION),
            "compiled": self.outputs_of(COMPILED),
            "flavor": self.target.flavor,
            "options": self.options.repository,
            "code": source_hash("tandem.serving", "tandem.compiler.repository", "tandem.compiler.served"),
        }

    def run_repository(self) -> tuple[list[Path], str]:
        try:
            from tandem.serving.repository import write_repository
        except ImportError as exc:
            raise StepFailed(
                f"the Triton model repository writer (tandem.serving.repository) is not available: {exc}"
            ) from exc
        from tandem.compiler.repository import registered_flavors

        out = self.path(REPOSITORY_DIR)
        options = dict(self.options.repository)
        if self.target.toolchain != CPU:
            options["compiled"] = self.path(COMPILED)
        with registered_flavors():
            write_repository(self.graphs_dir(), out, flavor=self.target.flavor, **options)
        return [out], f"Triton repository ({self.target.flavor} flavor) in {out}"

    # -- the whole build ------------------------------------------------------------------

    def steps(self) -> list[Step]:
        t = self.target
        compile_what = {
            CPU: "nothing ahead of time for ONNX Runtime",
            TENSORRT: f"TensorRT engines for {t.arch} ({self.precision})",
            NEURON: f"torch-neuronx artifacts for inf2 ({self.precision} matmuls)",
            TORCH_AOT: f"AOTInductor packages for {t.device}",
        }[t.toolchain]
        optimise_what = {
            CPU: "ONNX Runtime graphs",
            TENSORRT: "ONNX for TensorRT + optimization profiles",
            NEURON: "static-shape bucket plan",
            TORCH_AOT: "torch.export programs",
        }[t.toolchain]
        on_cpu = t.toolchain == CPU
        if t.toolchain not in GRAPH_PRECISION_TOOLCHAINS:
            no_precision_graphs = f"{t.toolchain} compiles from PyTorch and applies {self.precision} itself"
        elif not self.graph_precision:
            no_precision_graphs = "fp32: the validated export is the graph"
        else:
            no_precision_graphs = None
        return [
            Step(EXPORT, f"export {self.config.name} to ONNX and validate against PyTorch", self.export_inputs, self.run_export),
            Step(
                PRECISION,
                f"{self.precision} graphs for {t.toolchain}, checked against fp32 and gated on accuracy",
                self.precision_inputs,
                self.run_precision,
                not_applicable=no_precision_graphs,
            ),
            Step(
                "optimise",
                optimise_what,
                self.optimise_inputs,
                self.run_optimise,
                not_applicable="ONNX Runtime's offline-optimised graphs (*.ort.onnx) were written and validated by the export step"
                if on_cpu
                else None,
            ),
            Step(
                "compile",
                compile_what,
                self.compile_inputs,
                self.run_compile,
                not_applicable="ONNX Runtime compiles graphs when a session loads them; nothing to build ahead of time"
                if on_cpu
                else None,
            ),
            Step("repository", f"Triton model repository ({t.flavor})", self.repository_inputs, self.run_repository),
        ]

    def shapes(self) -> dict[str, Any]:
        """What shapes the target is built for, straight from the stage description."""
        from tandem.stages import graph_specs

        shapes: dict[str, Any] = {}
        for name, spec in graph_specs(self.config).items():
            entry: dict[str, Any] = {"dims": {axis: [r.min, r.opt, r.max] for axis, r in spec.dims.items()}}
            if self.target.toolchain == TENSORRT:
                entry["profile"] = trt_build.graph_profile(spec)
            elif self.target.toolchain == NEURON:
                entry["buckets"] = {axis: neuron_build.axis_buckets(axis, r) for axis, r in spec.dims.items()}
            shapes[name] = entry
        if self.target.toolchain == TENSORRT:
            served = trt_build.served_refinement_plan(self.config)
            shapes[served.graph] = {"dims": shapes["refinement"]["dims"], "profile": served.profile}
        return shapes

    def manifest(self, records: list[StepRecord], passed: bool = False) -> BuildManifest:
        compiled_path = self.path(COMPILED) / COMPILED_MANIFEST
        arch, artifacts, compiled_rel = self.target.arch, [], None
        compiled_ok = any(r.name == "compile" and r.up_to_date for r in records)
        if compiled_ok and compiled_path.exists():
            compiled = read_compiled_manifest(self.path(COMPILED))
            arch, compiled_rel = compiled.arch, f"{COMPILED}/{COMPILED_MANIFEST}"
            artifacts = [
                {
                    "file": f"{COMPILED}/{a.file}",
                    "sha256": a.sha256,
                    "graph": a.graph,
                    "served": a.served,
                    **({"profile": a.profile} if a.profile else {}),
                    **({"bucket": a.bucket} if a.bucket else {}),
                }
                for a in compiled.artifacts
            ]
        elif self.target.toolchain == CPU and (self.graphs_dir() / MANIFEST_NAME).exists():
            graphs = read_manifest(self.graphs_dir())
            for entry in graphs.graphs.values():
                variants = [graph_files(entry, optimized=False)] + ([graph_files(entry, optimized=True)] if entry.optimized_file else [])
                for file, digest in (pair for variant in variants for pair in variant):
                    if file:
                        artifacts.append({"file": f"{self.graphs_dir().name}/{file}", "sha256": digest, "graph": entry.name, "dims": entry.dims})
        precision_checks = None
        if any(r.name == PRECISION and r.up_to_date for r in records) and (self.path(PRECISION) / MANIFEST_NAME).exists():
            precision_checks = read_manifest(self.path(PRECISION)).precision
        repo_ok = any(r.name == "repository" and r.up_to_date for r in records)
        return BuildManifest(
            target=self.target.name,
            toolchain=self.target.toolchain,
            arch=arch,
            precision=self.precision,
            config=self.config.name,
            config_fingerprint=self.config.fingerprint(),
            machine={"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
            shapes=self.shapes(),
            tool_versions=tool_versions(),
            options={
                "checkpoint": self.options.checkpoint,
                "reuse_export": str(self.options.reuse_export) if self.options.reuse_export else None,
                "repository": self.options.repository,
                **({"builder": self.builder_settings().describe()} if self.target.toolchain == TENSORRT else {}),
            },
            steps=[r.to_json() for r in records],
            artifacts=artifacts,
            precision_checks=precision_checks,
            compiled_manifest=compiled_rel,
            repository=REPOSITORY_DIR if repo_ok else None,
            passed=passed,
        )

    def run(self, stream: TextIO | None = None) -> BuildResult:
        self.out.mkdir(parents=True, exist_ok=True)
        previous = read_build_manifest(self.out)
        records = []
        if previous is not None and previous.target != self.target.name:
            raise TandemError(
                f"{self.out} holds a build for target {previous.target}; build {self.target.name} into another "
                "--out directory (one build directory per target)"
            )
        if previous is not None:
            records = [StepRecord.from_json(s) for s in previous.steps]
        self.runner = StepRunner(
            self.out,
            previous=records,
            force=self.options.force,
            stream=stream if stream is not None else sys.stdout,
            on_record=lambda recs: self.manifest(recs).write(self.out),  # CI sees progress as it happens
        )
        records = self.runner.run(self.steps())
        passed = all(r.status != FAILED for r in records)
        manifest = self.manifest(records, passed=passed)
        manifest.write(self.out)
        return BuildResult(self.out, self.target, records, manifest)


def run_build(
    config: ModelConfig, target: str | Target, out: str | Path, options: BuildOptions | None = None, stream: TextIO | None = None
) -> BuildResult:
    target = get_target(target) if isinstance(target, str) else target
    return Build(config, target, Path(out), options or BuildOptions()).run(stream)
