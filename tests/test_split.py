"""The split rehearsal (issue 13): a reasoning-only and a refinement-only tritonserver, gRPC with
mutual TLS between the hops, chained by the client the way the InferenceGraph chains them; the
answers equal the single-server ensemble's; a refinement server lost under load fails every
request it cannot serve, fast and clearly, and service resumes when it is back."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_redteam import pki  # noqa: F401  (the shared trustme PKI fixture: CA, server, client, rogue certs)
from tandem.cli import main
from tandem.deploy.split import HopFailed, SplitClient, split_servers, stage_repositories, stage_server
from tandem.errors import TandemError
from tandem.serving.client import TandemClient
from tandem.serving.interface import ENSEMBLE, REASONING, REFINEMENT
from tandem.serving.security import ClientTLS, TLSOptions

pytestmark = pytest.mark.server

PROMPTS = ["a red circle above a blue square", "two green triangles", "a yellow star at night"]
HOP_TIMEOUT_S = 30.0
FAIL_WITHIN_S = 10.0  # a request the lost server cannot serve fails within this (none waits for the hop timeout)


@pytest.fixture(scope="module")
def repositories(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path) -> dict[str, Path]:
    return stage_repositories(tiny_artifacts, tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="module")
def tls(pki) -> TLSOptions:  # noqa: F811
    return TLSOptions(pki["server.pem"], pki["server.key"], client_ca=pki["ca"])


@pytest.fixture(scope="module")
def client_tls(pki) -> ClientTLS:  # noqa: F811
    return ClientTLS(pki["ca"], pki["client.pem"], pki["client.key"])


@pytest.fixture(scope="module")
def servers(repositories, tls):
    with split_servers(repositories, tls=tls, startup_timeout=120) as running:
        yield running


@pytest.fixture(scope="module")
def reference(tiny_server) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(prompt, seed) -> (tokens, image) from the single-server ensemble."""
    answers = {}
    with TandemClient(tiny_server.grpc_url) as client:
        for i, prompt in enumerate(PROMPTS):
            for seed in (0, 5):
                result = client.generate(prompt, seed=seed, temperature=0.9 if seed else 0.0, model=ENSEMBLE)
                answers[(prompt, seed)] = (result.tokens[0], result.images[0])
    return answers


def test_each_server_serves_only_its_stage(repositories, servers, client_tls):
    assert sorted(p.name for p in repositories[REASONING].iterdir()) == [REASONING]
    assert sorted(p.name for p in repositories[REFINEMENT].iterdir()) == [REFINEMENT]
    assert servers.reasoning.grpc_port != servers.refinement.grpc_port
    for url, stage, other in ((servers.reasoning_url, REASONING, REFINEMENT), (servers.refinement_url, REFINEMENT, REASONING)):
        with TandemClient(url, tls=client_tls) as client:
            assert client.is_ready(stage) and not client.is_ready(other) and not client.is_ready(ENSEMBLE)


def test_split_over_mtls_equals_the_ensemble(servers, client_tls, reference):
    assert servers.reasoning_url.startswith("grpcs://") and servers.refinement_url.startswith("grpcs://")
    with SplitClient(servers.reasoning_url, servers.refinement_url, tls=client_tls) as client:
        for (prompt, seed), (tokens, image) in reference.items():
            result = client.generate(prompt, seed=seed, temperature=0.9 if seed else 0.0)
            assert np.array_equal(result.tokens[0], tokens) and np.array_equal(result.images[0], image), (prompt, seed)


def test_generate_command_runs_the_split_path(servers, pki, reference, tmp_path, capsys):  # noqa: F811
    out, tokens_out = tmp_path / "split.png", tmp_path / "tokens.npy"
    code = main([
        "generate", PROMPTS[0], "--server", servers.reasoning_url, "--refinement-server", servers.refinement_url,
        "--tls-ca", str(pki["ca"]), "--tls-client-cert", str(pki["client.pem"]), "--tls-client-key", str(pki["client.key"]),
        "--out", str(out), "--tokens-out", str(tokens_out),
    ])
    assert code == 0 and out.exists()
    assert np.array_equal(np.load(tokens_out), reference[(PROMPTS[0], 0)][0])


