"""The precision step: write ``<graph>.<precision>.onnx`` for a target, check it here, gate it.

For one export and one (toolchain, precision) the step
1. records calibration feeds (the fp32 pipeline's own prefill/decode/refinement inputs for
   training-split captions) when the rewrite quantizes activations;
2. rewrites every graph with the toolchain's precision rules (``Toolchain.precision_rewrite``) (graphs without a
   rewrite stay fp32, recorded as such);
3. checks each graph against PyTorch fp32 on the stage description's validation inputs, with ONNX
   Runtime's CPU provider where it has kernels for the graph's types and ONNX's reference
   evaluator (``onnx.reference``) where it has none (bf16), recording which ran;
4. generates greedily over the held-out captions with fp32 and with the precision graphs (bf16:
   the same graphs with every bf16 tensor rounded, computed on ONNX Runtime) and records the
   fraction of token positions that agree and, where the config can draw synthetic scenes, the
   compositional accuracy of both, overall and per object count;
5. refuses the precision (nothing is written) when a graph is outside its tolerance, tokens agree
   less than the precision allows, or accuracy falls more than its limit below fp32, unless an
   override with a reason is passed; the override is recorded.

The output directory has the layout of an export (``manifest.json`` + graphs), so ONNX Runtime,
the Triton repository writer and the TensorRT optimise step read it as they read an export; its
manifest's ``precision`` section holds everything above.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from pydantic import BaseModel

from tandem.compiler.precision import (
    emulate_on_float32,
    get_precision,
)
from tandem.config import ModelConfig
from tandem.errors import CheckFailed, TandemError
from tandem.runtimes.base import Runtime
from tandem.stages import NEXT_TOKENS
from tandem.formats.export_manifest import (
    GraphEntry,
    Manifest,
    OutputError,
    ValidationCase,
    graph_files,
    read_manifest,
    verify_file,
    verify_graph_files,
)
from tandem.util import atomic_directory, sha256_file

EXTERNAL_DATA_THRESHOLD = 1 << 30
CALIBRATION_CAPTIONS = 16  # training-split captions whose pipeline feeds calibrate activation scales
CALIBRATION_FEEDS = 48  # feeds kept per graph (decode steps are subsampled evenly)
CALIBRATION_SEED = 7
VALIDATION_CAPTIONS = 4  # held-out captions generated at batch 1 and 3 for the per-graph checks


class PrecisionRefused(CheckFailed):
    """A precision failed its accuracy gate (a failed check, exit 1); the message carries the figures."""


# ----------------------------------------------------------------------------- records


class GraphCheck(BaseModel):
    graph: str
    file: str
    precision: str  # what the graph runs at ("fp32" when the target keeps it)
    rewrite: dict[str, Any] | None  # RewriteRecord
    validated_with: str  # "onnxruntime <version> CPU" | "onnx.reference <version>"
    max_output_error: float  # max |out - fp32| / max |fp32|, worst output and input
    tolerance: float
    passed: bool


class GenerationCheck(BaseModel):
    """``token_agreement``: positions where the precision graphs pick fp32's greedy token given
    fp32's prefix (teacher-forced, so one flip is one position); ``identical_captions``: free-running
    generations identical to fp32's, token for token."""

    captions: int
    caption_set: str
    generated_with: str
    positions: int
    agreeing_positions: int
    token_agreement: float
    identical_captions: int


class AccuracyCheck(BaseModel):
    captions: int
    fp32: float
    precision: float
    drop_points: float
    fp32_by_objects: dict[str, float]
    precision_by_objects: dict[str, float]


class PrecisionReport(BaseModel):
    precision: str
    toolchain: str
    description: str
    graphs: dict[str, GraphCheck]
    calibration: dict[str, Any] | None = None
    generation: GenerationCheck | None = None
    accuracy: AccuracyCheck | None = None
    accuracy_note: str | None = None
    limits: dict[str, float]
    refusals: list[str] = []
    override: str | None = None  # the reason given for shipping a precision the gate refused
    passed: bool
    wall_s: float = 0.0


# ----------------------------------------------------------------------------- helpers


def max_caption_bytes(config: ModelConfig) -> int:
    return config.reasoning.max_prompt_len - 2  # BOS and BOI around the caption's bytes


