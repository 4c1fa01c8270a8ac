"""Triton model repository writer: export directory (manifest.json) -> ``<model>/config.pbtxt`` +
``<model>/<version>/`` for ``reasoning``, ``refinement`` and the ensemble ``tandem``.

What each stage becomes is decided by a *flavor*: a named set of :class:`ModelTarget` objects, one
per stage. ``local`` hosts ONNX Runtime inside python-backend models (what the tritonserver in the
nvidia-pytriton wheel can run); ``native`` gives refinement to Triton's own ``onnxruntime_onnx``
backend (NVIDIA's Triton container) and keeps reasoning in the python backend, because its
decode loop is stateful. Later targets (TensorRT plans, Neuron) add a flavor with
:func:`register_flavor`; the batching, queueing, ensemble and atomic-write logic here is shared.
For example, a TensorRT flavor pairs a ``PythonRuntimeTarget(runtime="tensorrt")`` subclass whose
``collect_files`` ships the engines (the python model then runs ``make_runtime("tensorrt", ...)``)
with a ``ModelTarget`` that sets ``platform: "tensorrt_plan"`` for refinement; options such as the
build directory are declared in ``option_names`` and reach the target as ``ctx.target_options``.

An ensemble gets ``max_batch_size`` but no ``dynamic_batching`` or ``instance_group``: Triton's
schema makes ``dynamic_batching`` and ``ensemble_scheduling`` a oneof, and the server refuses an
instance group on an ensemble. Its requests are batched and queue-limited in its composing models.

Configs are built as ``model_config_pb2.ModelConfig`` messages (tritonclient's copy of Triton's
schema) and printed with protobuf's text format, so every config.pbtxt parses by construction and
is re-parsed before it is written. Each model version folder is staged and renamed into place
(complete or absent); configs are replaced atomically after their version folder exists; the
ensemble is written last so it never names a model that is not there yet.

``tandem-repository.json`` at the repository's root records the sha256 of each model's config.pbtxt
and of every file of every version folder the writer wrote. :func:`verify_repository` checks the
served (newest) version of each model against it before serving: an edited, missing or added file
is refused with its name and the fix. Pruning (``keep_versions``) deletes only the files the
manifest lists: a version folder tandem did not write, and any file someone else put in one, stay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tandem.errors import ArtifactError, TandemError
from tandem.formats.export_manifest import MANIFEST_NAME, Manifest, read_manifest, verify_graph_files
from tandem.parallel import DECODINGS, DEFAULT_BLOCK, DEFAULT_PROPOSER, check_block, parse_proposer
from tandem.serving.interface import (
    ENSEMBLE,
    IMAGE,
    PARAM_CODEBOOK,
    PARAM_CONFIG,
    PARAM_FINGERPRINT,
    PARAM_FLAVOR,
    PARAM_GRID,
    PARAM_MAX_REQUEST_BYTES,
    PROMPT,
    REASONING,
    RENDERED_TOKENS,
    REFINEMENT,
    SCENE_TOKENS,
    SEED,
    TEMPERATURE,
    TOP_K,
    ServedModel,
    request_size_limit,
    served_models,
)
from tandem.serving.models.common import (
    PARAM_ARTIFACTS,
    PARAM_MAX_WAITING,
    PARAM_QUEUE_DELAY,
    PARAM_QUEUE_TIMEOUT,
    PARAM_RUNTIME,
    PARAM_RUNTIME_OPTIONS,
    PARAM_BLOCK,
    PARAM_DECODING,
    PARAM_PROPOSER,
    PARAM_SCHEDULER,
    SCHEDULER_INFLIGHT,
    SCHEDULERS,
)
from tandem.stages import VERIFY_GRAPH, graph_specs
from tandem.util import atomic_directory, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

DEFAULT_REPOSITORY = "model_repository"
CONFIG_NAME = "config.pbtxt"
REPOSITORY_MANIFEST = "tandem-repository.json"  # at the repository's root: what `tandem repo` wrote, with sha256s
ARTIFACTS_DIR = "artifacts"  # inside a python-backend version folder
ENSEMBLE_INTERNAL_TOKENS = "reasoning_scene_tokens"  # reasoning -> refinement inside the ensemble

# Why these defaults: a reasoning batch (request-level scheduler) runs hundreds of decode steps, so
# waiting a few ms to fill it is cheap; refinement is one short graph run, so it waits less (Triton's
# batcher for native backends, the render thread's gather window for the python model). The
# in-flight scheduler waits only when idle after concurrent traffic (its admission window: the rest
# of a closed loop's wave shares one prefill); while rows run, a request joins at the next step.
DEFAULT_QUEUE_DELAY_US = {REASONING: 5_000, REFINEMENT: 2_000}
# A model that batches itself (in-flight reasoning when idle, refinement's render thread) waits only
# while a wave keeps arriving (requests a few hundred microseconds apart: tandem.scheduler.wait_for_wave),
# so its cap can be longer: a closed loop of 8 clients' next wave reached reasoning over 3-6 ms on 2 cores.
WAVE_WINDOW_US = 10_000


@dataclass(frozen=True)
class RepositoryOptions:
    """Serving knobs shared by every flavor. Pass them as keyword options to :func:`write_repository`."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] | None = None  # default: powers of two in [2, max_batch_size]
    max_queue_delay_us: int | None = None  # default: DEFAULT_QUEUE_DELAY_US per model
    max_queue_size: int | None = None  # requests waiting per model before new ones are rejected; default 4x batch
    queue_timeout_ms: int = 60_000  # a request waiting this long before it starts is rejected (clients may ask for less)
    instances: int = 1  # model instances (python backend: stub processes) per model
    instance_kind: str | None = None  # "cpu" | "gpu"; default: the flavor's
    intra_op_threads: int = 0  # ONNX Runtime threads per session, every stage (0 = from the thread budget)
    # Cores the served stages share (default: the cores this process may run on). Split between the
    # stages (see thread_plan) so their ONNX Runtime thread pools never oversubscribe the machine.
    thread_budget: int | None = None
    stage_threads: tuple[tuple[str, int], ...] | None = None  # explicit (stage, intra-op threads) pairs
    spinning: str = "run"  # how idle ONNX Runtime threads wait: always | run | never (see thread_plan)
    # Put Triton's dynamic batcher in front of models that batch themselves too (only to measure what
    # leaving it out saves: benchmarks/batcher_stall.py; see stage_config).
    triton_batcher: bool = False
    optimized: bool = True  # ship ONNX Runtime's offline-optimised graphs (python backend), as in-process does
    version: int | None = None  # version folder to write; default: one above the newest present
    keep_versions: int = 2  # older version folders are deleted (the newest N stay, for rollback)
    link: bool = False  # hard-link artifacts (same filesystem only) instead of copying: cheap, but shares the export's files
    # reasoning: "inflight" (requests join/leave the decode batch every step) or "request" (Triton's
    # dynamic batcher forms groups that each run a whole generation); see tandem.serving.models.reasoning
    scheduler: str = SCHEDULER_INFLIGHT
    # in-flight reasoning's decode step: "sequential" (one token per step) or "jacobi" (greedy parallel
    # decoding over the verify graph, ``block`` tokens per row per step; tandem.parallel)
    decoding: str = "sequential"
    block: int = DEFAULT_BLOCK
    proposer: str = DEFAULT_PROPOSER

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise TandemError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        for size in self.preferred_batch_sizes or ():
            if not 1 <= size <= self.max_batch_size:
                raise TandemError(f"preferred batch size {size} must be within [1, max_batch_size={self.max_batch_size}]")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise TandemError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise TandemError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.queue_timeout_ms < 1:
            raise TandemError(f"queue_timeout_ms must be >= 1, got {self.queue_timeout_ms}")
        if self.instances < 1:
            raise TandemError(f"instances must be >= 1, got {self.instances}")
        if self.instance_kind is not None and self.instance_kind.lower() not in ("cpu", "gpu"):
            raise TandemError(f"instance_kind must be 'cpu' or 'gpu', got {self.instance_kind!r}")
        if self.version is not None and self.version < 1:
            raise TandemError(f"version must be >= 1 (Triton version folders are positive integers), got {self.version}")
        if self.scheduler not in SCHEDULERS:
            raise TandemError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.keep_versions < 1:
            raise TandemError(f"keep_versions must be >= 1, got {self.keep_versions}")
        if self.decoding not in DECODINGS:
            raise TandemError(f"decoding must be one of {', '.join(DECODINGS)}, got {self.decoding!r}")
        if self.decoding != "sequential" and self.scheduler != SCHEDULER_INFLIGHT:
            raise TandemError(f"--decoding {self.decoding} runs in the in-flight scheduler's decode loop; serve it with --scheduler inflight")
        parse_proposer(self.proposer)
        from tandem.runtimes.onnxruntime import SPINNING

        if self.spinning not in SPINNING:
            raise TandemError(f"spinning must be one of {SPINNING}, got {self.spinning!r}")
        if self.thread_budget is not None and self.thread_budget < 1:
            raise TandemError(f"thread_budget must be >= 1 core, got {self.thread_budget}")
        if self.intra_op_threads < 0:
            raise TandemError(f"intra_op_threads must be >= 0 (0: from the thread budget), got {self.intra_op_threads}")
        for stage, threads in self.stage_threads or ():
            if stage not in (REASONING, REFINEMENT) or threads < 1:
                raise TandemError(f"stage threads must name reasoning or refinement with >= 1 thread, got {stage}={threads}")

    def batch_sizes(self) -> list[int]:
        if self.preferred_batch_sizes is not None:
            return sorted(set(self.preferred_batch_sizes))
        sizes, size = [], 2
        while size < self.max_batch_size:
            sizes.append(size)
            size *= 2
        return sizes + ([self.max_batch_size] if self.max_batch_size > 1 else [])


