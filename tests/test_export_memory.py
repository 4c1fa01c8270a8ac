"""Exporting within memory: weights materialised once (meta device, then module by module or tensor
by tensor from safetensors) in the export dtype, and the pre-flight that refuses an export that
would not fit, before anything is allocated."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tandem.config import load_config
from tandem.memory import NotEnoughMemory, available_memory, export_memory_estimate, require_export_memory
from tandem.models import build_stages, count_parameters, save_weights

REPO = Path(__file__).resolve().parents[1]


def _state(stages):
    return {f"{n}.{k}": v for n, m in stages.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_weights_are_the_fp32_weights_rounded(tiny_config, dtype, torch_dtype):
    full, low = _state(build_stages(tiny_config)), _state(build_stages(tiny_config, dtype=dtype))
    assert all(t.dtype == torch_dtype and not t.is_meta for t in low.values())
    assert all(torch.equal(low[k], full[k].to(torch_dtype)) for k in full)


def test_checkpoint_loads_straight_into_the_export_dtype(tiny_config, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(build_stages(tiny_config.model_copy(update={"seed": 3})), path)
    full = _state(build_stages(tiny_config, checkpoint=path))
    low = _state(build_stages(tiny_config, checkpoint=path, dtype="bf16"))
    assert all(low[k].dtype == torch.bfloat16 and torch.equal(low[k], full[k].to(torch.bfloat16)) for k in full)


def test_medium_weights_are_materialised_once(tmp_path):
    """Peak RSS of building the medium stages (0.81B parameters) in bf16, in a fresh process:
    the weights once plus the largest module in fp32 and the interpreter, far below two copies."""
    config = load_config("medium")
    weight_bytes = sum(c.total for c in count_parameters(config)) * 2
    estimate = export_memory_estimate(config, "bf16")
    if (available_memory() or 0) < 3 * weight_bytes:
        pytest.skip(f"needs {3 * weight_bytes / 2**30:.1f} GiB free to measure safely")
    script = textwrap.dedent(
        """
        import resource, torch
        from tandem.config import load_config
        from tandem.models import build_stages
        torch.set_num_threads(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stages = build_stages(load_config("medium"), dtype="bf16")
        assert all(p.dtype == torch.bfloat16 for _, m in stages.items() for p in m.parameters())
        print(before * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    before, peak = map(int, out.stdout.split())
    largest_module_fp32 = 3 * config.reasoning.n_experts * config.reasoning.d_model * config.reasoning.d_ff * 4
    assert peak - before <= weight_bytes + largest_module_fp32 + (256 << 20), (peak - before, weight_bytes)
    assert estimate.weight_bytes == weight_bytes


def test_preflight_refuses_with_the_figure_and_the_fix():
    seed = load_config("seed")
    with pytest.raises(NotEnoughMemory) as refused:
        require_export_memory(seed, "fp32", available=24 << 30)
    message = str(refused.value)
    assert "exporting seed (6.18B parameters, 23.0 GiB of fp32 weights) needs about" in message
    assert "24.0 GiB is available" in message and "machine with more memory" in message
    assert require_export_memory(load_config("tiny"), available=24 << 30).config == "tiny"


def test_cli_export_refuses_before_allocating(tmp_path):
    seed = load_config("seed")
    if export_memory_estimate(seed).peak_bytes <= (available_memory() or 1 << 62):
        pytest.skip("this machine has the memory to export seed; the refusal cannot be shown here")
    out = tmp_path / "seed"
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "export", "--config", "seed", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "needs about" in result.stderr and "available" in result.stderr
    assert not out.exists()
