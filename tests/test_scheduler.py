"""The in-flight scheduler in-process over the tiny export's real ONNX Runtime decode engine: requests
joining mid-generation, batch independence (greedy and sampled), cancellation, deadlines, the
bounded queue and fault isolation. The served model is tested in test_inflight.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tandem.errors import TandemError
from tandem.pipeline import Pipeline
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.sampling import SamplingParams
from tandem.scheduler import InflightScheduler, Job, Outcome, QueueFullError

PROMPTS = ["a red circle above a blue square", "two green triangles left of a yellow square", "x", "a yellow star at night"]
SETTINGS = [SamplingParams(seed=0), SamplingParams(seed=11, temperature=0.8, top_k=16), SamplingParams(seed=5, temperature=1.3)]


@pytest.fixture(scope="module")
def runtime(tiny_artifacts):
    return OnnxRuntime(tiny_artifacts)


@pytest.fixture(scope="module")
def pipeline(runtime) -> Pipeline:
    return Pipeline(runtime)


def alone(pipeline: Pipeline, prompt: str, params: SamplingParams) -> np.ndarray:
    return pipeline.generate_tokens([prompt], params).reshape(-1).astype(np.int64)


def collect(outcomes: dict, key):
    return lambda outcome: outcomes.__setitem__(key, outcome)


def test_requests_joining_at_random_steps_get_their_tokens_alone(runtime, pipeline, tiny_config):
    """Twelve requests (more than the engine's slots) arrive at random steps, greedy and sampled:
    each gets exactly the tokens it gets alone through the in-process pipeline, rows at different
    positions shared decode steps, and slots were reused as rows left."""
    scheduler = InflightScheduler.for_runtime(runtime, capacity=4)
    rng = np.random.default_rng(0)
    jobs = [(PROMPTS[i % 4], SamplingParams(seed=100 + i, temperature=[0.0, 0.8, 1.3][i % 3], top_k=[0, 16, 0][i % 3])) for i in range(12)]
    arrivals = np.sort(rng.integers(0, 2 * tiny_config.scene.num_tokens, size=len(jobs)))
    outcomes: dict[int, Outcome] = {}
    step = 0
    next_job = 0
    while next_job < len(jobs) or not scheduler.idle():
        while next_job < len(jobs) and arrivals[next_job] <= step:
            prompt, params = jobs[next_job]
            scheduler.submit(Job(prompt, params, collect(outcomes, next_job)))
            next_job += 1
        scheduler.step()
        step += 1
    assert sorted(outcomes) == list(range(len(jobs)))
    for index, (prompt, params) in enumerate(jobs):
        assert outcomes[index].ok, outcomes[index].error
        np.testing.assert_array_equal(outcomes[index].tokens, alone(pipeline, prompt, params), err_msg=f"request {index}")
    assert scheduler.stats.mixed_steps > 0  # requests really joined running generations
    assert scheduler.stats.completed == len(jobs) and scheduler.occupied == 0
    assert scheduler.stats.rows_stepped / scheduler.stats.steps > 1.5  # steps were shared


def test_a_request_joins_the_next_step_not_the_next_generation(runtime, tiny_config):
    """A request arriving while a generation runs takes a free slot at the next step: its first
    decode step comes long before the running request finishes."""
    scheduler = InflightScheduler.for_runtime(runtime, capacity=2)
    outcomes: dict[str, Outcome] = {}
    scheduler.submit(Job(PROMPTS[0], SETTINGS[0], collect(outcomes, "first")))
    for _ in range(3):
        scheduler.step()
    scheduler.submit(Job(PROMPTS[1], SETTINGS[1], collect(outcomes, "late")))
    scheduler.step()
    assert scheduler.occupied == 2 and not outcomes
    scheduler.run_until_idle()
    first, late = outcomes["first"].timing, outcomes["late"].timing
    assert late.first_step is not None and late.first_step < first.finished
    assert late.finished > first.finished  # it started later and runs its own full length


def test_cancelled_and_timed_out_rows_free_their_slot_at_the_next_step(runtime, pipeline):
    clock = [0.0]
    scheduler = InflightScheduler.for_runtime(runtime, capacity=2, clock=lambda: clock[0])
    outcomes: dict[str, Outcome] = {}
    gave_up = threading.Event()
    scheduler.submit(Job(PROMPTS[0], SETTINGS[0], collect(outcomes, "cancelled"), is_cancelled=gave_up.is_set))
    scheduler.submit(Job(PROMPTS[1], SETTINGS[1], collect(outcomes, "timeout"), timeout_s=5.0))
    scheduler.submit(Job(PROMPTS[2], SETTINGS[2], collect(outcomes, "waiting")))
    for _ in range(3):
        scheduler.step()
    assert scheduler.occupied == 2 and len(scheduler.waiting) == 1
    gave_up.set()
    clock[0] = 6.0
    scheduler.step()  # both leave, the waiting request takes a slot in the same step
    assert outcomes["cancelled"].cancelled and "cancelled by its client" in outcomes["cancelled"].error
    assert outcomes["timeout"].cancelled and "timed out after 5.000 s" in outcomes["timeout"].error
    assert scheduler.occupied == 1 and not scheduler.waiting
    scheduler.run_until_idle()
    np.testing.assert_array_equal(outcomes["waiting"].tokens, alone(pipeline, PROMPTS[2], SETTINGS[2]))
    assert scheduler.stats.cancelled == 1 and scheduler.stats.timed_out == 1


def test_a_request_waiting_past_the_queue_timeout_is_refused_as_retryable(runtime, pipeline):
    """The queue timeout (`--queue-timeout-ms`, Triton's queue policy before the models batched
    themselves): a request still waiting for a slot that long is refused at the next step, even
    with no slot free, as retryable (the served model answers UNAVAILABLE, not CANCELLED); the
    running row is untouched."""
    clock = [0.0]
    scheduler = InflightScheduler.for_runtime(runtime, capacity=1, clock=lambda: clock[0], max_wait_s=2.0)
    outcomes: dict[str, Outcome] = {}
    scheduler.submit(Job(PROMPTS[0], SETTINGS[0], collect(outcomes, "running")))
    scheduler.step()
    scheduler.submit(Job(PROMPTS[1], SETTINGS[1], collect(outcomes, "waiting")))
    scheduler.step()
    assert not outcomes and len(scheduler.waiting) == 1
    clock[0] = 2.5
    scheduler.step()
    refused = outcomes["waiting"]
    assert refused.retryable and refused.cancelled and "waited 2.5 s for a slot" in refused.error and "retry later" in refused.error
    assert scheduler.occupied == 1 and not scheduler.waiting and scheduler.stats.timed_out == 1
    scheduler.run_until_idle()
    assert not outcomes["running"].retryable
    np.testing.assert_array_equal(outcomes["running"].tokens, alone(pipeline, PROMPTS[0], SETTINGS[0]))


def test_full_queue_refuses_with_a_clear_error_and_bad_prompts_never_take_a_slot(runtime):
    scheduler = InflightScheduler.for_runtime(runtime, capacity=1, max_waiting=2)
    answered: list[Outcome] = []
    for prompt in PROMPTS[:2]:
        scheduler.submit(Job(prompt, SETTINGS[0], answered.append))
    with pytest.raises(QueueFullError, match=r"at capacity: 0 requests generating and 2 waiting \(max_queue_size 2\)"):
        scheduler.submit(Job(PROMPTS[2], SETTINGS[0], answered.append))
    with pytest.raises(TandemError, match="prompt is empty"):
        scheduler.submit(Job("  ", SETTINGS[0], answered.append))
    scheduler.run_until_idle()
    assert [o.ok for o in answered] == [True, True] and scheduler.stats.rejected == 1


def test_one_rows_failure_never_touches_the_others(runtime, pipeline):
    """An owner whose callback raises and an owner whose cancellation check raises are dealt with
    alone; the loop thread keeps serving everyone else."""
    scheduler = InflightScheduler.for_runtime(runtime, capacity=3).start()
    try:
        done = threading.Event()
        outcomes: dict[str, Outcome] = {}

        def broken_owner(outcome: Outcome) -> None:
            raise RuntimeError("the client went away")

        def broken_check() -> bool:
            raise RuntimeError("cannot read the request")

        def last(outcome: Outcome) -> None:
            outcomes["healthy"] = outcome
            done.set()

        scheduler.submit(Job(PROMPTS[0], SETTINGS[1], broken_owner))
        scheduler.submit(Job(PROMPTS[1], SETTINGS[0], collect(outcomes, "unreadable"), is_cancelled=broken_check))
        scheduler.submit(Job(PROMPTS[3], SETTINGS[2], last))
        assert done.wait(120)
    finally:
        scheduler.stop()
    assert outcomes["unreadable"].cancelled
    np.testing.assert_array_equal(outcomes["healthy"].tokens, alone(pipeline, PROMPTS[3], SETTINGS[2]))
    assert scheduler.stats.completed == 2  # the broken owner's generation completed; only its answer failed


def test_an_idle_loop_lets_the_next_wave_share_one_prefill(runtime, pipeline):
    """After a busy period with company, the idle loop thread waits for as many arrivals as that
    period's peak while they keep coming (a closed loop of clients' next wave), so they share one
    prefill; after a lone client it starts at once. Generous gaps keep this independent of load."""

    def wave(scheduler: InflightScheduler, prompts: list[str], spacing_s: float) -> list[Outcome]:
        done = threading.Semaphore(0)
        outcomes: list[Outcome] = []
        for i, prompt in enumerate(prompts):
            if i:
                threading.Event().wait(spacing_s)
            scheduler.submit(Job(prompt, SETTINGS[0], lambda o: (outcomes.append(o), done.release())))
        for _ in prompts:
            assert done.acquire(timeout=120)
        return outcomes

    def scheduler_after(first_wave: list[str]) -> InflightScheduler:
        scheduler = InflightScheduler.for_runtime(runtime, capacity=3, admission_window_s=30.0, wave_gap_s=5.0)
        for prompt in first_wave:  # stepped here, before the loop thread starts: one busy period of len(first_wave) rows
            scheduler.submit(Job(prompt, SETTINGS[0], lambda o: None))
        scheduler.run_until_idle()
        return scheduler.start()

    lone = scheduler_after(PROMPTS[:1])
    try:
        before = lone.stats.prefills
        wave(lone, PROMPTS[1:3], 0.5)  # peak 1: the first starts at once, the second (0.5 s later) has its own prefill
        assert lone.stats.prefills - before == 2
    finally:
        lone.stop()
    busy = scheduler_after(PROMPTS[:2])
    try:
        before = busy.stats.prefills
        outcomes = wave(busy, PROMPTS[1:3], 0.5)  # peak 2: the idle loop waits for the second arrival
        assert busy.stats.prefills - before == 1
    finally:
        busy.stop()
    assert all(o.ok for o in outcomes)
    expected = {alone(pipeline, p, SETTINGS[0]).tobytes() for p in PROMPTS[1:3]}
    assert {o.tokens.astype(np.int64).tobytes() for o in outcomes} == expected


@pytest.mark.parametrize("interval_s", [0.0, 3600.0])
def test_running_rows_are_checked_at_most_every_check_interval(runtime, interval_s):
    """With a check interval the loop looks at running rows' cancellation only that often (the served
    loop: every 5 ms, not every half-millisecond step); with none, at every step."""
    scheduler = InflightScheduler.for_runtime(runtime, capacity=2, check_interval_s=interval_s)
    asked = []
    outcomes: dict[str, Outcome] = {}
    scheduler.submit(Job(PROMPTS[0], SETTINGS[0], collect(outcomes, "a"), is_cancelled=lambda: bool(asked.append(1)) or len(asked) > 2))
    scheduler.run_until_idle()
    if interval_s:  # checked when the first step took it, then not within the hour
        assert outcomes["a"].ok and len(asked) == 1
    else:
        assert outcomes["a"].cancelled and len(asked) == 3


def test_stop_answers_everything_still_pending(runtime):
    scheduler = InflightScheduler.for_runtime(runtime, capacity=1)
    answered: list[Outcome] = []
    for prompt in PROMPTS[:3]:
        scheduler.submit(Job(prompt, SETTINGS[0], answered.append))
    scheduler.step()
    scheduler.stop()
    assert len(answered) == 3 and all("shutting down" in o.error for o in answered)
    with pytest.raises(TandemError, match="shutting down"):
        scheduler.submit(Job(PROMPTS[0], SETTINGS[0], answered.append))


def test_a_front_door_marker_frees_the_slot_at_the_next_step(runtime, pipeline, tmp_path):
    """The front door's cancellation marker ($TANDEM_CANCEL_DIR/<tandem_request_id>) appearing
    mid-generation: the row leaves at the very next step, counted as cancelled, the marker is
    removed once seen, and the other row's tokens are those it gets alone. An id that is not 32
    lowercase hex characters is never watched (it never becomes a path)."""
    from tandem.serving.models.common import REQUEST_ID_PARAMETER, CancelMarkers, request_id

    markers = CancelMarkers(tmp_path)
    rid = "0123456789abcdef" * 2
    assert request_id(f'{{"{REQUEST_ID_PARAMETER}": "{rid}"}}') == rid
    for bad in ("../../etc/passwd", rid.upper(), rid[:-1], rid + "0", 7, None):
        assert request_id({REQUEST_ID_PARAMETER: bad}) is None and markers.watcher(request_id({REQUEST_ID_PARAMETER: bad})) is None
    assert request_id("not json") is None and request_id("{}") is None
    scheduler = InflightScheduler.for_runtime(runtime, capacity=2, before_plan=markers.refresh)  # as the served model wires it
    outcomes: dict[str, Outcome] = {}
    scheduler.submit(Job(PROMPTS[0], SETTINGS[1], collect(outcomes, "gone"), is_cancelled=markers.watcher(rid)))
    scheduler.submit(Job(PROMPTS[1], SETTINGS[2], collect(outcomes, "stays")))
    for _ in range(3):
        scheduler.step()
    assert scheduler.occupied == 2 and not outcomes
    (tmp_path / rid).touch()
    scheduler.step()
    assert scheduler.occupied == 1 and scheduler.stats.cancelled == 1
    assert outcomes["gone"].cancelled and "cancelled by its client" in outcomes["gone"].error
    assert not (tmp_path / rid).exists()
    scheduler.run_until_idle()
    np.testing.assert_array_equal(outcomes["stays"].tokens, alone(pipeline, PROMPTS[1], SETTINGS[2]))
    # No folder configured: nothing is watched.
    assert CancelMarkers(folder="").watcher(rid) is None
