import shutil

import numpy as np
import onnx
import pytest
import torch

from tandem.errors import ArtifactError
from tandem.export import onnx_export
from tandem.formats.export_manifest import read_manifest
from tandem.models import build_stages
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.runtimes.torch_eager import TorchRuntime
from tandem.stages import MAX_BATCH, graph_specs
from tandem.util import atomic_directory


def test_manifest_shows_every_graph_within_tolerance(tiny_export):
    manifest = read_manifest(tiny_export.out)
    assert manifest.passed
    assert set(manifest.graphs) == {"reasoning_prefill", "reasoning_decode", "reasoning_verify", "refinement"}
    assert manifest.graphs["reasoning_verify"].optimized_rewrites == ["moe_kernel"]
    for entry in manifest.graphs.values():
        assert entry.passed and entry.opset >= 17
        for cases in (entry.validation, entry.optimized_validation):  # both shipped variants
            batches = {case.dims["batch"] for case in cases}
            assert max(batches) > 1 and 1 in batches
            for case in cases:
                for err in case.outputs.values():
                    assert err.within_tolerance and err.max_abs <= entry.atol + 1e-12
    assert manifest.graphs["reasoning_decode"].optimized_rewrites == ["moe_kernel"]
    assert manifest.graphs["refinement"].optimized_rewrites == []
    checked = {(g.variant, len(g.prompts)) for g in manifest.generation_checks}
    assert checked >= {(variant, batch) for variant in ("onnxruntime", "plain") for batch in (1, MAX_BATCH)}
    for g in manifest.generation_checks:
        assert g.tokens_equal and g.mismatched_tokens == 0, g
        assert g.image_max_abs_diff <= g.image_atol


def test_onnx_interface_follows_the_stage_description(tiny_artifacts, tiny_config):
    for spec in graph_specs(tiny_config).values():
        model = onnx.load(str(tiny_artifacts / f"{spec.name}.onnx"), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        inputs = {i.name: i for i in model.graph.input}
        assert list(inputs) == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        for t in spec.inputs:
            dims = inputs[t.name].type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch"
            for axis, size in enumerate(t.shape):
                if isinstance(size, int):
                    assert dims[axis].dim_value == size


def _nodes_computed_from(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    reached, nodes = {tensor}, []
    for node in graph.node:  # topological order
        if reached.intersection(node.input):
            reached.update(node.output)
            nodes.append(node)
    return nodes


@pytest.mark.parametrize("optimized", [False, True], ids=["plain-graph", "onnxruntime-graph"])
def test_moe_routing_stays_data_dependent(tiny_artifacts, tiny_config, optimized):
    """Inputs that route to different experts must be followed by every shipped decode graph (the
    standard-op one compilers take, ONNX Runtime's with its MoE kernel). A trace that baked the
    export dummy's expert choice would give the 'baked' output instead, which we compute as a
    counterfactual to show this test can tell the two apart."""
    entry = read_manifest(tiny_artifacts).graphs["reasoning_decode"]
    decode = onnx.load(str(tiny_artifacts / (entry.optimized_file if optimized else entry.file)))
    sampler = _nodes_computed_from(decode.graph, "logits")  # the in-graph sampling (its own TopK)
    assert "TopK" in {n.op_type for n in sampler}
    ops = [n.op_type for n in decode.graph.node if n not in sampler]
    # Routing is computed in the graph at run time: TopK in standard ops, inside each MoE kernel.
    assert ops.count("MoE" if optimized else "TopK") == tiny_config.reasoning.n_layers
    if optimized:
        assert "TopK" not in ops and "GatherElements" not in ops

    reference = TorchRuntime(tiny_config)
    ort_runtime = OnnxRuntime(tiny_artifacts, optimized=optimized, graphs=["reasoning_decode"])
    spec = graph_specs(tiny_config)["reasoning_decode"]
    moe = reference.stages.reasoning.blocks[0].moe

    dummy = spec.sample_inputs(spec.export_dims, seed=0)
    reference.run(spec.name, dummy)
    baked_experts = moe.last_routing[0].clone()

    seen, different = set(), []
    for seed in range(1, 200):
        feeds = spec.sample_inputs({"batch": 1}, seed=seed)
        expected = reference.run(spec.name, feeds)
        chosen = moe.last_routing[0].clone()
        seen.update(chosen.tolist())
        actual = ort_runtime.run(spec.name, feeds)
        np.testing.assert_allclose(actual["logits"], expected["logits"], atol=1e-4, rtol=1e-3)
        if set(chosen.tolist()).isdisjoint(baked_experts.tolist()):
            different.append((feeds, expected))
        if len(seen) == tiny_config.reasoning.n_experts and len(different) >= 3:
            break
    assert len(seen) == tiny_config.reasoning.n_experts, f"only experts {sorted(seen)} were reached"
    assert different, "no input routed away from the export dummy's experts"

    original_route = moe.route
    try:  # counterfactual: layer 0 always picks the dummy's experts
        moe.route = lambda x: (original_route(x)[0], baked_experts.expand(x.shape[0], -1))
        for feeds, expected in different:
            baked = reference.run(spec.name, feeds)["logits"]
            actual = ort_runtime.run(spec.name, feeds)["logits"]
            assert np.abs(baked - expected["logits"]).max() > 1e-3
            assert np.abs(actual - baked).max() > 1e-3
    finally:
        moe.route = original_route


def test_optimised_and_plain_graphs_agree(tiny_artifacts, tiny_config):
    plain = OnnxRuntime(tiny_artifacts, optimized=False)
    optimised = OnnxRuntime(tiny_artifacts, optimized=True)
    for spec in graph_specs(tiny_config).values():
        feeds = spec.sample_inputs({"batch": MAX_BATCH}, seed=3)
        a, b = plain.run(spec.name, feeds), optimised.run(spec.name, feeds)
        for name in spec.output_names:
            np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=1e-4)


@pytest.fixture
def artifacts_copy(tiny_artifacts, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, target)
    return target


def test_corrupt_artifact_is_refused(artifacts_copy):
    path = artifacts_copy / "refinement.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt or was modified"):
        OnnxRuntime(artifacts_copy, optimized=False)


