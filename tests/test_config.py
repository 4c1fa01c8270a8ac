import json
import resource
import subprocess
import sys

import pytest

from tandem.config import load_config
from tandem.errors import TandemError
from tandem.models import count_parameters


def test_bundled_configs_load():
    for name in ("tiny", "small", "seed"):
        config = load_config(name)
        assert config.name == name
        assert config.max_len == config.reasoning.max_prompt_len + config.scene.num_tokens


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: typo\nreasoning:\n  n_layer: 3\n")
    with pytest.raises(TandemError, match=r"unknown config key 'reasoning.n_layer'"):
        load_config(path)


def test_invalid_values_are_explained(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nreasoning:\n  d_model: 30\n  n_heads: 4\n")
    with pytest.raises(TandemError, match="divisible by n_heads"):
        load_config(path)
    with pytest.raises(TandemError, match="unknown config 'nope'"):
        load_config("nope")
    with pytest.raises(TandemError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_tiny_is_under_a_million_parameters_per_stage():
    for count in count_parameters(load_config("tiny")):
        assert count.total < 1_000_000, count


def test_seed_scale_matches_published_sizes():
    counts = {c.stage: c for c in count_parameters(load_config("seed"))}
    assert counts["reasoning"].total == pytest.approx(4.3e9, rel=0.05)
    assert counts["refinement"].total == pytest.approx(1.8e9, rel=0.05)
    # top-2 of 8 experts: well under half the reasoning weights are used per token
    assert counts["reasoning"].active < 0.4 * counts["reasoning"].total


def test_seed_count_allocates_no_weights():
    """Counting 6B parameters must not allocate them (fp32 would be ~24 GB): the child's peak RSS
    stays far below the weights' size."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(
        [sys.executable, "-m", "tandem", "params", "seed", "--json"], capture_output=True, text=True, check=True
    )
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    counts = json.loads(out.stdout)["stages"]  # the JSON envelope of issue 15
    weights_gib = sum(c["total"] for c in counts) * 4 / 2**30
    assert weights_gib > 20
    assert max(peak_kib, before) / 2**20 < 2.0, f"peak RSS {peak_kib / 2**20:.2f} GiB"
