"""Precision in the graph: the casts and Q/DQ rewrites a toolchain's precision rules choose from.

TensorRT 11 builds strongly typed networks only: an engine runs each layer at the type its ONNX
graph gives it, so the precision of a build is decided here, in ordinary ONNX that this machine
can run and check, and never by builder flags. Every rewrite reads the graph it is given (op types,
initializers, which tensors are graph outputs); none knows a stage's tensor names.

Rewrites (which toolchain applies which is its ``precision_rules``, tandem.toolchains):

``fp16`` / ``bf16`` (TensorRT)
    AutoCast-style mixed precision: onnxconverter-common's float16 converter with a block list
    built from the graph (ModelOpt's AutoCast rules, which cannot be installed here): norms
    (ReduceMean/Pow/Sqrt/Reciprocal, *Normalization), Softmax/TopK, the MoE router (a MatMul/Gemm
    whose output feeds a Softmax that feeds a TopK), the output projection (a MatMul/Gemm writing
    a graph output: the sampling logits) and every op whose ONNX schema at the graph's opset has
    no kernel signature for the low type stay fp32; graph inputs and outputs keep their types. bf16
    is the fp16 graph retyped to bfloat16 (weights rounded from fp32). Which nodes stayed fp32 and
    why is recorded.
``int8`` / ``fp8`` (TensorRT)
    Explicit quantization: ONNX Runtime's ``quantize_static`` in QDQ format, symmetric (TensorRT
    needs zero points of 0), per-channel weights, activation scales calibrated on the feeds the
    fp32 pipeline produces for real captions; MatMul/Gemm/Conv inputs get Q/DQ pairs, sensitive
    nodes (router, logits) are excluded. fp8 uses float8 e4m3 with ONNX Runtime's distribution
    calibration.
``int8`` (CPU, ONNX Runtime)
    The decode step only (it is memory-bound: each token reads its experts' weights once).
    It starts from ONNX Runtime's own graph (``<graph>.ort.onnx``, where each MoE layer is one
    ``com.microsoft::MoE`` kernel that reads only the experts a token is routed to) and makes each
    ``MoE`` a ``com.microsoft::QMoE``: expert weights 8-bit, symmetric, one scale per block of 32
    along the reduction axis (the layout ONNX Runtime's CPU kernel runs on its MLAS int8 GEMMs).
    MatMuls with constant 2-D weights: ``MatMulNBits`` (8 bits, blocks of 32, int8 compute). The
    router (its logits choose the experts) and the sampling logits stay fp32. A graph without the
    MoE kernel (an export with no ONNX Runtime copy) has its experts as MatMuls over a constant
    ``[E, d, f]`` weight stack (the plain graph's dense MoE, which evaluates every expert with zero
    gates for the unchosen ones; or a ``Gather``/``GatherND`` of that stack per token), which
    ONNX Runtime's quantizers do not handle because the weight is 3-D: int8 weights (7-bit range,
    see INT8_WEIGHT_LIMIT) with one scale per expert and output column, multiplied with
    ``MatMulInteger``, the scales applied to the int32 result. Prefill (once per request) and
    refinement stay fp32.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tandem.errors import TandemError
from tandem.stages import GraphSpec

log = logging.getLogger(__name__)

NORM_OPS = frozenset(
    {
        "ReduceMean", "Pow", "Sqrt", "Reciprocal", "LayerNormalization", "InstanceNormalization",
        "GroupNormalization", "BatchNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
    }
)
PROBABILITY_OPS = frozenset({"Softmax", "LogSoftmax", "TopK"})
MOE_KERNEL_OPS = frozenset({"MoE", "QMoE"})  # com.microsoft: input 1 is the router's logits
MATMUL_OPS = frozenset({"MatMul", "Gemm"})
# onnxconverter-common writes ConstantOfShape's output type without converting its value attribute.
CONVERTER_UNSAFE_OPS = frozenset({"ConstantOfShape"})
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
INT8_BLOCK = 32  # weights per scale in MatMulNBits
INT8_ACCURACY_LEVEL = 4  # MatMulNBits computes in int8 (activations quantized per block)


@dataclass(frozen=True)
class Precision:
    """One precision: how its graphs are made and how close to fp32 they must stay."""

    name: str
    kind: str  # "float" (the export as is), "cast" (mixed precision), "qdq" (explicit quantization)
    description: str
    max_output_error: float  # per graph: max |out - fp32| / max |fp32| over the validation inputs
    max_accuracy_drop: float  # points of compositional accuracy below fp32 before the build refuses
    min_token_agreement: float  # greedy tokens equal to fp32's, fraction of positions


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "float", "the validated export, unchanged", 0.0, 0.0, 1.0),
        Precision("fp16", "cast", "fp16 with norms, softmax, router and logits in fp32 (AutoCast rules)", 0.02, 1.0, 0.98),
        Precision("bf16", "cast", "bf16 with norms, softmax, router and logits in fp32 (AutoCast rules)", 0.08, 1.0, 0.95),
        Precision("int8", "qdq", "int8 weights and activations (Q/DQ or ONNX Runtime integer kernels)", 0.15, 2.0, 0.95),
        Precision("fp8", "qdq", "float8 e4m3 weights and activations (Q/DQ)", 0.25, 2.0, 0.90),
    )
}


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise TandemError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


# ----------------------------------------------------------------------------- graph inspection


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)


def _type_name(elem_type: int) -> str:
    """ONNX's spelling of an element type in type constraints: float16, bfloat16, float8e4m3fn..."""
    return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()


