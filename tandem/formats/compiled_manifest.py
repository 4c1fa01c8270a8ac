"""The manifest of compiled artifacts (``<build>/compiled/manifest.json``) and the checks a runtime
makes before it loads anything.

A compiled directory is self-contained: the runtimes and the Triton repository read only it. Its
manifest records the target, the hardware architecture the artifacts were built for (``sm90``,
``sm80``, ``inf2``, ``cpu-avx2`` ...), precision, tool versions (and which of them a loader must
match exactly), the hashes of the inputs it was built from, the shapes (TensorRT profiles, Neuron
buckets) and the sha256 of every artifact. :func:`check_compatible` refuses a mismatch with a
message that names the problem and the rebuild command, before any toolchain parses a byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from tandem.config import ModelConfig
from tandem.errors import ArtifactError, TandemError
from tandem.formats.export_manifest import TensorEntry, artifact_path
from tandem.formats.targets import TARGETS, describe_arch
from tandem.formats.build_manifest import BUILD_MANIFEST
from tandem.util import atomic_write_text, sha256_file

COMPILED_MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: graphs that sample (export format 3)

# How a pinned tool's version mismatch is explained.
PIN_REASONS = {
    "tensorrt": "a serialized TensorRT engine only deserializes in the TensorRT version that built it",
    "torch": "an AOTInductor package links against the exact libtorch that compiled it",
    "torch-neuronx": "Neuron artifacts are TorchScript modules tied to the torch-neuronx release that traced them",
}


class CompiledArtifact(BaseModel):
    graph: str  # the graph it runs (tandem.stages), e.g. "reasoning_decode"
    stage: str
    file: str  # relative to the compiled directory
    sha256: str
    size: int
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    profile: dict[str, dict[str, list[int]]] | None = None  # TensorRT: {"min"|"opt"|"max": {input: shape}}
    bucket: dict[str, int] | None = None  # Neuron: the static sizes of every dynamic axis
    served: bool = False  # a wire-format model for a native Triton backend, not for tandem's runtimes


class CompiledManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    target: str
    toolchain: str
    arch: str
    device: str
    precision: str
    config: ModelConfig
    config_fingerprint: str
    weights: str
    tool_versions: dict[str, str]
    pinned: list[str]  # tool_versions a loader must match exactly
    inputs: dict[str, str]  # what it was built from: name -> sha256
    builder: dict[str, Any] = {}
    artifacts: list[CompiledArtifact]
    created: str = ""

    def for_graph(self, graph: str, served: bool = False) -> list[CompiledArtifact]:
        return [a for a in self.artifacts if a.graph == graph and a.served == served]

    def write(self, directory: Path) -> Path:
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        path = Path(directory) / COMPILED_MANIFEST
        atomic_write_text(path, json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path


def read_compiled_manifest(directory: str | Path) -> CompiledManifest:
    directory = Path(directory)
    path = directory / COMPILED_MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"compiled artifact directory {directory} does not exist; build it with `tandem build --target TARGET --out DIR`")
    if not path.exists():
        raise ArtifactError(f"{directory} has no {COMPILED_MANIFEST}: {_why_not_compiled(directory)}")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "toolchain" not in data and "graphs" in data:
            raise ArtifactError(
                f"{directory} is an ONNX export, not compiled artifacts; load it with the onnxruntime runtime "
                "or compile it with `tandem build`"
            )
        manifest = CompiledManifest.model_validate(data)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ArtifactError(f"{path} is corrupt ({str(exc).splitlines()[0]}); build again") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.format_version}, this tandem reads {FORMAT_VERSION}; build again")
    return manifest


def failed_build_step(directory: Path) -> str | None:
    """``its build (target T) failed at step 'S': reason`` when ``directory`` is a build folder whose
    build manifest records a failed step; None otherwise."""
    log = Path(directory) / BUILD_MANIFEST
    try:
        build = json.loads(log.read_text())
        failed = next(s for s in build["steps"] if s["status"] == "failed")
        return f"its build (target {build['target']}) failed at step '{failed['name']}': {failed['reason']}"
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def _why_not_compiled(directory: Path) -> str:
    """Point at the failed step when ``directory`` is a build whose compile step did not finish."""
    return failed_build_step(directory) or "it is not a finished `tandem build` output; build again"


@dataclass(frozen=True)
class Environment:
    """What the loading machine offers: the architectures it can run (a GPU's ``smXY``, ``inf2``,
    or the CPU instruction sets it supports) and the installed tool versions."""

    archs: tuple[str, ...]
    description: str
    versions: dict[str, str] = field(default_factory=dict)


def rebuild_hint(manifest: CompiledManifest) -> str:
    target = TARGETS.get(manifest.target)
    if target is not None and target.arch is None:
        return f"rebuild on this machine with `tandem build --target {manifest.target}`"
    return "rebuild with `tandem build --target TARGET` for this machine's hardware, on this machine's toolchain"


def check_toolchain(manifest: CompiledManifest, directory: Path, toolchain: str) -> None:
    if manifest.toolchain != toolchain:
        raise ArtifactError(
            f"{directory} holds {manifest.toolchain} artifacts (target {manifest.target}); "
            f"this is the {toolchain} runtime: load them with the '{manifest.toolchain}' runtime instead"
        )


def verify_artifacts(manifest: CompiledManifest, directory: Path) -> None:
    for artifact in manifest.artifacts:
        verify_artifact(directory, artifact)


def check_environment(manifest: CompiledManifest, directory: Path, env: Environment) -> None:
    """Refuse artifacts built for another architecture or another version of a pinned tool."""
    if manifest.arch not in env.archs:
        here = ", ".join(describe_arch(a) for a in env.archs) or "none"
        raise ArtifactError(
            f"{directory} was built for {describe_arch(manifest.arch)} (target {manifest.target}) but this machine "
            f"offers {here} [{env.description}]; artifacts only run on the architecture they were compiled for: "
            f"{_arch_fix(manifest, env)}"
        )
    for tool in manifest.pinned:
        built, have = manifest.tool_versions.get(tool), env.versions.get(tool)
        if built != have:
            why = PIN_REASONS.get(tool, "the artifacts are tied to the version that built them")
            raise ArtifactError(
                f"{directory} was built with {tool} {built} but this machine has {tool} {have or '(not installed)'}; "
                f"{why}: install {tool}=={built} or {rebuild_hint(manifest)}"
            )


def check_compatible(
    manifest: CompiledManifest, directory: Path, toolchain: str, env: Environment | Callable[[], Environment]
) -> None:
    """Refuse artifacts built for another toolchain, architecture or tool version, or modified since.
    ``env`` may be a callable, called only after every file's hash is checked: a runtime imports its
    toolchain there (to describe this machine), never for artifacts it would refuse anyway."""
    directory = Path(directory)
    check_toolchain(manifest, directory, toolchain)
    verify_artifacts(manifest, directory)
    check_environment(manifest, directory, env() if callable(env) else env)


def verify_artifact(directory: Path, artifact: CompiledArtifact) -> Path:
    path = artifact_path(directory, artifact.file)  # confined to the folder, no symlinks
    if not path.is_file():
        raise ArtifactError(f"artifact {path} listed in {directory / COMPILED_MANIFEST} is missing; build again")
    actual = sha256_file(path)
    if actual != artifact.sha256:
        raise ArtifactError(
            f"artifact {path} is corrupt or was modified (sha256 {actual[:12]}..., manifest says "
            f"{artifact.sha256[:12]}...); it will not be loaded: build again"
        )
    return path


def _arch_fix(manifest: CompiledManifest, env: Environment) -> str:
    if manifest.toolchain == "tensorrt":
        for name, target in TARGETS.items():
            if target.toolchain == "tensorrt" and target.arch in env.archs:
                return f"rebuild with `tandem build --target {name}` on this GPU"
        return "build TensorRT engines on a GPU of the architecture that will run them"
    return rebuild_hint(manifest)


def check_profile(artifact: CompiledArtifact, feeds: Mapping) -> None:
    """Every input shape must lie within the range the artifact was compiled for (a TensorRT
    optimization profile, the dynamic dims of an AOTInductor package)."""
    if artifact.profile is None:
        return
    low, high = artifact.profile["min"], artifact.profile["max"]
    for name, value in feeds.items():
        if name not in low:
            continue
        shape = list(value.shape) if hasattr(value, "shape") else list(np.shape(value))  # numpy or torch
        if len(shape) != len(low[name]) or any(s < lo or s > hi for s, lo, hi in zip(shape, low[name], high[name])):
            raise TandemError(
                f"{artifact.graph}: input {name} has shape {shape}, outside the compiled profile "
                f"(min {low[name]}, max {high[name]}); split the batch or rebuild with a wider range"
            )
