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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.decoding import VERIFY, make_decode_engine, max_capacity
from tandem.errors import TandemError
from tandem.pipeline import Pipeline, per_prompt
from tandem.runtimes.base import Runtime
from tandem.sampling import SamplingParams
from tandem.tokenizer import encode_batch

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


class JacobiPipeline(Pipeline):
    """:class:`Pipeline` with greedy rows decoded by parallel (Jacobi / lookahead) decoding over
    the verify graph; sampled rows (temperature > 0) are decoded sequentially by Pipeline.
    ``block``: tokens per row per step (the verify graph's block range); ``proposer``: the
    proposal sources (see the module docstring). ``last_stats`` describes the latest call."""

    def __init__(self, runtime: Runtime, block: int = DEFAULT_BLOCK, proposer: str = DEFAULT_PROPOSER):
        super().__init__(runtime)
        if VERIFY not in runtime.specs:
            raise TandemError(f"this model has no {VERIFY} graph; parallel decoding needs it")
        limit = runtime.specs[VERIFY].dims["block"]
        if not limit.min <= block <= limit.max:
            raise TandemError(f"--block must lie in [{limit.min}, {limit.max}] (the verify graph's block range), got {block}")
        self.block = block
        self.sources = parse_proposer(proposer)
        self.pool = NgramPool()  # shared by every image this pipeline decodes
        self.last_stats = ParallelStats()
        self.stats = ParallelStats()  # every call so far

    def generate_tokens(
        self,
        prompts: Sequence[str],
        params: Sequence[SamplingParams] | SamplingParams = SamplingParams(),
        on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        params = per_prompt(prompts, params)
        if any(p.temperature != 0.0 for p in params):
            self.last_stats = ParallelStats(steps=[self.config.scene.num_tokens] * len(prompts))
            return super().generate_tokens(prompts, params, on_step)
        input_ids, lengths = encode_batch(list(prompts), self.config.reasoning.max_prompt_len)
        tokens = np.empty((len(prompts), self.config.scene.num_tokens), dtype=np.int64)
        self.last_stats = stats = ParallelStats()
        chunk = max_capacity(self.runtime)
        for start in range(0, len(prompts), chunk):
            rows = slice(start, start + chunk)
            self._decode_rows(input_ids[rows], lengths[rows], tokens[rows], stats, on_step)
        return tokens.reshape(len(prompts), *self.grid).astype(np.int32)

    def _decode_rows(self, input_ids, lengths, tokens: np.ndarray, stats: ParallelStats, on_step) -> None:
        n, total = len(lengths), tokens.shape[1]
        width, max_len = self.config.scene.grid_width, self.config.max_len
        engine = make_decode_engine(self.runtime, n)
        first = engine.prefill(range(n), input_ids[:, : int(lengths.max())], lengths)  # greedy, in the graph
        work = np.zeros((n, total), dtype=np.int64)  # confirmed tokens, then this step's guesses
        work[:, 0] = first
        count = np.ones(n, dtype=np.int64)  # confirmed tokens per row
        steps = np.ones(n, dtype=np.int64)  # model passes per row (the prefill)
        codebook = self.config.scene.codebook_size
        proposers = [Proposer(self.sources, width, total, codebook, self.pool) for _ in range(n)]
        for i in range(n):
            proposers[i].confirm(work[i], 0, 1)
        step, accepted, block_tokens = 0, [], 0
        while (count < total).any():
            active = count < total
            k = int(min(self.block, (total - count[active]).min()))  # no row's block runs past its last token
            block = np.zeros((n, k), dtype=np.int64)
            starts = np.full(n, max_len - k, dtype=np.int64)  # finished rows: anywhere harmless
            for i in np.flatnonzero(active):
                c = int(count[i])
                block[i, 0] = work[i, c - 1]
                if k > 1:
                    block[i, 1:] = proposers[i].propose(work[i], c, k - 1)
                starts[i] = lengths[i] + c - 1  # the position of token c - 1
            predicted = np.argmax(engine.verify(n, block, starts), axis=-1)  # [n, k]: tokens c .. c + k - 1
            for i in np.flatnonzero(active):
                c = int(count[i])
                kept = 1
                while kept < k and block[i, kept] == predicted[i, kept - 1]:
                    kept += 1
                kept = min(kept, total - c)
                work[i, c : c + kept] = predicted[i, :kept]
                proposers[i].draft[c + kept : c + k] = predicted[i, kept:k][: max(0, total - c - kept)]
                proposers[i].confirm(work[i], c, c + kept)
                count[i] += kept
                steps[i] += 1
                accepted.append(kept)
                block_tokens += k
            if on_step is not None:
                on_step(step)
            step += 1
        tokens[:] = work
        for each in (stats, self.stats):
            each.steps.extend(steps.tolist())
            each.accepted.extend(accepted)
            each.block_tokens += block_tokens


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
    "DECODINGS",
    "make_pipeline","DEFAULT_BLOCK", "DEFAULT_PROPOSER", "JacobiPipeline", "NgramPool", "ParallelStats", "SOURCES", "parse_proposer"]
