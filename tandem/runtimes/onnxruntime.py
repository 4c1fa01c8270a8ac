"""ONNX Runtime: loads the graphs of an export directory after checking them against its manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from tandem.errors import ArtifactError, TandemError
from tandem.formats.export_manifest import Manifest, read_manifest, verify_graph_files
from tandem.runtimes.base import Runtime


GRAPH_OPTIMIZATION = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers(device: str = "auto") -> list[str]:
    present = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in present:
            raise TandemError("ONNX Runtime's CUDA execution provider is not installed; pip install onnxruntime-gpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in present]


SPINNING = ("always", "run", "never")


def spinning_mode(value: bool | str) -> str:
    """How idle intra-op threads wait: ``always`` (ONNX Runtime's default: they spin between runs
    too, the fastest when nothing else wants the cores), ``run`` (they spin within a run and stop
    when it returns: a step's many small nodes still hand over quickly, and the cores are free
    between steps for whatever shares them) or ``never`` (they sleep at once). True/False mean
    always/never."""
    if value is True or value is False:
        return "always" if value else "never"
    if value not in SPINNING:
        raise TandemError(f"spinning must be one of {SPINNING} (or true/false), not {value!r}")
    return value


def session_options(
    intra_op_threads: int = 0, inter_op_threads: int = 0, spinning: bool | str = "run", graph_optimization: str = "all"
) -> ort.SessionOptions:
    """The session options every tandem session runs with (:class:`OnnxRuntime`'s; benchmarks that
    load a graph file alone use the same)."""
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise TandemError(f"graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION)}, not {graph_optimization!r}")
    spinning = spinning_mode(spinning)
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    if spinning == "never":  # idle threads sleep instead of spinning
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spinning == "run":  # they spin between a run's nodes, and stop when the run returns
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    # The offline (EXTENDED) optimisation is portable; ALL adds, at load, what depends on the CPU at
    # hand (blocked NCHWc convolution layouts) - the level export validated with.
    options.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
    return options


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(
        self,
        artifacts: str | Path,
        optimized: bool = True,
        device: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        spinning: bool | str = "run",
        graphs: list[str] | None = None,
        graph_optimization: str = "all",
    ):
        self.artifacts = Path(artifacts)
        self.manifest: Manifest = read_manifest(self.artifacts)
        if not self.manifest.passed:
            raise ArtifactError(
                f"{self.artifacts} failed validation against PyTorch (see its manifest.json); it will not be loaded"
            )
        super().__init__(self.manifest.config)
        self.providers = available_providers(device)
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise TandemError(f"graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION)}, not {graph_optimization!r}")
        self.graph_optimization = graph_optimization
        self.spinning = spinning_mode(spinning)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name in graphs or list(self.manifest.graphs):
            if name not in self.manifest.graphs:
                raise ArtifactError(f"{self.artifacts} has no graph {name!r}; it has {sorted(self.manifest.graphs)}")
            entry = self.manifest.graphs[name]
            options = session_options(intra_op_threads, inter_op_threads, self.spinning, graph_optimization)
            # The graph file and its external data, each hash-checked; ONNX Runtime reads the data
            # files from beside the graph.
            path = self.artifacts / verify_graph_files(self.artifacts, entry, optimized)[0]
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=self.providers)
            except Exception as exc:  # onnxruntime raises its own untyped errors on bad files
                raise ArtifactError(f"ONNX Runtime could not load {path}: {exc}; export again") from exc

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.check_feeds(graph, feeds)
        if graph not in self.sessions:
            raise TandemError(f"graph {graph!r} was not loaded by this runtime")
        outputs = self.sessions[graph].run(spec.output_names, {n: feeds[n] for n in spec.input_names})
        return dict(zip(spec.output_names, outputs))

    def decode_engine(self, capacity: int):
        from tandem.decoding import CacheDecodeEngine, OrtDecodeEngine

        if self.providers[0] != "CPUExecutionProvider":
            # IO binding here binds host memory; a CUDA session would copy it every step. Until
            # device buffers are bound (ortvalue on "cuda"), run through plain feeds.
            return CacheDecodeEngine(self, capacity)
        return OrtDecodeEngine(self, capacity)

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} ({self.providers[0]}, {self.graph_optimization.upper()} at load)"
