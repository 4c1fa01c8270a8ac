"""A build step's cache key hashes the code the step runs, found by walking imports from its entry
modules (never a hand-written list): an edit to any module it reaches re-runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tandem
from tandem.compiler.steps import code_closure

PRECISION_STEP = ("tandem.compiler.precision_gate", "tandem.toolchains.onnxruntime")  # as Build.precision_inputs


def test_the_precision_step_reaches_the_code_it_runs():
    closure = set(code_closure(*PRECISION_STEP))
    # What the hand-written list used to leave out, though the gate runs it.
    assert {"tandem.decoding", "tandem.runtimes.onnxruntime", "tandem.stages", "tandem.pipeline"} <= closure
    assert "tandem.compiler.precision" in closure and "tandem.formats.export_manifest" in closure
    assert "tandem.cli" not in closure and "tandem.bench.runner" not in closure  # unrelated code stays out


def _key(root: Path) -> str:
    script = f"from tandem.compiler.steps import code_hash; print(code_hash(*{PRECISION_STEP!r}))"
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env={"PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_an_edit_to_decoding_changes_the_precision_steps_key(tmp_path: Path):
    shutil.copytree(Path(tandem.__file__).parent, tmp_path / "tandem", ignore=shutil.ignore_patterns("__pycache__"))
    before = _key(tmp_path)
    assert _key(tmp_path) == before  # stable
    decoding = tmp_path / "tandem" / "decoding.py"
    decoding.write_text(decoding.read_text() + "\n# an edit\n")
    assert _key(tmp_path) != before
    bench = tmp_path / "tandem" / "bench" / "report.py"  # not code the precision step runs
    after = _key(tmp_path)
    bench.write_text(bench.read_text() + "\n# an edit\n")
    assert _key(tmp_path) == after
