"""What a tandem tritonserver exposes, and to whom: TLS for gRPC and key-guarded API groups.

- :class:`TLSOptions`: terminated by tandem's front door (:mod:`tandem.serving.frontdoor`, the
  default), or, with ``TritonServer(front_door=False)``, by tritonserver 2.51's own
  ``--grpc-use-ssl`` / ``--grpc-use-ssl-mutual`` with ``--grpc-server-cert``, ``--grpc-server-key``
  and ``--grpc-root-cert``. HTTP has no TLS: keep it on loopback (``http_address``) or behind a
  TLS-terminating proxy.
- :class:`APIRestriction` -> tritonserver's own ``--http-restricted-api=<apis>:<header>=<value>`` and
  ``--grpc-restricted-protocol=<apis>:<header>=<value>``: every call to one of ``apis`` must carry
  the header (gRPC metadata) ``header: value``, or Triton refuses it.

:func:`admin_restriction` is the default of :class:`~tandem.serving.server.TritonServer`: the
APIs no tandem client needs (shared-memory registration, logging and trace settings, model
load/unload) behind a key that is random per server and never printed, i.e. closed.

:class:`ClientTLS` is the client side (``grpcs://`` URLs in :mod:`tandem.serving.client`).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import TandemError

# Triton's API groups (the names its restricted-API options accept).
TRITON_APIS = (
    "health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics", "trace", "logging",
)
# What a tandem client never needs: registering shared memory (lets a client point a model's
# output into memory it can read, or into the python backend's own regions), changing logging or
# tracing, loading/unloading models.
ADMIN_APIS = ("shared-memory", "logging", "trace", "model-repository")
# What `--api-key` guards: everything a client does except health probes (load balancers probe
# /v2/health without credentials).
CLIENT_APIS = ("metadata", "inference", "model-config", "statistics")

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # tritonserver looks for restricted-protocol keys under this prefix
ADMIN_KEY_HEADER = "tandem-admin-key"
API_KEY_HEADER = "tandem-api-key"
_HEADER = re.compile(r"[a-z0-9][a-z0-9-]*")  # gRPC metadata keys are lower case; HTTP headers match any case
_VALUE = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")  # printable, no separators Triton's parser splits on


@dataclass(frozen=True)
class APIRestriction:
    """Calls to ``apis`` need the header ``header: value`` (HTTP) / metadata (gRPC)."""

    apis: tuple[str, ...]
    header: str
    value: str

    def __post_init__(self) -> None:
        unknown = sorted(set(self.apis) - set(TRITON_APIS))
        if not self.apis or unknown:
            raise TandemError(f"restricted APIs must be a non-empty subset of {list(TRITON_APIS)}, got unknown {unknown}")
        if not _HEADER.fullmatch(self.header):
            raise TandemError(f"API key header {self.header!r} must be lower-case letters, digits and '-'")
        if not _VALUE.fullmatch(self.value):
            raise TandemError(
                "an API key must be 16 to 512 characters of letters, digits and ._~+/=- "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )

    def _spec(self) -> str:
        return f"{','.join(self.apis)}:{self.header}={self.value}"

    def server_args(self) -> list[str]:
        return [f"--http-restricted-api={self._spec()}", f"--grpc-restricted-protocol={self._spec()}"]

    def headers(self, protocol: str = "http") -> dict[str, str]:
        """What a client sends to pass this restriction: an HTTP header, or gRPC metadata under
        Triton's ``triton-grpc-protocol-`` prefix."""
        return {(GRPC_HEADER_PREFIX if protocol == "grpc" else "") + self.header: self.value}


def admin_restriction(key: str | None = None) -> APIRestriction:
    """The admin APIs behind ``key``; with no key, behind a random one nobody is told (closed)."""
    return APIRestriction(ADMIN_APIS, ADMIN_KEY_HEADER, key or secrets.token_urlsafe(32))


def client_restriction(key: str) -> APIRestriction:
    return APIRestriction(CLIENT_APIS, API_KEY_HEADER, key)


def read_key_file(path: str | Path, what: str) -> str:
    """A key kept in a file (not on the command line, where `ps` shows it to every local user)."""
    path = Path(path)
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise TandemError(f"cannot read the {what} file {path} ({exc.strerror}); write the key into it") from None
    if not key:
        raise TandemError(f"the {what} file {path} is empty; write the key into it")
    return key


def _readable(path: str | Path | None, what: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise TandemError(f"{what} {path} does not exist or is not a file; pass a PEM file")
    return path.resolve()


@dataclass(frozen=True)
class TLSOptions:
    """TLS on tritonserver's gRPC endpoint; with ``client_ca`` also mutual TLS (clients must present
    a certificate signed by that CA)."""

    cert: Path  # PEM server certificate (chain)
    key: Path  # PEM private key of cert
    client_ca: Path | None = None  # PEM CA bundle that client certificates must chain to -> mutual TLS

    def __post_init__(self) -> None:
        object.__setattr__(self, "cert", _readable(self.cert, "TLS certificate"))
        object.__setattr__(self, "key", _readable(self.key, "TLS key"))
        object.__setattr__(self, "client_ca", _readable(self.client_ca, "TLS client CA"))

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def server_args(self) -> list[str]:
        args = [f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.mutual:
            return ["--grpc-use-ssl-mutual=true", *args, f"--grpc-root-cert={self.client_ca}"]
        return ["--grpc-use-ssl=true", *args]


@dataclass(frozen=True)
class ClientTLS:
    """What a client needs for ``grpcs://``: the CA that signed the server's certificate (None: the
    system's roots) and, for mutual TLS, its own certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ca", _readable(self.ca, "TLS CA"))
        object.__setattr__(self, "cert", _readable(self.cert, "TLS client certificate"))
        object.__setattr__(self, "key", _readable(self.key, "TLS client key"))
        if (self.cert is None) != (self.key is None):
            raise TandemError("a TLS client certificate needs its key and vice versa; pass both --tls-client-cert and --tls-client-key")

    def grpc_kwargs(self) -> dict:
        """Keyword arguments of tritonclient.grpc.InferenceServerClient."""
        return {
            "ssl": True,
            "root_certificates": str(self.ca) if self.ca else None,
            "private_key": str(self.key) if self.key else None,
            "certificate_chain": str(self.cert) if self.cert else None,
        }
