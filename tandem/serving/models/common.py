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

from tandem.errors import TandemError, failure_message  # noqa: F401  (re-exported for the served models)
from tandem.pipeline import Pipeline
from tandem.sampling import SamplingParams

PARAM_RUNTIME = "runtime"  # a tandem.runtimes name: onnxruntime today, more as compilers land
PARAM_ARTIFACTS = "artifacts"  # artifact folder, relative to the version folder
PARAM_RUNTIME_OPTIONS = "runtime_options"  # JSON keyword arguments for make_runtime
PARAM_SCHEDULER = "scheduler"  # reasoning only: one of SCHEDULERS
PARAM_DECODING = "decoding"  # in-flight reasoning: sequential | jacobi (tandem.parallel)
PARAM_BLOCK = "block"  # jacobi: tokens per row per step
PARAM_PROPOSER = "proposer"  # jacobi: proposal sources
PARAM_MAX_WAITING = "max_waiting"  # models that batch themselves: prompts (rows) that may wait before new ones are refused
PARAM_QUEUE_TIMEOUT = "queue_timeout_ms"  # models that batch themselves: a request waiting this long is refused
PARAM_QUEUE_DELAY = "max_queue_delay_us"  # refinement: how long its render thread waits for more rows to batch

# How the served reasoning model batches: "inflight" schedules per decode step (requests join and
# leave the running batch at every step, tandem.scheduler); "request" runs each group of requests
# Triton's dynamic batcher hands over as one generation to its end.
SCHEDULER_INFLIGHT, SCHEDULER_REQUEST = "inflight", "request"
SCHEDULERS = (SCHEDULER_INFLIGHT, SCHEDULER_REQUEST)


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt ``parameters`` as plain strings (Triton hands them over as JSON)."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def scheduler_kind(parameters: dict[str, str]) -> str:
    kind = parameters.get(PARAM_SCHEDULER, SCHEDULER_REQUEST)
    if kind not in SCHEDULERS:
        raise TandemError(f"parameter {PARAM_SCHEDULER!r} is {kind!r}; it must be one of {SCHEDULERS} (regenerate with `tandem repo`)")
    return kind


def waiting_limit(parameters: dict[str, str]) -> int | None:
    """The in-flight scheduler's waiting limit in prompts (None: unbounded)."""
    value = parameters.get(PARAM_MAX_WAITING, "")
    if value and not value.isdigit():
        raise TandemError(f"parameter {PARAM_MAX_WAITING!r} must be a whole number, got {value!r}; regenerate with `tandem repo`")
    return int(value) or None if value else None


def queue_timeout_s(parameters: dict[str, str]) -> float | None:
    """How long a request may wait before it starts (None: no limit), from ``queue_timeout_ms``."""
    value = parameters.get(PARAM_QUEUE_TIMEOUT, "")
    if value and not value.isdigit():
        raise TandemError(f"parameter {PARAM_QUEUE_TIMEOUT!r} must be a whole number, got {value!r}; regenerate with `tandem repo`")
    return int(value) / 1e3 or None if value else None


def queue_delay_s(parameters: dict[str, str]) -> float:
    """How long a self-batching model waits for more work to batch (``max_queue_delay_us``; 0: none)."""
    value = parameters.get(PARAM_QUEUE_DELAY, "")
    if value and not value.isdigit():
        raise TandemError(f"parameter {PARAM_QUEUE_DELAY!r} must be a whole number, got {value!r}; regenerate with `tandem repo`")
    return int(value) / 1e6 if value else 0.0


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

    def enter(self) -> None:
        """One more piece of work running (pair with :meth:`leave`)."""
        if self.folder is None:
            return
        with self._lock:
            self._count += 1
            if self._count == 1:
                (self.folder / f"{BUSY_PREFIX}{os.getpid()}").touch()

    def leave(self) -> None:
        if self.folder is None:
            return
        with self._lock:
            self._count -= 1
            if self._count == 0:
                (self.folder / f"{BUSY_PREFIX}{os.getpid()}").unlink(missing_ok=True)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()


