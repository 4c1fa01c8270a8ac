"""The served interface: model names, tensor names and Triton data types, in one place.

The repository writer, the python-backend models and the client all read these, so the wire
format cannot drift between them. Shapes come from the stage descriptions (:mod:`tandem.stages`)
of the config the artifacts were exported from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.config import ModelConfig
from tandem.stages import graph_specs

ENSEMBLE = "tandem"
REASONING = "reasoning"
REFINEMENT = "refinement"
SERVED_MODELS = (REASONING, REFINEMENT, ENSEMBLE)

PROMPT = "prompt"
SEED = "seed"
TEMPERATURE = "temperature"
TOP_K = "top_k"
SCENE_TOKENS = "scene_tokens"
IMAGE = "image"
# refinement also returns the tokens it rendered. The ensemble's scene_tokens output comes from
# there, not from reasoning: Triton 2.51 fails every ensemble request for a subset of its outputs
# ("unexpected deadlock") when an ensemble output is also the input of a later step.
RENDERED_TOKENS = "rendered_tokens"

# Parameters every generated config carries so clients and operators can see what is served.
PARAM_GRID = "tandem.grid"  # "<h>x<w>": scene tokens travel flat ([h*w], row-major); this restores the grid
PARAM_CODEBOOK = "tandem.codebook_size"
PARAM_CONFIG = "tandem.config"
PARAM_FINGERPRINT = "tandem.config_fingerprint"
PARAM_FLAVOR = "tandem.flavor"
# The largest well-formed request the model takes, in bytes: what `tandem serve`'s front door lets
# through (see request_size_limit and tandem.serving.frontdoor).
PARAM_MAX_REQUEST_BYTES = "tandem.max_request_bytes"


@dataclass(frozen=True)
class ServedTensor:
    name: str
    data_type: str  # model_config.proto DataType name, e.g. "TYPE_INT32"
    dims: tuple[int, ...]  # per request row; the batch axis is implicit (max_batch_size > 0)
    optional: bool = False

    @property
    def wire_type(self) -> str:
        """The datatype string of the KServe v2 protocol ("INT32", "BYTES")."""
        return "BYTES" if self.data_type == "TYPE_STRING" else self.data_type.removeprefix("TYPE_")

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.data_type == "TYPE_STRING" else np.dtype(_NUMPY[self.data_type])


_NUMPY = {
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_FP64": "float64",
    "TYPE_UINT8": "uint8",
}


@dataclass(frozen=True)
class ServedModel:
    name: str
    inputs: tuple[ServedTensor, ...]
    outputs: tuple[ServedTensor, ...]


# Temperature travels as FP64 and seed as INT64 so a served request samples exactly like an
# in-process SamplingParams(seed, temperature, top_k) (an FP32 temperature would round 0.8).
SAMPLING_INPUTS = (
    ServedTensor(SEED, "TYPE_INT64", (1,), optional=True),
    ServedTensor(TEMPERATURE, "TYPE_FP64", (1,), optional=True),
    ServedTensor(TOP_K, "TYPE_INT32", (1,), optional=True),
)


def served_models(config: ModelConfig) -> dict[str, ServedModel]:
    """The three served models of ``config``, keyed by name."""
    refine = graph_specs(config)["refinement"]
    _, h, w = refine.inputs[0].shape  # ("batch", h, w)
    _, _, height, width = refine.outputs[0].shape  # ("batch", 3, H, W)
    tokens = ServedTensor(SCENE_TOKENS, "TYPE_INT32", (int(h) * int(w),))
    image = ServedTensor(IMAGE, "TYPE_UINT8", (int(height), int(width), 3))
    prompt = ServedTensor(PROMPT, "TYPE_STRING", (1,))
    return {
        REASONING: ServedModel(REASONING, (prompt, *SAMPLING_INPUTS), (tokens,)),
        REFINEMENT: ServedModel(REFINEMENT, (tokens,), (image, ServedTensor(RENDERED_TOKENS, tokens.data_type, tokens.dims))),
        ENSEMBLE: ServedModel(ENSEMBLE, (prompt, *SAMPLING_INPUTS), (image, tokens)),
    }


# The inference protocol's envelope around the tensors: JSON or protobuf framing, tensor and
# parameter names, a request id, Triton's timeout and priority parameters. Generous: what matters
# is that a request is refused long before it is large enough to cost the server memory.
REQUEST_ENVELOPE_BYTES = 16 * 1024
JSON_CHARS_PER_PROMPT_BYTE = 6  # the worst case of JSON's escapes: \u00XX
JSON_CHARS_PER_NUMBER = 32  # an int32, int64 or float64 in JSON text, with its separator


def request_size_limit(config: ModelConfig, max_batch_size: int) -> int:
    """Bytes of the largest well-formed request any served model of ``config`` takes at
    ``max_batch_size`` rows, in either protocol (JSON text is the larger encoding): a prompt of
    ``max_prompt_len`` bytes, fully escaped, with its sampling inputs; or a row of scene tokens."""
    models = served_models(config)
    sampling = len(SAMPLING_INPUTS) * JSON_CHARS_PER_NUMBER
    prompt_row = JSON_CHARS_PER_PROMPT_BYTE * config.reasoning.max_prompt_len + sampling
    tokens_row = JSON_CHARS_PER_NUMBER * int(np.prod(models[REFINEMENT].inputs[0].dims))
    return REQUEST_ENVELOPE_BYTES + max_batch_size * max(prompt_row, tokens_row)
