import numpy as np
import pytest
import torch

from tandem.decoding import make_decode_engine
from tandem.errors import ArtifactError
from tandem.models import build_stages, load_weights, save_weights
from tandem.pipeline import Pipeline
from tandem.runtimes.torch_eager import TorchRuntime
from tandem.sampling import SamplingParams
from tandem.tokenizer import SCENE_OFFSET, encode_batch


def _state(stages):
    return {f"{n}.{k}": v for n, m in stages.items() for k, v in m.state_dict().items()}


def test_seeded_init_is_deterministic(tiny_config):
    a, b = _state(build_stages(tiny_config)), _state(build_stages(tiny_config))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _state(build_stages(tiny_config.model_copy(update={"seed": 1})))
    assert not torch.equal(a["reasoning.lm_head.weight"], other["reasoning.lm_head.weight"])


def test_safetensors_round_trip(tiny_config, tmp_path):
    source = build_stages(tiny_config.model_copy(update={"seed": 7}))
    path = tmp_path / "w.safetensors"
    save_weights(source, path)
    loaded = build_stages(tiny_config, checkpoint=path)
    a, b = _state(source), _state(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a server running as another user
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left


def test_bad_checkpoints_are_refused(tiny_config, small_config_for_mismatch, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        build_stages(tiny_config, checkpoint=tmp_path / "none.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        build_stages(tiny_config, checkpoint=corrupt)
    other = tmp_path / "other.safetensors"
    save_weights(build_stages(small_config_for_mismatch), other)
    with pytest.raises(ArtifactError, match="does not match"):
        load_weights(build_stages(tiny_config), other)


@pytest.fixture
def small_config_for_mismatch(tiny_config):
    return tiny_config.model_copy(update={"reasoning": tiny_config.reasoning.model_copy(update={"d_model": 48})})


def test_kv_cache_decode_matches_full_recompute(tiny_config):
    """Prefill + decode steps over the engine's in-place cache give the same logits as running the
    whole sequence (the two-part softmax over cache and new key equals one softmax over both)."""
    runtime = TorchRuntime(tiny_config)
    model = runtime.stages.reasoning
    ids, lengths = encode_batch(["a red circle"], tiny_config.reasoning.max_prompt_len)
    scene = np.array([5, 17, 3, 42, 0, 63])
    engine = make_decode_engine(runtime, 1)
    step_logits = [np.empty((1, tiny_config.scene.codebook_size), np.float32) for _ in scene]
    engine.prefill([0], ids, lengths, logits=step_logits[0])
    for i, token in enumerate(scene[:-1]):
        engine.step(1, np.array([token]), lengths + i, logits=step_logits[i + 1])
    with torch.no_grad():
        full = model(torch.from_numpy(np.concatenate([ids, (scene[None, :-1] + SCENE_OFFSET)], axis=1)))
    expected = full[0, ids.shape[1] - 1 :]
    torch.testing.assert_close(torch.from_numpy(np.concatenate(step_logits)), expected, atol=1e-5, rtol=1e-4)


def test_sparse_and_dense_moe_agree(tiny_config):
    moe = build_stages(tiny_config).reasoning.blocks[0].moe
    x = torch.randn(9, tiny_config.reasoning.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(x, sparse=True), moe(x, sparse=False), atol=1e-6, rtol=1e-5)


def test_batched_generation_matches_single_prompts(tiny_config):
    """Right-padding in a batch must not change any prompt's tokens."""
    pipe = Pipeline(TorchRuntime(tiny_config))
    prompts = ["a red circle above a blue square", "x", "two green triangles"]
    params = [SamplingParams(seed=s, temperature=0.9, top_k=8) for s in (1, 2, 3)]
    batched = pipe.generate_tokens(prompts, params)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        np.testing.assert_array_equal(batched[i], pipe.generate_tokens([prompt], p)[0])
