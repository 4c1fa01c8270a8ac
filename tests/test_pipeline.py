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
