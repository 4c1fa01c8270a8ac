import numpy as np
import pytest

from tandem.errors import TandemError
from tandem.pipeline import Pipeline
from tandem.runtimes import make_runtime
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.runtimes.torch_eager import TorchRuntime
from tandem.sampling import SamplingParams

PROMPTS = ["a red circle above a blue square", "two green triangles left of a yellow square", "x"]


@pytest.fixture(scope="module")
def ort_pipe(tiny_artifacts):
    return Pipeline(OnnxRuntime(tiny_artifacts))


@pytest.fixture(scope="module")
def torch_pipe(tiny_config):
    return Pipeline(TorchRuntime(tiny_config))


@pytest.mark.parametrize("params", [SamplingParams(seed=0), SamplingParams(seed=11, temperature=0.8, top_k=16)])
def test_onnxruntime_generation_equals_pytorch(ort_pipe, torch_pipe, params):
    np.testing.assert_array_equal(ort_pipe.generate_tokens(PROMPTS, params), torch_pipe.generate_tokens(PROMPTS, params))


def test_seeded_sampling_is_reproducible(ort_pipe):
    a = ort_pipe.generate_tokens(PROMPTS[:1], SamplingParams(seed=5, temperature=1.0))
    b = ort_pipe.generate_tokens(PROMPTS[:1], SamplingParams(seed=5, temperature=1.0))
    c = ort_pipe.generate_tokens(PROMPTS[:1], SamplingParams(seed=6, temperature=1.0))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_top_k_limits_the_choice(ort_pipe, torch_pipe):
    """With top_k=1 sampling at any temperature is greedy."""
    greedy = ort_pipe.generate_tokens(PROMPTS, SamplingParams(seed=0))
    np.testing.assert_array_equal(ort_pipe.generate_tokens(PROMPTS, SamplingParams(seed=3, temperature=5.0, top_k=1)), greedy)


class CountingRuntime:
    """Wraps a real runtime and counts graph calls, the decode engine's included (instrumentation,
    not a stand-in: every call goes to the real runtime and its real engine)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _count(self, graph):
        self.calls[graph] = self.calls.get(graph, 0) + 1

    def run(self, graph, feeds):
        self._count(graph)
        return self.inner.run(graph, feeds)

    def decode_engine(self, capacity):
        engine = self.inner.decode_engine(capacity)
        prefill, step = engine.prefill, engine.step
        engine.prefill = lambda *a, **k: (self._count("reasoning_prefill"), prefill(*a, **k))[1]
        engine.step = lambda *a, **k: (self._count("reasoning_decode"), step(*a, **k))[1]
        return engine


def test_decode_uses_the_cache_one_step_per_token(tiny_artifacts, tiny_config):
    runtime = CountingRuntime(OnnxRuntime(tiny_artifacts))
    result = Pipeline(runtime).generate("a red circle", seed=1)
    n = tiny_config.scene.num_tokens
    assert runtime.calls == {"reasoning_prefill": 1, "reasoning_decode": n - 1, "refinement": 1}
    assert result.tokens.shape == (tiny_config.scene.grid_height, tiny_config.scene.grid_width)
    assert result.image.shape == (tiny_config.image_height, tiny_config.image_width, 3)
    assert result.image.dtype == np.uint8


def test_bad_inputs_are_explained(ort_pipe, tiny_config):
    with pytest.raises(TandemError, match="prompt is empty"):
        ort_pipe.generate("   ")
    with pytest.raises(TandemError, match="at most"):
        ort_pipe.generate("x" * tiny_config.reasoning.max_prompt_len)
    with pytest.raises(TandemError, match="outside the codebook"):
        ort_pipe.render(np.full((4, 4), tiny_config.scene.codebook_size))
    with pytest.raises(TandemError, match="shape"):
        ort_pipe.render(np.zeros((3, 5), dtype=np.int64))
    with pytest.raises(TandemError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(TandemError, match="unknown runtime 'tensorflow'"):
        make_runtime("tensorflow")


def test_a_pipeline_keeps_its_schedulers_between_calls_and_drops_one_that_failed(tiny_artifacts):
    """Sequential calls reuse the scheduler (engine buffers and bindings made once) of their slot
    count and give the tokens a fresh pipeline gives; a call whose prompt is refused after others were
    queued drops its scheduler, so the next call generates only its own prompts; calls from two
    threads at once both get their own tokens (one of them on a scheduler of its own)."""
    import threading

    runtime = make_runtime("onnxruntime", artifacts=tiny_artifacts)
    pipe = Pipeline(runtime)
    settings = [SamplingParams(seed=3, temperature=0.9, top_k=8), SamplingParams(seed=4)]
    fresh = {n: Pipeline(runtime).generate_tokens(["two green triangles", "x"][:n], settings[:n]) for n in (1, 2)}
    first = pipe.generate_tokens(["two green triangles"], settings[:1])
    kept = pipe._kept[1]
    assert np.array_equal(first, fresh[1])
    for n in (2, 1, 2):  # slot counts alternate: each keeps its own scheduler
        assert np.array_equal(pipe.generate_tokens(["two green triangles", "x"][:n], settings[:n]), fresh[n])
    assert pipe._kept[1] is kept and set(pipe._kept) == {1, 2}

    with pytest.raises(TandemError):
        pipe.generate_tokens(["two green triangles", ""], settings)  # the first prompt is queued, the second refused
    assert 2 not in pipe._kept
    assert np.array_equal(pipe.generate_tokens(["two green triangles", "x"], settings), fresh[2])

    results: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, pipe.generate_tokens(["two green triangles"], settings[:1])))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(np.array_equal(results[i], fresh[1]) for i in range(2))
