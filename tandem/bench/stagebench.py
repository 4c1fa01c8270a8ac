"""Per stage, per runtime: latency percentiles, throughput vs batch, decode cost vs position, and
whole in-process generations.

Every runtime ``tandem.runtimes.make_runtime`` can build on this machine is measured through the
same :class:`tandem.runtimes.Runtime` interface with the same inputs (the stage descriptions'
sample inputs), so the figures differ only by runtime."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tandem.bench.timing import Budget, measure, summarize
from tandem.config import ModelConfig
from tandem.errors import TandemError
from tandem.runtimes import RUNTIME_NAMES, Runtime, make_runtime
from tandem.stages import GraphSpec, cache_layout

# Captions the end-to-end and served measurements send, in this order (request i uses seed i).
PROMPTS = (
    "a red circle above a blue square",
    "two green triangles",
    "a yellow square left of a red circle",
    "a blue triangle below a green circle",
    "three red squares",
    "a purple circle right of an orange triangle",
    "a small white square above a black circle",
    "a green square below a yellow triangle",
)

Progress = Callable[[str], None]

# Pause before measuring another runtime: OpenMP (PyTorch) and ONNX Runtime worker threads keep
# spinning for a while after their last call, and on a small machine that spinning would be
# charged to whichever runtime is measured next.
SETTLE_SECONDS = 0.5
VARIANTS = ("onnxruntime_basic",)  # measured for comparison, not what tandem ships
PRECISION_RUNTIMES = {"onnxruntime_int8": "int8"}  # ONNX Runtime over a cpu build's gated precision graphs
INT8_BYTES_PER_WEIGHT = 1.125  # int8 values plus their scales (one fp32 scale per 32 weights at most)


def settle() -> None:
    time.sleep(SETTLE_SECONDS)


def set_settle_seconds(seconds: float) -> None:
    global SETTLE_SECONDS
    SETTLE_SECONDS = seconds


def build_runtimes(
    artifacts: Path, config: ModelConfig, names: list[str] | None = None, compiled: list[Path] | None = None
) -> tuple[dict[str, Runtime], dict[str, str]]:
    """Every runtime that can be built here, and for the others the reason it cannot.

    ``torch`` and ``onnxruntime`` run the export in ``artifacts``; compiled runtimes (TensorRT,
    Neuron, AOTInductor) run a ``tandem build`` output directory, tried from ``compiled`` in order."""
    from tandem.runtimes import COMPILED_RUNTIMES

    built: dict[str, Runtime] = {}
    unavailable: dict[str, str] = {}
    for name in names or [*RUNTIME_NAMES, *VARIANTS, *PRECISION_RUNTIMES]:
        if name in PRECISION_RUNTIMES:
            try:
                built[name] = precision_runtime(name, PRECISION_RUNTIMES[name], config, compiled or [])
            except TandemError as exc:
                unavailable[name] = str(exc)
            continue
        if name == "onnxruntime_basic":
            try:
                built[name] = onnxruntime_basic_variant(artifacts)
                built[name].bench_source = str(artifacts)
            except Exception as exc:
                unavailable[name] = f"{type(exc).__name__}: {exc}"
            continue
        if name not in COMPILED_RUNTIMES:
            candidates = [artifacts]
        elif compiled:
            candidates = list(compiled)
        else:
            unavailable[name] = "needs a `tandem build` output directory: pass it with --artifacts DIR"
            continue
        reasons = []
        for directory in candidates:
            try:
                runtime = make_runtime(name, artifacts=directory, config=config)
            except Exception as exc:  # a missing toolchain, another target's build, a broken install
                reasons.append(f"{directory}: {type(exc).__name__}: {exc}")
                continue
            if runtime.config.fingerprint() != config.fingerprint():
                reasons.append(f"{directory}: built from another config ({runtime.config.name})")
                continue
            runtime.bench_source = str(directory)  # recorded in the report: which artifacts were measured
            built[name] = runtime
            break
        else:
            unavailable[name] = "; ".join(reasons)
    return built, unavailable


def graph_feeds(spec: GraphSpec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return spec.sample_inputs({"batch": batch}, seed=seed)


def decode_step_call(runtime: Runtime, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """One decode step as generation runs it: through the runtime's decode engine, its cache
    buffers holding ``feeds``' cache (allocated and bound once, outside the timed call)."""
    from tandem.decoding import make_decode_engine

    batch = len(feeds["token_ids"])
    engine = make_decode_engine(runtime, batch)
    for name in cache_layout(runtime.config).names("past"):
        engine.load_cache(name, feeds[name])
    token_ids, positions = feeds["token_ids"], feeds["positions"]
    return lambda: engine.step(batch, token_ids, positions)


