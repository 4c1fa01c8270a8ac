"""The `tandem` command as a user runs it: real subprocesses, real files."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def tandem(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"tandem {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_small_export_matches_pytorch_and_generates_a_png(small_artifacts, tmp_path):
    out = small_artifacts
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] and manifest["generation"]["tokens_equal"]
    assert all(g["passed"] for g in manifest["graphs"].values())

    png, tokens = tmp_path / "out.png", tmp_path / "tokens.npy"
    result = tandem(
        "generate", "a red circle above a blue square", "--runtime", "onnxruntime",
        "--artifacts", str(out), "--out", str(png), "--tokens-out", str(tokens),
    )
    assert str(png) in result.stdout
    image = Image.open(png)
    factor = 2 ** len(manifest["config"]["refinement"]["decoder_channels"])
    assert image.size == (manifest["config"]["scene"]["grid_width"] * factor, manifest["config"]["scene"]["grid_height"] * factor)

    # Edit a token and re-render with the refinement stage alone.
    grid = np.load(tokens)
    grid[0, 0] = (grid[0, 0] + 1) % manifest["config"]["scene"]["codebook_size"]
    np.save(tokens, grid)
    rendered = tmp_path / "edited.png"
    tandem("render", "--tokens", str(tokens), "--artifacts", str(out), "--out", str(rendered))
    assert np.asarray(Image.open(rendered)).shape == np.asarray(image).shape


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "", "--artifacts", "{art}"], "prompt is empty"),
        (["generate", "hi", "--artifacts", "{tmp}/missing"], "does not exist"),
        (["generate", "hi", "--runtime", "tvm", "--artifacts", "{art}"], "unknown runtime 'tvm'"),
        (["generate", "y" * 500, "--artifacts", "{art}"], "shorten the prompt"),
        (["export", "--config", "{tmp}/typo.yaml", "--out", "{tmp}/x"], "unknown config key 'scene.grid_heigth'"),
        (["render", "--tokens", "{tmp}/bad.npy", "--artifacts", "{art}"], "outside the codebook"),
    ],
)
def test_cli_errors_are_clear(args, message, tiny_artifacts, tmp_path):
    (tmp_path / "typo.yaml").write_text("name: typo\nscene:\n  grid_heigth: 4\n")
    np.save(tmp_path / "bad.npy", np.full((4, 4), 10_000, dtype=np.int64))
    args = [a.format(art=tiny_artifacts, tmp=tmp_path) for a in args]
    result = tandem(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