def _accepts(op_type: str, opset: int, elem_type: int) -> bool:
    """Whether the op's ONNX schema at this opset admits the type for its first float input."""
    try:
        schema = onnx.defs.get_schema(op_type, opset)
    except onnx.defs.SchemaError:
        return False
    wanted = f"tensor({_type_name(elem_type)})"
    if not schema.inputs:
        return True
    constraint = schema.inputs[0].type_str
    for tc in schema.type_constraints:
        if tc.type_param_str == constraint:
            return wanted in tc.allowed_type_strs
    return wanted == constraint


def sensitive_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes that keep fp32 (and stay out of quantization), with the reason: the AutoCast rules."""
    graph = model.graph
    users = _consumers(graph)
    outputs = {o.name for o in graph.output}
    kept: dict[str, str] = {}
    # Everything computed from a MatMul/Gemm's graph output (the logits, which feed the in-graph
    # sampling: argmax, top-k, exp, cumulative sum) stays fp32, as the logits do.
    downstream = {o for node in graph.node if node.op_type in MATMUL_OPS for o in node.output if o in outputs}
    for node in graph.node:  # topological order
        if any(i in downstream for i in node.input):
            downstream.update(node.output)
            kept[node.name] = "reads a graph output (in-graph sampling of the logits)"
    for node in graph.node:
        if node.name in kept:
            continue
        if node.op_type in NORM_OPS:
            kept[node.name] = "normalisation"
        elif node.op_type in PROBABILITY_OPS:
            kept[node.name] = "softmax / top-k"
        elif node.op_type in MATMUL_OPS and any(o in outputs for o in node.output):
            kept[node.name] = "writes a graph output (sampling logits)"
        elif node.op_type in MATMUL_OPS:
            for user in users.get(node.output[0], []):
                if user.op_type == "Softmax" and any(u.op_type == "TopK" for u in users.get(user.output[0], [])):
                    kept[node.name] = "MoE router (feeds softmax -> top-k)"
                elif user.op_type in MOE_KERNEL_OPS and user.domain == "com.microsoft" and user.input[1] == node.output[0]:
                    kept[node.name] = "MoE router (its logits choose the MoE kernel's experts)"
    return kept


def unsupported_nodes(model: onnx.ModelProto, elem_type: int) -> dict[str, str]:
    """Float ops whose schema at the graph's opset has no signature for ``elem_type`` (e.g. Conv
    before opset 22 for bfloat16): they stay fp32 so the graph stays valid ONNX."""
    opset = _opset(model)
    type_name = _type_name(elem_type)
    kept = {}
    for node in model.graph.node:
        if node.op_type in CONVERTER_UNSAFE_OPS:
            kept[node.name] = "constant generator (kept exact)"
        elif node.domain in ("", "ai.onnx") and not _accepts(node.op_type, opset, elem_type):
            kept[node.name] = f"{node.op_type} has no {type_name} signature at opset {opset}"
    return kept


# ----------------------------------------------------------------------------- mixed precision (fp16 / bf16)


@dataclass
class RewriteRecord:
    """What a rewrite did to one graph, for the precision manifest."""

    method: str
    library: str
    kept_fp32: dict[str, str] = field(default_factory=dict)  # node -> reason
    quantized: list[str] = field(default_factory=list)  # nodes whose weights/inputs were quantized
    low_precision_nodes: int = 0
    notes: list[str] = field(default_factory=list)


def autocast(model: onnx.ModelProto, precision: str) -> tuple[onnx.ModelProto, RewriteRecord]:
    from onnxconverter_common import float16

    low = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    kept = {**unsupported_nodes(model, TensorProto.FLOAT16), **sensitive_nodes(model)}
    if low == TensorProto.BFLOAT16:
        kept.update(unsupported_nodes(model, TensorProto.BFLOAT16))
    blocked_ops = set(float16.DEFAULT_OP_BLOCK_LIST)
    model = _outputs_behind_identity(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns about every value it clamps to fp16's range
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=sorted(blocked_ops), node_block_list=sorted(kept)
        )
    kept.update({n.name: f"{n.op_type} on the converter's block list" for n in model.graph.node if n.op_type in blocked_ops})
    _restore_output_types(model, converted)
    if low == TensorProto.BFLOAT16:
        converted = _retype(converted, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    record = RewriteRecord(
        method=f"AutoCast-style mixed precision ({precision}), graph inputs/outputs kept fp32",
        library="onnxconverter-common float16 converter" + (", retyped to bfloat16" if precision == "bf16" else ""),
        kept_fp32=dict(sorted(kept.items())),
        low_precision_nodes=sum(1 for n in model.graph.node if n.name not in kept),
    )
    return converted, record


def _outputs_behind_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every graph output that nodes also read (the cache's ``present_key_{l}`` /
    ``new_key_{l}``, which attention reads as well) is written by an Identity of an inner value the
    readers use instead. The float16 converter's ``keep_io_types`` casts an output back to fp32 in
    place, so a node reading that output would get fp32 where its other inputs are fp16."""
    outputs = {o.name for o in model.graph.output}
    read = {i for n in model.graph.node for i in n.input} & outputs
    if not read:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inner = {name: f"{name}__value" for name in read}
    for node in graph.node:
        node.input[:] = [inner.get(i, i) for i in node.input]
        node.output[:] = [inner.get(o, o) for o in node.output]
    graph.node.extend(helper.make_node("Identity", [v], [k], name=f"{k}__output") for k, v in inner.items())
    for info in graph.value_info:
        if info.name in inner:
            info.name = inner[info.name]
    return model


