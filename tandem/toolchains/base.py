"""What a toolchain is to tandem: one object per toolchain owns everything that differs between
targets, so ``tandem build``, ``tandem doctor``, the pre-flight and the repository writer ask it
instead of branching on its name.

A toolchain owns its probe (can it build here?), its graph rewrites at export, its precision rules
(which rewrite gives a graph each precision), its optimise and compile steps, the runtime that
loads what it builds and its repository flavour. The registry (:mod:`tandem.toolchains`) lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.errors import TandemError
from tandem.formats.compiled_manifest import CompiledManifest
from tandem.formats.targets import Target
from tandem.stages import GraphSpec

if TYPE_CHECKING:
    from tandem.compiler.precision import Rewrite
    from tandem.serving.repository import Flavor

PrecisionRule = Callable[[GraphSpec], "Rewrite | None"]


class Toolchain:
    """The steps receive the build (:class:`tandem.compiler.core.Build`): its target, precision,
    options and folders (``graphs_dir()``, ``optimised_dir()``, ``cache_dir()``, ``export_manifest()``)."""

    name: str = "abstract"
    runtime: str = ""  # the tandem runtime that loads what this toolchain builds (tandem.runtimes)
    compiles_ahead: bool = True  # False: the runtime compiles graphs when it loads them (nothing to build)
    # Graph rewrites at export (tandem.export.rewrites), applied to the graphs this toolchain loads.
    graph_rewrites: tuple[str, ...] = ()
    # Precisions at which the reasoning graphs this toolchain builds read only the routed experts
    # (README's target table); at any other, every expert is read at every step.
    routed_precisions: frozenset[str] = frozenset()
    # precision -> (graph description -> rewrite, or None to keep that graph fp32). Empty: the
    # toolchain compiles from PyTorch and applies the precision itself (no precision graphs).
    precision_rules: Mapping[str, PrecisionRule] = {}
    # Precisions whose rewrite starts from ONNX Runtime's own graph (<graph>.ort.onnx) when the export has one.
    reads_onnxruntime_graph: frozenset[str] = frozenset()
    # Precisions whose rewrite calibrates activation scales (static Q/DQ) on real feeds.
    calibrated_precisions: frozenset[str] = frozenset()
    # The modules the optimise and compile steps start from; their cache keys hash these and every
    # tandem module they import (tandem.compiler.steps.code_hash).
    entry_modules: tuple[str, ...] = ()

    # -- probe ----------------------------------------------------------------------------

    def probe(self, target: Target, precision: str | None = None) -> None:
        """Raise (ImportError or TandemError, with the fix) when ``target`` cannot be built here (for ``precision``)."""

    def versions(self) -> dict[str, str | None]:
        """Installed tool versions, read without importing the toolchain."""
        return {}

    # -- precision ------------------------------------------------------------------------

    def graph_precision(self, precision: str) -> bool:
        """Whether ``precision`` lives in the ONNX graph (a precision step writes it) for this toolchain."""
        return bool(self.precision_rules) and precision != "fp32"

    def precision_rewrite(self, precision: str, spec: GraphSpec) -> Rewrite | None:
        """The rewrite that gives a graph its ``precision``; None keeps it fp32."""
        if precision == "fp32":
            return None
        if precision not in self.precision_rules:
            raise TandemError(
                f"no {precision} graph rewrite for the {self.name} toolchain; it offers {', '.join(['fp32', *self.precision_rules])}"
            )
        return self.precision_rules[precision](spec)

    # -- build steps ----------------------------------------------------------------------

    def optimise_what(self, target: Target, precision: str) -> str:
        return "nothing to optimise"

    def compile_what(self, target: Target, precision: str) -> str:
        return "nothing to compile"

    def optimise(self, build, staging: Path) -> str:
        """Write what the compiler reads into ``staging``; returns the step's note."""
        raise NotImplementedError(f"the {self.name} toolchain has no optimise step")

    def compile_inputs(self, build) -> dict[str, Any]:
        """What besides the code and the optimised files decides the compiled artifacts."""
        return {}

    def compile(self, build, staging: Path, inputs: dict[str, str]) -> CompiledManifest:
        raise NotImplementedError(f"the {self.name} toolchain has no compile step")

    def build_options(self, build) -> dict[str, Any]:
        """Options recorded in the build manifest beside the repository's."""
        return {}

    def graph_shapes(self, spec: GraphSpec) -> dict[str, Any]:
        """What this toolchain builds for ``spec``'s dynamic axes (a profile, buckets), for the build manifest."""
        return {}

    def extra_shapes(self, build, shapes: dict[str, Any]) -> dict[str, Any]:
        """Shapes of graphs this toolchain adds (e.g. a served wire-format graph)."""
        return {}

    # -- serving --------------------------------------------------------------------------

    def flavor(self) -> Flavor | None:
        """The repository flavour serving what this toolchain built; None: the target's registered
        flavour (tandem.serving.repository) over the export."""
        return None
