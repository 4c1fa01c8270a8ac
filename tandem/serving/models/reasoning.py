"""Triton python-backend model ``reasoning``: prompts -> scene tokens, the whole autoregressive loop
in-process (one prefill, then one decode step per token over the KV cache).

Two schedulers, chosen by the config parameter ``scheduler`` (``tandem repo --scheduler``):

- ``inflight`` (default): every request goes to a :class:`~tandem.scheduler.InflightScheduler` whose
  loop thread owns the decode engine; requests join and leave the running batch at every decode
  step. ``execute`` only hands requests over and returns None; the loop answers each request
  through its response sender, exactly one response with the final flag (Triton 2.51's python
  backend allows a response sender in a non-decoupled model, so the model stays non-decoupled,
  the ``tandem`` ensemble keeps working and HTTP/gRPC ``infer`` still work: a decoupled step would
  make the ensemble decoupled, which both refuse). A request whose client cancels it
  (``request.is_cancelled()``, e.g. a gRPC deadline on a direct call) or whose timeout passes
  (``request.timeout()``, the client's ``timeout`` parameter, which the ensemble forwards) frees its
  slot at the next step (:class:`CancelPoller` asks Triton every ``CANCEL_POLL_S`` on its own
  thread: each ask is a round trip to the Triton process). Every other client is covered by the front
  door: it tags each request with the parameter ``tandem_request_id`` and, when the client goes
  away, creates a marker file of that name in ``$TANDEM_CANCEL_DIR``; the row's check stats it at
  every step (:class:`~tandem.serving.models.common.CancelMarkers`) and the slot is free at the next.
  Requests wait in the scheduler's queue, not Triton's (``execute`` returns at once), so the
  repository's ``max_queue_size`` becomes the scheduler's waiting limit (parameter ``max_waiting``,
  in prompts), which refuses the excess at once with the reason. The scheduler's loop thread makes
  no round trip to the Triton process: responses and metric updates go through an :class:`Outbox`
  thread, so a step (and a new arrival's first step) never waits for one.
- ``request``: all requests Triton's dynamic batcher hands to one ``execute`` call become ONE
  batched generation run to its end (:meth:`tandem.pipeline.Pipeline.generate_tokens`).

Either way a bad request gets its own error response and the rest are still served, and the time
from a request reaching the model to its first decode step is observed in the Prometheus histogram
``tandem_reasoning_first_step_seconds`` on Triton's metrics endpoint (label ``scheduler``), next to
``tandem_reasoning_queue_seconds`` (to its prefill); the in-flight scheduler's counters (requests
completed, failed, cancelled, timed out, rejected; decode steps, mixed-position steps, rows stepped)
are ``tandem_reasoning_scheduler_total{event=...}``. Imported only inside Triton's python backend stub."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from tandem.errors import TandemError
from tandem.parallel import DECODINGS, DEFAULT_BLOCK, DEFAULT_PROPOSER, jacobi_runner
from tandem.scheduler import InflightScheduler, Job, Outcome, SchedulerStats
from tandem.serving.interface import PROMPT, SCENE_TOKENS, SEED, TEMPERATURE, TOP_K
from tandem.serving.models.common import (
    PARAM_BLOCK,
    PARAM_DECODING,
    PARAM_PROPOSER,
    SCHEDULER_INFLIGHT,
    Activity,
    CancelMarkers,
    DrainingError,
    check_prompts,
    failure_message,
    load_pipeline,
    model_parameters,
    parse_prompts,
    queue_delay_s,
    queue_timeout_s,
    parse_sampling,
    request_id,
    scheduler_kind,
    scrub_serialized,
    serialized_row,
    waiting_limit,
    zero_tensor,
)

FIRST_STEP_METRIC = "tandem_reasoning_first_step_seconds"
QUEUE_METRIC = "tandem_reasoning_queue_seconds"
SCHEDULER_METRIC = "tandem_reasoning_scheduler_total"
CANCEL_POLL_S = 0.05  # how often each row asks Triton whether its request was cancelled (see submit)
# Under `tandem serve` every client comes through the front door, whose markers cover cancellation;
# Triton is then asked only as a backstop: each ask is a round trip to the Triton process, 8 rows
# every 50 ms kept the poller asking a fifth of the time, and the scheduler thread waited for it.
CANCEL_BACKSTOP_POLL_S = 0.5
# The decode loop looks at its rows' cancellation markers, answers and deadlines at most this often
# (not at every step): a batch-1 step takes about 0.5 ms on 2 cores, and listing the marker folder and
# asking every row at every step cost a few percent of it. A cancelled row runs at most this much longer.
CANCEL_CHECK_INTERVAL_S = 0.005
# Geometric buckets, 1.15x apart from 0.5 ms to ~2 min: a percentile read from them is within 15%.
TIMING_BUCKETS = [float(f"{0.0005 * 1.15**i:.6g}") for i in range(90)]


def error_response(message: str, code=None) -> "pb_utils.InferenceResponse":
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def refusal(exc: TandemError) -> "pb_utils.InferenceResponse":
    """A request refused before it started: retryable while the server drains, else the client's fault."""
    code = pb_utils.TritonError.UNAVAILABLE if isinstance(exc, DrainingError) else pb_utils.TritonError.INVALID_ARG
    return error_response(str(exc), code)


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def forget_inputs(requests: list) -> None:
    """Clear the batch's inputs from the stub's shared-memory region once all are read: the
    sampling columns in place (DLPack), the prompts by their serialized form (see
    :func:`~tandem.serving.models.common.zero_tensor`). Never fails a request."""
    rows = []
    try:
        for request in requests:
            for name in (SEED, TEMPERATURE, TOP_K):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    zero_tensor(tensor)
            prompts = _input(request, PROMPT)
            if prompts is not None:
                rows += [serialized_row(v if isinstance(v, bytes) else str(v)) for v in prompts.reshape(-1)]
        scrub_serialized(rows)
    except Exception as exc:  # clearing is hygiene: a failure here must not cost anyone an answer
        pb_utils.Logger.log_warn(f"reasoning: could not clear request inputs from shared memory ({type(exc).__name__})")


