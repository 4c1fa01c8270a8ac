"""Served benchmark: an async load generator over tritonclient (HTTP and gRPC) against the
``tandem`` ensemble of a real tritonserver, a concurrency sweep with a fixed request count per
level, Triton's own per-model statistics, and the same requests through the in-process pipeline.

Request ``i`` of every level is ``PROMPTS[i % len(PROMPTS)]`` with seed ``i`` (greedy), so every
served answer has a known in-process counterpart: scene tokens that differ are counted.

Per level and protocol: images/s (successful requests / wall time of the level), latency
percentiles over successful requests, failed requests with their first error messages, and the
change in Triton's statistics over the level: per model, requests, executions, the batch sizes
its dynamic batcher actually formed (``batch_stats``), and queue vs compute time per request.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tandem.bench.stagebench import PROMPTS
from tandem.bench.timing import summarize

Progress = Callable[[str], None]
PROTOCOLS = ("http", "grpc")


@dataclass
class ServedSettings:
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests: int = 32  # per concurrency level and protocol
    protocols: tuple[str, ...] = PROTOCOLS
    warmup_requests: int = 8  # per protocol, concurrent, not timed
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 300.0
    repository_options: dict = field(default_factory=dict)


def serving_available() -> str | None:
    """None when tandem.serving can write a repository and start tritonserver here, else why not."""
    try:
        from tandem.serving.repository import write_repository  # noqa: F401
        from tandem.serving.server import TritonServer, tritonserver_binary

        tritonserver_binary()
        assert hasattr(TritonServer, "http_url") and hasattr(TritonServer, "grpc_url")
    except Exception as exc:  # ImportError, the server module's own errors, an interface mismatch
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class RequestResult:
    index: int
    ok: bool
    seconds: float
    error: str | None = None
    tokens: np.ndarray | None = None


class _Protocol:
    """The bits of tritonclient that differ between HTTP and gRPC."""

    def __init__(self, protocol: str, url: str):
        self.protocol = protocol
        self.address = url.split("://", 1)[-1]
        if protocol == "http":
            import tritonclient.http as sync_mod
            import tritonclient.http.aio as aio_mod
        else:
            import tritonclient.grpc as sync_mod
            import tritonclient.grpc.aio as aio_mod
        self.mod = sync_mod
        self.aio = aio_mod

    def client(self):
        return self.aio.InferenceServerClient(self.address)

    def inputs(self, model, prompt: str, seed: int) -> list:
        from tandem.serving.interface import PROMPT, SEED, TEMPERATURE, TOP_K

        values = {PROMPT: prompt.encode("utf-8"), SEED: seed, TEMPERATURE: 0.0, TOP_K: 0}
        tensors = []
        for spec in model.inputs:
            array = np.array([[values[spec.name]]], dtype=spec.numpy_dtype)
            tensor = self.mod.InferInput(spec.name, list(array.shape), spec.wire_type)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def outputs(self, model) -> list:
        return [self.mod.InferRequestedOutput(t.name) for t in model.outputs]


async def _run_level(proto: _Protocol, model, concurrency: int, indices: list[int], timeout_s: float, on_done) -> tuple[list[RequestResult], float]:
    from tandem.serving.interface import SCENE_TOKENS

    client = proto.client()
    pending = list(indices)
    results: list[RequestResult] = []
    outputs = proto.outputs(model)

    async def worker() -> None:
        while pending:
            index = pending.pop(0)
            inputs = proto.inputs(model, PROMPTS[index % len(PROMPTS)], index)
            start = time.perf_counter()
            try:
                if proto.protocol == "grpc":
                    response = await client.infer(model.name, inputs, outputs=outputs, client_timeout=timeout_s)
                else:
                    response = await client.infer(model.name, inputs, outputs=outputs)
                elapsed = time.perf_counter() - start
                results.append(RequestResult(index, True, elapsed, tokens=response.as_numpy(SCENE_TOKENS)))
            except Exception as exc:  # InferenceServerException, connection errors: counted, not fatal
                results.append(RequestResult(index, False, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}"))
            on_done()

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return results, time.perf_counter() - start


def _statistics(http_address: str) -> dict[str, dict]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_address)
    try:
        stats = client.get_inference_statistics()
    finally:
        client.close()
    return {f"{m['name']}": m for m in stats.get("model_stats", [])}


def _answered(stats: dict[str, dict], model: str) -> int:
    inference = stats.get(model, {}).get("inference_stats", {})
    return _ns(inference, "success")[0] + _ns(inference, "fail")[0]


def settled_statistics(http_address: str, model: str, sent: int, timeout_s: float = 10.0) -> dict[str, dict]:
    """Triton updates a request's statistics just after it sends the response, so a snapshot taken
    the moment the client has its answer can miss the last requests. Poll until ``model`` has
    accounted for all ``sent`` requests and two snapshots agree (or the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    previous = _statistics(http_address)
    while True:
        time.sleep(0.1)
        current = _statistics(http_address)
        if (_answered(current, model) >= sent and current == previous) or time.monotonic() > deadline:
            return current
        previous = current


def _ns(entry: dict, key: str) -> tuple[int, int]:
    value = entry.get(key, {}) or {}
    return int(value.get("count", 0)), int(value.get("ns", 0))


def statistics_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per model: what happened between two statistics snapshots."""
    delta = {}
    for name, now in after.items():
        then = before.get(name, {})
        requests = int(now.get("inference_count", 0)) - int(then.get("inference_count", 0))
        executions = int(now.get("execution_count", 0)) - int(then.get("execution_count", 0))
        row: dict = {"requests": requests, "executions": executions}
        stats_now, stats_then = now.get("inference_stats", {}), then.get("inference_stats", {})
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            count_now, ns_now = _ns(stats_now, key)
            count_then, ns_then = _ns(stats_then, key)
            count, ns = count_now - count_then, ns_now - ns_then
            row[f"{key}_count"] = count
            if key not in ("success", "fail"):
                row[f"{key}_ms_per_request"] = ns / count / 1e6 if count else None
        compute = [row.get(f"compute_{k}_ms_per_request") for k in ("input", "infer", "output")]
        row["compute_ms_per_request"] = sum(c for c in compute if c is not None) if any(c is not None for c in compute) else None
        formed: Counter = Counter()
        then_batches = {int(b["batch_size"]): b for b in then.get("batch_stats", []) or []}
        for b in now.get("batch_stats", []) or []:
            size = int(b["batch_size"])
            count = _ns(b, "compute_infer")[0] - _ns(then_batches.get(size, {}), "compute_infer")[0]
            if count:
                formed[size] = count
        row["batch_sizes_formed"] = {str(k): v for k, v in sorted(formed.items())}
        row["mean_batch_size"] = requests / executions if executions else None
        delta[name] = row
    return delta


def _queue_limits(repository: Path) -> dict[str, int | None]:
    limits: dict[str, int | None] = {}
    try:
        from tandem.serving.repository import parse_config

        for config_path in sorted(repository.glob("*/config.pbtxt")):
            config = parse_config(config_path)
            if config.HasField("dynamic_batching"):
                limits[config.name] = int(config.dynamic_batching.default_queue_policy.max_queue_size) or None
    except Exception:  # the limits are context for the report, never a reason to fail it
        pass
    return limits


def inprocess_reference(artifacts: Path, n: int, tick: Progress) -> dict:
    """The same requests, one after another, through the in-process ONNX Runtime pipeline."""
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime

    pipeline = Pipeline(make_runtime("onnxruntime", artifacts=artifacts))
    pipeline.generate(PROMPTS[0], seed=0)  # warm-up, not timed
    seconds, tokens = [], []
    for index in range(n):
        tick(f"in-process request {index + 1}/{n}")
        start = time.perf_counter()
        result = pipeline.generate(PROMPTS[index % len(PROMPTS)], seed=index)
        seconds.append(time.perf_counter() - start)
        tokens.append(result.tokens.reshape(-1))
    return {"latency": summarize(seconds), "images_per_s": n / sum(seconds), "tokens": tokens}


def run_served(artifacts: Path, settings: ServedSettings, progress_factory) -> dict:
    """Write a local-flavor repository for ``artifacts``, start tritonserver, sweep, stop it."""
    reason = serving_available()
    if reason is not None:
        return {"status": "not run: serving unavailable", "reason": reason}
    from tandem.serving.interface import ENSEMBLE, served_models
    from tandem.serving.repository import write_repository
    from tandem.serving.server import TritonServer

    from tandem.export.manifest import read_manifest

    config = read_manifest(artifacts).config
    model = served_models(config)[ENSEMBLE]
    n = settings.requests
    bar = progress_factory(total=n, desc="served: in-process reference", unit="req")
    reference = inprocess_reference(artifacts, n, lambda _: bar.update())
    bar.close()
    expected_tokens = reference.pop("tokens")

    result: dict = {
        "status": "ok",
        "model": ENSEMBLE,
        "requests_per_level": n,
        "concurrencies": list(settings.concurrencies),
        "inprocess": reference,
        "protocols": {},
    }
    with tempfile.TemporaryDirectory(prefix="tandem-bench-repo-") as tmp:
        repository = write_repository(artifacts, Path(tmp) / "repository", flavor="local", **settings.repository_options)
        result["queue_limits"] = _queue_limits(repository)
        with TritonServer(repository, startup_timeout=settings.startup_timeout_s) as server:
            result["server"] = {"http_url": server.http_url, "grpc_url": server.grpc_url}
            http_address = server.http_url.split("://", 1)[-1]
            sent = 0  # requests sent to the ensemble so far, to know when Triton's statistics are complete
            for protocol in settings.protocols:
                proto = _Protocol(protocol, server.http_url if protocol == "http" else server.grpc_url)
                total = settings.warmup_requests + n * len(settings.concurrencies)
                bar = progress_factory(total=total, desc=f"served: {protocol}", unit="req")
                warm = list(range(settings.warmup_requests))
                asyncio.run(_run_level(proto, model, max(1, len(warm)), warm, settings.request_timeout_s, bar.update))
                sent += len(warm)
                levels = {}
                for concurrency in settings.concurrencies:
                    bar.set_postfix_str(f"concurrency {concurrency}")
                    before = settled_statistics(http_address, model.name, sent)
                    results, wall = asyncio.run(
                        _run_level(proto, model, concurrency, list(range(n)), settings.request_timeout_s, bar.update)
                    )
                    sent += n
                    after = settled_statistics(http_address, model.name, sent)
                    levels[str(concurrency)] = _summarize_level(results, wall, expected_tokens, statistics_delta(before, after))
                bar.close()
                result["protocols"][protocol] = levels
    return result


def _summarize_level(results: list[RequestResult], wall: float, expected: list[np.ndarray], triton: dict) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    mismatched = sum(
        1 for r in ok if r.tokens is None or not np.array_equal(np.asarray(r.tokens).reshape(-1), expected[r.index])
    )
    latency = summarize([r.seconds for r in ok])
    return {
        "requests": len(results),
        "succeeded": len(ok),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed if r.error})[:5],
        "tokens_mismatched": mismatched,
        "wall_s": wall,
        "images_per_s": len(ok) / wall if wall > 0 else 0.0,
        "latency": latency,
        "triton": triton,
    }
