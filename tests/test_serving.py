"""A real tritonserver (from nvidia-pytriton) serving the tiny export: the ensemble over HTTP and
gRPC, dynamic batching, bad input, the CLI, and the server's own start/stop behaviour."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tandem.cli import main
from tandem.errors import TandemError
from tandem.pipeline import Pipeline
from tandem.runtimes import make_runtime
from tandem.sampling import SamplingParams
from tandem.serving.client import TandemClient, generate_remote, generation_arrays, render_remote
from tandem.serving.interface import ENSEMBLE, IMAGE, PROMPT, REASONING, REFINEMENT, SCENE_TOKENS
from tandem.serving.server import ServerError, TritonServer, free_port

pytestmark = pytest.mark.server

PROMPTS = ["a red circle above a blue square", "two green triangles", "x", "a yellow star at night"]


@pytest.fixture(scope="module")
def pipeline(tiny_artifacts: Path) -> Pipeline:
    return Pipeline(make_runtime("onnxruntime", artifacts=tiny_artifacts))


@pytest.fixture(params=["http", "grpc"])
def url(request: pytest.FixtureRequest, tiny_server: TritonServer) -> str:
    return tiny_server.http_url if request.param == "http" else tiny_server.grpc_url


@pytest.mark.parametrize("seed,temperature,top_k", [(0, 0.0, 0), (123, 0.9, 8), (7, 1.3, 0)])
def test_served_tokens_equal_in_process(url: str, pipeline: Pipeline, seed: int, temperature: float, top_k: int):
    tokens, image = generate_remote(url, PROMPTS[0], seed, temperature, top_k)
    expected = pipeline.generate(PROMPTS[0], seed=seed, temperature=temperature, top_k=top_k)
    assert tokens.dtype == np.int32 and image.dtype == np.uint8
    assert tokens.shape == expected.tokens.shape and image.shape == expected.image.shape
    assert np.array_equal(tokens, expected.tokens)  # bitwise, not approximately
    assert np.array_equal(image, expected.image)


def test_edited_tokens_render_through_refinement(url: str, pipeline: Pipeline):
    tokens, _ = generate_remote(url, PROMPTS[1], seed=3, temperature=0.8, top_k=0)
    edited = tokens.copy()
    edited[0, :] = (edited[0, :] + 5) % pipeline.config.scene.codebook_size
    assert np.array_equal(render_remote(url, edited)[0], pipeline.render(edited)[0])


def test_concurrent_renders_each_get_their_own_images(url: str, pipeline: Pipeline):
    """Refinement forms its own batches (a render thread, no Triton batcher): requests of 1 to 3
    rows sent at once, one of them with tokens outside the codebook, are rendered together where
    they meet, and every request gets exactly its own images (bitwise) or its own error."""
    rng = np.random.default_rng(5)
    size = pipeline.config.scene.codebook_size
    jobs = [rng.integers(0, size, size=(1 + i % 3, *pipeline.grid)) for i in range(9)]
    jobs[4] = np.full((2, *pipeline.grid), size + 7)  # outside the codebook: refused alone

    def render(tokens: np.ndarray):
        wire = np.ascontiguousarray(tokens.reshape(len(tokens), -1), dtype=np.int32)  # the server checks them
        with TandemClient(url) as client:
            try:
                return client.infer(REFINEMENT, {SCENE_TOKENS: wire}, [IMAGE])[IMAGE]
            except TandemError as exc:
                return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(render, jobs))
    for index, (tokens, answer) in enumerate(zip(jobs, answers)):
        if index == 4:
            assert isinstance(answer, TandemError) and "outside the codebook" in str(answer)
        else:
            assert not isinstance(answer, Exception), answer
            assert np.array_equal(answer, pipeline.render(tokens))


def test_multi_prompt_request_samples_each_row_with_its_own_settings(url: str, pipeline: Pipeline):
    seeds, temps, top_ks = [1, 2, 3, 4], [0.0, 0.7, 1.0, 0.9], [0, 4, 0, 16]
    with TandemClient(url) as client:
        result = client.generate(PROMPTS, seed=seeds, temperature=temps, top_k=top_ks, model=REASONING)
    assert result.images is None and result.tokens.shape == (4, *pipeline.grid)
    params = [SamplingParams(s, t, k) for s, t, k in zip(seeds, temps, top_ks)]
    assert np.array_equal(result.tokens, pipeline.generate_tokens(PROMPTS, params))


def test_concurrent_requests_become_one_batched_generation(tiny_request_level_server: TritonServer, pipeline: Pipeline):
    """Request-level batching (--scheduler request): eight clients at once, Triton's dynamic batcher
    hands the reasoning model several requests per execution, and every client still gets exactly
    its own in-process result."""
    tiny_server = tiny_request_level_server
    jobs = [(PROMPTS[i % 4], i, 0.8 if i % 2 else 0.0, i % 5) for i in range(8)]
    with TandemClient(tiny_server.grpc_url) as stats_client:
        before = stats_client.statistics(REASONING)["model_stats"][0]
        barrier = threading.Barrier(len(jobs))

        def send(job):
            prompt, seed, temperature, top_k = job
            with TandemClient(tiny_server.grpc_url) as client:
                barrier.wait()
                return client.generate(prompt, seed, temperature, top_k).tokens[0]

        with ThreadPoolExecutor(len(jobs)) as pool:
            served = list(pool.map(send, jobs))
        after = stats_client.statistics(REASONING)["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == len(jobs)
    assert executions < inferences, f"{inferences} requests ran in {executions} executions: nothing was batched"
    batch_sizes = {int(b["batch_size"]) for b in after["batch_stats"]}
    assert max(batch_sizes) > 1
    for (prompt, seed, temperature, top_k), tokens in zip(jobs, served):
        assert np.array_equal(tokens, pipeline.generate(prompt, seed, temperature, top_k).tokens)


def _bad_requests(grid_tokens: int):
    good = generation_arrays("a red circle")
    both = [IMAGE, SCENE_TOKENS]  # as TandemClient asks (subset requests: tests/test_redteam.py)
    return [
        ("prompt as INT32", ENSEMBLE, {**good, PROMPT: np.array([[1]], dtype=np.int32)}, both, "input 'prompt' data-type is 'INT32'"),
        ("seed as FP32", ENSEMBLE, {**good, "seed": np.array([[1.5]], dtype=np.float32)}, both, "input 'seed' data-type is 'FP32'"),
        ("tokens of the wrong shape", REFINEMENT, {SCENE_TOKENS: np.zeros((1, grid_tokens + 1), np.int32)}, [IMAGE], "unexpected shape for input 'scene_tokens'"),
        ("tokens as INT64", REFINEMENT, {SCENE_TOKENS: np.zeros((1, grid_tokens), np.int64)}, [IMAGE], "'INT64', but model 'refinement' expects 'INT32'"),
        ("empty prompt", ENSEMBLE, generation_arrays("   "), both, "prompt is empty"),
        ("oversize prompt", ENSEMBLE, generation_arrays("x" * 500), both, "shorten the prompt"),
        ("invalid UTF-8", REASONING, {**good, PROMPT: np.array([[b"\xff\xfe"]], dtype=object)}, [SCENE_TOKENS], "UTF-8"),
        ("negative temperature", ENSEMBLE, generation_arrays("a red circle", temperature=-1.0), both, "temperature must be 0 \\(greedy\\) or within"),
        ("negative seed", ENSEMBLE, generation_arrays("a red circle", seed=-5), both, "seed must be in"),
        ("out-of-codebook tokens", REFINEMENT, {SCENE_TOKENS: np.full((1, grid_tokens), 10_000, np.int32)}, [IMAGE], "outside the codebook"),
        ("negative tokens", REFINEMENT, {SCENE_TOKENS: np.full((1, grid_tokens), -1, np.int32)}, [IMAGE], "outside the codebook"),
        ("unknown model", "dalle", good, [IMAGE], "unknown model: 'dalle'"),
    ]


def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(url: str, pipeline: Pipeline):
    n = pipeline.config.scene.num_tokens
    with TandemClient(url) as client:
        for label, model, arrays, outputs, message in _bad_requests(n):
            with pytest.raises(TandemError, match=message):
                client.infer(model, arrays, outputs)
            ok = client.generate("a red circle", seed=1)  # and the next good request is served
            assert ok.images is not None and ok.images.shape[0] == 1, label
        with pytest.raises(TandemError, match="unknown model: 'tandem' version 9"):
            client.infer(ENSEMBLE, generation_arrays("a red circle"), [IMAGE], version="9")
        with pytest.raises(TandemError, match=r"this server serves: reasoning v1, refinement v1, tandem v1"):
            client.infer("nope", generation_arrays("a red circle"), [IMAGE])
        assert client.is_ready(ENSEMBLE) and client.is_ready(REASONING) and client.is_ready(REFINEMENT)


def test_a_bad_request_fails_alone_among_concurrent_good_ones(tiny_server: TritonServer, pipeline: Pipeline):
    prompts = ["a red circle", "", "two green triangles", "x"]
    barrier = threading.Barrier(len(prompts))

    def send(prompt):
        with TandemClient(tiny_server.grpc_url) as client:
            barrier.wait()
            try:
                return client.generate(prompt, seed=2, temperature=0.5).tokens[0]
            except TandemError as exc:
                return exc

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(send, prompts))
    assert isinstance(results[1], TandemError) and "prompt is empty" in str(results[1])
    for prompt, result in zip(prompts, results):
        if prompt:
            assert np.array_equal(result, pipeline.generate(prompt, seed=2, temperature=0.5).tokens)


def test_models_write_nothing_and_log_no_tokens(tiny_server: TritonServer, tiny_repository: Path):
    files_before = sorted((p, p.stat().st_mtime_ns) for p in tiny_repository.rglob("*"))
    tokens, _ = generate_remote(tiny_server.grpc_url, "a blue square", seed=11, temperature=1.0)
    assert sorted((p, p.stat().st_mtime_ns) for p in tiny_repository.rglob("*")) == files_before
    log = tiny_server.log_text()
    for separator in (" ", ", ", ","):
        assert separator.join(str(t) for t in tokens.ravel()[:8]) not in log


def test_cli_generate_and_render_through_the_server(tiny_server: TritonServer, tmp_path: Path, pipeline: Pipeline, capsys):
    png, npy = tmp_path / "out.png", tmp_path / "tokens.npy"
    argv = ["generate", PROMPTS[0], "--server", tiny_server.grpc_url, "--out", str(png), "--tokens-out", str(npy), "--seed", "5"]
    assert main(argv) == 0
    expected = pipeline.generate(PROMPTS[0], seed=5)
    assert np.array_equal(np.load(npy), expected.tokens)
    assert np.array_equal(np.asarray(Image.open(png)), expected.image)
    rendered = tmp_path / "render.png"
    assert main(["render", "--tokens", str(npy), "--server", tiny_server.http_url, "--out", str(rendered)]) == 0
    assert np.array_equal(np.asarray(Image.open(rendered)), expected.image)
    # reasoning alone, then refinement: the same picture in two requests
    assert main(["generate", PROMPTS[0], "--server", tiny_server.http_url, "--model", "reasoning", "--seed", "5",
                 "--out", str(rendered)]) == 0
    assert np.array_equal(np.asarray(Image.open(rendered)), expected.image)
    assert main(["generate", "", "--server", tiny_server.http_url, "--out", str(png)]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_port_in_use_and_missing_repository_are_clear_errors(tiny_repository: Path, tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"http port {port} on 127.0.0.1 is already in use"):
            TritonServer(tiny_repository, http_port=port).start()
    with pytest.raises(ServerError, match="not a tandem model repository"):
        TritonServer(tmp_path).start()


def test_startup_failure_raises_with_the_server_log(tiny_repository: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo, copy_function=shutil.copy)  # copies: the shared repository stays intact
    # a model that cannot load (one the repository does not have): the error carries the log
    with pytest.raises(ServerError) as info:
        TritonServer(repo, startup_timeout=60, extra_args=("--model-control-mode=explicit", "--load-model=absent")).start()
    assert "tritonserver log" in str(info.value)
    # a corrupted file is refused before tritonserver starts, naming the file and the fix
    from tandem.serving.repository import RepositoryIntegrityError

    (repo / REFINEMENT / "1" / "artifacts" / "refinement.ort.onnx").write_bytes(b"corrupt")
    with pytest.raises(RepositoryIntegrityError, match="refinement.ort.onnx.*tandem repo"):
        TritonServer(repo, startup_timeout=60).start()


def test_tandem_serve_stops_cleanly_on_sigterm(tiny_repository: Path):
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "tandem", "serve", "--repository", str(tiny_repository), "--quiet",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        assert any(f"grpc://127.0.0.1:{ports[1]}" in line for line in lines), "".join(lines)
        tokens, _ = generate_remote(f"grpc://127.0.0.1:{ports[1]}", "a red circle")
        assert tokens.shape == (4, 4)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert "tritonserver stopped cleanly" in out
        with socket.socket() as probe:  # the port is free again: the server really exited
            probe.bind(("127.0.0.1", ports[0]))
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_tandem_demo_serves_the_prompt_through_the_ensemble(tiny_artifacts: Path, tmp_path: Path, pipeline: Pipeline, capsys):
    """What `make demo` runs: reuse the export, write the repository, serve, generate, stop, compare."""
    png, npy = tmp_path / "demo.png", tmp_path / "demo.npy"
    argv = ["demo", "--config", "tiny", "--artifacts", str(tiny_artifacts), "--repository", str(tmp_path / "repo"),
            "--out", str(png), "--tokens-out", str(npy)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/6] export tiny" in out and "SKIPPED" in out
    assert "served scene tokens identical to the in-process pipeline's: True" in out
    assert "[5/6] stop tritonserver: OK" in out
    expected = pipeline.generate("a red circle above a blue square")
    assert np.array_equal(np.asarray(Image.open(png)), expected.image)
    assert np.array_equal(np.load(npy), expected.tokens)


def test_the_front_door_cost_script_pairs_each_request_with_its_in_process_twin(tiny_artifacts: Path, tmp_path: Path):
    """benchmarks/front_door_cost.py against real servers (one behind the front door, one without):
    every round has a ratio per server, the front-door server's processes have CPU figures, and it
    refuses a folder that exists."""
    import json
    import subprocess
    import sys

    out = tmp_path / "fd"
    command = [sys.executable, "benchmarks/front_door_cost.py", "--artifacts", str(tiny_artifacts), "--rounds", "2",
               "--requests", "3", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    for name in ("front door", "direct"):
        assert results["ratios_vs_inprocess"][name]["rounds"] == 2 and len(results["ms_over_inprocess"][name]) == 2
    assert {"tritonserver", "front door"} <= set(results["cpu_ms_per_request_front_door_server"])
    assert "Front door minus direct" in (out / "report.md").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr
