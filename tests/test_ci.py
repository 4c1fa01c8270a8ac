"""tandem as a CI job runs it: JSON alone on stdout, exit codes that gate, pre-flight checks, any
output folder accepted, served requests checked client-side, a serve log without CUDA errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tandem.errors import (
    EXIT_CHECK_FAILED,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ArtifactError,
    CheckFailed,
    EnvironmentProblem,
    TandemError,
    exit_code_for,
)

REPO = Path(__file__).resolve().parents[1]


def tandem(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m tandem ...` as CI runs it, from ``cwd`` (default: the checkout) with tandem importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env)


def json_result(result: subprocess.CompletedProcess, command: str) -> dict:
    """stdout must be exactly one JSON object (progress and messages went to stderr)."""
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"stdout is not JSON alone ({exc}):\n{result.stdout[:2000]}\n--- stderr ---\n{result.stderr[-3000:]}")
    assert data["schema_version"] == 1 and data["command"] == command
    assert data["exit_code"] == result.returncode and data["ok"] == (result.returncode == 0)
    return data


# ----------------------------------------------------------------------------- the CI job, end to end


@pytest.fixture(scope="module")
def untrained_small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small config's seeded initial weights as a checkpoint: it draws nothing its captions ask for."""
    from tandem.config import load_config
    from tandem.models import build_stages, save_weights

    config = load_config("small").model_copy(update={"checkpoint": None})
    out = tmp_path_factory.mktemp("ckpt") / "untrained.safetensors"
    save_weights(build_stages(config), out)
    return out


@pytest.mark.server
@pytest.mark.timeout(1200)  # the small export fixture (shared with test_cli) is part of this test's setup
def test_ci_job_build_eval_bench_gate_on_json_and_exit_codes(tmp_path: Path, small_artifacts: Path, untrained_small_checkpoint: Path):
    work = tmp_path / "ci"  # run from a folder that is not the checkout: bundled configs by name, outputs under build/
    work.mkdir()

    # 1. build --json: the build manifest on stdout, outputs under build/<config>-<target> of the working folder
    result = tandem("build", "--config", "tiny", "--target", "cpu", "--json", cwd=work)
    build = json_result(result, "build")
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    assert build["build"]["passed"] and build["build"]["target"] == "cpu"
    out = work / "build" / "tiny-cpu"
    assert Path(build["out"]).resolve() == out.resolve() and (out / "build_manifest.json").exists()
    assert "[1/5] export" in result.stderr  # progress went to stderr

    # 2. eval --json --min-accuracy: the trained checkpoint passes, runtimes agree
    report = tmp_path / "eval.json"
    result = tandem(
        "eval", "--config", "small", "--artifacts", str(small_artifacts), "--runtime", "torch,onnxruntime",
        "--per-count", "1", "--min-accuracy", "0.3", "--json", "--out", str(report), cwd=work,
    )
    evaluation = json_result(result, "eval")
    assert evaluation["all_agree"] and set(evaluation["runtimes"]) == {"torch", "onnxruntime"}
    accuracies = [r["accuracy"] for r in evaluation["runtimes"].values()]
    assert result.returncode == (EXIT_OK if min(accuracies) >= 0.3 else EXIT_CHECK_FAILED)
    assert json.loads(report.read_text())["all_agree"]

    # ... an untrained checkpoint misses --min-accuracy: exit 1, the failed check named; nothing tracked written
    result = tandem(
        "eval", "--config", "small", "--checkpoint", str(untrained_small_checkpoint), "--runtime", "torch",
        "--per-count", "1", "--min-accuracy", "0.9", "--json", cwd=work,
    )
    failed = json_result(result, "eval")
    assert result.returncode == EXIT_CHECK_FAILED, result.stderr[-3000:]
    assert [c["name"] for c in failed["checks"] if not c["ok"]] == ["torch accuracy >= 90.00%"]
    assert "check failed: torch accuracy" in result.stderr
    assert (work / "build" / "eval-small.json").exists() and (work / "build" / "eval-small.png").exists()

    # 3. bench --quick --json --fail-on-target over the build folder: exit 1 exactly when a target says FAIL
    result = tandem(
        "bench", "--config", "tiny", "--artifacts", str(out), "--quick", "--skip-served", "--no-progress",
        "--runtime", "onnxruntime", "--json", "--fail-on-target", "--out", str(tmp_path / "bench"), cwd=work,
    )
    bench = json_result(result, "bench")
    statuses = {t["description"]: t["status"] for t in bench["targets"]}
    missed = [name for name, status in statuses.items() if status == "FAIL"]
    assert bench["missed_targets"] == missed
    assert result.returncode == (EXIT_CHECK_FAILED if missed else EXIT_OK), result.stderr[-3000:]
    assert Path(bench["results"]).exists() and set(statuses.values()) <= {"PASS", "FAIL", "NOT RUN"}


# ----------------------------------------------------------------------------- exit codes


