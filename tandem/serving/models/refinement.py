"""Triton python-backend model ``refinement``: scene tokens [h*w] -> image [H, W, 3] uint8, plus
the tokens it rendered (``rendered_tokens``, the ensemble's ``scene_tokens`` output).

The model forms its own batches (config.pbtxt has no ``dynamic_batching``): ``execute`` checks each
request, copies its tokens out and hands it to a :class:`Renderer` thread, and returns None; that
thread renders every request waiting when it is free (up to ``max_batch_size`` rows) in one run and
answers each through its response sender. Triton's dynamic batcher is left out on purpose: on
Triton 2.51 (and on its main branch as of 2026-12) its batcher thread waits for a free model
instance on a condition variable with its own mutex, so the instance's "free" notification can
arrive before the wait starts, and the queued requests then sit out the batcher's 500 ms default
wait (``DynamicBatchScheduler::WaitForPayloadSlotAvailable``). Measured here: a wave of 8 ensemble
requests took 0.84 s or, about one wave in two, 1.33 s. Without a batcher every request goes straight
to the instance, whose ``execute`` takes a few milliseconds.

A request with tokens outside the codebook gets its own error and the others are still served; a
request whose timeout (Triton's ``timeout`` parameter, or the parameter ``queue_timeout_ms``) passed
before its turn, or whose client left (the front door's marker), is answered without rendering. ``max_waiting`` (parameter, in rows; absent inside
the ensemble, where reasoning already admitted the work) refuses the excess at once. Each request's
tokens are zeroed in the stub's shared-memory region once read (they are private data). Imported
only inside Triton's python backend stub."""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from tandem.errors import TandemError
from tandem.scheduler import wait_for_wave
from tandem.serving.interface import IMAGE, RENDERED_TOKENS, SCENE_TOKENS
from tandem.serving.models.common import (
    Activity,
    CancelMarkers,
    failure_message,
    load_pipeline,
    model_parameters,
    parse_scene_tokens,
    queue_delay_s,
    queue_timeout_s,
    request_id,
    waiting_limit,
    zero_tensor,
)
from tandem.serving.models.reasoning import error_response


def _forget(tensor) -> None:
    """Zero the request's scene tokens where they live (the stub's shared-memory region) once read."""
    try:
        if tensor is not None:
            zero_tensor(tensor)
    except Exception as exc:  # hygiene only: never costs a request its answer
        pb_utils.Logger.log_warn(f"refinement: could not clear scene tokens from shared memory ({type(exc).__name__})")


@dataclass(eq=False)
class Pending:
    """One request waiting to be rendered: its tokens (a private copy) and how to answer it."""

    tokens: np.ndarray  # [rows, h, w] int64
    sender: object
    deadline: float | None  # time.monotonic() after which it is answered with a timeout instead
    cancelled: object = None  # the front door's marker check (None: nothing to watch)

    @property
    def rows(self) -> int:
        return len(self.tokens)


