"""The front door: what clients of ``tandem serve`` connect to, in front of tritonserver.

tritonserver 2.51 listens only on Unix sockets in a private (0700) work folder (see
:mod:`tandem.serving.server`), so no other local user can reach it; this one process owns the
public HTTP, gRPC and metrics ports and forwards to those sockets. It is the one place that:

- **caps request size before reading** (tritonserver 2.51 has no option for it): an HTTP
  ``Content-Length`` over ``max_request_bytes`` is answered 413 at once; a chunked or compressed
  body is counted as it is read; header bytes count towards the limit; gzip/deflate are
  decompressed with a bound on the output (so on CPU too), any other ``Content-Encoding`` (br, zstd)
  is refused 415 before a byte of it is read; a gRPC message over the limit is refused with
  RESOURCE_EXHAUSTED from its length prefix;
- **holds under abuse**: a connection cap that answers 503 and closes; an HTTP connection that has
  not sent complete request headers within ``header_timeout_s`` (from connect, or from its last
  response) is closed; a body that is not read within ``body_timeout_s`` is answered 408; gRPC
  connections must finish their handshake in ``header_timeout_s`` and idle ones are closed;
- **enforces the API keys** (admin and client restrictions, :mod:`tandem.serving.security`): the
  keys reach this process on its standard input, never on a command line, and tritonserver is given
  none (nobody but its owner can reach it). A refused call gets HTTP 403 / gRPC PERMISSION_DENIED
  with "This API is restricted, expecting header ...";
- **cancels for every client**: each inference request gets a fresh ``tandem_request_id``
  parameter (a client's own value is replaced); when the client disconnects (HTTP connection closed,
  gRPC call cancelled) or its gRPC deadline passes before the answer, an empty file of that name is
  created in ``cancel_dir``, which the reasoning model polls (see
  :mod:`tandem.serving.models.common`) and frees the row's slot;
- **is transparent otherwise**: status codes, error bodies, encodings (no ``Accept-Encoding`` is
  added upstream: a response is compressed only when the client asked), HEAD answered as GET
  without a body, deadlines passed through, TLS / mutual TLS terminated here.

It logs refusals by size and nothing of a body: prompts and scene tokens never reach its log.
Started by :class:`tandem.serving.server.TritonServer` with a :class:`FrontDoorConfig` as JSON on
standard input (``python -m tandem.serving.frontdoor < config.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import resource
import secrets
import signal
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tandem.serving.interface import ENSEMBLE, REASONING, REQUEST_ID_PARAMETER, ClientRequestError, check_json_request

READY_LINE = "tandem front door ready"
GRPC_SERVICES = ("/inference.GRPCInferenceService/", "/grpc.health.v1.Health/")
GRPC_STREAM_METHODS = {"/inference.GRPCInferenceService/ModelStreamInfer"}
GRPC_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
# Headers that describe one connection, not the request (RFC 9110 7.6.1), plus the ones recomputed
# here: the body is forwarded decompressed and re-framed.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "content-encoding",
}
RESPONSE_HOP_BY_HOP = HOP_BY_HOP - {"content-encoding"}  # a response keeps its encoding: the client asked for it
GRPC_RESERVED_METADATA = {"user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}
DECODABLE = {"identity", "gzip", "x-gzip", "deflate"}
GENERATING_MODELS = (ENSEMBLE, REASONING)  # what a draining server refuses here (refinement still serves)
DRAINING_MESSAGE = "the server is stopping and starts no new generations; retry on another replica or after the restart"
CANCEL_MARKER_TTL_S = 300.0  # markers nobody consumed (the request had finished) are swept after this

log = logging.getLogger("tandem.frontdoor")


@dataclass
class FrontDoorConfig:
    """What the front door serves and where it forwards; written by TritonServer, read here."""

    http_listen: tuple[str, int]
    grpc_listen: tuple[str, int]
    http_upstream: str  # path of tritonserver's HTTP Unix socket
    grpc_upstream: str  # gRPC target, e.g. unix:/path/grpc.sock:1
    max_request_bytes: int
    metrics_listen: tuple[str, int] | None = None
    metrics_upstream: str | None = None  # path of tritonserver's metrics Unix socket
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    restrictions: list[dict] = field(default_factory=list)  # [{"apis": [...], "header": str, "value": str}]
    cancel_dir: str | None = None
    drain_file: str | None = None  # exists once `tandem serve` drains: new generations are refused here
    max_connections: int = 1024  # per protocol
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    body_timeout_s: float = 30.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "FrontDoorConfig":
        data = json.loads(text)
        for key in ("http_listen", "grpc_listen", "metrics_listen"):
            if data.get(key) is not None:
                data[key] = (str(data[key][0]), int(data[key][1]))
        return cls(**data)


def too_large_message(size: int | None, limit: int) -> str:
    got = f"of {size} bytes " if size is not None else ""
    return (
        f"request {got}exceeds this server's limit of {limit} bytes, headers included (sized from the model's "
        "limits: the longest prompt and the largest batch); send a smaller request, or start the server with a "
        "larger `tandem serve --max-request-bytes`"
    )


# -- API groups (tritonserver's names, as its --http-restricted-api takes them) -----------------------
_MODEL = r"/v2/models/[^/]+(?:/versions/[0-9]+)?"
HTTP_API_PATTERNS = [
    (re.compile(r"/v2/health/(?:live|ready)"), "health"),
    (re.compile(_MODEL + r"/ready"), "health"),
    (re.compile(r"/v2/models(?:/[^/]+(?:/versions/[0-9]+)?)?/stats"), "statistics"),
    (re.compile(_MODEL + r"/config"), "model-config"),
    (re.compile(_MODEL + r"/(?:infer|generate|generate_stream)"), "inference"),
    (re.compile(_MODEL + r"/trace/setting"), "trace"),
    (re.compile(_MODEL), "metadata"),
    (re.compile(r"/v2"), "metadata"),
    (re.compile(r"/v2/repository(?:/.*)?"), "model-repository"),
    (re.compile(r"/v2/(?:systemsharedmemory|cudasharedmemory)(?:/.*)?"), "shared-memory"),
    (re.compile(r"/v2/trace/setting"), "trace"),
    (re.compile(r"/v2/logging"), "logging"),
]
INFER_PATH = re.compile(_MODEL + r"/infer")
GRPC_API_GROUPS = {
    "ServerLive": "health", "ServerReady": "health", "ModelReady": "health",
    "ServerMetadata": "metadata", "ModelMetadata": "metadata",
    "ModelInfer": "inference", "ModelStreamInfer": "inference",
    "ModelConfig": "model-config", "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository", "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory", "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory", "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory", "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace", "LogSettings": "logging",
}


def http_api_group(path: str) -> str | None:
    """The API group of a raw request path, or None for a path tritonserver does not serve (refused
    here, so a path the front door cannot classify never reaches it)."""
    for pattern, group in HTTP_API_PATTERNS:
        if pattern.fullmatch(path):
            return group
    return None


def grpc_api_group(method: str) -> str | None:
    if method.startswith("/grpc.health.v1.Health/"):
        return "health"
    if method.startswith("/inference.GRPCInferenceService/"):
        return GRPC_API_GROUPS.get(method.rsplit("/", 1)[1])
    return None


class Keys:
    """The restrictions: which header (and key) each API group needs."""

    def __init__(self, restrictions: list[dict]):
        self.by_api: dict[str, tuple[str, str]] = {}
        for r in restrictions:
            for api in r["apis"]:
                self.by_api[api] = (r["header"].lower(), r["value"])

    def missing(self, api: str, lookup) -> str | None:
        """The header a call to ``api`` lacks (None: allowed). ``lookup(name)`` reads a header."""
        need = self.by_api.get(api)
        if need is None:
            return None
        header, value = need
        sent = lookup(header)
        if isinstance(sent, bytes):
            sent = sent.decode("latin-1")
        if sent is not None and secrets.compare_digest(str(sent).encode(), value.encode()):
            return None
        return header


class CancelMarkers:
    """Files in ``cancel_dir`` naming requests whose client left (read by the reasoning model)."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        self._last_sweep = time.monotonic()

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def cancel(self, request_id: str) -> None:
        if self.folder is None:
            return
        with contextlib.suppress(OSError):
            (self.folder / request_id).touch()
        self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        if self.folder is None or now - self._last_sweep < 30:
            return
        self._last_sweep = now
        cutoff = time.time() - CANCEL_MARKER_TTL_S
        for marker in self.folder.iterdir():
            with contextlib.suppress(OSError):
                if marker.stat().st_mtime < cutoff:
                    marker.unlink()