@dataclass
class BuildContext:
    """What a target may read while it writes one model."""

    artifacts: Path  # the export directory
    manifest: Manifest
    served: dict[str, ServedModel]
    options: RepositoryOptions
    flavor: str
    target_options: dict[str, Any] = field(default_factory=dict)  # options a flavor's targets declared
    stages: tuple[str, ...] = (REASONING, REFINEMENT)  # the composing models this repository serves

    def graph_files(self, graph: str, optimized: bool) -> list[str]:
        """Files of one exported graph, checked against the manifest's hashes before they are shipped."""
        entry = self.manifest.graphs.get(graph)
        if entry is None:
            raise ArtifactError(f"{self.artifacts} has no graph {graph!r}; it has {sorted(self.manifest.graphs)}")
        return verify_graph_files(self.artifacts, entry, optimized)

    def place(self, source: Path, target: Path, within: Path) -> None:
        """Copy ``source`` to ``target``, which must stay inside the version folder ``within``
        (names come from a manifest). Hard links only when asked for (``link=True``): a linked
        repository file IS the export's file, so editing one corrupts the other."""
        if not target.resolve().is_relative_to(within.resolve()):
            raise ArtifactError(f"{target} would be written outside the version folder {within}; refusing (a tampered export?)")
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.options.link:
            try:
                os.link(source, target)
                return
            except OSError:
                pass
        shutil.copy2(source, target, follow_symlinks=False)


