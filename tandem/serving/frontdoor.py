"""The front door: what clients of ``tandem serve`` connect to, in front of tritonserver.

tritonserver 2.51 has no option that caps an HTTP body or a gRPC message (``--help`` lists none), so
a 300 MB prompt is read, copied into the python backend's shared memory and only then refused by
the model's 62-byte check (red-team defect 6). This process listens on the public HTTP and gRPC
ports and forwards to a tritonserver bound to private loopback ports, refusing any request larger
than ``--max-request-bytes`` before it reads it:

- HTTP (aiohttp): a ``Content-Length`` over the limit is answered 413 at once, without reading the
  body; a chunked or compressed body is counted as it is read (decompressed, so a small gzip bomb
  is refused too) and refused at the limit.
- gRPC (grpc.aio, every method of Triton's ``inference.GRPCInferenceService`` and the standard
  health service, forwarded as bytes): the server's ``grpc.max_receive_message_length`` refuses a
  larger message from its length prefix with RESOURCE_EXHAUSTED; deadlines and cancellation pass
  through (a client that gives up cancels the upstream call), and TLS / mutual TLS terminate here.

Everything else (status codes, error bodies, the restricted-API key headers, Triton's binary
tensor extension) passes through unchanged. It logs refusals by size and nothing of a body: prompts
and scene tokens never reach its log.

Run by :class:`tandem.serving.server.TritonServer`; ``python -m tandem.serving.frontdoor --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import sys

READY_LINE = "tandem front door ready"
GRPC_SERVICES = ("/inference.GRPCInferenceService/", "/grpc.health.v1.Health/")
GRPC_STREAM_METHODS = {"/inference.GRPCInferenceService/ModelStreamInfer"}
# Headers that describe one connection, not the request (RFC 9110 7.6.1), plus the ones aiohttp
# recomputes: the body is forwarded decompressed and re-framed.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "content-encoding",
}
GRPC_RESERVED_METADATA = {"user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}

log = logging.getLogger("tandem.frontdoor")


def too_large_message(size: int | None, limit: int) -> str:
    got = f"of {size} bytes " if size is not None else ""
    return (
        f"request body {got}exceeds this server's limit of {limit} bytes (sized from the model's limits: the longest "
        "prompt and the largest batch); send a smaller request, or start the server with a larger "
        "`tandem serve --max-request-bytes`"
    )


# -- HTTP -----------------------------------------------------------------------------------------------
def http_app(upstream: str, limit: int):
    from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

    async def on_startup(app: web.Application) -> None:
        # auto_decompress off: a compressed response passes through as Triton sent it.
        app["session"] = ClientSession(
            connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None), auto_decompress=False
        )

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    def refuse(size: int | None) -> web.Response:
        log.warning("refused an HTTP request body %s over the %d-byte limit", f"of {size} bytes" if size else "", limit)
        return web.json_response({"error": too_large_message(size, limit)}, status=413)

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > limit:
            return refuse(request.content_length)  # answered before a byte of the body is read
        try:
            body = await request.read()  # client_max_size: stops reading at the limit (decompressed bytes)
        except web.HTTPRequestEntityTooLarge:
            return refuse(None)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            async with request.app["session"].request(
                request.method, upstream + request.rel_url.path_qs, headers=headers, data=body if body else None,
                allow_redirects=False,
            ) as response:
                payload = await response.read()
                out = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP - {"content-encoding"}]
                return web.Response(status=response.status, body=payload, headers=_multidict(out))
        except ClientError as exc:
            return web.json_response(
                {"error": f"the model server behind the front door did not answer ({type(exc).__name__}); it may be "
                          "starting or stopping: retry, or check the `tandem serve` log"},
                status=502,
            )

    app = web.Application(client_max_size=limit)
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def _multidict(pairs):
    from multidict import CIMultiDict

    return CIMultiDict(pairs)


# -- gRPC -----------------------------------------------------------------------------------------------
def grpc_handler(channel):
    """A generic handler forwarding Triton's gRPC services as raw bytes over ``channel``."""
    import grpc

    def metadata(context) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(
            (m.key, m.value) for m in context.invocation_metadata()
            if not m.key.startswith(":") and m.key not in GRPC_RESERVED_METADATA
        )

    def unary(method: str):
        call = channel.unary_unary(method)

        async def handle(request: bytes, context):
            try:
                return await call(request, metadata=metadata(context), timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return grpc.unary_unary_rpc_method_handler(handle)

    def stream(method: str):
        call = channel.stream_stream(method)

        async def handle(requests, context):
            upstream = call(requests, metadata=metadata(context), timeout=context.time_remaining())
            try:
                async for response in upstream:
                    yield response
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return grpc.stream_stream_rpc_method_handler(handle)

    class Forward(grpc.GenericRpcHandler):
        def __init__(self) -> None:
            self._handlers: dict[str, object] = {}

        def service(self, details):
            method = details.method
            if not method.startswith(GRPC_SERVICES):
                return None  # UNIMPLEMENTED, as Triton answers an unknown service
            if method not in self._handlers:
                self._handlers[method] = stream(method) if method in GRPC_STREAM_METHODS else unary(method)
            return self._handlers[method]

    return Forward()


async def serve(args: argparse.Namespace) -> None:
    import grpc
    from aiohttp import web

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runner = web.AppRunner(http_app(f"http://{args.http_upstream}", args.max_request_bytes), access_log=None)
    await runner.setup()
    host, port = args.http_listen.rsplit(":", 1)
    await web.TCPSite(runner, host, int(port), reuse_address=True).start()

    channel = grpc.aio.insecure_channel(
        args.grpc_upstream,
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", args.max_request_bytes)],
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", args.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail to bind, not share it
        ]
    )
    server.add_generic_rpc_handlers((grpc_handler(channel),))
    if args.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(_read(args.tls_key), _read(args.tls_cert))],
            root_certificates=_read(args.tls_client_ca) if args.tls_client_ca else None,
            require_client_auth=bool(args.tls_client_ca),
        )
        server.add_secure_port(args.grpc_listen, credentials)
    else:
        server.add_insecure_port(args.grpc_listen)
    await server.start()
    print(READY_LINE, flush=True)
    await stop.wait()
    # tritonserver has drained and stopped before the front door is told to stop.
    await server.stop(grace=1.0)
    await channel.close()
    await runner.cleanup()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.serving.frontdoor", description=__doc__.split("\n\n")[0])
    p.add_argument("--http-listen", required=True, metavar="HOST:PORT")
    p.add_argument("--http-upstream", required=True, metavar="HOST:PORT")
    p.add_argument("--grpc-listen", required=True, metavar="HOST:PORT")
    p.add_argument("--grpc-upstream", required=True, metavar="HOST:PORT")
    p.add_argument("--max-request-bytes", type=int, required=True)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="front door: %(message)s", stream=sys.stderr)
    try:
        asyncio.run(serve(args))
    except (OSError, RuntimeError) as exc:  # a port that cannot be bound, unreadable certificates
        taken = getattr(exc, "errno", None) == errno.EADDRINUSE or "Failed to bind" in str(exc)
        why = "a port is already in use (stop whatever holds it, or choose another port)" if taken else str(exc)
        print(f"front door failed: {why}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
