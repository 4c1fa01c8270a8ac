"""Triton python-backend model ``refinement``: scene tokens [h*w] -> image [H, W, 3] uint8, plus
the tokens it rendered (``rendered_tokens``, the ensemble's ``scene_tokens`` output).

Tokens of every valid request in a dynamic batch are rendered in one run; a request with tokens
outside the codebook gets its own error and the others are still served. Each request's tokens are
zeroed in the stub's shared-memory region once read (they are private data). Imported only inside
Triton's python backend stub."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from tandem.errors import TandemError
from tandem.serving.interface import IMAGE, RENDERED_TOKENS, SCENE_TOKENS
from tandem.serving.models.common import (
    Activity,
    failure_message,
    load_pipeline,
    model_parameters,
    parse_scene_tokens,
    zero_tensor,
)
from tandem.serving.models.reasoning import error_response


def _forget(tensor) -> None:
    """Zero the request's scene tokens where they live (the stub's shared-memory region) once read."""
    try:
        if tensor is not None:
            zero_tensor(tensor)
    except Exception as exc:  # hygiene only: never costs a request its answer
        pb_utils.Logger.log_warn(f"refinement: could not clear scene tokens from shared memory ({type(exc).__name__})")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = f"{args['model_repository']}/{args['model_version']}"
        self.pipeline = load_pipeline(version_dir, model_parameters(config), args.get("model_instance_kind", "CPU"))
        self.codebook_size = self.pipeline.config.scene.codebook_size
        self.activity = Activity()  # no admission check: a draining server still finishes the ensemble's second step
        pb_utils.Logger.log_info(f"refinement: {self.pipeline.config.name} on {self.pipeline.runtime.describe()}")

    def execute(self, requests: list) -> list:
        with self.activity.busy():
            return self._execute(requests)

    def _execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        batches, owners = [], []
        for index, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, SCENE_TOKENS)
            try:
                tokens = parse_scene_tokens(tensor.as_numpy(), self.pipeline.grid, self.codebook_size)  # a copy
            except TandemError as exc:
                responses[index] = error_response(str(exc))
                continue
            finally:
                _forget(tensor)
            batches.append(tokens)
            owners += [index] * len(tokens)
        if batches:
            try:
                grids = np.concatenate(batches)
                flat_tokens = grids.reshape(len(grids), -1)
                images = self.pipeline.render(grids)
            except Exception as exc:
                message = failure_message("rendering", exc)
                for index in set(owners):
                    responses[index] = error_response(message)
                return responses
            owners_arr = np.asarray(owners)
            for index in sorted(set(owners)):
                rows = np.ascontiguousarray(images[owners_arr == index])
                tokens = np.ascontiguousarray(flat_tokens[owners_arr == index], dtype=np.int32)
                outputs = [pb_utils.Tensor(IMAGE, rows), pb_utils.Tensor(RENDERED_TOKENS, tokens)]
                responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
        return responses

    def finalize(self) -> None:
        self.pipeline = None
