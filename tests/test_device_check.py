"""benchmarks/device_check.py (issue 28's device check) on this CPU: the tiny config, a tiny budget.
The script is meant for a lent GPU; here it runs its eager and torch.compile paths, skips the CUDA
graph paths with the reason, and must still write a complete report. The CUDA-only part is checked
only where torch sees a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"
# What the GPU machine lacks (or what the script must not need): each is shadowed by a package whose
# import fails, so a passing run shows the script needs only the standard library, torch, numpy and
# tandem. (Shadowed, not hidden: torch probes optional modules with find_spec.)
BLOCKED = ("pydantic", "yaml", "safetensors", "PIL", "onnx", "onnxruntime", "onnxscript", "tqdm", "tritonclient")
NO_CUDA = "CUDA graph capture and replay need a CUDA GPU; this machine has none (the script runs there when a GPU is lent)"


def _run(out: Path, *extra: str, timeout: float = 240, shadow: bool = True) -> tuple[subprocess.CompletedProcess, dict]:
    shadows = out.parent / f"{out.name}-shadows"
    for name in BLOCKED if shadow else ():
        (shadows / name).mkdir(parents=True, exist_ok=True)
        (shadows / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine', name='{name}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadows), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--configs", "tiny", "--batches", "1,8", "--rounds", "3", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return result, results


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory):
    return _run(tmp_path_factory.mktemp("device-check") / "cpu", "--device", "cpu", "--budget-s", "150", "--compile-reserve-s", "0")


def test_cpu_run_writes_a_complete_report(cpu_run):
    result, results = cpu_run
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "ok"
    assert results["status"] == "ok" and results["failures"] == []
    assert results["device_info"]["torch"] == torch.__version__ and results["device_info"]["device"] == "cpu"
    assert results["bandwidth"]["gb_s_median"] > 0
    phases = {p["phase"]: p["status"] for p in results["phases"]}
    assert phases["tiny/build"] == "ok" and phases["tiny/cuda-torch-package"] == "skipped"
    assert results["elapsed_s"] < 150 + 30
    tiny = results["configs"]["tiny"]
    assert tiny["num_tokens"] == 16
    for batch in ("1", "8"):
        record = tiny["batches"][batch]
        assert set(record["paths"]) == {"eager", "compiled"}, record
        for path in ("graph", "compiled_graph"):  # skipped with the reason, not silently
            assert "CUDA" in record["skipped"][path]
        assert record["rounds"] >= 2
        for res in record["paths"].values():
            assert res["step_ms_median"] > 0 and res["step_ms_spread"][0] <= res["step_ms_median"] <= res["step_ms_spread"][1]
            assert res["generation_ms_median"] > res["step_ms_median"] and res["tokens_per_s_median"] > 0
            assert res["ms_per_image_median"] == pytest.approx(res["generation_ms_median"] / int(batch), abs=1e-3)
        roof = record["roofline"]
        # one row picks exactly top-2 experts per layer; 8 rows at least 2 and at most all 8
        assert roof["distinct_experts_per_layer_mean"] == 2.0 if batch == "1" else 2.0 <= roof["distinct_experts_per_layer_mean"] <= 8.0
        assert roof["routed_bytes_mean"] < roof["dense_bytes"] and roof["routed_floor_ms"] > 0
    report = (results_dir := Path(results["args"]["out"])) / "report.md"
    text = report.read_text()
    assert "| tiny | 1 | eager |" in text and "| tiny | 8 | compiled |" in text and "skipped: CUDA graphs need a CUDA device" in text
    assert (results_dir / "results.json").exists()


def test_eager_and_compiled_paths_produce_the_same_tokens(cpu_run):
    """Every path's whole generations from the same prefill: greedy rows (even rows) identical to
    eager's in every round; sampled rows (odd rows, temperature 1, top-k 8, uniforms from one seeded
    table) equal at every position here too (float differences could move a draw near a CDF
    boundary; none did)."""
    _, results = cpu_run
    for batch, record in results["configs"]["tiny"]["batches"].items():
        for path, res in record["paths"].items():
            tokens = res["tokens"]
            assert tokens["greedy_rows_identical"], (batch, path)
            if batch == "8":
                assert tokens["sampled_positions"] > 0
            assert tokens["sampled_positions_equal"] == tokens["sampled_positions"], (batch, path, tokens)


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "seed"])
def test_the_scripts_config_reader_agrees_with_tandem_config(name: str):
    """The script reads configs without pydantic; every field the reasoning stage uses must be what
    tandem.config gives."""
    import importlib.util

    from tandem.config import load_config

    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mine, theirs = module.load_device_config(name), load_config(name)
    assert mine.name == theirs.name and mine.seed == theirs.seed and mine.max_len == theirs.max_len
    assert (mine.checkpoint is None) == (theirs.checkpoint is None)
    if theirs.checkpoint:
        assert Path(mine.checkpoint).resolve() == Path(theirs.checkpoint).resolve()
    for section in ("scene", "reasoning"):
        expected = getattr(theirs, section).model_dump()
        assert {k: getattr(getattr(mine, section), k) for k in expected} == expected, section
    assert mine.reasoning.head_dim == theirs.reasoning.head_dim and mine.scene.num_tokens == theirs.scene.num_tokens


def test_the_scripts_greedy_generations_are_tandems(cpu_run):
    """The script's own decode loop (static cache written in place, token fed back on the device)
    gives, on its greedy rows, the tokens of tandem's pipeline on the torch runtime for the same prompts."""
    from tandem.config import load_config
    from tandem.pipeline import Pipeline
    from tandem.runtimes.torch_eager import TorchRuntime

    _, results = cpu_run
    record = results["configs"]["tiny"]["batches"]["8"]
    greedy_prompts = record["prompts"][0::2]
    expected = Pipeline(TorchRuntime(load_config("tiny"))).generate_tokens(greedy_prompts).reshape(len(greedy_prompts), -1)
    actual = [row for i, row in enumerate(record["eager_tokens"]) if i % 2 == 0]
    assert actual == expected.tolist()


def test_a_failing_phase_is_recorded_and_exits_nonzero(tmp_path: Path):
    """A config that cannot be built: the report records the failure and the script exits 1."""
    result, results = _run(tmp_path / "bad", "--device", "cpu", "--budget-s", "30", "--configs", "no-such-config", "--no-aot")
    assert result.returncode == 1, result.stderr[-2000:]
    assert results["status"] == "failed"
    assert any(f.startswith("no-such-config/build") for f in results["failures"])
    assert "Failures:" in (tmp_path / "bad" / "report.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_run_replays_the_whole_step_as_one_graph(tmp_path: Path):
    # tandem's own requirements importable: the cuda-torch package phase runs too
    result, results = _run(tmp_path / "cuda", "--device", "cuda", "--budget-s", "200", timeout=400, shadow=False)
    assert result.returncode == 0, result.stderr[-4000:]
    for batch, record in results["configs"]["tiny"]["batches"].items():
        assert {"eager", "graph"} <= set(record["paths"]), record
        assert record["paths"]["graph"]["tokens"]["greedy_rows_identical"]
        assert record["paths"]["graph"]["tokens"]["sampled_positions_equal"] == record["paths"]["graph"]["tokens"]["sampled_positions"]
    assert results["cuda_torch_package"]["captured"] and results["cuda_torch_package"]["tokens_equal"]
