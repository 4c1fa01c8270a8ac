"""Triton python-backend model ``reasoning``: prompts -> scene tokens, the whole autoregressive loop
in-process (one prefill, then one decode step per token over the static KV cache).

All requests Triton's dynamic batcher hands to one ``execute`` call become ONE batched generation
(:meth:`tandem.pipeline.Pipeline.generate_tokens` right-pads the prompts and samples every row
with its own seed, temperature and top-k). A bad request gets its own error response; the rest of
the batch is still served. Imported only inside Triton's python backend stub."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from tandem.errors import TandemError
from tandem.serving.interface import PROMPT, SCENE_TOKENS, SEED, TEMPERATURE, TOP_K
from tandem.serving.models.common import (
    Activity,
    DrainingError,
    check_prompts,
    failure_message,
    load_pipeline,
    model_parameters,
    parse_prompts,
    parse_sampling,
)


def error_response(message: str, code: str = "INVALID_ARG") -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))


def refusal(exc: Exception) -> "pb_utils.InferenceResponse":
    return error_response(str(exc), "UNAVAILABLE" if isinstance(exc, DrainingError) else "INVALID_ARG")


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = f"{args['model_repository']}/{args['model_version']}"
        self.pipeline = load_pipeline(version_dir, model_parameters(config), args.get("model_instance_kind", "CPU"))
        self.max_prompt_len = self.pipeline.config.reasoning.max_prompt_len
        self.activity = Activity()
        pb_utils.Logger.log_info(
            f"reasoning: {self.pipeline.config.name} on {self.pipeline.runtime.describe()}, "
            f"{self.pipeline.config.scene.num_tokens} scene tokens per prompt"
        )

    def parse(self, request) -> tuple[list[str], list]:
        self.activity.admit()
        prompts = parse_prompts(_input(request, PROMPT))
        check_prompts(prompts, self.max_prompt_len)
        params = parse_sampling(len(prompts), _input(request, SEED), _input(request, TEMPERATURE), _input(request, TOP_K))
        return prompts, params

    def execute(self, requests: list) -> list:
        with self.activity.busy():
            return self._execute(requests)

    def _execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        prompts, params, owners = [], [], []
        for index, request in enumerate(requests):
            try:
                rows, row_params = self.parse(request)
            except TandemError as exc:
                responses[index] = refusal(exc)
                continue
            prompts += rows
            params += row_params
            owners += [index] * len(rows)
        if prompts:
            try:
                tokens = self.pipeline.generate_tokens(prompts, params)
            except Exception as exc:  # one failure answers every request of the batch, and the model keeps serving
                message = failure_message("generation", exc)
                for index in set(owners):
                    responses[index] = error_response(message)
                return responses
            flat = tokens.reshape(len(prompts), -1)
            owners_arr = np.asarray(owners)
            for index in sorted(set(owners)):
                rows = np.ascontiguousarray(flat[owners_arr == index], dtype=np.int32)
                responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(SCENE_TOKENS, rows)])
        return responses

    def finalize(self) -> None:
        self.pipeline = None
