"""The one decode loop (tandem.decoding.ModelRunner, planned by tandem.scheduler.InflightScheduler):
Pipeline and the in-flight scheduler run the same step implementation and give the same tokens, and
the runner's bookkeeping does not assume one token per row per step."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import tandem.pipeline
import tandem.scheduler
from tandem.decoding import ModelRunner, Row, StepOutput, StepPlan, make_decode_engine
from tandem.errors import TandemError
from tandem.pipeline import Pipeline
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.sampling import SamplingParams
from tandem.scheduler import InflightScheduler, Job, Outcome
from tandem.tokenizer import encode

PROMPTS = ["a red circle above a blue square", "two green triangles left of a yellow square", "x", "a yellow star at night"]


@pytest.fixture(scope="module")
def runtime(tiny_artifacts):
    return OnnxRuntime(tiny_artifacts)


def settings(i: int) -> SamplingParams:
    return SamplingParams(seed=40 + i, temperature=[0.0, 0.9, 1.4][i % 3], top_k=[0, 12, 0][i % 3])


def test_pipeline_and_staggered_scheduler_give_identical_tokens(runtime, tiny_config):
    """Ten prompts through Pipeline (more than its engine's slots: they join in waves) and through a
    3-slot scheduler where they arrive at staggered steps, joining and leaving running generations:
    token for token the same."""
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i % 3) for i in range(10)]
    params = [settings(i) for i in range(len(prompts))]
    pipeline_tokens = Pipeline(runtime).generate_tokens(prompts, params).reshape(len(prompts), -1)

    scheduler = InflightScheduler.for_runtime(runtime, capacity=3)
    arrivals = [0, 0, 1, 3, 3, 4, 7, 9, 9, 15]
    outcomes: dict[int, Outcome] = {}
    step, submitted = 0, 0
    while submitted < len(prompts) or not scheduler.idle():
        while submitted < len(prompts) and arrivals[submitted] <= step:
            i = submitted
            scheduler.submit(Job(prompts[i], params[i], lambda o, i=i: outcomes.__setitem__(i, o)))
            submitted += 1
        scheduler.step()
        step += 1
    assert scheduler.stats.mixed_steps > 0 and scheduler.stats.completed == len(prompts)
    for i in range(len(prompts)):
        assert outcomes[i].ok, outcomes[i].error
        np.testing.assert_array_equal(outcomes[i].tokens, pipeline_tokens[i], err_msg=f"prompt {i}")
    assert pipeline_tokens.shape[1] == tiny_config.scene.num_tokens


def test_there_is_one_step_implementation(runtime, monkeypatch):
    """Pipeline and the scheduler both step through ModelRunner.execute, and every prefill and decode
    step of the engine happens inside it; neither pipeline.py nor scheduler.py samples or calls the
    engine itself."""
    runners: list[tuple[str, ModelRunner]] = []
    inside = [0]
    execute = ModelRunner.execute

    def spying_execute(self, plan, out=None):
        runners.append((caller[0], self))
        inside[0] += 1
        try:
            return execute(self, plan, out)
        finally:
            inside[0] -= 1

    class Engines:
        """The runtime's own engines, each prefill and step checked to run inside the runner."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode_engine(self, capacity):
            engine = self.inner.decode_engine(capacity)
            for name in ("prefill", "step"):
                real = getattr(engine, name)

                def checked(*args, real=real, name=name):
                    assert inside[0] == 1, f"engine.{name} called outside ModelRunner.execute"
                    return real(*args)

                setattr(engine, name, checked)
            return engine

    monkeypatch.setattr(ModelRunner, "execute", spying_execute)
    caller = ["pipeline"]
    wrapped = Engines(runtime)
    Pipeline(wrapped).generate_tokens(PROMPTS[:2], SamplingParams(seed=1))
    caller[0] = "scheduler"
    scheduler = InflightScheduler.for_runtime(wrapped, capacity=2)
    scheduler.submit(Job(PROMPTS[2], SamplingParams(seed=2), lambda o: None))
    scheduler.run_until_idle()
    assert {who for who, _ in runners} == {"pipeline", "scheduler"}
    assert {type(runner) for _, runner in runners} == {ModelRunner}
    assert scheduler.runner is runners[-1][1]
    for module in (tandem.pipeline, tandem.scheduler):
        source = inspect.getsource(module)
        for name in ("select_next", "engine.step", "engine.prefill", "engine.move", "encode_batch"):
            assert name not in source, f"{module.__name__} uses {name}: a second step implementation"


def test_pipeline_on_step_counts_tokens(runtime, tiny_config):
    """on_step(i) once every row has token i, 0 (from the prefill) before the first decode step."""
    n = tiny_config.scene.num_tokens
    seen: list[int] = []
    prompts = PROMPTS[:2]
    Pipeline(runtime).generate_tokens(prompts, SamplingParams(), on_step=seen.append)
    assert seen == list(range(n))


def test_row_bookkeeping_admits_several_tokens_per_step():
    """A row's position follows its accepted tokens, however many a step accepts, so a multi-token
    step needs no other bookkeeping; tokens beyond num_tokens are dropped."""
    row = Row(encode("a red circle", 32), SamplingParams(), num_tokens=6)
    assert row.prompt_len == 14 and row.count == 0
    row.accept(np.array([7]))  # from the prefill
    assert row.position == 14 and row.pending().tolist() == [7]
    row.accept(np.array([8, 9, 10]))  # a step that kept three tokens
    assert row.count == 4 and row.position == 17 and row.pending().tolist() == [10] and not row.done
    row.accept(np.array([11, 12, 13]))
    assert row.done and row.tokens.tolist() == [7, 8, 9, 10, 11, 12]
    with pytest.raises(TandemError, match="num_tokens"):
        Row([1, 2], SamplingParams(), num_tokens=0)


def test_runner_plans_leave_join_and_contain_failed_prefills(runtime, tiny_config):
    """The runner frees leaving rows (compacting slots), refuses only the prompt whose prefill fails
    (a failed batch is retried row by row), and a caller's StepOutput keeps what a step did."""
    engine = make_decode_engine(runtime, 3)
    runner = ModelRunner(engine)
    n = tiny_config.scene.num_tokens
    rows = [Row(encode(p, tiny_config.reasoning.max_prompt_len), SamplingParams(seed=i), n) for i, p in enumerate(PROMPTS[:3])]
    out = runner.execute(StepPlan(join=rows))
    assert runner.rows == rows and out.prefills == 1 and out.stepped == 3 and [r.count for r in rows] == [2, 2, 2]
    out = runner.execute(StepPlan(leave=[rows[0]]))
    assert runner.rows == [rows[2], rows[1]] and out.stepped == 2  # the last row filled the hole
    with pytest.raises(TandemError, match="cannot join"):
        runner.execute(StepPlan(join=[Row([1, 2], SamplingParams(), n), Row([1, 2], SamplingParams(), n)]))

    prefill = engine.prefill

    def failing(slots, input_ids, lengths, *args, **kwargs):
        if (lengths == 3).any():
            raise RuntimeError("bad prompt")
        return prefill(slots, input_ids, lengths, *args, **kwargs)

    engine.prefill = failing
    sampled = SamplingParams(seed=3, temperature=1.0)
    good, bad = Row(encode("ok", 32), sampled, n), Row(encode("x", 32), SamplingParams(), n)
    out = StepOutput()
    runner.execute(StepPlan(leave=[rows[1]], join=[good, bad]), out)
    assert [r for r, _ in out.refused] == [bad] and good in runner.rows and bad not in runner.rows
    assert out.prefills == 1  # the batch failed, the retry of `good` succeeded
    # The failed batch's draw was given back: `good` drew once for its first token, once for its
    # second (this step's decode), as if admitted alone.
    fresh = sampled.generator()
    fresh.random(), fresh.random()
    assert good.count == 2 and good.rng.random() == fresh.random()


def test_a_failed_step_still_answers_what_it_did(runtime, tiny_config):
    """A decode step that raises after a prefill refused a prompt: the refused prompt is answered
    with its prefill error, the loop thread's handler fails the rows in the engine."""
    scheduler = InflightScheduler.for_runtime(runtime, capacity=2)
    engine = scheduler.engine
    prefill = engine.prefill
    engine.prefill = lambda slots, ids, lengths, *a: (_ for _ in ()).throw(RuntimeError("prefill broke")) if (lengths == 3).any() else prefill(slots, ids, lengths, *a)
    engine.step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("step broke"))
    outcomes: dict[str, Outcome] = {}
    scheduler.submit(Job("x", SamplingParams(), lambda o: outcomes.__setitem__("refused", o)))
    scheduler.submit(Job(PROMPTS[0], SamplingParams(), lambda o: outcomes.__setitem__("running", o)))
    with pytest.raises(RuntimeError, match="step broke"):
        scheduler.step()
    assert "prefill broke" in outcomes["refused"].error and isinstance(outcomes["refused"].exception, RuntimeError)
    assert "running" not in outcomes and scheduler.occupied == 1
    scheduler._fail_all_rows("generation failed")  # what the loop thread does after a failed step
    assert outcomes["running"].error == "generation failed" and scheduler.occupied == 0
