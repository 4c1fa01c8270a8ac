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

from tandem.compiler.tensorrt import DEFAULT_OPT_LEVEL, DEFAULT_WORKSPACE_GIB
from tandem.formats.compiled_manifest import COMPILED_MANIFEST, read_compiled_manifest
from tandem.compiler.steps import (
    FAILED,
    Step,
    StepFailed,
    StepRecord,
    StepRunner,
    code_hash,
    tree_hashes,
)
from tandem.formats.targets import Target, get_target
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
from tandem.toolchains import TOOLCHAINS, Toolchain, get_toolchain
from tandem.util import atomic_directory, sha256_file

EXPORT, PRECISION, OPTIMISED, COMPILED, CACHE = EXPORT_DIR, PRECISION_DIR, OPTIMISED_DIR, COMPILED_DIR, CACHE_DIR  # step names

@dataclass
class BuildOptions:
    precision: str | None = None
    checkpoint: str | None = None
    reuse_export: Path | None = None  # an existing, validated `tandem export` directory
    force: bool = False
    opt_level: int = DEFAULT_OPT_LEVEL
    workspace_gib: float = DEFAULT_WORKSPACE_GIB
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
    for toolchain in TOOLCHAINS.values():
        versions.update(toolchain.versions())
    return versions


class Build:
    """The steps of one target's build, wired to the build directory."""

    def __init__(self, config: ModelConfig, target: Target, out: Path, options: BuildOptions):
        self.config = config
        self.target = target
        self.out = Path(out)
        self.options = options
        self.precision = target.check_precision(options.precision)
        self.toolchain: Toolchain = get_toolchain(target.toolchain)
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
    def toolchain_module(self) -> str:
        """The module of this build's toolchain object: its code is part of every step it decides."""
        return type(self.toolchain).__module__

    def optimised_dir(self) -> Path:
        return self.path(OPTIMISED)

    def cache_dir(self) -> Path:
        return self.path(CACHE)

    @property
    def graph_precision(self) -> bool:
        """Whether this build writes precision graphs (a non-fp32 precision on a graph toolchain)."""
        return self.toolchain.graph_precision(self.precision)

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
            "code": code_hash("tandem.compiler.precision_gate", self.toolchain_module),  # tests/test_step_keys.py
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
        inputs["code"] = code_hash("tandem.export.onnx_export")
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
            from tandem.export.onnx_export import weights_label

            expected = weights_label(self.config, self.options.checkpoint)
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
            "code": code_hash(self.toolchain_module, *self.toolchain.entry_modules),
        }

    def run_optimise(self) -> tuple[list[Path], str]:
        out = self.path(OPTIMISED)
        with atomic_directory(out) as staging:
            note = self.toolchain.optimise(self, staging)
        return [out], note

    # -- compile --------------------------------------------------------------------------

    def compile_inputs(self) -> dict[str, Any]:
        inputs: dict[str, Any] = {
            "export": self.outputs_of(EXPORT),
            "optimised": self.outputs_of(OPTIMISED),
            "target": self.target.name,
            "precision": self.precision,
            "code": code_hash(self.toolchain_module, *self.toolchain.entry_modules),
        }
        inputs.update(self.toolchain.compile_inputs(self))
        return inputs

    def artifact_inputs(self) -> dict[str, str]:
        """What the compiled artifacts were built from, for the compiled manifest."""
        hashes = {f"export/{k}": v for k, v in self.outputs_of(EXPORT).items() if k.endswith((".onnx", ".json"))}
        hashes.update(self.outputs_of(PRECISION))
        hashes.update(self.outputs_of(OPTIMISED))
        return hashes

    def run_compile(self) -> tuple[list[Path], str]:
        out = self.path(COMPILED)
        inputs = self.artifact_inputs()
        with atomic_directory(out) as staging:
            compiled = self.toolchain.compile(self, staging, inputs)
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
            "code": code_hash("tandem.serving.repository", self.toolchain_module),
        }

    def run_repository(self) -> tuple[list[Path], str]:
        try:
            from tandem.serving.repository import write_repository
        except ImportError as exc:
            raise StepFailed(
                f"the Triton model repository writer (tandem.serving.repository) is not available: {exc}"
            ) from exc
        out = self.path(REPOSITORY_DIR)
        options = dict(self.options.repository)
        flavor = self.toolchain.flavor() or self.target.flavor
        if self.toolchain.compiles_ahead:
            options["compiled"] = self.path(COMPILED)
        write_repository(self.graphs_dir(), out, flavor=flavor, **options)
        return [out], f"Triton repository ({self.target.flavor} flavor) in {out}"

    # -- the whole build ------------------------------------------------------------------

    def steps(self) -> list[Step]:
        t = self.target
        compile_what = self.toolchain.compile_what(t, self.precision)
        optimise_what = self.toolchain.optimise_what(t, self.precision)
        on_cpu = not self.toolchain.compiles_ahead
        if not self.toolchain.precision_rules:
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
            entry.update(self.toolchain.graph_shapes(spec))
            shapes[name] = entry
        shapes.update(self.toolchain.extra_shapes(self, shapes))
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
        elif not self.toolchain.compiles_ahead and (self.graphs_dir() / MANIFEST_NAME).exists():
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
                **self.toolchain.build_options(self),
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
