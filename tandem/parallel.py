"""Greedy parallel (Jacobi / lookahead) decoding: fewer sequential steps, the same tokens.

Each step proposes up to k - 1 future scene tokens per row, runs them with the row's last
confirmed token through the verify graph in one step (:meth:`tandem.decoding.CacheDecodeEngine.verify`)
and keeps the longest prefix of the proposal the model confirms (its greedy argmax equals the
guess) plus the model's own next token after it. Every kept token is the argmax of logits computed
over exactly the confirmed tokens before it, as sequential greedy decoding computes them, so the
tokens are those of :class:`tandem.pipeline.Pipeline`'s greedy decoding (up to floating-point
ties between two different graphs' logits; tests check identity on the trained checkpoint).

Cache rows written for rejected guesses are never rolled back explicitly: the verify graph reads a
row's cache only below its block's start, and the next block starts right after the last kept
token, so every rejected row is overwritten before anything reads it.

Proposals (``proposer``), tried in order for each future grid cell, each guess feeding the next:

- ``pool``: grid n-grams (the token that most often followed the same (above, left) neighbours,
  backing off to above alone, then left alone) learned from every token this pipeline has
  confirmed, in this image and earlier ones (lookahead decoding's n-gram pool over the 2D grid);
- ``context``: the same, learned from this image alone;
- ``grid``: the parallelogram rule above + (left - above-left): exact wherever tokens change by the
  same step down each column (the small config's position-coded background);
- ``jacobi``: what the previous step's logits predicted for the cell (Jacobi iteration);
- ``above``: the token in the row above (position p - grid_width; the scene grid is row-major);
- the token to the left when no source has a guess.

``proposer`` names the sources used, e.g. ``"pool,grid,jacobi"`` (the default) or ``"above"``.
Proposals only decide how many steps a row takes, never its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.decoding import VERIFY, ModelRunner
from tandem.errors import TandemError
from tandem.pipeline import Pipeline
from tandem.runtimes.base import Runtime
from tandem.sampling import SamplingParams
from tandem.scheduler import InflightScheduler
from tandem.stages import GraphSpec

SOURCES = ("context", "pool", "grid", "jacobi", "above")
DEFAULT_PROPOSER = "pool,grid,jacobi"
DEFAULT_BLOCK = 16
POOL_LIMIT = 1 << 20  # contexts the shared n-gram pool remembers (then it stops learning new ones)


@dataclass
class ParallelStats:
    """Sequential model passes per image (prefill included; sequential decoding takes num_tokens)."""

    steps: list[int] = field(default_factory=list)  # per image, in prompt order
    accepted: list[int] = field(default_factory=list)  # tokens kept per verify step (all rows, all steps)
    block_tokens: int = 0  # tokens run through verify steps (all rows), rejected guesses included

    @property
    def mean_steps(self) -> float:
        return float(np.mean(self.steps)) if self.steps else 0.0


def parse_proposer(proposer: str) -> tuple[str, ...]:
    sources = tuple(s.strip() for s in proposer.split(",") if s.strip())
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise TandemError(f"unknown proposal sources {unknown or [proposer]}; choose among {list(SOURCES)}, comma-separated")
    return sources


class NgramPool:
    """Grid n-grams: which token followed a context ((above, left), then above alone, then left
    alone), by count. One per image (``context``) and one shared by every image a pipeline decodes
    (``pool``: confirmed tokens only, so it never changes a token, only how many steps it takes)."""

    def __init__(self, limit: int = POOL_LIMIT):
        self.limit = limit
        self.counts: dict[tuple, dict[int, int]] = {}
        self.best: dict[tuple, int] = {}

    def add(self, keys: tuple[tuple, ...], token: int) -> None:
        for key in keys:
            counts = self.counts.get(key)
            if counts is None:
                if len(self.counts) >= self.limit:
                    continue
                counts = self.counts[key] = {}
            counts[token] = counts.get(token, 0) + 1
            best = self.best.get(key)
            if best is None or counts[token] > counts[best]:
                self.best[key] = token

    def lookup(self, keys: tuple[tuple, ...]) -> int:
        for key in keys:
            token = self.best.get(key)
            if token is not None:
                return token
        return -1


class Proposer:
    """Guesses for one image's future cells from what it has confirmed so far (host-side, numpy)."""

    def __init__(self, sources: tuple[str, ...], grid_width: int, num_tokens: int, codebook_size: int, pool: NgramPool | None = None):
        self.sources, self.width, self.num_tokens, self.codebook = sources, grid_width, num_tokens, codebook_size
        self.context = NgramPool()
        self.pool = pool if pool is not None else NgramPool()
        self.draft = np.full(num_tokens, -1, dtype=np.int64)  # the last step's predictions (jacobi)

    def _keys(self, tokens: np.ndarray, index: int) -> tuple[tuple, ...]:
        above = int(tokens[index - self.width]) if index >= self.width else -1
        left = int(tokens[index - 1]) if index % self.width else -1
        return (above, left), (above, None), (None, left)

    def confirm(self, tokens: np.ndarray, start: int, stop: int) -> None:
        """Tokens [start, stop) were confirmed: learn their contexts."""
        for i in range(start, stop):
            keys = self._keys(tokens, i)
            if "context" in self.sources:
                self.context.add(keys, int(tokens[i]))
            if "pool" in self.sources:
                self.pool.add(keys, int(tokens[i]))

    def _grid(self, tokens: np.ndarray, i: int) -> int:
        """The parallelogram rule: the step from above-left to left, applied from above (a grid
        whose tokens vary smoothly down columns and along rows, e.g. position-coded backgrounds)."""
        if i < self.width + 1 or i % self.width == 0:
            return -1
        guess = int(tokens[i - self.width]) + int(tokens[i - 1]) - int(tokens[i - self.width - 1])
        return guess if 0 <= guess < self.codebook else -1

    def propose(self, tokens: np.ndarray, count: int, length: int) -> np.ndarray:
        """Guesses for cells [count, count + length) given confirmed tokens[:count]. ``tokens`` is
        scratch beyond ``count``: guesses are written there so later guesses can build on them."""
        for i in range(count, count + length):
            guess = -1
            for source in self.sources:
                if source == "context":
                    guess = self.context.lookup(self._keys(tokens, i))
                elif source == "pool":
                    guess = self.pool.lookup(self._keys(tokens, i))
                elif source == "grid":
                    guess = self._grid(tokens, i)
                elif source == "jacobi":
                    guess = int(self.draft[i])
                elif source == "above" and i >= self.width:
                    guess = int(tokens[i - self.width])
                if guess >= 0:
                    break
            tokens[i] = guess if guess >= 0 else tokens[i - 1]
        return tokens[count : count + length].copy()