# -- cancellation for every client: the front door's markers ------------------------------------------
# Triton tells a python model about a cancellation only for a direct gRPC call, and a deadline only
# when the client sent Triton's own ``timeout`` parameter. The front door sees every client: it
# gives each inference request a random id in the request parameter REQUEST_ID_PARAMETER (the
# ensemble forwards request parameters to its composing models, checked on Triton 2.51 over HTTP
# and gRPC), and when that client disconnects or its deadline passes before the answer it creates
# an empty file named after the id in the folder CANCEL_DIR_ENV names (set for tritonserver, so
# for every stub). The reasoning model stats that file at every scheduler step: no round trip to
# Triton. The model removes a marker once it has seen it, and when it answers the request.

from tandem.serving.interface import CANCEL_DIR_ENV, REQUEST_ID_PARAMETER  # noqa: E402  (the wire names)

_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


def request_id(parameters: str | dict | None) -> str | None:
    """The front door's request id from a request's parameters (the python backend hands them
    over as a JSON string), or None when it is absent or not exactly 32 lowercase hex characters
    (anything else is ignored: it never becomes a path)."""
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters) if parameters else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(parameters, dict):
        return None
    value = parameters.get(REQUEST_ID_PARAMETER)
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else None


class CancelMarkers:
    """The folder of cancellation markers (``$TANDEM_CANCEL_DIR``; none set: nothing is ever cancelled this way).

    The scheduler asks about every row at every decode step; one ``os.stat`` per row and step (a
    failed stat raises in Python) cost 2.4% of a batch-8 generation in-process. The folder is
    listed instead, once per step (:meth:`refresh`, the scheduler's ``before_plan``) or, for a
    check made outside a scheduler step, when the last listing is older than ``refresh_s``; each
    row's check is a set lookup."""

    def __init__(self, folder: str | Path | None = None, refresh_s: float = 0.001):
        folder = folder if folder is not None else os.environ.get(CANCEL_DIR_ENV)
        self.folder = Path(folder) if folder else None
        self.refresh_s = refresh_s
        self._listed_at = -float("inf")
        self._present: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.folder is not None

    def path(self, rid: str | None) -> Path | None:
        if self.folder is None or rid is None or not _REQUEST_ID.fullmatch(rid):
            return None
        return self.folder / rid

    def refresh(self) -> None:
        """List the folder now (the in-flight scheduler calls this once before each step's checks)."""
        import time

        if self.folder is None:
            return
        try:
            present = frozenset(os.listdir(self.folder))
        except OSError:
            present = frozenset()
        with self._lock:
            self._present, self._listed_at = present, time.monotonic()

    def _present_now(self) -> frozenset[str]:
        import time

        if time.monotonic() - self._listed_at >= self.refresh_s:
            self.refresh()
        return self._present

    def watcher(self, rid: str | None):
        """A check for the scheduler: true (and the marker removed) once the marker of ``rid`` exists;
        None when there is nothing to watch."""
        if self.path(rid) is None:
            return None
        seen = [False]

        def cancelled() -> bool:
            if seen[0]:
                return True
            if rid not in self._present_now():
                return False
            seen[0] = True
            self.forget(rid)
            return True

        return cancelled

    def forget(self, rid: str | None) -> None:
        """Remove the marker of ``rid`` if there is one (it was seen, or the request was answered)."""
        path = self.path(rid)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


# -- inputs out of shared memory once read ----------------------------------------------------------
# The python backend hands each request's inputs to the stub in a /dev/shm region (mode 0600 under
# tandem serve) and leaves the bytes there after the request, where the next reader of the region
# would find prompts and scene tokens. Checked on Triton 2.51: ``as_numpy()`` is a private copy
# (zeroing it leaves the region as it was), but ``to_dlpack()`` of a numeric CPU tensor points into
# the region itself, so zero_tensor clears it in place. DLPack refuses BYTES tensors, so a prompt is
# found by its exact serialized form (4-byte little-endian length + UTF-8) in this process's
# mappings of /dev/shm and zeroed there (scrub_serialized).

SCRUB_MIN_TEXT_BYTES = 8  # shorter rows are left: their serialized form could coincide with other data