def test_a_client_without_a_valid_certificate_is_refused(servers, pki):  # noqa: F811
    attempts = {
        "no client certificate": ClientTLS(pki["ca"]),
        "certificate from an untrusted CA": ClientTLS(pki["ca"], pki["stranger.pem"], pki["stranger.key"]),
    }
    for url in (servers.reasoning_url, servers.refinement_url):
        for why, tls in attempts.items():
            with TandemClient(url, tls=tls, timeout_s=20) as client:
                with pytest.raises(TandemError, match="TLS handshake"):
                    client.model_config(REASONING if url == servers.reasoning_url else REFINEMENT)
    # plaintext gRPC to a TLS hop is refused too
    with SplitClient(servers.reasoning_url.replace("grpcs://", "grpc://"), servers.refinement_url, timeout_s=20) as client:
        with pytest.raises(HopFailed, match="reasoning hop"):
            client.generate(PROMPTS[0])


def test_refinement_lost_under_load_fails_fast_and_resumes_on_restart(repositories, tls, client_tls, pki, reference):  # noqa: F811
    """SIGKILL the refinement server (a lost node) under load from 4 threads: every request either
    returns the exact reference answer or fails with HopFailed naming the refinement hop within
    FAIL_WITHIN_S; none hangs. A new refinement server on the same ports restores service; the
    reasoning server is never restarted."""
    with stage_server(repositories[REASONING], REASONING, tls=tls, startup_timeout=120) as reasoning:
        refinement = stage_server(repositories[REFINEMENT], REFINEMENT, tls=tls, startup_timeout=120).start()
        ports = {"http_port": refinement.http_port, "grpc_port": refinement.grpc_port, "metrics_port": refinement.metrics_port}
        reasoning_pid = reasoning.process.pid
        client = SplitClient(reasoning.grpc_url, refinement.grpc_url, tls=client_tls, timeout_s=HOP_TIMEOUT_S)
        outcomes: list[tuple[float, float, str, object]] = []  # (start, duration, kind, detail)
        lock, stop = threading.Lock(), threading.Event()
        cases = list(reference)

        def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                prompt, seed = cases[i % len(cases)]
                i += 4
                start = time.monotonic()
                try:
                    result = client.generate(prompt, seed=seed, temperature=0.9 if seed else 0.0)
                    tokens, image = reference[(prompt, seed)]
                    correct = np.array_equal(result.tokens[0], tokens) and np.array_equal(result.images[0], image)
                    kind, detail = ("ok" if correct else "false-success"), (prompt, seed)
                except TandemError as exc:
                    kind, detail = "failed", exc
                except Exception as exc:  # anything that is not a clear tandem error is a defect
                    kind, detail = "unclear-error", exc
                with lock:
                    outcomes.append((start, time.monotonic() - start, kind, detail))

        workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
        try:
            for w in workers:
                w.start()
            deadline = time.monotonic() + 60
            while sum(o[2] == "ok" for o in outcomes) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sum(o[2] == "ok" for o in outcomes) >= 8, outcomes[-3:]
            killed_at = time.monotonic()
            os.killpg(refinement.process.pid, signal.SIGKILL)  # the node is gone: no graceful drain
            refinement.process.wait(timeout=10)
            time.sleep(3.0)  # load keeps arriving while refinement is down
            down_until = time.monotonic()
            refinement.stop()  # collect the dead server (log reader, /dev/shm regions)
            restarted = stage_server(repositories[REFINEMENT], REFINEMENT, tls=tls, startup_timeout=120, **ports).start()
            try:
                resumed_at = time.monotonic()
                deadline = resumed_at + 60
                while not any(o[2] == "ok" and o[0] >= resumed_at for o in outcomes) and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                stop.set()
                for w in workers:
                    w.join(timeout=HOP_TIMEOUT_S + 10)
                restarted.stop()
            assert not any(w.is_alive() for w in workers), "a request hung"
        finally:
            stop.set()
            client.close()
            refinement.stop()

        assert reasoning.process.pid == reasoning_pid and reasoning.is_running(), "the reasoning server was restarted"
        kinds = [o[2] for o in outcomes]
        assert "false-success" not in kinds and "unclear-error" not in kinds, [o for o in outcomes if o[2] not in ("ok", "failed")]
        during = [o for o in outcomes if killed_at <= o[0] < down_until]
        assert during and all(o[2] == "failed" for o in during), "a request sent while refinement was down succeeded"
        failures = [o for o in outcomes if o[2] == "failed"]
        assert failures, "no request was affected by the lost server"
        for start, duration, _, exc in failures:
            assert isinstance(exc, HopFailed) and exc.hop == REFINEMENT, exc
            assert duration < FAIL_WITHIN_S, f"a failed request took {duration:.1f} s: {exc}"
        assert any(o[2] == "ok" and o[0] >= resumed_at for o in outcomes), "service did not resume after the restart"