def graph_call(runtime: Runtime, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    if spec.name == "reasoning_decode":
        return decode_step_call(runtime, spec, feeds)
    return lambda: runtime.run(spec.name, feeds)


def bench_graph(runtime: Runtime, spec: GraphSpec, batch: int, budget: Budget) -> dict:
    feeds = graph_feeds(spec, batch)
    samples = measure(graph_call(runtime, spec, feeds), budget)
    stats = summarize(samples)
    stats["batch"] = batch
    stats["dims"] = {name: (batch if name == "batch" else r.opt) for name, r in spec.dims.items()}
    stats["items_per_s"] = batch / (stats["mean_ms"] / 1e3)
    return stats


def bench_graphs(
    runtimes: dict[str, Runtime],
    specs: dict[str, GraphSpec],
    batches: list[int],
    budget_batch1: Budget,
    budget_batched: Budget,
    tick: Progress,
) -> dict:
    """results[runtime][graph]["batches"][str(batch)] = latency stats + items/s."""
    results: dict = defaultdict(dict)
    for rt_name, runtime in runtimes.items():
        settle()
        for graph, spec in specs.items():
            per_batch = {}
            for batch in batches:
                tick(f"{rt_name} {graph} batch {batch}")
                budget = budget_batch1 if batch == 1 else budget_batched
                try:
                    per_batch[str(batch)] = bench_graph(runtime, spec, batch, budget)
                except TandemError as exc:  # e.g. a compiled runtime built without this graph or batch
                    per_batch[str(batch)] = {"batch": batch, "error": str(exc)}
            results[rt_name][graph] = {"batches": per_batch}
    return dict(results)


def decode_positions(max_len: int, start: int = 16) -> list[int]:
    """16, 32, 64, ... below max_len, and the last cache slot (max_len - 1)."""
    positions, p = [], start
    while p < max_len:
        positions.append(p)
        p *= 2
    if not positions or positions[-1] != max_len - 1:
        positions.append(max_len - 1)
    return positions


def bench_decode_positions(
    runtimes: dict[str, Runtime], spec: GraphSpec, positions: list[int], budget: Budget, tick: Progress
) -> dict:
    """Decode-step latency at batch 1 with the new token written at each position."""
    results: dict = {}
    for rt_name, runtime in runtimes.items():
        settle()
        per_position = {}
        for position in positions:
            tick(f"{rt_name} decode @ position {position}")
            feeds = graph_feeds(spec, 1)
            feeds["positions"] = np.array([position], dtype=np.int64)
            try:
                per_position[str(position)] = summarize(measure(graph_call(runtime, spec, feeds), budget))
            except TandemError as exc:
                per_position[str(position)] = {"error": str(exc)}
        results[rt_name] = per_position
    return results


def bench_recompute_positions(runtime: Runtime, positions: list[int], budget: Budget, tick: Progress) -> dict:
    """Reference curve without a KV cache: the cost of one new token when the whole prefix is run
    again (teacher-forced forward over position + 1 tokens, PyTorch eager)."""
    import torch

    model = getattr(getattr(runtime, "stages", None), "reasoning", None)
    if model is None:
        return {}
    rng = np.random.default_rng(0)
    results = {}
    settle()
    for position in positions:
        tick(f"no-cache recompute @ position {position}")
        ids = torch.from_numpy(rng.integers(0, 256, size=(1, position + 1)).astype(np.int64))

        def step() -> None:
            with torch.inference_mode():
                model(ids)

        results[str(position)] = summarize(measure(step, budget))
    return results


class TimedRuntime(Runtime):
    """Wraps a runtime and adds up the wall time spent in each graph (for per-phase breakdowns)."""

    def __init__(self, inner: Runtime):
        super().__init__(inner.config)
        self.inner = inner
        self.name = inner.name
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.timed(graph, self.inner.run, graph, feeds)

    def timed(self, graph: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[graph] += time.perf_counter() - start
            self.calls[graph] += 1

    def decode_engine(self, capacity: int):
        """The inner runtime's own engine, its prefill and steps timed as the graphs they run."""
        engine = self.inner.decode_engine(capacity)
        prefill, step = engine.prefill, engine.step
        engine.prefill = lambda *args, **kwargs: self.timed("reasoning_prefill", prefill, *args, **kwargs)
        engine.step = lambda *args, **kwargs: self.timed("reasoning_decode", step, *args, **kwargs)
        return engine

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def bench_pipeline(runtime: Runtime, batch: int, budget: Budget) -> dict:
    """Whole in-process generations (prefill, every decode step, refinement) of ``batch`` prompts."""
    from tandem.pipeline import Pipeline
    from tandem.sampling import SamplingParams

    timed = TimedRuntime(runtime)
    pipeline = Pipeline(timed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    params = [SamplingParams(seed=i) for i in range(batch)]

    def generate() -> None:
        pipeline.render(pipeline.generate_tokens(prompts, params))

    settle()
    for _ in range(budget.warmup):
        generate()
    timed.reset()
    samples = measure(generate, Budget(0, budget.iterations, budget.min_iterations, budget.max_seconds))
    stats = summarize(samples)
    n = stats["n"]
    stats["batch"] = batch
    stats["images_per_s"] = batch / (stats["mean_ms"] / 1e3)
    stats["phase_ms_per_generation"] = {g: 1e3 * s / n for g, s in timed.seconds.items()}
    stats["graph_calls_per_generation"] = {g: c / n for g, c in timed.calls.items()}
    return stats


def precision_runtime(name: str, precision: str, config: ModelConfig, builds: list[Path]):
    """ONNX Runtime over the precision graphs of a ``tandem build --target cpu --precision P`` output
    (gated on accuracy by its precision step), found among ``builds``."""
    import json

    from tandem.formats.build_manifest import BUILD_MANIFEST
    from tandem.runtimes.onnxruntime import OnnxRuntime

    for build in builds:
        try:
            data = json.loads((Path(build) / BUILD_MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if (data.get("target"), data.get("precision"), data.get("passed")) != ("cpu", precision, True):
            continue
        if data.get("config_fingerprint") != config.fingerprint():
            continue
        runtime = OnnxRuntime(Path(build) / "precision", optimized=True, device="cpu")
        report = runtime.manifest.precision or {}
        runtime.name = name
        runtime.bench_source = str(Path(build) / "precision")
        runtime.precision_report = {
            "precision": precision,
            "graphs": {g: c["precision"] for g, c in report.get("graphs", {}).items()},
            "generation": report.get("generation"),
            "accuracy": report.get("accuracy"),
            "override": report.get("override"),
        }
        runtime.bytes_per_weight = {g: INT8_BYTES_PER_WEIGHT for g, p in runtime.precision_report["graphs"].items() if p == "int8"}
        base = runtime.describe()
        runtime.describe = lambda: f"{base}, {precision} decode step (gated precision graphs)"  # type: ignore[method-assign]
        return runtime
    raise TandemError(
        f"needs a cpu {precision} build of {config.name}: tandem build --config {config.name} --target cpu "
        f"--precision {precision} --out build/{config.name}-cpu-{precision} (then pass it as --artifacts or keep it under build/)"
    )


def onnxruntime_basic_variant(artifacts: Path):
    """ONNX Runtime over the same verified graphs with only BASIC optimisation at session load (what
    tandem shipped before it applied ALL at load): measured beside the shipped setting to show what
    the load-time, CPU-specific optimisations (NCHWc layouts) buy on this machine."""
    from tandem.runtimes.onnxruntime import OnnxRuntime

    class OnnxRuntimeBasic(OnnxRuntime):
        name = "onnxruntime_basic"

    return OnnxRuntimeBasic(artifacts, optimized=True, device="cpu", graph_optimization="basic")
