"""Text -> scene tokens -> image over any runtime.

The reasoning stage is the one decode loop (:mod:`tandem.decoding`, planned by
:class:`tandem.scheduler.InflightScheduler`): ``generate_tokens`` submits every prompt to a
scheduler over the runtime's decode engine and runs it to completion, so prompts are prefilled
together into the engine's slots (more prompts than slots join as slots free up) and each decode
step writes only its new rows into the engine's KV cache (no recomputation of the prefix, no copy of
the cache). In-process and served generations are the same code, token for token.

A pipeline keeps the schedulers it made (one per slot count, the last few used) for its next
calls: the decode engine's buffers, cache block and IO bindings are made once, not per generation
(about 0.6% of a batch-1 small generation was that set-up, on memory touched for the first time).
A call made while another thread's call holds them gets a scheduler of its own; a call that fails
drops the one it used (its queue may hold the prompts of that call)."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tandem.decoding import max_capacity
from tandem.errors import TandemError
from tandem.runtimes.base import Runtime
from tandem.sampling import SamplingParams
from tandem.scheduler import InflightScheduler, Job


@dataclass
class Generation:
    tokens: np.ndarray  # [h, w] int32 scene codebook ids
    image: np.ndarray  # [H, W, 3] uint8


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8."""
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def _keep(outcome) -> None:
    """Pipeline's jobs keep their outcome on the job (``Job.outcome``); nothing else to do."""


def per_prompt(prompts: Sequence[str], params: Sequence[SamplingParams] | SamplingParams) -> list[SamplingParams]:
    """One sampling setting per prompt (one setting given: the same for every prompt)."""
    params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise TandemError(f"{len(prompts)} prompts but {len(params)} sampling settings")
    return params


KEPT_SCHEDULERS = 4  # slot counts whose scheduler a pipeline keeps between calls (batch 1 and 8 alternate in the bench)


class Pipeline:
    keeps_schedulers = True  # a subclass whose scheduler() starts per-call state sets this False

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.config = runtime.config
        self._kept: OrderedDict[int, InflightScheduler] = OrderedDict()  # slot count -> idle scheduler, most recent last
        self._keeping = threading.Lock()  # held by the call using the kept schedulers

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.scene.grid_height, self.config.scene.grid_width

    def generate_tokens(
        self,
        prompts: Sequence[str],
        params: Sequence[SamplingParams] | SamplingParams = SamplingParams(),
        on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Prompts -> scene tokens [B, h, w] int32. ``on_step(i)`` is called once the rows being
        generated have their token ``i`` (0: sampled from the prefill, before the first decode step)."""
        params = per_prompt(prompts, params)
        if not prompts:
            raise TandemError("no prompts given")
        with self._scheduler_for_call(min(len(prompts), max_capacity(self.runtime))) as scheduler:
            # a step's rows all have the same count: more prompts than slots join in waves
            scheduler.runner.on_sampled = (lambda rows: on_step(rows[0].count - 1)) if on_step is not None else None
            jobs = [Job(prompt, p, on_done=_keep) for prompt, p in zip(prompts, params)]
            for job in jobs:  # every prompt is checked (encoded) before any is generated
                scheduler.submit(job)
            scheduler.run_until_idle()
            scheduler.runner.on_sampled = None
        for job in jobs:
            if not job.outcome.ok:
                raise job.outcome.exception or TandemError(job.outcome.error)
        tokens = np.stack([job.outcome.tokens for job in jobs])
        return tokens.reshape(len(prompts), *self.grid).astype(np.int32)

    @contextlib.contextmanager
    def _scheduler_for_call(self, capacity: int) -> Iterator[InflightScheduler]:
        """A kept scheduler of ``capacity`` slots (made if none is kept), kept again after a call that
        ran to its end with nothing left queued; a fresh one, never kept, while another call holds them."""
        if not self.keeps_schedulers or not self._keeping.acquire(blocking=False):
            yield self.scheduler(capacity)
            return
        try:
            scheduler = self._kept.pop(capacity, None) or self.scheduler(capacity)
            yield scheduler  # an exception here leaves it out of the kept ones
            if not scheduler.runner.rows and not scheduler.waiting:
                self._kept[capacity] = scheduler
                while len(self._kept) > KEPT_SCHEDULERS:
                    self._kept.popitem(last=False)
        finally:
            self._keeping.release()

    def scheduler(self, capacity: int | None = None) -> InflightScheduler:
        """A scheduler (no loop thread) over a new decode engine of ``capacity`` slots of this runtime."""
        return InflightScheduler.for_runtime(self.runtime, capacity)

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """[h, w], [h*w], [B, h, w] or [B, h*w] codebook indices -> [B, h, w] int64 (tandem.scene_tokens)."""
        from tandem.scene_tokens import token_batch

        return token_batch(tokens, self.grid, self.config.scene.codebook_size)

    def render(self, tokens: np.ndarray) -> np.ndarray:
        """Scene tokens ([h, w], [h*w], [B, h, w] or [B, h*w]) -> images [B, H, W, 3] uint8, one per grid."""
        tokens = self.check_tokens(tokens)
        from tandem.stages import graph_specs

        step = graph_specs(self.config)["refinement"].dims["batch"].max  # the graph's batch range: larger batches in chunks
        chunks = [tokens[i : i + step] for i in range(0, len(tokens), step)]
        return np.concatenate([to_uint8(self.runtime.run("refinement", {"scene_tokens": c})["image"]) for c in chunks])

    def generate(self, prompt: str, seed: int = 0, temperature: float = 0.0, top_k: int = 0) -> Generation:
        params = SamplingParams(seed=seed, temperature=temperature, top_k=top_k)
        tokens = self.generate_tokens([prompt], params)
        return Generation(tokens=tokens[0], image=self.render(tokens)[0])
