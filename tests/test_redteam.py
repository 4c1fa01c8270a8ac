"""Red-team replay (issue 10): every defect the red-team pass reproduced against `tandem serve`,
replayed against a live tritonserver (or the real command), asserting the fixed behaviour.

One shared server (``tiny_server``, default options = the locked-down defaults) answers the many
request-level checks; a second, secured server (mutual TLS + API key + admin key) is started once
for the TLS and key checks; the stop/restart checks run `tandem serve` as a user does."""

from __future__ import annotations

import json
import re
import shutil
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


def test_cli_credentials_reach_the_secured_server(secured_server: TritonServer, pki: dict[str, Path], tmp_path: Path, capsys):
    from tandem.cli import main

    key_file = tmp_path / "api.key"
    key_file.write_text(API_KEY + "\n")
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT_TEXT, "--server", secured_server.grpc_url, "--out", str(out), "--tls-ca", str(pki["ca"]),
            "--tls-client-cert", str(pki["client.pem"]), "--tls-client-key", str(pki["client.key"])]
    assert main([*argv, "--api-key-file", str(key_file)]) == 0 and out.exists()
    assert main(argv) != 0 and "API key" in capsys.readouterr().err  # the key is required


def test_serve_security_flags_are_checked(tmp_path: Path, pki: dict[str, Path]):
    import argparse

    from tandem.cli.serving import add_security_arguments, security_options

    parser = argparse.ArgumentParser()
    add_security_arguments(parser)
    (tmp_path / "admin.key").write_text(ADMIN_KEY)
    (tmp_path / "empty.key").write_text("")
    bad = [
        (["--tls-cert", str(pki["server.pem"])], "go together"),
        (["--tls-client-ca", str(pki["ca"])], "needs --tls-cert"),
        (["--open-admin-api", "--admin-key-file", str(tmp_path / "admin.key")], "contradict"),
        (["--api-key-file", str(tmp_path / "empty.key")], "is empty"),
        (["--api-key-file", str(tmp_path / "missing.key")], "cannot read"),
        (["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pki["server.key"])], "does not exist"),
    ]
    for argv, message in bad:
        with pytest.raises(TandemError, match=message):
            security_options(parser.parse_args(argv))
    default = security_options(parser.parse_args([]))
    assert default["tls"] is None and [r.apis for r in default["restrictions"]] == [ADMIN_APIS]
    opened = security_options(parser.parse_args(["--open-admin-api"]))
    assert opened["restrictions"] == ()
    mutual = security_options(parser.parse_args(["--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]),
                                                 "--tls-client-ca", str(pki["ca"]), "--admin-key-file", str(tmp_path / "admin.key")]))
    assert mutual["tls"].mutual and "--grpc-use-ssl-mutual=true" in mutual["tls"].server_args()
    assert mutual["restrictions"][0].value == ADMIN_KEY


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


# -- defect 1: a crafted export cannot place or load files outside its folder -----------------------


def _tampered_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    edit(manifest, target)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _escape_through_symlink(manifest: dict, folder: Path) -> None:
    """The red team's export: refinement's external data climbs out of the version folder through a
    symlink and lands as reasoning version 99's model.py."""
    (folder / "a" / "b" / "c" / "d").mkdir(parents=True)
    (folder / "lnk").symlink_to(folder / "a" / "b" / "c" / "d")
    payload = folder / "lnk" / ".." / ".." / ".." / ".." / "reasoning" / "99"
    payload.mkdir(parents=True, exist_ok=True)
    (payload / "model.py").write_text("import os\nos.system('touch /tmp/tandem-redteam-pwned')\n")
    graph = manifest["graphs"]["refinement"]
    graph["optimized_file"] = None
    graph["external_data"] = ["lnk/../../../../reasoning/99/model.py"]


def _symlinked_graph(manifest: dict, folder: Path) -> None:
    outside = folder.parent / f"{folder.name}-outside.onnx"
    shutil.copy(folder / "refinement.ort.onnx", outside)
    (folder / "refinement.ort.onnx").unlink()
    (folder / "refinement.ort.onnx").symlink_to(outside)  # same bytes, same hash: still refused


def _absolute_path(manifest: dict, folder: Path) -> None:
    manifest["graphs"]["refinement"]["optimized_file"] = str((folder / "refinement.ort.onnx").resolve())


def _unhashed_external_data(manifest: dict, folder: Path) -> None:
    (folder / "refinement.onnx.data").write_bytes(b"\0" * 64)
    manifest["graphs"]["refinement"]["optimized_file"] = None
    manifest["graphs"]["refinement"]["external_data"] = ["refinement.onnx.data"]


def _edited_config(manifest: dict, folder: Path) -> None:
    manifest["config"]["scene"]["codebook_size"] = 1024  # the red team's edit: tokens beyond the graphs' codebook


@pytest.mark.parametrize(
    "edit,message",
    [
        (_escape_through_symlink, "not a plain relative path"),
        (_symlinked_graph, "symbolic link"),
        (_absolute_path, "not a plain relative path"),
        (_unhashed_external_data, "records no sha256"),
        (_edited_config, "does not match its config_fingerprint"),
    ],
    ids=["escape-through-symlink", "symlinked-graph", "absolute-path", "unhashed-external-data", "edited-config"],
)
def test_a_crafted_export_is_refused_and_leaves_the_repository_as_it_was(
    tmp_path: Path, tiny_artifacts: Path, edit, message: str, capsys
):
    from tandem.cli import main
    from tandem.serving.repository import write_repository

    repo = write_repository(tiny_artifacts, tmp_path / "repo")
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    crafted = _tampered_copy(tiny_artifacts, tmp_path / "crafted", edit)
    assert main(["repo", "--artifacts", str(crafted), "--out", str(repo)]) != 0
    assert message in capsys.readouterr().err
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before  # no version 2, no version 99
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(TandemError, match=message):
        write_repository(crafted, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # a failed `tandem repo` leaves nothing behind


def test_an_edited_manifest_or_config_in_a_served_repository_is_not_served(tmp_path: Path, tiny_artifacts: Path):
    """Editing the config inside a repository (not the export), or a model's config.pbtxt (issue 24
    defect 7: codebook_size 512 -> 1024 was served and published), is refused before tritonserver
    starts, naming the file and the fix."""
    from tandem.serving.repository import RepositoryIntegrityError, write_repository

    repo = write_repository(tiny_artifacts, tmp_path / "repo")
    for shipped in repo.glob("*/1/artifacts/manifest.json"):
        manifest = json.loads(shipped.read_text())
        manifest["config"]["scene"]["codebook_size"] = 1024
        shipped.write_text(json.dumps(manifest))
    with pytest.raises(RepositoryIntegrityError, match="manifest.json.*tandem repo"):
        TritonServer(repo, startup_timeout=90).start()
    repo = write_repository(tiny_artifacts, tmp_path / "repo2")
    config = repo / "tandem" / "config.pbtxt"
    text = config.read_text()
    assert "codebook_size" in text
    config.write_text(re.sub(r'(tandem.codebook_size"\s*value\s*\{\s*string_value:\s*")(\d+)', r"\g<1>1024", text))
    assert config.read_text() != text
    with pytest.raises(RepositoryIntegrityError, match="config.pbtxt.*tandem repo"):
        TritonServer(repo, startup_timeout=90).start()


# -- defect 10: the repository copies, so editing it cannot corrupt the export ----------------------


def test_repository_files_are_copies_not_links(tmp_path: Path, tiny_artifacts: Path):
    from tandem.serving.repository import write_repository

    repo = write_repository(tiny_artifacts, tmp_path / "repo")
    shipped = repo / "refinement" / "1" / "artifacts" / "refinement.ort.onnx"
    assert shipped.stat().st_ino != (tiny_artifacts / "refinement.ort.onnx").stat().st_ino
    assert shipped.stat().st_nlink == 1
    linked = write_repository(tiny_artifacts, tmp_path / "linked", link=True)  # opt-in
    assert (linked / "refinement" / "1" / "artifacts" / "refinement.ort.onnx").stat().st_ino == (
        tiny_artifacts / "refinement.ort.onnx"
    ).stat().st_ino


# -- defect 12: exports never delete what they did not write ------------------------------------------


def test_export_refuses_a_folder_with_files_it_did_not_write(tmp_path: Path, tiny_artifacts: Path, monkeypatch, capsys):
    from tandem.cli import main

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "keep.txt").write_text("mine too")
    assert main(["export", "--config", "tiny", "--out", str(out)]) != 0
    assert "did not write" in capsys.readouterr().err and "--force" in capsys.readouterr().err + "--force"
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "keep.txt").read_text() == "mine too"
    # the default output folder follows the config: `--config tiny` goes to build/tiny, not build/small
    monkeypatch.chdir(tmp_path)
    (tmp_path / "build" / "small").mkdir(parents=True)
    (tmp_path / "build" / "small" / "notes.txt").write_text("small's")
    (tmp_path / "build" / "tiny").mkdir()
    (tmp_path / "build" / "tiny" / "notes.txt").write_text("tiny's")
    assert main(["export", "--config", "tiny"]) != 0
    err = capsys.readouterr().err
    assert "build/tiny holds files" in err
    assert (tmp_path / "build" / "small" / "notes.txt").read_text() == "small's"
    # a folder holding only an earlier export is replaced (that export's own files)
    from tandem.export.onnx_export import check_replaceable

    check_replaceable(tiny_artifacts, force=False)


# -- defects 8 and 9: sampling range, subset requests, missing prompt ---------------------------------


@pytest.mark.parametrize("temperature", [1e-308, 1e-5, 0.009, 11.0, float("inf"), float("nan"), -1.0])
def test_out_of_range_temperature_is_refused_served_and_in_process(tiny_server: TritonServer, tiny_artifacts: Path, temperature):
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime

    with TandemClient(tiny_server.grpc_url) as client:
        with pytest.raises(TandemError, match=r"temperature must be 0 \(greedy\) or within \[0.01, 10.0\]"):
            client.generate(PROMPT_TEXT, temperature=temperature)
    with pytest.raises(TandemError, match="temperature must be 0"):
        Pipeline(make_runtime("onnxruntime", artifacts=tiny_artifacts)).generate(PROMPT_TEXT, temperature=temperature)


def test_minimum_temperature_samples_sanely(tiny_server: TritonServer, tiny_artifacts: Path, tiny_config):
    """The red team's 1e-308 gave every token the last codebook index; at the documented minimum the
    served sample is finite, in range, not that degenerate pattern, and equal to the in-process one."""
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime
    from tandem.sampling import MIN_TEMPERATURE

    with TandemClient(tiny_server.http_url) as client:
        tokens = client.generate(PROMPT_TEXT, temperature=MIN_TEMPERATURE, seed=3).tokens[0]
    expected = Pipeline(make_runtime("onnxruntime", artifacts=tiny_artifacts)).generate(PROMPT_TEXT, seed=3, temperature=MIN_TEMPERATURE)
    assert np.array_equal(tokens, expected.tokens)
    assert len(np.unique(tokens)) > 1 and tokens.max() < tiny_config.scene.codebook_size


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_ensemble_answers_a_subset_of_its_outputs(tiny_server: TritonServer, protocol: str):
    from tandem.serving.client import generation_arrays

    url = tiny_server.http_url if protocol == "http" else tiny_server.grpc_url
    with TandemClient(url) as client:
        both = client.infer("tandem", generation_arrays(PROMPT_TEXT, seed=5), ["image", "scene_tokens"])
        image = client.infer("tandem", generation_arrays(PROMPT_TEXT, seed=5), ["image"])
        tokens = client.infer("tandem", generation_arrays(PROMPT_TEXT, seed=5), ["scene_tokens"])
        assert set(image) == {"image"} and set(tokens) == {"scene_tokens"}
        assert np.array_equal(image["image"], both["image"]) and np.array_equal(tokens["scene_tokens"], both["scene_tokens"])
        no_prompt = generation_arrays(PROMPT_TEXT)
        del no_prompt["prompt"]
        for outputs in (["image", "scene_tokens"], ["image"]):
            with pytest.raises(TandemError, match="input 'prompt' is missing") as info:
                client.infer("tandem", no_prompt, outputs)
            assert "deadlock" not in str(info.value)
    # and a plain HTTP request naming no outputs gets all of them
    body = {"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT_TEXT]}]}
    status, text = _http(f"{tiny_server.http_url}/v2/models/tandem/infer", "POST", body)
    assert status == 200 and {o["name"] for o in json.loads(text)["outputs"]} == {"image", "scene_tokens"}


# -- defect 7 (and 2): no token values in error bodies or the server log ------------------------------

PLANTED = 1_987_654_321  # recognisable, outside every codebook, and too long to occur by chance in a log line
# (a 4-digit value did: the server log names thread ids, and 27778 contains 7778)


def test_planted_token_values_never_reach_error_bodies_or_the_log(tiny_server: TritonServer, tiny_config):
    n = tiny_config.scene.num_tokens
    planted = np.full((1, n), PLANTED, np.int32)
    planted[0, 1] = PLANTED + 1
    bodies = []
    for url in (tiny_server.http_url, tiny_server.grpc_url):
        with TandemClient(url) as client:
            with pytest.raises(TandemError, match="outside the codebook") as info:
                client.render(planted)
            bodies.append(str(info.value))
    body = {"inputs": [{"name": "scene_tokens", "shape": [1, n], "datatype": "INT32", "data": planted.ravel().tolist()}]}
    bodies.append(_http(f"{tiny_server.http_url}/v2/models/refinement/infer", "POST", body)[1])
    for text in [*bodies, tiny_server.log_text()]:
        assert str(PLANTED) not in text and str(PLANTED + 1) not in text


def test_runtime_errors_are_masked_before_they_are_sent_or_logged(tiny_artifacts: Path, tiny_config):
    """ONNX Runtime's own error for an out-of-range token quotes it (the red team's "idx=777"):
    that text is what a model would have sent; failure_message masks every number in it."""
    import onnxruntime as ort

    from tandem.serving.models.common import failure_message

    session = ort.InferenceSession(str(tiny_artifacts / "refinement.onnx"), providers=["CPUExecutionProvider"])
    h, w = tiny_config.scene.grid_height, tiny_config.scene.grid_width
    feed = {session.get_inputs()[0].name: np.full((1, h, w), PLANTED, np.int64)}
    with pytest.raises(Exception) as info:
        session.run(None, feed)
    assert str(PLANTED) in str(info.value)  # the leak is real...
    message = failure_message("rendering", info.value)
    assert str(PLANTED) not in message and "rendering failed" in message  # ...and masked
    assert failure_message("rendering", TandemError("3 scene tokens are outside")) == "3 scene tokens are outside"


# -- defect 6: an oversized request is refused at the front door, before it reaches a model -------------


def _shm_bytes(server: TritonServer) -> int:
    from tandem.serving.server import SHM_DIR

    return sum(region.stat().st_size for region in SHM_DIR.glob(f"{server.shm_prefix}*"))


def _raw_http(server: TritonServer, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send a hand-made request (headers that lie about the body, chunked framing) and read the
    answer's status and body."""
    import socket

    host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_an_oversized_request_is_refused_before_it_is_read(tiny_server: TritonServer, tiny_config):
    import gzip
    import time

    import tritonclient.grpc as grpcclient

    from tandem.serving.interface import request_size_limit

    limit = tiny_server.max_request_bytes
    assert limit == request_size_limit(tiny_config, 8)  # recorded by the repository writer, sized from the model
    path = b"/v2/models/tandem/infer"
    shm_before = _shm_bytes(tiny_server)
    # 1. a body announced at 300 MB: answered 413 at once, with none of it sent (so none of it was read)
    started = time.monotonic()
    status, body = _raw_http(tiny_server, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n")
    assert status == 413 and time.monotonic() - started < 5
    message = json.loads(body)["error"]
    assert f"limit of {limit} bytes" in message and "--max-request-bytes" in message  # names the fix
    # 2. chunked (no length announced): counted while read, refused at the limit
    chunk = b"x" * (limit + 1024)
    chunked = b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n"
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    assert _raw_http(tiny_server, head, chunked)[0] == 413
    # 3. a gzip bomb: a few kB on the wire, over the limit once decompressed
    bomb = gzip.compress(b'{"inputs": [{"name": "prompt", "data": ["' + b"y" * (64 * limit) + b'"]}]}')
    assert len(bomb) < limit
    head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(bomb))
    assert _raw_http(tiny_server, head, bomb)[0] == 413
    # 4. gRPC: a prompt of 8 MB is refused from the message's length prefix
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url.removeprefix("grpc://"))
    prompt = grpcclient.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"z" * (8 << 20)]], dtype=object))
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as refused:
        client.infer("tandem", [prompt])
    assert f"vs. {limit}" in str(refused.value)
    client.close()
    # the models never saw them: no shared memory grew, and the server keeps serving
    assert _shm_bytes(tiny_server) == shm_before
    for url in (tiny_server.http_url, tiny_server.grpc_url):
        with TandemClient(url) as generator:
            assert generator.generate([PROMPT_TEXT] * 8).tokens.shape[0] == 8  # the largest batch fits the limit
    # ... and a prompt just over the model's own length limit still gets the model's clear refusal
    with TandemClient(tiny_server.http_url) as generator:
        with pytest.raises(TandemError, match="at most"):
            generator.generate("x" * (tiny_config.reasoning.max_prompt_len + 1))


