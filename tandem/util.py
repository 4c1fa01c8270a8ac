"""Small shared helpers: atomic file/directory writes and content hashes."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_write_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename,
    on failure it is removed, so a reader never sees a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp's 0600 (kept by writers that recreate the file, such as safetensors) would hide
        # the artifact from a server running as another user.
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_write_path(target) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it into place when complete.

    The old directory (if any) is moved aside first and deleted after the swap; readers see the
    old complete tree or the new complete tree, never a partial one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    os.chmod(staging, 0o755)
    try:
        yield staging
        retired = None
        if target.exists():
            retired = target.with_name(f".{target.name}.{os.getpid()}.retired")
            os.replace(target, retired)
        os.replace(staging, target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- hashes of values and of the code that runs (build step keys, export reuse) --------------------
def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _module_file(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find module {name} to hash its source")
    return Path(spec.origin)


def imported_modules(name: str) -> set[str]:
    """The tandem modules ``name``'s source imports, at the top or inside a function."""
    path = _module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate == "tandem" or candidate.startswith("tandem."):
                try:
                    _module_file(candidate)
                except ImportError:
                    continue  # a name imported from a module, not a module
                found.add(candidate)
    return found


def code_closure(*entry_modules: str) -> list[str]:
    """``entry_modules`` and every tandem module they import, directly or not (sorted)."""
    seen: set[str] = set()
    todo = list(entry_modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        todo.extend(imported_modules(name) | ({parent} if parent else set()))  # importing a module runs its package
    return sorted(seen)


def code_hash(*entry_modules: str) -> str:
    """Hash of the source of the code a step runs: its entry modules and everything they import
    (walked, never listed by hand), so an edit to any of it re-runs the step and nothing else does."""
    digest = hashlib.sha256()
    for name in code_closure(*entry_modules):
        digest.update(name.encode() + b"\0")
        digest.update(_module_file(name).read_bytes())
    return digest.hexdigest()
