"""tritonclient-based client for a tandem model repository, over HTTP or gRPC.

``http://host:port`` uses ``tritonclient.http``; ``grpc://host:port`` uses ``tritonclient.grpc`` and
``grpcs://host:port`` the same over TLS (with a :class:`~tandem.serving.security.ClientTLS` for a
private CA or mutual TLS); a URL without a scheme is refused with both spellings to choose from. An
``api_key`` (a server started with ``--api-key-file``) goes with every call. Errors from the server
(bad input, unknown model, overload) become :class:`~tandem.errors.TandemError` carrying the
server's message; a server that cannot be reached (no such host, nothing listening, the other
protocol on that port) becomes :class:`~tandem.errors.EnvironmentProblem` saying which. Requests are
checked against what the server publishes (grid, codebook, max batch) before they are sent.

Request building (:func:`generation_arrays`, :func:`infer_inputs`) and URL parsing are plain
functions so load generators can reuse them with tritonclient's asyncio clients
(``tritonclient.http.aio`` / ``tritonclient.grpc.aio``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from tandem.errors import EnvironmentProblem, TandemError
from tandem.serving.security import ClientTLS, client_restriction
from tandem.serving.interface import (
    ENSEMBLE,
    IMAGE,
    PARAM_CODEBOOK,
    PARAM_GRID,
    PROMPT,
    REASONING,
    REFINEMENT,
    SCENE_TOKENS,
    SEED,
    SERVED_MODELS,
    TEMPERATURE,
    TOP_K,
)

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}  # tandem serve's defaults, for messages
DEFAULT_TIMEOUT_S = 300.0  # a CPU generation of the small config under load takes tens of seconds


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # "http" | "grpc"
    address: str  # host:port, as tritonclient wants it
    ssl: bool = False

    @property
    def url(self) -> str:
        scheme = self.protocol + ("s" if self.ssl else "")
        return f"{scheme}://{self.address}"


def parse_url(url: str) -> Endpoint:
    """``http://h:p``, ``https://h:p``, ``grpc://h:p`` or ``grpcs://h:p``."""
    if not isinstance(url, str) or not url.strip():
        raise TandemError("server URL is empty; pass e.g. http://127.0.0.1:8000 or grpc://127.0.0.1:8001")
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        address = url.strip().rstrip("/")
        raise TandemError(
            f"server URL {url!r} has no scheme; write grpc://{address} or http://{address}, whichever that port "
            f"serves (tandem serve: gRPC on {DEFAULT_PORTS['grpc']}, HTTP on {DEFAULT_PORTS['http']})"
        )
    scheme = scheme.lower()
    if scheme not in ("http", "https", "grpc", "grpcs"):
        raise TandemError(f"unsupported server URL scheme {scheme!r} in {url!r}; use http://, https://, grpc:// or grpcs://")
    address = rest.rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in address:
        raise TandemError(f"server URL {url!r} must be <scheme>://<host>:<port>, e.g. grpc://127.0.0.1:8001")
    return Endpoint(scheme.removesuffix("s"), address, ssl=scheme.endswith("s"))


def _host_port(endpoint: Endpoint) -> tuple[str, int]:
    host, _, port = endpoint.address.rpartition(":")
    return host.strip("[]"), int(port)


def resolve_host(endpoint: Endpoint) -> None:
    """Refuse a host name that does not resolve, naming it (not as something "the server said")."""
    import socket

    host, port = _host_port(endpoint)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EnvironmentProblem(
            f"cannot resolve host {host!r} in {endpoint.url} ({exc.strerror}); check the name, or use an IP address"
        ) from None


