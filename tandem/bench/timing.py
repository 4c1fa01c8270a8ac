"""Wall-clock measurement: warm-up excluded, every sample kept, percentiles computed once.

Samples are taken with ``time.perf_counter_ns`` and the garbage collector paused (as ``timeit``
does), so a collection triggered by an earlier allocation does not land in one sample at random.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Budget:
    """How many samples one measurement takes: ``warmup`` untimed calls, then at least
    ``min_iterations`` and at most ``iterations`` timed calls, stopping early once ``max_seconds``
    of timed work has accumulated (slow cases get fewer samples, fast ones get percentiles)."""

    warmup: int
    iterations: int
    min_iterations: int
    max_seconds: float

    def as_dict(self) -> dict:
        return {
            "warmup": self.warmup,
            "iterations": self.iterations,
            "min_iterations": self.min_iterations,
            "max_seconds": self.max_seconds,
        }


def measure(fn: Callable[[], object], budget: Budget) -> np.ndarray:
    """Call ``fn`` ``budget.warmup`` times untimed, then time it; returns seconds per call."""
    for _ in range(budget.warmup):
        fn()
    samples: list[int] = []
    spent = 0
    limit_ns = int(budget.max_seconds * 1e9)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(samples) < budget.iterations:
            start = time.perf_counter_ns()
            fn()
            elapsed = time.perf_counter_ns() - start
            samples.append(elapsed)
            spent += elapsed
            if spent >= limit_ns and len(samples) >= budget.min_iterations:
                break
    finally:
        if was_enabled:
            gc.enable()
    return np.asarray(samples, dtype=np.float64) / 1e9


def summarize(seconds: np.ndarray | list[float]) -> dict:
    """Milliseconds: count, mean, std, min, p50/p90/p95/p99, max, and every raw sample."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"n": 0, "samples_ms": []}
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {
        "n": int(ms.size),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "min_ms": float(ms.min()),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(ms.max()),
        "samples_ms": [round(float(x), 4) for x in ms],
    }
