"""In-flight (iteration-level) batching of the reasoning loop: the planner of the one decode loop.

Requests join and leave the running decode batch at every step instead of waiting for a whole
generation (Orca's iteration-level scheduling, TensorRT-LLM's in-flight batching, vLLM's continuous
batching). As in vLLM v1 the scheduler only plans; a :class:`~tandem.decoding.ModelRunner` over the
engine's fixed table of slots executes. One call of :meth:`InflightScheduler.step`:

1. plans the rows that leave: those whose owner gave up (cancelled) or whose deadline passed,
   answered at once with an error;
2. plans the arrivals that join: as many waiting requests as there are free slots (requests that
   gave up while waiting are answered and dropped);
3. has the runner execute the plan (:class:`~tandem.decoding.StepPlan`): free the leaving rows'
   slots, one batched prefill of the arrivals (sampling their first tokens), one decode step over
   every occupied row (rows sit at different positions; positions are per row), each row's next
   token sampled with its own settings and seeded generator;
4. answers the rows that have all their scene tokens and the arrivals whose prefill failed.

Sampling is the runner's, the same for :class:`tandem.pipeline.Pipeline` (which submits all its rows
to a scheduler and runs it to completion), and the engine's rows do not depend on each other, so a
request's tokens are the same alone or amid any other traffic. A failure is contained where it can
be: a bad prompt is refused at :meth:`~InflightScheduler.submit`, a batched prefill that fails is
retried one request at a time (by the runner), and an owner's callback that raises is logged, never
propagated.

The scheduler has no Triton in it: the served ``reasoning`` model drives it from a loop thread
(:meth:`InflightScheduler.start`); the pipeline, the bench and the tests call
:meth:`~InflightScheduler.step` directly."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tandem.decoding import DecodeEngine, ModelRunner, Row, StepOutput, StepPlan, Timing, make_decode_engine, max_capacity
from tandem.errors import TandemError, failure_message
from tandem.runtimes.base import Runtime
from tandem.sampling import SamplingParams
from tandem.tokenizer import encode

log = logging.getLogger(__name__)


WAVE_GAP_S = 0.002  # a wave is still arriving while its requests come less than this far apart


def wait_for_wave(condition: threading.Condition, count: Callable[[], int], want: int, window_s: float,
                  stop: Callable[[], bool], gap_s: float = WAVE_GAP_S) -> None:
    """With ``condition`` held (and notified on every arrival): wait until ``count()`` reaches ``want``,
    nothing more has arrived for ``gap_s``, ``window_s`` has passed since the call, or ``stop()``.
    A self-batching stage calls it after the first arrival of a wave (a closed loop of clients sends
    its next requests only as the last ones' answers come back, a few hundred microseconds apart
    through each hop) so the wave runs as one batch."""
    now = time.monotonic()
    end, quiet_until, seen = now + window_s, now + gap_s, count()
    while not stop() and seen < want:
        left = min(end, quiet_until) - time.monotonic()
        if left <= 0:
            return
        condition.wait(left)
        if (n := count()) > seen:
            seen, quiet_until = n, time.monotonic() + gap_s


NO_CHANGE = StepPlan()  # the plan of a step no row leaves or joins (read, never changed)


class QueueFullError(TandemError):
    """The scheduler's waiting queue is full: the request was refused, nothing was started."""


