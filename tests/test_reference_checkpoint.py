"""The committed reference checkpoint, end to end: the small config loads it by default; the demo
caption comes out right and a few held-out captions get exactly the verdicts the committed
evaluation report (benchmarks/results/eval-small.json) records for them (the checkpoint is about 91%
accurate, so one of them fails there and here), with identical tokens from eager PyTorch, ONNX
Runtime (the validated export) and the Triton ensemble serving that export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tandem.config import load_config
from tandem.data.scenes import SceneVocabulary, heldout_captions
from tandem.eval.checker import check_image, check_tokens
from tandem.eval.evaluate import pipeline_generator, server_generator
from tandem.pipeline import Pipeline
from tandem.runtimes import make_runtime
from tandem.train.trainer import trained_stages_of

ROOT = Path(__file__).resolve().parents[1]
DEMO_CAPTION = "a red circle above a blue square"


@pytest.fixture(scope="module")
def config():
    return load_config("small")


@pytest.fixture(scope="module")
def captions(config) -> list[str]:
    """The demo caption plus two held-out captions of two objects and two of three."""
    held = heldout_captions(SceneVocabulary(config).max_caption_bytes, per_count=2)
    return [DEMO_CAPTION, *held]


def test_the_small_config_ships_a_trained_checkpoint_with_its_card(config):
    checkpoint = Path(config.checkpoint)
    assert checkpoint == (ROOT / "checkpoints" / "small.safetensors").resolve() and checkpoint.is_file()
    assert trained_stages_of(checkpoint) == {"reasoning", "refinement"}
    card = (ROOT / "checkpoints" / "small.md").read_text()
    assert "held-out" in card and "tandem train" in card
    report = json.loads((ROOT / "benchmarks" / "results" / "eval-small.json").read_text())
    from tandem.util import sha256_file

    assert report["checkpoint_sha256"] == sha256_file(checkpoint), "eval-small.json is stale: run `tandem eval` again"


@pytest.fixture(scope="module")
def recorded_verdicts(captions) -> dict[str, bool]:
    report = json.loads((ROOT / "benchmarks" / "results" / "eval-small.json").read_text())
    failed = {f["caption"] for f in report["runtimes"]["torch"]["failures"]}
    verdicts = {caption: caption not in failed for caption in captions[1:]}
    verdicts[DEMO_CAPTION] = True  # the demo caption must always come out right
    return verdicts


def test_captions_get_the_recorded_verdicts_identically_across_runtimes(
    config, captions, recorded_verdicts, small_artifacts
):
    vocab = SceneVocabulary(config)
    eager = pipeline_generator(Pipeline(make_runtime("torch", config=config)))(captions)
    onnx = pipeline_generator(Pipeline(make_runtime("onnxruntime", artifacts=small_artifacts)))(captions)
    np.testing.assert_array_equal(onnx[0], eager[0])
    for caption, image, onnx_image in zip(captions, eager[1], onnx[1]):
        verdict = check_image(caption, image, vocab.cell_px)
        assert verdict.passed == recorded_verdicts[caption], (caption, verdict.reason)
        assert check_image(caption, onnx_image, vocab.cell_px).passed == verdict.passed, caption
    grid = eager[0][0].reshape(vocab.height, vocab.width)
    assert check_tokens(DEMO_CAPTION, grid, vocab).passed


def test_the_served_ensemble_agrees(config, captions, recorded_verdicts, small_artifacts, tmp_path):
    from tandem.serving.repository import write_repository
    from tandem.serving.server import TritonServer

    vocab = SceneVocabulary(config)
    expected = pipeline_generator(Pipeline(make_runtime("onnxruntime", artifacts=small_artifacts)))(captions)[0]
    repository = write_repository(small_artifacts, tmp_path / "model_repository")
    with TritonServer(repository, startup_timeout=180) as server:
        served, images = server_generator(server.grpc_url)(captions)
    np.testing.assert_array_equal(served.reshape(len(captions), -1), expected.reshape(len(captions), -1))
    for caption, image in zip(captions, images):
        verdict = check_image(caption, image, vocab.cell_px)
        assert verdict.passed == recorded_verdicts[caption], (caption, verdict.reason)
