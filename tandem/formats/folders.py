"""Any tandem output folder, wherever a folder is asked for.

tandem writes four kinds of folder: an export (``tandem export``: ``manifest.json`` + ONNX graphs),
a build (``tandem build``: ``build_manifest.json`` with ``export/``, ``compiled/`` and
``model_repository/`` inside), compiled artifacts (``<build>/compiled``) and a Triton model repository
(``tandem repo``). A command that needs one kind finds it inside whichever it is given, or says exactly
which command makes what it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from tandem.errors import ArtifactError
from tandem.formats.build_manifest import BUILD_MANIFEST, COMPILED_DIR, EXPORT_DIR, REPOSITORY_DIR
from tandem.formats.compiled_manifest import failed_build_step

EXPORT, BUILD, COMPILED, REPOSITORY = "export", "build", "compiled", "repository"
MANIFEST = "manifest.json"  # an export's (tandem.export) and a compiled folder's (tandem.formats.compiled_manifest)
BUILD_SUBFOLDERS = {EXPORT: EXPORT_DIR, COMPILED: COMPILED_DIR, REPOSITORY: REPOSITORY_DIR}
MAKES = {
    EXPORT: "tandem export --config CONFIG --out {path}",
    BUILD: "tandem build --config CONFIG --target TARGET --out {path}",
    COMPILED: "tandem build --config CONFIG --target TARGET --out {path}",
    REPOSITORY: "tandem repo --artifacts EXPORT --repository {path}",
}


def folder_kind(path: str | Path) -> str | None:
    """export, build, compiled, repository, or None when ``path`` is none of tandem's folders."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / BUILD_MANIFEST).exists():
        return BUILD
    if (path / MANIFEST).exists():
        try:
            data = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return EXPORT  # a corrupt manifest: the reader names the problem
        return COMPILED if isinstance(data, dict) and "toolchain" in data else EXPORT
    if any(path.glob("*/config.pbtxt")):
        return REPOSITORY
    return None


def describe_kind(kind: str | None) -> str:
    return {
        EXPORT: "an export (tandem export)",
        BUILD: "a build folder (tandem build)",
        COMPILED: "compiled artifacts (tandem build)",
        REPOSITORY: "a Triton model repository (tandem repo)",
        None: "not a tandem output folder",
    }[kind]


def find(path: str | Path, want: str, flag: str = "--artifacts") -> Path:
    """The folder of kind ``want`` (export, compiled, repository) in or around ``path``."""
    path = Path(path)
    if not path.exists() and folder_kind(path.parent) == BUILD:
        path = path.parent  # e.g. <build>/compiled of a build that compiles nothing: the build explains
    if not path.exists():
        raise ArtifactError(f"{flag} {path} does not exist; make it with `{MAKES[want].format(path=path)}`")
    kind = folder_kind(path)
    if kind == want:
        return path
    if kind is None and want in BUILD_SUBFOLDERS and folder_kind(path / BUILD_SUBFOLDERS[want]) == want:
        return path / BUILD_SUBFOLDERS[want]  # a folder holding e.g. compiled/ (a build without its manifest)
    build = path if kind == BUILD else None
    if build is None and kind in (EXPORT, COMPILED, REPOSITORY) and folder_kind(path.parent) == BUILD:
        build = path.parent  # a sibling inside the same build folder
    if build is not None:
        inside = build / BUILD_SUBFOLDERS[want]
        if folder_kind(inside) == want:
            return inside
        if want == COMPILED:
            failed = failed_build_step(build)
            if failed is not None:  # e.g. an h100 build on a machine without TensorRT
                raise ArtifactError(f"{build} has no compiled artifacts: {failed}")
            raise ArtifactError(
                f"{build} is a build with no compiled artifacts (a cpu build compiles nothing ahead of time: use "
                f"--runtime onnxruntime with it); compile with `tandem build --target TARGET --out {build}`"
            )
        raise ArtifactError(
            f"{build} is a build whose {BUILD_SUBFOLDERS[want]}/ step has not finished; run `tandem build` into it "
            f"again (see {build / BUILD_MANIFEST} for the failed step)"
        )
    hint = {
        EXPORT: f"pass an export or a build folder; make one with `{MAKES[EXPORT].format(path=path)}`",
        COMPILED: f"compiled artifacts come from `{MAKES[COMPILED].format(path='DIR')}`; pass DIR",
        REPOSITORY: (
            f"write one from an export with `tandem repo --artifacts {path} --repository DIR`, or serve the export "
            f"directly with `tandem serve --artifacts {path}`"
            if kind == EXPORT
            else f"write one with `{MAKES[REPOSITORY].format(path='DIR')}` or `tandem build --target cpu --out DIR`"
        ),
    }[want]
    raise ArtifactError(f"{flag} {path} is {describe_kind(kind)}, not {describe_kind(want).split(' (')[0]}; {hint}")


def export_dir(path: str | Path, flag: str = "--artifacts") -> Path:
    return find(path, EXPORT, flag)


def compiled_dir(path: str | Path, flag: str = "--artifacts") -> Path:
    return find(path, COMPILED, flag)


def repository_dir(path: str | Path, flag: str = "--repository") -> Path:
    return find(path, REPOSITORY, flag)
