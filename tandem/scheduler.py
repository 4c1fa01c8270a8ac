"""In-flight (iteration-level) batching of the reasoning loop over a :class:`~tandem.decoding.DecodeEngine`.

Requests join and leave the running decode batch at every step instead of waiting for a whole
generation (Orca's iteration-level scheduling, TensorRT-LLM's in-flight batching, vLLM's continuous
batching). The engine's slots are a fixed table; occupied slots are rows ``[0, n)``. One call of
:meth:`InflightScheduler.step`:

1. evicts rows whose owner gave up (cancelled) or whose deadline passed, answering them with an
   error and filling the hole with the last row (``engine.move``);
2. admits waiting requests into the free slots: one batched prefill for all of them, and the
   first scene token of each is sampled from its logits;
3. runs one decode step over every occupied row (rows sit at different positions; positions are
   per row), samples each row's next token with its own settings and seeded generator;
4. answers the rows that have all their scene tokens at once and frees their slots.

Sampling is :func:`tandem.sampling.select_next` row by row with a generator per request, exactly as
:class:`tandem.pipeline.Pipeline` does, and the engine's rows do not depend on each other, so a
request's tokens are the same alone or amid any other traffic. A failure is contained where it can
be: a bad prompt is refused at :meth:`~InflightScheduler.submit`, a batched prefill that fails is
retried one request at a time, and an owner's callback that raises is logged, never propagated.

The scheduler has no Triton in it: the served ``reasoning`` model drives it from a loop thread
(:meth:`InflightScheduler.start`), the bench and the tests call :meth:`~InflightScheduler.step`
directly."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tandem.decoding import DecodeEngine, make_decode_engine, max_capacity
from tandem.errors import TandemError, failure_message
from tandem.runtimes.base import Runtime
from tandem.sampling import SamplingParams, select_next
from tandem.tokenizer import encode, encode_batch

log = logging.getLogger(__name__)


class QueueFullError(TandemError):
    """The scheduler's waiting queue is full: the request was refused, nothing was started."""


@dataclass
class Timing:
    """Clock readings (``time.monotonic`` by default) of one request's life in the scheduler."""

    arrival: float
    prefill_start: float | None = None
    first_step: float | None = None  # start of the first decode step the row took part in
    finished: float | None = None

    def seconds(self) -> np.ndarray:
        """[queue, time to first decode step, total] in seconds since arrival (NaN: never reached)."""
        marks = (self.prefill_start, self.first_step, self.finished)
        return np.array([np.nan if m is None else m - self.arrival for m in marks], dtype=np.float64)


@dataclass
class Outcome:
    """What the owner of a :class:`Job` receives, exactly once."""

    tokens: np.ndarray | None  # [num_tokens] int64 scene codebook ids; None on error
    error: str | None
    timing: Timing
    cancelled: bool = False  # the owner gave up (or its deadline passed); error says which

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False)
class Job:
    """One prompt to generate. ``on_done`` is called once, from the thread that runs the steps."""

    prompt: str
    params: SamplingParams
    on_done: Callable[[Outcome], None]
    is_cancelled: Callable[[], bool] | None = None  # polled before every step (e.g. Triton's request.is_cancelled)
    timeout_s: float | None = None  # from arrival; the row is evicted at the first step past it
    timing: Timing | None = None  # set by submit
    input_ids: list[int] = field(default_factory=list)  # set by submit

    @property
    def deadline(self) -> float | None:
        return None if not self.timeout_s else self.timing.arrival + self.timeout_s


@dataclass(eq=False)
class _Row:
    """A slot's occupant: the request, its sampling state and the tokens so far."""

    job: Job
    rng: np.random.Generator
    tokens: np.ndarray  # [num_tokens] int64
    count: int = 0  # tokens sampled so far
    position: int = 0  # where the next decode step writes this row's key/value


@dataclass
class SchedulerStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0
    steps: int = 0
    prefills: int = 0
    rows_stepped: int = 0  # sum over steps of rows in the step (mean batch = rows_stepped / steps)
    mixed_steps: int = 0  # steps whose rows were at different positions (requests joined mid-generation)