class JacobiRunner(ModelRunner):
    """A :class:`~tandem.decoding.ModelRunner` whose decode step, while every row is greedy, runs the
    verify graph: each row feeds its last token and up to ``block - 1`` proposed ones from its
    position, keeps the longest prefix the model confirms plus the model's own next token, and so
    advances by its own number of tokens. A step with a sampled row (temperature > 0) runs the
    one-token decode step for every row: sampled rows stay exactly sequential. The scheduler plans
    as for one token per step (rows join and leave at any step); only the step differs.

    ``pool``: the n-gram pool shared by every row this runner decodes (confirmed tokens only);
    ``stats`` (optional) records each admitted row's model passes, in admission order."""

    def __init__(self, engine, block: int, sources: tuple[str, ...], pool: NgramPool, grid_width: int, codebook_size: int,
                 stats: ParallelStats | None = None, **kwargs):
        super().__init__(engine, **kwargs)
        self.block, self.sources, self.pool = block, sources, pool
        self.width, self.codebook = grid_width, codebook_size
        self.stats = stats
        self._proposers: dict[int, Proposer] = {}  # id(row) -> its proposer, while the row occupies a slot
        self._learnt: dict[int, int] = {}  # id(row) -> tokens its proposer has confirmed
        self._passes: dict[int, int] = {}  # id(row) -> its index in stats.steps

    def _prefill(self, rows, out) -> None:
        super()._prefill(rows, out)  # raises when not admitted: nothing to track then
        for row in rows:
            self._proposers[id(row)] = Proposer(self.sources, self.width, row.num_tokens, self.codebook, self.pool)
            self._learnt[id(row)] = 0
            if self.stats is not None:
                self._passes[id(row)] = len(self.stats.steps)
                self.stats.steps.append(1)

    def _release(self, row) -> None:
        super()._release(row)
        if row not in self.rows:
            for table in (self._proposers, self._learnt, self._passes):
                table.pop(id(row), None)

    def abort(self):
        rows = super().abort()
        for table in (self._proposers, self._learnt, self._passes):
            table.clear()
        return rows

    def _proposer(self, row) -> Proposer:
        """The row's proposer, having learnt every token the row has confirmed."""
        proposer = self._proposers[id(row)]
        learnt = self._learnt[id(row)]
        if learnt < row.count:
            proposer.confirm(row.tokens, learnt, row.count)
            self._learnt[id(row)] = row.count
        return proposer

    def _count_pass(self, rows) -> None:
        if self.stats is not None:
            for row in rows:
                self.stats.steps[self._passes[id(row)]] += 1

    def _decode(self, out) -> None:
        rows = self.rows
        k = min(self.block, min(row.num_tokens - row.count for row in rows))  # no row's block runs past its last token
        if k < 2 or any(row.params.temperature != 0.0 for row in rows):
            self._count_pass(rows)
            super()._decode(out)
            return
        n = len(rows)
        self._step_start = self.clock()
        if self._changed:
            self._refresh()
        out.stepped, out.mixed = n, len({row.count for row in rows}) > 1
        block = np.empty((n, k), dtype=np.int64)
        proposers = [self._proposer(row) for row in rows]
        for i, (row, proposer) in enumerate(zip(rows, proposers)):
            block[i, 0] = row.tokens[row.count - 1]
            block[i, 1:] = proposer.propose(row.tokens, row.count, k - 1)
        predicted = np.argmax(self.engine.verify(n, block, self.positions[:n].copy()), axis=-1)  # [n, k]: tokens c .. c + k - 1
        self._count_pass(rows)
        for i, (row, proposer) in enumerate(zip(rows, proposers)):
            c, kept = row.count, 1
            while kept < k and block[i, kept] == predicted[i, kept - 1]:
                kept += 1
            row.accept(predicted[i, :kept])
            kept = row.count - c
            proposer.draft[c + kept : c + k] = predicted[i, kept:k][: max(0, row.num_tokens - c - kept)]
            self.positions[i] = row.position
            if self.stats is not None:
                self.stats.accepted.append(kept)
                self.stats.block_tokens += k
        self._changed = True  # the rows moved by different numbers of tokens: the next step re-reads them
        if self.on_sampled is not None:
            self.on_sampled(list(rows))


