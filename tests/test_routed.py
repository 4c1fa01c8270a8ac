"""Routed experts on every shipped GPU/accelerator graph: the expert weight stacks are read only by
routed computation (tandem.compiler.expert_reads), checked on the graphs the toolchains really
build from, with the dense standard-op graph as the counterfactual that must fail; and the routed
forms compute what the dense form computes (Triton kernels in Triton's CPU interpreter)."""

from __future__ import annotations

import copy
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from tandem.config import ModelConfig
from tandem.compiler.expert_reads import unrouted_onnx_reads, unrouted_program_reads
from tandem.models.reasoning import MoEFeedForward
from tandem.stages import graph_specs

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not installed (pip install triton; CUDA builds of torch bring it): its CPU interpreter checks the plugin kernels"
REASONING_GRAPHS = ("reasoning_prefill", "reasoning_decode", "reasoning_verify")


def _moe(seed: int = 0, d: int = 24, f: int = 40, experts: int = 8, top_k: int = 2) -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(d, f, experts, top_k)
    moe.reset_parameters()
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    return moe.eval()


def _poison_unrouted(moe: MoEFeedForward, x: torch.Tensor) -> set[int]:
    """NaN into every expert no row of ``x`` routes to; returns the routed experts."""
    with torch.no_grad():
        routed = set(moe.route(x.reshape(-1, x.shape[-1]))[1].unique().tolist())
        for e in set(range(moe.n_experts)) - routed:
            for w in (moe.w_gate, moe.w_up, moe.w_down):
                w[e] = float("nan")
    return routed


# ----------------------------------------------------------------------------- the routed form (AOTInductor)


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_routed_form_matches_the_dense_form(rows: int):
    moe = _moe()
    x = torch.randn(rows, 24)
    with torch.no_grad():
        dense, routed = moe(x, sparse=False), moe.forward_routed(x)
    torch.testing.assert_close(routed, dense, atol=1e-6, rtol=1e-6)


def test_routed_form_never_reads_an_unrouted_expert():
    moe = _moe(seed=1)
    x = torch.randn(1, 24)
    routed = _poison_unrouted(moe, x)
    assert len(routed) == 2
    with torch.no_grad():
        assert torch.isfinite(moe.forward_routed(x)).all()
        assert torch.isnan(moe(x, sparse=False)).any()  # the dense form reads every expert (counterfactual)


