"""Graphs whose weights go to external-data files (what every graph over 2 GB needs), exercised on
the tiny config with the threshold lowered to zero: export and validation, the manifest's hashes
of every data file, loading, refusal of tampered or out-of-folder files, the build's reuse of an
export, a Triton repository and a live server."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tandem.config import ModelConfig
from tandem.errors import ArtifactError
from tandem.formats.export_manifest import MANIFEST_NAME, graph_files, read_manifest
from tandem.export.onnx_export import EXTERNAL_TENSOR_MIN_BYTES, ExportResult, export_model
from tandem.pipeline import Pipeline
from tandem.runtimes import make_runtime
from tandem.serving.interface import REASONING, REFINEMENT
from tandem.util import sha256_file

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def external_export(tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelConfig) -> ExportResult:
    return export_model(tiny_config, tmp_path_factory.mktemp("external") / "tiny", progress=False, external_threshold=0)


def copy_export(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_every_graph_and_optimised_copy_keeps_its_weights_in_hashed_data_files(external_export: ExportResult):
    out, manifest = external_export.out, external_export.manifest
    assert manifest.passed and all(e.passed for e in manifest.graphs.values())
    assert all(check.tokens_equal for check in manifest.generation_checks)
    listed = {MANIFEST_NAME}
    for entry in manifest.graphs.values():
        assert entry.external_data == [f"{entry.file}.data"]
        assert entry.optimized_external_data == [f"{entry.optimized_file}.data"]
        for optimized in (False, True):
            files = graph_files(entry, optimized)
            for file, digest in files:
                assert "/" not in file and sha256_file(out / file) == digest
            listed.update(file for file, _ in files)
        # Every weight of some size lives in the data file, none inline in the protobuf.
        for file in (entry.file, entry.optimized_file):
            graph = onnx.load(str(out / file), load_external_data=False)
            inline = [t.name for t in graph.graph.initializer if len(t.raw_data) > EXTERNAL_TENSOR_MIN_BYTES]
            external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            assert inline == [] and external, file
    assert {p.name for p in out.iterdir()} == listed  # nothing unlisted left behind (scratch copies)


def test_external_data_graphs_load_and_generate_like_the_inline_export(external_export: ExportResult, tiny_artifacts: Path):
    inline = Pipeline(make_runtime("onnxruntime", artifacts=tiny_artifacts)).generate(PROMPT, seed=5, temperature=0.9)
    for optimized in (True, False):
        from tandem.runtimes.onnxruntime import OnnxRuntime

        result = Pipeline(OnnxRuntime(external_export.out, optimized=optimized)).generate(PROMPT, seed=5, temperature=0.9)
        assert np.array_equal(result.tokens, inline.tokens)
        assert np.array_equal(result.image, inline.image)


def test_a_modified_or_missing_data_file_is_refused_before_loading(tmp_path: Path, external_export: ExportResult):
    modified = copy_export(external_export.out, tmp_path / "modified")
    data = modified / "reasoning_decode.ort.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="reasoning_decode.ort.onnx.data is corrupt or was modified"):
        make_runtime("onnxruntime", artifacts=modified)
    (modified / "reasoning_decode.ort.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="reasoning_decode.ort.onnx.data listed in the manifest is missing"):
        make_runtime("onnxruntime", artifacts=modified)


def test_a_manifest_naming_a_data_file_outside_the_export_is_refused(tmp_path: Path, external_export: ExportResult):
    tampered = copy_export(external_export.out, tmp_path / "export" / "tampered")
    outside = tmp_path / "export" / "outside.data"
    shutil.copy2(tampered / "refinement.ort.onnx.data", outside)
    manifest = json.loads((tampered / MANIFEST_NAME).read_text())
    entry = manifest["graphs"]["refinement"]
    entry["optimized_external_data"] = ["../outside.data"]
    entry["optimized_external_data_sha256"] = {"../outside.data": sha256_file(outside)}
    (tampered / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside"):
        make_runtime("onnxruntime", artifacts=tampered)


def test_build_copies_the_data_files_into_a_repository_that_serves_them(
    tmp_path: Path, external_export: ExportResult, tiny_config: ModelConfig
):
    from tandem.compiler.core import BuildOptions, run_build
    from tandem.serving.client import generate_remote
    from tandem.serving.server import TritonServer

    out = tmp_path / "build"
    result = run_build(tiny_config, "cpu", out, BuildOptions(reuse_export=external_export.out), stream=io.StringIO())
    assert result.passed, [(r.name, r.status, r.reason) for r in result.records]
    # The build's copy of the export holds every file the manifest names, byte for byte, and its
    # own manifest lists the data files with their hashes.
    copied = read_manifest(out / "export")
    for entry in copied.graphs.values():
        for file, digest in (*graph_files(entry, False), *graph_files(entry, True)):
            assert sha256_file(out / "export" / file) == digest
    listed = {a["file"] for a in result.manifest.artifacts}
    assert "export/reasoning_decode.ort.onnx.data" in listed and "export/refinement.onnx.data" in listed

    shipped = out / "model_repository" / REASONING / "1" / "artifacts"
    assert sorted(p.name for p in shipped.iterdir()) == [
        MANIFEST_NAME,
        "reasoning_decode.ort.onnx",
        "reasoning_decode.ort.onnx.data",
        "reasoning_prefill.ort.onnx",
        "reasoning_prefill.ort.onnx.data",
    ]
    assert (out / "model_repository" / REFINEMENT / "1").is_dir()
    expected = Pipeline(make_runtime("onnxruntime", artifacts=external_export.out)).generate(PROMPT, seed=3, temperature=0.8)
    with TritonServer(out / "model_repository", startup_timeout=120) as server:
        tokens, image = generate_remote(server.http_url, PROMPT, 3, 0.8, 0)
    assert np.array_equal(tokens, expected.tokens)
    assert np.array_equal(image, expected.image)


SLOW = os.environ.get("TANDEM_SLOW_TESTS") == "1"


@pytest.mark.skipif(not SLOW, reason="set TANDEM_SLOW_TESTS=1 to export, validate and serve the medium config (3 GB graphs, ~12 GiB RAM, tens of minutes)")
def test_medium_export_past_2gb_is_validated_and_served(tmp_path: Path):
    """The medium config's reasoning graphs (0.81B parameters, 3.2 GB in fp32) cannot be one
    protobuf: exported with external data, validated against PyTorch (graphs and greedy tokens),
    shipped in a repository and served, as benchmarks/results/export-medium records."""
    from tandem.config import load_config
    from tandem.memory import available_memory, export_memory_estimate
    from tandem.bench.export_record import record_export

    estimate = export_memory_estimate(load_config("medium"))
    if estimate.peak_bytes > (available_memory() or 0):
        pytest.skip(f"the medium export needs about {estimate.peak_bytes / 2**30:.1f} GiB free")
    record = record_export("medium", tmp_path)
    assert record["export"]["returncode"] == 0, record["export"].get("output_tail")
    assert record["export"]["passed"]
    for name in ("reasoning_prefill", "reasoning_decode"):
        graph = record["export"]["graphs"][name]
        assert graph["external_data"] == [f"{name}.onnx.data"] and graph["optimized_external_data"] == [f"{name}.ort.onnx.data"]
        assert record["export"]["files"][f"{name}.onnx.data"] > 2**31  # past protobuf's limit
    assert all(g["tokens_equal"] for g in record["export"]["generation_checks"])
    assert record["serve"]["passed"]
    assert record["export"]["peak_rss_bytes"] <= estimate.peak_bytes  # the pre-flight figure is an upper bound
