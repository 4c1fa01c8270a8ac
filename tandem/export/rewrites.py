"""Graph rewrites at export: how a toolchain's graphs may differ from the standard-op graphs of
:mod:`tandem.stages`. Which rewrites a toolchain's graphs get is its ``graph_rewrites``
(tandem.toolchains); ONNX Runtime's are part of the export format
(:data:`tandem.formats.export_manifest.ONNXRUNTIME_GRAPH_REWRITES`).

The plain export (``<graph>.onnx``) uses standard ONNX ops only (its MoE layers dense: every
expert over every row); TensorRT builds from it, its optimise step replacing each MoE layer with
the routed plugin pair of :mod:`tandem.compiler.tensorrt_moe`. ONNX Runtime loads
``<graph>.ort.onnx``, exported from the same modules with the rewrites below and then optimised
offline; both are validated against PyTorch. AOTInductor's optimise step traces the modules with
torch.export and its toolchain's rewrites; Neuron traces the modules as they are.

- ``moe_kernel`` (ONNX Runtime): each Mixture-of-Experts layer becomes one ``com.microsoft`` ``MoE``
  node. Its CPU kernel routes in place (softmax, top-k, renormalised weights: our routing) and runs
  each expert over only the rows routed to it, reading the weights where they are: no per-token
  gather of expert weights (the sparse form) and no unrouted experts (the dense form). Verified on
  onnxruntime 1.32 CPU: ``activation_type="swiglu"`` with ``swiglu_fusion=1`` computes
  ``silu(gate) * up`` from fc1 rows interleaved as [gate_0, up_0, gate_1, up_1, ...]
  ([E, 2 * d_ff, d_model]); fc2 is [E, d_model, d_ff].
- ``routed_experts`` (AOTInductor: ``cpu-aot``, ``cuda-torch``): each MoE layer evaluates each
  expert over only the rows routed to it (:meth:`MoEFeedForward.forward_routed`: ``nonzero`` over
  the routing, ``index_select`` of the rows, matmuls against a view of the expert's weights,
  ``index_add`` back), so the exported program reads only the experts some row picked. PyTorch's
  grouped GEMM (``torch.nn.functional.grouped_mm``) would be the maintained kernel for this, but in
  torch 2.13 its shape function (the one torch.export traces with) accepts only bf16 and fp8
  inputs, and these graphs are fp32.
- ``capturable_experts`` (AOTInductor on CUDA: ``cuda-torch``): the decode graph's MoE layers take
  :meth:`MoEFeedForward.forward_capturable` (the picked experts found on the device, padded to a
  static ``min(E, batch * top_k)`` slots, their weights gathered by index and run with ``bmm``: no
  ``nonzero``, no data-dependent shape, no host synchronisation), so the whole decode step,
  sampling included, can be captured and replayed as one CUDA graph; it never reads an expert no
  row picked. The other reasoning graphs (prefill, verify: many rows, not graphed) keep
  ``routed_experts``. Verified on the CPU only (numerics equal to the dense form, routed-only
  checks); not yet timed on a GPU (``benchmarks/device_check.py`` does that when one is lent).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tandem.models import Stages
from tandem.models.reasoning import MoEFeedForward
from tandem.stages import GraphSpec

DECODE_GRAPH = "reasoning_decode"

REWRITES = ("moe_kernel", "routed_experts", "capturable_experts")  # every rewrite this module knows
MOE_REWRITES = frozenset(REWRITES)  # the rewrites that replace the MoE layers (the reasoning stage's)


def rewrites_for(rewrites: tuple[str, ...], spec: GraphSpec) -> tuple[str, ...]:
    """The ``rewrites`` that change ``spec``'s graph (the MoE layers live in the reasoning stage;
    ``capturable_experts`` is the decode graph's, the other reasoning graphs get ``routed_experts``)."""
    chosen = tuple(r for r in rewrites if r not in MOE_REWRITES or spec.stage == "reasoning")
    if "capturable_experts" in chosen and spec.name != DECODE_GRAPH:
        chosen = tuple("routed_experts" if r == "capturable_experts" else r for r in chosen)
    return chosen