def _restore_output_types(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """The converter's ``keep_io_types`` misses an output written by a node it was told to keep in
    fp32 (it types the output fp16 anyway): cast any such output back, so the graph keeps the
    stage description's interface."""
    wanted = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    graph = converted.graph
    for output in graph.output:
        if output.type.tensor_type.elem_type == wanted[output.name]:
            continue
        low = f"{output.name}__before_output_cast"
        for node in graph.node:
            node.output[:] = [low if o == output.name else o for o in node.output]
            node.input[:] = [low if i == output.name else i for i in node.input]
        graph.node.append(helper.make_node("Cast", [low], [output.name], to=wanted[output.name], name=f"{output.name}__output_cast"))
        output.type.tensor_type.elem_type = wanted[output.name]


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return values.astype(np.float32).astype(ml_dtypes.bfloat16)


def _retype(model: onnx.ModelProto, old: int, new: int) -> onnx.ModelProto:
    """Every tensor of type ``old`` becomes ``new``: initializers, Cast targets, constants, value infos."""
    convert = _to_bfloat16 if new == TensorProto.BFLOAT16 else (lambda a: a.astype(helper.tensor_dtype_to_np_dtype(new)))
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == old:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(convert(numpy_helper.to_array(init)), init.name))
    for info in (*graph.value_info, *graph.input, *graph.output):
        if info.type.tensor_type.elem_type == old:
            info.type.tensor_type.elem_type = new
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == old:
                attr.i = new
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == old:
                attr.t.CopyFrom(numpy_helper.from_array(convert(numpy_helper.to_array(attr.t)), attr.t.name))
    return model