class TimingMetrics:
    """Per-request histograms on Triton's metrics endpoint (seconds since the request reached the model)."""

    def __init__(self, scheduler: str):
        labels = {"scheduler": scheduler}
        self.families = [
            pb_utils.MetricFamily(
                name=FIRST_STEP_METRIC,
                description="time from a request reaching the reasoning model to its first decode step",
                kind=pb_utils.MetricFamily.HISTOGRAM,
            ),
            pb_utils.MetricFamily(
                name=QUEUE_METRIC,
                description="time from a request reaching the reasoning model to the start of its prefill",
                kind=pb_utils.MetricFamily.HISTOGRAM,
            ),
        ]
        self.first_step, self.queue = (f.Metric(labels=labels, buckets=TIMING_BUCKETS) for f in self.families)

    def observe(self, queue_s: float, first_step_s: float) -> None:
        if np.isfinite(queue_s):
            self.queue.observe(float(queue_s))
        if np.isfinite(first_step_s):
            self.first_step.observe(float(first_step_s))


class SchedulerCounters:
    """The scheduler's :class:`SchedulerStats` as Prometheus counters, published as deltas when a
    request is answered (not per step: every metric update is a message to the Triton process)."""

    def __init__(self, scheduler: InflightScheduler, kind: str):
        self.scheduler = scheduler
        self.family = pb_utils.MetricFamily(
            name=SCHEDULER_METRIC, description="in-flight reasoning scheduler events", kind=pb_utils.MetricFamily.COUNTER
        )
        self.fields = [f.name for f in dataclasses.fields(SchedulerStats)]
        self.counters = {name: self.family.Metric(labels={"scheduler": kind, "event": name}) for name in self.fields}
        self.published = SchedulerStats()
        self._lock = threading.Lock()

    def publish(self) -> None:
        with self._lock:
            current = dataclasses.replace(self.scheduler.stats)
            for name in self.fields:
                delta = getattr(current, name) - getattr(self.published, name)
                if delta:
                    self.counters[name].increment(delta)
            self.published = current