def pack_moe_weights(moe: MoEFeedForward) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 [E, 2f, d] with gate and up rows interleaved, fc2 [E, d, f] (the MoE kernel's layout)."""
    gate, up = moe.w_gate.detach().transpose(1, 2), moe.w_up.detach().transpose(1, 2)  # [E, f, d]
    fc1 = torch.stack([gate, up], dim=2).reshape(moe.n_experts, 2 * moe.d_ff, -1).contiguous()
    fc2 = moe.w_down.detach().transpose(1, 2).contiguous()
    return fc1, fc2


@functools.cache
def _moe_op():
    """``tandem::moe_kernel``: a custom op the exporter translates into ``com.microsoft::MoE``. Its
    eager body computes the same thing from the packed weights (used by tests of the packing)."""

    @torch.library.custom_op("tandem::moe_kernel", mutates_args=())
    def moe_kernel(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, top_k: int) -> torch.Tensor:
        probs = torch.softmax(router_logits, dim=-1)
        weights, experts = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for slot in range(top_k):
            w1, w2 = fc1[experts[:, slot]], fc2[experts[:, slot]]  # [N, 2f, d], [N, d, f]
            hidden = torch.bmm(w1, x.unsqueeze(-1)).squeeze(-1)  # [N, 2f]
            hidden = F.silu(hidden[:, 0::2]) * hidden[:, 1::2]
            out = out + weights[:, slot : slot + 1] * torch.bmm(w2, hidden.unsqueeze(-1)).squeeze(-1)
        return out

    @moe_kernel.register_fake
    def _(x, router_logits, fc1, fc2, top_k):
        return torch.empty_like(x)

    return moe_kernel


@functools.cache
def _moe_translation():
    import onnxscript
    from onnxscript import FLOAT

    moe = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", _moe_schema())

    def moe_kernel(x: FLOAT, router_logits: FLOAT, fc1: FLOAT, fc2: FLOAT, top_k: int) -> FLOAT:
        return moe(
            x, router_logits, fc1, None, fc2,
            k=top_k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
            activation_alpha=1.0, activation_beta=0.0,
        )

    return moe_kernel


def _moe_schema():
    """The part of ONNX Runtime's com.microsoft::MoE signature we use (the onnx package registers no
    com.microsoft schemas, and onnxscript needs one to build the node)."""
    from onnx.defs import OpSchema

    def tensor(name: str, option=OpSchema.FormalParameterOption.Single):
        return OpSchema.FormalParameter(name, "T", param_option=option)

    attribute = OpSchema.Attribute
    return OpSchema(
        "MoE",
        "com.microsoft",
        1,
        inputs=[
            tensor("input"),
            tensor("router_probs"),
            tensor("fc1_experts_weights"),
            tensor("fc1_experts_bias", OpSchema.FormalParameterOption.Optional),
            tensor("fc2_experts_weights"),
        ],
        outputs=[tensor("output")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[
            attribute("k", OpSchema.AttrType.INT, "experts per token"),
            attribute("activation_type", OpSchema.AttrType.STRING, ""),
            attribute("swiglu_fusion", OpSchema.AttrType.INT, ""),
            attribute("normalize_routing_weights", OpSchema.AttrType.INT, ""),
            attribute("activation_alpha", OpSchema.AttrType.FLOAT, ""),
            attribute("activation_beta", OpSchema.AttrType.FLOAT, ""),
        ],
    )


def _kernel_forward(moe: MoEFeedForward):
    op = _moe_op()
    fc1, fc2 = pack_moe_weights(moe)

    def evaluate(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        return op(flat, moe.router(flat), fc1, fc2, moe.top_k).reshape(shape)

    return evaluate


@contextlib.contextmanager
def graph_rewrites(rewrites: tuple[str, ...], stages: Stages) -> Iterator[dict]:
    """Within this block the stages' modules trace with ``rewrites`` applied; yields the exporter's
    ``custom_translation_table`` for them. Outside it they are unchanged."""
    unknown = set(rewrites) - set(REWRITES)
    if unknown:
        raise ValueError(f"unknown graph rewrites {sorted(unknown)}; known: {list(REWRITES)}")
    table: dict = {}
    if len(MOE_REWRITES.intersection(rewrites)) > 1:
        raise ValueError(f"graph rewrites {sorted(MOE_REWRITES.intersection(rewrites))} each replace the MoE layers; pick one")
    moes = [m for m in stages.reasoning.modules() if isinstance(m, MoEFeedForward)]
    try:
        if "routed_experts" in rewrites:
            for moe in moes:
                moe.evaluate = moe.forward_routed
        if "capturable_experts" in rewrites:
            for moe in moes:
                moe.evaluate = moe.forward_capturable
        if "moe_kernel" in rewrites:
            for moe in moes:
                moe.evaluate = _kernel_forward(moe)
            table[torch.ops.tandem.moe_kernel.default] = _moe_translation()
        yield table
    finally:
        for moe in moes:
            moe.evaluate = None