class InflightScheduler:
    """A slot table over ``engine`` with a bounded waiting queue (``max_waiting``; None: unbounded)."""

    def __init__(
        self,
        engine: DecodeEngine,
        num_tokens: int,
        max_prompt_len: int,
        max_waiting: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if num_tokens < 1:
            raise TandemError(f"num_tokens must be >= 1, got {num_tokens}")
        if max_waiting is not None and max_waiting < 0:
            raise TandemError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.capacity = engine.capacity
        self.num_tokens = num_tokens
        self.max_prompt_len = max_prompt_len
        self.max_waiting = max_waiting
        self.clock = clock
        self.rows: list[_Row] = []  # rows[i] occupies engine slot i
        self.waiting: collections.deque[Job] = collections.deque()
        self.stats = SchedulerStats()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def for_runtime(cls, runtime: Runtime, capacity: int | None = None, max_waiting: int | None = None, **kwargs) -> "InflightScheduler":
        """A scheduler over ``runtime``'s fastest decode engine (default: the decode graph's max batch)."""
        engine = make_decode_engine(runtime, capacity or max_capacity(runtime))
        config = runtime.config
        return cls(engine, config.scene.num_tokens, config.reasoning.max_prompt_len, max_waiting, **kwargs)

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job`` for the next step (thread-safe). Raises TandemError for a bad prompt and
        QueueFullError when ``max_waiting`` requests are already waiting; ``on_done`` is then not called."""
        job.input_ids = encode(job.prompt, self.max_prompt_len)  # refuse bad prompts before they take a slot
        with self._lock:
            if self._stopping:
                raise TandemError("the reasoning scheduler is shutting down; retry on another server")
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                self.stats.rejected += 1
                raise QueueFullError(
                    f"the reasoning stage is at capacity: {len(self.rows)} requests generating and {len(self.waiting)} "
                    f"waiting (max_queue_size {self.max_waiting}); retry later, or serve with a larger --max-queue-size "
                    "or more servers"
                )
            job.timing = Timing(arrival=self.clock())
            self.waiting.append(job)
            self.stats.submitted += 1
            self._lock.notify()
        return job

    @property
    def occupied(self) -> int:
        return len(self.rows)

    def idle(self) -> bool:
        with self._lock:
            return not self.rows and not self.waiting

    # -- one iteration --------------------------------------------------------------------------
    def step(self) -> bool:
        """Evict, admit, decode, answer (see the module docstring). Returns whether work remains.
        Only one thread may call it (the loop thread, or the caller when no loop runs)."""
        self._evict_abandoned()
        self._admit()
        if self.rows:
            self._decode()
        with self._lock:
            return bool(self.rows or self.waiting)

    def run_until_idle(self) -> None:
        while self.step():
            pass

    # -- the loop thread ----------------------------------------------------------------------------
    def start(self, name: str = "reasoning-scheduler") -> "InflightScheduler":
        if self._thread is not None:
            raise TandemError("the scheduler loop is already running")
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or generating are answered with an error."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            pending = [row.job for row in self.rows] + list(self.waiting)
            self.rows, self.waiting = [], collections.deque()
        for job in pending:
            self._answer(job, None, "the server is shutting down; the generation was not finished", cancelled=True)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.rows and not self.waiting:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # an engine failure: answer what it touched, keep the loop alive
                log.exception("reasoning scheduler step failed")
                self._fail_all_rows(failure_message("generation", exc))

    # -- internals ----------------------------------------------------------------------------------
    def _answer(self, job: Job, tokens: np.ndarray | None, error: str | None, cancelled: bool = False) -> None:
        job.timing.finished = self.clock()
        if error is None:
            self.stats.completed += 1
        elif not cancelled:
            self.stats.failed += 1
        try:
            job.on_done(Outcome(tokens, error, job.timing, cancelled))
        except Exception:  # the owner's problem (e.g. its client went away); never the other rows'
            log.exception("answering a reasoning request failed")

    def _abandoned(self, job: Job, now: float) -> str | None:
        """Why ``job`` should stop now (cancelled or past its deadline), or None."""
        try:
            if job.is_cancelled is not None and job.is_cancelled():
                self.stats.cancelled += 1
                return "the request was cancelled by its client"
        except Exception:
            log.exception("checking a request for cancellation failed; treating it as cancelled")
            self.stats.cancelled += 1
            return "the request was cancelled (its cancellation state could not be read)"
        deadline = job.deadline
        if deadline is not None and now >= deadline:
            self.stats.timed_out += 1
            return f"the request timed out after {job.timeout_s:.3f} s (its timeout); retry with a longer timeout"
        return None

    def _free(self, index: int) -> None:
        """Free slot ``index`` by moving the last row into it (slots stay compacted)."""
        last = len(self.rows) - 1
        if index != last:
            self.engine.move(last, index)
            self.rows[index] = self.rows[last]
        self.rows.pop()

    def _evict_abandoned(self) -> None:
        now = self.clock()
        for index in reversed(range(len(self.rows))):  # rows above index were checked already
            row = self.rows[index]
            reason = self._abandoned(row.job, now)
            if reason is not None:
                self._free(index)
                self._answer(row.job, None, f"{reason} ({row.count} of {self.num_tokens} scene tokens generated)", cancelled=True)

    def _take_arrivals(self) -> list[Job]:
        now = self.clock()
        taken, dropped = [], []
        with self._lock:
            while self.waiting and len(self.rows) + len(taken) < self.capacity:
                job = self.waiting.popleft()
                reason = self._abandoned(job, now)
                (dropped.append((job, reason)) if reason else taken.append(job))
        for job, reason in dropped:
            self._answer(job, None, f"{reason} (before it started)", cancelled=True)
        return taken

    def _admit(self) -> None:
        jobs = self._take_arrivals()
        if not jobs:
            return
        try:
            self._prefill(jobs)
        except Exception as exc:
            if len(jobs) == 1:
                self._answer(jobs[0], None, failure_message("prefill", exc))
                return
            log.warning("a batched prefill of %d requests failed (%s); admitting them one at a time", len(jobs), exc)
            for job in jobs:
                try:
                    self._prefill([job])
                except Exception as single:
                    self._answer(job, None, failure_message("prefill", single))

    def _prefill(self, jobs: list[Job]) -> None:
        start = self.clock()
        input_ids, lengths = encode_batch([job.prompt for job in jobs], self.max_prompt_len)
        first = len(self.rows)
        # Trim the padding shared by every row, as Pipeline does: positions past the longest prompt are never read.
        logits = self.engine.prefill(range(first, first + len(jobs)), input_ids[:, : int(lengths.max())], lengths)
        self.stats.prefills += 1
        for i, job in enumerate(jobs):
            job.timing.prefill_start = start
            row = _Row(job, job.params.generator(), np.empty(self.num_tokens, dtype=np.int64), position=int(lengths[i]))
            row.tokens[0] = select_next(logits[i : i + 1], [job.params], [row.rng])[0]
            row.count = 1
            self.rows.append(row)
        self._retire_finished()

    def _decode(self) -> None:
        n = len(self.rows)
        token_ids = np.array([row.tokens[row.count - 1] for row in self.rows], dtype=np.int64)
        positions = np.array([row.position for row in self.rows], dtype=np.int64)
        start = self.clock()
        for row in self.rows:
            if row.job.timing.first_step is None:
                row.job.timing.first_step = start
        logits = self.engine.step(n, token_ids, positions)
        self.stats.steps += 1
        self.stats.rows_stepped += n
        self.stats.mixed_steps += int(len(set(r.count for r in self.rows)) > 1)
        for i, row in enumerate(self.rows):
            row.tokens[row.count] = select_next(logits[i : i + 1], [row.job.params], [row.rng])[0]
            row.count += 1
            row.position += 1
        self._retire_finished()

    def _retire_finished(self) -> None:
        for index in reversed(range(len(self.rows))):
            row = self.rows[index]
            if row.count >= self.num_tokens:
                self._free(index)
                self._answer(row.job, row.tokens, None)

    def _fail_all_rows(self, message: str) -> None:
        rows, self.rows = self.rows, []
        for row in rows:
            self._answer(row.job, None, message)