def emulate_on_float32(model: onnx.ModelProto, low: int = TensorProto.BFLOAT16) -> onnx.ModelProto:
    """The same graph computed in fp32 with every ``low``-typed tensor rounded to ``low`` (a Cast
    round trip after each op that writes one, weights stored as their rounded values): for
    running a bf16 graph's generation where ONNX Runtime's CPU provider has no bf16 kernels. The
    rounding is the real graph's; accumulation inside an op is fp32, as in TensorRT's bf16 GEMMs."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    for i, init in enumerate(graph.initializer):
        if init.data_type == low:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in graph.node:
        rounded = [o for o in node.output if types.get(o) == low]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == low:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == low:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        renamed = {o: f"{o}__unrounded" for o in rounded}
        node.output[:] = [renamed.get(o, o) for o in node.output]
        nodes.append(node)
        for original, raw in renamed.items():
            nodes.append(helper.make_node("Cast", [raw], [f"{original}__low"], to=low, name=f"{original}__round"))
            nodes.append(helper.make_node("Cast", [f"{original}__low"], [original], to=TensorProto.FLOAT, name=f"{original}__widen"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for info in (*graph.input, *graph.output):
        if info.type.tensor_type.elem_type == low:
            info.type.tensor_type.elem_type = TensorProto.FLOAT
    return model


# ----------------------------------------------------------------------------- explicit quantization (Q/DQ)


class _FeedsReader:
    """ONNX Runtime's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # pragma: no cover - not every ORT version calls it
        pass