class Outbox:
    """Round trips to the Triton process (response sends, metric updates) run on this thread, never
    on the scheduler's loop thread: a decode step, and so a new arrival's first step, never waits for
    one (each is an IPC message the stub waits on). Responses go first: when a batch's rows finish
    in the same step, every response leaves before any of their metric updates (in posting order
    within each kind)."""

    def __init__(self, name: str):
        self._responses: collections.deque = collections.deque()
        self._updates: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, action: Callable[[], None], response: bool = False) -> None:
        with self._ready:
            (self._responses if response else self._updates).append(action)
            self._ready.notify()

    def _next(self) -> Callable[[], None] | None:
        with self._ready:
            while not (self._responses or self._updates or self._closing):
                self._ready.wait()
            if self._responses:
                return self._responses.popleft()
            if self._updates:
                return self._updates.popleft()
            return None  # closing, and nothing left to do

    def _run(self) -> None:
        while (action := self._next()) is not None:
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - one failed send must not stop the others
                pb_utils.Logger.log_error(f"reasoning: {failure_message('sending a response', exc)}")

    def close(self, timeout: float = 10.0) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout)


class Watched:
    """One live request as the poller sees it. Once its response is sent Triton releases the
    request, and asking about it then reads freed memory in the Triton process (it crashed with
    SIGSEGV under load): :meth:`answered` and the poll's ask hold the same lock."""

    def __init__(self, request):
        self.request = request
        self.cancelled = False
        self.done = False
        self.lock = threading.Lock()

    def poll(self) -> None:
        with self.lock:
            if not self.done and self.request.is_cancelled():
                self.cancelled = True

    @contextlib.contextmanager
    def answered(self):
        """Hold while sending the response: no poll runs during or after it."""
        with self.lock:
            self.done = True
            yield