def draining(config: FrontDoorConfig) -> bool:
    """The server is stopping: new generations are refused at the door, so what Triton still holds
    is exactly the work admitted before (the drain waits for it, and only for it)."""
    return bool(config.drain_file) and os.path.exists(config.drain_file)


def inject_request_id_json(body: bytes, header_length: int | None, request_id: str) -> tuple[bytes, int | None]:
    """``body`` with the KServe v2 JSON request's ``parameters.tandem_request_id`` set; with Triton's
    binary extension the JSON part is the first ``header_length`` bytes. Raises
    :class:`ClientRequestError` for a body tritonserver 2.51 would answer with a 500 or truncate
    (not JSON, an integer out of its datatype's range, ...): the client's mistake, answered 400."""
    head, rest = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    request = check_json_request(head)
    parameters = request.setdefault("parameters", {})
    if not isinstance(parameters, dict):
        raise ClientRequestError('"parameters" must be a JSON object (KServe v2 infer request)')
    parameters[REQUEST_ID_PARAMETER] = request_id
    new_head = json.dumps(request, separators=(",", ":")).encode()
    return new_head + rest, (None if header_length is None else len(new_head))


# -- HTTP -----------------------------------------------------------------------------------------------
class ConnectionGuard:
    """Per-protocol connection accounting shared by every connection of one listener."""

    def __init__(self, cap: int, header_timeout_s: float, idle_timeout_s: float, header_limit: int):
        self.cap, self.header_timeout_s, self.idle_timeout_s, self.header_limit = cap, header_timeout_s, idle_timeout_s, header_limit
        self.active = 0
        self.refused = 0
        self.by_transport: dict[object, "GuardedProtocol"] = {}

    def rearm(self, transport) -> None:
        protocol = self.by_transport.get(transport)
        if protocol is not None:
            protocol.await_headers(self.idle_timeout_s)


