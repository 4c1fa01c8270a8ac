"""The split path on one machine: a reasoning-only and a refinement-only tritonserver, chained by
the client the way the InferenceGraph chains the two InferenceServices.

Hop 1 sends the prompt to ``reasoning`` and gets the scene tokens; hop 2 sends those tokens to
``refinement`` and gets the image; the result carries both, like the graph's response. Each hop
is its own server (own repository, own ports) and, with :class:`~tandem.serving.security.TLSOptions`
on the servers and a :class:`~tandem.serving.security.ClientTLS` here, gRPC with mutual TLS.

Failure is explicit: a hop that fails raises :class:`HopFailed` naming the hop and its server
within the client timeout, and the hop's connection is rebuilt for the next request, so service
resumes as soon as a restarted server listens again (no waiting out gRPC's reconnect backoff, no
restart of the other hop).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.errors import TandemError
from tandem.serving.client import RemoteGeneration, TandemClient
from tandem.serving.interface import REASONING, REFINEMENT

HOP_TIMEOUT_S = 120.0


class HopFailed(TandemError):
    """One hop of the split path failed; the request did not produce an image."""

    def __init__(self, hop: str, url: str, cause: Exception):
        self.hop, self.url = hop, url
        super().__init__(f"{hop} hop ({url}) failed: {cause}")


@dataclass
class HopTimes:
    reasoning_s: float
    refinement_s: float


class _Hop:
    """One server's client, rebuilt after a failure (thread-safe: gRPC clients are)."""

    def __init__(self, name: str, url: str, client_options: dict[str, Any]):
        self.name, self.url, self.options = name, url, client_options
        self._client: TandemClient | None = None
        self._lock = threading.Lock()

    def client(self) -> TandemClient:
        with self._lock:
            if self._client is None:
                self._client = TandemClient(self.url, **self.options)
            return self._client

    def reset(self, failed: TandemClient) -> None:
        with self._lock:
            if self._client is failed:
                self._client = None
        failed.close()

    def call(self, action):
        client = self.client()
        try:
            return action(client)
        except TandemError as exc:
            self.reset(client)
            raise HopFailed(self.name, self.url, exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class SplitClient:
    """prompt -> reasoning server -> scene tokens -> refinement server -> image (+ tokens)."""

    def __init__(
        self,
        reasoning_url: str,
        refinement_url: str,
        timeout_s: float = HOP_TIMEOUT_S,
        tls=None,
        api_key: str | None = None,
    ):
        options = {"timeout_s": timeout_s, "tls": tls, "api_key": api_key}
        self.reasoning = _Hop(REASONING, reasoning_url, options)
        self.refinement = _Hop(REFINEMENT, refinement_url, options)
        self.last_times: HopTimes | None = None

    def generate(self, prompts: str | Sequence[str], seed: Any = 0, temperature: Any = 0.0, top_k: Any = 0) -> RemoteGeneration:
        start = time.perf_counter()
        tokens = self.reasoning.call(lambda c: c.generate(prompts, seed, temperature, top_k, model=REASONING).tokens)
        middle = time.perf_counter()
        images = self.refinement.call(lambda c: c.render(tokens, model=REFINEMENT))
        self.last_times = HopTimes(middle - start, time.perf_counter() - middle)
        return RemoteGeneration(tokens, images)

    def close(self) -> None:
        self.reasoning.close()
        self.refinement.close()

    def __enter__(self) -> "SplitClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage_repositories(artifacts: str | Path, out: str | Path, **options: Any) -> dict[str, Path]:
    """One local-flavor repository per stage (what each pool of the deployment serves)."""
    from tandem.serving.repository import write_repository

    out = Path(out)
    return {stage: write_repository(artifacts, out / stage, stages=(stage,), **options) for stage in (REASONING, REFINEMENT)}


@dataclass
class SplitServers:
    """The two running servers of the rehearsal."""

    reasoning: Any  # TritonServer
    refinement: Any

    @property
    def reasoning_url(self) -> str:
        return self.reasoning.grpc_url  # grpcs:// when the server has TLS

    @property
    def refinement_url(self) -> str:
        return self.refinement.grpc_url


def stage_server(repository: Path, stage: str, tls=None, **kwargs: Any):
    """A tritonserver serving only ``stage`` from its own repository, on its own (free) ports."""
    from tandem.serving.server import TritonServer

    return TritonServer(repository, ready_models=(stage,), tls=tls, **kwargs)


@contextmanager
def split_servers(repositories: dict[str, Path], tls=None, **kwargs: Any) -> Iterator[SplitServers]:
    """Start the reasoning and refinement servers (gRPC with ``tls`` when given); stop both after."""
    with ExitStack() as stack:
        servers = {stage: stack.enter_context(stage_server(repositories[stage], stage, tls=tls, **kwargs)) for stage in (REASONING, REFINEMENT)}
        yield SplitServers(servers[REASONING], servers[REFINEMENT])
