"""Decode steps as generation runs them: recorded from real greedy generations, replayed, and the
experts each replayed step really routed to.

A decode step repeated with fixed inputs reads the same two experts per layer every call, and they
stay in the CPU's caches: it is faster than any step of a real generation, where the token, the
position and so the routing change every step. Here:

1. :func:`record_generations` runs greedy generations over held-out captions (never trained on,
   :func:`tandem.data.scenes.heldout_captions`) through the in-process pipeline and records what its
   decode engine was given: the prefill's prompts and, per step, the token ids and positions.
2. :class:`Replayer` replays a recorded generation on any runtime's decode engine: the prefill
   (untimed, it fills the cache exactly as the generation did), then every step, each timed.
3. :func:`routed_experts` reads the router's top-k from the PyTorch reference, teacher-forced over
   the same tokens: the distinct experts per layer each step routed its rows to, and
   :func:`step_bytes` turns that into each step's compulsory bytes for the roofline.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tandem.errors import TandemError
from tandem.runtimes import Runtime


@dataclass
class Recorded:
    """One generation of ``batch`` rows as its decode engine saw it."""

    captions: list[str]
    input_ids: np.ndarray  # [n, W] int64, right-padded, as the prefill got them
    lengths: np.ndarray  # [n] int64
    token_ids: np.ndarray  # [steps, n] int64: each step's input tokens
    positions: np.ndarray  # [steps, n] int64
    cache: dict[str, np.ndarray] | None = None  # the cache the prefill left (replays load it instead of prefilling)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def steps(self) -> int:
        return len(self.token_ids)


class RecordingRuntime(Runtime):
    """Wraps a runtime; every decode engine it hands out records its prefill and step inputs."""

    def __init__(self, inner: Runtime):
        super().__init__(inner.config)
        self.inner = inner
        self.name = inner.name
        self.prefills: list[tuple[np.ndarray, np.ndarray]] = []
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.run(graph, feeds)

    def decode_engine(self, capacity: int):
        engine = self.inner.decode_engine(capacity)
        prefill, step = engine.prefill, engine.step

        def recorded_prefill(slots, input_ids, prompt_lengths, *args, **kwargs):
            self.prefills.append((np.array(input_ids, np.int64), np.array(prompt_lengths, np.int64)))
            return prefill(slots, input_ids, prompt_lengths, *args, **kwargs)

        def recorded_step(n, token_ids, positions, *args, **kwargs):
            self.steps.append((np.array(token_ids, np.int64)[:n], np.array(positions, np.int64)[:n]))
            return step(n, token_ids, positions, *args, **kwargs)

        engine.prefill, engine.step = recorded_prefill, recorded_step
        return engine


def replay_captions(max_caption_bytes: int, count: int) -> list[str]:
    """``count`` held-out captions spread over the object counts (a fixed, seeded draw), object
    counts interleaved so any prefix mixes them; repeated when the pool that fits is smaller."""
    from tandem.data.scenes import MAX_OBJECTS, heldout_captions, parse_caption

    per_count = max(1, math.ceil(count / MAX_OBJECTS))
    pool = heldout_captions(max_caption_bytes, per_count=per_count)
    groups = [[c for c in pool if len(parse_caption(c).objects) == n] for n in range(1, MAX_OBJECTS + 1)]
    mixed = [g[i] for i in range(per_count) for g in groups if i < len(g)]
    if not mixed:
        raise TandemError(f"no held-out caption fits {max_caption_bytes} bytes")
    return [mixed[i % len(mixed)] for i in range(count)]


def record_generations(runtime: Runtime, captions: Sequence[str], batch: int, num_tokens: int | None = None) -> list[Recorded]:
    """Greedy generations of ``captions`` in batches of ``batch`` through the in-process pipeline,
    as recorded from its decode engine (one :class:`Recorded` per batch). ``num_tokens``: stop each
    generation after that many scene tokens (``num_tokens - 1`` decode steps) instead of the whole
    grid: the same scheduler and decode loop, told a shorter scene."""
    from tandem.pipeline import Pipeline
    from tandem.sampling import SamplingParams
    from tandem.scheduler import InflightScheduler, Job

    recorder = RecordingRuntime(runtime)
    pipeline = Pipeline(recorder)

    def generate(chunk: list[str]) -> None:
        if num_tokens is None:
            pipeline.generate_tokens(chunk, SamplingParams())
            return
        from tandem.decoding import make_decode_engine

        scheduler = InflightScheduler(make_decode_engine(recorder, len(chunk)), num_tokens, runtime.config.reasoning.max_prompt_len)
        jobs = [Job(caption, SamplingParams(), on_done=lambda outcome: None) for caption in chunk]
        for job in jobs:
            scheduler.submit(job)
        scheduler.run_until_idle()
        for job in jobs:
            if not job.outcome.ok:
                raise job.outcome.exception or TandemError(job.outcome.error)

    out = []
    for start in range(0, len(captions) - batch + 1, batch):
        chunk = list(captions[start:start + batch])
        recorder.prefills.clear()
        recorder.steps.clear()
        generate(chunk)
        if len(recorder.prefills) != 1 or not recorder.steps or any(len(t) != batch for t, _ in recorder.steps):
            continue  # not one prefill then steps over the whole batch: not a generation this replay can repeat
        input_ids, lengths = recorder.prefills[0]
        out.append(Recorded(
            captions=chunk,
            input_ids=input_ids,
            lengths=lengths,
            token_ids=np.stack([t for t, _ in recorder.steps]),
            positions=np.stack([p for _, p in recorder.steps]),
        ))
    return out


class Replayer:
    """Replays recorded generations on one runtime's decode engines (one engine per batch size,
    allocated and bound once): the prefill untimed (or the recorded cache it left, loaded), then
    each step timed."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.engines: dict[int, object] = {}

    def __call__(self, rec: Recorded, argmax: list[np.ndarray] | None = None) -> np.ndarray:
        """Seconds per step; ``argmax``, when given, receives each step's greedy next tokens (untimed
        use: checking the replay follows the recorded generation)."""
        from tandem.decoding import make_decode_engine

        n = rec.batch
        engine = self.engines.get(n)
        if engine is None:
            engine = self.engines[n] = make_decode_engine(self.runtime, n)
        if rec.cache is not None:  # the prefill's cache as recorded: no prefill graph needed
            for name, values in rec.cache.items():
                engine.load_cache(name, values)
        else:
            engine.prefill(range(n), rec.input_ids, rec.lengths)
        seconds = np.empty(rec.steps, dtype=np.float64)
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for i in range(rec.steps):
                t0 = time.perf_counter_ns()
                chosen = engine.step(n, rec.token_ids[i], rec.positions[i])  # greedy, in the graph
                seconds[i] = (time.perf_counter_ns() - t0) / 1e9
                if argmax is not None:
                    argmax.append(np.array(chosen))  # a copy: the engine may reuse its output buffer
        finally:
            if was_enabled:
                gc.enable()
        return seconds