class ModelTarget(ABC):
    """How one stage is materialised as a Triton model for one backend.

    ``configure`` fills the backend-specific fields of the model's config (the writer has already
    set name, I/O, batching, queue policy and instance group); ``populate`` writes the files of one
    version folder (a staging folder that is renamed into place when complete)."""

    default_instance_kind: str = "cpu"
    option_names: tuple[str, ...] = ()  # extra keyword options this target reads from BuildContext.target_options

    @abstractmethod
    def configure(self, ctx: BuildContext, stage: str, config: mc.ModelConfig) -> None: ...

    @abstractmethod
    def populate(self, ctx: BuildContext, stage: str, version_dir: Path) -> None: ...

    def batches_itself(self, stage: str, options: "RepositoryOptions") -> bool:
        """Whether the served model forms its own batches (then Triton's dynamic batcher is left out)."""
        return False

    def describe(self) -> str:
        return type(self).__name__


_MODEL_PY = '''\
# Generated by `tandem repo`: Triton's python backend loads this file. The backend stub ignores
# PYTHONPATH, so `tandem serve` hands tandem's import path over in TANDEM_PYTHONPATH; in another
# Triton (e.g. NVIDIA's container) install tandem and onnxruntime into the stub's Python instead.
import os
import site
import sys

for _path in reversed([p for p in os.environ.get("TANDEM_PYTHONPATH", "").split(os.pathsep) if p]):
    if _path not in sys.path:
        sys.path.insert(0, _path)
    if _path.endswith("-packages"):
        site.addsitedir(_path)  # runs the .pth files (editable installs)

from {module} import TritonPythonModel  # noqa: E402,F401
'''


def write_model_py(version_dir: Path, module: str) -> Path:
    """The generated model.py, with its bytecode beside it: the backend stub would otherwise write
    ``__pycache__`` into the version folder on load, and Triton's poll mode takes that change for a
    new model and loads everything a second time."""
    import importlib.util
    import py_compile

    path = version_dir / "model.py"
    path.write_text(_MODEL_PY.format(module=module))
    py_compile.compile(str(path), cfile=importlib.util.cache_from_source(str(path)), doraise=True)
    return path


PARAM_THREADS = "tandem.threads"  # the stage's share of the thread budget, as written (a person reads it)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class StageThreads:
    intra_op: int  # ONNX Runtime intra-op threads per session of one instance
    inter_op: int  # inter-op threads (1: the graphs run their nodes in order)
    spinning: str  # how idle intra-op threads wait (tandem.runtimes.onnxruntime.SPINNING)

    def describe(self) -> str:
        return f"{self.intra_op} intra-op + {self.inter_op} inter-op threads, spinning {self.spinning}"