def test_one_mapping_from_exceptions_to_exit_codes():
    assert exit_code_for(TandemError("bad flag")) == EXIT_USAGE
    assert exit_code_for(ArtifactError("missing export")) == EXIT_USAGE
    assert exit_code_for(CheckFailed("accuracy")) == EXIT_CHECK_FAILED
    assert exit_code_for(EnvironmentProblem("no memory")) == EXIT_ENVIRONMENT
    assert exit_code_for(KeyboardInterrupt()) == EXIT_INTERRUPTED
    # A library that catches Ctrl-C and raises its own error (as torch.export's exporter may) still means 130.
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("export failed") from exc
    except RuntimeError as wrapped:
        assert exit_code_for(wrapped) == EXIT_INTERRUPTED
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        exit_code_for(ZeroDivisionError())


def test_ctrl_c_inside_torch_export_exits_130_and_leaves_no_export(tmp_path: Path):
    out = tmp_path / "export"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "tandem", "export", "--config", "tiny", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "torch.onnx.export" not in seen and time.monotonic() < deadline:  # tqdm's postfix names the step
            seen += process.stderr.read(1)
        assert "torch.onnx.export" in seen, seen
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "tandem export: interrupted" in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written where it would load


# ----------------------------------------------------------------------------- pre-flight


def test_an_export_too_large_for_this_machine_is_refused_before_allocating(tmp_path: Path):
    from tandem.config import load_config
    from tandem.memory import available_memory, memory_estimate

    have = available_memory()
    if have is None or have > memory_estimate(load_config("seed"), "export"):
        pytest.skip("this machine has the memory to export the seed config; the refusal cannot be shown here")
    start = time.monotonic()
    result = tandem("export", "--config", "seed", "--out", str(tmp_path / "seed"), "--json")
    assert result.returncode == EXIT_ENVIRONMENT
    error = json_result(result, "export")["error"]
    assert "needs about" in error and "GiB" in error and "is available here" in error
    assert "Traceback" not in result.stderr and not (tmp_path / "seed").exists()
    assert time.monotonic() - start < 60  # counted on the meta device, nothing allocated


def test_outputs_are_checked_before_generating(tiny_artifacts: Path, tmp_path: Path):
    for args, message in [
        (["--out", str(tmp_path / "x.jpg")], "--out must name a .png file"),
        (["--out", str(tmp_path / "x.png"), "--tokens-out", str(tmp_path / "t.txt")], "--tokens-out must name a .npy file"),
        (["--out", str(tmp_path)], "must name a .png"),
    ]:
        result = tandem("generate", "a red circle", "--artifacts", str(tiny_artifacts), *args)
        assert result.returncode == EXIT_USAGE and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_doctor_lists_targets_and_runtimes_with_reasons():
    result = tandem("doctor", "--config", "tiny", "--json")
    data = json_result(result, "doctor")
    targets = {c["name"]: c for c in data["targets"]}
    runtimes = {c["name"]: c for c in data["runtimes"]}
    assert set(targets) == {"cpu", "h100", "a100", "inf2", "cuda-torch", "cpu-aot"}
    assert targets["cpu"]["ok"] and runtimes["onnxruntime"]["ok"] and runtimes["torch"]["ok"]
    for check in [*targets.values(), *runtimes.values()]:
        assert check["detail"], check  # every "no" says why
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert not targets["h100"]["ok"] and "TensorRT" in targets["h100"]["detail"]
    assert {c["name"] for c in data["environment"]} >= {"tritonserver", "memory", "export tiny"}


# ----------------------------------------------------------------------------- any output folder


def test_a_build_folder_is_accepted_wherever_a_folder_is_asked_for(tiny_artifacts: Path, tmp_path: Path):
    from tandem.formats import folders

    build = tmp_path / "tiny-cpu"
    result = tandem("build", "--config", "tiny", "--target", "cpu", "--out", str(build), "--artifacts", str(tiny_artifacts))
    assert result.returncode == 0, result.stderr
    # the build folder, its export/ and its model_repository/ all lead to what each command needs
    assert folders.export_dir(build) == build / "export"
    assert folders.export_dir(build / "model_repository") == build / "export"
    assert folders.repository_dir(build) == build / "model_repository"
    png = tmp_path / "out.png"
    result = tandem("generate", "a red circle", "--artifacts", str(build), "--out", str(png))
    assert result.returncode == 0, result.stderr
    # what cannot be found is named with the command that makes it
    with pytest.raises(ArtifactError, match="compiles nothing ahead of time"):
        folders.compiled_dir(build)
    with pytest.raises(ArtifactError, match=r"tandem repo --artifacts .* --repository DIR"):
        folders.repository_dir(tiny_artifacts)
    with pytest.raises(ArtifactError, match="not a tandem output folder"):
        folders.export_dir(tmp_path)


# ----------------------------------------------------------------------------- served requests


