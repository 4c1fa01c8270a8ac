"""The manifest written next to exported artifacts: what was built, from what, and how well it
matches PyTorch. Runtimes read it to find and verify graphs before loading them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tandem.config import ModelConfig
from tandem.errors import ArtifactError
from tandem.util import atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class TensorEntry(BaseModel):
    name: str
    dtype: str
    shape: list[int | str]


class OutputError(BaseModel):
    max_abs: float
    max_rel: float  # max |a - b| / (|b| + atol)
    within_tolerance: bool


class ValidationCase(BaseModel):
    dims: dict[str, int]
    seed: int
    outputs: dict[str, OutputError]
    passed: bool


class GraphEntry(BaseModel):
    name: str
    stage: str
    file: str
    sha256: str
    external_data: list[str] = []
    optimized_file: str | None = None  # ONNX Runtime offline-optimised graph
    optimized_sha256: str | None = None
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    dims: dict[str, list[int]]  # name -> [min, opt, max]
    opset: int
    atol: float
    rtol: float
    validation: list[ValidationCase]
    passed: bool


class GenerationCheck(BaseModel):
    prompts: list[str]
    seed: int
    tokens_equal: bool
    mismatched_tokens: int
    image_max_abs_diff: float  # uint8 images, in [0, 255]
    image_atol: float
    passed: bool


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    config: ModelConfig
    config_fingerprint: str
    weights: str  # "seed:<n>" or "checkpoint:<sha256>"
    versions: dict[str, str]
    graphs: dict[str, GraphEntry]
    generation: GenerationCheck | None = None
    # Set in a precision directory (tandem.compiler.precision_gate.PrecisionReport): the graphs'
    # precision, their checks against fp32 and the accuracy gate's figures. None in an fp32 export.
    precision: dict[str, Any] | None = None
    passed: bool = False

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(
            f"artifact directory {directory} does not exist; build it with "
            f"`tandem export --config configs/models/small.yaml --out {directory}`"
        )
    if not path.exists():
        raise ArtifactError(f"{directory} has no {MANIFEST_NAME}: it is not a finished tandem export; export again")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ArtifactError(f"{path} is corrupt ({str(exc).splitlines()[0]}); export again") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {manifest.format_version}, this tandem reads {FORMAT_VERSION}; export again"
        )
    return manifest


def verify_file(directory: Path, file: str, expected_sha256: str) -> Path:
    """Refuse a missing or modified artifact before any runtime tries to parse it."""
    path = Path(directory) / file
    if not path.exists():
        raise ArtifactError(f"artifact {path} listed in the manifest is missing; export again")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ArtifactError(
            f"artifact {path} is corrupt or was modified (sha256 {actual[:12]}..., manifest says "
            f"{expected_sha256[:12]}...); export again"
        )
    return path