@pytest.mark.parametrize("rows", [1, 3, 4, 17])
def test_capturable_form_matches_the_dense_and_routed_forms(rows: int):
    moe = _moe(seed=rows)
    x = torch.randn(rows, 24)
    with torch.no_grad():
        dense, routed, capturable = moe(x, sparse=False), moe.forward_routed(x), moe.forward_capturable(x)
    torch.testing.assert_close(capturable, dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(capturable, routed, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
def test_capturable_form_never_reads_an_unrouted_expert(rows: int):
    """Rows 3 x top-2 = 6 static slots: padding slots repeat a picked expert, never an unpicked one."""
    moe = _moe(seed=7)
    x = torch.randn(rows, 24)
    routed = _poison_unrouted(moe, x)
    assert len(routed) < moe.n_experts
    with torch.no_grad():
        assert torch.isfinite(moe.forward_capturable(x)).all()
        assert torch.isnan(moe(x, sparse=False)).any()


def _decode_forms(config: ModelConfig, checkpoint, batch: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The decode graph's module (sampling included) on the same feeds with each MoE form."""
    from tandem.export.rewrites import graph_rewrites
    from tandem.models import build_stages

    stages = build_stages(config, checkpoint)
    spec = graph_specs(config)["reasoning_decode"]
    module = spec.make_module(stages).eval()
    feeds = spec.sample_inputs({"batch": batch}, seed=seed)
    args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
    out = {}
    for form, rewrites in (("dense", ()), ("routed", ("routed_experts",)), ("capturable", ("capturable_experts",))):
        with torch.no_grad(), graph_rewrites(rewrites, stages):
            result = module(*args)
        out[form] = (result[0], result[1])  # next_token_ids, logits
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_capturable_decode_step_tokens_equal_the_other_forms(batch: int):
    """Small (the trained checkpoint), the whole decode step with in-graph sampling: the capturable
    form's tokens are the dense and routed forms' tokens, its logits close to theirs."""
    from tandem.config import load_config

    forms = _decode_forms(load_config("small"), None, batch, seed=11 + batch)
    for other in ("dense", "routed"):
        torch.testing.assert_close(forms["capturable"][0], forms[other][0], atol=0, rtol=0)
        torch.testing.assert_close(forms["capturable"][1], forms[other][1], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def aot_programs(tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelConfig) -> dict[str, Path]:
    """The cpu-aot/cuda-torch optimise step's programs (torch.export with the toolchain's rewrites),
    and the dense ones it made before the rewrite (the counterfactual)."""
    from tandem.compiler.torch_aot import export_programs
    from tandem.toolchains import get_toolchain

    out = {}
    toolchain = get_toolchain("torch_aot")
    for form, rewrites, graphs in (
        ("routed", toolchain.graph_rewrites, REASONING_GRAPHS),
        ("dense", (), REASONING_GRAPHS),
        ("capturable", toolchain.cuda_graph_rewrites, ("reasoning_decode",)),  # cuda-torch's decode step
    ):
        folder = tmp_path_factory.mktemp(form)
        export_programs(tiny_config, None, folder, graphs=list(graphs), rewrites=rewrites)
        out[form] = folder
    return out


def test_cuda_torch_decode_program_is_routed_and_capturable(aot_programs: dict[str, Path]):
    """cuda-torch's decode program (what its optimise step exports): only routed reads of the expert
    stacks, and no data-dependent shape anywhere (no nonzero, no unbacked size: the cpu-aot program's
    per-expert row counts), so nothing in it waits for the host and the step can be a CUDA graph."""
    from tandem.formats.targets import get_target
    from tandem.toolchains import get_toolchain

    assert get_toolchain("torch_aot").rewrites_for_target(get_target("cuda-torch")) == ("capturable_experts",)
    assert get_toolchain("torch_aot").rewrites_for_target(get_target("cpu-aot")) == ("routed_experts",)
    program = torch.export.load(str(aot_programs["capturable"] / "reasoning_decode.pt2"))
    assert unrouted_program_reads(program) == []
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    assert not [n for n in calls if "nonzero" in str(n.target)]
    routed = torch.export.load(str(aot_programs["routed"] / "reasoning_decode.pt2"))
    assert [n for n in routed.graph.nodes if n.op == "call_function" and "nonzero" in str(n.target)]  # the counterfactual


@pytest.mark.parametrize("graph", REASONING_GRAPHS)
def test_aot_programs_read_expert_weights_only_when_routed(aot_programs: dict[str, Path], graph: str):
    routed = torch.export.load(str(aot_programs["routed"] / f"{graph}.pt2"))
    assert unrouted_program_reads(routed) == []
    dense = torch.export.load(str(aot_programs["dense"] / f"{graph}.pt2"))
    problems = unrouted_program_reads(dense)
    assert problems and all("reads every expert" in p for p in problems)


def test_aot_decode_program_runs_with_unrouted_experts_poisoned(aot_programs: dict[str, Path], tiny_config: ModelConfig):
    """Behaviour, not only structure: NaN in every expert that no row picks (per layer, from the
    eager model's routing on the same feeds) leaves the routed program's outputs finite, and not
    the dense program's."""
    from tandem.models import build_stages

    spec = graph_specs(tiny_config)["reasoning_decode"]
    feeds = spec.sample_inputs({"batch": 1}, seed=3)
    args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
    named = dict(zip(spec.input_names, args))
    keys = [a for n, a in named.items() if n.startswith("past_key_")]
    values = [a for n, a in named.items() if n.startswith("past_value_")]
    model = build_stages(tiny_config).reasoning
    with torch.no_grad():
        model.decode_step(named["token_ids"], named["positions"], keys, values)
    unpicked = {
        i: set(range(tiny_config.reasoning.n_experts)) - set(block.moe.last_routing.unique().tolist())
        for i, block in enumerate(model.blocks)
    }
    assert all(unpicked.values())
    logits = {}
    for form in ("routed", "dense", "capturable"):
        module = torch.export.load(str(aot_programs[form] / "reasoning_decode.pt2")).module()
        state = module.state_dict()  # the module's own parameters: poisoned in place
        with torch.no_grad():
            for i, experts in unpicked.items():
                for name in ("w_gate", "w_up", "w_down"):
                    state[f"model.blocks.{i}.moe.{name}"][sorted(experts)] = float("nan")
            logits[form] = module(*args)[spec.output_names.index("logits")]
    assert torch.isfinite(logits["routed"]).all()
    assert torch.isfinite(logits["capturable"]).all()
    assert torch.isnan(logits["dense"]).any()


def _zero_row_package(guard: str) -> None:
    """A routed matmul (each expert over the rows that picked it, found by ``nonzero``) compiled as the
    cpu-aot packages are, the C++ GEMM template forced, then run where most experts have no row."""
    import tempfile

    from tandem.compiler.torch_aot import CPU_INDUCTOR_CONFIGS, aoti_compile

    experts, d, f = 4, 64, 128

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(experts, d, f))

        def forward(self, x, choice):
            out = x.new_zeros(x.shape[0], f)
            for e in range(experts):
                rows = torch.nonzero(choice == e).squeeze(-1)
                out = out.index_add(0, rows, torch.mm(x.index_select(0, rows), self.w[e]))
            return out

    module = Routed().eval()
    batch = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        program = torch.export.export(module, (torch.randn(2, d), torch.tensor([0, 1])), dynamic_shapes=({0: batch}, {0: batch}))
        configs = {**CPU_INDUCTOR_CONFIGS, "max_autotune_gemm_backends": "CPP"}
        package = torch._inductor.aoti_load_package(aoti_compile(program, f"{tmp}/routed.pt2", "cpu", configs, guard=guard == "guard"))
        for choice in ([2], [1, 1, 3]):  # experts 0, 1, 3 / 0, 2 have no rows
            x, c = torch.randn(len(choice), d), torch.tensor(choice)
            torch.testing.assert_close(package(x, c), module(x, c), atol=1e-4, rtol=1e-4)


def test_zero_row_guard_refuses_a_template_it_does_not_know(monkeypatch):
    """A torch whose C++ GEMM template reads differently is refused, not compiled unguarded."""
    from tandem.compiler import torch_aot
    from tandem.compiler.steps import StepFailed

    module = torch_aot._gemm_template()
    assert torch_aot.gemm_template_guardable()
    with torch_aot.zero_row_gemm_guard():
        assert "if (M == 0) return;" in module.GEMM_TEMPLATE_INIT_BLOCKING_BASIC_BLOCK
    assert "if (M == 0) return;" not in module.GEMM_TEMPLATE_INIT_BLOCKING_BASIC_BLOCK  # restored
    monkeypatch.setattr(module, "GEMM_TEMPLATE_INIT_BLOCKING_BASIC_BLOCK", "const int64_t M = 1;")
    assert not torch_aot.gemm_template_guardable() and torch_aot.inductor_configs("cpu") == torch_aot.CPU_FALLBACK_CONFIGS
    with pytest.raises(StepFailed, match="zero-row guard"):
        with torch_aot.zero_row_gemm_guard():
            pass


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="AOTInductor compiles C++ packages: needs a C++ compiler (apt-get install g++)")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="integer division by zero raises SIGFPE on x86 only: the unguarded half has no signal to see elsewhere")
def test_cpu_aot_gemm_template_runs_experts_no_row_picked(tmp_path: Path):
    """cpu-aot packages autotune their matmuls with Inductor's C++ GEMM template, which divides by zero
    (SIGFPE) on a data-dependent row count of 0: the routed form's unpicked experts. Compiled under
    tandem's guard the package runs and matches eager; without it the same package dies, so the guard
    is what makes the template safe (if a torch upgrade fixes the template, the second half says so).
    The children's temporary files (the loader unpacks a package into $TMPDIR/aotinductor_*, which a
    child killed by a signal never removes) stay in pytest's own folder."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    guarded = subprocess.run([sys.executable, "-c", _child_code("_zero_row_package"), "guard"], capture_output=True, text=True,
                             env=env, timeout=600)
    assert guarded.returncode == 0, guarded.stdout[-2000:] + guarded.stderr[-4000:]
    bare = subprocess.run([sys.executable, "-c", _child_code("_zero_row_package"), "none"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert bare.returncode == -signal.SIGFPE, (
        f"without the guard the package exited {bare.returncode}, not SIGFPE: this torch may have fixed the template "
        "(then drop tandem.compiler.torch_aot.zero_row_gemm_guard)\n" + bare.stderr[-2000:]
    )


# ----------------------------------------------------------------------------- TensorRT (h100/a100): the plugin graph


def _child_code(check: str) -> str:
    """Python source that loads this module by path and calls ``check(*sys.argv[1:])``."""
    return (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('routed_checks', {__file__!r}); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        f"module.{check}(*sys.argv[1:])"
    )


def _in_child(check: str, *args: str, interpret: bool) -> None:
    """Run ``check`` (a function of this module) in a fresh Python. Triton decides between compiled
    and interpreted kernels (TRITON_INTERPRET) when it is first imported, and in a test session
    torch may have imported it already."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", _child_code(check), *args], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _check_ptx() -> None:
    from triton.backends.compiler import GPUTarget

    from tandem.compiler.tensorrt_moe import DOWN, UP, compile_kernel

    for op, element, capability in ((UP, "fp32", 90), (UP, "bf16", 90), (DOWN, "fp16", 80), (DOWN, "bf16", 90)):
        compiled = compile_kernel(op, element, GPUTarget("cuda", capability, 32))
        ptx = compiled.asm["ptx"]
        assert f".entry {compiled.metadata.name}(" in ptx and f".target sm_{capability}" in ptx, (op, element, capability)
        assert compiled.metadata.num_warps > 0


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_plugin_kernels_compile_to_ptx_for_hopper_and_ampere():
    """What TensorRT's AOT plugin step gets from Triton (PTX needs no GPU; TensorRT itself is not here)."""
    _in_child("_check_ptx", interpret=False)


