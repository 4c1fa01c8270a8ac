"""ONNX graphs for Triton's native backends, speaking tandem's wire format.

The exported refinement graph maps int64 scene tokens [B, h, w] to float images [B, 3, H, W] in
[0, 1]; served models exchange INT32 tokens [B, h*w] and UINT8 images [B, H, W, 3]. Instead of a
python pre/post-processing model, the conversion is appended to the graph itself (onnx.helper),
computing exactly what :func:`tandem.pipeline.to_uint8` does: clip, scale by 255, add 0.5, cast
(truncation), transpose to HWC. The graph it wraps is the precision step's (fp16/bf16 casts, int8/fp8
Q/DQ) for TensorRT targets, and the precision is written into the wrapped graph's metadata
(``tandem.precision``); the tensorrt_plan model's config carries it as a parameter too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tandem.config import ModelConfig
from tandem.errors import ArtifactError
from tandem.serving.interface import IMAGE, RENDERED_TOKENS, SCENE_TOKENS
from tandem.util import atomic_write_path

EXTERNAL_DATA_THRESHOLD = 1 << 30  # as the exporter: protobuf caps a file at 2 GiB


PRECISION_KEY = "tandem.precision"  # metadata of the wrapped graph: the precision its engine runs at


def wrap_refinement(model: onnx.ModelProto, config: ModelConfig, precision: str = "fp32") -> onnx.ModelProto:
    """The refinement graph (fp32 export or precision graph) in the wire format; ``precision``
    names what the graph runs at, recorded in its metadata so the served engine says it too."""
    graph = model.graph
    names = [i.name for i in graph.input], [o.name for o in graph.output]
    if names != ([SCENE_TOKENS], [IMAGE]):
        raise ArtifactError(f"refinement graph has inputs/outputs {names}, expected ([{SCENE_TOKENS}], [{IMAGE}]); export again")
    h, w = config.scene.grid_height, config.scene.grid_width
    height, width = config.image_height, config.image_width
    tokens_i64, image_f32 = "tandem_scene_tokens_int64", "tandem_image_float"
    for node in graph.node:  # the original graph now reads and writes internal tensors
        node.input[:] = [tokens_i64 if n == SCENE_TOKENS else n for n in node.input]
        node.output[:] = [image_f32 if n == IMAGE else n for n in node.output]
    for info in graph.value_info:
        if info.name in (SCENE_TOKENS, IMAGE):
            info.name = tokens_i64 if info.name == SCENE_TOKENS else image_f32
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1, h, w], dtype=np.int64), "tandem_grid_shape"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "tandem_zero"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "tandem_one"),
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "tandem_255"),
            numpy_helper.from_array(np.array(0.5, dtype=np.float32), "tandem_half"),
        ]
    )
    pre = [
        helper.make_node("Cast", [SCENE_TOKENS], ["tandem_tokens_flat_i64"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["tandem_tokens_flat_i64", "tandem_grid_shape"], [tokens_i64]),
    ]
    post = [
        helper.make_node("Clip", [image_f32, "tandem_zero", "tandem_one"], ["tandem_image_clipped"]),
        helper.make_node("Mul", ["tandem_image_clipped", "tandem_255"], ["tandem_image_scaled"]),
        helper.make_node("Add", ["tandem_image_scaled", "tandem_half"], ["tandem_image_rounded"]),
        helper.make_node("Cast", ["tandem_image_rounded"], ["tandem_image_uint8"], to=TensorProto.UINT8),
        helper.make_node("Transpose", ["tandem_image_uint8"], [IMAGE], perm=[0, 2, 3, 1]),
        helper.make_node("Identity", [SCENE_TOKENS], [RENDERED_TOKENS]),  # the tokens rendered, for the ensemble
    ]
    nodes = [*pre, *graph.node, *post]
    for prop in list(model.metadata_props):
        if prop.key == PRECISION_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=PRECISION_KEY, value=precision)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(SCENE_TOKENS, TensorProto.INT32, ["batch", h * w]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(IMAGE, TensorProto.UINT8, ["batch", height, width, 3]))
    graph.output.append(helper.make_tensor_value_info(RENDERED_TOKENS, TensorProto.INT32, ["batch", h * w]))
    onnx.checker.check_model(model)
    return model


def write_wire_format_refinement(source: Path, target: Path, config: ModelConfig, precision: str = "fp32") -> Path:
    model = wrap_refinement(onnx.load(str(source)), config, precision)
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    with atomic_write_path(target) as tmp:
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=f"{target.name}.data")
        else:
            onnx.save_model(model, str(tmp))
    return target