def zero_tensor(tensor) -> int:
    """Zero a numeric CPU input tensor where it lives (the stub's shared-memory region), through
    its DLPack capsule. Returns the bytes cleared (0 when the tensor cannot be reached this way)."""
    import ctypes
    import math

    class _Device(ctypes.Structure):
        _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]

    class _DType(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

    class _DLTensor(ctypes.Structure):
        _fields_ = [
            ("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int), ("dtype", _DType),
            ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
            ("byte_offset", ctypes.c_uint64),
        ]

    try:
        capsule = tensor.to_dlpack()
    except Exception:  # BYTES, or a backend without DLPack
        return 0
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    view = _DLTensor.from_address(get(capsule, b"dltensor"))  # DLManagedTensor starts with its DLTensor
    if view.device.device_type != 1 or not view.data:  # kDLCPU only
        return 0
    if view.strides:  # tandem's inputs are contiguous; anything else is left alone
        return 0
    size = math.prod(view.shape[i] for i in range(view.ndim)) * view.dtype.bits * view.dtype.lanes // 8
    ctypes.memset(view.data + view.byte_offset, 0, size)
    return size  # the capsule, never consumed, releases its reference when it goes


def _shared_mappings() -> list[str]:
    """Files under /dev/shm this process has mapped shared and writable (the backend's regions)."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[1].startswith("rw") and parts[1].endswith("s") and parts[5].startswith("/dev/shm/"):
                    path = parts[5].strip()
                    if path not in paths:
                        paths.append(path)
    except OSError:
        pass
    return paths


def serialized_row(value: str | bytes) -> bytes | None:
    """A BYTES element as Triton serializes it, or None when it is too short (or holds NUL) to be
    scrubbed by pattern without risk of matching other data."""
    import struct

    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(raw) < SCRUB_MIN_TEXT_BYTES or b"\x00" in raw:
        return None
    return struct.pack("<I", len(raw)) + raw


class _Regions:
    """This process's shared-memory regions, mapped once and kept: reading /proc/self/maps and
    mapping a region cost about 1 ms a request in a stub with ONNX Runtime loaded, which every
    request used to pay inside ``execute`` (the next request waits for it). The list is read again
    when a row is not found in the regions known (a region the backend added since), and every region
    is mapped again when a file's size changed (shorter: touching a mapping past the end of its file
    would kill the process with SIGBUS; longer: the new tail would go unscrubbed)."""

    def __init__(self):
        self._maps: dict[str, tuple[int, "mmap.mmap"]] = {}  # path -> (open fd, mapping of the whole file)
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for fd, region in self._maps.values():
            region.close()
            os.close(fd)
        self._maps = {}

    def regions(self) -> list:
        import mmap

        with self._lock:
            for fd, region in self._maps.values():
                if os.fstat(fd).st_size != len(region):  # shrank (touching past the end: SIGBUS) or grew (a tail unseen)
                    self._close()
                    break
            if not self._maps:
                for path in _shared_mappings():
                    try:
                        fd = os.open(path, os.O_RDWR)
                    except OSError:
                        continue
                    try:
                        size = os.fstat(fd).st_size
                        if size:
                            self._maps[path] = (fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
                            continue
                    except (OSError, ValueError):
                        pass
                    os.close(fd)
            return [region for _, region in self._maps.values()]


_REGIONS = _Regions()


def _scrub_once(rows: list[bytes]) -> tuple[int, list[bytes]]:
    """(occurrences cleared, rows found nowhere) over the regions known."""
    cleared, missing = 0, []
    regions = _REGIONS.regions()
    for row in rows:
        found = 0
        for region in regions:
            try:
                at = region.find(row)
                while at != -1:
                    region[at : at + len(row)] = bytes(len(row))
                    found += 1
                    at = region.find(row, at + len(row))
            except (OSError, ValueError):  # a mapping closed meanwhile
                continue
        cleared += found
        if not found:
            missing.append(row)
    return cleared, missing


def scrub_serialized(rows: list[bytes]) -> int:
    """Zero every occurrence of each serialized row in this process's shared-memory regions; call
    it only once every request of the batch has been read. Returns the occurrences cleared."""
    rows = [row for row in dict.fromkeys(rows) if row]
    if not rows:
        return 0
    cleared, missing = _scrub_once(rows)
    if missing:  # a region added or grown since the list was read: read it again
        _REGIONS.refresh()
        more, _ = _scrub_once(missing)
        cleared += more
    return cleared
