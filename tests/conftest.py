"""Shared, session-scoped fixtures: expensive artifacts are built once per test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tandem.config import ModelConfig, load_config
from tandem.export.onnx_export import ExportResult, export_model


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelConfig) -> ExportResult:
    """The tiny config exported and validated once (about 20 s); treat the directory as read-only."""
    return export_model(tiny_config, tmp_path_factory.mktemp("artifacts") / "tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_export: ExportResult) -> Path:
    return tiny_export.out


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path) -> Path:
    """A local-flavor Triton model repository of the tiny export (default serving options: in-flight
    batching of reasoning)."""
    from tandem.serving.repository import write_repository

    return write_repository(tiny_artifacts, tmp_path_factory.mktemp("serving") / "model_repository")


@pytest.fixture(scope="session")
def tiny_request_level_server(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path):
    """Like ``tiny_server`` but with request-level batching of reasoning (``--scheduler request``):
    Triton's dynamic batcher groups requests into whole generations."""
    from tandem.serving.repository import write_repository
    from tandem.serving.server import TritonServer

    repository = write_repository(tiny_artifacts, tmp_path_factory.mktemp("serving-request") / "model_repository", scheduler="request")
    with TritonServer(repository, startup_timeout=120) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tiny_repository: Path):
    """A real tritonserver over ``tiny_repository`` on free ports (``.http_url``, ``.grpc_url``);
    started once per test run, stopped at the end."""
    from tandem.serving.server import TritonServer

    with TritonServer(tiny_repository, startup_timeout=120) as server:
        yield server


@pytest.fixture(scope="session")
def small_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tandem export` of the small config (with its trained checkpoint) run as a user runs it, once
    per test run (one to three minutes); treat the directory as read-only."""
    out = tmp_path_factory.mktemp("small") / "export"
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "export", "--config", "configs/models/small.yaml", "--out", str(out)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, f"tandem export failed:\n{result.stdout}\n{result.stderr}"
    return out