# The command line's default gate sample: held-out captions spread evenly over the pool, about a minute
# on 2 CPU cores (`--gate-captions all` gates on the whole pool and says how long that takes first).
DEFAULT_GATE_CAPTIONS = 24
# Seconds per gate caption (fp32 + candidate generation + teacher forcing), small config, 2 cores:
# 24 captions in 17 s on a quiet machine, 54 s on a busy one.
GATE_SECONDS_PER_CAPTION = (0.7, 2.3)


def progress(message: str) -> None:
    """A step line on stderr, at once: the precision step runs for minutes and says what it is doing."""
    print(f"  precision: {message}", file=sys.stderr, flush=True)


def gate_captions(config: ModelConfig, limit: int | None) -> list[str]:
    """Held-out captions: the whole pool, or ``limit`` of them spread evenly over it (the same
    ones every run)."""
    from tandem.data.scenes import all_scenes, caption_split

    pool = [s.caption for s in all_scenes(max_caption_bytes(config)) if caption_split(s.caption) == "heldout"]
    if limit is None or limit >= len(pool):
        return pool
    if limit < 1:
        raise TandemError("the number of gate captions must be at least 1")
    return [pool[i] for i in np.linspace(0, len(pool) - 1, limit).round().astype(int)]


class _Recorder(Runtime):
    """A runtime wrapper that keeps the feeds each graph is run with (calibration). As a plain
    :class:`Runtime` its decode engine passes every step's feeds through :meth:`run`."""

    def __init__(self, runtime):
        self.runtime, self.config, self.specs = runtime, runtime.config, runtime.specs
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {}

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.setdefault(graph, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.runtime.run(graph, feeds)


def record_feeds(
    export_dir: Path, config: ModelConfig, prompts: Sequence[str], batches: Sequence[int], per_graph: int
) -> dict[str, list[dict[str, np.ndarray]]]:
    """The feeds every graph gets when the fp32 pipeline generates from ``prompts`` in batches of
    the given sizes, ``per_graph`` of them per graph and batch size (decode steps spread evenly)."""
    from tandem.decoding import VERIFY
    from tandem.parallel import JacobiPipeline
    from tandem.pipeline import Pipeline
    from tandem.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime(export_dir, device="cpu")
    kept: dict[str, list[dict[str, np.ndarray]]] = {}
    start = 0
    for size in batches:
        recorder = _Recorder(runtime)
        pipeline = Pipeline(recorder)  # type: ignore[arg-type]
        chunk = list(prompts[start : start + size])
        start += size
        pipeline.render(pipeline.generate_tokens(chunk))
        recorded = dict(recorder.feeds)
        if VERIFY in runtime.sessions:  # the verify graph runs only in parallel decoding: record its steps there
            parallel = _Recorder(runtime)
            JacobiPipeline(parallel).generate_tokens(chunk)  # type: ignore[arg-type]
            recorded[VERIFY] = parallel.feeds.get(VERIFY, [])
        for graph, feeds in recorded.items():
            picks = np.linspace(0, len(feeds) - 1, min(per_graph, len(feeds))).round().astype(int)
            kept.setdefault(graph, []).extend(feeds[i] for i in sorted(set(picks.tolist())))
    return kept


def record_calibration(export_dir: Path, config: ModelConfig) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration feeds from fp32 generations of training-split captions (never held out)."""
    from tandem.data.scenes import sample_captions

    prompts = sample_captions(np.random.default_rng(CALIBRATION_SEED), CALIBRATION_CAPTIONS, max_caption_bytes(config), split="train")
    per_batch = CALIBRATION_CAPTIONS // 4
    return record_feeds(export_dir, config, prompts, [4] * per_batch, CALIBRATION_FEEDS // per_batch)


def record_validation(export_dir: Path, config: ModelConfig) -> dict[str, list[dict[str, np.ndarray]]]:
    """Validation feeds: what every graph gets while generating from held-out captions, at batch 1
    and at an odd batch (inputs in the distribution the graphs serve, unlike random caches)."""
    prompts = gate_captions(config, VALIDATION_CAPTIONS)
    return record_feeds(export_dir, config, prompts, [1, VALIDATION_CAPTIONS - 1], 3)


def _save(model: onnx.ModelProto, path: Path) -> None:
    try:
        large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    except ValueError:
        large = True
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))


class _GatherElements:
    """onnx.reference's GatherElements uses np.choose (at most 32 choices); take_along_axis has no limit."""

    @staticmethod
    def make():
        from onnx.reference.op_run import OpRun

        class GatherElements(OpRun):
            def _run(self, data, indices, axis=None):
                axis = axis or 0
                indices = np.where(indices < 0, indices + data.shape[axis], indices)
                return (np.take_along_axis(data, indices, axis=axis),)

        return GatherElements


def _has_qdq(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx") for n in model.graph.node)


class GraphRunner:
    """Runs one ONNX graph with ONNX Runtime's CPU provider, or with onnx.reference where ONNX
    Runtime has no kernel for one of its types.

    A graph with standard Q/DQ nodes (written for TensorRT) runs without ONNX Runtime's graph
    optimisations, so each DequantizeLinear -> op -> QuantizeLinear is computed as the ONNX spec
    defines it (what TensorRT's int8 kernels compute exactly), not by ONNX Runtime's fused integer
    kernels, whose uint8 x int8 AVX2 path saturates."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        exact = _has_qdq(path)
        if exact:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.name = f"onnxruntime {ort.__version__} CPUExecutionProvider" + (" (Q/DQ as specified, no fusion)" if exact else "")
            self.reference = None
        except Exception as exc:  # NOT_IMPLEMENTED: no CPU kernel for a type (bf16 Add, ...)
            from onnx.reference import ReferenceEvaluator

            self.session = None
            self.reference = ReferenceEvaluator(str(path), new_ops=[_GatherElements.make()])
            self.name = f"onnx.reference {onnx.__version__} (ONNX Runtime CPU: {str(exc).split(':')[-1].strip()[:120]})"

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.session is not None:
            return self.session.run(output_names, feeds)
        return [np.asarray(o) for o in self.reference.run(output_names, feeds)]


def check_graph(spec, reference, path: Path, feeds: list[dict[str, np.ndarray]], tolerance: float) -> tuple[list[ValidationCase], float, str]:
    """The graph against PyTorch fp32 on recorded pipeline feeds; the error of an output is
    max |out - fp32| / max |fp32|. Token outputs (integer: the graphs' sampled next tokens) have
    no such error: the generation gate judges them (teacher-forced token agreement)."""
    runner = GraphRunner(path)
    cases, worst = [], 0.0
    progress(f"checking {path.name} against PyTorch fp32 on {len(feeds)} feeds ({runner.name.split(' (')[0]})")
    for index, feed in enumerate(feeds):
        expected = reference.run(spec.name, feed)
        actual = dict(zip(spec.output_names, runner.run(spec.output_names, feed)))
        errors = {}
        for name in (t.name for t in spec.outputs if np.issubdtype(np.dtype(t.dtype), np.floating)):
            a, e = np.asarray(actual[name], dtype=np.float64), np.asarray(expected[name], dtype=np.float64)
            if a.shape != e.shape:
                raise TandemError(f"{path.name}: output {name} has shape {a.shape}, PyTorch's is {e.shape}")
            diff = np.abs(a - e)
            scale = float(np.abs(e).max(initial=0.0)) or 1.0
            normalised = float(diff.max(initial=0.0)) / scale
            worst = max(worst, normalised)
            errors[name] = OutputError(
                max_abs=float(diff.max(initial=0.0)), max_rel=normalised, within_tolerance=normalised <= tolerance
            )
        dims = {"batch": int(next(iter(feed.values())).shape[0])}
        cases.append(ValidationCase(dims=dims, seed=index, outputs=errors, passed=all(e.within_tolerance for e in errors.values())))
    return cases, worst, runner.name


class GraphsRuntime(Runtime):
    """A tandem runtime over a precision directory's graphs, each run by :class:`GraphRunner`."""

    name = "precision-graphs"

    def __init__(self, directory: Path, description: str):
        from tandem.stages import graph_specs

        manifest = read_manifest(directory)
        self.config, self.specs = manifest.config, graph_specs(manifest.config)
        self.runners = {name: GraphRunner(verify_file(directory, e.file, e.sha256)) for name, e in manifest.graphs.items()}
        self.description = description

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[graph]
        return dict(zip(spec.output_names, self.runners[graph].run(spec.output_names, {n: feeds[n] for n in spec.input_names})))

    def describe(self) -> str:
        runners = sorted({r.name.split(" (ONNX Runtime")[0] for r in self.runners.values()})
        return f"{self.description}: {'; '.join(runners)}"


def _directory_manifest(source: Manifest, graphs: dict[str, GraphEntry]) -> Manifest:
    return source.model_copy(update={"graphs": graphs, "generation": None, "passed": True})


def _by_objects(results) -> dict[str, float]:
    from tandem.eval.evaluate import accuracy_by_objects

    return {k: v["accuracy"] for k, v in accuracy_by_objects(results).items()}


class _TeacherForced(Runtime):
    """Runs the candidate graphs along fp32's greedy tokens: every graph's sampled next tokens
    (:data:`tandem.stages.NEXT_TOKENS`; the pipeline runs greedy) are recorded as the candidate's
    own choice, then replaced by fp32's, so a flipped position is counted once instead of
    derailing the rest of the scene."""

    def __init__(self, runtime, forced: np.ndarray):
        self.runtime, self.config, self.specs = runtime, runtime.config, runtime.specs
        self.forced = forced.reshape(forced.shape[0], -1)  # [B, n_tokens]
        self.step = 0
        self.chosen: list[np.ndarray] = []

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(self.runtime.run(graph, feeds))
        if NEXT_TOKENS in out and self.step < self.forced.shape[1]:
            self.chosen.append(np.array(out[NEXT_TOKENS], dtype=np.int64))
            out[NEXT_TOKENS] = self.forced[:, self.step].copy()
            self.step += 1
        return out


def teacher_forced_choices(candidate_runtime, prompts: Sequence[str], reference_tokens: np.ndarray) -> np.ndarray:
    """The candidate's greedy choice at every position of fp32's generations [B, n_tokens]."""
    from tandem.pipeline import Pipeline

    forced = _TeacherForced(candidate_runtime, reference_tokens)
    Pipeline(forced).generate_tokens(list(prompts))  # type: ignore[arg-type]
    return np.stack(forced.chosen, axis=1)


def compare_generations(
    config: ModelConfig, fp32_runtime, candidate_runtime, captions: Sequence[str], batch: int = 8
) -> tuple[GenerationCheck, AccuracyCheck | None, str | None]:
    """Greedy generations over ``captions``: the fraction of positions where the candidate picks
    fp32's token given fp32's prefix, whole-caption identity of the free-running generations, and
    compositional accuracy of both where the config's grid and codebook hold synthetic scenes."""
    from tandem.pipeline import Pipeline

    try:
        from tandem.data.scenes import SceneVocabulary

        vocab = SceneVocabulary(config)
    except TandemError as exc:
        vocab, note = None, f"compositional accuracy not measured: {exc}"
    else:
        note = None
    chunks = [list(captions[i : i + batch]) for i in range(0, len(captions), batch)]
    if vocab is not None:
        from tandem.eval.evaluate import evaluate_runtime, pipeline_generator

        progress(f"generating {len(captions)} held-out captions with fp32 and the candidate graphs")
        runs = [
            evaluate_runtime(name, rt.describe(), pipeline_generator(Pipeline(rt)), captions, vocab, batch=batch, progress=True)
            for name, rt in (("fp32", fp32_runtime), ("candidate", candidate_runtime))
        ]
        reference = np.array([r.tokens for r in runs[0].results]).reshape(len(captions), -1)
        free_running = np.array([r.tokens for r in runs[1].results]).reshape(len(captions), -1)
        accuracy = AccuracyCheck(
            captions=len(captions),
            fp32=round(runs[0].accuracy, 4),
            precision=round(runs[1].accuracy, 4),
            drop_points=round(100 * (runs[0].accuracy - runs[1].accuracy), 2),
            fp32_by_objects=_by_objects(runs[0].results),
            precision_by_objects=_by_objects(runs[1].results),
        )
    else:
        accuracy = None
        generate = lambda rt: np.concatenate([Pipeline(rt).generate_tokens(c).reshape(len(c), -1) for c in chunks])
        reference, free_running = generate(fp32_runtime), generate(candidate_runtime)
    progress(f"teacher-forced token agreement over {len(captions)} captions")
    choices = np.concatenate(
        [teacher_forced_choices(candidate_runtime, c, reference[i * batch : i * batch + len(c)]) for i, c in enumerate(chunks)]
    )
    same = choices == reference
    generation = GenerationCheck(
        captions=len(captions),
        caption_set="held-out captions (tandem.data.scenes caption_split), never trained on",
        generated_with=candidate_runtime.describe(),
        positions=int(same.size),
        agreeing_positions=int(same.sum()),
        token_agreement=round(float(same.mean()), 5),
        identical_captions=int((free_running == reference).all(axis=1).sum()),
    )
    return generation, accuracy, note


def gate(report: PrecisionReport) -> list[str]:
    """Why the precision is refused (empty when it passes)."""
    p = get_precision(report.precision)
    reasons = []
    for g in report.graphs.values():
        if not g.passed:
            reasons.append(
                f"{g.graph}: output error {g.max_output_error:.3g} of the fp32 output's range exceeds {g.tolerance:g} "
                f"(validated with {g.validated_with.split(' (')[0]})"
            )
    if report.generation is not None and report.generation.token_agreement < p.min_token_agreement:
        reasons.append(
            f"greedy tokens agree with fp32 on {report.generation.token_agreement:.2%} of positions "
            f"({report.generation.captions} captions), below {p.min_token_agreement:.0%}"
        )
    if report.accuracy is not None and report.accuracy.drop_points > p.max_accuracy_drop:
        a = report.accuracy
        reasons.append(
            f"compositional accuracy {a.precision:.2%} is {a.drop_points:.2f} points below fp32's {a.fp32:.2%} "
            f"({a.captions} held-out captions), more than the {p.max_accuracy_drop:g} allowed"
        )
    return reasons


# ----------------------------------------------------------------------------- the step


def make_precision_graphs(
    export_dir: str | Path,
    out: str | Path,
    toolchain: str,
    precision: str,
    checkpoint: str | Path | None = None,
    captions: int | None = None,
    override: str | None = None,
    calibration: dict[str, list[dict[str, np.ndarray]]] | None = None,
) -> PrecisionReport:
    """Write and check the ``precision`` graphs of ``export_dir`` for ``toolchain`` into ``out``.

    ``captions`` limits the held-out captions the gate generates from (default: every one);
    ``override`` ships a refused precision, recording the reason; ``calibration`` replaces the
    recorded calibration feeds (graph -> feeds)."""
    from tandem.runtimes.onnxruntime import OnnxRuntime
    from tandem.runtimes.torch_eager import TorchRuntime
    from tandem.toolchains import get_toolchain

    rules = get_toolchain(toolchain)  # its precision rules
    start = time.perf_counter()
    export_dir, out = Path(export_dir), Path(out)
    spec_of = get_precision(precision)
    source = read_manifest(export_dir)
    if not source.passed:
        raise TandemError(f"{export_dir} failed validation against PyTorch; export again before making {precision} graphs")
    if source.precision is not None:
        raise TandemError(f"{export_dir} already holds {source.precision.get('precision')} graphs; give the fp32 export")
    config = source.config
    if override is not None and not override.strip():
        raise TandemError("an accuracy-gate override needs a reason (it is recorded in the manifest)")
    from tandem.export.onnx_export import weights_label

    if weights_label(config, checkpoint) != source.weights:
        raise TandemError(
            f"{export_dir} was exported with weights {source.weights[:30]}..., not {weights_label(config, checkpoint)[:30]}...; "
            "pass the checkpoint it was exported from"
        )
    calibration_info = None
    progress(f"{precision} for {toolchain} from {export_dir}")
    if precision in rules.calibrated_precisions and calibration is None:
        progress(f"recording calibration feeds ({CALIBRATION_CAPTIONS} training captions, fp32 pipeline)")
        calibration = record_calibration(export_dir, config)
        calibration_info = {
            "captions": CALIBRATION_CAPTIONS,
            "caption_set": "training-split captions (tandem.data.scenes.sample_captions, seed "
            f"{CALIBRATION_SEED}), fp32 ONNX Runtime pipeline feeds",
            "feeds": {g: len(f) for g, f in calibration.items()},
        }
    elif calibration is not None:
        calibration_info = {"caption_set": "given by the caller", "feeds": {g: len(f) for g, f in calibration.items()}}
    reference = TorchRuntime(config, checkpoint=checkpoint)
    progress("recording validation feeds (held-out captions, batch 1 and 3)")
    validation = record_validation(export_dir, config)
    with atomic_directory(out) as staging, tempfile.TemporaryDirectory(prefix="tandem-emulated-") as emulated_dir:
        emulated = Path(emulated_dir)
        entries, checks, needs_emulation = {}, {}, False
        for name, entry in source.graphs.items():
            verify_file(export_dir, entry.file, entry.sha256)
            spec = reference.specs[name]
            rewrite = rules.precision_rewrite(precision, spec)
            if rewrite is None:
                file, record, graph_precision = entry.file, None, "fp32"
                shutil.copy2(export_dir / entry.file, staging / file)
                for extra in entry.external_data:
                    shutil.copy2(export_dir / extra, staging / extra)
                # Unchanged graphs keep ONNX Runtime's own copy too (the com.microsoft::MoE graph).
                for extra, _ in graph_files(entry, optimized=True) if entry.optimized_file else []:
                    verify_file(export_dir, extra, _)
                    shutil.copy2(export_dir / extra, staging / extra)
                shutil.copy2(staging / file, emulated / file)
            else:
                # The rewrite's source graph, hash-checked like every file loaded from the export.
                kernel_graph = precision in rules.reads_onnxruntime_graph and entry.optimized_file is not None
                source_file = verify_graph_files(export_dir, entry, optimized=kernel_graph)[0]
                model = onnx.load(str(export_dir / source_file))
                progress(f"rewriting {name} to {precision}")
                converted, rewrite_record = rewrite(model, (calibration or {}).get(name, []))
                onnx.checker.check_model(converted)
                file, graph_precision = f"{name}.{precision}.onnx", precision
                _save(converted, staging / file)
                record = asdict(rewrite_record)
                emulation = emulate_on_float32(converted) if precision == "bf16" else converted
                needs_emulation = needs_emulation or precision == "bf16"
                _save(emulation, emulated / file)
            tolerance = spec_of.max_output_error if graph_precision != "fp32" else max(entry.atol, 1e-4) * 10
            cases, worst, runner = check_graph(spec, reference, staging / file, validation[name], tolerance)
            external = sorted(p.name for p in staging.iterdir() if p.name.startswith(f"{file}."))
            rewritten = {} if rewrite is None else {
                "external_data": external,
                "external_data_sha256": {f: sha256_file(staging / f) for f in external},
                "optimized_file": None,  # the rewritten graph is the only copy: there is no second ORT graph of it
                "optimized_sha256": None,
                "optimized_external_data": [],
                "optimized_external_data_sha256": {},
            }
            entries[name] = entry.model_copy(
                update={
                    "file": file,
                    "sha256": sha256_file(staging / file),
                    **rewritten,
                    "validation": cases,
                    "passed": all(c.passed for c in cases),
                }
            )
            checks[name] = GraphCheck(
                graph=name, file=file, precision=graph_precision, rewrite=record, validated_with=runner,
                max_output_error=round(worst, 6), tolerance=tolerance, passed=entries[name].passed,
            )
        manifest = _directory_manifest(source, entries)
        manifest.write(staging)
        generation_dir = emulated if needs_emulation else staging
        if needs_emulation:
            emulated_entries = {
                n: e.model_copy(update={"sha256": sha256_file(emulated / e.file), "external_data": []}) for n, e in entries.items()
            }
            _directory_manifest(source, emulated_entries).write(emulated)
        report = PrecisionReport(
            precision=precision,
            toolchain=toolchain,
            description=spec_of.description,
            graphs=checks,
            calibration=calibration_info,
            limits={
                "max_output_error": spec_of.max_output_error,
                "min_token_agreement": spec_of.min_token_agreement,
                "max_accuracy_drop_points": spec_of.max_accuracy_drop,
            },
            passed=False,
        )
        # Generate even when a graph missed its tolerance: a refusal carries every figure.
        held_out = gate_captions(config, captions)
        candidate = GraphsRuntime(
            generation_dir,
            f"{precision} graphs with every bf16 tensor rounded, computed in fp32 (emulation)" if needs_emulation else f"{precision} graphs",
        )
        fp32 = OnnxRuntime(export_dir, device="cpu")
        report.generation, report.accuracy, report.accuracy_note = compare_generations(config, fp32, candidate, held_out)
        report.refusals = gate(report)
        report.override = override if report.refusals else None
        report.passed = not report.refusals or override is not None
        report.wall_s = round(time.perf_counter() - start, 1)
        manifest.precision = report.model_dump(mode="json")
        manifest.passed = report.passed
        manifest.write(staging)
        if not report.passed:
            raise PrecisionRefused(
                f"{precision} graphs for {toolchain} refused (nothing written):\n  "
                + "\n  ".join(report.refusals)
                + "\nbuild another precision, or ship this one anyway with --accept-accuracy-loss 'REASON' (recorded)"
            )
    return report


def read_precision_report(directory: str | Path) -> PrecisionReport | None:
    manifest = read_manifest(directory)
    return PrecisionReport.model_validate(manifest.precision) if manifest.precision else None
