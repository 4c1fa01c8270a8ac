"""The manifest written next to exported artifacts: what was built, from what, and how well it
matches PyTorch. Runtimes read it to find and verify graphs before loading them."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ValidationError

from tandem.config import ModelConfig
from tandem.errors import ArtifactError
from tandem.util import atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 3  # 2: per-layer cache tensors (past_key_{l}, new_key_{l}, present_key_{l}); 3: sampling in the prefill and decode graphs
# ONNX Runtime's graph (`<graph>.ort.onnx`, `optimized_file`) is the plain graph exported again with these
# rewrites (tandem.export.rewrites) where they change it, then optimised offline by ONNX Runtime.
ONNXRUNTIME_GRAPH_REWRITES = ("moe_kernel",)


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
    external_data: list[str] = []  # weight files beside `file` (graphs over EXTERNAL_DATA_THRESHOLD), relative names
    external_data_sha256: dict[str, str] = {}  # file -> sha256 of every external_data file
    optimized_file: str | None = None  # ONNX Runtime's graph: its rewrites (tandem.export.rewrites), optimised offline
    optimized_sha256: str | None = None
    optimized_external_data: list[str] = []  # weight files beside `optimized_file`
    optimized_external_data_sha256: dict[str, str] = {}
    optimized_rewrites: list[str] = []  # the rewrites that made it differ from `file` beyond optimisation
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    dims: dict[str, list[int]]  # name -> [min, opt, max]
    opset: int
    atol: float
    rtol: float
    validation: list[ValidationCase]
    optimized_validation: list[ValidationCase] = []  # the same cases run on `optimized_file`
    passed: bool


class GenerationCheck(BaseModel):
    variant: str = "onnxruntime"  # "onnxruntime" (the optimised graphs) or "plain" (the standard-op graphs)
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
    generation: GenerationCheck | None = None  # the ONNX Runtime graphs over VALIDATION_PROMPTS
    generation_checks: list[GenerationCheck] = []  # every variant at batch 1 and the largest batch
    # Set in a precision directory (tandem.compiler.precision_gate.PrecisionReport): the graphs'
    # precision, their checks against fp32 and the accuracy gate's figures. None in an fp32 export.
    precision: dict[str, Any] | None = None
    # sha256 of what the export was made from (config, weights, code, tool versions): a `tandem export`
    # with the same inputs and intact files is skipped (tandem.export.onnx_export.up_to_date).
    inputs_sha256: str | None = None
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
    if manifest.config.fingerprint() != manifest.config_fingerprint:
        # The graphs were exported and validated for the config the fingerprint names; an edited
        # config (codebook, grid, prompt length) would load and then fail or generate out of range.
        raise ArtifactError(
            f"the config in {path} does not match its config_fingerprint: it was edited after the export; "
            "export again rather than editing the manifest"
        )
    return manifest


def artifact_path(directory: str | Path, file: str) -> Path:
    """The file a manifest names, confined to its folder: a relative path without ``..``, no
    component a symlink (a link inside the folder may point anywhere), resolving inside
    ``directory``. Nothing in an export is trusted because tandem wrote it: a crafted manifest must
    not reach files outside the folder, nor place files outside a repository version folder."""
    directory = Path(directory)
    pure = PurePosixPath(file) if isinstance(file, str) else None
    if (
        pure is None
        or not file
        or "\\" in file
        or "\x00" in file
        or pure.is_absolute()
        or any(part in ("..", ".", "") for part in file.split("/"))
    ):
        raise ArtifactError(
            f"the manifest in {directory} names the file {file!r}, which is not a plain relative path inside the export; "
            "refusing to read it (a tampered export?): export again"
        )
    path = directory
    for part in pure.parts:
        path = path / part
        if path.is_symlink():
            raise ArtifactError(
                f"artifact {path} is a symbolic link; exports hold regular files only, refusing to follow it "
                "(a tampered export?): export again"
            )
    root = directory.resolve()
    if not path.resolve().is_relative_to(root):
        raise ArtifactError(f"artifact {file!r} resolves outside {directory}; refusing to read it: export again")
    return path


def verify_file(directory: Path, file: str, expected_sha256: str) -> Path:
    """Refuse a missing, modified or out-of-folder artifact before any runtime tries to parse it."""
    path = artifact_path(directory, file)
    if not path.is_file():
        raise ArtifactError(f"artifact {path} listed in the manifest is missing; export again")
    if not expected_sha256:
        raise ArtifactError(f"the manifest records no sha256 for {path}; it cannot be checked and will not be loaded: export again")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ArtifactError(
            f"artifact {path} is corrupt or was modified (sha256 {actual[:12]}..., manifest says "
            f"{expected_sha256[:12]}...); export again"
        )
    return path


def graph_files(entry: GraphEntry, optimized: bool) -> list[tuple[str, str]]:
    """(file, sha256) of every file one graph loads from: its .onnx (or ONNX Runtime's optimised
    copy) first, then its external-data files."""
    if optimized and entry.optimized_file:
        main = [(entry.optimized_file, entry.optimized_sha256 or "")]
        return main + [(f, entry.optimized_external_data_sha256.get(f, "")) for f in entry.optimized_external_data]
    return [(entry.file, entry.sha256)] + [(f, entry.external_data_sha256.get(f, "")) for f in entry.external_data]


def verify_graph_files(directory: str | Path, entry: GraphEntry, optimized: bool) -> list[str]:
    """Names of the files one graph loads from (its .onnx, or ORT's optimised copy, plus external
    data), each confined to ``directory`` and checked against its recorded sha256."""
    files = graph_files(entry, optimized)
    for file, digest in files:
        verify_file(Path(directory), file, digest)
    return [file for file, _ in files]