def test_the_front_door_limit_is_a_flag_and_tritonserver_listens_only_on_private_sockets(tiny_repository: Path):
    with pytest.raises(TandemError, match="--max-request-bytes must be at least"):
        TritonServer(tiny_repository, max_request_bytes=10)
    server = TritonServer(tiny_repository, address="0.0.0.0", max_request_bytes=50_000, http_port=1, grpc_port=2, metrics_port=3)
    server._workdir = Path("/private/work")
    server.cancel_dir, server.drain_dir = server._workdir / "cancel", server._workdir / "drain"
    command = " ".join(server.command(Path("/backends")))
    for what in ("http", "grpc", "metrics"):
        assert f"--{what}-address=unix:/private/work/" in command
    assert "restricted" not in command and "key" not in command  # no key on tritonserver's command line
    config = server.front_door_config()
    assert config.max_request_bytes == 50_000 and config.http_listen == ("0.0.0.0", 1)
    assert config.grpc_upstream == "unix:/private/work/grpc.sock:2"


# -- defect 3: the python backend's shared memory is private and does not outlive the server -----------


def test_shared_memory_regions_are_private_and_stale_ones_are_removed(tiny_server: TritonServer):
    import os

    from tandem.serving.server import SHM_DIR, remove_shm_regions

    with TandemClient(tiny_server.grpc_url) as client:
        client.generate(PROMPT_TEXT)
    regions = list(SHM_DIR.glob(f"{tiny_server.shm_prefix}*"))
    assert regions, "the python backend's regions should carry the server's prefix"
    assert all(region.stat().st_mode & 0o777 == 0o600 for region in regions)
    # a region left by a server whose process is gone (a crash, SIGKILL) is removed; live ones stay
    dead_pid = 2**22 + 12345
    stale = SHM_DIR / f"tandem-shm-{os.getuid()}-{dead_pid}-0-leftover"
    stale.write_bytes(b"tokens")
    other = SHM_DIR / f"not-tandem-{dead_pid}"
    other.write_bytes(b"")
    try:
        removed = remove_shm_regions()
        assert stale.name in removed and not stale.exists()
        assert other.exists() and all(region.exists() for region in regions)
    finally:
        stale.unlink(missing_ok=True)
        other.unlink(missing_ok=True)


