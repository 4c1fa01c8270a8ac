"""Compiled-artifact manifests: written and read back as the compile step writes them, and every
refusal a runtime makes before loading (wrong toolchain, GPU architecture, tool version, modified or
missing file, shape outside the compiled profile), plus the repository flavors built from them.

No engine exists here (TensorRT is not installed), so the artifacts these manifests list are the
prepared ONNX graphs under their own names: the checks hash and compare, they never parse."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from tandem.compiler.core import BuildOptions, run_build
from tandem.formats.targets import get_target
from tandem.formats.compiled_manifest import (
    Environment,
    check_compatible,
    check_profile,
    read_compiled_manifest,
)
from tandem.compiler.served import neuron_cores, placement
from tandem.compiler.tensorrt import BuilderSettings, engine_artifact, engines_manifest, read_plans
from tandem.errors import ArtifactError, TandemError, ToolchainMissingError
from tandem.formats.export_manifest import read_manifest
from tandem.runtimes import make_runtime
from tandem.serving.repository import parse_config, write_repository

H100 = Environment(("sm90",), "NVIDIA H100 80GB HBM3", {"tensorrt": "11.4.0"})


@pytest.fixture(scope="module")
def optimised(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path, tiny_config) -> Path:
    """The h100 build up to TensorRT: its optimise step output (prepared ONNX graphs + profiles)."""
    out = tmp_path_factory.mktemp("trt") / "b"
    options = BuildOptions(reuse_export=tiny_artifacts, gate_captions=8)
    result = run_build(tiny_config, "h100", out, options, stream=io.StringIO())
    assert result.records[2].status == "ok", result.records[1].reason + result.records[2].reason
    return out / "optimised"


def write_compiled(directory: Path, optimised: Path, tiny_artifacts: Path, arch: str = "sm90", version: str = "11.4.0") -> Path:
    """A compiled directory with the manifest compile_engines writes, listing the prepared graphs."""
    directory.mkdir(parents=True)
    artifacts = []
    for plan in read_plans(optimised):
        shutil.copy(optimised / plan.onnx_file, directory / plan.onnx_file)
        artifacts.append(engine_artifact(plan, directory, plan.onnx_file))
    target = get_target("h100" if arch == "sm90" else "a100")
    manifest = engines_manifest(
        target, arch, "cuda (test)", BuilderSettings("fp16"), read_manifest(tiny_artifacts), {"optimised": "0" * 64},
        artifacts, {"tensorrt": version, "torch": torch.__version__},
    )
    manifest.write(directory)
    return directory


@pytest.fixture
def compiled(tmp_path: Path, optimised: Path, tiny_artifacts: Path) -> Path:
    return write_compiled(tmp_path / "compiled", optimised, tiny_artifacts)


def test_manifest_records_target_profiles_versions_and_hashes(compiled: Path, tiny_config):
    data = json.loads((compiled / "manifest.json").read_text())
    assert (data["target"], data["toolchain"], data["arch"], data["precision"]) == ("h100", "tensorrt", "sm90", "fp16")
    assert data["pinned"] == ["tensorrt"] and data["tool_versions"]["tensorrt"] == "11.4.0"
    assert data["builder"]["network"].startswith("strongly typed") and data["config_fingerprint"] == tiny_config.fingerprint()
    manifest = read_compiled_manifest(compiled)
    decode = manifest.for_graph("reasoning_decode")[0]
    assert decode.profile["min"]["token_ids"] == [1] and decode.profile["max"]["token_ids"] == [8]
    assert manifest.for_graph("refinement", served=True)[0].inputs[0].dtype == "int32"
    check_compatible(manifest, compiled, "tensorrt", H100)  # the matching machine is accepted


def test_engines_for_sm90_are_refused_on_an_sm80_gpu(compiled: Path):
    manifest = read_compiled_manifest(compiled)
    a100 = Environment(("sm80",), "NVIDIA A100-SXM4-80GB", {"tensorrt": "11.4.0"})
    with pytest.raises(ArtifactError) as info:
        check_compatible(manifest, compiled, "tensorrt", a100)
    message = str(info.value)
    assert "built for sm90" in message and "sm80" in message and "NVIDIA A100-SXM4-80GB" in message
    assert "tandem build --target a100" in message


def test_engines_from_another_tensorrt_version_are_refused(compiled: Path):
    manifest = read_compiled_manifest(compiled)
    for versions, have in (({"tensorrt": "11.3.0"}, "11.3.0"), ({}, "(not installed)")):
        with pytest.raises(ArtifactError, match=rf"built with tensorrt 11\.4\.0 but this machine has tensorrt {re.escape(have)}"):
            check_compatible(manifest, compiled, "tensorrt", Environment(("sm90",), "H100", versions))


def test_modified_missing_or_foreign_artifacts_are_refused(compiled: Path):
    manifest = read_compiled_manifest(compiled)
    with pytest.raises(ArtifactError, match="holds tensorrt artifacts .* load them with the 'tensorrt' runtime"):
        check_compatible(manifest, compiled, "neuron", Environment(("inf2",), "inf2"))
    victim = compiled / manifest.for_graph("reasoning_decode")[0].file
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="corrupt or was modified"):
        check_compatible(manifest, compiled, "tensorrt", H100)
    victim.unlink()
    with pytest.raises(ArtifactError, match="is missing; build again"):
        check_compatible(manifest, compiled, "tensorrt", H100)
    (compiled / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="is corrupt"):
        read_compiled_manifest(compiled)


def test_the_machine_is_described_only_for_artifacts_that_pass_their_hashes(compiled: Path):
    """Runtimes hand check_compatible their machine description as a callable (it imports the
    toolchain): a modified artifact is refused without calling it; intact ones call it once."""
    manifest = read_compiled_manifest(compiled)
    calls: list[int] = []

    def describe() -> Environment:
        calls.append(1)
        return H100

    check_compatible(manifest, compiled, "tensorrt", describe)
    assert calls == [1]
    victim = compiled / manifest.for_graph("reasoning_decode")[0].file
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="corrupt or was modified"):
        check_compatible(manifest, compiled, "tensorrt", describe)
    assert calls == [1]


def test_runtimes_refuse_before_touching_a_toolchain(compiled: Path, tiny_artifacts: Path, tmp_path: Path):
    # Intact engines, but no TensorRT here: the message names the package and the version to install.
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(ToolchainMissingError, match=r"pip install tensorrt==11\.4\.0"):
            make_runtime("tensorrt", artifacts=compiled)
    with pytest.raises(ArtifactError, match="load them with the 'tensorrt' runtime"):
        make_runtime("neuron", artifacts=compiled)
    with pytest.raises(ArtifactError, match=r"is an export \(tandem export\), not compiled artifacts"):
        make_runtime("tensorrt", artifacts=tiny_artifacts)
    victim = compiled / read_compiled_manifest(compiled).for_graph("reasoning_prefill")[0].file
    victim.write_bytes(b"")
    with pytest.raises(ArtifactError, match="corrupt or was modified"):  # hashes are checked before the import
        make_runtime("tensorrt", artifacts=compiled)


def test_shapes_outside_the_compiled_profile_are_refused(compiled: Path, tiny_config):
    from tandem.stages import graph_specs

    decode = read_compiled_manifest(compiled).for_graph("reasoning_decode")[0]
    spec = graph_specs(tiny_config)["reasoning_decode"]
    check_profile(decode, spec.sample_inputs({"batch": 8}))
    too_big = {k: np.concatenate([v, v[:1]]) for k, v in spec.sample_inputs({"batch": 8}).items()}
    with pytest.raises(TandemError, match=r"token_ids has shape \[9\], outside the compiled profile \(min \[1\], max \[8\]\)"):
        check_profile(decode, too_big)


def _aot_manifest(compiled: Path, **update) -> Path:
    """The TensorRT test manifest re-labelled as an AOTInductor build (same files, hashes intact)."""
    manifest = read_compiled_manifest(compiled)
    fields = dict(target="cpu-aot", toolchain="torch_aot", arch="cpu-avx2", device="cpu", precision="fp32",
                  pinned=["torch"], tool_versions={"torch": torch.__version__})
    fields.update(update)
    manifest.model_copy(update=fields).write(compiled)
    return compiled


def test_aot_packages_are_refused_for_another_torch_cpu_isa_or_missing_gpu(compiled: Path):
    from tandem.runtimes.torch_aot import supported_cpu_archs

    assert "cpu-scalar" in supported_cpu_archs()
    with pytest.raises(ArtifactError, match=r"built with torch 2\.0\.0 but this machine has torch .*links against the exact libtorch"):
        make_runtime("torch_aot", artifacts=_aot_manifest(compiled, tool_versions={"torch": "2.0.0"}))
    with pytest.raises(ArtifactError, match="built for cpu-asimd"):  # an ARM build on this x86 machine
        make_runtime("torch_aot", artifacts=_aot_manifest(compiled, arch="cpu-asimd"))
    if not torch.cuda.is_available():
        with pytest.raises(ToolchainMissingError, match="need a CUDA GPU"):
            make_runtime("torch_aot", artifacts=_aot_manifest(compiled, target="cuda-torch", arch="sm90", device="cuda (H100)"))


# ----------------------------------------------------------------------------- repository flavors


@pytest.fixture
def compiled_flavors():
    """Each toolchain's flavor object; the writer's registry is never touched."""
    from tandem.serving.repository import FLAVORS
    from tandem.toolchains import TOOLCHAINS

    before = set(FLAVORS)
    yield {name: toolchain.flavor() for name, toolchain in TOOLCHAINS.items()}
    assert set(FLAVORS) == before


def test_tensorrt_repository_serves_refinement_as_a_tensorrt_plan(compiled: Path, tiny_artifacts: Path, tmp_path: Path, compiled_flavors):
    repo = write_repository(tiny_artifacts, tmp_path / "repo", flavor=compiled_flavors["tensorrt"], compiled=compiled)
    refinement = parse_config(repo / "refinement" / "config.pbtxt")
    served = read_compiled_manifest(compiled).for_graph("refinement", served=True)[0]
    assert refinement.platform == "tensorrt_plan" and refinement.default_model_filename == served.file
    assert dict(refinement.cc_model_filenames) == {"9.0": served.file}
    assert [g.kind for g in refinement.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert (repo / "refinement" / "1" / served.file).read_bytes() == (compiled / served.file).read_bytes()

    reasoning = parse_config(repo / "reasoning" / "config.pbtxt")
    assert reasoning.backend == "python" and reasoning.parameters["runtime"].string_value == "tensorrt"
    assert [g.kind for g in reasoning.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    shipped = read_compiled_manifest(repo / "reasoning" / "1" / "artifacts")
    assert sorted(a.graph for a in shipped.artifacts) == ["reasoning_decode", "reasoning_prefill"]
    assert "tandem.compiler.served.reasoning" in (repo / "reasoning" / "1" / "model.py").read_text()
    check_compatible(shipped, repo / "reasoning" / "1" / "artifacts", "tensorrt", H100)
    assert parse_config(repo / "tandem" / "config.pbtxt").platform == "ensemble"

    # An engine profile narrower than the served max_batch_size is refused.
    manifest = read_compiled_manifest(compiled)
    manifest.for_graph("refinement", served=True)[0].profile["max"]["scene_tokens"][0] = 4
    manifest.write(compiled)
    with pytest.raises(TandemError, match=r"exceeds the engine's profile \(batch <= 4\)"):
        write_repository(tiny_artifacts, tmp_path / "repo2", flavor=compiled_flavors["tensorrt"], compiled=compiled, max_batch_size=8)


def test_neuron_and_aot_repositories_place_instances(compiled: Path, tiny_artifacts: Path, tmp_path: Path, compiled_flavors):
    neuron = read_compiled_manifest(compiled).model_copy(
        update=dict(target="inf2", toolchain="neuron", arch="inf2", device="neuron", pinned=["torch-neuronx"])
    )
    neuron.write(compiled)
    repo = write_repository(tiny_artifacts, tmp_path / "n", flavor=compiled_flavors["neuron"], compiled=compiled, instances=2, neuron_cores_per_instance=2)
    for stage in ("reasoning", "refinement"):
        config = parse_config(repo / stage / "config.pbtxt")
        assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_MODEL, 2)]
        assert config.parameters["neuron_cores_per_instance"].string_value == "2"
        assert config.parameters["runtime"].string_value == "neuron"

    repo = write_repository(tiny_artifacts, tmp_path / "a", flavor=compiled_flavors["torch_aot"], compiled=_aot_manifest(compiled))
    config = parse_config(repo / "reasoning" / "config.pbtxt")
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]  # cpu-aot packages
    with pytest.raises(TandemError, match="pass compiled="):
        write_repository(tiny_artifacts, tmp_path / "x", flavor=compiled_flavors["torch_aot"])


def test_instances_are_pinned_to_their_own_accelerator(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    assert neuron_cores("reasoning_0_0", 1) == "0" and neuron_cores("reasoning_0_3", 2) == "6-7"
    args = {"model_instance_name": "refinement_0_1", "model_instance_kind": "KIND_MODEL"}
    assert placement(args, {"neuron_cores_per_instance": "4"}) == {"env": {"NEURON_RT_VISIBLE_CORES": "4-7"}}
    assert placement({"model_instance_kind": "KIND_GPU", "model_instance_device_id": "1"}, {}) == {"cuda_device": 1}
    assert placement({"model_instance_kind": "KIND_CPU"}, {}) == {}
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "8-11")  # chosen by the operator: left alone
    assert placement(args, {"neuron_cores_per_instance": "4"}) == {}
    with pytest.raises(TandemError, match="instance index"):
        neuron_cores("weird", 1)


def test_compiled_manifest_format_is_checked(compiled: Path):
    data = json.loads((compiled / "manifest.json").read_text())
    data["format_version"] = 99
    (compiled / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version 99"):
        read_compiled_manifest(compiled)
