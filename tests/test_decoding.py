"""Decode engines (tandem.decoding): the cache stays in place, rows are independent, slots move."""

import numpy as np
import pytest

from tandem.decoding import CacheDecodeEngine, OrtDecodeEngine, TorchDecodeEngine, make_decode_engine
from tandem.errors import TandemError
from tandem.pipeline import Pipeline
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.runtimes.torch_eager import TorchRuntime
from tandem.sampling import SamplingParams
from tandem.stages import MAX_BATCH
from tandem.tokenizer import encode_batch

PROMPTS = ["a red circle above a blue square", "x", "two green triangles", "a small yellow star", "blue", "three red squares", "a", "green"]


@pytest.fixture(scope="module")
def runtimes(tiny_artifacts, tiny_config):
    torch_rt = TorchRuntime(tiny_config)
    return {"torch": torch_rt, "onnxruntime": OnnxRuntime(tiny_artifacts), "plain-graphs": OnnxRuntime(tiny_artifacts, optimized=False)}


def test_each_runtime_gets_its_engine(runtimes):
    assert type(make_decode_engine(runtimes["torch"], 2)) is TorchDecodeEngine
    assert type(make_decode_engine(runtimes["onnxruntime"], 2)) is OrtDecodeEngine


@pytest.mark.parametrize("name", ["torch", "onnxruntime", "plain-graphs"])
def test_a_rows_tokens_do_not_depend_on_its_batch_mates(runtimes, name):
    """The same prompt alone and amid 7 others (at another row), greedy and sampled."""
    pipe = Pipeline(runtimes[name])
    target = "a red circle above a blue square"
    crowd = [p for p in PROMPTS if p != target]
    crowd.insert(5, target)
    assert len(crowd) == MAX_BATCH
    for params in (SamplingParams(), SamplingParams(seed=4, temperature=0.9, top_k=8)):
        alone = pipe.generate_tokens([target], params)[0]
        amid = pipe.generate_tokens(crowd, [SamplingParams(seed=i, temperature=1.0) for i in range(5)] + [params] + [SamplingParams(seed=9)] * 2)
        np.testing.assert_array_equal(amid[5], alone)


def test_onnxruntime_and_torch_engines_agree_at_batch_1_and_8(runtimes):
    torch_pipe, ort_pipe = Pipeline(runtimes["torch"]), Pipeline(runtimes["onnxruntime"])
    for prompts in (PROMPTS[:1], PROMPTS):
        np.testing.assert_array_equal(ort_pipe.generate_tokens(prompts), torch_pipe.generate_tokens(prompts))


