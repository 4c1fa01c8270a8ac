"""Run the real ``tritonserver`` shipped in the nvidia-pytriton wheel over a tandem model repository.

The wheel carries Triton 2.51 with its python backend, but not laid out as a server install: the
backend library, its utils module and the per-Python-version stub must sit together in
``<backend-dir>/python/``, and the bundled shared libraries must be on ``LD_LIBRARY_PATH``. This
module assembles that in a temporary folder, starts the server bound to 127.0.0.1 (unless told
otherwise), waits until the server and the ensemble report ready, and stops it cleanly.

The python backend stub starts an embedded interpreter that ignores ``PYTHONPATH``; the generated
model.py files read ``TANDEM_PYTHONPATH`` instead, which is set here to this interpreter's import
path so the models import tandem, numpy and onnxruntime from the same environment.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from tandem.errors import EnvironmentProblem, TandemError
from tandem.serving.interface import CANCEL_DIR_ENV, ENSEMBLE, REASONING
from tandem.serving.models.common import BUSY_PREFIX, DRAIN_DIR_ENV, DRAINING_FILE
from tandem.serving.security import APIRestriction, TLSOptions, admin_restriction

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 60


class ServerError(EnvironmentProblem):
    """tritonserver could not start, or stopped while we waited for it."""


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError("nvidia-pytriton is not installed; `pip install nvidia-pytriton==0.7.0` ships tritonserver") from exc
    return Path(pytriton.__file__).resolve().parent


def tritonserver_binary() -> Path:
    binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.exists():
        raise ServerError(f"{binary} is missing; reinstall nvidia-pytriton==0.7.0")
    return binary


def prepare_backend_directory(target: Path) -> Path:
    """``<target>/python/`` with the python backend, its utils and the stub for this Python version."""
    root = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        available = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise ServerError(f"nvidia-pytriton ships no python backend stub for Python {version} (it has {available})")
    backend = target / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in (root / "backends" / "python" / "libtriton_python.so", root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = backend / source.name
        if not link.exists():
            link.symlink_to(source)
    return target


def stub_python_path() -> list[str]:
    """This interpreter's import path minus its standard library (the stub embeds its own): the
    tandem checkout first, then site-packages and anything else on sys.path."""
    import tandem

    stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
    paths = [str(Path(tandem.__file__).resolve().parent.parent)]
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        real = os.path.realpath(entry)
        if real.startswith(stdlib) and not real.endswith("-packages"):
            continue  # the standard library and lib-dynload of this interpreter
        if entry not in paths:
            paths.append(entry)
    return paths


def libpython_directory() -> str | None:
    """The folder of this interpreter's shared libpython, if it has one. The stub links
    libpython3.X.so; this interpreter's own copy makes the stub embed the same Python build (a
    pyenv Python differs from the system's), and the system's copy is the fallback."""
    import ctypes.util

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and any(Path(libdir).glob(f"libpython{version}*.so*")):
        return libdir
    if ctypes.util.find_library(f"python{version}") is None:
        raise ServerError(
            f"Triton's python backend stub needs the shared library libpython{version}.so, and this Python has "
            f"none: use a Python built with --enable-shared, or install the system's (apt-get install libpython{version})"
        )
    return None


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    libs = [str(pytriton_root().parent / "nvidia_pytriton.libs")]
    libdir = libpython_directory()
    if libdir:
        libs.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env["TANDEM_PYTHONPATH"] = os.pathsep.join(stub_python_path())
    return env


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def check_port_free(address: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As tritonserver binds: SO_REUSEADDR, so the TIME-WAIT sockets a server that just stopped
        # leaves behind (for a minute) do not count as "in use"; a listening socket still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise ServerError(
                f"{what} port {port} on {address} is already in use ({exc.strerror}); stop whatever holds it "
                f"(another tritonserver?) or choose another port, e.g. --{what}-port {free_port(address)}"
            ) from None


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child after fork must not dlopen
except (OSError, AttributeError):
    _PRCTL = None


def _server_preexec() -> None:
    """Runs in the child before exec. umask 077: the python backend's /dev/shm regions (which hold
    every request's prompts and scene tokens) and any file the server writes are private to this
    user. PR_SET_PDEATHSIG: if the process that started the server dies (even by SIGKILL, e.g. a
    test run killed by its timeout), the kernel sends the server SIGTERM."""
    os.umask(0o077)
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


UPSTREAM_ADDRESS = "127.0.0.1"  # where tritonserver listens with front_door=False and no address given
# Behind the front door tritonserver listens on Unix sockets in the server's private (0700) work
# folder, not on TCP: no other local user can connect to it, so it needs (and gets) no API keys on
# its command line. tritonserver 2.51 accepts ``unix:<path>`` addresses for all three endpoints; it
# appends ``:<port>`` to the gRPC one, so that socket's file is named ``grpc.sock:<port>``.
UPSTREAM_SOCKETS = {"http": "http.sock", "grpc": "grpc.sock", "metrics": "metrics.sock"}
UPSTREAM_SOCKET_PORTS = {"http": 1, "grpc": 2, "metrics": 3}  # placeholders tritonserver requires
WORKDIR_PREFIX = "tandem-triton-"
STUB_NAME = "triton_python_backend_stub"
SUPERVISE_INTERVAL_S = 0.5
FRONT_DOOR_STOP_S = 5.0
FALLBACK_MAX_REQUEST_BYTES = 1 << 20  # a repository that records no limit of its own
MIN_REQUEST_BYTES = 4096  # below this not even a health probe with headers fits

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "tandem-shm-"
SHM_GUARD_INTERVAL_S = 0.1
DEFAULT_GRACE_S = 60.0  # what `tandem serve` waits on SIGTERM for generations in flight to finish
DRAIN_SETTLE_S = 0.3
_shm_counter = itertools.count()


def shm_prefix() -> str:
    """The python backend's shared-memory region prefix for one server: unique per server, and
    naming the user and the process that started it, so a later start can tell stale regions (their
    process is gone: crash, SIGKILL) from live ones."""
    return f"{SHM_PREFIX}{os.getuid()}-{os.getpid()}-{next(_shm_counter)}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_shm_regions(prefix: str | None = None) -> list[str]:
    """Unlink this user's tandem shared-memory regions: those of ``prefix`` (a server that stopped),
    or with no prefix every region whose starting process is gone (left by a crash). Regions hold
    prompts and scene tokens of past requests; nothing else under /dev/shm is touched."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    uid = os.getuid()
    for path in SHM_DIR.glob(f"{SHM_PREFIX}{uid}-*"):
        if prefix is not None:
            if not path.name.startswith(prefix):
                continue
        else:
            parts = path.name[len(SHM_PREFIX):].split("-")
            if len(parts) < 2 or not parts[1].isdigit() or _pid_alive(int(parts[1])):
                continue
        with contextlib.suppress(OSError):
            if path.lstat().st_uid == uid:
                path.unlink()
                removed.append(path.name)
    return removed