def test_missing_artifacts_are_refused(artifacts_copy, tmp_path):
    (artifacts_copy / "reasoning_decode.ort.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        OnnxRuntime(artifacts_copy)
    (artifacts_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        OnnxRuntime(artifacts_copy)
    (artifacts_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not a finished tandem export"):
        OnnxRuntime(artifacts_copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        OnnxRuntime(tmp_path / "nowhere")


def test_validation_catches_a_wrong_graph(tiny_artifacts, tiny_config):
    """Validating against a reference with other weights must fail: the check is not vacuous."""
    import onnxruntime as ort

    spec = graph_specs(tiny_config)["refinement"]
    session = ort.InferenceSession(str(tiny_artifacts / "refinement.onnx"), providers=["CPUExecutionProvider"])
    other = TorchRuntime(tiny_config.model_copy(update={"seed": 99}))
    cases = onnx_export.validate_graph(spec, other, session)
    assert not any(case.passed for case in cases)
    same = onnx_export.validate_graph(spec, TorchRuntime(tiny_config), session)
    assert all(case.passed for case in same)


def test_large_graphs_use_external_data(tiny_config, tmp_path):
    spec = graph_specs(tiny_config)["refinement"]
    stages = build_stages(tiny_config)
    entry = onnx_export.export_graph(spec, stages, tmp_path, external_threshold=0)
    assert entry.external_data, "weights should have gone to an external data file"
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / entry.file), providers=["CPUExecutionProvider"])
    feeds = spec.sample_inputs({"batch": 2}, seed=5)
    with torch.no_grad():
        expected = stages.refinement(torch.from_numpy(feeds["scene_tokens"])).numpy()
    np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=1e-5)


def test_failed_write_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "artifacts"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "half.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_moe_kernel_packing_matches_the_reference_layer(tiny_config):
    """The ONNX Runtime rewrite's packed weights (interleaved gate/up rows) computed the way its MoE
    kernel computes them give the reference layer's output; a wrong interleave would not."""
    from tandem.export.rewrites import _moe_op, pack_moe_weights

    moe = build_stages(tiny_config).reasoning.blocks[1].moe
    x = torch.randn(7, tiny_config.reasoning.d_model, generator=torch.Generator().manual_seed(3))
    fc1, fc2 = pack_moe_weights(moe)
    with torch.no_grad():
        expected = moe(x, sparse=False)
        torch.testing.assert_close(_moe_op()(x, moe.router(x), fc1, fc2, moe.top_k), expected, atol=1e-5, rtol=1e-4)
        swapped = fc1.view(fc1.shape[0], -1, 2, fc1.shape[-1]).flip(2).reshape(fc1.shape)
        assert (_moe_op()(x, moe.router(x), swapped, fc2, moe.top_k) - expected).abs().max() > 1e-3
