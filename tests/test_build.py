"""`tandem build`: the step runner, every target up to its toolchain call, build manifests, and the
CPU build served by a real tritonserver.

TensorRT and the Neuron compiler cannot be installed here and no GPU is present: those builds are
tested up to the toolchain call (profiles, buckets, manifests, configs, refusal of mismatched
artifacts); the toolchain calls themselves are skipped with the reason."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tandem.compiler.core import BuildOptions, run_build
from tandem.formats.targets import get_target
from tandem.formats.build_manifest import BUILD_MANIFEST
from tandem.compiler.steps import FAILED, OK, SKIPPED, Step, StepFailed, StepRunner
from tandem.config import ModelConfig
from tandem.errors import TandemError, ToolchainMissingError
from tandem.util import sha256_file

HAS_TENSORRT = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode == 0
HAS_NEURON = subprocess.run([sys.executable, "-c", "import torch_neuronx"], capture_output=True).returncode == 0
NO_TENSORRT = "TensorRT 11 is not installed here (it needs an NVIDIA GPU): the engine build is not run"
GATE = 8  # held-out captions the precision gate generates from in these tests (tiny: fast)
NO_NEURON = "torch-neuronx / neuronx-cc (AWS Neuron SDK) are not installed here: the Neuron compile is not run"


def tandem_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True)


def statuses(result) -> list[str]:
    return [r.status for r in result.records]


# ----------------------------------------------------------------------------- step runner


def _file_step(name: str, root: Path, content: dict, calls: list, fail: bool = False) -> Step:
    def run():
        calls.append(name)
        if fail:
            raise StepFailed(f"{name} broke: fix the input")
        path = root / f"{name}.txt"
        path.write_text(content["text"])
        return [path], f"wrote {path.name}"

    return Step(name, f"write {name}", lambda: {"text": content["text"]}, run)


def test_runner_skips_unchanged_steps_and_reruns_what_changed(tmp_path: Path):
    content, calls = {"text": "v1"}, []
    steps = lambda: [_file_step("a", tmp_path, content, calls), _file_step("b", tmp_path, content, calls)]  # noqa: E731
    first = StepRunner(tmp_path, stream=io.StringIO()).run(steps())
    assert [r.status for r in first] == [OK, OK] and calls == ["a", "b"]
    assert first[0].outputs == {"a.txt": sha256_file(tmp_path / "a.txt")}

    log = io.StringIO()
    second = StepRunner(tmp_path, previous=first, stream=log).run(steps())
    assert [r.status for r in second] == [SKIPPED, SKIPPED] and calls == ["a", "b"]
    assert "inputs unchanged" in second[0].reason and "[1/2] a" in log.getvalue()
    # A skipped-as-unchanged record still counts as up to date on the run after.
    third = StepRunner(tmp_path, previous=second, stream=io.StringIO()).run(steps())
    assert [r.status for r in third] == [SKIPPED, SKIPPED]

    (tmp_path / "b.txt").write_text("tampered")  # an output modified since: that step runs again
    fourth = StepRunner(tmp_path, previous=third, stream=io.StringIO()).run(steps())
    assert [r.status for r in fourth] == [SKIPPED, OK] and calls[-1] == "b"

    content["text"] = "v2"  # changed inputs: both run
    fifth = StepRunner(tmp_path, previous=fourth, stream=io.StringIO()).run(steps())
    assert [r.status for r in fifth] == [OK, OK]
    forced = StepRunner(tmp_path, previous=fifth, force=True, stream=io.StringIO()).run(steps())
    assert [r.status for r in forced] == [OK, OK]


def test_runner_failure_skips_later_steps_with_the_reason(tmp_path: Path):
    calls: list = []

    def crash():
        raise ValueError("a bug")

    steps = [
        _file_step("a", tmp_path, {"text": "x"}, calls, fail=True),
        _file_step("b", tmp_path, {"text": "x"}, calls),
    ]
    log = io.StringIO()
    records = StepRunner(tmp_path, stream=log).run(steps)
    assert [r.status for r in records] == [FAILED, SKIPPED] and calls == ["a"]
    assert records[0].reason == "a broke: fix the input"
    assert records[1].reason == "not run: step 'a' failed"
    assert "[1/2] a           FAILED" in log.getvalue()
    crashed = StepRunner(tmp_path, stream=io.StringIO()).run([Step("c", "crash", dict, crash)])
    assert crashed[0].status == FAILED and "unexpected error: ValueError: a bug" in crashed[0].reason


# ----------------------------------------------------------------------------- the CPU build, end to end


@pytest.mark.server
def test_cpu_build_from_scratch_is_servable_and_a_rerun_skips_every_step(tmp_path: Path):
    from tandem.config import load_config
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime
    from tandem.serving.client import generate_remote
    from tandem.serving.repository import parse_config
    from tandem.serving.server import TritonServer

    out = tmp_path / "tiny-cpu"
    result = tandem_cli("build", "--config", "configs/models/tiny.yaml", "--target", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (
        "[1/5] export      OK", "[2/5] precision   SKIPPED", "[3/5] optimise    SKIPPED", "[4/5] compile     SKIPPED", "[5/5] repository  OK"
    ):
        assert line in result.stdout

    manifest = json.loads((out / BUILD_MANIFEST).read_text())
    assert manifest["passed"] and manifest["target"] == "cpu" and manifest["arch"] == "cpu"
    assert manifest["tool_versions"]["onnxruntime"] and manifest["tool_versions"]["tensorrt"] is None
    assert [s["status"] for s in manifest["steps"]] == ["ok", "skipped", "skipped", "skipped", "ok"]
    assert all(len(s["inputs_sha256"]) == 64 for s in manifest["steps"] if s["status"] == "ok")
    assert {a["graph"] for a in manifest["artifacts"]} == {"reasoning_prefill", "reasoning_decode", "reasoning_verify", "refinement"}
    for artifact in manifest["artifacts"]:  # output hashes in the manifest are the files' hashes
        assert sha256_file(out / artifact["file"]) == artifact["sha256"]
        assert artifact["dims"]["batch"] == [1, 1, 8]
    assert parse_config(out / "model_repository" / "reasoning" / "config.pbtxt").backend == "python"

    # Servable: a real tritonserver returns exactly the in-process tokens.
    prompt = "a red circle above a blue square"
    expected = Pipeline(make_runtime("onnxruntime", artifacts=out / "export")).generate(prompt, seed=1)
    with TritonServer(out / "model_repository", startup_timeout=120) as server:
        tokens, image = generate_remote(server.grpc_url, prompt, 1, 0.0, 0)
    np.testing.assert_array_equal(tokens, expected.tokens)
    np.testing.assert_array_equal(image, expected.image)

    # Re-run in-process: every step is skipped (inputs unchanged), no new repository version.
    log = io.StringIO()
    again = run_build(load_config("tiny"), "cpu", out, BuildOptions(repository={"max_batch_size": 8, "instances": 1}), stream=log)
    assert again.passed and statuses(again) == [SKIPPED] * 5
    assert again.records[0].reason.startswith("inputs unchanged") and again.records[4].reason.startswith("inputs unchanged")
    assert sorted(p.name for p in (out / "model_repository" / "reasoning").iterdir()) == ["1", "config.pbtxt"]

    # Other repository options change the repository step's inputs only: the export is not redone.
    changed = run_build(load_config("tiny"), "cpu", out, BuildOptions(repository={"max_batch_size": 4, "instances": 1}), stream=log)
    assert statuses(changed) == [SKIPPED, SKIPPED, SKIPPED, SKIPPED, OK]
    assert parse_config(out / "model_repository" / "reasoning" / "config.pbtxt").max_batch_size == 4


def test_one_build_directory_per_target(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    out = tmp_path / "b"
    run_build(tiny_config, "h100", out, BuildOptions(precision="fp32", reuse_export=tiny_artifacts), stream=io.StringIO())
    with pytest.raises(TandemError, match="holds a build for target h100"):
        run_build(tiny_config, "inf2", out, BuildOptions(reuse_export=tiny_artifacts), stream=io.StringIO())


def test_reused_export_must_match_the_config(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    other = tiny_config.model_copy(update={"seed": 1})
    result = run_build(other, "cpu", tmp_path / "b", BuildOptions(reuse_export=tiny_artifacts), stream=io.StringIO())
    assert statuses(result) == [FAILED, SKIPPED, SKIPPED, SKIPPED, SKIPPED]
    assert "pass the matching --config" in result.records[0].reason


# ----------------------------------------------------------------------------- TensorRT up to the toolchain call


@pytest.fixture(scope="module")
def h100_build(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path, tiny_config: ModelConfig):
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed: the build would go past the toolchain call")
    out = tmp_path_factory.mktemp("h100") / "tiny-h100"
    return run_build(tiny_config, "h100", out, BuildOptions(reuse_export=tiny_artifacts, gate_captions=GATE), stream=io.StringIO())


def test_h100_build_runs_up_to_tensorrt_and_stops_there(h100_build, tiny_config: ModelConfig):
    out = h100_build.out
    assert not h100_build.passed and statuses(h100_build) == [OK, OK, OK, FAILED, SKIPPED]
    reason = h100_build.records[3].reason
    assert "TensorRT is not installed" in reason and "pip install 'tensorrt>=11" in reason and "sm90" in reason
    assert "fp16 graphs TensorRT would build from were written to" in reason and str(out) in reason
    assert not (out / "compiled").exists() and not list(out.rglob("*.plan"))  # nothing pretends to be an engine
    from tandem.errors import ArtifactError
    from tandem.runtimes import make_runtime

    with pytest.raises(ArtifactError, match="failed at step 'compile': TensorRT is not installed"):
        make_runtime("tensorrt", artifacts=out)
    manifest = json.loads((out / BUILD_MANIFEST).read_text())
    assert not manifest["passed"] and manifest["arch"] == "sm90" and manifest["precision"] == "fp16"
    assert manifest["options"]["builder"]["network"].startswith("strongly typed") and "precision_flags" not in manifest["options"]["builder"]
    assert manifest["precision_checks"]["precision"] == "fp16" and manifest["precision_checks"]["passed"]
    assert manifest["options"]["builder"]["builder_optimization_level"] == 3
    prefill = manifest["shapes"]["reasoning_prefill"]
    assert prefill["dims"]["prompt_len"] == [3, 32, tiny_config.reasoning.max_prompt_len]
    assert prefill["profile"]["max"]["input_ids"] == [8, tiny_config.reasoning.max_prompt_len]


def test_tensorrt_profiles_come_from_the_stage_description(h100_build, tiny_config: ModelConfig):
    from tandem.stages import graph_specs

    optimised = h100_build.out / "optimised"
    profiles = json.loads((optimised / "profiles.json").read_text())
    specs = graph_specs(tiny_config)
    for name, spec in specs.items():
        for which in ("min", "opt", "max"):
            assert profiles[name]["profile"][which] == {k: list(v) for k, v in spec.profile(which).items()}
    r = tiny_config.reasoning
    assert profiles["reasoning_prefill"]["profile"]["min"]["input_ids"] == [1, 3]
    assert profiles["reasoning_prefill"]["profile"]["max"]["input_ids"] == [8, r.max_prompt_len]
    for layer in range(r.n_layers):
        for kind in ("key", "value"):
            assert profiles["reasoning_decode"]["profile"]["max"][f"past_{kind}_{layer}"] == [8, r.n_heads, tiny_config.max_len, r.head_dim]
    served = profiles["refinement_served"]
    assert served["served"] and served["profile"]["max"] == {"scene_tokens": [8, tiny_config.scene.num_tokens]}
    assert [t["dtype"] for t in served["inputs"]] == ["int32"]
    from tandem.compiler.tensorrt_moe import PLUGIN_NAMESPACE
    from tandem.compiler.expert_reads import unrouted_onnx_reads

    for entry in profiles.values():  # what TensorRT's parser will read: standard ops, checked interfaces
        model = onnx.load(str(optimised / entry["onnx"]))
        onnx.checker.check_model(model)
        if entry["stage"] == "reasoning":  # standard ops plus the routed MoE plugins, which read only routed experts
            assert {n.domain for n in model.graph.node} == {"", PLUGIN_NAMESPACE}
            assert unrouted_onnx_reads(model) == []
        else:
            assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert [i.name for i in model.graph.input] == [t["name"] for t in entry["inputs"]]


def test_tensorrt_precision_rules(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    with pytest.raises(TandemError, match="compute capability 8.9"):
        run_build(tiny_config, "a100", tmp_path / "a", BuildOptions(precision="fp8"), stream=io.StringIO())
    with pytest.raises(TandemError, match="not available for target cpu"):
        run_build(tiny_config, "cpu", tmp_path / "c", BuildOptions(precision="fp16"), stream=io.StringIO())
    # fp8 Q/DQ on the untrained tiny model is far from fp32: the precision step refuses it before TensorRT.
    options = BuildOptions(precision="fp8", reuse_export=tiny_artifacts, gate_captions=GATE)
    fp8 = run_build(tiny_config, "h100", tmp_path / "h", options, stream=io.StringIO())
    assert statuses(fp8) == [OK, FAILED, SKIPPED, SKIPPED, SKIPPED]
    assert "fp8 graphs for tensorrt refused" in fp8.records[1].reason and "--accept-accuracy-loss" in fp8.records[1].reason
    assert not (tmp_path / "h" / "precision").exists()


def test_cli_accelerator_build_checks_the_toolchain_before_any_step(tmp_path: Path, tiny_artifacts: Path):
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed here")
    out = tmp_path / "a100"
    result = tandem_cli("build", "--config", "tiny", "--target", "a100", "--out", str(out), "--artifacts", str(tiny_artifacts))
    assert result.returncode == 3  # missing toolchain, before exporting or optimising anything
    assert "TensorRT is not installed: pip install" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
    # --no-preflight runs what can run here and fails at the compile step (exit 1: a step failed)
    result = tandem_cli(
        "build", "--config", "tiny", "--target", "a100", "--precision", "fp32", "--out", str(out),
        "--artifacts", str(tiny_artifacts), "--no-preflight",
    )
    assert result.returncode == 1
    assert "[2/5] precision   SKIPPED: fp32" in result.stdout
    assert "[4/5] compile     FAILED" in result.stdout and "[5/5] repository  SKIPPED" in result.stdout
    assert "FAILED at step 'compile': TensorRT is not installed: pip install" in result.stderr


@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT)
@pytest.mark.toolchain
@pytest.mark.gpu
def test_tensorrt_engines_build_and_match_onnxruntime(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    import torch as _torch

    from tandem.formats.targets import TARGETS, sm_arch
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime
    from tandem.sampling import SamplingParams

    arch = sm_arch(_torch.cuda.get_device_capability())
    target = next(name for name, t in TARGETS.items() if t.toolchain == "tensorrt" and t.arch == arch)
    result = run_build(tiny_config, target, tmp_path / "b", BuildOptions(precision="fp32", reuse_export=tiny_artifacts))
    assert result.passed, result.records
    trt = Pipeline(make_runtime("tensorrt", artifacts=tmp_path / "b"))
    ort = Pipeline(make_runtime("onnxruntime", artifacts=tiny_artifacts))
    prompts = ["a red circle above a blue square", "x"]
    np.testing.assert_array_equal(trt.generate_tokens(prompts, SamplingParams()), ort.generate_tokens(prompts, SamplingParams()))


# ----------------------------------------------------------------------------- Neuron up to the toolchain call


def test_inf2_build_plans_buckets_and_stops_at_torch_neuronx(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    if HAS_NEURON:
        pytest.skip("torch-neuronx is installed: the build would go past the toolchain call")
    result = run_build(tiny_config, "inf2", tmp_path / "b", BuildOptions(reuse_export=tiny_artifacts), stream=io.StringIO())
    assert statuses(result) == [OK, SKIPPED, OK, FAILED, SKIPPED]
    assert "compiles from PyTorch" in result.records[1].reason
    assert "torch-neuronx is not installed" in result.records[3].reason and "pip install torch-neuronx" in result.records[3].reason
    assert not (tmp_path / "b" / "compiled").exists()
    shapes = json.loads((tmp_path / "b" / BUILD_MANIFEST).read_text())["shapes"]
    assert shapes["reasoning_prefill"]["buckets"] == {"batch": [1, 2, 4, 8], "prompt_len": [16, 32, 48]}
    plan = json.loads((tmp_path / "b" / "optimised" / "buckets.json").read_text())
    assert plan["axes"]["reasoning_prefill"] == {"batch": [1, 2, 4, 8], "prompt_len": [16, 32, 48]}
    assert plan["axes"]["reasoning_decode"] == {"batch": [1, 2, 4, 8]}
    assert plan["axes"]["reasoning_verify"] == {"batch": [1, 2, 4, 8], "block": [2, 4, 8, 16]}
    assert len(plan["buckets"]) == 4 * 3 + 4 + 4 * 4 + 4
    args = plan["compiler_args"]["reasoning"]
    assert args[args.index("--auto-cast") + 1] == "matmult" and args[args.index("--auto-cast-type") + 1] == "bf16"
    assert args[args.index("--target") + 1] == "inf2"
    prefill = next(b for b in plan["buckets"] if b["graph"] == "reasoning_prefill" and b["dims"] == {"batch": 4, "prompt_len": 32})
    assert prefill["inputs"] == {"input_ids": [4, 32], "prompt_lengths": [4], "temperature": [4], "top_k": [4], "uniform": [4]}
    assert prefill["file"] == "reasoning_prefill.batch4.prompt_len32.bf16.inf2.pt"


def test_neuron_bucket_padding_gives_the_unpadded_result(tiny_config: ModelConfig):
    """The runtime's padding (batch rows, prompt positions) and trimming, run with eager PyTorch at the
    bucket shapes: a whole greedy generation must give exactly the unpadded tokens."""
    from tandem.compiler.neuron import axis_buckets
    from tandem.runtimes.neuron import select_bucket
    from tandem.pipeline import Pipeline
    from tandem.runtimes.neuron import NeuronRuntime, run_bucketed
    from tandem.runtimes.torch_eager import TorchRuntime
    from tandem.sampling import SamplingParams

    eager = TorchRuntime(tiny_config)
    shapes: list[tuple[str, dict]] = []

    class EagerAtBuckets(TorchRuntime):
        """Runs each graph only at the Neuron bucket shapes, through the Neuron runtime's padding
        and the decode engine the Neuron runtime gets (the cache passed through ``run``)."""

        decode_engine = NeuronRuntime.decode_engine

        def run(self, graph, feeds):
            spec = self.specs[graph]
            axes = sorted(spec.dims)
            buckets = [dict(zip(axes, s)) for s in itertools.product(*(axis_buckets(a, spec.dims[a]) for a in axes))]

            def execute(bucket, padded):
                shapes.append((graph, {k: v.shape for k, v in padded.items()}))
                return TorchRuntime.run(self, graph, padded)

            return run_bucketed(spec, feeds, buckets, execute)

    bucketed = EagerAtBuckets(tiny_config, stages=eager.stages)
    prompts = ["a red circle above a blue square", "x", "two green triangles"]  # batch 3 -> bucket 4
    for params in (SamplingParams(), SamplingParams(seed=5, temperature=0.9, top_k=8)):
        expected = Pipeline(eager).generate_tokens(prompts, params)
        np.testing.assert_array_equal(Pipeline(bucketed).generate_tokens(prompts, params), expected)
    prefill_shapes = [s for g, s in shapes if g == "reasoning_prefill"]
    assert prefill_shapes[0]["input_ids"][0] == 4 and prefill_shapes[0]["input_ids"][1] in (16, 32, 48)
    assert {s["past_key_0"][0] for g, s in shapes if g == "reasoning_decode"} == {4}
    assert select_bucket([{"batch": 1}, {"batch": 8}], {"batch": 9}) is None


@pytest.mark.skipif(not HAS_NEURON, reason=NO_NEURON)
@pytest.mark.toolchain
def test_neuron_compile_runs(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    result = run_build(tiny_config, "inf2", tmp_path / "b", BuildOptions(reuse_export=tiny_artifacts))
    assert result.records[3].status == OK, result.records[3].reason


# ----------------------------------------------------------------------------- cuda-torch / cpu-aot


def test_cuda_torch_needs_a_cuda_gpu():
    from tandem.compiler.torch_aot import require_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ToolchainMissingError, match="needs a CUDA GPU") as info:
        require_device(get_target("cuda-torch"))
    assert "--target cpu-aot" in str(info.value)


SLOW = os.environ.get("TANDEM_SLOW_TESTS") == "1"


@pytest.mark.skipif(
    not SLOW,
    reason="AOTInductor compiles C++ kernels with g++ and autotunes its matmuls: about 6 minutes for the tiny config on 2 cores; "
    "set TANDEM_SLOW_TESTS=1 to run the cpu-aot build end to end",
)
@pytest.mark.server
def test_cpu_aot_build_matches_eager_and_serves(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime
    from tandem.sampling import SamplingParams
    from tandem.serving.client import generate_remote
    from tandem.serving.server import TritonServer

    out = tmp_path / "aot"
    result = run_build(tiny_config, "cpu-aot", out, BuildOptions(reuse_export=tiny_artifacts))
    assert result.passed, [(r.name, r.reason) for r in result.records]
    aot, eager = Pipeline(make_runtime("torch_aot", artifacts=out)), Pipeline(make_runtime("torch", config=tiny_config))
    prompts = ["a red circle above a blue square", "x", "two green triangles"]
    np.testing.assert_array_equal(aot.generate_tokens(prompts, SamplingParams()), eager.generate_tokens(prompts, SamplingParams()))
    with TritonServer(out / "model_repository", startup_timeout=180) as server:
        tokens, _ = generate_remote(server.http_url, prompts[0], 0, 0.0, 0)
    np.testing.assert_array_equal(tokens, eager.generate(prompts[0]).tokens)