def check_block(specs: Mapping[str, GraphSpec], block: int) -> None:
    """The model's graphs (``specs``) must have the verify graph and ``block`` must lie in its block
    range (refused with the range when not)."""
    if VERIFY not in specs:
        raise TandemError(f"this model has no {VERIFY} graph; parallel decoding needs it (export again with this tandem)")
    limit = specs[VERIFY].dims["block"]
    if not limit.min <= block <= limit.max:
        raise TandemError(f"--block must lie in [{limit.min}, {limit.max}] (the verify graph's block range), got {block}")


def jacobi_runner(runtime: Runtime, block: int = DEFAULT_BLOCK, proposer: str = DEFAULT_PROPOSER,
                  pool: NgramPool | None = None, stats: ParallelStats | None = None) -> Callable[..., JacobiRunner]:
    """What :meth:`InflightScheduler.for_runtime` takes as ``runner`` to step with :class:`JacobiRunner`
    over ``runtime``'s verify graph (checked here: the graph and ``block``; ``proposer`` parsed)."""
    check_block(runtime.specs, block)
    sources, pool, scene = parse_proposer(proposer), pool if pool is not None else NgramPool(), runtime.config.scene
    return lambda engine: JacobiRunner(engine, block, sources, pool, scene.grid_width, scene.codebook_size, stats)


class JacobiPipeline(Pipeline):
    """:class:`Pipeline` whose scheduler steps with a :class:`JacobiRunner`: greedy rows decoded by
    parallel (Jacobi / lookahead) decoding over the verify graph, sampled rows sequentially, in the
    same decode loop as every other generation. ``block``: tokens per row per step (the verify
    graph's block range); ``proposer``: the proposal sources (see the module docstring).
    ``last_stats`` describes the latest call, ``stats`` every call so far."""

    keeps_schedulers = False  # each call's runner counts into that call's last_stats

    def __init__(self, runtime: Runtime, block: int = DEFAULT_BLOCK, proposer: str = DEFAULT_PROPOSER):
        super().__init__(runtime)
        check_block(runtime.specs, block)
        self.block, self.proposer = block, proposer
        self.sources = parse_proposer(proposer)
        self.pool = NgramPool()  # shared by every image this pipeline decodes
        self.last_stats = ParallelStats()
        self.stats = ParallelStats()  # every call so far

    def scheduler(self, capacity: int | None = None) -> InflightScheduler:
        self.last_stats = ParallelStats()
        runner = jacobi_runner(self.runtime, self.block, self.proposer, self.pool, self.last_stats)
        return InflightScheduler.for_runtime(self.runtime, capacity, runner=runner)

    def generate_tokens(
        self,
        prompts: Sequence[str],
        params: Sequence[SamplingParams] | SamplingParams = SamplingParams(),
        on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        tokens = super().generate_tokens(prompts, params, on_step)
        self.stats.steps.extend(self.last_stats.steps)
        self.stats.accepted.extend(self.last_stats.accepted)
        self.stats.block_tokens += self.last_stats.block_tokens
        return tokens


DECODINGS = ("sequential", "jacobi")


def make_pipeline(runtime: Runtime, decoding: str = "sequential", block: int = DEFAULT_BLOCK, proposer: str = DEFAULT_PROPOSER) -> Pipeline:
    """The in-process pipeline for a decoding mode: ``sequential`` (one token per step, the
    default) or ``jacobi`` (greedy parallel decoding; sampled requests stay sequential)."""
    if decoding == "sequential":
        return Pipeline(runtime)
    if decoding == "jacobi":
        return JacobiPipeline(runtime, block=block, proposer=proposer)
    raise TandemError(f"decoding must be one of {list(DECODINGS)}, not {decoding!r}")


__all__ = [
    "DECODINGS", "DEFAULT_BLOCK", "DEFAULT_PROPOSER", "JacobiPipeline", "JacobiRunner", "NgramPool", "ParallelStats", "SOURCES",
    "check_block", "jacobi_runner", "make_pipeline", "parse_proposer",
]