def _plain_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class GuardedProtocol(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: the connection cap, the header-read timeout and
    the header byte count happen here, before aiohttp parses anything."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard):
        self.inner, self.guard = inner, guard
        self.transport = None
        self.refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting = True
        self._header_bytes = 0
        self._tail = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.guard.active >= self.guard.cap:
            self.refused = True
            self.guard.refused += 1
            self._refuse("503 Service Unavailable",
                         f"the server has {self.guard.cap} open connections, its limit; retry shortly, or reuse a connection")
            return
        self.guard.active += 1
        self.guard.by_transport[transport] = self
        self.await_headers(self.guard.header_timeout_s)
        self.inner.connection_made(transport)

    def _refuse(self, status: str, message: str) -> None:
        """Answer and close without reading further. The write side closes at once; the
        connection is dropped a moment later, so what the client still sends is discarded instead of
        turning the close into a reset that would lose the answer."""
        self.refused = True
        self.transport.write(_plain_response(status, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(1.0, self.transport.abort)

    def await_headers(self, timeout: float) -> None:
        self._awaiting, self._header_bytes, self._tail = True, 0, b""
        self._arm(timeout)

    def _arm(self, timeout: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def _timed_out(self) -> None:
        if self._awaiting and self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self._awaiting:
            window = self._tail + data
            end = window.find(b"\r\n\r\n")
            if end >= 0:
                self._header_bytes += end + 4 - len(self._tail)
                self._awaiting = False
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            else:
                self._header_bytes += len(data)
                self._tail = window[-3:]
            if self._header_bytes > self.guard.header_limit:
                self._refuse("431 Request Header Fields Too Large", too_large_message(None, self.guard.header_limit))
                return
        self.inner.data_received(data)

    def eof_received(self):
        return None if self.refused else self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.guard.by_transport.pop(self.transport, None) is not None:  # not one refused at the cap
            self.guard.active -= 1
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class TooLarge(Exception):
    pass


async def read_body(request, allowed: int) -> bytes:
    """The request body, decoded, refusing past ``allowed`` bytes (raw or decoded)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    chunks, total = [], 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            break
        total += len(chunk)
        if total > allowed:
            raise TooLarge
        chunks.append(chunk)
    raw = b"".join(chunks)
    if encoding == "identity":
        return raw
    # gzip/x-gzip: gzip header; deflate: zlib-wrapped (RFC 9110), raw deflate accepted as browsers do
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    for bits in ((wbits,) if wbits != zlib.MAX_WBITS else (zlib.MAX_WBITS, -zlib.MAX_WBITS)):
        decoder = zlib.decompressobj(bits)
        try:
            out = decoder.decompress(raw, allowed + 1)  # bounded output: bounded time
        except zlib.error:
            continue
        if len(out) > allowed or decoder.unconsumed_tail:
            raise TooLarge
        return out
    raise ValueError(f"the body is not valid {encoding} data")


def header_bytes(request) -> int:
    line = len(request.method) + len(request.raw_path) + len("HTTP/1.1") + 4
    return line + sum(len(k) + len(v) + 4 for k, v in request.raw_headers) + 2


def http_app(config: FrontDoorConfig, keys: Keys, markers: CancelMarkers, guard: ConnectionGuard):
    from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector, web

    limit = config.max_request_bytes

    async def on_startup(app: web.Application) -> None:
        app["session"] = ClientSession(
            connector=UnixConnector(path=config.http_upstream, limit=0),
            timeout=ClientTimeout(total=None),
            auto_decompress=False,  # a compressed response passes through as Triton sent it
            skip_auto_headers=("Accept-Encoding", "User-Agent"),  # add nothing the client did not send
        )

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    def refuse(size: int | None) -> web.Response:
        log.warning("refused an HTTP request %s over the %d-byte limit", f"of {size} bytes" if size else "", limit)
        return error(413, too_large_message(size, limit))

    async def forward(request: web.Request) -> web.StreamResponse:
        try:
            return await _forward(request)
        finally:
            guard.rearm(request.transport)

    async def _forward(request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        api = http_api_group(path)
        if api is None:
            return error(404, f"no such endpoint: {request.method} {path[:200]} (see the KServe v2 protocol)")
        missing = keys.missing(api, request.headers.get)
        if missing is not None:
            return error(403, f"This API is restricted, expecting header '{missing}'")
        used = header_bytes(request)
        if request.content_length is not None and request.content_length + used > limit:
            return refuse(request.content_length + used)  # answered before a byte of the body is read
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in DECODABLE:
            return error(415, f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed, gzip or deflate")
        try:
            body = await asyncio.wait_for(read_body(request, max(0, limit - used)), config.body_timeout_s)
        except TooLarge:
            return refuse(None)
        except ValueError as exc:
            return error(400, f"{exc}; send the body as Content-Encoding says, or uncompressed")
        except asyncio.TimeoutError:
            return error(408, f"the request body was not received within {config.body_timeout_s:.0f} s; send it at once")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        request_id = None
        if request.method == "POST" and INFER_PATH.fullmatch(path):
            if draining(config) and path.split("/")[3] in GENERATING_MODELS:
                return error(503, DRAINING_MESSAGE)
            request_id = markers.new_id()
            length = request.headers.get("Inference-Header-Content-Length")
            try:
                body, new_length = inject_request_id_json(body, int(length) if length and length.isdigit() else None, request_id)
            except ClientRequestError as exc:
                return error(400, str(exc))
            if new_length is not None:
                headers = [(k, v) for k, v in headers if k.lower() != "inference-header-content-length"]
                headers.append(("Inference-Header-Content-Length", str(new_length)))
        method = "GET" if request.method == "HEAD" else request.method
        try:
            async with request.app["session"].request(
                method, "http://localhost" + request.raw_path, headers=headers, data=body if body else None,
                allow_redirects=False,
            ) as response:
                payload = await response.read()
                out = [(k, v) for k, v in response.headers.items() if k.lower() not in RESPONSE_HOP_BY_HOP]
                return web.Response(status=response.status, body=payload, headers=_multidict(out))
        except asyncio.CancelledError:  # the client went away (handler cancellation): free its slot
            if request_id is not None:
                markers.cancel(request_id)
            raise
        except ClientError as exc:
            return error(502, f"the model server behind the front door did not answer ({type(exc).__name__}); it may "
                              "be starting or stopping: retry, or check the `tandem serve` log")

    app = web.Application(client_max_size=limit)
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def metrics_app(config: FrontDoorConfig, guard: ConnectionGuard):
    """GET /metrics forwarded to tritonserver's metrics socket; nothing else."""
    from aiohttp import ClientError, ClientSession, UnixConnector, web

    async def on_startup(app: web.Application) -> None:
        app["session"] = ClientSession(connector=UnixConnector(path=config.metrics_upstream, limit=4),
                                       auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent"))

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def metrics(request: web.Request) -> web.StreamResponse:
        try:
            async with request.app["session"].get("http://localhost/metrics") as response:
                payload = await response.read()
                return web.Response(status=response.status, body=payload,
                                    content_type="text/plain", charset="utf-8")
        except ClientError as exc:
            return web.json_response({"error": f"metrics unavailable ({type(exc).__name__})"}, status=502)
        finally:
            guard.rearm(request.transport)

    app = web.Application(client_max_size=4096)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def _multidict(pairs):
    from multidict import CIMultiDict

    return CIMultiDict(pairs)


async def start_http(app, listen: tuple[str, int], guard: ConnectionGuard, handler_cancellation: bool):
    from aiohttp import web

    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=handler_cancellation, auto_decompress=False,
        keepalive_timeout=guard.idle_timeout_s, max_headers=128, max_field_size=8190, max_line_size=8190,
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    factory = runner.server
    server = await loop.create_server(lambda: GuardedProtocol(factory(), guard), listen[0], listen[1],
                                      reuse_address=True, backlog=1024)
    return runner, server


# -- gRPC -----------------------------------------------------------------------------------------------
def grpc_handler(channel, keys: Keys, markers: CancelMarkers, config: FrontDoorConfig):
    """A generic handler forwarding Triton's gRPC services as raw bytes over ``channel``."""
    import grpc

    def metadata(context) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(
            (m.key, m.value) for m in context.invocation_metadata()
            if not m.key.startswith(":") and m.key not in GRPC_RESERVED_METADATA
        )

    def lookup(context):
        sent = {m.key: m.value for m in context.invocation_metadata()}
        return lambda header: sent.get(GRPC_HEADER_PREFIX + header)

    def inject(request: bytes) -> tuple[bytes, str | None, str | None]:
        """(request with its id set, the id, the model it is for)"""
        from tritonclient.grpc import service_pb2

        try:
            message = service_pb2.ModelInferRequest.FromString(request)
        except Exception:  # noqa: BLE001 - not ours to judge: tritonserver answers it
            return request, None, None
        request_id = markers.new_id()
        message.parameters[REQUEST_ID_PARAMETER].string_param = request_id
        return message.SerializeToString(), request_id, message.model_name

    def unary(method: str, api: str):
        call = channel.unary_unary(method)

        async def handle(request: bytes, context):
            missing = keys.missing(api, lookup(context))
            if missing is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"This API is restricted, expecting header '{GRPC_HEADER_PREFIX}{missing}'")
            request_id = None
            if method == GRPC_INFER_METHOD:
                request, request_id, model = inject(request)
                if model in GENERATING_MODELS and draining(config):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            try:
                return await call(request, metadata=metadata(context), timeout=context.time_remaining())
            except asyncio.CancelledError:
                if request_id is not None:
                    markers.cancel(request_id)
                raise
            except grpc.aio.AioRpcError as exc:
                if request_id is not None and exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    markers.cancel(request_id)
                await context.abort(exc.code(), exc.details() or "")

        return grpc.unary_unary_rpc_method_handler(handle)

    def stream(method: str, api: str):
        call = channel.stream_stream(method)

        async def handle(requests, context):
            missing = keys.missing(api, lookup(context))
            if missing is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"This API is restricted, expecting header '{GRPC_HEADER_PREFIX}{missing}'")
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
            api = grpc_api_group(method)
            if api is None:
                return None  # UNIMPLEMENTED, as Triton answers an unknown method
            if method not in self._handlers:
                self._handlers[method] = stream(method, api) if method in GRPC_STREAM_METHODS else unary(method, api)
            return self._handlers[method]

    return Forward()


def raise_file_limit() -> int:
    """Raise the soft open-files limit to the hard one (each connection is a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


async def serve(config: FrontDoorConfig) -> None:
    import grpc

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    files = raise_file_limit()
    # every listener's cap together stays well inside the descriptor limit
    cap = max(16, min(config.max_connections, (files - 64) // 4))
    keys, markers = Keys(config.restrictions), CancelMarkers(config.cancel_dir)
    header_limit = min(config.max_request_bytes, 64 * 1024)
    http_guard = ConnectionGuard(cap, config.header_timeout_s, config.idle_timeout_s, header_limit)
    runner, http_server = await start_http(http_app(config, keys, markers, http_guard), config.http_listen, http_guard, True)
    metrics = None
    if config.metrics_listen is not None and config.metrics_upstream:
        metrics_guard = ConnectionGuard(cap, config.header_timeout_s, config.idle_timeout_s, 8192)
        metrics = await start_http(metrics_app(config, metrics_guard), config.metrics_listen, metrics_guard, False)

    channel = grpc.aio.insecure_channel(
        config.grpc_upstream,
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", config.max_request_bytes + 4096)],
    )
    timeout_ms = int(config.header_timeout_s * 1000)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail to bind, not share it
            ("grpc.server_handshake_timeout_ms", timeout_ms),  # half-open connections are closed
            ("grpc.max_connection_idle_ms", int(config.idle_timeout_s * 1000)),
            ("grpc.max_allowed_incoming_connections", cap),
            ("grpc.max_metadata_size", 16 * 1024),
            ("grpc.absolute_max_metadata_size", 16 * 1024),
        ]
    )
    server.add_generic_rpc_handlers((grpc_handler(channel, keys, markers, config),))
    grpc_listen = f"{config.grpc_listen[0]}:{config.grpc_listen[1]}"
    if ":" in config.grpc_listen[0]:
        grpc_listen = f"[{config.grpc_listen[0]}]:{config.grpc_listen[1]}"
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(_read(config.tls_key), _read(config.tls_cert))],
            root_certificates=_read(config.tls_client_ca) if config.tls_client_ca else None,
            require_client_auth=bool(config.tls_client_ca),
        )
        server.add_secure_port(grpc_listen, credentials)
    else:
        server.add_insecure_port(grpc_listen)
    await server.start()
    print(READY_LINE, flush=True)
    await stop.wait()
    # Closing every upstream connection here lets tritonserver stop at once (it waits for open
    # HTTP connections until its exit timeout otherwise).
    http_server.close()
    await server.stop(grace=0.5)
    await channel.close()
    await runner.cleanup()
    if metrics is not None:
        metrics[1].close()
        await metrics[0].cleanup()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tandem.serving.frontdoor", description=__doc__.split("\n\n")[0])
    p.parse_args(argv)  # --help only: the configuration (keys included) arrives on standard input
    logging.basicConfig(level=logging.INFO, format="front door: %(message)s", stream=sys.stderr)
    try:
        config = FrontDoorConfig.from_json(sys.stdin.read())
    except (ValueError, TypeError, KeyError) as exc:
        print(f"front door failed: its configuration on standard input is not valid ({exc})", file=sys.stderr, flush=True)
        return 2
    try:
        asyncio.run(serve(config))
    except (OSError, RuntimeError) as exc:  # a port that cannot be bound, unreadable certificates
        taken = getattr(exc, "errno", None) == errno.EADDRINUSE or "Failed to bind" in str(exc)
        why = "a port is already in use (stop whatever holds it, or choose another port)" if taken else str(exc)
        print(f"front door failed: {why}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