def quantize_qdq(
    model: onnx.ModelProto, precision: str, calibration: list[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto, RewriteRecord]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise TandemError(f"{precision} needs calibration feeds; none were recorded")
    if precision == "fp8":
        # ONNX Runtime's distribution calibrator (the one float8 scales come from) stacks every
        # feed's values per tensor, so it takes one input shape: the most common one.
        signature = [tuple(v.shape for v in feed.values()) for feed in calibration]
        common = max(set(signature), key=signature.count)
        calibration = [feed for feed, sig in zip(calibration, signature) if sig == common]
    kept = sensitive_nodes(model)
    candidates = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in kept]
    qtype = {"int8": QuantType.QInt8, "fp8": QuantType.QFLOAT8E4M3FN}[precision]
    method = CalibrationMethod.MinMax if precision == "int8" else CalibrationMethod.Distribution
    with tempfile.TemporaryDirectory(prefix="tandem-qdq-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / f"{precision}.onnx"
        onnx.save_model(model, str(source))
        with _quiet():
            quantize_static(
                str(source),
                str(target),
                _FeedsReader(calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=qtype,
                weight_type=qtype,
                per_channel=precision == "int8",
                calibrate_method=method,
                nodes_to_quantize=candidates,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        quantized = onnx.load(str(target))
    record = RewriteRecord(
        method=f"explicit quantization ({precision} Q/DQ, symmetric, {method.name} calibration on {len(calibration)} recorded feeds)",
        library="onnxruntime.quantization.quantize_static",
        kept_fp32=dict(sorted(kept.items())),
        quantized=[n for n in candidates if _has_qdq_input(quantized, n)],
    )
    return quantized, record


def _has_qdq_input(model: onnx.ModelProto, node_name: str) -> bool:
    produced_by = {o: n for n in model.graph.node for o in n.output}
    node = next((n for n in model.graph.node if n.name == node_name), None)
    return node is not None and any(
        produced_by.get(i) is not None and produced_by[i].op_type == "DequantizeLinear" for i in node.input
    )


class _quiet:
    """ONNX Runtime's quantizers log a pre-processing suggestion at WARNING, print calibration
    progress and warn about empty histograms: none of it is for the user."""

    def __enter__(self):
        import contextlib
        import io

        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        self._stdout = contextlib.redirect_stdout(io.StringIO())  # its calibrators print progress
        self._stdout.__enter__()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        self._stdout.__exit__(*exc)
        logging.getLogger().setLevel(self._level)


# ----------------------------------------------------------------------------- CPU int8 (ONNX Runtime integer kernels)


# MLAS's uint8 x int8 kernels on x86 without VNNI (AVX2) add pairs of 8-bit products in int16
# and saturate: weights keep 7 bits of magnitude (|q| <= 63, ONNX Runtime's ``reduce_range``) so
# 2 * 255 * 63 fits.
INT8_WEIGHT_LIMIT = 63


def _int8_per_column(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output column of each matrix: [..., d, f] -> int8, [..., 1, f]."""
    scale = np.abs(weights).max(axis=-2, keepdims=True).astype(np.float32) / INT8_WEIGHT_LIMIT
    scale[scale == 0] = 1.0
    return np.clip(np.round(weights / scale), -INT8_WEIGHT_LIMIT, INT8_WEIGHT_LIMIT).astype(np.int8), scale


def quantize_gathered_experts(model: onnx.ModelProto, exclude: Iterable[str] = ()) -> list[str]:
    """Rewrite, in place, every MatMul whose weight is a constant 3-D float ``[E, d, f]`` expert
    stack: read directly (the plain export's dense MoE, every expert evaluated with zero gates for
    the unchosen ones) or through a Gather/GatherND whose result only feeds MatMuls as their weight
    (a per-token sparse MoE). The weights become int8 with a scale per expert and output column (the
    gathered variant gathers int8 weights and scales instead), the MatMul becomes
    DynamicQuantizeLinear + MatMulInteger, and the scales are applied to its int32 result."""
    graph = model.graph
    inits, users = _initializers(graph), _consumers(graph)
    excluded = set(exclude)
    rewritten, replaced, nodes = [], set(), []

    def expert_stack(name: str | None) -> bool:
        return name in inits and inits[name].data_type == TensorProto.FLOAT and len(inits[name].dims) == 3

    def int8_stack(data: str, prefix: str) -> None:
        q, scale = _int8_per_column(numpy_helper.to_array(inits[data]))
        graph.initializer.extend(
            [numpy_helper.from_array(q, f"{prefix}_weight"), numpy_helper.from_array(scale, f"{prefix}_scale")]
        )

    def integer_matmul(reader: onnx.NodeProto, weight: str, scale: str) -> list[onnx.NodeProto]:
        k = f"{reader.name}__int8"
        return [
            helper.make_node("DynamicQuantizeLinear", [reader.input[0]], [f"{k}_x", f"{k}_xs", f"{k}_xz"], name=f"{k}_quantize"),
            helper.make_node("MatMulInteger", [f"{k}_x", weight, f"{k}_xz"], [f"{k}_acc"], name=f"{k}_matmul"),
            helper.make_node("Cast", [f"{k}_acc"], [f"{k}_accf"], to=TensorProto.FLOAT, name=f"{k}_cast"),
            helper.make_node("Mul", [f"{k}_accf", f"{k}_xs"], [f"{k}_y"], name=f"{k}_scale_x"),
            helper.make_node("Mul", [f"{k}_y", scale], [reader.output[0]], name=f"{k}_scale_w"),
        ]

    for node in graph.node:
        if node.op_type == "MatMul" and node.name not in excluded and expert_stack(node.input[1]):
            prefix = f"{node.name}__int8"  # dense experts: the constant stack is the MatMul's weight
            int8_stack(node.input[1], prefix)
            nodes += integer_matmul(node, f"{prefix}_weight", f"{prefix}_scale")
            replaced.add(node.name)
            rewritten.append(node.name)
            continue
        data = node.input[0] if node.op_type in ("Gather", "GatherND") and node.input else None
        readers = users.get(node.output[0], []) if data else []
        if (
            expert_stack(data)
            and readers
            and all(r.op_type == "MatMul" and r.input[1] == node.output[0] and r.name not in excluded for r in readers)
        ):
            prefix = f"{node.name}__int8"
            int8_stack(data, prefix)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            nodes.append(helper.make_node(node.op_type, [f"{prefix}_weight", node.input[1]], [f"{prefix}_w"], name=f"{prefix}_gather_w", **attrs))
            nodes.append(helper.make_node(node.op_type, [f"{prefix}_scale", node.input[1]], [f"{prefix}_s"], name=f"{prefix}_gather_s", **attrs))
            for reader in readers:
                nodes += integer_matmul(reader, f"{prefix}_w", f"{prefix}_s")
                replaced.add(reader.name)
            replaced.add(node.name)
            rewritten.append(node.name)
    kept_nodes = [n for n in graph.node if n.name not in replaced]
    # The rewritten nodes must sit where their inputs exist: append them after their producers by
    # re-sorting topologically (the readers' inputs come before the gathers' consumers).
    _replace_nodes(graph, kept_nodes, nodes)
    _drop_unused_initializers(graph)
    return rewritten


QMOE_BITS = 8
QMOE_BLOCK = 32  # weights per scale along the reduction axis: ONNX Runtime's CPU QMoE runs block-wise 8-bit on MLAS int8 GEMMs


def _qmoe_blockwise(weights: np.ndarray, block: int = QMOE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``[E, N, K]`` float -> uint8 ``[E, N, K]`` (symmetric, stored with an offset of 128) and float
    scales ``[E, N, K / block]``: the QMoE kernel's 8-bit block-wise layout."""
    experts, rows, depth = weights.shape
    blocks = weights.reshape(experts, rows, depth // block, block)
    scale = np.abs(blocks).max(axis=-1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(blocks / scale[..., None]), -128, 127).astype(np.int16) + 128
    return q.reshape(experts, rows, depth).astype(np.uint8), scale.astype(np.float32)


def quantize_moe_kernels(model: onnx.ModelProto) -> list[str]:
    """Rewrite, in place, every ``com.microsoft::MoE`` whose expert weights are constant ``[E, N, K]``
    stacks (fc1 with gate and up rows, fc2) into a ``com.microsoft::QMoE`` with 8-bit block-wise
    weights; the routing and activation attributes carry over unchanged."""
    graph = model.graph
    inits = _initializers(graph)
    rewritten, replaced, added = [], set(), []
    for node in graph.node:
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        names = list(node.input) + [""] * (5 - len(node.input))
        fc1, fc2 = names[2], names[4]
        if any(b for b in names[3:4] + names[5:]) or fc1 not in inits or fc2 not in inits:
            raise TandemError(f"{node.name}: a MoE kernel with biases, a third expert matrix or computed weights has no int8 rewrite here")
        stacks = {}
        for label, name in (("fc1", fc1), ("fc2", fc2)):
            weights = numpy_helper.to_array(inits[name])
            if weights.ndim != 3 or weights.shape[-1] % QMOE_BLOCK:
                raise TandemError(f"{node.name}: {label} {list(weights.shape)} is not [E, N, K] with K a multiple of {QMOE_BLOCK}")
            q, scale = _qmoe_blockwise(weights)
            prefix = f"{node.name}__q{label}"
            graph.initializer.extend([numpy_helper.from_array(q, f"{prefix}_weight"), numpy_helper.from_array(scale, f"{prefix}_scale")])
            stacks[label] = (f"{prefix}_weight", f"{prefix}_scale")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs.update(expert_weight_bits=QMOE_BITS, block_size=QMOE_BLOCK)
        added.append(
            helper.make_node(
                "QMoE", [names[0], names[1], *stacks["fc1"], "", *stacks["fc2"], ""], list(node.output),
                name=f"{node.name}__int8", domain="com.microsoft", **attrs,
            )
        )
        replaced.add(node.name)
        rewritten.append(node.name)
    _replace_nodes(graph, [n for n in graph.node if n.name not in replaced], added)
    _drop_unused_initializers(graph)
    return rewritten


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)


def _replace_nodes(graph: onnx.GraphProto, kept: list[onnx.NodeProto], added: list[onnx.NodeProto]) -> None:
    """Set the graph's nodes to ``kept`` + ``added`` in topological order."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(kept) + list(added)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise TandemError(f"rewritten graph has nodes whose inputs are never produced: {[n.name for n in rest][:5]}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def quantize_cpu_int8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, RewriteRecord]:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    kept = sensitive_nodes(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    kernels = quantize_moe_kernels(model)
    experts = kernels + quantize_gathered_experts(model, exclude=kept)
    inits = _initializers(model.graph)
    dense = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.name not in kept and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]
    # Per-block int8 (32 values a scale) with int8 compute: per-tensor dynamic activation scales
    # (quantize_dynamic) lose the attention projections to activation outlier channels.
    settings = dict(block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=INT8_ACCURACY_LEVEL, bits=8)
    with _quiet():
        quantizer = MatMulNBitsQuantizer(
            model, nodes_to_exclude=[n.name for n in model.graph.node if n.name not in dense],
            algo_config=DefaultWeightOnlyQuantConfig(**settings), **settings,
        )
        quantizer.process()
    quantized = quantizer.model.model
    record = RewriteRecord(
        method=(
            "int8 weights: constant 2-D MatMuls as MatMulNBits (8 bits, blocks of "
            f"{INT8_BLOCK}, int8 compute); "
            + (
                f"each com.microsoft MoE kernel as QMoE ({QMOE_BITS}-bit expert weights, blocks of {QMOE_BLOCK})"
                if kernels
                else "the MoE expert stacks (dense [E, d, f] MatMuls, or gathered per token) as int8 with a scale per "
                "expert and output column, multiplied by MatMulInteger on activations quantized at run time"
            )
        ),
        library="onnxruntime.quantization.matmul_nbits_quantizer + "
        + ("tandem's MoE -> QMoE rewrite" if kernels else "tandem's gathered-expert rewrite"),
        kept_fp32=dict(sorted(kept.items())),
        quantized=sorted(dense + experts),
    )
    return quantized, record


# ----------------------------------------------------------------------------- weight-only int8 (Q/DQ on weights)


def quantize_weights_qdq(model: onnx.ModelProto, experts_only: bool = False) -> tuple[onnx.ModelProto, RewriteRecord]:
    """Weight-only int8 in Q/DQ form: every constant float weight a MatMul/Gemm/Conv reads (directly
    or through a Gather/GatherND of experts) becomes an int8 initializer with a symmetric
    per-output-channel scale behind a DequantizeLinear; activations stay in float. TensorRT runs
    it as weight-only int8 (weights move at a quarter of the bytes); ONNX Runtime computes it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    kept = sensitive_nodes(model)
    inits, users = _initializers(graph), _consumers(graph)

    def weight_readers(name: str) -> list[onnx.NodeProto]:
        readers = []
        for user in users.get(name, []):
            if user.op_type in ("Gather", "GatherND") and user.input[0] == name:
                readers += weight_readers(user.output[0])
            elif user.op_type in QUANTIZED_OPS and len(user.input) > 1 and user.input[1] == name:
                readers.append(user)
            else:
                return []  # read as something other than a weight: leave it alone
        return readers

    quantized, nodes = [], []
    for name, init in list(inits.items()):
        if init.data_type != TensorProto.FLOAT or len(init.dims) < 2:
            continue
        readers = weight_readers(name)
        if not readers or any(r.name in kept for r in readers):
            continue
        if experts_only and len(init.dims) < 3:
            # The reasoning stage's 2-D projections (attention, embeddings' heads) stay fp32: rounding
            # them moves the router's input enough to flip top-2 expert choices (measured on tiny:
            # prefill error 0.66 of range with them int8, 0.026 with the experts alone), and the
            # expert stacks are most of the bytes anyway.
            for reader in readers:
                kept.setdefault(reader.name, "2-D projection kept fp32 (expert routing is sensitive to its rounding)")
            continue
        weights = numpy_helper.to_array(init)
        gemm_transposed = readers[0].op_type == "Gemm" and any(a.name == "transB" and a.i for a in readers[0].attribute)
        # The output-channel axis: Conv [out, in, kh, kw] -> 0; MatMul [.., d, f] -> last; Gemm with transB -> 0.
        axis = 0 if readers[0].op_type == "Conv" or gemm_transposed else weights.ndim - 1
        if any((r.op_type == "Conv") != (readers[0].op_type == "Conv") for r in readers):
            continue
        reduce = tuple(i for i in range(weights.ndim) if i != axis)
        scale = (np.abs(weights).max(axis=reduce) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        shape = [1] * weights.ndim
        shape[axis] = -1
        q = np.clip(np.round(weights / scale.reshape(shape)), -127, 127).astype(np.int8)
        graph.initializer.remove(init)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}__int8"),
                numpy_helper.from_array(scale, f"{name}__scale"),
                numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}__zero_point"),
            ]
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [f"{name}__int8", f"{name}__scale", f"{name}__zero_point"], [name], axis=axis, name=f"{name}__dequantize"
            )
        )
        quantized += [r.name for r in readers]
    _replace_nodes(graph, list(graph.node), nodes)
    record = RewriteRecord(
        method="weight-only int8 Q/DQ (symmetric, per output channel); activations in float",
        library="tandem (onnx.helper): ONNX Runtime's quantize_static quantizes activations too",
        kept_fp32=dict(sorted(kept.items())),
        quantized=sorted(quantized),
    )
    return model, record


