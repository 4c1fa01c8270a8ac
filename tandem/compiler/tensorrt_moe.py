"""A routed MoE for TensorRT on Hopper and Ampere (the ``h100`` and ``a100`` targets).

TensorRT 11's own MoE layer (``IMoELayer``; the ONNX parser's ``TRT_MoE``) runs only on Blackwell
(SM100/103/110). On H100 and A100 each MoE layer of the reasoning graphs becomes two TensorRT
plugin nodes whose kernels read only the experts some row picked:

- ``tandem::routed_moe_up(x [N, d], experts [N, k] int32, w_gate [E, d, f], w_up [E, d, f])``
  -> ``hidden [N, k, f] = silu(x W_gate[e]) * (x W_up[e])`` for each row's k experts;
- ``tandem::routed_moe_down(hidden, experts, gates [N, k], w_down [E, f, d])``
  -> ``y [N, k, d] = gate * hidden W_down[e]``; the graph sums y over k (a ReduceSum).

Routing (router, softmax, TopK, renormalisation) stays in standard ops in front of them. Each
kernel's program owns one expert and one block of output columns and runs over the (row, slot)
pairs routed to that expert: an expert nobody picked is never loaded, and a routed expert's block
is loaded once per program, its rows reusing it from cache.

The kernels are Triton (``routed_up_kernel``, ``routed_down_kernel``), compiled ahead of time to
PTX by TensorRT's quickly deployable plugin API (``tensorrt.plugin.aot_impl``) and embedded in the
engine, so the engine runs without Python. Their numerics are checked here on the CPU in Triton's
interpreter (``TRITON_INTERPRET=1``) against PyTorch (tests/test_routed.py).

:func:`route_moe_layers` rewrites an exported ONNX graph: every dense MoE layer (every expert's
MatMul over every row, unchosen experts zero-gated) becomes the two plugin nodes, each carrying
``plugin_namespace="tandem"`` and ``aot=1`` so TensorRT's ONNX parser takes the plugin's AOT kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

PLUGIN_NAMESPACE = "tandem"
UP, DOWN = "routed_moe_up", "routed_moe_down"
# Tile sizes of the kernels (output columns per program, reduction chunk).
BLOCK_OUT, BLOCK_IN = 64, 64
# Element types the plugin is built for (the precision graphs' MatMul weights keep their stacks
# as plain float tensors at these precisions; int8/fp8 stacks are quantized and stay dense).
ROUTED_PRECISIONS = ("fp32", "fp16", "bf16")


# ----------------------------------------------------------------------------- kernels


@functools.cache
def kernels():
    """The Triton kernels (imported lazily: triton ships with CUDA builds of PyTorch, and from PyPI)."""
    import triton
    import triton.language as tl

    @triton.jit
    def routed_up_kernel(
        x_ptr, experts_ptr, w_gate_ptr, w_up_ptr, n_pairs, top_k, d, f, hidden_ptr,
        BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
    ):
        # program (expert e, column block): every (row, slot) pair routed to e
        e = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        col_ok = cols < f
        for pair in range(0, n_pairs):
            if tl.load(experts_ptr + pair) == e:
                row = pair // top_k
                acc_gate = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
                acc_up = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
                for start in range(0, d, BLOCK_IN):
                    ks = start + tl.arange(0, BLOCK_IN)
                    k_ok = ks < d
                    xk = tl.load(x_ptr + row * d + ks, mask=k_ok, other=0.0).to(tl.float32)
                    offs = e.to(tl.int64) * d * f + ks[:, None] * f + cols[None, :]
                    both = k_ok[:, None] & col_ok[None, :]
                    wg = tl.load(w_gate_ptr + offs, mask=both, other=0.0).to(tl.float32)
                    wu = tl.load(w_up_ptr + offs, mask=both, other=0.0).to(tl.float32)
                    acc_gate += tl.sum(xk[:, None] * wg, axis=0)
                    acc_up += tl.sum(xk[:, None] * wu, axis=0)
                hidden = acc_gate * tl.sigmoid(acc_gate) * acc_up
                tl.store(hidden_ptr + pair * f + cols, hidden.to(hidden_ptr.dtype.element_ty), mask=col_ok)

    @triton.jit
    def routed_down_kernel(
        hidden_ptr, experts_ptr, gates_ptr, w_down_ptr, n_pairs, f, d, y_ptr,
        BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
    ):
        e = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        col_ok = cols < d
        for pair in range(0, n_pairs):
            if tl.load(experts_ptr + pair) == e:
                acc = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
                for start in range(0, f, BLOCK_IN):
                    ks = start + tl.arange(0, BLOCK_IN)
                    k_ok = ks < f
                    hk = tl.load(hidden_ptr + pair * f + ks, mask=k_ok, other=0.0).to(tl.float32)
                    offs = e.to(tl.int64) * f * d + ks[:, None] * d + cols[None, :]
                    w = tl.load(w_down_ptr + offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                    acc += tl.sum(hk[:, None] * w, axis=0)
                gate = tl.load(gates_ptr + pair).to(tl.float32)
                tl.store(y_ptr + pair * d + cols, (acc * gate).to(y_ptr.dtype.element_ty), mask=col_ok)

    return routed_up_kernel, routed_down_kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def routed_moe(x, experts, gates, w_gate, w_up, w_down):
    """The two kernels launched from PyTorch: ``x`` [N, d], ``experts`` [N, k] (int32), ``gates``
    [N, k] -> ``y`` [N, k, d] (sum over k for the layer's output). Runs on CUDA tensors, or on CPU
    tensors under ``TRITON_INTERPRET=1``."""
    import torch

    up, down = kernels()
    n, top_k = experts.shape
    n_experts, d, f = w_gate.shape
    experts = experts.to(torch.int32).contiguous()
    hidden = torch.empty(n, top_k, f, dtype=x.dtype, device=x.device)
    y = torch.empty(n, top_k, d, dtype=x.dtype, device=x.device)
    up[(n_experts, _cdiv(f, BLOCK_OUT))](
        x.contiguous(), experts, w_gate.contiguous(), w_up.contiguous(), n * top_k, top_k, d, f, hidden,
        BLOCK_OUT=BLOCK_OUT, BLOCK_IN=BLOCK_IN,
    )
    down[(n_experts, _cdiv(d, BLOCK_OUT))](
        hidden, experts, gates.contiguous(), w_down.contiguous(), n * top_k, f, d, y,
        BLOCK_OUT=BLOCK_OUT, BLOCK_IN=BLOCK_IN,
    )
    return y


# ----------------------------------------------------------------------------- TensorRT plugins


def require_triton() -> None:
    """Triton compiles the plugins' kernels when TensorRT builds an engine (not when it runs one)."""
    from tandem.errors import ToolchainMissingError

    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ToolchainMissingError(
            "TensorRT engines of the reasoning stage embed tandem's routed MoE kernels, compiled by Triton at build "
            "time: install the CUDA build of torch (it brings its triton) or pip install triton"
        ) from exc


def compile_kernel(op: str, element: str, target=None):
    """``op``'s kernel (UP or DOWN) compiled by Triton for ``element`` (fp32, fp16, bf16): for the
    GPU at hand, or for ``target`` (a ``triton.backends.compiler.GPUTarget``; PTX needs no GPU).
    Argument order is what TensorRT's AOT plugins launch with: input pointers, int32 scalars,
    output pointer."""
    import triton

    up, down = kernels()
    kernel, scalars = (up, 4) if op == UP else (down, 3)
    kinds = [f"*{element}", "*i32", f"*{element}", f"*{element}", *["i32"] * scalars, f"*{element}", "constexpr", "constexpr"]
    source = triton.compiler.ASTSource(
        fn=kernel, signature=dict(zip(kernel.arg_names, kinds, strict=True)), constexprs={"BLOCK_OUT": BLOCK_OUT, "BLOCK_IN": BLOCK_IN}
    )
    return triton.compile(source, target=target) if target is not None else triton.compile(source)


@functools.cache
def register_plugins():
    """Register both plugins with TensorRT's quickly deployable plugin registry (once per process):
    shapes, the types they take, and their ahead-of-time compiled Triton kernels."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(f"{PLUGIN_NAMESPACE}::{UP}")
    def up_desc(x: trtp.TensorDesc, experts: trtp.TensorDesc, w_gate: trtp.TensorDesc, w_up: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr((x.shape_expr[0], experts.shape_expr[1], w_gate.shape_expr[2]), dtype=x.dtype)

    @trtp.register(f"{PLUGIN_NAMESPACE}::{DOWN}")
    def down_desc(hidden: trtp.TensorDesc, experts: trtp.TensorDesc, gates: trtp.TensorDesc, w_down: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr((hidden.shape_expr[0], hidden.shape_expr[1], w_down.shape_expr[2]), dtype=hidden.dtype)

    @trtp.autotune(f"{PLUGIN_NAMESPACE}::{UP}")
    def up_types(x, experts, w_gate, w_up, outputs):
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, INT32, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16")]

    @trtp.autotune(f"{PLUGIN_NAMESPACE}::{DOWN}")
    def down_types(hidden, experts, gates, w_down, outputs):
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, INT32, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16")]

    def element_of(desc) -> str:
        return {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}[desc.dtype]

    def launch(kernel, grid_x, grid_y, scalars):
        """One program per (expert, column block); the kernel's int32 scalars as shape expressions."""
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = grid_x, grid_y
        params.block_x = kernel.metadata.num_warps * 32
        params.shared_mem = kernel.metadata.shared
        return params, trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::{UP}")
    def up_aot(x, experts, w_gate, w_up, outputs, tactic):
        kernel = compile_kernel(UP, element_of(x))
        n, top_k = experts.shape_expr[0], experts.shape_expr[1]
        d, f = w_gate.shape_expr[1], w_gate.shape_expr[2]
        params, scalars = launch(kernel, w_gate.shape_expr[0], trtp.cdiv(f, BLOCK_OUT), (n * top_k, top_k, d, f))
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params, scalars

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::{DOWN}")
    def down_aot(hidden, experts, gates, w_down, outputs, tactic):
        kernel = compile_kernel(DOWN, element_of(hidden))
        n, top_k = experts.shape_expr[0], experts.shape_expr[1]
        f, d = w_down.shape_expr[1], w_down.shape_expr[2]
        params, scalars = launch(kernel, w_down.shape_expr[0], trtp.cdiv(d, BLOCK_OUT), (n * top_k, f, d))
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params, scalars

    return (f"{PLUGIN_NAMESPACE}::{UP}", f"{PLUGIN_NAMESPACE}::{DOWN}")


# ----------------------------------------------------------------------------- ONNX rewrite


@dataclass(frozen=True)
class RoutedLayer:
    """One dense MoE layer found in an ONNX graph."""

    x: str  # the layer's input rows [N, d]
    experts: str  # TopK indices [N, k]
    gates: str  # renormalised TopK weights [N, k]
    w_gate: str
    w_up: str
    w_down: str
    output: str  # the layer's output [N, d] (the ReduceSum over experts)


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph) -> dict:
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def find_dense_moe_layers(model: onnx.ModelProto) -> list[RoutedLayer]:
    """Every dense MoE layer of the export's standard-op graph (MoEFeedForward's dense form:
    ScatterElements of the renormalised TopK weights into zero gates, Expand of the rows over the
    experts, MatMuls against the three stacks, gates applied, ReduceSum over experts)."""
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    initializers = {i.name for i in graph.initializer}
    layers = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or not node.input[1].endswith("w_gate"):
            continue
        prefix = node.input[1][: -len("w_gate")]
        expand = producers.get(node.input[0])
        unsqueeze = producers.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
            raise ValueError(f"{node.name}: the rows reach the expert MatMul through {expand.op_type if expand else 'nothing'}, not Unsqueeze -> Expand")
        down = next((c for c in graph.node if c.op_type == "MatMul" and c.input[1] == prefix + "w_down"), None)
        if down is None:
            raise ValueError(f"no MatMul reads {prefix}w_down")
        gated = [c for c in consumers.get(down.output[0], []) if c.op_type == "Mul"]
        reduce = [c for g in gated for c in consumers.get(g.output[0], []) if c.op_type == "ReduceSum"]
        if len(gated) != 1 or len(reduce) != 1:
            raise ValueError(f"{down.name}: the experts' outputs are not gated and summed (Mul -> ReduceSum)")
        scatter = next((n for n in _walk_up(gated[0], producers) if n.op_type == "ScatterElements"), None)
        if scatter is None:
            raise ValueError(f"{gated[0].name}: the gates do not come from a ScatterElements of the routing")
        layers.append(
            RoutedLayer(
                x=unsqueeze.input[0], experts=scatter.input[1], gates=scatter.input[2],
                w_gate=prefix + "w_gate", w_up=prefix + "w_up", w_down=prefix + "w_down", output=reduce[0].output[0],
            )
        )
    return layers


