"""The machine a benchmark ran on: CPU model, cores, memory, accelerators, library versions, load.

Every number in a report is only meaningful next to this record, so it is collected once at the
start of a run and written into the results JSON and the Markdown header."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "tritonclient", "nvidia-pytriton", "matplotlib")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, falling back to lscpu, then platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if line.startswith("Model name:"):
                    return line.split(":", 1)[1].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def lscpu() -> dict[str, str]:
    """lscpu's key/value table (flags dropped: long and not needed to read a report)."""
    if not shutil.which("lscpu"):
        return {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    table = {}
    for line in out.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            if key.strip() != "Flags":
                table[key.strip()] = value.strip()
    return table


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache of core 0 (the last level, shared by the cores that use it), from
    sysfs; None where the kernel does not say."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            kind = (index / "type").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not text:
            continue
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA install must not stop a CPU benchmark
        pass
    return []


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class OwnCpuMeter:
    """CPU seconds used by this process and every process it started, however deep.

    ``os.times()`` counts only children that were waited for: tritonserver's python-backend stubs
    are tritonserver's children, not ours, so their work (most of a served run) would be reported as
    *other* processes' load. A thread samples the whole tree (psutil) twice a second and keeps each
    process's last figure; a process that lives less than one interval is missed, which errs towards
    calling the machine busy, never quiet."""

    def __init__(self, interval_s: float = 0.5) -> None:
        import threading

        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._seen: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds last seen
        self._baseline = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="own-cpu-meter", daemon=True)

    def _sample(self) -> float:
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
            except self._psutil.Error:  # exited between listing and reading
                continue
            self._seen[key] = times.user + times.system
        return sum(self._seen.values())

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._sample()

    def start(self) -> "OwnCpuMeter":
        self._baseline = self._sample()  # before the thread: one sampler at a time, no lock needed
        self._thread.start()
        return self

    def stop(self) -> float:
        """CPU seconds the tree used since start()."""
        self._stop.set()
        self._thread.join()
        return self._sample() - self._baseline


def cpu_snapshot(own_s: float) -> dict[str, float] | None:
    """Machine-wide busy CPU seconds (/proc/stat), this run's own CPU seconds (from an OwnCpuMeter)
    and the wall clock - two snapshots tell how much CPU *other* processes used meanwhile."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "machine_busy_s": (user + nice + system + irq + softirq + steal) / hz,
        "own_s": own_s,
        "wall_s": time.monotonic(),
    }


def interference(start: dict | None, end: dict | None, cores: int) -> dict | None:
    """Share of the machine's CPU capacity that other processes used between two snapshots."""
    if not start or not end:
        return None
    wall = end["wall_s"] - start["wall_s"]
    other = (end["machine_busy_s"] - start["machine_busy_s"]) - (end["own_s"] - start["own_s"])
    return {
        "wall_s": wall,
        "other_processes_cpu_s": max(other, 0.0),
        "other_processes_share": max(other, 0.0) / (wall * cores) if wall > 0 else 0.0,
    }


def thread_settings() -> dict[str, object]:
    import torch

    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "onnxruntime_intra_op_threads": "0 (one per core)",
    }


def machine_slug(cpu: str | None = None, gpu_names: list[str] | None = None, cores: int | None = None) -> str:
    """A short folder-friendly machine name: the GPU if there is one, else the CPU and its cores."""
    gpu_names = gpus() if gpu_names is None else gpu_names
    name = gpu_names[0] if gpu_names else (cpu or cpu_model())
    name = re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", "", name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "machine"
    if not gpu_names:
        slug += f"-{cores or cpu_count()}c"
    return slug[:48].strip("-")


def collect() -> dict:
    cpu = cpu_model()
    gpu_names = gpus()
    return {
        "machine": machine_slug(cpu, gpu_names),
        "cpu_model": cpu,
        "cpu_cores_usable": cpu_count(),
        "lscpu": lscpu(),
        "memory_gib": memory_gib(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "gpus": gpu_names,
        "platform": platform.platform(),
        "versions": versions(),
        "threads": thread_settings(),
        "load_average_start": load_average(),
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