@dataclass
class Outcome:
    """What the owner of a :class:`Job` receives, exactly once."""

    tokens: np.ndarray | None  # [num_tokens] int64 scene codebook ids; None on error
    error: str | None
    timing: Timing
    cancelled: bool = False  # the owner gave up (or its deadline passed); error says which
    retryable: bool = False  # refused before it started for want of capacity (waited past the queue timeout)
    exception: BaseException | None = field(default=None, repr=False)  # what failed, when something raised

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
    outcome: Outcome | None = field(default=None, repr=False)  # set when answered (exactly once)

    @property
    def deadline(self) -> float | None:
        return None if not self.timeout_s else self.timing.arrival + self.timeout_s


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
    """Plans steps over a :class:`~tandem.decoding.ModelRunner` of ``engine``'s slots, with a
    bounded waiting queue (``max_waiting``; None: unbounded)."""

    def __init__(
        self,
        engine: DecodeEngine,
        num_tokens: int,
        max_prompt_len: int,
        max_waiting: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_wait_s: float | None = None,
        before_plan: Callable[[], None] | None = None,
        admission_window_s: float = 0.0,
        wave_gap_s: float = WAVE_GAP_S,
        check_interval_s: float = 0.0,
        runner: ModelRunner | None = None,
    ):
        if num_tokens < 1:
            raise TandemError(f"num_tokens must be >= 1, got {num_tokens}")
        if max_waiting is not None and max_waiting < 0:
            raise TandemError(f"max_waiting must be >= 0, got {max_waiting}")
        if not 0 <= admission_window_s <= 60 or not 0 < wave_gap_s <= 60:
            raise TandemError(f"admission_window_s must be in [0, 60] s and wave_gap_s in (0, 60] s, got {admission_window_s}, {wave_gap_s}")
        self.engine = engine
        # the one step implementation (tandem.decoding); a multi-token one (tandem.parallel) is a ModelRunner too
        self.runner = runner if runner is not None else ModelRunner(engine, clock)
        self.capacity = engine.capacity
        self.num_tokens = num_tokens
        self.max_prompt_len = max_prompt_len
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s  # a request still waiting for a slot this long is refused (None: no limit)
        self.before_plan = before_plan  # called at the start of every step, before any cancellation check
        # The loop thread, idle after a busy period that had several rows, waits up to this long after an
        # arrival for the rest of a wave (as many as that period's peak, while they keep coming: see
        # wait_for_wave) so they share one prefill and finish at the same step.
        self.admission_window_s = admission_window_s
        self.wave_gap_s = wave_gap_s
        # Running rows are checked for cancellation and deadlines (and before_plan is called) at most this
        # often: every step when 0. A served batch-1 step takes about half a millisecond, and the checks of
        # every row at every step cost a few percent of it.
        self.check_interval_s = check_interval_s
        self._checked_at = -float("inf")
        # The running jobs that can be abandoned (a cancellation hook or a timeout): with none (the
        # pipeline's jobs), a step checks nothing.
        self._watched: set[Job] = set()
        self._peak = 0  # the most rows occupied since the loop was last idle
        self._last_peak = 0  # the previous busy period's peak
        self.clock = clock
        self.waiting: collections.deque[Job] = collections.deque()
        self.stats = SchedulerStats()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def for_runtime(
        cls, runtime: Runtime, capacity: int | None = None, max_waiting: int | None = None,
        runner: Callable[[DecodeEngine], ModelRunner] | None = None, **kwargs,
    ) -> "InflightScheduler":
        """A scheduler over ``runtime``'s fastest decode engine (default: the decode graph's max batch);
        ``runner`` builds the step implementation over that engine (default: a :class:`ModelRunner`)."""
        engine = make_decode_engine(runtime, capacity or max_capacity(runtime))
        config = runtime.config
        return cls(engine, config.scene.num_tokens, config.reasoning.max_prompt_len, max_waiting,
                   runner=runner(engine) if runner is not None else None, **kwargs)

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
                    f"the reasoning stage is at capacity: {self.occupied} requests generating and {len(self.waiting)} "
                    f"waiting (max_queue_size {self.max_waiting}); retry later, or serve with a larger --max-queue-size "
                    "or more servers"
                )
            job.timing = Timing(arrival=self.clock())
            self.waiting.append(job)
            self.stats.submitted += 1
            self._lock.notify()
        return job

    @property
    def rows(self) -> list[Row]:
        """The occupied slots' rows (``rows[i]`` in slot ``i``); each row's ``owner`` is its Job."""
        return self.runner.rows

    @property
    def occupied(self) -> int:
        return len(self.runner.rows)

    def idle(self) -> bool:
        with self._lock:
            return not self.runner.rows and not self.waiting

    # -- one iteration --------------------------------------------------------------------------
    def step(self) -> bool:
        """Plan (evict, admit), execute, answer (see the module docstring). Returns whether work
        remains. Only one thread may call it (the loop thread, or the caller when no loop runs)."""
        runner = self.runner
        if runner.rows and not self.waiting and not self._watched and self.before_plan is None:
            # The steady state of a decode loop (a pipeline's rows): nothing can be evicted, nothing
            # waits to join, so the plan is the empty one (never changed, made once): one decode step.
            out = StepOutput()
            try:
                runner.execute(NO_CHANGE, out)
            finally:
                self._settle(out)
            if runner.rows:  # only this thread changes the rows
                return True
            with self._lock:
                return bool(self.waiting)
        now = time.monotonic()
        check = now - self._checked_at >= self.check_interval_s or not self.runner.rows
        if check:
            self._checked_at = now
            if self.before_plan is not None:
                try:
                    self.before_plan()
                except Exception:  # e.g. the cancel folder went away: the checks decide with what they have
                    log.exception("the scheduler's before_plan hook failed")
        plan = StepPlan(leave=self._evict_abandoned() if check else [])
        plan.join = self._take_arrivals(self.runner.free + len(plan.leave))
        if plan.leave or plan.join or self.runner.rows:
            out = StepOutput()
            try:
                self.runner.execute(plan, out)
            finally:  # what the step did before a failure is answered too; the loop fails the rest
                self._settle(out)
        with self._lock:
            return bool(self.runner.rows or self.waiting)

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
            pending = [row.owner for row in self.runner.abort()] + list(self.waiting)
            self.waiting = collections.deque()
        for job in pending:
            self._answer(job, None, "the server is shutting down; the generation was not finished", cancelled=True)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.runner.rows and not self.waiting:
                    self._lock.wait()
                if self._stopping:
                    return
                if not self.runner.rows:
                    self._admission_window()
            try:
                self.step()
            except Exception as exc:  # an engine failure: answer what it touched, keep the loop alive
                log.exception("reasoning scheduler step failed")
                self._fail_all_rows(failure_message("generation", exc), exc)

    def _admission_window(self) -> None:
        """Called with the lock held when the loop is idle and something arrived: after a busy period
        with company (a closed loop of clients sends its next wave only as the last one's answers come
        back), wait up to ``admission_window_s`` for as many arrivals as that period's peak (see
        :func:`wait_for_wave`), so a wave starts with one batched prefill and its rows finish at the
        same step. A lone client on a quiet server (peak 1) never waits."""
        if self._peak:
            self._last_peak, self._peak = self._peak, 0
        want = min(self._last_peak, self.capacity)
        if self.admission_window_s and want > 1:
            wait_for_wave(self._lock, lambda: len(self.waiting), want, self.admission_window_s, lambda: self._stopping,
                          self.wave_gap_s)

    # -- internals ----------------------------------------------------------------------------------
    def _answer(
        self, job: Job, tokens: np.ndarray | None, error: str | None, cancelled: bool = False, exception: BaseException | None = None,
        retryable: bool = False,
    ) -> None:
        if job.outcome is not None:
            return  # answered already (e.g. evicted, then the step failed before its slot was freed)
        job.timing.finished = self.clock()
        if error is None:
            self.stats.completed += 1
        elif not cancelled:
            self.stats.failed += 1
        self._watched.discard(job)
        job.outcome = Outcome(tokens, error, job.timing, cancelled=cancelled, exception=exception, retryable=retryable)
        try:
            job.on_done(job.outcome)
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

    def _waited_too_long(self, job: Job, now: float) -> str | None:
        if self.max_wait_s is None or now - job.timing.arrival < self.max_wait_s:
            return None
        self.stats.timed_out += 1
        return (f"the request waited {now - job.timing.arrival:.1f} s for a slot (the server's queue timeout is "
                f"{self.max_wait_s:g} s); retry later, or serve with more slots or servers")

    def _evict_abandoned(self) -> list[Row]:
        """The occupied rows to drop this step, answered now (their slots are freed by the runner)."""
        if not self._watched:
            return []
        now = self.clock()
        leaving = []
        for row in reversed(self.runner.rows):
            reason = self._abandoned(row.owner, now)
            if reason is not None:
                leaving.append(row)
                self._answer(row.owner, None, f"{reason} ({row.count} of {self.num_tokens} scene tokens generated)", cancelled=True)
        return leaving

    def _take_arrivals(self, free: int) -> list[Row]:
        """Up to ``free`` waiting requests as new rows; those that gave up while waiting are answered."""
        if not self.waiting:  # the steady state of a decode loop: nothing to take, no lock, no clock
            return []  # (a request queued meanwhile is taken next step)
        now = self.clock()
        taken, dropped = [], []  # dropped: (job, reason, retryable)
        with self._lock:
            while self.waiting and len(taken) < free:
                job = self.waiting.popleft()
                if reason := self._abandoned(job, now):
                    dropped.append((job, reason, False))
                elif reason := self._waited_too_long(job, now):
                    dropped.append((job, reason, True))
                else:
                    taken.append(job)
                    if job.is_cancelled is not None or job.timeout_s:
                        self._watched.add(job)
            while self.waiting and (reason := self._waited_too_long(self.waiting[0], now)):  # no slot, and waited too long
                dropped.append((self.waiting.popleft(), reason, True))
        for job, reason, retryable in dropped:
            self._answer(job, None, f"{reason} (before it started)", cancelled=True, retryable=retryable)
        return [Row(job.input_ids, job.params, self.num_tokens, timing=job.timing, owner=job) for job in taken]

    def _settle(self, out: StepOutput) -> None:
        self.stats.prefills += out.prefills
        self._peak = max(self._peak, out.stepped)
        if out.stepped:
            self.stats.steps += 1
            self.stats.rows_stepped += out.stepped
            self.stats.mixed_steps += int(out.mixed)
        for row, exc in out.refused:
            self._answer(row.owner, None, failure_message("prefill", exc), exception=exc)
        for row in out.finished:
            self._answer(row.owner, row.tokens, None)

    def _fail_all_rows(self, message: str, exc: BaseException | None = None) -> None:
        for row in self.runner.abort():
            self._answer(row.owner, None, message, exception=exc)
