"""The host share of an in-process ONNX Runtime generation: the wall time of a whole generation
(prompt -> scene tokens -> image) minus the time spent inside ONNX Runtime's own ``run`` and
``run_with_iobinding`` calls, over the wall time (issue 28: <= 3% at batch 1 on the small config).

Everything outside those two calls counts as host: the tokenizer, the scheduler's plan, the decode
engine's input checks and cache row writes, the runner's bookkeeping, rendering's token checks and
uint8 conversion, and the Python around every call. :class:`OrtCallClock` times the calls by
wrapping the methods of the runtime's own sessions (instance attributes, removed on exit), so the
code measured is the code that ships; the wrapper's own cost (two clock reads per call) is charged
partly to each side."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

METHODS = ("run", "run_with_iobinding")


class OrtCallClock:
    """Within ``with``: adds up the nanoseconds spent inside every ONNX Runtime session call of
    ``runtime`` (an :class:`tandem.runtimes.onnxruntime.OnnxRuntime`), per graph."""

    def __init__(self, runtime):
        sessions = getattr(runtime, "sessions", None)
        if not sessions:
            raise TypeError(f"{type(runtime).__name__} has no ONNX Runtime sessions to time")
        self.sessions = dict(sessions)
        self.ns: dict[str, int] = {graph: 0 for graph in self.sessions}
        self.calls: dict[str, int] = {graph: 0 for graph in self.sessions}

    def reset(self) -> None:
        for graph in self.ns:
            self.ns[graph] = 0
            self.calls[graph] = 0

    @property
    def total_ns(self) -> int:
        return sum(self.ns.values())

    def _wrap(self, graph: str, method):
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return method(*args, **kwargs)
            finally:
                ns[graph] += clock() - t0
                calls[graph] += 1

        return timed

    def __enter__(self) -> "OrtCallClock":
        for graph, session in self.sessions.items():
            for name in METHODS:
                setattr(session, name, self._wrap(graph, getattr(session, name)))
        return self

    def __exit__(self, *exc) -> None:
        for session in self.sessions.values():
            for name in METHODS:
                session.__dict__.pop(name, None)  # back to the class's method


@dataclass
class HostSample:
    """One whole generation, split into the decode loop (``generate_tokens``) and rendering."""

    wall_s: float
    ort_s: float
    tokens_wall_s: float
    tokens_ort_s: float
    render_wall_s: float
    render_ort_s: float
    decode_steps: int
    images: int

    @property
    def host_share(self) -> float:
        return (self.wall_s - self.ort_s) / self.wall_s

    @property
    def loop_host_us_per_step(self) -> float:
        """Host time of the decode loop (tokenizer, scheduler, prefill bookkeeping, every step's) per decode step."""
        return 1e6 * (self.tokens_wall_s - self.tokens_ort_s) / max(self.decode_steps, 1)

    @property
    def render_host_ms(self) -> float:
        return 1e3 * (self.render_wall_s - self.render_ort_s)

    def as_dict(self) -> dict:
        return {
            "wall_ms": 1e3 * self.wall_s, "ort_ms": 1e3 * self.ort_s, "host_share": self.host_share,
            "tokens_wall_ms": 1e3 * self.tokens_wall_s, "tokens_ort_ms": 1e3 * self.tokens_ort_s,
            "render_wall_ms": 1e3 * self.render_wall_s, "render_ort_ms": 1e3 * self.render_ort_s,
            "decode_steps": self.decode_steps, "images": self.images,
            "loop_host_us_per_step": self.loop_host_us_per_step, "render_host_ms": self.render_host_ms,
        }


def measure_generation(pipeline, clock: OrtCallClock, prompts: Sequence[str], params) -> HostSample:
    """One whole generation of ``prompts`` through ``pipeline`` (whose runtime ``clock`` times)."""
    clock.reset()
    t0 = time.perf_counter_ns()
    tokens = pipeline.generate_tokens(prompts, params)
    t1 = time.perf_counter_ns()
    tokens_ort, steps = clock.total_ns, clock.calls.get("reasoning_decode", 0)
    pipeline.render(tokens)
    t2 = time.perf_counter_ns()
    ort = clock.total_ns
    return HostSample((t2 - t0) / 1e9, ort / 1e9, (t1 - t0) / 1e9, tokens_ort / 1e9, (t2 - t1) / 1e9, (ort - tokens_ort) / 1e9,
                      steps, len(prompts))


def summary(samples: Sequence[HostSample]) -> dict:
    """Means over generations of every figure (means, so that the parts add up to the whole), for a
    target's detail line and results.json."""
    dicts = [s.as_dict() for s in samples]
    return {key: sum(d[key] for d in dicts) / len(dicts) for key in dicts[0]} if dicts else {}


def where_host_time_goes(figures: dict) -> str:
    """A FAIL's explanation from :func:`summary`'s means."""
    wall, steps = figures["wall_ms"], figures["decode_steps"] or 1
    loop_ms = figures["loop_host_us_per_step"] * steps / 1e3
    render_ms = figures["render_host_ms"]
    return (
        f"of {wall - figures['ort_ms']:.2f} ms host time per generation, {loop_ms:.2f} ms is the decode loop "
        f"({figures['loop_host_us_per_step']:.1f} us per decode step over {steps:.0f} steps: the scheduler's plan, the runner's "
        "bookkeeping, the engine's input checks and cache row writes, the tokenizer and prefill padding) and "
        f"{render_ms:.2f} ms rendering (token checks, uint8 conversion). A step's Python (scheduler, runner, engine: one "
        "cache-row write for every layer, inputs already in the bound buffers) takes about 5 us on this 2-core CPU when "
        "its caches are warm (benchmarks/results/host-share-small-2026-12-07/); much more per step means it ran on caches "
        "the step's kernels evicted or was descheduled (other processes: see the header's busy figure). What would cut "
        "it further: fewer Python layers per step (several decode steps per call while no row can join or leave), or no "
        "Python per step at all (a captured step on the device targets)"
    )