@pytest.mark.server
def test_served_requests_are_checked_against_the_servers_metadata(tiny_server, tiny_artifacts: Path):
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime
    from tandem.serving.client import TandemClient

    pipeline = Pipeline(make_runtime("onnxruntime", artifacts=tiny_artifacts))
    tokens = pipeline.generate("a red circle", seed=3).tokens  # [4, 4]
    with TandemClient(tiny_server.grpc_url) as client:
        assert client.grid("refinement") == (4, 4) and client.codebook_size("refinement") == 64
        with pytest.raises(TandemError, match=r"\[8, 8\] do not fit the 4x4 grid of model 'refinement'"):
            client.render(np.zeros((8, 8), np.int64))
        with pytest.raises(TandemError, match=r"outside the codebook \[0, 64\)"):
            client.render(np.full((4, 4), 64))
        # every image of a batch, also past the server's max batch (8): sent in chunks
        batch = np.stack([tokens] * 11)
        images = client.render(batch)
        assert images.shape[0] == 11 and all(np.array_equal(image, images[0]) for image in images)
        assert np.array_equal(client.render(tokens.ravel())[0], pipeline.render(tokens)[0])  # [16] is one grid
        generated = client.generate(["a red circle"] * 10, seed=3)
        assert generated.tokens.shape == (10, 4, 4) and generated.images.shape[0] == 10


@pytest.mark.server
def test_server_urls_get_clear_errors(tiny_server):
    from tandem.serving.client import TandemClient
    from tandem.serving.server import free_port

    http_port = tiny_server.http_url.rsplit(":", 1)[1]
    grpc_port = tiny_server.grpc_url.rsplit(":", 1)[1]
    cases = [
        (f"127.0.0.1:{grpc_port}", TandemError, f"has no scheme; write grpc://127.0.0.1:{grpc_port} or http://"),
        (f"grpc://127.0.0.1:{http_port}", EnvironmentProblem, f"answers HTTP, not gRPC: use http://127.0.0.1:{http_port}"),
        (f"http://127.0.0.1:{grpc_port}", EnvironmentProblem, f"does not answer HTTP (a gRPC port?): use grpc://127.0.0.1:{grpc_port}"),
        ("grpc://no-such-host.invalid:8001", EnvironmentProblem, "cannot resolve host 'no-such-host.invalid'"),
        (f"http://127.0.0.1:{free_port()}", EnvironmentProblem, "nothing accepts connections"),
    ]
    for url, error, message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            with TandemClient(url) as client:
                client.check_ready("tandem")
    result = tandem("generate", "a red circle", "--server", f"grpc://127.0.0.1:{http_port}", "--json")
    assert result.returncode == EXIT_ENVIRONMENT and "answers HTTP, not gRPC" in json_result(result, "generate")["error"]


@pytest.mark.server
def test_cli_renders_every_image_of_a_batch_in_process_and_served(tiny_server, tiny_artifacts: Path, tmp_path: Path):
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime

    pipeline = Pipeline(make_runtime("onnxruntime", artifacts=tiny_artifacts))
    grids = np.stack([pipeline.generate(p).tokens for p in ("a red circle", "a blue square")])
    np.save(tmp_path / "batch.npy", grids)
    np.save(tmp_path / "flat.npy", grids[0].ravel())
    expected = pipeline.render(grids)
    for source in (["--artifacts", str(tiny_artifacts)], ["--server", tiny_server.http_url]):
        out = tmp_path / f"{source[0].strip('-')}.png"
        result = tandem("render", "--tokens", str(tmp_path / "batch.npy"), "--out", str(out), *source, "--json")
        images = json_result(result, "render")["images"]
        assert [Path(p).name for p in images] == [f"{out.stem}-0.png", f"{out.stem}-1.png"]
        for path, image in zip(images, expected):
            assert np.array_equal(np.asarray(Image.open(path)), image)
        one = tmp_path / f"{source[0].strip('-')}-flat.png"
        result = tandem("render", "--tokens", str(tmp_path / "flat.npy"), "--out", str(one), *source)
        assert result.returncode == 0, result.stderr
        assert np.array_equal(np.asarray(Image.open(one)), expected[0])


# ----------------------------------------------------------------------------- serve on a CPU host


@pytest.mark.server
def test_serve_log_has_no_cuda_errors_on_a_cpu_host(tiny_server):
    from tandem.serving.server import CPU_HOST_ARGUMENTS, has_cuda_driver

    if has_cuda_driver():
        pytest.skip("this host has an NVIDIA driver: Triton's CUDA paths are meant to run")
    assert set(CPU_HOST_ARGUMENTS) <= set(tiny_server.command(Path("/backends")))
    log = tiny_server.log_text()
    assert "successfully loaded 'tandem'" in log
    errors = [line for line in log.splitlines() if line.startswith("E") and ("CUDA" in line or "Cuda" in line)]
    assert errors == []
    assert "Unable to allocate pinned system memory" not in log  # the pinned pool is off, not failing