class ReplayArm:
    """A round's figure: the median step time of the next recorded generation replayed on
    ``runtime``. Keeps every step's time and which generation each call replayed; with
    ``check_tokens``, also whether each generation's greedy tokens followed the recording (checked
    on its first call, the only one that collects them)."""

    def __init__(self, runtime: Runtime, recordings: list[Recorded], check_tokens: bool = False):
        self.replayer = Replayer(runtime)
        self.recordings = recordings
        self.check_tokens = check_tokens
        self.calls = 0
        self.used: list[int] = []
        self.seconds: list[np.ndarray] = []
        self.follows: dict[int, float] = {}  # generation -> share of steps whose greedy token followed it

    def __call__(self) -> float:
        index = self.calls % len(self.recordings)
        self.calls += 1
        rec = self.recordings[index]
        chosen: list[np.ndarray] | None = [] if self.check_tokens and index not in self.follows else None
        seconds = self.replayer(rec, chosen)
        if chosen is not None and rec.steps > 1:  # step i's greedy tokens are step i + 1's inputs
            self.follows[index] = float(np.mean(np.stack(chosen[:-1]) == rec.token_ids[1:]))
        self.used.append(index)
        self.seconds.append(seconds)
        return float(np.median(seconds))

    def timed(self, warmup: int) -> tuple[list[int], list[np.ndarray]]:
        return self.used[warmup:], self.seconds[warmup:]


def routed_experts(reasoning, rec: Recorded) -> np.ndarray:
    """[steps, layers]: how many distinct experts each layer's router sent the step's rows to, read
    from the PyTorch reference teacher-forced over each row's prompt and its generated tokens (the
    inputs the replayed steps get)."""
    import torch

    from tandem.models.reasoning import MoEFeedForward
    from tandem.tokenizer import SCENE_OFFSET

    layers = [m for m in reasoning.modules() if isinstance(m, MoEFeedForward)]
    chosen: list[list[np.ndarray]] = []  # per row: per layer [steps, k]
    for row in range(rec.batch):
        length = int(rec.lengths[row])
        sequence = np.concatenate([rec.input_ids[row, :length], rec.token_ids[:, row] + SCENE_OFFSET])
        with torch.inference_mode():
            reasoning.forward_sequence(torch.from_numpy(sequence[None].astype(np.int64)))
        per_layer = []
        for layer in layers:
            routing = layer.last_routing.reshape(len(sequence), -1).numpy()
            # step i's input token sits at the row's position i (its prompt fills [0, length))
            per_layer.append(routing[rec.positions[:, row]])
        chosen.append(per_layer)
    counts = np.empty((rec.steps, len(layers)), dtype=np.int64)
    for li in range(len(layers)):
        ids = np.concatenate([chosen[row][li] for row in range(rec.batch)], axis=1)  # [steps, n * k]
        counts[:, li] = [len(np.unique(r)) for r in ids]
    return counts


def step_bytes(work: dict, experts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Compulsory bytes of each replayed step: ``work`` (the roofline's count for the decode graph at
    this batch) with its routed experts replaced by the step's (``experts`` [steps, layers]) and its
    cache read by the rows' real positions ([steps, n]: each row reads [0, position))."""
    fixed = work["bytes"] - work["routed_expert_bytes"] - work["cache_read_bytes"]
    per_expert = np.asarray(work["expert_bytes_per_layer"], dtype=np.float64)
    return fixed + experts @ per_expert + positions.sum(axis=1) * work["cache_bytes_per_position"]


def replay_summary(seconds: Sequence[np.ndarray], experts: Sequence[np.ndarray], bytes_: Sequence[np.ndarray]) -> dict:
    """Per-step latency over every replayed step, the experts routed to and the bytes they moved."""
    from tandem.bench.timing import summarize

    stats = summarize(np.concatenate(seconds)) if seconds else {"n": 0}
    stats.pop("samples_ms", None)  # thousands of steps: the percentiles are kept, not every sample
    if experts:
        allx = np.concatenate(experts)
        stats["routed_experts_per_layer_mean"] = [round(float(x), 3) for x in allx.mean(axis=0)]
        stats["routed_experts_per_layer_max"] = [int(x) for x in allx.max(axis=0)]
    if bytes_:
        stats["bytes_p50"] = float(np.median(np.concatenate(bytes_)))
    return stats