class CancelPoller:
    """Asks Triton whether each live request was cancelled (``request.is_cancelled()``, a round trip)
    every CANCEL_POLL_S on its own thread; the scheduler's check reads the answer (a flag)."""

    def __init__(self, name: str, interval_s: float = CANCEL_POLL_S):
        self.interval_s = interval_s
        self._live: dict[int, Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, key: int, request) -> Watched:
        watched = Watched(request)
        with self._lock:
            self._live[key] = watched
        return watched

    def forget(self, key: int) -> None:
        with self._lock:
            self._live.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                live = list(self._live.values())
            for watched in live:
                try:
                    watched.poll()
                except Exception:  # noqa: BLE001 - asking failed: the next poll asks again
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class _Answer:
    """Collects the outcomes of one request's prompts and sends its one response (final flag) when
    all are in, or an error as soon as one fails; later outcomes of a failed request are dropped
    and its other rows leave the engine at the next step (:attr:`failed` is their cancellation)."""

    def __init__(
        self, rows: int, sender, metrics: TimingMetrics, counters: SchedulerCounters, activity: Activity, outbox: Outbox,
        on_sent=None, watched: Watched | None = None,
    ):
        self.watched = watched  # the poller's view of the request: no poll once the response is sent
        self.outbox = outbox  # sends and metric updates happen there, off the scheduler's loop thread
        self.on_sent = on_sent  # called once the response is sent (e.g. to remove the request's cancel marker)
        self.activity = activity  # entered by submit; left when the one response is sent (drain waits for it)
        self.tokens: list[np.ndarray | None] = [None] * rows
        self.remaining = rows
        self.sender = sender
        self.metrics = metrics
        self.counters = counters
        self.failed = False
        self._lock = threading.Lock()

    def row(self, index: int):
        return lambda outcome: self.done(index, outcome)

    def fail(self, message: str, code) -> None:
        with self._lock:
            if self.failed or self.remaining == 0:
                return
            self.failed = True
        self.outbox.post(lambda: self._send(error_response(message, code)), response=True)

    def done(self, index: int, outcome: Outcome) -> None:
        queue_s, first_step_s, _ = outcome.timing.seconds()
        self.outbox.post(lambda: self.metrics.observe(queue_s, first_step_s))
        try:
            if not outcome.ok:
                code = (pb_utils.TritonError.UNAVAILABLE if outcome.retryable  # waited past the queue timeout: retry
                        else pb_utils.TritonError.CANCELLED if outcome.cancelled else pb_utils.TritonError.INTERNAL)
                self.fail(outcome.error, code)
                return
            with self._lock:
                if self.failed:
                    return
                self.tokens[index] = outcome.tokens
                self.remaining -= 1
                if self.remaining:
                    return
            rows = np.ascontiguousarray(np.stack(self.tokens), dtype=np.int32)
            self.outbox.post(lambda: self._send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(SCENE_TOKENS, rows)])),
                             response=True)
        finally:
            self.outbox.post(self.counters.publish)

    def _send(self, response) -> None:
        try:
            with self.watched.answered() if self.watched is not None else contextlib.nullcontext():
                self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self.activity.leave()
            if self.on_sent is not None:
                self.on_sent()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        version_dir = f"{args['model_repository']}/{args['model_version']}"
        self.pipeline = load_pipeline(version_dir, parameters, args.get("model_instance_kind", "CPU"))
        self.max_prompt_len = self.pipeline.config.reasoning.max_prompt_len
        self.activity = Activity()
        self.cancel_markers = CancelMarkers()  # the front door's, for clients Triton cannot tell us about
        self.scheduler_kind = scheduler_kind(parameters)
        self.metrics = TimingMetrics(self.scheduler_kind)
        self.scheduler: InflightScheduler | None = None
        if self.scheduler_kind == SCHEDULER_INFLIGHT:
            self.decoding = parameters.get(PARAM_DECODING, "sequential")
            runner = None
            if self.decoding == "jacobi":  # greedy rows take multi-token steps over the verify graph (tandem.parallel)
                runner = jacobi_runner(self.pipeline.runtime, int(parameters.get(PARAM_BLOCK, DEFAULT_BLOCK)),
                                       parameters.get(PARAM_PROPOSER, DEFAULT_PROPOSER))
            elif self.decoding != "sequential":
                raise TandemError(f"parameter {PARAM_DECODING!r} is {self.decoding!r}; it must be one of {DECODINGS} (regenerate with `tandem repo`)")
            self.scheduler = InflightScheduler.for_runtime(
                self.pipeline.runtime, capacity=int(config["max_batch_size"]), max_waiting=waiting_limit(parameters), runner=runner,
                max_wait_s=queue_timeout_s(parameters), before_plan=self.cancel_markers.refresh,
                admission_window_s=queue_delay_s(parameters), check_interval_s=CANCEL_CHECK_INTERVAL_S,
            )
            self.counters = SchedulerCounters(self.scheduler, self.scheduler_kind)
            instance = args.get("model_instance_name", "reasoning")
            self.outbox = Outbox(f"{instance}-outbox")
            poll_s = CANCEL_BACKSTOP_POLL_S if self.cancel_markers.active else CANCEL_POLL_S
            self.cancel_poller = CancelPoller(f"{instance}-cancel-poll", interval_s=poll_s)
            self.scheduler.start(name=f"{instance}-scheduler")
        pb_utils.Logger.log_info(
            f"reasoning: {self.pipeline.config.name} on {self.pipeline.runtime.describe()}, "
            f"{self.pipeline.config.scene.num_tokens} scene tokens per prompt, {self.scheduler_kind} batching"
            + (f" ({self.scheduler.capacity} slots, {self.scheduler.max_waiting or 'unbounded'} waiting, {self.decoding} decoding)"
               if self.scheduler else "")
        )

    def parse(self, request) -> tuple[list[str], list]:
        self.activity.admit()  # DrainingError once the server is stopping
        prompts = parse_prompts(_input(request, PROMPT))
        check_prompts(prompts, self.max_prompt_len)
        params = parse_sampling(len(prompts), _input(request, SEED), _input(request, TEMPERATURE), _input(request, TOP_K))
        return prompts, params

    def execute(self, requests: list) -> list | None:
        if self.scheduler is None:
            with self.activity.busy():
                return self.execute_batch(requests)
        parsed = []
        for request in requests:
            try:
                parsed.append(self.parse(request))
            except TandemError as exc:
                parsed.append(exc)
        # Every request of the batch is read: clear them from shared memory now, before any of them can
        # be answered (a request Triton has released must not be touched: see Watched).
        forget_inputs(requests)
        for request, result in zip(requests, parsed):
            self.submit(request, result)
        return None

    # -- in-flight batching ---------------------------------------------------------------------------
    def submit(self, request, parsed) -> None:
        sender = request.get_response_sender()
        if isinstance(parsed, TandemError):
            sender.send(refusal(parsed), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        prompts, params = parsed
        # The generation outlives execute(): the drain waits until its response is sent.
        self.activity.enter()
        rid = request_id(request.parameters())  # the front door's id (None: not sent, or not a valid id)
        marker = self.cancel_markers.watcher(rid)
        key = id(request)

        def sent() -> None:
            self.cancel_markers.forget(rid)
            self.cancel_poller.forget(key)

        # request.is_cancelled() is a round trip to the Triton process (15-20 ms under load when it
        # was asked from here): the poller asks every CANCEL_POLL_S on its own thread.
        watched = self.cancel_poller.watch(key, request)
        answer = _Answer(
            len(prompts), sender, self.metrics, self.counters, self.activity, self.outbox, on_sent=sent, watched=watched
        )
        timeout_us = int(request.timeout() or 0)  # the client's timeout parameter (0: none)

        def cancelled() -> bool:
            if answer.failed:
                return True
            if marker is not None and marker():  # the front door's marker: one os.stat, every step
                return True
            return watched.cancelled

        for index, (prompt, row_params) in enumerate(zip(prompts, params)):
            job = Job(prompt, row_params, answer.row(index), is_cancelled=cancelled, timeout_s=timeout_us / 1e6 or None)
            try:
                self.scheduler.submit(job)
            except TandemError as exc:  # QueueFullError, or the model is shutting down
                answer.fail(str(exc), pb_utils.TritonError.UNAVAILABLE)
                self.outbox.post(self.counters.publish)
                return

    # -- request-level batching ---------------------------------------------------------------------------
    def execute_batch(self, requests: list) -> list:
        arrived = time.monotonic()
        responses: list = [None] * len(requests)
        prompts, params, owners = [], [], []
        for index, request in enumerate(requests):
            try:
                rows, row_params = self.parse(request)
            except TandemError as exc:
                responses[index] = refusal(exc)
                continue
            prompts += rows
            params += row_params
            owners += [index] * len(rows)
        forget_inputs(requests)
        if prompts:
            marks: dict[str, float] = {}

            def on_step(step: int) -> None:
                if step == 0:  # the first token is sampled from the prefill: the first decode step starts now
                    marks["first_step"] = time.monotonic()

            try:
                prefill_start = time.monotonic()
                tokens = self.pipeline.generate_tokens(prompts, params, on_step=on_step)
            except Exception as exc:  # one failure answers every request of the batch, and the model keeps serving
                message = failure_message("generation", exc)
                for index in set(owners):
                    responses[index] = error_response(message)
                return responses
            for _ in prompts:
                self.metrics.observe(prefill_start - arrived, marks.get("first_step", np.nan) - arrived)
            flat = tokens.reshape(len(prompts), -1)
            owners_arr = np.asarray(owners)
            for index in sorted(set(owners)):
                rows = np.ascontiguousarray(flat[owners_arr == index], dtype=np.int32)
                responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(SCENE_TOKENS, rows)])
        return responses

    def finalize(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()  # answers what is left (through the outbox), then the outbox drains
            self.cancel_poller.close()
            self.outbox.close()
        self.pipeline = None