def _greedy(engine, n, token, positions, steps):
    """``steps`` greedy decode steps from ``token`` [n] (sampled in the graph, each checked against
    the argmax of the logits the graph returns beside it) -> (tokens [n, steps], next token, positions)."""
    tokens, logits = [], np.empty((n, engine.vocab), np.float32)
    for _ in range(steps):
        tokens.append(np.array(token))
        token = engine.step(n, token, positions, logits=logits)
        np.testing.assert_array_equal(token, logits.argmax(axis=1))
        positions = positions + 1
    return np.stack(tokens, axis=1), np.array(token), positions


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_a_step_writes_only_its_rows_into_the_same_buffers(runtimes, tiny_config, name):
    engine = make_decode_engine(runtimes[name], 4)
    addresses = {k: b.ctypes.data for k, b in engine.cache.items()}
    ids, lengths = encode_batch(PROMPTS[:3], tiny_config.reasoning.max_prompt_len)
    first = np.array(engine.prefill([0, 1, 2], ids, lengths))
    before = {k: b.copy() for k, b in engine.cache.items()}
    assert all(not b[3].any() for b in before.values()), "prefill touched a slot it was not given"
    positions = lengths.copy()
    second = engine.step(3, first, positions)
    for name_, buffer in engine.cache.items():
        assert buffer.ctypes.data == addresses[name_]  # written in place, never reallocated
        changed_at = {(int(slot), int(pos)) for slot, _, pos in np.argwhere((buffer != before[name_]).any(axis=3))}
        assert changed_at == {(i, int(positions[i])) for i in range(3)}, name_
    if name == "onnxruntime":
        # The returned tokens fed back as they are: the step reads them where the last step wrote
        # them (the other token buffer), and writes its own into the first.
        third = engine.step(3, second, positions + 1)
        assert np.shares_memory(second, engine.tokens[1]) and np.shares_memory(third, engine.tokens[0])
        engine.step(2, np.array(third[:2]), positions[:2] + 2)
        assert sorted(engine.bindings) == [(2, 0), (3, 0), (3, 1)]  # bound once per batch size and side, then reused


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_a_moved_slot_continues_as_if_alone(runtimes, tiny_config, name):
    """Row 1 leaves after 3 steps; row 2 moves into its slot and the batch shrinks to 2. Row 2's
    tokens must equal those of the same prompt decoded alone."""
    rt = runtimes[name]
    ids, lengths = encode_batch(PROMPTS[:3], tiny_config.reasoning.max_prompt_len)
    engine = make_decode_engine(rt, 3)
    first, token, positions = _greedy(engine, 3, engine.prefill([0, 1, 2], ids, lengths), lengths.copy(), 3)
    engine.move(2, 1)
    keep = [0, 2]
    second, _, _ = _greedy(engine, 2, token[keep], positions[keep], 5)

    alone = make_decode_engine(rt, 1)
    ids2, lengths2 = encode_batch(PROMPTS[2:3], tiny_config.reasoning.max_prompt_len)
    expected, _, _ = _greedy(alone, 1, alone.prefill([0], ids2, lengths2), lengths2.copy(), 8)
    np.testing.assert_array_equal(np.concatenate([first[2], second[1]]), expected[0])


def test_generic_engine_over_run_matches(runtimes):
    """The engine every other runtime (TensorRT, Neuron, AOTInductor) gets: buffers through run()."""
    ort_rt = runtimes["onnxruntime"]
    generic = CacheDecodeEngine(ort_rt, 8)
    bound = make_decode_engine(ort_rt, 8)
    ids, lengths = encode_batch(PROMPTS, ort_rt.config.reasoning.max_prompt_len)
    a, b = np.array(generic.prefill(range(8), ids, lengths)), np.array(bound.prefill(range(8), ids, lengths))
    np.testing.assert_array_equal(a, b)
    ta, _, _ = _greedy(generic, 8, a, lengths.copy(), 6)
    tb, _, _ = _greedy(bound, 8, b, lengths.copy(), 6)
    np.testing.assert_array_equal(ta, tb)


def test_bad_engine_calls_are_explained(runtimes, tiny_config):
    rt = runtimes["onnxruntime"]
    with pytest.raises(TandemError, match="1 to 8 rows"):
        make_decode_engine(rt, MAX_BATCH + 1)
    engine = make_decode_engine(rt, 2)
    ids, lengths = encode_batch(PROMPTS[:2], tiny_config.reasoning.max_prompt_len)
    with pytest.raises(TandemError, match="distinct"):
        engine.prefill([1, 1], ids, lengths)
    with pytest.raises(TandemError, match=r"slots must lie in \[0, 2\)"):
        engine.prefill([0, 2], ids, lengths)
    with pytest.raises(TandemError, match="prefill takes"):
        engine.prefill([0], ids, lengths)
    engine.move(1, 1)  # a no-op, not an error
    with pytest.raises(TandemError, match=r"slots must lie in \[0, 2\)"):
        engine.move(0, 2)
    with pytest.raises(TandemError, match="1 to 2 rows"):
        engine.step(3, np.zeros(3, np.int64), np.ones(3, np.int64))
    with pytest.raises(TandemError, match="positions must lie"):
        engine.step(1, np.zeros(1, np.int64), np.array([tiny_config.max_len]))
