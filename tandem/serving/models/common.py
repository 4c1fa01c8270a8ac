"""Request parsing and model loading shared by the python-backend models; no Triton imports.

Every function raises :class:`~tandem.errors.TandemError` with a message meant for the client.
Messages never quote scene-token values: intermediates are controlled data and Triton may log
errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import TandemError
from tandem.pipeline import Pipeline
from tandem.sampling import SamplingParams

PARAM_RUNTIME = "runtime"  # a tandem.runtimes name: onnxruntime today, more as compilers land
PARAM_ARTIFACTS = "artifacts"  # artifact folder, relative to the version folder
PARAM_RUNTIME_OPTIONS = "runtime_options"  # JSON keyword arguments for make_runtime


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt ``parameters`` as plain strings (Triton hands them over as JSON)."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def load_pipeline(version_dir: str | Path, parameters: dict[str, str], instance_kind: str = "CPU") -> Pipeline:
    """Build the runtime named in the config's parameters over the artifacts shipped in the version folder."""
    from tandem.runtimes import make_runtime

    runtime = parameters.get(PARAM_RUNTIME, "onnxruntime")
    artifacts = Path(version_dir) / parameters.get(PARAM_ARTIFACTS, ".")
    try:
        options = json.loads(parameters.get(PARAM_RUNTIME_OPTIONS, "{}"))
    except json.JSONDecodeError as exc:
        raise TandemError(f"parameter {PARAM_RUNTIME_OPTIONS!r} is not JSON ({exc}); regenerate with `tandem repo`") from exc
    if instance_kind.upper().endswith("CPU") and runtime == "onnxruntime":
        options.setdefault("device", "cpu")  # a KIND_CPU instance must not grab a GPU
    return Pipeline(make_runtime(runtime, artifacts=artifacts, **options))


def _rows(array: np.ndarray | None, name: str) -> np.ndarray | None:
    """[batch, 1] -> [batch]; Triton has already checked dtype and dims against the config."""
    if array is None:
        return None
    if array.ndim != 2 or array.shape[1] != 1:
        raise TandemError(f"input {name!r} must have shape [batch, 1], got {list(array.shape)}")
    return array[:, 0]


def parse_prompts(array: np.ndarray | None) -> list[str]:
    if array is None:
        raise TandemError("input 'prompt' is missing: send one UTF-8 prompt per row (BYTES, shape [batch, 1])")
    prompts = []
    for row, value in enumerate(_rows(array, "prompt")):
        raw = value if isinstance(value, bytes) else str(value).encode()
        try:
            prompts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise TandemError(f"prompt in row {row} is not valid UTF-8 text; send the prompt as UTF-8") from None
    return prompts


def parse_sampling(
    rows: int, seed: np.ndarray | None, temperature: np.ndarray | None, top_k: np.ndarray | None
) -> list[SamplingParams]:
    """Per-row SamplingParams; an input left out takes SamplingParams' default (greedy, seed 0)."""
    columns = {"seed": _rows(seed, "seed"), "temperature": _rows(temperature, "temperature"), "top_k": _rows(top_k, "top_k")}
    for name, column in columns.items():
        if column is not None and column.shape[0] != rows:
            raise TandemError(f"input {name!r} has {column.shape[0]} rows but 'prompt' has {rows}; send one per prompt")
    defaults = SamplingParams()
    params = []
    for row in range(rows):
        seed_v = int(columns["seed"][row]) if columns["seed"] is not None else defaults.seed
        temp_v = float(columns["temperature"][row]) if columns["temperature"] is not None else defaults.temperature
        top_v = int(columns["top_k"][row]) if columns["top_k"] is not None else defaults.top_k
        params.append(SamplingParams(seed=seed_v, temperature=temp_v, top_k=top_v))
    return params


def check_prompts(prompts: list[str], max_prompt_len: int) -> None:
    from tandem.tokenizer import encode

    for prompt in prompts:
        encode(prompt, max_prompt_len)  # raises on empty or oversize prompts


def parse_scene_tokens(array: np.ndarray, grid: tuple[int, int], codebook_size: int) -> np.ndarray:
    """[batch, h*w] integer tokens -> [batch, h, w] int64, refusing anything outside the codebook."""
    h, w = grid
    if array.ndim != 2 or array.shape[1] != h * w:
        raise TandemError(f"scene_tokens must have shape [batch, {h * w}] ({h}x{w} grid, row-major), got {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TandemError(f"scene_tokens must be integers, got {array.dtype}")
    bad = (array < 0) | (array >= codebook_size)
    if bad.any():
        raise TandemError(
            f"{int(bad.sum())} scene tokens are outside the codebook [0, {codebook_size}); edit them into range"
        )
    return array.reshape(-1, h, w).astype(np.int64)


# -- errors that reach clients and the server log ---------------------------------------------------

_NUMBERS = re.compile(r"\d+")


def failure_message(what: str, exc: BaseException) -> str:
    """The message of a failure while running a batch, safe to send and log. A TandemError was
    written for the client and never quotes token values; anything else (ONNX Runtime's own errors
    print offending indices, e.g. "idx=777", i.e. scene-token values) keeps its type and text with
    every number masked."""
    if isinstance(exc, TandemError):
        return str(exc)
    return f"{what} failed: {type(exc).__name__}: {_NUMBERS.sub('#', str(exc))[:500]}"


# -- drain: finishing in-flight work when the server stops ------------------------------------------

DRAIN_DIR_ENV = "TANDEM_DRAIN_DIR"  # set by tandem.serving.server for the stubs it starts
DRAINING_FILE = "draining"  # created in that folder when the server begins to stop
BUSY_PREFIX = "busy-"  # busy-<pid>: this stub is running work right now


class DrainingError(TandemError):
    """The server is stopping: this request was not started (retry elsewhere or after the restart)."""


class Activity:
    """What `tandem serve` needs to stop without dropping work (see TritonServer.drain): new
    generations are refused once the drain starts, and the stub shows while it is busy (a
    ``busy-<pid>`` file exists while any work is running in this process). A decoupled model
    holds :meth:`busy` for the life of each generation, not only of ``execute``."""

    def __init__(self, folder: str | None = None):
        folder = folder if folder is not None else os.environ.get(DRAIN_DIR_ENV)
        self.folder = Path(folder) if folder else None
        self._count = 0
        self._lock = threading.Lock()

    def admit(self) -> None:
        """Raise DrainingError once the server is stopping."""
        if self.folder is not None and (self.folder / DRAINING_FILE).exists():
            raise DrainingError("the server is stopping and starts no new generations; retry on another replica or after the restart")

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        if self.folder is None:
            yield
            return
        marker = self.folder / f"{BUSY_PREFIX}{os.getpid()}"
        with self._lock:
            self._count += 1
            if self._count == 1:
                marker.touch()
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if self._count == 0:
                    marker.unlink(missing_ok=True)
