"""The KServe transformer in front of the refinement InferenceService (the graph's second hop).

Why it exists: an InferenceGraph ``Sequence`` step with ``data: $response`` posts the previous
step's response body unchanged, and a v2 *response* (``{"outputs": [...]}``) is not a v2 request
(``{"inputs": [...]}``), so Triton would refuse it; and a Sequence returns only its last step's
response, so the scene tokens would be lost (kserve/kserve#3051, #3639). This transformer takes
reasoning's v2 response on its v1 route (which accepts any JSON body), sends refinement a v2
request carrying only ``scene_tokens``, and returns a v2-shaped response with ``image`` *and*
``scene_tokens``.

It never logs tensor values: errors name tensors, shapes and types only. Run it as the transformer
container: ``python -m tandem.deploy.hop --model_name refinement`` (KServe adds
``--predictor_host``; the manifest sets ``--predictor_protocol v2``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tandem.serving.interface import IMAGE, REFINEMENT, SCENE_TOKENS

log = logging.getLogger(__name__)


class HopError(ValueError):
    """The body that reached the hop is not reasoning's response (a wrong graph wiring or client)."""


def scene_tokens_from_response(body: Any) -> np.ndarray:
    """Reasoning's v2 response JSON -> scene tokens INT32 [B, N]. Names and shapes in errors, never values."""
    if not isinstance(body, dict) or not isinstance(body.get("outputs"), list):
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise HopError(f"expected reasoning's v2 response with an 'outputs' list, got {keys}; the graph's refinement step needs data: $response")
    matches = [o for o in body["outputs"] if isinstance(o, dict) and o.get("name") == SCENE_TOKENS]
    if len(matches) != 1:
        names = [o.get("name") for o in body["outputs"] if isinstance(o, dict)]
        raise HopError(f"reasoning's response must carry exactly one {SCENE_TOKENS!r} output, it has {names}")
    tensor = matches[0]
    if tensor.get("datatype") != "INT32":
        raise HopError(f"{SCENE_TOKENS} must be INT32, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise HopError(f"{SCENE_TOKENS} must have shape [batch, tokens], got {shape!r}")
    try:
        tokens = np.asarray(tensor.get("data"), dtype=np.int64).reshape(shape)
    except (TypeError, ValueError):
        raise HopError(f"{SCENE_TOKENS} data does not hold {shape[0]}x{shape[1]} integers") from None
    info = np.iinfo(np.int32)
    if tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
        raise HopError(f"{SCENE_TOKENS} values do not fit INT32")
    return tokens.astype(np.int32)


def refinement_request(body: Any, model_name: str = REFINEMENT):
    """Reasoning's v2 response -> the v2 InferRequest refinement's Triton model takes."""
    from kserve import InferInput, InferRequest

    tokens = scene_tokens_from_response(body)
    tensor = InferInput(SCENE_TOKENS, list(tokens.shape), "INT32")
    tensor.set_data_from_numpy(tokens, binary_data=False)
    return InferRequest(model_name=model_name, infer_inputs=[tensor], request_id=body.get("id"))


def with_scene_tokens(response, request) -> dict:
    """Refinement's InferResponse plus the request's scene tokens -> one v2-shaped response dict."""
    from kserve import InferOutput

    names = [o.name for o in response.outputs]
    if IMAGE not in names:
        raise HopError(f"refinement returned {names}, not {IMAGE!r}")
    tokens = request.inputs[0].as_numpy()
    output = InferOutput(SCENE_TOKENS, list(tokens.shape), "INT32")
    output.set_data_from_numpy(tokens, binary_data=False)
    response.outputs = [o for o in response.outputs if o.name == IMAGE] + [output]  # the graph's answer: image + scene tokens
    body, _ = response.to_rest()
    return body


def hop_model_class():
    """The kserve.Model subclass (built lazily: kserve is in the ``deploy`` extra)."""
    import kserve
    from kserve.errors import InvalidInput

    class SceneTokenHop(kserve.Model):
        def __init__(self, name: str = REFINEMENT):
            super().__init__(name)
            self.ready = True

        async def preprocess(self, payload, headers=None):
            try:
                return refinement_request(payload, self.name)
            except HopError as exc:  # the caller's mistake: 400 with the reason, the hop keeps serving
                raise InvalidInput(str(exc)) from None

        async def predict(self, payload, headers=None, response_headers=None):
            response = await super().predict(payload, headers, response_headers)
            if isinstance(response, dict):
                response = kserve.InferResponse.from_rest(response)
            return with_scene_tokens(response, payload)

    return SceneTokenHop


def serve_on_inherited_socket(fd: int) -> None:
    """Make kserve's REST server accept on the listening socket ``fd`` (bound and listening already,
    inherited from the process that started this one) instead of binding ``--http_port`` itself.

    Picking a free port, closing it and letting the child bind it later is a race: any process can
    take the port in between and the child's uvicorn exits 3 ("address already in use"). With the
    socket bound by the parent and inherited, there is no window: the port is held from the moment
    the kernel picked it, and connections made before the server is up wait in its backlog."""
    import socket

    from kserve import model_server

    sock = socket.socket(fileno=fd)  # family and type read from the descriptor
    if sock.type != socket.SOCK_STREAM:
        raise SystemExit(f"--listen_fd {fd} is not a stream socket")
    base = model_server.RESTServer

    class InheritedSocketRESTServer(base):
        async def start(self):
            self.create_application()
            await self._server.serve(sockets=[sock])

    model_server.RESTServer = InheritedSocketRESTServer  # what ModelServer.start() builds in this process


def main(argv: list[str] | None = None) -> None:
    import argparse

    import kserve
    from kserve import model_server

    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.splitlines()[0])
    parser.add_argument("--listen_fd", type=int, default=None,
                        help="serve HTTP on this inherited, already listening socket instead of binding --http_port "
                        "(socket activation: the starting process binds port 0 and keeps it, so no port race)")
    args, _ = parser.parse_known_args(argv)
    if args.listen_fd is not None:
        if args.workers != 1:
            parser.error("--listen_fd serves one process; drop --workers or set --workers 1")
        serve_on_inherited_socket(args.listen_fd)
    model = hop_model_class()(args.model_name or REFINEMENT)
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
