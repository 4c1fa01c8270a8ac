"""The verify graph (k tokens per row per step) and greedy parallel (Jacobi / lookahead) decoding:
tokens identical to sequential greedy decoding, fewer sequential steps."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.config import load_config
from tandem.decoding import VERIFY, CacheDecodeEngine
from tandem.errors import TandemError
from tandem.parallel import JacobiPipeline, NgramPool, Proposer, parse_proposer
from tandem.pipeline import Pipeline
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.runtimes.torch_eager import TorchRuntime
from tandem.sampling import SamplingParams
from tandem.stages import graph_specs
from tandem.tokenizer import encode_batch

PROMPTS = ["a red circle above a blue square", "two green triangles", "x"]


@pytest.fixture(scope="module")
def runtimes(tiny_config, tiny_artifacts):
    return {"torch": TorchRuntime(tiny_config), "onnxruntime": OnnxRuntime(tiny_artifacts, device="cpu")}


def _prefilled(runtime, prompts):
    ids, lengths = encode_batch(prompts, runtime.config.reasoning.max_prompt_len)
    engine = runtime.decode_engine(len(prompts))
    engine.prefill(range(len(prompts)), ids[:, : int(lengths.max())], lengths)
    return engine, lengths.astype(np.int64)


def test_verify_graph_is_described_like_the_decode_graph(tiny_config):
    spec = graph_specs(tiny_config)[VERIFY]
    assert spec.input_names[:2] == ["token_ids", "start_positions"]
    assert [t.shape for t in spec.inputs[:2]] == [("batch", "block"), ("batch",)]
    assert spec.outputs[0].shape == ("batch", "block", tiny_config.scene.codebook_size)
    assert spec.outputs[1].name == "new_key_0" and spec.outputs[1].shape[2] == "block"
    assert spec.dims["block"].max == min(32, tiny_config.scene.num_tokens)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_a_verify_step_is_k_decode_steps(runtimes, name):
    """Logits and cache rows of one k-token step equal k single-token steps', and whatever the cache
    holds at or past each row's start (rolled-back rows) is never read."""
    runtime = runtimes[name]
    sequential, block = _prefilled(runtime, PROMPTS), _prefilled(runtime, PROMPTS)
    (seq_engine, lengths), (blk_engine, _) = sequential, block
    tokens = np.random.default_rng(0).integers(0, runtime.config.scene.codebook_size, size=(3, 5))
    expected = np.empty((3, 5, runtime.config.scene.codebook_size), np.float32)
    for j in range(5):
        seq_engine.step(3, tokens[:, j], lengths + j, logits=expected[:, j])
    for row, start in enumerate(lengths):  # stale rows past the start: must not matter
        for buffer in blk_engine.cache.values():
            buffer[row, :, start:] = 1e4
    logits = blk_engine.verify(3, tokens, lengths)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)
    for name_ in seq_engine.cache:
        for row, start in enumerate(lengths):
            np.testing.assert_allclose(blk_engine.cache[name_][row, :, : start + 5], seq_engine.cache[name_][row, :, : start + 5], atol=1e-5)


def test_engines_agree_on_verify_and_generic_engine_runs_it(runtimes):
    torch_engine, lengths = _prefilled(runtimes["torch"], PROMPTS[:2])
    ort_engine, _ = _prefilled(runtimes["onnxruntime"], PROMPTS[:2])
    generic = CacheDecodeEngine(runtimes["onnxruntime"], 2)
    ids, _ = encode_batch(PROMPTS[:2], runtimes["torch"].config.reasoning.max_prompt_len)
    generic.prefill(range(2), ids[:, : int(lengths.max())], lengths)
    tokens = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    outs = [e.verify(2, tokens, lengths) for e in (torch_engine, ort_engine, generic)]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-5, rtol=1e-4)
    # k = 1 is a decode step; then a shorter block at other positions reuses the engine
    one = ort_engine.verify(2, tokens[:, :1] + 1, lengths + 4)
    assert one.shape == (2, 1, runtimes["torch"].config.scene.codebook_size)
    np.testing.assert_allclose(torch_engine.verify(2, tokens[:, :1] + 1, lengths + 4), one, atol=1e-5, rtol=1e-4)


def test_bad_verify_calls_are_explained(runtimes, tiny_config):
    engine, lengths = _prefilled(runtimes["onnxruntime"], PROMPTS[:1])
    with pytest.raises(TandemError, match="block range"):
        engine.verify(1, np.zeros((1, 99), np.int64), lengths)
    with pytest.raises(TandemError, match="positions"):
        engine.verify(1, np.zeros((1, 4), np.int64), np.array([tiny_config.max_len - 2]))
    with pytest.raises(TandemError, match="token_ids"):
        engine.verify(1, np.zeros(4, np.int64), lengths)


def test_an_export_without_the_verify_graph_is_refused_clearly(tiny_artifacts):
    runtime = OnnxRuntime(tiny_artifacts, device="cpu", graphs=["reasoning_prefill", "reasoning_decode"])
    engine, lengths = _prefilled(runtime, PROMPTS[:1])
    with pytest.raises(TandemError, match="export again"):
        engine.verify(1, np.zeros((1, 4), np.int64), lengths)


