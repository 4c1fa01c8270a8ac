"""Training: the grouped-MoE training forward equals the model's own forward (values and
gradients), teacher-forcing alignment matches generation, and `tandem train` writes a loadable
checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tandem.cli import main
from tandem.config import load_config
from tandem.data.scenes import SceneVocabulary
from tandem.errors import TandemError
from tandem.models import build_stages
from tandem.tokenizer import BOI, SCENE_OFFSET, encode
from tandem.train.trainer import IGNORE, TrainSettings, reasoning_batch, reasoning_hidden, train_model


def test_grouped_moe_forward_matches_model_forward_and_gradients(tiny_config):
    stages = build_stages(tiny_config)
    model = stages.reasoning.requires_grad_(True)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 259 + 64, size=(3, 20)))
    reference = model(ids)
    hidden, balance = reasoning_hidden(model, ids)
    grouped = model.lm_head(hidden)
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(balance) and balance.item() >= len(model.blocks) * 0.99  # >= 1 per layer

    weights = torch.randn_like(reference)
    grads_ref = torch.autograd.grad((reference * weights).sum(), list(model.parameters()))
    grads_new = torch.autograd.grad((grouped * weights).sum(), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads_ref, grads_new):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


def test_teacher_forcing_alignment_matches_generation():
    """The logits at BOI predict scene token 0 (as prefill does); the input at prompt_len + t is
    scene token t (as decode_step's position is) and its target is token t + 1."""
    vocab = SceneVocabulary(load_config("small"))
    captions = ["a red circle above a blue square", "a green triangle"]
    ids, targets, weights = reasoning_batch(vocab, captions, decision_weight=4.0)
    for row, caption in enumerate(captions):
        prompt = encode(caption, 64)
        scene = vocab.caption_tokens(caption).reshape(-1)
        p = len(prompt)
        assert ids[row, p - 1] == BOI and targets[row, p - 1] == scene[0]
        assert (targets[row, : p - 1] == IGNORE).all()
        for t in (0, 17, 254):
            assert ids[row, p + t] == scene[t] + SCENE_OFFSET
            assert targets[row, p + t] == scene[t + 1]
        assert (targets[row] != IGNORE).sum() == scene.size
        # The decisions (3 plan entries in row 0, 9 lattice cells) weigh 1 + 4, other tokens 1.
        scene_weights = weights[row, p - 1 : p - 1 + scene.size].reshape(16, 16)
        decisions = sorted(map(tuple, torch.nonzero(scene_weights == 5.0).tolist()))
        assert decisions == sorted([(0, 0), (0, 1), (0, 2), *vocab.slot_cells])
        assert int((scene_weights == 1.0).sum()) == 256 - 12 and float(weights[row, : p - 1].sum()) == 0.0
    assert (targets[1, len(encode(captions[1], 64)) + 255 :] == IGNORE).all()  # padding of the shorter row
    # Plan rows: cut after the plan and the token that ends it.
    ids, targets, _ = reasoning_batch(vocab, captions, scene_tokens=4)
    assert [int((t != IGNORE).sum()) for t in targets] == [4, 4]
    scene = vocab.caption_tokens(captions[0]).reshape(-1)
    assert targets[0, len(encode(captions[0], 64)) - 1 :][:4].tolist() == scene[:4].tolist()


def test_train_rejects_a_config_without_room_for_scenes(tiny_config, tmp_path):
    with pytest.raises(TandemError, match="cannot hold synthetic scenes"):
        train_model(
            tiny_config, tmp_path / "x.safetensors", TrainSettings(reasoning_steps=1, canvas_steps=1, refinement_steps=1)
        )


def test_train_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    code = main(
        ["train", "--config", "small", "--out", str(out), "--reasoning-steps", "2", "--canvas-steps", "1",
         "--refinement-steps", "2", "--batch", "2", "--threads", "1"]
    )
    assert code == 0, capsys.readouterr().err
    config = load_config("small")
    fresh = build_stages(config.model_copy(update={"checkpoint": None}))
    trained = build_stages(config, out)  # loads (float16 on disk -> float32 modules)
    assert trained.reasoning.lm_head.weight.dtype == torch.float32
    assert not torch.equal(trained.refinement.head.weight, fresh.refinement.head.weight)
    report = json.loads(out.with_suffix(".train.json").read_text())
    assert report["reasoning"]["steps"] == 3 and np.isfinite(report["reasoning"]["final_loss"])
    assert out.with_suffix(".train.png").stat().st_size > 0


def test_train_command_rejects_bad_arguments(tmp_path, capsys):
    assert main(["train", "--config", "small", "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(["train", "--config", "small", "--out", str(tmp_path / "x.safetensors"), "--stages", "decoder"]) == 2
    assert "stages to train" in capsys.readouterr().err
    assert main(["train", "--config", "small", "--out", str(tmp_path / "x.safetensors"), "--reasoning-steps", "0"]) == 2
    assert "give --reasoning-steps or --init" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