# ----------------------------------------------------------------------------- per-target rewrites

Rewrite = Callable[[onnx.ModelProto, list[dict[str, np.ndarray]]], tuple[onnx.ModelProto, RewriteRecord]]


def cast_to(precision: str) -> Rewrite:
    return lambda model, calibration: autocast(model, precision)


def qdq(precision: str) -> Rewrite:
    return lambda model, calibration: quantize_qdq(model, precision, calibration)


def weights_int8(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, RewriteRecord]:
    return quantize_weights_qdq(model, experts_only=True)  # the reasoning stage: see quantize_weights_qdq


def cpu_int8(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, RewriteRecord]:
    return quantize_cpu_int8(model)


def is_decode(spec: GraphSpec) -> bool:
    """The graph that runs once per generated token: a reasoning graph with no prompt axis (and no
    block axis: the verify graph of parallel decoding stays fp32 until its int8 error is gated on
    its own feeds)."""
    return spec.stage == "reasoning" and "prompt_len" not in spec.dims and "block" not in spec.dims


# Which rewrite each toolchain applies for each precision is the toolchain's own
# (``precision_rules`` on each object in tandem.toolchains).


def iter_low_precision_types(model: onnx.ModelProto) -> Iterator[str]:
    """Element types present in a graph's initializers and casts (for the manifest)."""
    seen = set()
    for init in model.graph.initializer:
        seen.add(init.data_type)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type in ("Cast", "QuantizeLinear") and attr.name in ("to", "output_dtype") and attr.i:
                seen.add(attr.i)
    for t in sorted(seen):
        yield _type_name(t)