def thread_plan(options: RepositoryOptions, stages: tuple[str, ...]) -> dict[str, StageThreads]:
    """Each stage's ONNX Runtime threads from the thread budget (default: the cores this process may
    use). The stages share the budget in time, not in space: each stage's pool has the whole budget
    (divided among its instances) and spins only inside a run, sleeping as soon as the run returns
    (``spinning: run``), so a stage that is not running costs the other nothing. Reasoning runs
    almost all the time (hundreds of decode steps per image); refinement renders a batch of finished
    rows in a few milliseconds, mostly while reasoning waits for the next requests.

    Why (measured on 2 cores, served c=8 vs in-process batch 8 in interleaved rounds; the figures are
    in ``benchmarks/results/thread-plans-*``): one thread per stage (a split in space) left a core idle
    most of the time; ONNX Runtime's default spinning (idle threads keep spinning after a run) starved
    the stub's ``execute`` and every other session's pool, so new arrivals waited longer for their
    first step; without spinning at all a batch-1 step is slower (waking the threads costs more than
    the step's small nodes). Spinning only inside a run keeps both.

    An explicit ``intra_op_threads`` (every stage) or ``stage_threads`` overrides the split."""
    budget = options.thread_budget or available_cores()
    if options.intra_op_threads:
        per = {stage: options.intra_op_threads for stage in stages}
    elif options.stage_threads:
        given = dict(options.stage_threads)
        per = {stage: given.get(stage, 1) for stage in stages}
    else:
        per = {stage: budget for stage in stages}
    per = {stage: max(1, threads // options.instances) for stage, threads in per.items()}
    return {stage: StageThreads(per[stage], 1, options.spinning) for stage in stages}


class PythonRuntimeTarget(ModelTarget):
    """A python-backend model running a tandem runtime in-process over the graphs shipped in its
    version folder: the reasoning loop (prefill + decode over the static KV cache) or refinement."""

    MODULES = {REASONING: "tandem.serving.models.reasoning", REFINEMENT: "tandem.serving.models.refinement"}
    GRAPHS = {REASONING: ("reasoning_prefill", "reasoning_decode"), REFINEMENT: ("refinement",)}

    def __init__(self, runtime: str = "onnxruntime", default_instance_kind: str = "cpu"):
        self.runtime = runtime
        self.default_instance_kind = default_instance_kind

    def batches_itself(self, stage: str, options: "RepositoryOptions") -> bool:
        """Refinement's render thread always; reasoning under the in-flight scheduler (request-level
        reasoning is defined by the batches Triton's dynamic batcher forms)."""
        return stage == REFINEMENT or options.scheduler == SCHEDULER_INFLIGHT

    def graphs(self, ctx: BuildContext, stage: str) -> tuple[str, ...]:
        """The graphs the stage's runtime loads: jacobi decoding adds the reasoning verify graph."""
        if stage != REASONING or ctx.options.decoding != "jacobi":
            return self.GRAPHS[stage]
        if VERIFY_GRAPH not in ctx.manifest.graphs:
            raise TandemError(f"--decoding jacobi needs the {VERIFY_GRAPH} graph, which {ctx.artifacts} lacks: export again with this tandem")
        check_block(graph_specs(ctx.manifest.config), ctx.options.block)
        return self.GRAPHS[stage] + (VERIFY_GRAPH,)

    def runtime_options(self, ctx: BuildContext, stage: str) -> dict[str, Any]:
        threads = thread_plan(ctx.options, ctx.stages)[stage]
        return {
            "graphs": list(self.graphs(ctx, stage)),
            "optimized": ctx.options.optimized,
            "intra_op_threads": threads.intra_op,
            "inter_op_threads": threads.inter_op,
            "spinning": threads.spinning,
        }

    def configure(self, ctx: BuildContext, stage: str, config: mc.ModelConfig) -> None:
        config.backend = "python"
        set_parameter(config, PARAM_RUNTIME, self.runtime)
        set_parameter(config, PARAM_ARTIFACTS, ARTIFACTS_DIR)
        set_parameter(config, PARAM_RUNTIME_OPTIONS, json.dumps(self.runtime_options(ctx, stage), sort_keys=True))
        budget = ctx.options.thread_budget or available_cores()
        threads = thread_plan(ctx.options, ctx.stages)[stage]
        set_parameter(config, PARAM_THREADS, f"{threads.describe()} per instance, of a {budget}-core budget shared in time")
        set_parameter(config, "tandem.precision", (ctx.manifest.precision or {}).get("precision", "fp32"))

    def collect_files(self, ctx: BuildContext, stage: str) -> list[tuple[Path, str]]:
        """(source, name inside artifacts/) of every file the runtime loads. A compiled-runtime
        target (TensorRT engines, Neuron artifacts) overrides this to ship its build output."""
        names = [MANIFEST_NAME]
        for graph in self.graphs(ctx, stage):
            names += ctx.graph_files(graph, ctx.options.optimized)
        return [(ctx.artifacts / name, name) for name in names]

    def populate(self, ctx: BuildContext, stage: str, version_dir: Path) -> None:
        for source, name in self.collect_files(ctx, stage):
            ctx.place(source, version_dir / ARTIFACTS_DIR / name, version_dir / ARTIFACTS_DIR)
        write_model_py(version_dir, self.MODULES[stage])

    def describe(self) -> str:
        return f"python backend + tandem {self.runtime} runtime"


class OnnxRuntimeNativeTarget(ModelTarget):
    """``platform: "onnxruntime_onnx"``: Triton's own ONNX Runtime backend runs the refinement graph.

    The exported graph takes int64 [B, h, w] and returns float [B, 3, H, W] in [0, 1]; the shipped
    model.onnx wraps it (Cast/Reshape before, Clip/scale/Cast/Transpose after) so it speaks the
    same wire format as the python-backend model: INT32 [B, h*w] -> UINT8 [B, H, W, 3]."""

    default_instance_kind = "gpu"

    def configure(self, ctx: BuildContext, stage: str, config: mc.ModelConfig) -> None:
        if stage != REFINEMENT:
            raise TandemError(f"the onnxruntime_onnx target serves refinement only, not {stage}")
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"

    def populate(self, ctx: BuildContext, stage: str, version_dir: Path) -> None:
        from tandem.serving.native import write_wire_format_refinement

        files = ctx.graph_files("refinement", optimized=False)  # the portable graph, not ORT's CPU-tuned copy
        precision = (ctx.manifest.precision or {}).get("precision", "fp32")  # a precision directory's graphs
        write_wire_format_refinement(ctx.artifacts / files[0], version_dir / "model.onnx", ctx.manifest.config, precision)

    def describe(self) -> str:
        return "Triton onnxruntime_onnx backend"


@dataclass(frozen=True)
class Flavor:
    name: str
    description: str
    targets: Mapping[str, ModelTarget]  # REASONING and REFINEMENT

    def option_names(self) -> set[str]:
        return {name for target in self.targets.values() for name in target.option_names}


FLAVORS: dict[str, Flavor] = {}


def register_flavor(flavor: Flavor, replace: bool = False) -> Flavor:
    """Make a flavor available to :func:`write_repository` and ``tandem repo --flavor``."""
    missing = {REASONING, REFINEMENT} - set(flavor.targets)
    if missing:
        raise TandemError(f"flavor {flavor.name!r} has no target for {sorted(missing)}")
    if flavor.name in FLAVORS and not replace:
        raise TandemError(f"flavor {flavor.name!r} is already registered")
    FLAVORS[flavor.name] = flavor
    return flavor


def get_flavor(name: str) -> Flavor:
    if name not in FLAVORS:
        raise TandemError(f"unknown repository flavor {name!r}; choose one of {', '.join(sorted(FLAVORS))}")
    return FLAVORS[name]


register_flavor(
    Flavor(
        "local",
        "python-backend models hosting ONNX Runtime (runs on the tritonserver bundled with nvidia-pytriton)",
        {REASONING: PythonRuntimeTarget(), REFINEMENT: PythonRuntimeTarget()},
    )
)
register_flavor(
    Flavor(
        "native",
        "refinement on Triton's onnxruntime_onnx backend, reasoning in the python backend (NVIDIA's Triton container)",
        {REASONING: PythonRuntimeTarget(default_instance_kind="gpu"), REFINEMENT: OnnxRuntimeNativeTarget()},
    )
)


# ---------------------------------------------------------------------------------------------


def set_parameter(config: mc.ModelConfig, key: str, value: str) -> None:
    config.parameters[key].string_value = value


def _add_tensors(config: mc.ModelConfig, model: ServedModel) -> None:
    for tensor in model.inputs:
        entry = config.input.add(name=tensor.name, data_type=mc.DataType.Value(tensor.data_type), dims=list(tensor.dims))
        entry.optional = tensor.optional
    for tensor in model.outputs:
        config.output.add(name=tensor.name, data_type=mc.DataType.Value(tensor.data_type), dims=list(tensor.dims))


def _common_parameters(ctx: BuildContext, config: mc.ModelConfig) -> None:
    scene = ctx.manifest.config.scene
    set_parameter(config, PARAM_GRID, f"{scene.grid_height}x{scene.grid_width}")
    set_parameter(config, PARAM_CODEBOOK, str(scene.codebook_size))
    set_parameter(config, PARAM_CONFIG, ctx.manifest.config.name)
    set_parameter(config, PARAM_FINGERPRINT, ctx.manifest.config_fingerprint)
    set_parameter(config, PARAM_FLAVOR, ctx.flavor)
    set_parameter(
        config, PARAM_MAX_REQUEST_BYTES, str(request_size_limit(ctx.manifest.config, ctx.options.max_batch_size))
    )


def stage_config(ctx: BuildContext, stage: str, target: ModelTarget, behind_reasoning: bool = False) -> mc.ModelConfig:
    """config.pbtxt of a composing model: I/O, batching with a bounded queue, instances.

    A model that forms its own batches (:meth:`ModelTarget.batches_itself`: the in-flight reasoning
    scheduler, the python refinement model's render thread) gets no ``dynamic_batching``: every
    request goes straight to its instance, whose ``execute`` only hands it over, and its waiting
    limit is the parameter ``max_waiting`` (``max_queue_size``, in prompts or rows), refused at once
    with the reason. Triton's dynamic batcher would add nothing there and costs up to 500 ms: on
    Triton 2.51 its batcher thread can miss the notification that the instance is free and then
    waits out its 500 ms default (see :mod:`tandem.serving.models.refinement`). Every other model
    (Triton's native backends, request-level reasoning) is batched by Triton with a bounded,
    timed-out queue.

    ``behind_reasoning``: refinement inside the ensemble, which only ever gets requests reasoning
    already admitted and finished. Its queue is then unbounded and has no default timeout: a
    bound there could only throw away a finished generation (``--max-queue-size 2`` once refused 3
    at refinement), and reasoning's own limits (slots + waiting prompts, its timeout) already bound
    what enters the ensemble. A client's own timeout still applies."""
    opts = ctx.options
    config = mc.ModelConfig(name=stage, max_batch_size=opts.max_batch_size)
    config.version_policy.latest.num_versions = 1
    _add_tensors(config, ctx.served[stage])
    queue_size = opts.max_queue_size or 4 * opts.max_batch_size
    batches_itself = target.batches_itself(stage, opts) and not opts.triton_batcher
    delay = opts.max_queue_delay_us if opts.max_queue_delay_us is not None else (
        WAVE_WINDOW_US if batches_itself else DEFAULT_QUEUE_DELAY_US[stage])
    if batches_itself:
        # refinement: its render thread's gather window; in-flight reasoning: its admission window when idle
        set_parameter(config, PARAM_QUEUE_DELAY, str(delay))
        if not behind_reasoning:  # (behind reasoning: unbounded, no timeout; see above)
            set_parameter(config, PARAM_MAX_WAITING, str(queue_size))
            set_parameter(config, PARAM_QUEUE_TIMEOUT, str(opts.queue_timeout_ms))
    else:
        batching = config.dynamic_batching
        batching.preferred_batch_size.extend(opts.batch_sizes())
        batching.max_queue_delay_microseconds = delay
        policy = batching.default_queue_policy
        policy.timeout_action = mc.ModelQueuePolicy.REJECT
        policy.default_timeout_microseconds = opts.queue_timeout_ms * 1000
        policy.allow_timeout_override = True
        policy.max_queue_size = queue_size
        if behind_reasoning:  # admission happened at reasoning: never refuse its finished work here (see above)
            policy.max_queue_size = 0  # Triton: no limit
            policy.default_timeout_microseconds = 0  # Triton: no timeout unless the client sets one
    kind = (opts.instance_kind or target.default_instance_kind).lower()
    config.instance_group.add(
        count=opts.instances, kind=mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    )
    _common_parameters(ctx, config)
    if stage == REASONING:  # the in-flight scheduler's slots are max_batch_size; its waiting limit is max_queue_size
        set_parameter(config, PARAM_SCHEDULER, opts.scheduler)
        if opts.scheduler == SCHEDULER_INFLIGHT:
            set_parameter(config, PARAM_DECODING, opts.decoding)
            if opts.decoding == "jacobi":
                set_parameter(config, PARAM_BLOCK, str(opts.block))
                set_parameter(config, PARAM_PROPOSER, opts.proposer)
    target.configure(ctx, stage, config)
    return config


def ensemble_config(ctx: BuildContext) -> mc.ModelConfig:
    """``tandem``: prompt -> reasoning -> refinement -> image, also returning the scene tokens.

    Batching and queueing happen in the composing models (Triton refuses dynamic_batching and
    instance_group on an ensemble: it has no instances of its own)."""
    config = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=ctx.options.max_batch_size)
    config.version_policy.latest.num_versions = 1
    _add_tensors(config, ctx.served[ENSEMBLE])
    for tensor in config.input:
        # Optional here (reasoning still requires it): Triton reports a required ensemble input
        # that is missing as "unexpected deadlock"; reasoning's own check names the problem.
        tensor.optional = True
    steps = config.ensemble_scheduling
    reasoning = steps.step.add(model_name=REASONING, model_version=-1)
    for name in (PROMPT, SEED, TEMPERATURE, TOP_K):
        reasoning.input_map[name] = name
    # No ensemble output may also feed a later step, or requests for a subset of the outputs fail
    # (Triton 2.51); the tokens travel under an internal name and come back from refinement.
    reasoning.output_map[SCENE_TOKENS] = ENSEMBLE_INTERNAL_TOKENS
    refinement = steps.step.add(model_name=REFINEMENT, model_version=-1)
    refinement.input_map[SCENE_TOKENS] = ENSEMBLE_INTERNAL_TOKENS
    refinement.output_map[IMAGE] = IMAGE
    refinement.output_map[RENDERED_TOKENS] = SCENE_TOKENS
    _common_parameters(ctx, config)
    return config


def render_config(config: mc.ModelConfig) -> str:
    """Protobuf text format, re-parsed with Triton's schema before anything is written."""
    body = text_format.MessageToString(config)
    text_format.Parse(body, mc.ModelConfig())
    return f"# Generated by `tandem repo`; regenerate rather than edit.\n{body}"


def parse_config(path: str | Path) -> mc.ModelConfig:
    """Read a config.pbtxt with Triton's model-config schema (tritonclient's model_config_pb2)."""
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise TandemError(f"{path} is not a valid Triton model config: {exc}") from exc


def repository_models(repository: str | Path) -> tuple[str, ...]:
    """What a repository serves for a client: the ensemble when it has one, else its stage models
    (a one-stage repository of a split deployment, see tandem.deploy)."""
    repository = Path(repository)
    if (repository / ENSEMBLE / CONFIG_NAME).exists():
        return (ENSEMBLE,)
    return tuple(m for m in (REASONING, REFINEMENT) if (repository / m / CONFIG_NAME).exists()) or (ENSEMBLE,)


def max_request_bytes(repository: str | Path) -> int | None:
    """The largest request any model of ``repository`` takes (its configs' tandem.max_request_bytes),
    or None for a repository written before tandem recorded it."""
    limits = []
    for config_path in sorted(Path(repository).glob(f"*/{CONFIG_NAME}")):
        value = parse_config(config_path).parameters.get(PARAM_MAX_REQUEST_BYTES)
        if value is not None and value.string_value.isdigit():
            limits.append(int(value.string_value))
    return max(limits) if limits else None


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and re.fullmatch(r"[1-9][0-9]*", p.name))


