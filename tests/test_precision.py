"""The precision step on the tiny config: graphs with the precision in them, checked against
PyTorch fp32 and gated; a deliberately bad quantization is refused and writes nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tandem.compiler.core import BuildOptions, run_build
from tandem.compiler.precision import (
    quantize_cpu_int8,
    sensitive_nodes,
)
from tandem.compiler.precision_gate import (
    AccuracyCheck,
    GenerationCheck,
    PrecisionRefused,
    PrecisionReport,
    gate,
    make_precision_graphs,
    read_precision_report,
)
from tandem.compiler.steps import OK
from tandem.toolchains import get_toolchain
from tandem.config import ModelConfig
from tandem.errors import TandemError
from tandem.formats.export_manifest import read_manifest
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.stages import NEXT_TOKENS, graph_specs

GATE = 8  # held-out captions the gate generates from here (the build default is every one)


@pytest.fixture(scope="module")
def fp16_graphs(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "precision"
    make_precision_graphs(tiny_artifacts, out, "tensorrt", "fp16", captions=GATE)
    return out


def test_fp16_graphs_keep_sensitive_ops_in_fp32_and_pass_the_gate(fp16_graphs: Path, tiny_artifacts: Path):
    report = read_precision_report(fp16_graphs)
    assert report is not None and report.passed and report.precision == "fp16" and not report.refusals
    manifest = read_manifest(fp16_graphs)
    for name, check in report.graphs.items():
        assert check.file == f"{name}.fp16.onnx" and manifest.graphs[name].file == check.file
        assert check.validated_with.startswith("onnxruntime") and check.max_output_error <= check.tolerance
        model = onnx.load(str(fp16_graphs / check.file))
        initializer_types = {i.data_type for i in model.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in initializer_types  # the precision is in the graph
        # Graph inputs and outputs keep the stage description's types (the served interface).
        outputs = graph_specs(manifest.config)[name].outputs
        assert [i.type.tensor_type.elem_type for i in model.graph.output] == [
            onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)) for t in outputs
        ]
    kept = report.graphs["reasoning_decode"].rewrite["kept_fp32"]
    reasons = set(kept.values())
    assert {"normalisation", "softmax / top-k", "MoE router (feeds softmax -> top-k)", "writes a graph output (sampling logits)"} <= reasons
    assert report.generation.captions == GATE and report.generation.token_agreement >= 0.98
    assert "cannot hold synthetic scenes" in report.accuracy_note  # tiny's 4x4 grid: no compositional accuracy
    # The directory loads like an export, with the hashes checked.
    runtime = OnnxRuntime(fp16_graphs, device="cpu")
    expected = OnnxRuntime(tiny_artifacts, device="cpu").run("refinement", {"scene_tokens": np.zeros((1, 4, 4), np.int64)})
    actual = runtime.run("refinement", {"scene_tokens": np.zeros((1, 4, 4), np.int64)})
    np.testing.assert_allclose(actual["image"], expected["image"], atol=5e-3)


def test_bf16_graphs_are_checked_with_the_reference_evaluator(tmp_path: Path, tiny_artifacts: Path):
    # ONNX Runtime's CPU provider has no bf16 Add/MatMul kernels: onnx.reference checks the graphs,
    # and generation runs them with every bf16 tensor rounded. The untrained tiny model's near-tied
    # logits make bf16 miss the gate; the override ships it and is recorded.
    with pytest.raises(PrecisionRefused) as refused:
        make_precision_graphs(tiny_artifacts, tmp_path / "bf16", "tensorrt", "bf16", captions=GATE)
    assert not (tmp_path / "bf16").exists()
    report = make_precision_graphs(
        tiny_artifacts, tmp_path / "bf16", "tensorrt", "bf16", captions=GATE, override="tiny is untrained; structure test"
    )
    assert report.passed and report.override == "tiny is untrained; structure test" and report.refusals
    assert all(r in str(refused.value) for r in report.refusals)
    assert {c.validated_with.split(" ")[0] for c in report.graphs.values()} == {"onnx.reference"}
    assert "emulation" in report.generation.generated_with
    decode = onnx.load(str(tmp_path / "bf16" / "reasoning_decode.bf16.onnx"))
    assert onnx.TensorProto.BFLOAT16 in {i.data_type for i in decode.graph.initializer}
    refinement = report.graphs["refinement"].rewrite["kept_fp32"]
    assert any("no bfloat16 signature at opset 18" in why for why in refinement.values())  # Conv before opset 22
    assert read_manifest(tmp_path / "bf16").precision["override"] == "tiny is untrained; structure test"


def test_int8_is_calibrated_and_a_bad_calibration_is_refused(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    good = make_precision_graphs(tiny_artifacts, tmp_path / "good", "tensorrt", "int8", captions=GATE)
    assert good.passed and good.calibration["feeds"]["refinement"] > 0
    refinement = onnx.load(str(tmp_path / "good" / "refinement.int8.onnx"))
    ops = [n.op_type for n in refinement.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    for node in refinement.graph.node:  # TensorRT's int8: symmetric, zero points 0
        if node.op_type == "QuantizeLinear":
            zero = next(i for i in refinement.graph.initializer if i.name == node.input[2])
            assert not onnx.numpy_helper.to_array(zero).any()
    decode = onnx.load(str(tmp_path / "good" / "reasoning_decode.int8.onnx"))
    assert "QuantizeLinear" not in {n.op_type for n in decode.graph.node}  # weight-only for the reasoning stage
    assert {i.data_type for i in decode.graph.initializer} >= {onnx.TensorProto.INT8}

    # Calibrating on a blank scene (every token background) gives activation scales the real scenes
    # overflow: the refinement graph leaves its tolerance and the precision is refused.
    from tandem.stages import NEXT_TOKENS, graph_specs

    blank = {"scene_tokens": np.zeros_like(graph_specs(tiny_config)["refinement"].sample_inputs({"batch": 2})["scene_tokens"])}
    with pytest.raises(PrecisionRefused, match="refinement: output error .* exceeds 0.15") as refused:
        make_precision_graphs(tiny_artifacts, tmp_path / "bad", "tensorrt", "int8", captions=GATE, calibration={"refinement": [blank]})
    assert "--accept-accuracy-loss" in str(refused.value)
    assert not (tmp_path / "bad").exists()  # nothing half-written where it would load


def test_cpu_int8_quantizes_the_decode_step_only(tiny_artifacts: Path, tiny_config: ModelConfig):
    from tandem.stages import NEXT_TOKENS, graph_specs

    specs = graph_specs(tiny_config)
    assert get_toolchain("onnxruntime").precision_rewrite("int8", specs["reasoning_prefill"]) is None
    assert get_toolchain("onnxruntime").precision_rewrite("int8", specs["refinement"]) is None
    with pytest.raises(TandemError, match="no fp16 graph rewrite for the onnxruntime toolchain"):
        get_toolchain("onnxruntime").precision_rewrite("fp16", specs["reasoning_decode"])
    model = onnx.load(str(tiny_artifacts / "reasoning_decode.onnx"))
    quantized, record = quantize_cpu_int8(model)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"MatMulInteger", "MatMulNBits"} <= ops
    assert not set(record.quantized) & set(sensitive_nodes(model))  # router and logits stay fp32
    # Every MoE expert stack (the plain graph's dense [E, d, f] MatMuls) is stored as int8 now.
    experts = [i for i in model.graph.initializer if len(i.dims) == 3 and i.data_type == onnx.TensorProto.FLOAT]
    assert experts  # the plain decode graph multiplies by every expert's weights
    inits = {i.name: i for i in quantized.graph.initializer}
    assert not [i for i in inits.values() if len(i.dims) == 3 and i.data_type == onnx.TensorProto.FLOAT and i.name in {e.name for e in experts}]
    integer = [n for n in quantized.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) >= len(experts) and all(inits[n.input[1]].data_type == onnx.TensorProto.INT8 for n in integer)
    feeds = specs["reasoning_decode"].sample_inputs({"batch": 3}, seed=1)
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(tiny_artifacts / "reasoning_decode.onnx"), providers=["CPUExecutionProvider"])
    for actual, expected in zip(session.run(None, feeds), reference.run(None, feeds)):
        assert np.abs(actual - expected).max() <= 0.1 * np.abs(expected).max()


def test_cpu_int8_makes_the_moe_kernel_a_qmoe_with_int8_experts(tiny_artifacts: Path, tiny_config: ModelConfig):
    from tandem.stages import NEXT_TOKENS, graph_specs

    # ONNX Runtime's graph (the one a cpu int8 build starts from): each MoE layer is one kernel.
    source = tiny_artifacts / "reasoning_decode.ort.onnx"
    model = onnx.load(str(source))
    moes = [n for n in model.graph.node if n.op_type == "MoE"]
    assert len(moes) == tiny_config.reasoning.n_layers
    routers = {name for name, why in sensitive_nodes(model).items() if "MoE kernel" in why}
    assert len(routers) == len(moes)  # the MatMuls whose logits choose the experts stay fp32
    quantized, record = quantize_cpu_int8(model)
    qmoes = [n for n in quantized.graph.node if n.op_type == "QMoE"]
    assert len(qmoes) == len(moes) and not [n for n in quantized.graph.node if n.op_type == "MoE"]
    assert "QMoE" in record.method and not routers & set(record.quantized)
    inits = {i.name: i for i in quantized.graph.initializer}
    for node in qmoes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["expert_weight_bits"] == 8 and attrs["block_size"] == 32 and attrs["k"] == tiny_config.reasoning.top_k
        assert inits[node.input[2]].data_type == inits[node.input[5]].data_type == onnx.TensorProto.UINT8
    stacks = {n.input[i] for n in moes for i in (2, 4)}
    assert not stacks & set(inits)  # no fp32 expert stack left (only the float scales per block)
    spec = graph_specs(tiny_config)["reasoning_decode"]
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        feeds = spec.sample_inputs({"batch": batch}, seed=2)
        for name, actual, expected in zip(spec.output_names, session.run(spec.output_names, feeds), reference.run(spec.output_names, feeds)):
            if name != NEXT_TOKENS:  # sampled tokens: judged by the generation gate, not by a numeric error
                assert np.abs(actual - expected).max() <= 0.05 * np.abs(expected).max()


def _report(precision: str, agreement: float, fp32: float, candidate: float) -> PrecisionReport:
    return PrecisionReport(
        precision=precision,
        toolchain="onnxruntime",
        description="",
        graphs={},
        generation=GenerationCheck(
            captions=100, caption_set="", generated_with="", positions=1000,
            agreeing_positions=int(agreement * 1000), token_agreement=agreement, identical_captions=90,
        ),
        accuracy=AccuracyCheck(
            captions=100, fp32=fp32, precision=candidate, drop_points=round(100 * (fp32 - candidate), 2),
            fp32_by_objects={}, precision_by_objects={},
        ),
        limits={},
        passed=False,
    )


@pytest.mark.parametrize(
    ("precision", "agreement", "fp32", "candidate", "refused"),
    [
        ("int8", 0.99, 0.90, 0.885, False),  # 1.5 points below: within int8's 2
        ("int8", 0.99, 0.90, 0.875, True),  # 2.5 points below
        ("fp16", 0.999, 0.90, 0.885, True),  # fp16 may lose 1 point
        ("int8", 0.90, 0.90, 0.90, True),  # tokens agree on too few positions
    ],
)
def test_accuracy_gate_limits(precision: str, agreement: float, fp32: float, candidate: float, refused: bool):
    reasons = gate(_report(precision, agreement, fp32, candidate))
    assert bool(reasons) == refused
    if refused and candidate < fp32:
        assert f"{100 * (fp32 - candidate):.2f} points below fp32" in reasons[0]


def test_cpu_build_ships_the_precision_graphs_it_gated(tmp_path: Path, tiny_artifacts: Path, tiny_config: ModelConfig):
    out = tmp_path / "cpu-int8"
    # The decode step's int8 graph (the MoE kernels as QMoE, 2-D MatMuls as MatMulNBits) keeps
    # the tiny model's greedy tokens: the gate passes it and the build records the figures.
    options = BuildOptions(
        precision="int8", reuse_export=tiny_artifacts, gate_captions=GATE, repository={"max_batch_size": 8, "instances": 1},
    )
    shipped = run_build(tiny_config, "cpu", out, options, stream=io.StringIO())
    assert shipped.passed, shipped.records
    assert [r.status for r in shipped.records][:2] == [OK, OK] and "% of positions" in shipped.records[1].reason
    manifest = json.loads((out / "build_manifest.json").read_text())
    checks = manifest["precision_checks"]
    assert manifest["precision"] == "int8" and checks["override"] is None and not checks["refusals"]
    assert checks["generation"]["token_agreement"] >= checks["limits"]["min_token_agreement"]
    # Graphs the step leaves at fp32 keep ONNX Runtime's own copy (the com.microsoft::MoE graph).
    graphs = read_manifest(out / "precision").graphs
    assert graphs["reasoning_prefill"].optimized_file == "reasoning_prefill.ort.onnx" and graphs["reasoning_decode"].optimized_file is None
    decode = next(a for a in manifest["artifacts"] if a["graph"] == "reasoning_decode")
    assert decode["file"] == "precision/reasoning_decode.int8.onnx"
    assert "QMoE" in {n.op_type for n in onnx.load(str(out / decode["file"])).graph.node}  # built from ONNX Runtime's MoE graph
    shipped_files = {p.name for p in (out / "model_repository").rglob("*.onnx")}
    assert "reasoning_decode.int8.onnx" in shipped_files and "reasoning_decode.onnx" not in shipped_files
    config = (out / "model_repository" / "reasoning" / "config.pbtxt").read_text()
    assert '"tandem.precision"' in config and '"int8"' in config

    # tandem bench measures this build's gated graphs as the onnxruntime_int8 runtime, with int8's bytes.
    from tandem.bench.roofline import work_with_weights_at
    from tandem.bench.stagebench import precision_runtime

    runtime = precision_runtime("onnxruntime_int8", "int8", tiny_config, [tmp_path / "elsewhere", out])
    assert runtime.precision_report["graphs"]["reasoning_decode"] == "int8" and runtime.precision_report["generation"]
    assert set(runtime.bytes_per_weight) == {"reasoning_decode"} and "int8" in runtime.describe()
    decode = runtime.specs["reasoning_decode"]
    outputs = runtime.run("reasoning_decode", decode.sample_inputs({"batch": 1}))
    assert set(outputs) == set(decode.output_names)
    work = {"flops": 100, "weight_bytes_touched": 4000, "io_float_bytes": 1000, "io_int_bytes": 8, "bytes": 5008}
    assert work_with_weights_at(work, 1.0)["bytes"] == 1000 + 1000 + 8
    with pytest.raises(TandemError, match="--target cpu --precision int8"):
        precision_runtime("onnxruntime_int8", "int8", tiny_config, [tmp_path / "elsewhere"])
