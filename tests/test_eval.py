"""Synthetic scenes and the compositional checker, end to end: the data is deterministic and
disjoint, the checker accepts every ground-truth render and rejects wrong captions, and
`tandem eval` reports accuracy per runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tandem.cli import main
from tandem.config import load_config
from tandem.data.scenes import (
    SceneVocabulary,
    all_scenes,
    caption_split,
    heldout_captions,
    parse_caption,
    sample_captions,
)
from tandem.errors import TandemError
from tandem.eval.checker import check_image, check_tokens


@pytest.fixture(scope="module")
def small_config():
    return load_config("small")


@pytest.fixture(scope="module")
def vocab(small_config) -> SceneVocabulary:
    return SceneVocabulary(small_config)


@pytest.fixture(scope="module")
def sample_scenes(vocab):
    scenes = all_scenes(vocab.max_caption_bytes)
    picks = np.random.default_rng(0).permutation(len(scenes))[:60]
    by_count = {n: [s for s in scenes if len(s.objects) == n][:5] for n in (1, 2, 3)}
    return [scenes[i] for i in picks] + [s for group in by_count.values() for s in group]


def test_tokens_fit_the_codebook_and_describe_the_scene(vocab):
    scene = parse_caption("a red circle left of a blue square above a green triangle")
    tokens = vocab.scene_tokens(scene)
    assert tokens.shape == (16, 16) and tokens.min() >= 0 and tokens.max() < 512
    # The circle and square share the top lattice row, the triangle sits under the square.
    assert vocab.placements(scene) == [(1, 1), (1, 6), (6, 6)]
    # Row 0 opens with the plan: each caption object, in order, with its lattice slot.
    assert [vocab.describe_token(t) for t in tokens[0, :4]] == [
        ("plan", "red", "circle", (0, 0)),
        ("plan", "blue", "square", (0, 1)),
        ("plan", "green", "triangle", (1, 1)),
        ("background", 0, 3),
    ]
    assert vocab.describe_token(tokens[15, 15]) == ("background", 15, 15)
    assert vocab.describe_token(tokens[2, 2]) == ("object", "red", "circle")  # footprint centres
    assert vocab.describe_token(tokens[2, 7]) == ("object", "blue", "square")
    assert vocab.describe_token(tokens[7, 7]) == ("object", "green", "triangle")
    assert vocab.describe_token(tokens[1, 1]) == ("background", 1, 1)
    objects = [(r, c) for (r, c), t in np.ndenumerate(tokens) if vocab.describe_token(t)[0] == "object"]
    assert objects == [(2, 2), (2, 7), (7, 7)] and set(objects) <= set(vocab.slot_cells)
    assert vocab.describe_token(511) == ("unused",)
    assert vocab.plan_offset + vocab.n_plan_tokens <= 512


def test_every_scene_puts_objects_on_the_lattice_and_singles_in_the_middle(vocab):
    slot_cells = set(vocab.slot_cells)
    assert len(slot_cells) == 9
    for scene in all_scenes(vocab.max_caption_bytes)[::97]:
        tokens = vocab.scene_tokens(scene)
        kinds = [vocab.describe_token(t) for t in tokens.reshape(-1)]
        cells = {divmod(i, 16) for i, k in enumerate(kinds) if k[0] == "object"}
        assert len(cells) == len(scene.objects) and cells <= slot_cells, scene.caption
        plan = [k for k in kinds if k[0] == "plan"]
        assert [(k[1], k[2]) for k in plan] == [(o.colour, o.shape) for o in scene.objects], scene.caption
    assert np.argwhere((vocab.caption_tokens("a green square") >= 256)[1:]).tolist() == [[6, 7]]


def test_render_matches_token_painting(vocab, sample_scenes):
    """The Pillow render of a scene is exactly the ideal painting of its tokens (what a perfect
    refinement stage produces)."""
    for scene in sample_scenes:
        image = vocab.render(scene)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, vocab.render_tokens(vocab.scene_tokens(scene)), err_msg=scene.caption)


def test_checker_accepts_every_ground_truth_render(vocab, sample_scenes):
    for scene in sample_scenes:
        result = check_image(scene.caption, vocab.render(scene), vocab.cell_px)
        assert result.passed, (scene.caption, result.reason, result.detected)
        assert check_tokens(scene.caption, vocab.scene_tokens(scene), vocab).passed


@pytest.mark.parametrize(
    ("wrong", "reason"),
    [
        ("a blue square above a red circle", "relation"),  # relation reversed
        ("a red circle below a blue square", "relation"),
        ("a red circle left of a blue square", "relation"),
        ("a red square above a blue square", "not the caption's"),  # wrong shape
        ("a green circle above a blue square", "not the caption's"),  # wrong colour
        ("a red circle", "found 2 objects"),  # an object too many
        ("a red circle above a blue square left of a red triangle", "found 2 objects"),  # one missing
    ],
)
def test_checker_rejects_what_the_image_does_not_show(vocab, wrong, reason):
    image = vocab.render(parse_caption("a red circle above a blue square"))
    result = check_image(wrong, image, vocab.cell_px)
    assert not result.passed and reason in result.reason


def test_checker_ignores_specks_and_sees_blank_images(vocab):
    image = vocab.render(parse_caption("a yellow triangle"))
    image[0:3, 0:3] = (214, 48, 49)  # a red speck well below an object's area
    assert check_image("a yellow triangle", image, vocab.cell_px).passed
    blank = np.full_like(image, 236)
    assert "found 0 objects" in check_image("a yellow triangle", blank, vocab.cell_px).reason


def test_captions_are_deterministic_disjoint_and_fit_the_prompt(vocab):
    held = heldout_captions(vocab.max_caption_bytes)
    assert held == heldout_captions(vocab.max_caption_bytes)
    assert len(held) == len(set(held)) >= 60
    assert all(caption_split(c) == "heldout" for c in held)
    train = sample_captions(np.random.default_rng(1), 300, vocab.max_caption_bytes, split="train")
    assert not set(train) & set(held)
    assert all(len(c.encode()) <= 62 for c in train + held)
    assert {len(parse_caption(c).objects) for c in train} == {1, 2, 3}
    # By default the evaluation scores the whole held-out pool, not a sample.
    pool = [s.caption for s in all_scenes(vocab.max_caption_bytes) if caption_split(s.caption) == "heldout"]
    assert sorted(held) == sorted(pool) and len(heldout_captions(vocab.max_caption_bytes, per_count=2)) == 4


@pytest.mark.parametrize(
    "caption",
    ["a red blob", "a red circle near a blue square", "", "a red circle left of a blue square right of a red circle"],
)
def test_captions_outside_the_grammar_are_rejected(caption):
    with pytest.raises(TandemError):
        parse_caption(caption)


def test_eval_command_reports_accuracy(tmp_path, capsys):
    """`tandem eval` on the small config's own (committed, trained) checkpoint."""
    out = tmp_path / "eval.json"
    code = main(["eval", "--config", "small", "--runtime", "torch", "--per-count", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    run = report["runtimes"]["torch"]
    assert report["checkpoint"] == "small.safetensors"
    assert report["captions"] == run["captions"] == 4  # no one-object caption is held out
    assert len(run["failures"]) == round((1 - run["accuracy"]) * 4)
    assert {k: v["captions"] for k, v in run["by_objects"].items()} == {"2": 2, "3": 2}  # accuracy per object count
    assert sum(v["accuracy"] * v["captions"] for v in run["by_objects"].values()) == pytest.approx(run["accuracy"] * 4)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "held-out compositional accuracy" in capsys.readouterr().out


def test_eval_command_explains_missing_export(tmp_path, capsys):
    code = main(["eval", "--config", "small", "--runtime", "onnxruntime", "--artifacts", str(tmp_path / "none")])
    assert code == 2 and "tandem export" in capsys.readouterr().err


def test_eval_never_overwrites_a_file_it_did_not_write(tmp_path, capsys, tiny_config):
    """`tandem eval` used to overwrite a foreign report JSON and PNG. It recognises its own outputs
    by content and refuses anything else with the fix; its own outputs it replaces."""
    from tandem.eval.evaluate import RuntimeEval, check_outputs_owned, plot_samples, write_report

    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}\n')
    code = main(["eval", "--config", "small", "--runtime", "torch", "--per-count", "1", "--out", str(foreign)])
    assert code != 0 and foreign.read_text() == '{"mine": true}\n'
    err = capsys.readouterr().err
    assert "is not a file tandem eval wrote" in err and "Choose another --out/--plot" in err
    run = RuntimeEval("torch", "test", 1.0, 1.0, 0, 0.0, [], {})
    own, png = tmp_path / "eval.json", tmp_path / "eval.png"
    write_report(own, tiny_config, None, [run], [])
    write_report(own, tiny_config, None, [run], [])  # its own report: replaced
    plot_samples(png, run)
    plot_samples(png, run)
    check_outputs_owned(own, png)
    picture = tmp_path / "holiday.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(picture)  # somebody's PNG, without tandem's mark
    with pytest.raises(TandemError, match="holiday.png exists and is not a file tandem eval wrote"):
        plot_samples(picture, run)
    for stranger in (tmp_path / "text.json", tmp_path / "list.json"):
        stranger.write_text("not json" if stranger.stem == "text" else "[1, 2]")
        with pytest.raises(TandemError, match="refusing to overwrite"):
            write_report(stranger, tiny_config, None, [run], [])
