"""A build folder (``tandem build --out DIR``): its manifest and the sub-folders its steps write.

    <out>/build_manifest.json   the build: target, arch, precision, tool versions, every step's status,
                                input hash and output hashes, the artifacts with their shapes
    <out>/export/               ONNX graphs validated against PyTorch (tandem.export), manifest.json
    <out>/precision/            <graph>.<precision>.onnx: the precision in the graph, an export's layout
    <out>/optimised/            what the compiler reads (TensorRT-ready ONNX, Neuron buckets, torch.export programs)
    <out>/compiled/             compiled artifacts + manifest.json (tandem.formats.compiled_manifest)
    <out>/model_repository/     the Triton model repository
    <out>/cache/                TensorRT timing cache, neuronx-cc work directories (never hashed)

``tandem build`` writes it (tandem.compiler.core); deploy, bench and the folder resolver read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tandem.util import atomic_write_text

BUILD_MANIFEST = "build_manifest.json"
FORMAT_VERSION = 1
# Sub-folders of a build folder (each is also the name of the step that writes it, repository apart).
EXPORT_DIR, PRECISION_DIR, OPTIMISED_DIR, COMPILED_DIR, REPOSITORY_DIR, CACHE_DIR = (
    "export",
    "precision",
    "optimised",
    "compiled",
    "model_repository",
    "cache",
)


class BuildManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    target: str
    toolchain: str
    arch: str | None
    precision: str
    config: str
    config_fingerprint: str
    machine: dict[str, str]
    tool_versions: dict[str, str | None]
    options: dict[str, Any]
    shapes: dict[str, Any] = {}  # per graph: dynamic dims [min, opt, max] and the profile or buckets compiled
    steps: list[dict[str, Any]]
    artifacts: list[dict[str, Any]] = []  # file, sha256, graph, profile / bucket
    precision_checks: dict[str, Any] | None = None  # the precision step's report (tandem.compiler.precision_gate)
    compiled_manifest: str | None = None
    repository: str | None = None
    passed: bool = False

    def write(self, out: Path) -> Path:
        path = out / BUILD_MANIFEST
        atomic_write_text(path, json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path


def read_build_manifest(out: Path) -> BuildManifest | None:
    path = Path(out) / BUILD_MANIFEST
    if not path.exists():
        return None
    try:
        return BuildManifest.model_validate(json.loads(path.read_text()))
    except ValueError:
        return None  # unreadable: every step runs again