def _reference(x, experts, gates, w_gate, w_up, w_down):
    out = []
    for n in range(x.shape[0]):
        rows = []
        for j in range(experts.shape[1]):
            e = int(experts[n, j])
            rows.append(gates[n, j] * ((F.silu(x[n] @ w_gate[e]) * (x[n] @ w_up[e])) @ w_down[e]))
        out.append(torch.stack(rows))
    return torch.stack(out)


def _check_kernels(rows: str) -> None:
    from tandem.compiler.tensorrt_moe import routed_moe

    rows = int(rows)
    torch.manual_seed(rows)
    experts_n, d, f = 8, 72, 136  # not multiples of the 64-wide tiles: the masks are exercised
    w_gate, w_up = torch.randn(experts_n, d, f) / d**0.5, torch.randn(experts_n, d, f) / d**0.5
    w_down = torch.randn(experts_n, f, d) / f**0.5
    x = torch.randn(rows, d)
    gates, experts = torch.topk(torch.softmax(torch.randn(rows, experts_n), -1), 2)
    gates = gates / gates.sum(-1, keepdim=True)
    expected = _reference(x, experts, gates, w_gate, w_up, w_down)
    unrouted = set(range(experts_n)) - set(experts.unique().tolist())
    assert unrouted
    for e in unrouted:  # never read: NaN cannot leak
        w_gate[e] = w_up[e] = w_down[e] = float("nan")
    actual = routed_moe(x, experts, gates, w_gate, w_up, w_down)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