class Renderer:
    """The render thread: once a request is waiting, and the last render had more than one row (the
    server is under load), it waits for more while they keep coming, up to ``gather_s`` in all
    (:func:`tandem.scheduler.wait_for_wave`: the rows of a reasoning batch finish at the same step but
    reach this model one execute call apart, about a millisecond each; answering them together keeps
    the next wave of a closed-loop client together too: the decode loop then steps full batches), then takes what is waiting,
    oldest first, up to ``max_rows`` rows (always at least one request), renders it in one call and
    answers each request. Sends happen on this thread: nothing else waits for it."""

    def __init__(self, render, max_rows: int, max_waiting: int | None, activity: Activity, name: str, gather_s: float = 0.0):
        self.render = render
        self.gather_s = gather_s  # after the first arrival, wait this long for more rows (up to max_rows)
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.activity = activity
        self.waiting: collections.deque[Pending] = collections.deque()
        self.waiting_rows = 0
        self._last_rows = 0  # rows of the last render call
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Pending) -> None:
        """Queue ``item``; raises TandemError when the waiting limit is reached or the model is stopping."""
        with self._lock:
            if self._stopping:
                raise TandemError("the refinement model is shutting down; retry on another server")
            if self.max_waiting is not None and self.waiting_rows + item.rows > self.max_waiting:
                raise TandemError(
                    f"the refinement stage is at capacity: {self.waiting_rows} rows waiting (max_queue_size "
                    f"{self.max_waiting}); retry later, or serve with a larger --max-queue-size or more servers"
                )
            self.activity.enter()  # left when its response is sent: the drain waits for it
            self.waiting.append(item)
            self.waiting_rows += item.rows
            self._lock.notify()

    def _take(self) -> list[Pending] | None:
        with self._lock:
            while not self._stopping and not self.waiting:
                self._lock.wait()
            if self._stopping:
                return None
            # Let the rest of a wave of finished rows in, when the last render had company (under load);
            # a lone request on a quiet server is rendered at once.
            if self.gather_s and self._last_rows > 1:
                wait_for_wave(self._lock, lambda: self.waiting_rows, self.max_rows, self.gather_s, lambda: self._stopping)
            taken, rows = [], 0
            while self.waiting and (not taken or rows + self.waiting[0].rows <= self.max_rows):
                item = self.waiting.popleft()
                rows += item.rows
                taken.append(item)
            self.waiting_rows -= rows
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            answered: set[int] = set()
            try:
                self._render(taken, answered)
            except Exception as exc:  # noqa: BLE001 - whoever is not answered yet gets the error; the thread keeps serving
                message = failure_message("rendering", exc)
                pb_utils.Logger.log_error(f"refinement: {message}")
                for item in taken:
                    if id(item) not in answered:
                        self._send(item, error_response(message, pb_utils.TritonError.INTERNAL), answered)

    def _render(self, taken: list[Pending], answered: set[int]) -> None:
        now = time.monotonic()
        live = []
        for item in taken:
            if item.deadline is not None and now >= item.deadline:
                self._send(item, error_response("the request timed out before it was rendered; retry with a longer timeout",
                                                pb_utils.TritonError.UNAVAILABLE), answered)
            elif item.cancelled is not None and item.cancelled():
                self._send(item, error_response("the request was cancelled by its client", pb_utils.TritonError.CANCELLED), answered)
            else:
                live.append(item)
        if not live:
            return
        grids = np.concatenate([item.tokens for item in live])
        try:
            images = self.render(grids)
        except Exception as exc:  # one failure answers this batch; the model keeps serving
            message = failure_message("rendering", exc)
            for item in live:
                self._send(item, error_response(message, pb_utils.TritonError.INTERNAL), answered)
            return
        self._last_rows = len(grids)
        start = 0
        for item in live:
            rows = slice(start, start + item.rows)
            start += item.rows
            tokens = np.ascontiguousarray(grids[rows].reshape(item.rows, -1), dtype=np.int32)
            outputs = [pb_utils.Tensor(IMAGE, np.ascontiguousarray(images[rows])), pb_utils.Tensor(RENDERED_TOKENS, tokens)]
            self._send(item, pb_utils.InferenceResponse(output_tensors=outputs), answered)

    def _send(self, item: Pending, response, answered: set[int] | None = None) -> None:
        """Answer ``item`` (once: its id joins ``answered``) and leave its Activity."""
        if answered is not None:
            answered.add(id(item))
        try:
            item.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # noqa: BLE001 - its client's problem, never the others'
            pb_utils.Logger.log_warn(f"refinement: {failure_message('sending a response', exc)}")
        finally:
            self.activity.leave()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still waiting are answered with an error."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)
        with self._lock:
            left, self.waiting, self.waiting_rows = list(self.waiting), collections.deque(), 0
        for item in left:
            self._send(item, error_response("the server is shutting down; the image was not rendered", pb_utils.TritonError.UNAVAILABLE))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        version_dir = f"{args['model_repository']}/{args['model_version']}"
        self.pipeline = load_pipeline(version_dir, parameters, args.get("model_instance_kind", "CPU"))
        self.codebook_size = self.pipeline.config.scene.codebook_size
        self.activity = Activity()  # no admission check: a draining server still finishes the ensemble's second step
        self.cancel_markers = CancelMarkers()
        self.max_wait_s = queue_timeout_s(parameters)  # (none inside the ensemble: reasoning admitted the work)
        max_rows = max(1, int(config.get("max_batch_size", 1)))
        instance = args.get("model_instance_name", "refinement")
        self.renderer = Renderer(self.pipeline.render, max_rows, waiting_limit(parameters), self.activity, f"{instance}-render",
                                 gather_s=queue_delay_s(parameters))
        pb_utils.Logger.log_info(
            f"refinement: {self.pipeline.config.name} on {self.pipeline.runtime.describe()}, renders up to {max_rows} rows "
            f"together after waiting up to {1e3 * self.renderer.gather_s:g} ms for them ({self.renderer.max_waiting or 'unbounded'} waiting)"
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            self.submit(request)
        return None

    def submit(self, request) -> None:
        sender = request.get_response_sender()
        tensor = pb_utils.get_input_tensor_by_name(request, SCENE_TOKENS)
        try:
            tokens = parse_scene_tokens(tensor.as_numpy(), self.pipeline.grid, self.codebook_size)
        except TandemError as exc:
            sender.send(error_response(str(exc)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        finally:
            _forget(tensor)
        limits = [s for s in (int(request.timeout() or 0) / 1e6, self.max_wait_s) if s]  # the client's timeout, the queue's
        deadline = time.monotonic() + min(limits) if limits else None
        item = Pending(tokens, sender, deadline, self.cancel_markers.watcher(request_id(request.parameters())))
        try:
            self.renderer.submit(item)
        except TandemError as exc:
            sender.send(error_response(str(exc), pb_utils.TritonError.UNAVAILABLE), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.renderer.stop()
        self.pipeline = None
