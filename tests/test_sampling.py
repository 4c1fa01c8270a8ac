"""Sampling in the step graphs (tandem.models.reasoning.sample_tokens) against the host reference
(tandem.sampling.select_next): the same tokens from the same seeded streams."""

import numpy as np
import pytest
import torch

from tandem.data.scenes import heldout_captions
from tandem.decoding import ModelRunner, Row, StepPlan, make_decode_engine
from tandem.models.reasoning import sample_tokens
from tandem.runtimes.onnxruntime import OnnxRuntime
from tandem.runtimes.torch_eager import TorchRuntime
from tandem.sampling import UNIFORM_MAX, SamplingParams, draw_uniform, select_next
from tandem.stages import MAX_BATCH, NEXT_TOKENS, SAMPLING_INPUTS, graph_specs
from tandem.tokenizer import encode

SETTINGS = [(0.7, 0), (1.0, 0), (0.7, 50), (1.0, 50)]  # (temperature, top_k)


def _boundary_distance(logits: np.ndarray, params: SamplingParams, u: float, host: int, graph: int) -> float:
    """How far (relative to the total weight) the host's float64 target ``u * total`` lies from the
    CDF boundary between the host's and the graph's tokens: tiny when float32 rounding explains a
    mismatch."""
    scores = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < len(scores):
        scores = np.where(scores >= np.partition(scores, -params.top_k)[-params.top_k], scores, -np.inf)
    cdf = np.cumsum(np.exp(scores - scores.max()))
    boundary = cdf[min(host, graph)]  # the cumulative weight up to and including the lower token
    return abs(u * cdf[-1] - boundary) / cdf[-1]


def _checked_generation(runtime, prompts, params, num_tokens):
    """Generate ``prompts`` through a ModelRunner whose engine also hands back every call's logits;
    each call's graph-sampled tokens are compared with select_next on those logits, drawing from
    independent generators of the same seeds (so the runner's draws must follow the host's stream).
    Returns (positions compared, mismatches as (host token, graph token, boundary distance))."""
    capacity = len(prompts)
    engine = make_decode_engine(runtime, capacity)
    host_rngs = [p.generator() for p in params]
    logits = np.empty((capacity, engine.vocab), np.float32)
    counted, mismatches = [0], []

    def check(n, chosen):
        draws = [rng.bit_generator.state for rng in host_rngs]  # to read back each row's u
        host = select_next(logits[:n], params[:n], host_rngs[:n])
        counted[0] += n
        for i in np.flatnonzero(host != chosen):
            u = np.random.Generator(np.random.PCG64())
            u.bit_generator.state = draws[i]
            mismatches.append((int(host[i]), int(chosen[i]), _boundary_distance(logits[i], params[i], u.random(), host[i], chosen[i])))
        return chosen

    prefill, step = engine.prefill, engine.step
    engine.prefill = lambda slots, ids, lengths, sampling=None: check(len(slots), prefill(slots, ids, lengths, sampling, logits=logits[: len(slots)]))
    engine.step = lambda n, tokens, positions, sampling=None: check(n, step(n, tokens, positions, sampling, logits=logits[:n]))
    runner = ModelRunner(engine)
    rows = [Row(encode(prompt, runtime.config.reasoning.max_prompt_len), p, num_tokens) for prompt, p in zip(prompts, params)]
    runner.execute(StepPlan(join=rows))
    while runner.rows:
        runner.execute(StepPlan())
    assert all(row.done for row in rows)
    return counted[0], mismatches


@pytest.fixture(scope="module")
def runtimes(tiny_artifacts, tiny_config):
    return {"onnxruntime": OnnxRuntime(tiny_artifacts, device="cpu"), "torch": TorchRuntime(tiny_config)}


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_graph_sampling_follows_the_host_reference_over_heldout_captions(runtimes, tiny_config, name):
    """Seeded sampling at temperatures 0.7 and 1.0, top-k 0 and 50, over held-out captions (the
    evaluation pool, tandem.data.scenes.heldout_captions): the graphs pick host select_next's
    token at >= 99.9% of positions; every other position is a draw within float32 rounding of a
    CDF boundary (the graph sums in float32, the host in float64)."""
    runtime = runtimes[name]
    captions = heldout_captions(tiny_config.reasoning.max_prompt_len - 2, per_count=40)  # 40 fit tiny's prompts
    num_tokens = tiny_config.scene.num_tokens
    total, mismatches = 0, []
    for index, (temperature, top_k) in enumerate(SETTINGS):
        for start in range(0, len(captions), MAX_BATCH):
            chunk = captions[start : start + MAX_BATCH]
            params = [SamplingParams(seed=1000 * index + start + i, temperature=temperature, top_k=top_k) for i in range(len(chunk))]
            counted, found = _checked_generation(runtime, chunk, params, num_tokens)
            total += counted
            mismatches += found
    assert total == len(SETTINGS) * len(captions) * num_tokens >= 2000
    report = ", ".join(f"host {h} / graph {g} at {d:.1e} of the total weight from their boundary" for h, g, d in mismatches)
    print(f"{name}: {total - len(mismatches)} of {total} sampled positions identical; mismatches: {report or 'none'}")
    assert len(mismatches) <= total // 1000, report
    assert all(d < 1e-5 for _, _, d in mismatches), f"a mismatch not explained by float32 rounding: {report}"


def test_greedy_rows_draw_nothing_and_take_the_argmax(tiny_config):
    """Greedy rows (temperature 0) take the first maximum whatever their uniform and top-k (no
    division by zero), beside sampled rows; a uniform just below 1 picks the last token with any
    weight, never one top-k removed."""
    vocab = tiny_config.scene.codebook_size
    logits = torch.zeros(4, vocab)
    logits[:, 7] = logits[:, 9] = 5.0  # a tie: the first one wins
    logits[2, 3] = 4.0
    tokens = sample_tokens(
        logits,
        temperature=torch.tensor([0.0, 0.0, 1.0, 1.0]),
        top_k=torch.tensor([0, 3, 3, 2]),
        uniform=torch.tensor([0.999, UNIFORM_MAX, UNIFORM_MAX, UNIFORM_MAX], dtype=torch.float32),
    )
    assert tokens.tolist() == [7, 7, 9, 9]
    # one draw per sampled row, none for greedy ones; the float32 input stays below 1
    rng = SamplingParams(seed=5, temperature=1.0).generator()
    assert draw_uniform(rng) == SamplingParams(seed=5).generator().random()
    assert np.float32(UNIFORM_MAX) < 1.0


def test_step_graphs_declare_sampling_in_the_stage_description(tiny_config):
    """Every consumer reads the sampling inputs and the token output from tandem.stages."""
    specs = graph_specs(tiny_config)
    for graph, first in (("reasoning_prefill", ["input_ids", "prompt_lengths"]), ("reasoning_decode", ["token_ids", "positions"])):
        spec = specs[graph]
        assert spec.input_names[:5] == [*first, *SAMPLING_INPUTS]
        assert [(t.dtype, t.shape) for t in spec.inputs[2:5]] == [("float32", ("batch",)), ("int64", ("batch",)), ("float32", ("batch",))]
        assert spec.outputs[0].name == NEXT_TOKENS and (spec.outputs[0].dtype, spec.outputs[0].shape) == ("int64", ("batch",))
        assert spec.outputs[1].name == "logits"
        feeds = spec.sample_inputs({"batch": 4}, seed=1)
        assert feeds["temperature"][0] == 0 and (feeds["temperature"][1:] > 0).all()