@pytest.mark.parametrize("rows", [1, 3])
def test_plugin_kernels_match_pytorch_in_the_triton_interpreter(rows: int):
    _in_child("_check_kernels", str(rows), interpret=True)


@pytest.mark.parametrize("graph", REASONING_GRAPHS)
def test_tensorrt_graphs_read_expert_weights_only_through_the_routed_plugins(tiny_artifacts: Path, graph: str):
    from tandem.compiler.tensorrt_moe import PLUGIN_NAMESPACE, route_moe_layers

    dense = onnx.load(str(tiny_artifacts / f"{graph}.onnx"))
    problems = unrouted_onnx_reads(dense)
    assert problems and all("reads every expert" in p for p in problems)  # the counterfactual
    routed, layers = route_moe_layers(copy.deepcopy(dense))
    assert layers == len([n for n in dense.graph.initializer if n.name.endswith("moe.w_gate")]) > 0
    assert unrouted_onnx_reads(routed) == []
    plugins = [n for n in routed.graph.node if n.domain == PLUGIN_NAMESPACE]
    assert len(plugins) == 2 * layers
    for node in plugins:  # what TensorRT's ONNX parser needs to pick the plugin's AOT kernel
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes == {"plugin_namespace": PLUGIN_NAMESPACE.encode(), "aot": 1}
    assert not any(n.op_type == "ScatterElements" for n in routed.graph.node)  # the dense gates are gone
    onnx.checker.check_model(routed)