def _walk_up(node, producers, limit: int = 6):
    todo, depth = [node], 0
    while todo and depth < limit:
        nxt = []
        for n in todo:
            for name in n.input:
                p = producers.get(name)
                if p is not None:
                    yield p
                    nxt.append(p)
        todo, depth = nxt, depth + 1


def route_moe_layers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every dense MoE layer replaced by the two routed plugin nodes (and the dense
    nodes only they used removed); returns the model and how many layers were replaced."""
    layers = find_dense_moe_layers(model)
    if not layers:
        return model, 0
    graph = model.graph
    producers = _producers(graph)
    replaced = {layer.output for layer in layers}
    nodes = [n for n in graph.node if not (set(n.output) & replaced)]
    for i, layer in enumerate(layers):
        tag = f"routed_moe_{i}"
        reduce_axes = onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), f"{tag}_axes")
        graph.initializer.append(reduce_axes)
        # the layer's output replaces the old ReduceSum's in place: insert after its producer chain
        new = [
            helper.make_node("Cast", [layer.experts], [f"{tag}_experts"], name=f"{tag}_experts", to=onnx.TensorProto.INT32),
            helper.make_node(
                UP, [layer.x, f"{tag}_experts", layer.w_gate, layer.w_up], [f"{tag}_hidden"], name=f"{tag}_up",
                domain=PLUGIN_NAMESPACE, plugin_namespace=PLUGIN_NAMESPACE, aot=1,
            ),
            helper.make_node(
                DOWN, [f"{tag}_hidden", f"{tag}_experts", layer.gates, layer.w_down], [f"{tag}_y"], name=f"{tag}_down",
                domain=PLUGIN_NAMESPACE, plugin_namespace=PLUGIN_NAMESPACE, aot=1,
            ),
            helper.make_node("ReduceSum", [f"{tag}_y", f"{tag}_axes"], [layer.output], name=f"{tag}_sum", keepdims=0),
        ]
        anchor = max(nodes.index(producers[name]) for name in (layer.x, layer.experts, layer.gates) if name in producers)
        nodes[anchor + 1 : anchor + 1] = new
    del graph.node[:]
    graph.node.extend(_live(nodes, graph))
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == PLUGIN_NAMESPACE for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLUGIN_NAMESPACE, 1))
    return model, len(layers)


def _live(nodes: list, graph) -> list:
    """``nodes`` less those whose outputs nothing (no node, no graph output) reads."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(nodes):
        if set(node.output) & needed:
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]