class _Undo:
    """What one `write_repository` call changed, so a failure can put the repository back as it
    was: new version folders removed, replaced configs restored, folders it created removed."""

    def __init__(self) -> None:
        self.actions: list = []

    def created_dir(self, path: Path) -> None:
        if not path.exists():
            self.actions.append(lambda: path.rmdir() if path.is_dir() and not any(path.iterdir()) else None)

    def wrote_version(self, path: Path) -> None:
        self.actions.append(lambda: shutil.rmtree(path, ignore_errors=True))

    def replacing(self, path: Path) -> None:
        previous = path.read_text() if path.exists() else None
        self.actions.append(lambda: atomic_write_text(path, previous) if previous is not None else path.unlink(missing_ok=True))

    def rollback(self) -> None:
        for action in reversed(self.actions):
            try:
                action()
            except OSError as exc:
                log.warning("could not undo a partial repository write: %s", exc)


def _write_model(model_dir: Path, version: int, config: mc.ModelConfig, populate, undo: _Undo) -> dict[str, Any]:
    """Write one version folder and the model's config; returns the model's manifest entry for
    this version (the sha256 of every file written)."""
    text = render_config(config)  # fail before touching the repository
    undo.created_dir(model_dir)
    version_dir = model_dir / str(version)
    if version_dir.exists():
        raise TandemError(f"{version_dir} already exists; choose another --version (or leave it out for the next one)")
    with atomic_directory(version_dir) as staging:
        populate(staging)
        files = _hash_folder(staging)
    undo.wrote_version(version_dir)
    undo.replacing(model_dir / CONFIG_NAME)
    atomic_write_text(model_dir / CONFIG_NAME, text)
    return {"files": files, "config_sha256": sha256_file(model_dir / CONFIG_NAME)}


