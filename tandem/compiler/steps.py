"""A Model-Navigator-style step runner: each build step is a command with a status.

Every step declares its inputs as content hashes (files, configs, tool versions, the source of the
code that runs it). The runner records, per step, the status (``ok`` / ``failed`` / ``skipped``
with a reason), the input hash and the sha256 of every output file in a build log. On a re-run a
step whose input hash is unchanged and whose recorded outputs are still on disk, byte for byte, is
skipped ("inputs unchanged"); anything else runs again. When a step fails, the steps after it are
skipped with the reason, and the build fails, so a CI log shows exactly which step broke and why.
"""

from __future__ import annotations


import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tandem.errors import TandemError
from tandem.util import code_closure, code_hash, hash_json, imported_modules, sha256_file  # noqa: F401  (the step keys)

log = logging.getLogger(__name__)

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
UNCHANGED = "inputs unchanged"


class StepFailed(TandemError):
    """A step could not do its job; the message says why and how to fix it."""


class StepNotApplicable(Exception):
    """Raised by a step's ``run`` when the target needs nothing from it (skipped with the reason)."""


# ----------------------------------------------------------------------------- content hashes


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), keyed by path relative to its
    parent; hidden staging leftovers are ignored."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    if not path.is_dir():
        return {}
    return {
        str(p.relative_to(path.parent)): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts) and "__pycache__" not in p.parts
    }


# ----------------------------------------------------------------------------- steps and records


@dataclass
class Step:
    """One build command.

    ``inputs`` returns what the step's result depends on (name -> hash or value); ``run`` does the
    work and returns the paths it produced (recorded with their hashes) and a one-line note.
    ``run`` raises :class:`StepFailed` (or any :class:`TandemError`) to fail with a message, or
    :class:`StepNotApplicable` to be skipped with a reason."""

    name: str
    summary: str
    inputs: Callable[[], Mapping[str, Any]]
    run: Callable[[], tuple[list[Path], str]]
    not_applicable: str | None = None  # the target needs nothing from this step: skipped with this reason


@dataclass
class StepRecord:
    name: str
    status: str
    reason: str = ""  # why it failed or was skipped; the note of what it did when ok
    seconds: float = 0.0
    inputs_sha256: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # path relative to the build dir -> sha256

    @property
    def up_to_date(self) -> bool:
        """Its outputs are the result of its recorded inputs (it ran, or was skipped as unchanged)."""
        return self.status == OK or (self.status == SKIPPED and self.reason.startswith(UNCHANGED))

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StepRecord":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class StepRunner:
    """Runs steps in order inside ``root``, printing one CI-readable line per step, and keeps the
    records in ``previous`` (from the last run) to decide what may be skipped."""

    def __init__(
        self,
        root: Path,
        previous: Iterable[StepRecord] = (),
        force: bool = False,
        stream: TextIO | None = None,
        on_record: Callable[[list[StepRecord]], None] | None = None,
    ):
        self.root = Path(root)
        self.previous = {r.name: r for r in previous}
        self.force = force
        self.stream = stream if stream is not None else sys.stdout
        self.on_record = on_record
        self.records: list[StepRecord] = []

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _relative(self, path: Path) -> Path:
        try:
            return Path(path).resolve().relative_to(self.root.resolve())
        except ValueError:
            return Path(path)

    def _outputs_hashes(self, paths: Iterable[Path]) -> dict[str, str]:
        hashes: dict[str, str] = {}
        for path in paths:
            for name, digest in tree_hashes(path).items():
                hashes[str(self._relative(Path(path).parent / name))] = digest
        return hashes

    def _still_valid(self, record: StepRecord) -> bool:
        """The recorded outputs are all there, unmodified."""
        for rel, digest in record.outputs.items():
            path = self.root / rel
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def run(self, steps: list[Step]) -> list[StepRecord]:
        total = len(steps)
        failed: str | None = None
        for index, step in enumerate(steps, start=1):
            label = f"[{index}/{total}] {step.name:<11}"
            if failed is not None:
                record = StepRecord(step.name, SKIPPED, f"not run: step '{failed}' failed")
                self._finish(label, record)
                continue
            if step.not_applicable is not None:
                self._finish(label, StepRecord(step.name, SKIPPED, step.not_applicable))
                continue
            start = time.perf_counter()
            try:
                inputs = dict(step.inputs())
            except TandemError as exc:
                record = StepRecord(step.name, FAILED, str(exc), time.perf_counter() - start)
                failed = step.name
                self._finish(label, record)
                continue
            digest = hash_json(inputs)
            before = self.previous.get(step.name)
            if (
                not self.force
                and before is not None
                and before.up_to_date
                and before.inputs_sha256 == digest
                and self._still_valid(before)
            ):
                record = StepRecord(
                    step.name, SKIPPED, f"{UNCHANGED} (sha256 {digest[:12]})", 0.0, digest, inputs, dict(before.outputs)
                )
                self._finish(label, record)
                continue
            self._print(f"{label} running: {step.summary}")
            try:
                paths, note = step.run()
                record = StepRecord(step.name, OK, note, time.perf_counter() - start, digest, inputs, self._outputs_hashes(paths))
            except StepNotApplicable as exc:
                record = StepRecord(step.name, SKIPPED, str(exc), time.perf_counter() - start, digest, inputs)
            except TandemError as exc:
                record = StepRecord(step.name, FAILED, str(exc), time.perf_counter() - start, digest, inputs)
                failed = step.name
            except Exception as exc:  # a bug or a toolchain crash: keep the traceback in the log
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                log.debug("step %s crashed", step.name, exc_info=True)
                record = StepRecord(
                    step.name, FAILED, f"unexpected error: {detail} (run with -v for the traceback)", time.perf_counter() - start, digest, inputs
                )
                failed = step.name
            self._finish(label, record)
        return self.records

    def _finish(self, label: str, record: StepRecord) -> None:
        self.records.append(record)
        took = f" ({record.seconds:.1f}s)" if record.seconds >= 0.05 else ""
        reason = f": {record.reason}" if record.reason else ""
        self._print(f"{label} {record.status.upper()}{took}{reason}")
        if self.on_record is not None:
            self.on_record(self.records)


def summary_table(records: Iterable[StepRecord]) -> str:
    lines = [f"{'step':<12}{'status':<9}{'time':>8}  detail"]
    for r in records:
        detail = r.reason.splitlines()[0] if r.reason else ""
        lines.append(f"{r.name:<12}{r.status.upper():<9}{r.seconds:>7.1f}s  {detail}")  # as the step lines print it
    return "\n".join(lines)
