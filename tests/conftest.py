"""Shared, session-scoped fixtures: expensive artifacts are built once per test run."""

from __future__ import annotations

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