class _Oracle(Proposer):
    """Proposes the sequential answer, then garbage after ``good`` tokens: acceptance and rollback."""

    answer: np.ndarray
    good = 3

    def propose(self, tokens, count, length):
        guess = self.answer[count : count + length].copy()
        guess[self.good :] = (guess[self.good :] + 1) % 64
        return guess


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
@pytest.mark.parametrize("proposer", ["pool,grid,jacobi", "context,jacobi,above"])
def test_parallel_greedy_tokens_are_sequential_greedy_tokens(runtimes, name, proposer):
    runtime = runtimes[name]
    expected = Pipeline(runtime).generate_tokens(PROMPTS)
    for block in (2, 5, 16):
        pipe = JacobiPipeline(runtime, block=block, proposer=proposer)
        np.testing.assert_array_equal(pipe.generate_tokens(PROMPTS), expected)
        np.testing.assert_array_equal(pipe.generate_tokens(PROMPTS[1:2]), expected[1:2])  # batch 1, a warm pool
        assert all(1 < s <= runtime.config.scene.num_tokens for s in pipe.last_stats.steps)


def test_accepted_guesses_save_steps_and_rejected_ones_are_overwritten(runtimes, monkeypatch):
    """With guesses right for 3 tokens and wrong after, every step keeps 4 tokens (3 guesses and the
    model's own next token); the rows written for the wrong guesses never change a token."""
    import tandem.parallel as parallel

    runtime = runtimes["onnxruntime"]
    expected = Pipeline(runtime).generate_tokens(PROMPTS[:1])
    _Oracle.answer = expected.reshape(-1).astype(np.int64)
    monkeypatch.setattr(parallel, "Proposer", _Oracle)
    pipe = JacobiPipeline(runtime, block=8)
    np.testing.assert_array_equal(pipe.generate_tokens(PROMPTS[:1]), expected)
    total = runtime.config.scene.num_tokens
    assert pipe.last_stats.steps == [1 + int(np.ceil((total - 1) / 4))]
    assert set(pipe.last_stats.accepted[:-1]) == {4}


def test_sampled_rows_decode_sequentially(runtimes):
    runtime = runtimes["torch"]
    params = SamplingParams(seed=3, temperature=1.0)
    expected = Pipeline(runtime).generate_tokens(PROMPTS[:2], params)
    np.testing.assert_array_equal(JacobiPipeline(runtime).generate_tokens(PROMPTS[:2], params), expected)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_the_decode_loop_steps_jacobi_rows_joining_at_any_step(runtimes, name):
    """The in-flight scheduler with a JacobiRunner (the served loop): requests join while others are
    mid-generation, greedy rows advance by their own numbers of tokens per step, a sampled row makes
    its steps sequential while it runs; every request gets the tokens it gets alone, sequentially."""
    from tandem.parallel import ParallelStats, jacobi_runner
    from tandem.scheduler import InflightScheduler, Job

    runtime = runtimes[name]
    settings = [SamplingParams(seed=1), SamplingParams(seed=4, temperature=0.9, top_k=8), SamplingParams(seed=2)]
    stats = ParallelStats()
    scheduler = InflightScheduler.for_runtime(runtime, capacity=3, runner=jacobi_runner(runtime, block=4, stats=stats))
    outcomes = {}
    for i, (prompt, params) in enumerate(zip(PROMPTS, settings)):
        scheduler.submit(Job(prompt, params, lambda o, i=i: outcomes.__setitem__(i, o)))
        for _ in range(2):
            scheduler.step()
    scheduler.run_until_idle()
    for i, (prompt, params) in enumerate(zip(PROMPTS, settings)):
        assert outcomes[i].ok, outcomes[i].error
        alone = Pipeline(runtime).generate_tokens([prompt], params).reshape(-1)
        np.testing.assert_array_equal(outcomes[i].tokens, alone)
    assert stats.block_tokens > 0 and len(stats.steps) == 3  # verify steps ran once the sampled row had left


def test_bad_settings_are_explained(runtimes):
    with pytest.raises(TandemError, match="block"):
        JacobiPipeline(runtimes["torch"], block=1000)
    with pytest.raises(TandemError, match="proposal sources"):
        parse_proposer("above,telepathy")


def test_ngram_pool_prefers_the_most_frequent_continuation():
    pool = NgramPool()
    for token in (5, 7, 7):
        pool.add(((1, 2), (1, None)), token)
    assert pool.lookup(((1, 2),)) == 7 and pool.lookup(((9, 9), (1, None))) == 7 and pool.lookup(((9, 9),)) == -1


def test_trained_checkpoint_held_out_captions_identical_in_fewer_steps():
    """The small config's trained checkpoint on held-out captions: the tokens of sequential greedy
    decoding, in far fewer sequential steps than its 256."""
    from tandem.eval.evaluate import eval_captions

    config = load_config("small")
    runtime = TorchRuntime(config, checkpoint=config.checkpoint)
    captions = eval_captions(config, 2)
    expected = Pipeline(runtime).generate_tokens(captions)
    pipe = JacobiPipeline(runtime)
    steps = []
    for caption, tokens in zip(captions, expected):
        np.testing.assert_array_equal(pipe.generate_tokens([caption])[0], tokens)
        steps += pipe.last_stats.steps
    np.testing.assert_array_equal(JacobiPipeline(runtime).generate_tokens(captions), expected)  # batched too
    assert np.mean(steps) <= 64, steps