def workdir_prefix() -> str:
    """Work folders are named for the user and process that made them, so a later start can remove
    those whose process is gone (tandem serve killed with SIGKILL)."""
    return f"{WORKDIR_PREFIX}{os.getuid()}-{os.getpid()}-"


def remove_stale_workdirs() -> list[str]:
    import shutil

    removed = []
    root = Path(tempfile.gettempdir())
    uid = os.getuid()
    for path in root.glob(f"{WORKDIR_PREFIX}{uid}-*"):
        parts = path.name[len(WORKDIR_PREFIX):].split("-")
        if len(parts) < 3 or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink() and path.lstat().st_uid == uid:
                shutil.rmtree(path)
                removed.append(path.name)
    return removed


def http_get(path: str, timeout: float = 5.0, socket_path: str | Path | None = None, host: str = "localhost",
             port: int | None = None) -> tuple[int, bytes]:
    """GET ``path`` from an HTTP server on a Unix socket (tritonserver behind the front door) or,
    without ``socket_path``, on ``host:port``."""
    import http.client

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(socket_path))

    connection = (Connection("localhost", timeout=timeout) if socket_path is not None
                  else http.client.HTTPConnection(host, port, timeout=timeout))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class DeathOrder:
    """The order in which watched processes die, as the kernel reports it (a pidfd is readable
    the moment its process ends): the supervisor names the first death as the cause, not the
    one its next check happens to see (a killed stub makes tritonserver abort within
    milliseconds, well inside one supervise interval). Where pidfds are missing (not Linux,
    kernel < 5.3) ``available`` is False and the supervisor falls back to polling."""

    def __init__(self) -> None:
        self.available = hasattr(os, "pidfd_open") and hasattr(select, "poll")
        self._fds: dict[int, tuple[int, str]] = {}  # pidfd -> (pid, role)
        self._deaths: list[tuple[int, int, str]] = []  # (wake number, pid, role), in order
        self._lock = threading.Lock()
        self._poller = select.poll() if self.available else None
        self._wake_r, self._wake_w = os.pipe() if self.available else (-1, -1)
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, pid: int, role: str) -> None:
        if not self.available:
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone (and reaped): it died before anything watched it
            with self._lock:
                self._deaths.append((-1, pid, role))
            return
        with self._lock:
            self._fds[fd] = (pid, role)
            self._poller.register(fd, select.POLLIN)
        if self._thread is None:
            self._poller.register(self._wake_r, select.POLLIN)
            self._thread = threading.Thread(target=self._run, name="tandem-death-order", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for wake in itertools.count():
            events = self._poller.poll()
            with self._lock:
                if self._closed:
                    return
                for fd, _ in events:
                    if fd in self._fds:
                        pid, role = self._fds.pop(fd)
                        self._poller.unregister(fd)
                        os.close(fd)
                        self._deaths.append((wake, pid, role))

    def deaths(self) -> list[tuple[int, int, str]]:
        """(wake, pid, role) of each watched process that died, first first; deaths the watcher
        saw in the same wake are in no particular order among themselves."""
        with self._lock:
            return list(self._deaths)

    def close(self) -> None:
        if not self.available:
            return
        with self._lock:
            self._closed = True
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def kill_stubs(prefix: str) -> list[int]:
    """SIGKILL every python-backend stub of one server (its command line names the server's
    shared-memory prefix), wherever it ended up: a stub orphaned by a killed tritonserver keeps its
    log pipe open, and used to hang the stop."""
    import psutil

    killed = []
    for process in psutil.process_iter(["name", "cmdline", "uids"]):
        with contextlib.suppress(psutil.Error):
            cmdline = process.info["cmdline"] or []
            if cmdline and STUB_NAME in os.path.basename(cmdline[0]) and any(a.startswith(prefix) for a in cmdline[1:]):
                if process.info["uids"] is None or process.info["uids"].real == os.getuid():
                    process.kill()
                    killed.append(process.pid)
    return killed


def protect_shm_regions(prefix: str) -> int:
    """chmod 0600 the regions of ``prefix``. The python backend creates them through
    boost.interprocess, which sets mode 0644 explicitly (umask does not apply), so any local user
    could read the prompts and scene tokens passing through them. Returns how many were changed."""
    changed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            if path.lstat().st_mode & 0o077:
                os.chmod(path, 0o600)
                changed += 1
    return changed


def has_cuda_driver() -> bool:
    """An NVIDIA driver is installed (libcuda) and a device node exists: Triton's CUDA paths can work."""
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None and any(Path("/dev").glob("nvidia[0-9]*"))


# On a host without an NVIDIA driver: no pinned host memory pool (it needs cudaHostAlloc), no CUDA
# memory pool, and no GPU counts as supported, so backends place every instance on the CPU.
CPU_HOST_ARGUMENTS = (
    "--pinned-memory-pool-byte-size=0",
    "--cuda-memory-pool-byte-size=0:0",
    "--min-supported-compute-capability=100",
)
# Two CUDA calls that tritonserver 2.51's GPU build makes unconditionally (no option turns them off:
# CudaBlockManager::Create in InferenceServer::Init, cudaStreamCreate in the EnsembleScheduler
# constructor). Without a driver they log E-level lines that mean nothing for a CPU repository;
# tandem relabels exactly these two as I-level notes instead of letting them read as failures.
def relabel_cpu_host_line(line: str) -> str:
    driverless = "CudaDriverHelper has not been initialized" in line or (
        "unable to create stream for " in line and "CUDA driver version is insufficient" in line
    )
    if line.startswith("E") and driverless:
        return "I" + line[1:] + " [tandem: expected without an NVIDIA driver; this repository runs on the CPU]"
    return line


BUNDLED_BACKENDS = {"python"}  # what the nvidia-pytriton wheel's tritonserver can load (and ensembles)


def check_bundled_support(repository: Path) -> None:
    """Refuse, with the fix, a repository the bundled server cannot load (e.g. the native flavor)."""
    from tandem.serving.repository import CONFIG_NAME, parse_config

    for config_path in sorted(repository.glob(f"*/{CONFIG_NAME}")):
        config = parse_config(config_path)
        if config.platform == "ensemble":
            continue
        kind = config.backend or config.platform or "?"
        if config.backend not in BUNDLED_BACKENDS:
            raise ServerError(
                f"model {config_path.parent.name!r} needs Triton's {kind!r} backend, which the tritonserver in "
                "nvidia-pytriton does not include; serve this repository from NVIDIA's Triton container, or write "
                "one for the bundled server with `tandem repo --flavor local`"
            )


@dataclass(frozen=True)
class StopReport:
    drained: bool  # everything in flight finished within the grace period
    exit_code: int | None  # tritonserver's; negative: killed by that signal
    grace_s: float
    queued: int = 0  # still queued / running when the grace period ran out
    busy: int = 0

    @property
    def ok(self) -> bool:
        # After a drain every generation that started has been answered, and tritonserver then
        # stops at once (the front door closed its connections first): exit code 0. Anything else
        # (its exit timeout ran out, killed) is not a clean stop.
        return self.drained and self.exit_code == 0

    def describe(self) -> str:
        if self.ok:
            return "tritonserver stopped cleanly; every generation in flight was answered"
        why = []
        if not self.drained:
            why.append(
                f"work was still in flight after the {self.grace_s:.0f} s grace period ({self.queued} queued requests, "
                f"{self.busy} busy model processes) and was dropped; raise --grace to wait longer"
            )
        if self.exit_code is not None and self.exit_code < 0:
            why.append(f"tritonserver had to be killed (signal {-self.exit_code})")
        elif self.exit_code:
            why.append(f"tritonserver exited with code {self.exit_code} (not a graceful stop: see its log)")
        elif self.exit_code is None:
            why.append("tritonserver was not running any more")
        return "; ".join(why)


class TritonServer:
    """A tritonserver process over ``repository``; a context manager that starts and stops it.

    Ports left as None are picked free. ``ready_models`` (default: the ``tandem`` ensemble) must
    report ready before :meth:`start` returns; on failure the error carries the server's log tail.
    With ``poll_seconds`` the server rescans the repository and serves new versions as they appear
    (each appears complete or not at all, see :mod:`tandem.serving.repository`).

    Locked down by default (see :mod:`tandem.serving.security`): the admin APIs (shared memory,
    logging, trace, model control) need a key nobody is told unless ``restrictions`` says
    otherwise; ``tls`` puts gRPC behind TLS or mutual TLS; ``http_address`` (default ``address``)
    binds the plaintext HTTP and metrics endpoints separately, e.g. to 127.0.0.1 while gRPC
    listens on 0.0.0.0 with TLS.

    Clients reach the HTTP, gRPC and metrics ports through the front door
    (:mod:`tandem.serving.frontdoor`, on by default), which refuses requests over
    ``max_request_bytes`` (default: the largest the repository's models take, recorded by the
    repository writer) before reading them, enforces the API keys, terminates TLS and turns a
    client that leaves into a cancellation; tritonserver itself then listens only on Unix sockets
    in a private work folder, so no other local user can reach it, and no key is on any command
    line. ``front_door=False`` exposes tritonserver directly (TLS and keys by its own options, the
    keys then on its command line; no size limit).

    Supervised: :meth:`serve_forever` ends, within bounded time, when any child dies (tritonserver,
    a python-backend stub, the front door), having stopped the others; :meth:`stop` is bounded
    whatever died first.
    """

    def __init__(
        self,
        repository: str | Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        address: str = "127.0.0.1",
        startup_timeout: float = 180.0,
        ready_models: tuple[str, ...] = (ENSEMBLE,),
        echo_log: bool = False,
        log_verbose: int = 0,
        exit_timeout: int = 10,
        poll_seconds: int | None = None,
        extra_args: tuple[str, ...] = (),
        tls: TLSOptions | None = None,
        restrictions: tuple[APIRestriction, ...] | None = None,
        http_address: str | None = None,
        front_door: bool = True,
        max_request_bytes: int | None = None,
        max_connections: int = 1024,
        header_timeout_s: float = 10.0,
    ):
        self.repository = Path(repository).resolve()
        self.address = address
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.startup_timeout = startup_timeout
        self.ready_models = tuple(ready_models)
        self.echo_log = echo_log
        self.log_verbose = log_verbose
        self.exit_timeout = exit_timeout
        self.poll_seconds = poll_seconds
        self.extra_args = tuple(extra_args)
        self.tls = tls
        # Default: the admin APIs behind a random key nobody is told (closed); pass () to open them.
        self.restrictions = (admin_restriction(),) if restrictions is None else tuple(restrictions)
        self.http_address = address if http_address is None else http_address
        self.front_door = front_door
        if max_request_bytes is None and front_door:
            from tandem.serving.repository import max_request_bytes as recorded_limit

            max_request_bytes = recorded_limit(self.repository)
            if max_request_bytes is None:
                max_request_bytes = FALLBACK_MAX_REQUEST_BYTES
                log.warning(
                    "%s records no request size limit (written by an older tandem); the front door allows %d bytes: "
                    "rewrite it with `tandem repo` to size the limit from the model", self.repository, max_request_bytes,
                )
        if max_request_bytes is not None and max_request_bytes < MIN_REQUEST_BYTES:
            raise TandemError(
                f"--max-request-bytes must be at least {MIN_REQUEST_BYTES} (a request's headers alone need that much), "
                f"got {max_request_bytes}"
            )
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections  # per protocol, at the front door
        self.header_timeout_s = header_timeout_s  # a connection sends complete request headers within this, or is closed
        self._front: subprocess.Popen | None = None
        self._front_ready = threading.Event()
        self.shm_prefix = shm_prefix()
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None  # private (0700): tritonserver's sockets, drain and cancel folders
        self._front_reader: threading.Thread | None = None
        self._stubs: dict[int, str] = {}
        self._death_order: DeathOrder | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=2000)
        self._reader: threading.Thread | None = None
        self.cpu_host = not has_cuda_driver()

    # -- addresses --------------------------------------------------------------------------------
    @staticmethod
    def _connect_host(address: str) -> str:
        return "127.0.0.1" if address in ("0.0.0.0", "") else address

    @property
    def _host(self) -> str:
        return self._connect_host(self.address)

    @property
    def _http_host(self) -> str:
        return self._connect_host(self.http_address)

    @property
    def http_url(self) -> str:
        return f"http://{self._http_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://{self._host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._http_host}:{self.metrics_port}/metrics"

    def restriction_headers(self, api: str, protocol: str = "http") -> dict[str, str]:
        """The header(s) a client must send to call ``api`` on this server (empty when it is open)."""
        return next((r.headers(protocol) for r in self.restrictions if api in r.apis), {})

    # -- lifecycle --------------------------------------------------------------------------------
    def _socket(self, what: str) -> Path:
        assert self._workdir is not None
        name = UPSTREAM_SOCKETS[what]
        if what == "grpc":
            name += f":{UPSTREAM_SOCKET_PORTS[what]}"
        return self._workdir / name

    def command(self, backend_dir: Path) -> list[str]:
        if self.front_door:  # tritonserver on Unix sockets in the private work folder; the front door has the ports, TLS and keys
            assert self._workdir is not None
            endpoints = {
                what: (f"unix:{self._workdir / UPSTREAM_SOCKETS[what]}", UPSTREAM_SOCKET_PORTS[what]) for what in UPSTREAM_SOCKETS
            }
            tls, restrictions = [], []
        else:  # tritonserver on the public ports: its own TLS and restricted-API keys (on its command line)
            endpoints = {
                "http": (self.http_address, self.http_port), "grpc": (self.address, self.grpc_port),
                "metrics": (self.http_address, self.metrics_port),
            }
            tls = self.tls.server_args() if self.tls else []
            restrictions = [arg for restriction in self.restrictions for arg in restriction.server_args()]
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            *(f"--{what}-{key}={value}" for what, (address, port) in endpoints.items()
              for key, value in (("address", address), ("port", port))),
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *(  # pick up new version folders written by `tandem repo` while serving
                ["--model-control-mode=poll", f"--repository-poll-secs={self.poll_seconds}"] if self.poll_seconds else []
            ),
            *tls,
            *restrictions,
            *(CPU_HOST_ARGUMENTS if self.cpu_host else ()),
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerError("this server is already started")
        if not (self.repository / ENSEMBLE / "config.pbtxt").exists() and ENSEMBLE in self.ready_models:
            raise ServerError(
                f"{self.repository} is not a tandem model repository (no {ENSEMBLE}/config.pbtxt); "
                "write one with `tandem repo --artifacts DIR --out REPO`"
            )
        check_bundled_support(self.repository)
        from tandem.serving.repository import verify_repository

        verify_repository(self.repository)  # every config.pbtxt and served file as `tandem repo` wrote it
        stale = remove_shm_regions()
        if stale:
            log.info("removed %d shared-memory regions left by tandem servers that are gone", len(stale))
        stale = remove_stale_workdirs()
        if stale:
            log.info("removed %d work folders left by tandem servers that are gone", len(stale))
        chosen = {what: getattr(self, f"{what}_port") for what in ("http", "grpc", "metrics")}
        for what, port in chosen.items():
            if port is not None:
                check_port_free(self.address if what == "grpc" else self.http_address, port, what)
        if len({p for p in chosen.values() if p is not None}) != sum(p is not None for p in chosen.values()):
            raise ServerError(f"http, grpc and metrics ports must differ, got {list(chosen.values())}")
        # A port picked free can be taken by someone else before the server binds it: pick again.
        attempts = 3 if None in chosen.values() else 1
        for attempt in range(1, attempts + 1):
            taken = {p for p in chosen.values() if p is not None}
            for what, port in chosen.items():
                if port is None:
                    new = free_port(self.address)
                    while new in taken:
                        new = free_port(self.address)
                    taken.add(new)
                    port = new
                setattr(self, f"{what}_port", port)
            try:
                self._launch()
                self.wait_ready()
                return self
            except ServerError as exc:
                self.stop()
                if attempt == attempts or "already in use" not in str(exc):
                    raise
                log.info("a port was taken while tritonserver started; retrying on other ports")
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def front_door_config(self):
        """What the front door serves, forwards to and enforces (keys included): sent on its
        standard input, never on a command line."""
        from tandem.serving.frontdoor import FrontDoorConfig

        tls = self.tls
        return FrontDoorConfig(
            http_listen=(self.http_address, int(self.http_port)),
            grpc_listen=(self.address, int(self.grpc_port)),
            metrics_listen=(self.http_address, int(self.metrics_port)),
            http_upstream=str(self._socket("http")),
            grpc_upstream=f"unix:{self._socket('grpc')}",
            metrics_upstream=str(self._socket("metrics")),
            max_request_bytes=int(self.max_request_bytes),
            tls_cert=str(tls.cert) if tls else None,
            tls_key=str(tls.key) if tls else None,
            tls_client_ca=str(tls.client_ca) if tls and tls.client_ca else None,
            restrictions=[{"apis": list(r.apis), "header": r.header, "value": r.value} for r in self.restrictions],
            cancel_dir=str(self.cancel_dir),
            drain_file=str(self.drain_dir / DRAINING_FILE),
            max_connections=self.max_connections,
            header_timeout_s=self.header_timeout_s,
        )

    def _launch(self) -> None:
        self._log.clear()
        self._stubs = {}
        self._workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix()))  # mode 0700
        backend_dir = prepare_backend_directory(self._workdir / "backends")
        self.drain_dir = self._workdir / "drain"
        self.drain_dir.mkdir()
        self.cancel_dir = self._workdir / "cancel"
        self.cancel_dir.mkdir()
        command = self.command(backend_dir)
        log.debug("starting %s", " ".join(command))
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**server_environment(), DRAIN_DIR_ENV: str(self.drain_dir), CANCEL_DIR_ENV: str(self.cancel_dir)},
            cwd=self._workdir,
            start_new_session=True,  # our signal handling decides when it stops, not the terminal's Ctrl-C
            preexec_fn=_server_preexec,
        )
        self._reader = threading.Thread(target=self._read_log, args=(self.process,), name="tritonserver-log", daemon=True)
        self._reader.start()
        threading.Thread(target=self._guard_shm, args=(self.process,), name="tritonserver-shm", daemon=True).start()
        if self.front_door:
            self._front_ready.clear()
            self._front = subprocess.Popen(
                [sys.executable, "-m", "tandem.serving.frontdoor"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=_server_preexec,
            )
            assert self._front.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self._front.stdin.write(self.front_door_config().to_json().encode())
            with contextlib.suppress(BrokenPipeError):
                self._front.stdin.close()
            self._front_reader = threading.Thread(
                target=self._read_front_log, args=(self._front,), name="front-door-log", daemon=True
            )
            self._front_reader.start()

    def _read_front_log(self, process: subprocess.Popen) -> None:
        from tandem.serving.frontdoor import READY_LINE

        assert process.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for raw in process.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                if line == READY_LINE:
                    self._front_ready.set()
                self._log.append(line)
                if self.echo_log:
                    print(line, file=sys.stderr, flush=True)

    def _guard_shm(self, process: subprocess.Popen) -> None:
        """Keep the python backend's regions private for the server's life: stubs create them at
        load (before any request data reaches them) and again when a model is reloaded."""
        while process.poll() is None:
            protect_shm_regions(self.shm_prefix)
            time.sleep(SHM_GUARD_INTERVAL_S)

    def _read_log(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for raw in process.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                if self.cpu_host:
                    line = relabel_cpu_host_line(line)
                self._log.append(line)
                if self.echo_log:
                    print(line, file=sys.stderr, flush=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(list(self._log)[-lines:])

    def log_text(self) -> str:
        """Everything the server printed (its last 2000 lines)."""
        return "\n".join(self._log)

    def _failure(self, message: str) -> ServerError:
        if self._reader is not None and self.process is not None and self.process.poll() is not None:
            self._reader.join(timeout=2)  # collect the last lines of a process that has exited
        tail = self.log_tail()
        hint = ""
        if "already in use" in tail.lower():
            hint = "\na port is already in use; stop whatever holds it or choose other ports"
        return ServerError(f"{message}{hint}\n--- tritonserver log (last lines) ---\n{tail}")

    def _upstream_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET from tritonserver itself (its Unix socket behind the front door, else its HTTP port)."""
        if self.front_door:
            return http_get(path, timeout, socket_path=self._socket("http"))
        return http_get(path, timeout, host=self._http_host, port=self.http_port)

    def _ready(self) -> bool:
        try:
            if self._upstream_get("/v2/health/ready", 2.0)[0] != 200:
                return False
            return all(self._upstream_get(f"/v2/models/{m}/ready", 2.0)[0] == 200 for m in self.ready_models)
        except OSError:  # not listening yet
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.process.poll() if self.process else None
            if code is not None:
                raise self._failure(f"tritonserver exited with code {code} before it was ready")
            front = self._front.poll() if self._front else None
            if front is not None:
                time.sleep(0.2)  # let the reader collect the front door's last words
                raise self._failure(f"the front door exited with code {front} before it was ready")
            if (not self.front_door or self._front_ready.is_set()) and self._ready():
                protect_shm_regions(self.shm_prefix)  # every region of the loaded models, before any request
                self._stubs = self._stub_processes()
                self._watch_children()
                return
            if time.monotonic() > deadline:
                raise self._failure(
                    f"tritonserver did not report {'server and ' if self.ready_models else 'server '}"
                    f"{', '.join(self.ready_models)} ready within {self.startup_timeout:.0f} s"
                )
            time.sleep(0.25)

    def _stub_processes(self) -> dict[int, str]:
        """pid -> model instance of each python-backend stub tritonserver runs now."""
        import psutil

        stubs = {}
        if self.process is None:
            return stubs
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmdline = child.cmdline()
                    if cmdline and STUB_NAME in os.path.basename(cmdline[0]):
                        region = next((a for a in cmdline[1:] if a.startswith(self.shm_prefix)), "?")
                        stubs[child.pid] = region[len(self.shm_prefix):]
        return stubs

    def _watch_children(self) -> None:
        """Watch tritonserver, the front door and (unless versions are polled: a version change
        replaces stubs) each python-backend stub for the order in which they die."""
        if self._death_order is not None:
            self._death_order.close()
        self._death_order = DeathOrder()
        if self.process is not None:
            self._death_order.watch(self.process.pid, "tritonserver")
        if self._front is not None:
            self._death_order.watch(self._front.pid, "front door")
        if not self.poll_seconds:
            for pid in self._stubs:
                self._death_order.watch(pid, "stub")

    def _first_death(self) -> str | None:
        """The reason naming the first child that died, from the kernel's order of deaths; None
        while none has. Deaths seen in one wake of the watcher are ordered by what can cause
        what: a stub's or the front door's death makes tritonserver abort, never the reverse
        within one wake (an orphaned stub notices its parent's death only at its next check)."""
        order = self._death_order
        if order is None or not order.available:
            return None
        deaths = order.deaths()
        if not deaths:
            return None
        first_wake = deaths[0][0]
        together = [d for d in deaths if d[0] == first_wake]
        together.sort(key=lambda d: d[2] == "tritonserver")
        _, pid, role = together[0]
        code = self.process.poll() if self.process is not None else None
        then = f" (tritonserver then exited, code {code})" if role != "tritonserver" and code is not None else ""
        if role == "tritonserver":
            return f"tritonserver exited unexpectedly (code {code})"
        if role == "front door":
            front = self._front.poll() if self._front is not None else None
            return f"the front door exited unexpectedly (code {front}){then}"
        name = self._stubs.get(pid)
        return f"the python backend process of {name or 'a model'} (pid {pid}) died; its requests cannot be answered{then}"

    def failure(self) -> str | None:
        """Why the server cannot serve any more (a child died), or None while all is well: the
        supervisor's check, made every SUPERVISE_INTERVAL_S by serve_forever. Where the kernel
        reports the order of deaths the first one is named (see _first_death)."""
        if self.process is None:
            return "tritonserver is not running"
        first = self._first_death()
        if first is not None:
            return first
        code = self.process.poll()
        if code is not None:
            return f"tritonserver exited unexpectedly (code {code})"
        if self._front is not None and self._front.poll() is not None:
            return f"the front door exited unexpectedly (code {self._front.poll()})"
        import psutil

        for pid, name in self._stubs.items():
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                if self.poll_seconds:  # a version change replaces stubs: only tritonserver and the front door count
                    self._stubs = self._stub_processes()
                    return None
                return f"the python backend process of {name or 'a model'} (pid {pid}) died; its requests cannot be answered"
        return None

    def is_running(self) -> bool:
        front_ok = self._front is None or self._front.poll() is None
        return self.process is not None and self.process.poll() is None and front_ok

    def _stop_front_door(self) -> None:
        front, self._front = self._front, None
        if front is None:
            return
        if front.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                front.send_signal(signal.SIGTERM)
            try:
                front.wait(timeout=FRONT_DOOR_STOP_S)
            except subprocess.TimeoutExpired:
                log.warning("the front door did not stop within %.0f s; killing it", FRONT_DOOR_STOP_S)
                front.kill()
                front.wait(timeout=5)
        reader = getattr(self, "_front_reader", None)
        if reader is not None:
            reader.join(timeout=2)

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the front door (its connections to tritonserver close), then tritonserver: SIGINT
        (it finishes requests in flight, up to exit_timeout), then SIGKILL of its whole process
        group and of any python-backend stub of this server left anywhere. Every wait is bounded,
        whatever died first. Returns tritonserver's exit code (None if it was not running)."""
        if self._death_order is not None:  # deaths from here on are ours
            self._death_order.close()
            self._death_order = None
        self._stop_front_door()  # first: tritonserver otherwise waits for its pooled connections
        process, self.process = self.process, None
        code = None
        if process is not None:
            timeout = self.exit_timeout + 10 if timeout is None else timeout
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop within %.0f s; killing it and its backend stubs", timeout)
            # Its own session: the server and its stubs only. A stub outlives a killed tritonserver
            # (orphaned, still holding the log pipe): the group is killed whatever happened.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                kill_stubs(self.shm_prefix)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            code = process.returncode
            if self._reader is not None:
                self._reader.join(timeout=5)  # EOF once every writer of the pipe is gone
            if self._reader is None or not self._reader.is_alive():
                with contextlib.suppress(OSError):
                    process.stdout.close()
        if self._workdir is not None:
            import shutil

            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        remove_shm_regions(self.shm_prefix)  # the stubs unlink theirs on a clean stop; not after a kill
        return code

    # -- drain --------------------------------------------------------------------------------------
    def _metrics_text(self) -> str:
        if self.front_door:
            status, body = http_get("/metrics", 5.0, socket_path=self._socket("metrics"))
            if status != 200:
                raise OSError(f"tritonserver's metrics answered {status}")
            return body.decode()
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode()

    def in_flight(self) -> tuple[int, int]:
        """(requests queued in Triton's schedulers, model processes running work now). Queued
        requests are Triton's ``nv_inference_pending_request_count`` metric; running work is
        the models' busy markers (see tandem.serving.models.common.Activity)."""
        busy = 0
        for marker in self.drain_dir.glob(f"{BUSY_PREFIX}*"):
            pid = marker.name[len(BUSY_PREFIX):]
            if pid.isdigit() and _pid_alive(int(pid)):
                busy += 1
        pending = 0
        for line in self._metrics_text().splitlines():
            # Behind the front door a draining server refuses new generations at the door, so
            # everything queued anywhere was admitted before the drain: wait for all of it (queued
            # for reasoning, it is refused there; its answer must still reach the client before
            # the door closes). Without the front door new arrivals reach reasoning's queue and
            # are refused there: they are not work to wait for.
            if line.startswith("nv_inference_pending_request_count{") and (
                self.front_door or not any(f'model="{name}"' in line for name in (REASONING, ENSEMBLE))
            ):
                pending += int(float(line.rsplit(" ", 1)[1]))
        return pending, busy

    def drain(self, grace_s: float, settle_s: float = DRAIN_SETTLE_S) -> bool:
        """Stop taking new generations and wait up to ``grace_s`` for the work in flight to finish.

        tritonserver's own stop (SIGINT/SIGTERM) refuses every new request at once, including the
        ensemble's second step of a generation whose reasoning step already ran ("Server is
        stopping"), so a plain stop fails the generations in flight. Here reasoning refuses new
        work first (UNAVAILABLE) while refinement keeps serving, and the server is idle once no
        request is queued and no model is busy for ``settle_s`` in a row (a finished step reaches
        the next step's queue within milliseconds). Returns whether it became idle in time."""
        if not self.is_running():
            return True
        (self.drain_dir / DRAINING_FILE).touch()
        deadline = time.monotonic() + grace_s
        idle_since = None
        while self.is_running():
            try:
                idle = self.in_flight() == (0, 0)
            except OSError:
                idle = False
            now = time.monotonic()
            idle_since = (idle_since or now) if idle else None
            if idle_since is not None and (now - idle_since >= settle_s or now >= deadline):
                return True
            if now >= deadline:
                return False
            time.sleep(0.05)
        return False  # it stopped by itself while draining

    def serve_forever(self, grace_s: float = DEFAULT_GRACE_S) -> "StopReport":
        """Block until SIGINT/SIGTERM or until a child dies (tritonserver, a python-backend stub,
        the front door: then everything is stopped, within bounded time, and ServerError says
        which); on a signal drain (up to ``grace_s``) and stop."""
        stop = threading.Event()

        def handler(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(SUPERVISE_INTERVAL_S):
                reason = self.failure()
                if reason is not None:
                    error = self._failure(reason + "; tandem serve stopped everything it started")
                    self.stop(timeout=5)
                    raise error
            drained = self.drain(grace_s)
            left = (0, 0)
            if not drained and self.is_running():
                with contextlib.suppress(OSError):
                    left = self.in_flight()
                drained = left == (0, 0)  # finished between the last check and the deadline
        finally:  # a second signal while draining must not kill us half-way: restore handlers only now
            for sig, old in previous.items():
                signal.signal(sig, old)
        return StopReport(drained, self.stop(), grace_s, *left)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({self.repository}, http={self.http_port}, grpc={self.grpc_port}, {state})"
