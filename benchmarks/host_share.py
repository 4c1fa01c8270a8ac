"""Host share of a batch-1 generation on ONNX Runtime, two ways, as one JSON line:
(1) the bench's own measurement (tandem.bench.stagebench.bench_pipeline: wall minus the time inside
engine.prefill/step and runtime.run calls, what tandem.bench.runner.host_seconds_per_step reads);
(2) stricter: wall minus the time inside ONNX Runtime's own run / run_with_iobinding calls (the
engine's Python around them counts as host too).

    PYTHONPATH=<checkout> .venv/bin/python benchmarks/host_share.py <export dir> <label>

Run it alternately for two checkouts (A, B, A, B: the machine's speed drifts) to compare them."""
import json, sys, time
import onnxruntime as ort
from tandem.bench.stagebench import bench_pipeline, set_settle_seconds
from tandem.bench.timing import Budget
from tandem.pipeline import Pipeline
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.sampling import SamplingParams
set_settle_seconds(0.5)
rt = OnnxRuntime(sys.argv[1], device="cpu")
stats = bench_pipeline(rt, 1, Budget(warmup=2, iterations=30, min_iterations=10, max_seconds=12))
inside = sum(stats["phase_ms_per_generation"].values())
steps = stats["graph_calls_per_generation"]["reasoning_decode"]

spent = [0]
def timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter_ns() - t0
    return wrapper
ort.InferenceSession.run = timed(ort.InferenceSession.run)
ort.InferenceSession.run_with_iobinding = timed(ort.InferenceSession.run_with_iobinding)
pipe = Pipeline(rt)
prompt = ["a red circle above a blue square"]
pipe.render(pipe.generate_tokens(prompt, SamplingParams()))
spent[0] = 0
t0 = time.perf_counter_ns()
for _ in range(15):
    pipe.render(pipe.generate_tokens(prompt, SamplingParams()))
wall = time.perf_counter_ns() - t0
print(json.dumps({"label": sys.argv[2], "n": stats["n"], "mean_ms": stats["mean_ms"], "inside_ms": inside,
                  "bench_host_share": (stats["mean_ms"] - inside) / stats["mean_ms"],
                  "bench_host_us_per_step": 1e3 * (stats["mean_ms"] - inside) / steps,
                  "strict_host_share": (wall - spent[0]) / wall, "strict_host_us_per_step": (wall - spent[0]) / 15 / steps / 1e3,
                  "strict_ms_per_generation": wall / 15 / 1e6, "phases": stats["phase_ms_per_generation"]}))