def test_tandem_serve_runs_one_stage_of_the_split_with_mtls(repositories, servers, pki, client_tls, reference):  # noqa: F811
    """`tandem serve` over a one-stage repository (as `tandem deploy` writes them) serves that stage
    with mutual TLS; the split client chains it to the refinement server."""
    import subprocess
    import sys

    from tandem.serving.server import free_port

    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "tandem", "serve", "--repository", str(repositories[REASONING]), "--quiet",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]), "--tls-client-ca", str(pki["ca"])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        assert any("(mutual TLS)" in line for line in lines), "".join(lines)
        with SplitClient(f"grpcs://127.0.0.1:{ports[1]}", servers.refinement_url, tls=client_tls) as client:
            result = client.generate(PROMPTS[1])
        tokens, image = reference[(PROMPTS[1], 0)]
        assert np.array_equal(result.tokens[0], tokens) and np.array_equal(result.images[0], image)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def _post_json(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_graph_sequence_through_the_hop_transformer(servers, reference):
    """What the InferenceGraph router does, step for step: POST the client's v2 request to the
    reasoning server, POST its response bytes *unchanged* ($response) to the hop transformer
    (kserve's model server running tandem.deploy.hop, predictor = the refinement server); the
    answer carries the image and the scene tokens, equal to the single-server ensemble's."""
    import json
    import subprocess
    import sys
    import urllib.request

    import socket

    # The hop serves on a socket bound here (port 0: the kernel picks a free one) and inherited, so
    # no other process can take its port between picking and binding (that race once exited 3).
    listener = socket.create_server(("127.0.0.1", 0))
    hop_port = listener.getsockname()[1]
    refinement_http = servers.refinement.http_url.removeprefix("http://")
    with listener:
        process = subprocess.Popen(
            [sys.executable, "-m", "tandem.deploy.hop", "--model_name", REFINEMENT, "--predictor_host", refinement_http,
             "--predictor_protocol", "v2", "--listen_fd", str(listener.fileno()), "--enable_grpc", "false", "--workers", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[1],
            pass_fds=(listener.fileno(),),
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{hop_port}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() is not None else "hop not ready"
            time.sleep(0.3)
        prompt = PROMPTS[2]
        request = {"inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": [prompt]},
            {"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [5]},
            {"name": "temperature", "datatype": "FP64", "shape": [1, 1], "data": [0.9]},
        ]}
        status, step1 = _post_json(f"{servers.reasoning.http_url}/v2/models/{REASONING}/infer", json.dumps(request).encode())
        assert status == 200, step1[:500]
        status, step2 = _post_json(f"http://127.0.0.1:{hop_port}/v1/models/{REFINEMENT}:predict", step1)
        assert status == 200, step2[:500]
        outputs = {o["name"]: o for o in json.loads(step2)["outputs"]}
        assert set(outputs) == {"image", "scene_tokens"}
        tokens, image = reference[(prompt, 5)]
        assert np.array_equal(np.asarray(outputs["scene_tokens"]["data"]).reshape(tokens.shape), tokens)
        assert np.array_equal(np.asarray(outputs["image"]["data"], dtype=np.uint8).reshape(image.shape), image)
        # a body that is not reasoning's response is refused with a clear error, and the hop keeps serving
        status, body = _post_json(f"http://127.0.0.1:{hop_port}/v1/models/{REFINEMENT}:predict", json.dumps(request).encode())
        assert status == 400 and b"data: $response" in body, body[:500]
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    token_text = ", ".join(str(int(t)) for t in reference[(PROMPTS[2], 5)][0].ravel()[:8])
    assert token_text not in output  # the hop's log does not carry the scene tokens
