"""``tandem deploy``: a finished ``tandem build`` output -> the split deployment bundle.

Layout of the bundle (written in a staging folder and renamed into place, complete or absent)::

    <out>/repositories/reasoning/    Triton model repository: reasoning only  (upload to <storage.uri>/<config>/reasoning)
    <out>/repositories/refinement/   Triton model repository: refinement only (upload to <storage.uri>/<config>/refinement)
    <out>/manifests/kserve.yaml      Namespace, Istio mTLS, access and body-limit policies, ServiceAccounts,
                                     ServingRuntimes, InferenceServices, PDBs, InferenceGraph
    <out>/deploy.json                what it was made from (build, target, config) and every object's validation

Each repository is the same writer's output as the build's own (tandem.serving.repository) for
one stage, with the build's repository options and flavor, without bytecode (``__pycache__``: the
python backend needs none, and Triton runs with a read-only root). The storage path comes from the
build's model config; the body limit from the repositories' recorded ``tandem.max_request_bytes``.
Every object is validated offline before the bundle is moved into place.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tandem.formats.targets import Target, get_target
from tandem.deploy.settings import DeploySettings
from tandem.errors import ArtifactError, TandemError
from tandem.serving.interface import REASONING, REFINEMENT
from tandem.util import atomic_directory

BUNDLE_MANIFEST = "deploy.json"
MANIFESTS_FILE = "manifests/kserve.yaml"
# Bundled model configs that are not for production traffic (seed is the published full-size system).
NON_PRODUCTION_CONFIGS = {"tiny": "the test config", "small": "the CPU demo config", "medium": "a seeded-init config"}
# A storage URI with one of these words (between / . _ - :) looks like a non-production bucket.
NON_PRODUCTION_WORDS = {"dev", "devel", "development", "test", "tests", "testing", "tmp", "temp", "staging", "stage", "sandbox",
                        "scratch", "ci", "demo", "example", "local", "playground", "experiment", "experiments"}


@dataclass
class Bundle:
    out: Path
    target: Target
    config_name: str
    objects: list[dict]
    validated_by: list[str]
    storage_uris: dict[str, str]
    max_request_bytes: int
    warnings: list[str] = field(default_factory=list)

    def repository(self, stage: str) -> Path:
        return self.out / "repositories" / stage


def production_warning(config_name: str, storage_uri: str) -> str | None:
    """A warning when a non-production model config goes to a storage URI that looks like production."""
    what = NON_PRODUCTION_CONFIGS.get(config_name)
    if what is None:
        return None
    words = {w for w in re.split(r"[/._:\-]+", storage_uri.lower()) if w}
    if words & NON_PRODUCTION_WORDS:
        return None
    return (
        f"this is a {config_name!r} build ({what}, not for production traffic) going to {storage_uri}, which looks like "
        "production storage; deploy a production build (e.g. --config seed) or point storage.uri at a dev/test bucket"
    )


def strip_bytecode(root: Path) -> int:
    """Remove ``__pycache__`` folders and ``*.pyc`` files under ``root`` (a staging folder this command
    wrote). Returns how many were removed."""
    removed = 0
    for cache in sorted(root.rglob("__pycache__"), reverse=True):
        if cache.is_dir():
            shutil.rmtree(cache)
            removed += 1
    for pyc in root.rglob("*.py[co]"):
        pyc.unlink()
        removed += 1
    return removed


def _read_build(build: Path):
    from tandem.formats.build_manifest import BUILD_MANIFEST, read_build_manifest

    manifest = read_build_manifest(build)
    if manifest is None:
        raise ArtifactError(f"{build} has no readable {BUILD_MANIFEST}; run `tandem build --target TARGET --out {build}` first")
    if not manifest.passed:
        raise ArtifactError(f"the build in {build} did not pass (see {build / BUILD_MANIFEST}); fix it and build again")
    return manifest


def _check_out(out: Path) -> None:
    """Replace only a bundle this command wrote: never delete what it did not write."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / BUNDLE_MANIFEST).exists())):
        raise TandemError(f"{out} exists and is not a tandem deploy bundle; choose an empty or new --out")


def write_stage_repository(build: Path, target: Target, options: dict, stage: str, out: Path) -> Path:
    from tandem.formats.build_manifest import COMPILED_DIR, EXPORT_DIR
    from tandem.serving.repository import write_repository
    from tandem.toolchains import get_toolchain

    toolchain = get_toolchain(target.toolchain)
    options = dict(options)
    if toolchain.compiles_ahead:
        options["compiled"] = build / COMPILED_DIR
    return write_repository(build / EXPORT_DIR, out, flavor=toolchain.flavor() or target.flavor, stages=(stage,), **options)


def write_bundle(build: str | Path, settings: DeploySettings, out: str | Path) -> Bundle:
    from tandem.deploy.manifests import build_objects
    from tandem.deploy.validate import validate_all
    from tandem.serving.repository import max_request_bytes

    build, out = Path(build), Path(out)
    manifest = _read_build(build)
    target = get_target(manifest.target)
    config_name = manifest.config
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", config_name):
        raise ArtifactError(f"the build's model config name {config_name!r} cannot be a storage path segment; rename the config (letters, digits, . _ -) and build again")
    storage_uris = {stage: settings.storage.stage_uri(config_name, stage) for stage in (REASONING, REFINEMENT)}
    warnings = [w for w in {production_warning(config_name, uri) for uri in storage_uris.values()} if w]
    _check_out(out)
    options = dict(manifest.options.get("repository") or {})
    with atomic_directory(out) as staging:
        limits = []
        for stage in (REASONING, REFINEMENT):
            repository = write_stage_repository(build, target, options, stage, staging / "repositories" / stage)
            limit = max_request_bytes(repository)
            if limit is None:
                raise ArtifactError(
                    f"the {stage} repository written from {build} records no tandem.max_request_bytes (a build from an "
                    f"older tandem); build again with `tandem build --out {build}`"
                )
            limits.append(limit)
        strip_bytecode(staging / "repositories")
        body_limit = max(limits)
        objects = build_objects(settings, target, config_name, body_limit)
        validated_by = validate_all(objects)  # before the bundle is moved into place: complete or absent
        (staging / "manifests").mkdir()
        manifests = staging / MANIFESTS_FILE
        manifests.touch(mode=0o600)  # it carries the Secret with Triton's admin key
        manifests.write_text(
            "# Generated by `tandem deploy`; regenerate rather than edit. Holds a Secret: keep it private.\n"
            + yaml.safe_dump_all(objects, sort_keys=False)
        )
        record = {
            "build": str(build.resolve()),
            "target": target.name,
            "config": manifest.config,
            "config_fingerprint": manifest.config_fingerprint,
            "storage_uris": storage_uris,
            "max_request_bytes": body_limit,
            "settings": settings.model_dump(mode="json"),
            "objects": [
                {"kind": o["kind"], "name": o["metadata"]["name"], "validated_by": how} for o, how in zip(objects, validated_by)
            ],
        }
        (staging / BUNDLE_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return Bundle(out, target, config_name, objects, validated_by, storage_uris, body_limit, warnings)
