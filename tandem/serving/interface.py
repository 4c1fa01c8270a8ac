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
# Cancellation for every client (written by the front door, read by the reasoning model): a fresh
# request parameter per inference request, and a marker file of that name in the folder this
# environment variable names once the client has gone (see tandem.serving.models.common).
REQUEST_ID_PARAMETER = "tandem_request_id"  # request parameter (string): 32 lowercase hex characters
CANCEL_DIR_ENV = "TANDEM_CANCEL_DIR"  # folder of cancellation markers, set by the server for tritonserver and its stubs

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


# -- HTTP JSON requests Triton 2.51 mishandles --------------------------------------------------------
# tritonserver's HTTP endpoint parses a JSON body's tensors before any model runs, and answers a
# client's mistake there with 500 (seed 2**64-1, 1.5 or "7" for an integer, a non-number for a
# float, a non-string for BYTES, a body that is not JSON) or truncates it silently (an INT32 of
# 2**40 arrives as 0: top_k "no limit", scene token 0). The front door runs check_json_request on
# a JSON infer body before forwarding it and answers 400 with the message.

_INTEGER_RANGES = {
    "INT8": (-(2**7), 2**7), "INT16": (-(2**15), 2**15), "INT32": (-(2**31), 2**31), "INT64": (-(2**63), 2**63),
    "UINT8": (0, 2**8), "UINT16": (0, 2**16), "UINT32": (0, 2**32), "UINT64": (0, 2**64),
}
_FLOATS = ("FP16", "FP32", "FP64", "BF16")
VALID_VALUES = {  # what each of tandem's inputs takes, for the messages
    SEED: "an integer in [0, 2**63)",
    TOP_K: "an integer in [0, 2**31) (0: no limit)",
    TEMPERATURE: "0 (greedy) or a number in [0.01, 10.0]",
    SCENE_TOKENS: "codebook indices (integers from 0 to the codebook size - 1)",
    PROMPT: "UTF-8 text, one string per row",
}


class ClientRequestError(ValueError):
    """A request the client must fix (HTTP 400 / gRPC INVALID_ARGUMENT); the message says how."""


def _flatten(data):
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def check_json_request(body: bytes | str | dict) -> dict:
    """Check a KServe v2 JSON infer request body the way tandem's inputs need it; returns the
    parsed body. Raises :class:`ClientRequestError` (answer 400) for what Triton 2.51 would answer
    with 500 or truncate: a body that is not a JSON object, a value outside its datatype's range
    or of the wrong JSON type. Inputs sent as binary data (``binary_data_size``) are not looked at."""
    import json as _json
    import math

    if not isinstance(body, dict):
        try:
            body = _json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientRequestError(f"the request body is not valid JSON ({exc}); send a KServe v2 JSON infer request") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs", []), list):
        raise ClientRequestError('the request body must be a JSON object with an "inputs" list (KServe v2 infer request)')
    for tensor in body.get("inputs", []):
        if not isinstance(tensor, dict) or "data" not in tensor:
            continue
        name, datatype = str(tensor.get("name", "?")), str(tensor.get("datatype", "")).upper()
        valid = VALID_VALUES.get(name)
        wants = f"; {name!r} takes {valid}" if valid else ""
        secret = name in (SCENE_TOKENS, RENDERED_TOKENS)  # error bodies never quote scene-token values
        for value in _flatten(tensor["data"]):
            shown = "a value" if secret else _json.dumps(value)[:40]
            if datatype in _INTEGER_RANGES:
                low, high = _INTEGER_RANGES[datatype]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ClientRequestError(f"input {name!r} ({datatype}) holds {shown}, not a JSON integer{wants}")
                if not low <= value < high:
                    raise ClientRequestError(
                        f"input {name!r} ({datatype}) holds {shown}, outside [{low}, {high}) (Triton would truncate or refuse it){wants}"
                    )
            elif datatype in _FLOATS:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ClientRequestError(f"input {name!r} ({datatype}) holds {shown}, not a finite JSON number{wants}")
            elif datatype == "BYTES":
                if not isinstance(value, str):
                    raise ClientRequestError(f"input {name!r} (BYTES) holds {shown}, not a JSON string{wants}")
            elif datatype == "BOOL" and not isinstance(value, bool):
                raise ClientRequestError(f"input {name!r} (BOOL) holds {shown}, not true or false")
    return body
