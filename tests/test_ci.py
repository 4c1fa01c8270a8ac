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
        # Ctrl-C as a terminal delivers it: a test run started in the background by a shell without job
        # control inherits SIGINT ignored, and so would the child (Python then installs no handler).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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


def _serve_once(handler) -> int:
    """A listening socket on a free loopback port whose connections ``handler`` answers (daemon thread)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def loop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return listener.getsockname()[1]


def test_tls_and_plaintext_mismatches_name_the_other_scheme(tmp_path: Path):
    """grpc:// to a TLS port names grpcs://, grpcs:// to a plaintext port names grpc:// (no "Socket closed")."""
    import ssl

    import trustme

    from tandem.serving.client import diagnose_endpoint, parse_url

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)

    def tls_handler(conn):
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError):
            pass

    def plain_handler(conn):  # a plaintext gRPC port: HTTP/2 bytes back, never a TLS handshake
        try:
            conn.recv(1024)
            conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")
        finally:
            conn.close()

    tls_port, plain_port = _serve_once(tls_handler), _serve_once(plain_handler)
    assert f"speaks TLS: use grpcs://127.0.0.1:{tls_port}" in diagnose_endpoint(parse_url(f"grpc://127.0.0.1:{tls_port}"))
    assert f"does not speak TLS (a plaintext port?): use grpc://127.0.0.1:{plain_port}" in diagnose_endpoint(
        parse_url(f"grpcs://127.0.0.1:{plain_port}")
    )
    assert diagnose_endpoint(parse_url(f"grpcs://127.0.0.1:{tls_port}")) is None  # TLS both ways: not a scheme problem


# ----------------------------------------------------------------------------- the README's CI block, as written


def readme_ci_commands() -> list[str]:
    """The shell commands of README.md's "In CI" section (its first ```sh block), comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## In CI\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip().startswith("tandem ")]


def test_readme_ci_block_is_what_the_ci_test_runs():
    commands = readme_ci_commands()
    assert [c.split()[1] for c in commands] == ["doctor", "build", "export", "eval", "bench"]
    for command in commands:  # every one writes its one JSON object to a file, as a pipeline would
        assert "--json >" in command and command.endswith(".json"), command
    assert "--config tiny" in commands[1] and "--config tiny" in commands[4]


@pytest.mark.server
@pytest.mark.timeout(1800)
def test_readme_ci_commands_finish_in_minutes_with_exit_0_and_one_json_object(tmp_path: Path):
    """Every command of README.md's "In CI" block, run as written from an empty folder (the tiny config
    where the README says so): each finishes within 5 minutes on this 2-core machine, exits 0 (the
    README: each exits 0 when the software is right) and leaves exactly one JSON object in its file."""
    import shlex

    work = tmp_path / "ci"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for command in readme_ci_commands():
        words = shlex.split(command)
        argv, target = words[: words.index(">")], work / words[words.index(">") + 1]
        start = time.monotonic()
        with target.open("w") as stdout:
            result = subprocess.run(
                [sys.executable, "-m", "tandem", *argv[1:]], stdout=stdout, stderr=subprocess.PIPE, text=True,
                cwd=work, env=env, timeout=300,
            )
        took = time.monotonic() - start
        stdout_text = target.read_text()
        assert result.returncode == EXIT_OK, f"{command}: exit {result.returncode}\n{stdout_text[-2000:]}\n{result.stderr[-3000:]}"
        data = json.loads(stdout_text)  # exactly one object: json.loads refuses anything after it
        assert isinstance(data, dict) and data["command"] == argv[1] and data["exit_code"] == 0 and data["ok"]
        assert took < 300, f"{command} took {took:.0f} s"
        if argv[1] == "bench":
            assert not data["missed_targets"] and Path(data["out"]).is_relative_to(work / "build")
        if argv[1] == "export":  # the README says a re-run with unchanged inputs reuses the export
            again = subprocess.run([sys.executable, "-m", "tandem", *argv[1:]], capture_output=True, text=True, cwd=work, env=env, timeout=120)
            assert again.returncode == 0 and json.loads(again.stdout)["reused"], again.stderr[-2000:]


# ----------------------------------------------------------------------------- argparse errors under --json


@pytest.mark.parametrize(
    "args, command, says",
    [
        (["build", "--config", "tiny", "--target", "cpu", "--focre"], "build", "did you mean --force?"),
        (["build", "--config", "tiny", "--target", "tpu"], "build", "invalid choice: 'tpu'"),
        (["build", "--config", "tiny"], "build", "add --target cpu|h100"),
        (["generate"], "generate", "add PROMPT"),
        (["bench", "--batches", "abc"], "bench", "'abc' is not a valid positive integer"),
        (["eval", "--per-count", "x"], "eval", "invalid int value: 'x'"),
        (["nope"], "tandem", "run `tandem --help`"),
    ],
)
def test_usage_errors_print_one_json_object_naming_the_fix(args, command, says):
    from tandem.cli import main as cli_main

    result = tandem(*args, "--json")
    assert result.returncode == EXIT_USAGE
    data = json_result(result, command)
    assert says in data["error"] and data["ok"] is False
    assert "Traceback" not in result.stderr and says in result.stderr  # a person reads it on stderr too
    assert cli_main([*args]) == EXIT_USAGE  # in-process too: returned, not raised


def test_a_failure_object_always_carries_error(capsys):
    import argparse as _argparse

    from tandem.cli.common import finish

    args = _argparse.Namespace(json=True, command="build")
    assert finish(args, {"build": {"passed": False}}, EXIT_CHECK_FAILED) == EXIT_CHECK_FAILED
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and "a check failed" in data["error"]  # no error of its own: what the code means
    finish(args, {"error": "step 'compile' failed: no TensorRT"}, EXIT_CHECK_FAILED)
    assert json.loads(capsys.readouterr().out)["error"] == "step 'compile' failed: no TensorRT"
    finish(args, {"passed": True})
    assert "error" not in json.loads(capsys.readouterr().out)


def test_tensorrt_missing_says_nothing_was_written_before_any_step(tmp_path: Path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "h100"
    result = tandem("build", "--config", "tiny", "--target", "h100", "--precision", "fp16", "--out", str(out), "--json")
    assert result.returncode == EXIT_ENVIRONMENT
    error = json_result(result, "build")["error"]
    assert "<out>" not in error and "No graphs were written" in error and "--no-preflight" in error and "fp16" in error
    assert not out.exists()
    doctor = json_result(tandem("doctor", "--json"), "doctor")
    h100 = next(c for c in doctor["targets"] if c["name"] == "h100")["detail"]
    assert "<out>" not in h100 and "are ready in" not in h100


# ----------------------------------------------------------------------------- figures the README quotes


def test_readme_figures_match_what_the_code_computes():
    import re

    from tandem.config import load_config
    from tandem.preflight import memory_estimate
    from tandem.serving.interface import request_size_limit

    readme = (REPO / "README.md").read_text()
    limit = request_size_limit(load_config("small"), 8)
    assert f"{limit / 1024:.0f} KiB ({limit:,} bytes) for `small`" in readme
    seed = memory_estimate(load_config("seed"), "export") / 2**30
    quoted = set(re.findall(r"needs about ([\d.]+) GiB", readme)) | set(re.findall(r"\| `seed` \| [^|]+\| [^|]+\| ([\d.]+) GiB", readme))
    assert quoted == {f"{seed:.1f}"}, quoted
    for stale in ("--compiled DIR", "--batches 1,2,4,8", "--protocols http,grpc"):
        assert stale not in (REPO / "benchmarks" / "README.md").read_text()