# -- the repository manifest: what tandem wrote, checked before serving ---------------------------------


class RepositoryIntegrityError(TandemError):
    """A served file differs from what `tandem repo` wrote (edited, missing, or added by someone else)."""


def _hash_folder(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under ``folder`` (symlinks refused: tandem writes none)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise RepositoryIntegrityError(f"{path} is a symbolic link; tandem repo writes none. Remove it and rewrite with `tandem repo`")
        if path.is_file():
            files[path.relative_to(folder).as_posix()] = sha256_file(path)
    return files


def read_repository_manifest(repository: str | Path) -> dict[str, Any] | None:
    """The repository's manifest (None when there is none: not written by this tandem)."""
    path = Path(repository) / REPOSITORY_MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RepositoryIntegrityError(f"{path} cannot be read ({exc}); rewrite the repository with `tandem repo`") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
        raise RepositoryIntegrityError(f"{path} is not a tandem repository manifest; rewrite the repository with `tandem repo`")
    return manifest


def _write_repository_manifest(repository: Path, manifest: dict[str, Any]) -> None:
    manifest = {"written_by": "tandem repo", "format": 1, **manifest}
    atomic_write_text(repository / REPOSITORY_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify_repository(repository: str | Path) -> None:
    """Check before serving that every model's config.pbtxt and every file of the version folder
    Triton serves (the newest) are exactly what `tandem repo` wrote: nothing edited, missing or
    added. Raises :class:`RepositoryIntegrityError` naming the file and the fix."""
    repository = Path(repository)
    fix = "rewrite it with `tandem repo` (edits to a written repository are not served)"
    manifest = read_repository_manifest(repository)
    if manifest is None:
        raise RepositoryIntegrityError(
            f"{repository} has no {REPOSITORY_MANIFEST}, so its files cannot be checked before serving: {fix}"
        )
    models = manifest["models"]
    present = sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in present:
        if name not in models:
            raise RepositoryIntegrityError(f"{repository / name} is a model folder tandem repo did not write: remove it, or {fix}")
    for name, entry in sorted(models.items()):
        model_dir = repository / name
        config = model_dir / CONFIG_NAME
        if not config.is_file():
            raise RepositoryIntegrityError(f"{config} is missing: {fix}")
        if sha256_file(config) != entry.get("config_sha256"):
            raise RepositoryIntegrityError(f"{config} was changed after tandem repo wrote it: {fix}")
        versions = existing_versions(model_dir)
        if not versions:
            raise RepositoryIntegrityError(f"{model_dir} has no version folder: {fix}")
        served = versions[-1]
        written = entry.get("versions", {}).get(str(served))
        if written is None:
            raise RepositoryIntegrityError(f"{model_dir / str(served)} is a version folder tandem repo did not write: remove it, or {fix}")
        expected: dict[str, str] = written["files"]
        actual = _hash_folder(model_dir / str(served))
        for rel in sorted(set(expected) | set(actual)):
            path = model_dir / str(served) / rel
            if rel not in actual:
                raise RepositoryIntegrityError(f"{path} is missing: {fix}")
            if rel not in expected:
                raise RepositoryIntegrityError(f"{path} was not written by tandem repo: remove it, or {fix}")
            if actual[rel] != expected[rel]:
                raise RepositoryIntegrityError(f"{path} was changed after tandem repo wrote it: {fix}")


def _prune(model_dir: Path, version: int, keep_versions: int, written: dict[str, Any]) -> None:
    """Delete the files of old version folders that tandem wrote (the newest ``keep_versions``
    stay) and nothing else: a folder the manifest does not list is kept, and so is any file in
    one that tandem did not write (with a warning naming it). Pruned versions leave ``written``."""
    for old in existing_versions(model_dir)[:-keep_versions]:
        if old == version:
            continue
        folder = model_dir / str(old)
        entry = written.get(str(old))
        if entry is None:
            log.warning(
                "kept %s: tandem repo did not write it (or wrote it before it recorded what it writes), so it is not "
                "pruned; delete it yourself if it is no longer needed", folder,
            )
            continue
        for rel in entry["files"]:
            path = folder / rel
            if path.is_file() and not path.is_symlink():
                path.unlink()
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: len(p.parts), reverse=True):
            if not any(sub.iterdir()):
                sub.rmdir()
        if any(folder.iterdir()):
            foreign = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
            log.warning(
                "pruned tandem's files from %s but kept the folder: it holds files tandem repo did not write (%s); "
                "move them out and delete the folder", folder, ", ".join(foreign) or "empty folders",
            )
        else:
            folder.rmdir()
        del written[str(old)]


def _parse_options(flavor: Flavor, options: dict[str, Any], max_batch_size: int) -> tuple[RepositoryOptions, dict]:
    known = {f.name for f in dataclasses.fields(RepositoryOptions)} - {"max_batch_size"}
    extra = flavor.option_names()
    unknown = set(options) - known - extra
    if unknown:
        raise TandemError(
            f"unknown repository option(s) {sorted(unknown)}; the {flavor.name!r} flavor accepts {sorted(known | extra)}"
        )
    if isinstance(options.get("preferred_batch_sizes"), list):
        options = {**options, "preferred_batch_sizes": tuple(options["preferred_batch_sizes"])}
    common = {k: v for k, v in options.items() if k in known}
    return RepositoryOptions(max_batch_size=max_batch_size, **common), {k: v for k, v in options.items() if k in extra}


def write_repository(
    artifacts: str | Path,
    out: str | Path = DEFAULT_REPOSITORY,
    flavor: str | Flavor = "local",
    max_batch_size: int = 8,
    stages: tuple[str, ...] = (REASONING, REFINEMENT),
    **options: Any,
) -> Path:
    """Write (or add a version to) a Triton model repository serving the export in ``artifacts``.

    ``options`` are :class:`RepositoryOptions` fields plus any the flavor's targets declare.
    ``stages`` chooses the composing models; the ensemble is written only when both are (a
    one-stage repository is what each pool of a split deployment serves, see tandem.deploy).
    Returns the repository path."""
    artifacts, out = Path(artifacts), Path(out)
    unknown_stages = set(stages) - {REASONING, REFINEMENT}
    if not stages or unknown_stages:
        raise TandemError(f"stages must be a non-empty subset of ({REASONING!r}, {REFINEMENT!r}), got {list(stages)}")
    chosen = flavor if isinstance(flavor, Flavor) else get_flavor(flavor)  # a toolchain's own flavor, or a registered one
    opts, target_options = _parse_options(chosen, dict(options), max_batch_size)
    manifest = read_manifest(artifacts)
    if not manifest.passed:
        raise ArtifactError(f"{artifacts} failed validation against PyTorch (see its manifest.json); it will not be served")
    graph_max = min(entry.dims["batch"][2] for entry in manifest.graphs.values())
    if max_batch_size > graph_max:
        raise TandemError(
            f"max_batch_size {max_batch_size} exceeds the batch size the graphs were exported and validated for "
            f"({graph_max}); use --max-batch-size {graph_max} or less"
        )
    if out.exists() and not out.is_dir():
        raise TandemError(f"repository path {out} exists and is not a directory; choose another --out")
    ctx = BuildContext(artifacts, manifest, served_models(manifest.config), opts, chosen.name, target_options,
                       tuple(s for s in (REASONING, REFINEMENT) if s in stages))

    version = opts.version or max([0, *(v for m in (REASONING, REFINEMENT, ENSEMBLE) for v in existing_versions(out / m))]) + 1
    repo_manifest = read_repository_manifest(out) or {"models": {}}
    undo = _Undo()
    undo.created_dir(out)
    composing = [m for m in (REFINEMENT, REASONING) if m in stages]
    ensemble = [ENSEMBLE] if len(composing) == 2 else []  # a one-stage repository has no ensemble
    written: dict[str, dict[str, Any]] = {}
    try:
        for stage in composing:  # composing models first, the ensemble that names them last
            target = chosen.targets[stage]
            config = stage_config(ctx, stage, target, behind_reasoning=stage == REFINEMENT and bool(ensemble))
            written[stage] = _write_model(out / stage, version, config, lambda d, t=target, s=stage: t.populate(ctx, s, d), undo)
        if ensemble:
            written[ENSEMBLE] = _write_model(out / ENSEMBLE, version, ensemble_config(ctx), lambda d: None, undo)
        for model, entry in written.items():
            record = repo_manifest["models"].setdefault(model, {})
            record["config_sha256"] = entry["config_sha256"]
            record.setdefault("versions", {})[str(version)] = {"files": entry["files"]}
        undo.replacing(out / REPOSITORY_MANIFEST)
        _write_repository_manifest(out, repo_manifest)
    except BaseException:
        undo.rollback()  # a failed write leaves the repository as it found it
        raise
    for model in composing + ensemble:
        _prune(out / model, version, opts.keep_versions, repo_manifest["models"][model]["versions"])
    _write_repository_manifest(out, repo_manifest)
    log.debug("wrote %s flavor version %d of %s to %s", chosen.name, version, manifest.config.name, out)
    return out
