"""A toolchain that exists only in this test, registered in the registry (its targets beside the
shipped ones): `tandem build`, `tandem doctor`, the pre-flight and the repository writer work for it
with no edit anywhere else. Its "compiler" copies the ONNX graphs and records them as compiled
artifacts; its flavor serves them with ONNX Runtime in python-backend models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.formats.compiled_manifest import CompiledArtifact, CompiledManifest
from tandem.formats.export_manifest import read_manifest
from tandem.formats.targets import TARGETS, Target
from tandem.preflight import doctor_checks, target_problem
from tandem.serving.repository import FLAVORS, Flavor, PythonRuntimeTarget
from tandem.toolchains import TOOLCHAINS, Toolchain
from tandem.util import sha256_file

OPTIMISED_NOTE = "graphs staged for the copy compiler"


class ShippedRuntimeTarget(PythonRuntimeTarget):
    option_names = ("compiled",)  # the build hands its compiled folder to the flavor


class CopyToolchain(Toolchain):
    name = "copy"
    runtime = "onnxruntime"
    entry_modules = (__name__,)

    def probe(self, target: Target, precision: str | None = None) -> None:
        if not shutil.which("cp"):
            raise ImportError("the copy toolchain needs cp")

    def optimise_what(self, target, precision):
        return "graphs staged for copying"

    def compile_what(self, target, precision):
        return "copies of the graphs"

    def optimise(self, build, staging: Path) -> str:
        for entry in read_manifest(build.graphs_dir()).graphs.values():
            shutil.copy2(build.graphs_dir() / entry.file, staging / entry.file)
        return OPTIMISED_NOTE

    def compile(self, build, staging: Path, inputs: dict[str, str]) -> CompiledManifest:
        export = build.export_manifest()
        artifacts = []
        for entry in export.graphs.values():
            file = f"{entry.name}.copy"
            shutil.copy2(build.optimised_dir() / entry.file, staging / file)
            artifacts.append(
                CompiledArtifact(
                    graph=entry.name, stage=entry.stage, file=file, sha256=sha256_file(staging / file),
                    size=(staging / file).stat().st_size, inputs=entry.inputs, outputs=entry.outputs,
                )
            )
        return CompiledManifest(
            target=build.target.name, toolchain=self.name, arch="cpu", device="cpu", precision=build.precision,
            config=export.config, config_fingerprint=export.config_fingerprint, weights=export.weights,
            tool_versions={}, pinned=[], inputs=inputs, artifacts=artifacts,
        )

    def flavor(self) -> Flavor:
        return Flavor("copy", "python-backend ONNX Runtime over the copied graphs", {
            "reasoning": ShippedRuntimeTarget(), "refinement": ShippedRuntimeTarget(),
        })


COPY_TARGET = Target("copy-cpu", "copy", "cpu", "cpu", ("fp32",), "copy", "graphs copied by a toolchain defined in a test")


@pytest.fixture
def copy_toolchain(monkeypatch):
    monkeypatch.setitem(TOOLCHAINS, CopyToolchain.name, CopyToolchain())  # the registry line
    monkeypatch.setitem(TARGETS, COPY_TARGET.name, COPY_TARGET)
    before = set(FLAVORS)
    yield
    assert set(FLAVORS) == before  # nothing registered behind the registry's back


def test_doctor_and_preflight_ask_the_toolchain(copy_toolchain, monkeypatch):
    assert target_problem("copy-cpu") is None
    checks = {c.name: c for c in doctor_checks()["targets"]}
    assert checks["copy-cpu"].ok and "can run here" in checks["copy-cpu"].detail
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert target_problem("copy-cpu") == "target copy-cpu: the copy toolchain needs cp"


def test_tandem_build_runs_every_step_through_the_toolchain(copy_toolchain, tiny_artifacts: Path, tmp_path: Path, capsys):
    out = tmp_path / "build"
    code = main(["build", "--config", "tiny", "--target", "copy-cpu", "--export", str(tiny_artifacts), "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr()
    manifest = json.loads((out / "build_manifest.json").read_text())
    steps = {s["name"]: s for s in manifest["steps"]}
    assert manifest["passed"] and manifest["toolchain"] == "copy"
    assert steps["optimise"]["status"] == "ok" and steps["optimise"]["reason"] == OPTIMISED_NOTE
    assert steps["compile"]["status"] == "ok" and steps["precision"]["status"] in ("skipped", "not applicable", "n/a")
    assert {a["file"] for a in manifest["artifacts"]} == {f"compiled/{g}.copy" for g in read_manifest(tiny_artifacts).graphs}
    repository = out / "model_repository"
    assert (repository / "reasoning" / "config.pbtxt").exists() and (repository / "tandem" / "config.pbtxt").exists()
    assert 'string_value: "copy"' in (repository / "reasoning" / "config.pbtxt").read_text()  # the flavor it was written with