# -- defects 4 and 5: SIGTERM under load drains; a restart on the same ports works at once -------------


def _start_serve(repository: Path, ports: list[int], *extra: str):
    import subprocess
    import sys

    command = [sys.executable, "-m", "tandem", "serve", "--repository", str(repository), "--quiet",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "Ctrl-C" in line or "Error" in line:
            break
    assert process.poll() is None, "".join(lines) + process.stdout.read()
    return process, "".join(lines)


def _load(url: str, stop, outcomes: list, prompts: int = 4) -> None:
    """One client sending generations back to back until ``stop`` is set or it is refused;
    records (sent at, outcome) of each."""
    import time

    with TandemClient(url, timeout_s=120) as client:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                client.generate([PROMPT_TEXT] * prompts, seed=1)
                outcomes.append((sent, "ok"))
            except TandemError as exc:
                outcomes.append((sent, str(exc)))
                return  # a refused client goes elsewhere (and closes its connection)


@pytest.mark.parametrize("grace", ["60", "2"])  # defect 8: --grace 2 finished everything yet said "dropped"
def test_sigterm_under_load_drains_and_the_same_ports_restart_at_once(tiny_repository: Path, grace: str):
    import os
    import signal
    import threading
    import time

    from tandem.serving.server import SHM_DIR, free_port

    ports = [free_port() for _ in range(3)]
    process, banner = _start_serve(tiny_repository, ports, "--grace", grace)
    try:
        assert "loopback only" in banner and "admin APIs need tandem-admin-key" in banner
        regions = list(SHM_DIR.glob(f"tandem-shm-{os.getuid()}-{process.pid}-*"))
        assert regions and all(r.stat().st_mode & 0o777 == 0o600 for r in regions)
        stop, outcomes = threading.Event(), []
        urls = [f"grpc://127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[0]}"] * 3
        clients = [threading.Thread(target=_load, args=(url, stop, outcomes)) for url in urls]
        for client in clients:
            client.start()
        while len(outcomes) < 12:  # the load is running
            threading.Event().wait(0.05)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
        stop.set()
        for client in clients:
            client.join(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, out
    assert "stopped cleanly; every generation in flight was answered" in out
    before = [outcome for sent, outcome in outcomes if sent < sigterm_at]
    # every request sent before the stop completed, or was refused before it started (retryable);
    # none failed half-way ("Server is stopping" in the ensemble's second step was the defect)
    failed = [o for o in before if o != "ok" and "starts no new generations" not in o]
    assert failed == [], failed
    assert before.count("ok") >= 12
    assert not list(SHM_DIR.glob(f"tandem-shm-{os.getuid()}-{process.pid}-*"))  # regions removed at stop

    # defect 5: the same ports, right away (TIME-WAIT sockets of the old server remain)
    again = TritonServer(tiny_repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], startup_timeout=120)
    with again:
        with TandemClient(again.grpc_url) as client:
            assert client.generate(PROMPT_TEXT).tokens.shape[0] == 1


def test_a_drain_refuses_new_generations_and_waits_for_running_work(tiny_server: TritonServer, tiny_config):
    """The drain protocol on the shared server: once draining, reasoning refuses new generations
    (retryable) while refinement still serves the ensemble's second step; the drain waits for busy
    model processes (Activity markers, as a decoupled model holds them per generation) and gives up
    after the grace period. The drain is undone afterwards so the shared server keeps serving."""
    from tandem.serving.models.common import DRAINING_FILE, Activity
    from tandem.serving.server import StopReport

    generation = Activity(str(tiny_server.drain_dir))  # this test process plays a model still generating
    try:
        with generation.busy():
            assert tiny_server.in_flight()[1] == 1
            assert tiny_server.drain(grace_s=0.5) is False
            with TandemClient(tiny_server.grpc_url) as client:
                with pytest.raises(TandemError, match="starts no new generations"):
                    client.generate(PROMPT_TEXT)
                assert client.render(np.zeros((tiny_config.scene.num_tokens,), np.int32)).shape[0] == 1
        assert tiny_server.drain(grace_s=30) is True  # idle once the work finished
    finally:
        (tiny_server.drain_dir / DRAINING_FILE).unlink(missing_ok=True)
    report = StopReport(drained=False, exit_code=0, grace_s=0.5, queued=0, busy=1)
    assert not report.ok and "dropped" in report.describe() and "--grace" in report.describe()
    assert not StopReport(drained=True, exit_code=-9, grace_s=60).ok  # killed is never clean
    with TandemClient(tiny_server.grpc_url) as client:
        assert client.generate(PROMPT_TEXT).tokens.shape[0] == 1


# -- defect 10: --poll loads each model once ----------------------------------------------------------


def test_poll_mode_loads_each_model_once(tmp_path: Path, tiny_artifacts: Path):
    """The backend stub used to write __pycache__ into the version folders on load, which Triton's
    poll took for a new model: everything loaded twice. The writer now ships model.py's bytecode."""
    import time

    from tandem.serving.repository import write_repository

    repo = write_repository(tiny_artifacts, tmp_path / "repo")
    files = {p: p.stat().st_mtime_ns for p in repo.rglob("*")}
    with TritonServer(repo, poll_seconds=1, startup_timeout=120) as server:
        time.sleep(3.5)  # three polls
        loads = [line for line in server.log_text().splitlines() if '"loading: reasoning:1"' in line]
        assert len(loads) == 1, "\n".join(loads)
        assert {p: p.stat().st_mtime_ns for p in repo.rglob("*")} == files  # serving writes nothing into the repository


# -- issue 24: faults and hostile load ------------------------------------------------------------------


def _tree(pid: int) -> dict[str, list[int]]:
    """tandem serve's children by role: tritonserver, the front door, the python-backend stubs."""
    import psutil

    roles: dict[str, list[int]] = {"tritonserver": [], "front door": [], "stub": []}
    for child in psutil.Process(pid).children(recursive=True):
        cmdline = " ".join(child.cmdline())
        if "triton_python_backend_stub" in cmdline:
            roles["stub"].append(child.pid)
        elif "tritonserver" in cmdline.split(" ")[0]:
            roles["tritonserver"].append(child.pid)
        elif "tandem.serving.frontdoor" in cmdline:
            roles["front door"].append(child.pid)
    return roles


@pytest.mark.parametrize("victim", ["tritonserver", "stub", "front door"])
def test_a_child_killed_under_load_ends_tandem_serve_in_bounded_time(tiny_repository: Path, victim: str):
    """Defect 1: kill -9 of tritonserver under load left `tandem serve` hung forever (an orphaned
    stub held the log pipe). Any child's death now ends it with a non-zero exit and the reason,
    every child killed, its work folder and shared memory removed."""
    import os
    import signal
    import tempfile
    import threading
    import time

    import psutil

    from tandem.serving.server import SHM_DIR, free_port

    ports = [free_port() for _ in range(3)]
    process, _ = _start_serve(tiny_repository, ports)
    stop, outcomes = threading.Event(), []
    clients = [threading.Thread(target=_load, args=(url, stop, outcomes), daemon=True)
               for url in (f"grpc://127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[0]}")]
    try:
        roles = _tree(process.pid)
        everyone = [pid for pids in roles.values() for pid in pids]
        assert roles["tritonserver"] and roles["front door"] and len(roles["stub"]) >= 2, roles
        for client in clients:
            client.start()
        while len(outcomes) < 4:
            time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(roles[victim][0], signal.SIGKILL)
        out, _ = process.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode not in (0, None), out
    assert took < 30, f"tandem serve took {took:.1f} s to end after the {victim} died"
    assert {"tritonserver": "tritonserver exited", "stub": "python backend process", "front door": "front door exited"}[victim] in out
    time.sleep(0.5)
    alive = [pid for pid in everyone if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left running: {alive}"
    assert not list(Path(tempfile.gettempdir()).glob(f"tandem-triton-{os.getuid()}-{process.pid}-*"))
    assert not list(SHM_DIR.glob(f"tandem-shm-{os.getuid()}-{process.pid}-*"))


def test_an_idle_stop_is_graceful_and_quick(tiny_repository: Path):
    """Defect 11: every stop waited for the front door's pooled connection until tritonserver's exit
    timeout ("Non-graceful termination") and was still reported clean. The front door now closes its
    connections first: tritonserver exits 0 within seconds, and only that is called clean."""
    import time

    server = TritonServer(tiny_repository, startup_timeout=120).start()
    try:
        for url in (server.http_url, server.grpc_url):
            with TandemClient(url) as client:
                client.generate(PROMPT_TEXT)
    finally:
        started = time.monotonic()
        code = server.stop()
        took = time.monotonic() - started
    assert code == 0 and took < 8, (code, took)
    assert "Non-graceful" not in server.log_text() and "Exit timeout expired" not in server.log_text()


@pytest.fixture(scope="module")
def guarded_server(tiny_repository: Path):
    """A server with a small connection cap and a short header timeout, for the abuse checks."""
    with TritonServer(tiny_repository, startup_timeout=120, max_connections=16, header_timeout_s=1.0) as server:
        yield server


def _exchange(server: TritonServer, raw: bytes, wait: float = 10.0) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", server.http_port), timeout=wait) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_front_door_refuses_encodings_it_cannot_bound_and_oversized_headers(guarded_server: TritonServer):
    """Defect 2: a 1.7 kB brotli body cost 2.4 s of the front door's CPU; about 1 MB of headers
    passed outside the size limit; HEAD answered 502."""
    import time

    started = time.monotonic()
    answer = _exchange(guarded_server, b"POST /v2/models/tandem/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\n"
                                       b"Content-Length: 1692\r\nConnection: close\r\n\r\n" + b"\x1b" * 1692)
    assert answer.startswith(b"HTTP/1.1 415") and b"gzip or deflate" in answer
    assert time.monotonic() - started < 2
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 4000) for i in range(50))  # 200 kB of headers
    answer = _exchange(guarded_server, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert answer.split(b" ", 2)[1] in (b"431", b"400"), answer[:200]
    answer = _exchange(guarded_server, b"HEAD /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    with TandemClient(guarded_server.http_url) as client:
        assert client.generate(PROMPT_TEXT).tokens.shape[0] == 1


def test_front_door_closes_half_open_connections_and_caps_them_cleanly(guarded_server: TritonServer):
    """Defect 2: with no header timeout, ~20,000 half-open connections exhausted the front door's file
    descriptors and every client timed out. Incomplete headers are now cut off after the header
    timeout, and connections over the cap are answered 503 and closed, not left hanging."""
    import socket
    import time

    slow = socket.create_connection(("127.0.0.1", guarded_server.http_port), timeout=10)
    slow.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    assert slow.recv(1024) == b""  # closed by the front door
    assert time.monotonic() - started < 5
    slow.close()
    held = []
    try:
        for _ in range(guarded_server.max_connections):
            held.append(socket.create_connection(("127.0.0.1", guarded_server.http_port), timeout=10))
        time.sleep(0.2)
        answer = _exchange(guarded_server, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"limit" in answer
    finally:
        for sock in held:
            sock.close()
    # gRPC: connections over the cap are refused at once (the client fails fast instead of hanging)
    held = [socket.create_connection(("127.0.0.1", guarded_server.grpc_port), timeout=10)
            for _ in range(guarded_server.max_connections + 8)]
    try:
        time.sleep(0.3)
        started = time.monotonic()
        with TandemClient(guarded_server.grpc_url, timeout_s=20) as client:
            with pytest.raises(TandemError):
                client.generate(PROMPT_TEXT)
        assert time.monotonic() - started < 10
    finally:
        for sock in held:
            sock.close()
    time.sleep(1.5)  # the held ones were idle: closed by the server's timeout or by us
    with TandemClient(guarded_server.grpc_url) as client:
        assert client.generate(PROMPT_TEXT).tokens.shape[0] == 1
    with TandemClient(guarded_server.http_url) as client:
        assert client.generate(PROMPT_TEXT).tokens.shape[0] == 1


def test_responses_are_encoded_only_when_the_client_asks(tiny_server: TritonServer):
    """Defect 10: a plain POST (no Accept-Encoding) got a gzip body the front door's own HTTP client
    had asked tritonserver for. Now the bytes are what tritonserver sends that client."""
    import gzip

    body = json.dumps({"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT_TEXT]}]}).encode()
    request = urllib.request.Request(f"{tiny_server.http_url}/v2/models/tandem/infer", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers.get("Content-Encoding") is None
        assert {o["name"] for o in json.loads(response.read())["outputs"]} == {"image", "scene_tokens"}
    request = urllib.request.Request(f"{tiny_server.http_url}/v2/models/tandem/infer", data=body, method="POST",
                                     headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = response.read()
        if response.headers.get("Content-Encoding") == "gzip":  # tritonserver compresses when asked
            payload = gzip.decompress(payload)
        assert "outputs" in json.loads(payload)


def test_no_key_on_any_command_line_and_no_other_user_reaches_tritonserver(secured_server: TritonServer):
    """Defect 3: tritonserver's restricted-API keys sat on its command line (any local user read them
    in /proc and became admin) and its loopback ports took them with no TLS and no size limit. Now
    tritonserver listens on Unix sockets in a 0700 folder and gets no key; the front door enforces
    the keys it read from its standard input."""
    import os
    import socket
    import psutil

    pids = [secured_server.process.pid, secured_server._front.pid]
    pids += [c.pid for c in psutil.Process(secured_server.process.pid).children(recursive=True)]
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert API_KEY not in cmdline and ADMIN_KEY not in cmdline, cmdline
    folder = secured_server._workdir
    assert folder.stat().st_mode & 0o777 == 0o700
    sockets = sorted(p.name for p in folder.iterdir() if p.is_socket())
    assert sockets == ["grpc.sock:2", "http.sock", "metrics.sock"], sockets
    # tritonserver has no TCP port at all
    listening = {c.laddr.port for c in psutil.Process(secured_server.process.pid).connections("inet") if c.status == "LISTEN"}
    assert listening == set(), listening
    if os.getuid() == 0:  # as an unprivileged local user (nobody): the sockets cannot be reached
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # only system calls here, then _exit
            outcome = b"?"
            try:
                os.setgid(65534)
                os.setuid(65534)
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(folder / "http.sock"))
                    outcome = b"connected"
                except PermissionError:
                    outcome = b"refused"
            finally:
                os.write(write, outcome)
                os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        assert os.read(read, 64) == b"refused"
        os.close(read)
    with socket.socket(socket.AF_UNIX) as sock:  # its owner can (tandem itself)
        sock.connect(str(folder / "http.sock"))
    # the keys still work through the front door, and are still required there
    assert _http(f"{secured_server.http_url}/v2/logging", headers={"tandem-api-key": API_KEY})[0] == 403
    assert _http(f"{secured_server.http_url}/v2/logging", headers={"tandem-admin-key": ADMIN_KEY})[0] == 200


def test_client_mistakes_in_json_are_answered_400_by_the_front_door(tiny_server: TritonServer):
    """Defect 8: an INT64 seed of 2**64-1 answered 500 (tritonserver's JSON parser). The front door
    checks JSON infer bodies first and answers 400 naming the valid range."""
    def body(seed) -> dict:
        return {"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT_TEXT]},
                           {"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [seed]}]}

    status, text = _http(f"{tiny_server.http_url}/v2/models/tandem/infer", "POST", body(2**64 - 1))
    assert status == 400 and "'seed' takes an integer in [0, 2**63)" in json.loads(text)["error"]
    status, text = _http(f"{tiny_server.http_url}/v2/models/tandem/infer", "POST", body(7))
    assert status == 200, text


def test_the_supervisor_learns_the_order_in_which_children_die():
    """Defect behind a flaky CI run: a stub killed under load made tritonserver abort within
    milliseconds, and the supervisor's next check (every 0.5 s) saw tritonserver dead first and
    blamed it. The kernel's pidfds give the real order; a process already gone counts too."""
    import signal
    import subprocess
    import time

    from tandem.serving.server import DeathOrder

    order = DeathOrder()
    if not order.available:
        pytest.skip("pidfds need Linux 5.3 or later")
    first, second = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        order.watch(first.pid, "stub")
        order.watch(second.pid, "tritonserver")
        order.watch(gone.pid, "front door")
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 10
        while len(order.deaths()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        second.send_signal(signal.SIGKILL)
        second.wait()
        while len(order.deaths()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(pid, role) for _, pid, role in order.deaths()] == [
            (gone.pid, "front door"), (first.pid, "stub"), (second.pid, "tritonserver")]
    finally:
        order.close()
        for process in (first, second):
            if process.poll() is None:
                process.kill()
                process.wait()