def _check_graph(artifacts: str) -> None:
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from tandem.compiler.tensorrt_moe import BLOCK_OUT, DOWN, PLUGIN_NAMESPACE, UP, kernels, route_moe_layers
    from tandem.config import load_config

    up_kernel, down_kernel = kernels()

    class RoutedUp(OpRun):
        op_domain = PLUGIN_NAMESPACE

        def _run(self, x, experts, w_gate, w_up, plugin_namespace=None, aot=None):
            n, k = experts.shape
            _, d, f = w_gate.shape
            hidden = torch.empty(n, k, f)
            up_kernel[(w_gate.shape[0], -(-f // BLOCK_OUT))](
                torch.from_numpy(x.copy()), torch.from_numpy(experts.copy()), torch.from_numpy(w_gate.copy()),
                torch.from_numpy(w_up.copy()), n * k, k, d, f, hidden, BLOCK_OUT=BLOCK_OUT, BLOCK_IN=64,
            )
            return (hidden.numpy(),)

    class RoutedDown(OpRun):
        op_domain = PLUGIN_NAMESPACE

        def _run(self, hidden, experts, gates, w_down, plugin_namespace=None, aot=None):
            n, k, f = hidden.shape
            d = w_down.shape[2]
            y = torch.empty(n, k, d)
            down_kernel[(w_down.shape[0], -(-d // BLOCK_OUT))](
                torch.from_numpy(hidden.copy()), torch.from_numpy(experts.copy()), torch.from_numpy(gates.copy()),
                torch.from_numpy(w_down.copy()), n * k, f, d, y, BLOCK_OUT=BLOCK_OUT, BLOCK_IN=64,
            )
            return (y.numpy(),)

    RoutedUp.__name__, RoutedDown.__name__ = UP, DOWN  # the evaluator matches ops by class name
    path = Path(artifacts) / "reasoning_decode.onnx"
    routed, _ = route_moe_layers(onnx.load(str(path)))
    spec = graph_specs(load_config("tiny"))["reasoning_decode"]
    feeds = spec.sample_inputs({"batch": 3}, seed=5)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    actual = ReferenceEvaluator(routed, new_ops=[RoutedUp, RoutedDown]).run(None, feeds)
    for name, a, e in zip(spec.output_names, actual, expected):
        np.testing.assert_allclose(a, e, atol=2e-4, rtol=1e-4, err_msg=name)
    np.testing.assert_array_equal(actual[0].argmax(-1), expected[0].argmax(-1))


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_tensorrt_decode_graph_with_plugin_kernels_matches_onnxruntime(tiny_artifacts: Path):
    """The rewritten decode graph evaluated by ONNX's reference evaluator, the plugin nodes running
    the Triton kernels (interpreter), against ONNX Runtime on the export's graph."""
    _in_child("_check_graph", str(tiny_artifacts), interpret=True)


def test_routed_step_script_times_onnxruntime_graph_alone(tiny_artifacts: Path, tmp_path: Path):
    """benchmarks/routed_step.py with --onnx (ONNX Runtime's decode graph without a whole export): its
    logits (not the sampled tokens the graph returns first) are compared with eager PyTorch's, and the
    report says which graph it timed."""
    out = tmp_path / "run"
    graph = tiny_artifacts / "reasoning_decode.ort.onnx"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "routed_step.py"
    result = subprocess.run([sys.executable, str(script), "--config", "tiny", "--onnx", str(graph), "--rounds", "2", "--calls", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    import json

    data = json.loads((out / "results.json").read_text())
    assert data["onnxruntime_graph"] == str(graph) and data["packages"] == {}
    for b in (1, 8):
        agreement = data["agreement"][f"onnxruntime b{b}"]
        assert agreement["greedy_equal"] and agreement["max_abs_vs_pytorch"] < 1e-3
    assert [len(r["rounds_ms"]) for r in data["rows"]] == [2, 2]
    assert str(graph) in (out / "report.md").read_text()


def test_ort_moe_forms_script_times_both_forms_and_checks_them(tmp_path: Path):
    """benchmarks/ort_moe_forms.py on tiny: ONNX Runtime's MoE kernel graph and the routed standard-op
    graph give eager PyTorch's outputs, both are timed in every round at batch 1 and 8, batch 1
    routes to top_k experts per layer, and an existing --out is refused untouched."""
    import json

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ort_moe_forms.py"
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(script), "--config", "tiny", "--rounds", "2", "--calls", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert set(data["max_abs_vs_pytorch"]) == {"moe_kernel", "routed_standard_ops"}
    assert all(v < 1e-4 for v in data["max_abs_vs_pytorch"].values())
    assert {k: len(v) for k, v in data["ms_per_call"].items()} == {
        f"{form}_b{b}": 2 for form in ("moe_kernel", "routed_standard_ops") for b in (1, 8)}
    assert data["distinct_experts_per_layer"]["1"] == data["dims"]["top_k"]
    assert set(data["routed_vs_kernel"]) == {"1", "8"} and "routed / kernel" in (out / "report.md").read_text()
    again = subprocess.run([sys.executable, str(script), "--config", "tiny", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr
    assert json.loads((out / "results.json").read_text()) == data
