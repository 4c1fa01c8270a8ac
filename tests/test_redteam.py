"""Red-team replay (issue 10): every defect the red-team pass reproduced against `tandem serve`,
replayed against a live tritonserver (or the real command), asserting the fixed behaviour.

One shared server (``tiny_server``, default options = the locked-down defaults) answers the many
request-level checks; a second, secured server (mutual TLS + API key + admin key) is started once
for the TLS and key checks; the stop/restart checks run `tandem serve` as a user does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tandem.errors import TandemError
from tandem.serving.client import TandemClient
from tandem.serving.security import ADMIN_APIS, ClientTLS, TLSOptions, admin_restriction, client_restriction
from tandem.serving.server import TritonServer

pytestmark = pytest.mark.server

PROMPT_TEXT = "a red circle above a blue square"


def _http(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


# -- defect 11: TLS / mutual TLS / API keys --------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA (trustme) with a server certificate for 127.0.0.1 and a client certificate; plus
    a second CA nobody trusts, with its own client certificate."""
    trustme = pytest.importorskip("trustme", reason="trustme is in the dev extra: pip install -e '.[dev]'")
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = trustme.CA(), trustme.CA()
    server, client, stranger = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("client@tandem"), rogue.issue_cert("x@y")
    files = {"ca": ca.cert_pem, "server.pem": server.cert_chain_pems[0], "server.key": server.private_key_pem,
             "client.pem": client.cert_chain_pems[0], "client.key": client.private_key_pem,
             "rogue-ca": rogue.cert_pem, "stranger.pem": stranger.cert_chain_pems[0], "stranger.key": stranger.private_key_pem}
    paths = {}
    for name, blob in files.items():
        paths[name] = folder / name
        blob.write_to_path(str(paths[name]))
    return paths


API_KEY = "k" * 8 + "-redteam-api-key-0123456789"
ADMIN_KEY = "a" * 8 + "-redteam-admin-key-0123456789"


@pytest.fixture(scope="module")
def secured_server(tiny_repository: Path, pki: dict[str, Path]):
    tls = TLSOptions(pki["server.pem"], pki["server.key"], client_ca=pki["ca"])
    restrictions = (admin_restriction(ADMIN_KEY), client_restriction(API_KEY))
    with TritonServer(tiny_repository, tls=tls, restrictions=restrictions, startup_timeout=120) as server:
        yield server


def test_mutual_tls_and_api_key(secured_server: TritonServer, pki: dict[str, Path]):
    assert secured_server.grpc_url.startswith("grpcs://")
    good = ClientTLS(pki["ca"], pki["client.pem"], pki["client.key"])
    with TandemClient(secured_server.grpc_url, tls=good, api_key=API_KEY) as client:
        assert client.generate(PROMPT_TEXT).tokens.shape[0] == 1
    # no client certificate, a certificate from a CA the server does not trust, a server the client does not trust
    for tls in (ClientTLS(pki["ca"]), ClientTLS(pki["ca"], pki["stranger.pem"], pki["stranger.key"]), ClientTLS(pki["rogue-ca"], pki["client.pem"], pki["client.key"])):
        with TandemClient(secured_server.grpc_url, tls=tls, api_key=API_KEY, timeout_s=20) as client:
            with pytest.raises(TandemError, match="TLS handshake"):
                client.generate(PROMPT_TEXT)
    # plaintext gRPC to a TLS port does not get an answer either
    with TandemClient(secured_server.grpc_url.replace("grpcs://", "grpc://"), timeout_s=20) as client:
        with pytest.raises(TandemError):
            client.generate(PROMPT_TEXT)
    # the right certificate but no (or a wrong) API key
    for key in (None, "wrong-key-wrong-key-wrong"):
        with TandemClient(secured_server.grpc_url, tls=good, api_key=key) as client:
            with pytest.raises(TandemError, match="API key"):
                client.generate(PROMPT_TEXT)
    with TandemClient(secured_server.http_url) as client:
        with pytest.raises(TandemError, match="API key"):
            client.generate(PROMPT_TEXT)
    with TandemClient(secured_server.http_url, api_key=API_KEY) as client:
        assert client.generate(PROMPT_TEXT).images.shape[0] == 1
    assert _http(f"{secured_server.http_url}/v2/health/ready")[0] == 200  # probes need no key
    # the admin key opens the admin APIs, the API key does not
    assert _http(f"{secured_server.http_url}/v2/logging", headers={"tandem-api-key": API_KEY})[0] == 403
    assert _http(f"{secured_server.http_url}/v2/logging", headers={"tandem-admin-key": ADMIN_KEY})[0] == 200


def test_client_refuses_tls_options_without_grpcs():
    with pytest.raises(TandemError, match="grpcs://"):
        TandemClient("grpc://127.0.0.1:1", tls=ClientTLS())


# -- defect 2: shared-memory, logging, trace and model-control APIs closed by default ---------------


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/v2/systemsharedmemory/region/evil/register", {"key": "/tandem-shm-x", "offset": 0, "byte_size": 4096}),
        ("GET", "/v2/systemsharedmemory/status", None),
        ("POST", "/v2/logging", {"log_info": False, "log_error": False}),
        ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
        ("POST", "/v2/repository/models/reasoning/unload", {}),
        ("POST", "/v2/repository/index", {}),
    ],
)
def test_admin_apis_closed_by_default_over_http(tiny_server: TritonServer, method: str, path: str, body: dict | None):
    status, text = _http(f"{tiny_server.http_url}{path}", method, body)
    assert status == 403 and "restricted" in text
    assert {api for api in ADMIN_APIS} <= set(tiny_server.restrictions[0].apis)
    with TandemClient(tiny_server.http_url) as client:  # and the server keeps serving
        assert client.generate(PROMPT_TEXT).tokens.shape[0] == 1


def test_admin_apis_closed_by_default_over_grpc(tiny_server: TritonServer):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(tiny_server.grpc_url.split("://")[1])
    try:
        calls = [
            lambda: client.register_system_shared_memory("evil", "/tandem-shm-x", 4096),
            lambda: client.update_log_settings({"log_info": False}),
            lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            lambda: client.unload_model("reasoning"),
        ]
        for call in calls:
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        assert client.is_model_ready("reasoning")
    finally:
        client.close()