def diagnose_endpoint(endpoint: Endpoint, timeout_s: float = 3.0) -> str | None:
    """Why a request to ``endpoint`` could not be made: nothing listens, or the port speaks the other
    protocol; None when the port answers the endpoint's protocol (the failure was something else)."""
    import http.client
    import socket

    host, port = _host_port(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        return (
            f"nothing accepts connections at {host}:{port} ({exc.strerror or exc}); is `tandem serve` running? "
            f"(it listens on HTTP {DEFAULT_PORTS['http']} and gRPC {DEFAULT_PORTS['grpc']} by default)"
        )
    tls = speaks_tls(host, port, timeout_s)
    if endpoint.ssl:
        if tls is False:
            return f"{host}:{port} does not speak TLS (a plaintext port?): use {endpoint.protocol}://{host}:{port}, or the server's TLS port"
        return None  # a TLS port: the handshake failed on certificates, not on the protocol
    if tls:
        return (f"{host}:{port} speaks TLS: use {endpoint.protocol}s://{host}:{port} (with --tls-ca, and "
                "--tls-client-cert/--tls-client-key for a server with mutual TLS)")
    speaks_http = False
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", "/v2/health/live")
        speaks_http = connection.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        speaks_http = False
    finally:
        connection.close()
    if endpoint.protocol == "grpc" and speaks_http:
        return f"{host}:{port} answers HTTP, not gRPC: use http://{host}:{port} (or the server's gRPC port)"
    if endpoint.protocol == "http" and not speaks_http:
        return f"{host}:{port} does not answer HTTP (a gRPC port?): use grpc://{host}:{port} (or the server's HTTP port)"
    return None


def speaks_tls(host: str, port: int, timeout_s: float = 3.0) -> bool | None:
    """Whether the port answers a TLS handshake (certificates not checked): True when it completes or
    the server answers with a TLS alert (e.g. it wants a client certificate), False when the port
    speaks something else, None when that cannot be told."""
    import socket
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except ssl.SSLError as exc:
        return "ALERT" in str(exc.reason or exc).upper()
    except (ConnectionResetError, BrokenPipeError, EOFError):
        return False
    except OSError:
        return None


def protocol_module(protocol: str) -> ModuleType:
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def _column(values: Any, rows: int, dtype: str, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 0:
        array = np.full(rows, array)
    if array.shape != (rows,):
        raise TandemError(f"{name} must be one value or one per prompt ({rows}), got shape {list(array.shape)}")
    return array.astype(dtype).reshape(rows, 1)


def generation_arrays(
    prompts: str | Sequence[str], seed: Any = 0, temperature: Any = 0.0, top_k: Any = 0
) -> dict[str, np.ndarray]:
    """Input arrays of one ``reasoning``/``tandem`` request: a row per prompt, sampling settings
    either shared or one per prompt."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise TandemError("no prompts given")
    rows = len(prompts)
    return {
        PROMPT: np.array([[p.encode("utf-8")] for p in prompts], dtype=object),
        SEED: _column(seed, rows, "int64", "seed"),
        TEMPERATURE: _column(temperature, rows, "float64", "temperature"),
        TOP_K: _column(top_k, rows, "int32", "top_k"),
    }


def tokens_array(tokens: np.ndarray, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Scene tokens [h, w], [N], [B, h, w] or [B, N] -> the wire format INT32 [B, N]. A 2-D array
    is one [h, w] grid when it has the served grid's shape (or, with no grid known, more than one
    row). Values must fit INT32; the server checks the codebook range."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TandemError(f"scene tokens must be integers, got {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    elif tokens.ndim == 2 and (tuple(tokens.shape) == grid or (grid is None and tokens.shape[0] != 1)):
        tokens = tokens.reshape(1, -1)
    elif tokens.ndim == 3:
        tokens = tokens.reshape(tokens.shape[0], -1)
    elif tokens.ndim != 2:
        raise TandemError(f"scene tokens must be [h, w], [N], [B, h, w] or [B, N], got shape {list(tokens.shape)}")
    info = np.iinfo(np.int32)
    if tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
        raise TandemError("scene tokens do not fit INT32; they must be codebook indices")
    return np.ascontiguousarray(tokens, dtype=np.int32)


def infer_inputs(module: ModuleType, arrays: dict[str, np.ndarray]) -> list:
    """tritonclient InferInput objects (works for tritonclient.http/.grpc and their .aio clients)."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def server_timeout_us(timeout_s: float) -> int:
    """A client timeout as Triton's per-request ``timeout`` parameter (microseconds): requests
    queued longer are rejected, and the in-flight reasoning scheduler evicts a generation past it."""
    if not timeout_s > 0:
        raise TandemError(f"timeout must be > 0 seconds, got {timeout_s}")
    return max(1, int(timeout_s * 1_000_000))


@dataclass
class RemoteGeneration:
    tokens: np.ndarray  # [B, h, w] int32
    images: np.ndarray | None  # [B, H, W, 3] uint8 (None from a tokens-only model)


class TandemClient:
    """Blocking client for one server. Thread-safe for gRPC; use one per thread for HTTP."""

    def __init__(
        self,
        url: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        verbose: bool = False,
        tls: ClientTLS | None = None,
        api_key: str | None = None,
    ):
        self.endpoint = parse_url(url)
        resolve_host(self.endpoint)
        self.module = protocol_module(self.endpoint.protocol)
        self.timeout_s = timeout_s
        self.headers = client_restriction(api_key).headers(self.endpoint.protocol) if api_key else None
        if tls is not None and not self.endpoint.ssl:
            raise TandemError(f"TLS options were given for {self.endpoint.url}; use a grpcs:// URL to connect over TLS")
        try:
            if self.endpoint.protocol == "grpc":
                tls_kwargs = (tls or ClientTLS()).grpc_kwargs() if self.endpoint.ssl else {}
                self.client = self.module.InferenceServerClient(self.endpoint.address, verbose=verbose, **tls_kwargs)
            else:
                self.client = self.module.InferenceServerClient(
                    self.endpoint.address, verbose=verbose, ssl=self.endpoint.ssl, connection_timeout=10.0, network_timeout=timeout_s
                )
        except Exception as exc:
            raise TandemError(f"cannot create a client for {self.endpoint.url}: {exc}") from exc
        self._configs: dict[str, dict] = {}

    @property
    def url(self) -> str:
        return self.endpoint.url

    # -- errors -----------------------------------------------------------------------------------
    def _error(self, exc: Exception, what: str) -> TandemError:
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, InferenceServerException):
            message = exc.message() or str(exc)
            status = str(exc.status() or "")
            if "Socket closed" in message or "handshake failed" in message.lower():
                why = diagnose_endpoint(self.endpoint)  # grpc:// to a TLS port, grpcs:// to a plaintext one
                if why is not None:
                    return EnvironmentProblem(f"cannot reach Triton at {self.url}: {why} ({message})")
            if self.endpoint.ssl and ("Socket closed" in message or "handshake failed" in message.lower()):
                return TandemError(
                    f"the TLS handshake with {self.url} failed ({message}); check the CA (--tls-ca) and, for a server "
                    "with mutual TLS, the client certificate and key (--tls-client-cert/--tls-client-key)"
                )
            if "restricted" in message and "expecting header" in message:
                return TandemError(f"{what}: the server requires an API key ({message}); pass --api-key-file")
            why = diagnose_endpoint(self.endpoint) if "UNAVAILABLE" in status else None
            if why is not None:
                return EnvironmentProblem(f"cannot reach Triton at {self.url}: {why} ({message})")
            if "unknown model" in message.lower():
                message += f" (this server serves: {', '.join(self.served_models()) or 'nothing'})"
            return TandemError(f"{what}: the server said: {message}")
        # Not an answer from Triton: no connection, or a port speaking another protocol (HTTPParseError).
        why = diagnose_endpoint(self.endpoint)
        if why is not None:
            return EnvironmentProblem(f"cannot reach Triton at {self.url}: {why} ({type(exc).__name__}: {exc})")
        return TandemError(f"{what} failed against {self.url}: {type(exc).__name__}: {exc}")

    def check_ready(self, model: str | None = None) -> None:
        """The server answers and ``model`` (default: the server itself) is ready; else a clear error."""
        try:
            ready = self.client.is_model_ready(model) if model else self.client.is_server_ready()
        except Exception as exc:
            raise self._error(exc, "readiness check") from exc
        if not ready:
            served = ", ".join(self.served_models()) or "nothing yet"
            raise EnvironmentProblem(
                f"Triton at {self.url} answers, but {('model ' + repr(model)) if model else 'the server'} is not ready "
                f"(ready: {served}); wait for `tandem serve` to finish loading, or check its log"
            )

    # -- server and model information --------------------------------------------------------------
    def is_ready(self, model: str | None = None) -> bool:
        try:
            if model:
                return bool(self.client.is_model_ready(model, headers=self.headers))
            return bool(self.client.is_server_ready(headers=self.headers))
        except Exception:
            return False

    def served_models(self) -> list[str]:
        """Names (with version) of tandem's models the server reports ready. Asks each model's
        metadata: the repository index belongs to the model-control API, closed by default."""
        served = []
        for name in SERVED_MODELS:
            try:
                if not self.client.is_model_ready(name, headers=self.headers):
                    continue
                if self.endpoint.protocol == "grpc":
                    versions = self.client.get_model_metadata(name, headers=self.headers, as_json=True).get("versions", [])
                else:
                    versions = self.client.get_model_metadata(name, headers=self.headers).get("versions", [])
            except Exception:
                continue
            served += [f"{name} v{version}" for version in versions]
        return sorted(served)

    def model_config(self, model: str) -> dict:
        if model not in self._configs:
            try:
                if self.endpoint.protocol == "grpc":
                    config = self.client.get_model_config(model, headers=self.headers, as_json=True)["config"]
                else:
                    config = self.client.get_model_config(model, headers=self.headers)
            except Exception as exc:
                raise self._error(exc, f"model {model!r}") from exc
            self._configs[model] = config
        return self._configs[model]

    def output_names(self, model: str) -> list[str]:
        return [o["name"] for o in self.model_config(model).get("output", [])]

    def grid(self, model: str) -> tuple[int, int] | None:
        value = self.model_config(model).get("parameters", {}).get(PARAM_GRID, {}).get("string_value")
        if not value:
            return None
        h, _, w = value.partition("x")
        return int(h), int(w)

    def codebook_size(self, model: str) -> int | None:
        value = self.model_config(model).get("parameters", {}).get(PARAM_CODEBOOK, {}).get("string_value")
        return int(value) if value else None

    def max_batch_size(self, model: str) -> int:
        return int(self.model_config(model).get("max_batch_size", 0) or 0)

    def statistics(self, model: str = "") -> dict:
        try:
            if self.endpoint.protocol == "grpc":
                return self.client.get_inference_statistics(model, headers=self.headers, as_json=True)
            return self.client.get_inference_statistics(model, headers=self.headers)
        except Exception as exc:
            raise self._error(exc, f"statistics of {model or 'all models'}") from exc

    # -- inference --------------------------------------------------------------------------------
    def infer(
        self, model: str, arrays: dict[str, np.ndarray], outputs: Sequence[str], version: str = ""
    ) -> dict[str, np.ndarray]:
        requested = [self.module.InferRequestedOutput(name) for name in outputs]
        try:
            inputs = infer_inputs(self.module, arrays)
            # The same limit server-side (Triton's request timeout, microseconds): the reasoning
            # model's in-flight scheduler frees a slot whose client has stopped waiting.
            server_timeout = server_timeout_us(self.timeout_s)
            if self.endpoint.protocol == "grpc":
                result = self.client.infer(
                    model, inputs, model_version=version, outputs=requested, client_timeout=self.timeout_s,
                    headers=self.headers, timeout=server_timeout,
                )
            else:
                result = self.client.infer(
                    model, inputs, model_version=version, outputs=requested, headers=self.headers, timeout=server_timeout
                )
        except TandemError:
            raise
        except Exception as exc:
            raise self._error(exc, f"model {model!r}" + (f" version {version}" if version else "")) from exc
        return {name: result.as_numpy(name) for name in outputs}

    def _grid_tokens(self, model: str, flat: np.ndarray) -> np.ndarray:
        grid = self.grid(model)
        return flat.reshape(flat.shape[0], *grid) if grid else flat

    def _chunks(self, model: str, rows: int) -> list[slice]:
        """Requests of at most the model's max_batch_size rows (the server refuses larger ones)."""
        step = self.max_batch_size(model) or rows
        return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]

    def generate(
        self, prompts: str | Sequence[str], seed: Any = 0, temperature: Any = 0.0, top_k: Any = 0, model: str = ENSEMBLE
    ) -> RemoteGeneration:
        """Prompts -> scene tokens [B, h, w] (+ images [B, H, W, 3] when the model renders them); more
        prompts than the model's max batch go as several requests."""
        arrays = generation_arrays(prompts, seed, temperature, top_k)
        outputs = [n for n in (SCENE_TOKENS, IMAGE) if n in self.output_names(model)]
        if SCENE_TOKENS not in outputs:
            raise TandemError(f"model {model!r} does not return {SCENE_TOKENS}; use {ENSEMBLE!r} or {REASONING!r}")
        rows = len(arrays[next(iter(arrays))])
        parts = [self.infer(model, {k: v[chunk] for k, v in arrays.items()}, outputs) for chunk in self._chunks(model, rows)]
        tokens = np.concatenate([p[SCENE_TOKENS] for p in parts])
        images = np.concatenate([p[IMAGE] for p in parts]) if IMAGE in outputs else None
        return RemoteGeneration(self._grid_tokens(model, tokens), images)

    def check_tokens(self, tokens: np.ndarray, model: str = REFINEMENT) -> np.ndarray:
        """Scene tokens checked against the grid and codebook ``model`` publishes -> wire format INT32 [B, h*w]."""
        from tandem.scene_tokens import token_batch

        grid = self.grid(model)
        if grid is None:  # a repository written by something else: the server checks what it can
            return tokens_array(tokens)
        batch = token_batch(tokens, grid, self.codebook_size(model), where=f"model {model!r} at {self.url}")
        return np.ascontiguousarray(batch.reshape(batch.shape[0], -1), dtype=np.int32)

    def render(self, tokens: np.ndarray, model: str = REFINEMENT) -> np.ndarray:
        """Scene tokens ([h, w], [N], [B, h, w] or [B, N]) -> images [B, H, W, 3] uint8, one per grid."""
        wire = self.check_tokens(tokens, model)
        parts = [self.infer(model, {SCENE_TOKENS: wire[chunk]}, [IMAGE])[IMAGE] for chunk in self._chunks(model, len(wire))]
        return np.concatenate(parts)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass

    def __enter__(self) -> "TandemClient":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def generate_remote(
    url: str, prompt: str, seed: int = 0, temperature: float = 0.0, top_k: int = 0, model: str | None = None, **client_options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """One prompt through a served model (default the ``tandem`` ensemble) -> (tokens [h, w] int32,
    image [H, W, 3] uint8). A tokens-only model (``reasoning``) is followed by ``refinement``.
    ``client_options`` (``tls``, ``api_key``) go to :class:`TandemClient`."""
    with TandemClient(url, **client_options) as client:
        result = client.generate(prompt, seed, temperature, top_k, model=model or ENSEMBLE)
        images = result.images if result.images is not None else client.render(result.tokens)
        return result.tokens[0], images[0]


def render_remote(url: str, tokens: np.ndarray, model: str | None = None, **client_options: Any) -> np.ndarray:
    """Scene tokens ([h, w], [N], [B, h, w] or [B, N]) through ``refinement`` (or ``model``) ->
    images [B, H, W, 3] uint8, one per grid."""
    with TandemClient(url, **client_options) as client:
        return client.render(tokens, model=model or REFINEMENT)
