"""Per-stage ONNX export, validated against PyTorch.

Reads only the stage descriptions in :mod:`tandem.stages`. For every graph: export with the
dynamo exporter (named dynamic axes) in standard ops, export ONNX Runtime's variant (its rewrites,
:mod:`tandem.export.rewrites`) and optimise it offline, validate both on several inputs (batch > 1
included) against PyTorch; then check whole greedy generations token for token, for both
variants, at batch 1 and at the largest batch. Everything is written into a staging directory that replaces ``out`` only when
complete, and the export fails (nothing replaced) when a tolerance is not met.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from tandem.config import ModelConfig
from tandem.errors import CheckFailed, TandemError
from tandem.export.rewrites import graph_rewrites, rewrites_for
from tandem.formats.export_manifest import ONNXRUNTIME_GRAPH_REWRITES
from tandem.formats.export_manifest import (
    MANIFEST_NAME,
    GenerationCheck,
    GraphEntry,
    Manifest,
    OutputError,
    TensorEntry,
    ValidationCase,
    read_manifest,
)
from tandem.memory import require_export_memory
from tandem.models import Stages, build_stages
from tandem.stages import MAX_BATCH, GraphSpec, graph_specs
from tandem.util import atomic_directory, sha256_file

log = logging.getLogger(__name__)

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf caps a file at 2 GiB; go external well before that
EXTERNAL_TENSOR_MIN_BYTES = 1024  # in an external-data graph, tensors smaller than this stay inline
EXTERNAL_DATA_ALIGNMENT = 1 << 16  # page-aligned offsets let ONNX Runtime map weights instead of copying them
VALIDATION_PROMPTS = ["a red circle above a blue square", "two green triangles", "x"]
IMAGE_ATOL = 2.0  # uint8 levels: float rounding may move a pixel across a .5 boundary


class ExportValidationError(CheckFailed):
    """An exported graph does not match PyTorch within tolerance (exit 1)."""


@contextlib.contextmanager
def export_patches() -> Iterator[None]:
    """What exporting needs around it: no autograd, and the exporter's chatter kept out of the
    user's terminal (its warnings about optional torchvision ops say nothing about our graphs)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest


def dynamic_shapes(spec: GraphSpec, module: torch.nn.Module) -> tuple:
    """Positional, in the spec's input order, shaped like ``module.forward``'s signature: the inputs
    a ``*args`` parameter takes (the decode module's ``*cache``) form one nested tuple."""
    dims = {name: torch.export.Dim(name, min=r.min, max=r.max) for name, r in spec.dims.items()}
    shapes = [({i: dims[d] for i, d in t.dynamic_axes().items()} or None) for t in spec.inputs]
    parameters = list(inspect.signature(module.forward).parameters.values())
    if parameters and parameters[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        named = len(parameters) - 1
        return (*shapes[:named], tuple(shapes[named:]))
    return tuple(shapes)


def external_data_name(graph_file: str) -> str:
    """The one external-data file a graph file's weights go to: ``<graph>.onnx.data``."""
    return f"{graph_file}.data"


def _export_onnx(
    spec: GraphSpec, stages: Stages, path: Path, rewrites: tuple[str, ...] = (), external_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> None:
    """``spec``'s module traced to ``path``: standard ops, or ``rewrites`` applied. Weights
    over ``external_threshold`` bytes in all go to ``external_data_name(path.name)`` beside it."""
    module = spec.make_module(stages).eval()
    example = spec.sample_inputs(spec.export_dims, seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    applied = graph_rewrites(rewrites, stages) if rewrites else contextlib.nullcontext({})
    with export_patches(), applied as translations:
        program = torch.onnx.export(
            module,
            args,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes(spec, module),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
            custom_translation_table=translations or None,
        )
        # onnx_ir writes the exporter's IR directly, tensor by tensor from the module's own weights:
        # no ModelProto (which could not exceed 2 GiB) and no second in-memory copy of the weights.
        if weight_bytes > external_threshold:
            ir.save(
                program.model,
                path,
                external_data=external_data_name(path.name),
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
                alignment=EXTERNAL_DATA_ALIGNMENT,
            )
        else:
            ir.save(program.model, path)
        del program
    onnx.checker.check_model(str(path))


def _external_files(graph_path: Path) -> dict[str, str]:
    """sha256 of the external-data file written beside ``graph_path`` (empty when none was)."""
    data = graph_path.with_name(external_data_name(graph_path.name))
    return {data.name: sha256_file(data)} if data.exists() else {}


def export_graph(
    spec: GraphSpec, stages: Stages, directory: Path, external_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> GraphEntry:
    path = directory / f"{spec.name}.onnx"
    _export_onnx(spec, stages, path, external_threshold=external_threshold)
    external = _external_files(path)
    return GraphEntry(
        name=spec.name,
        stage=spec.stage,
        file=path.name,
        sha256=sha256_file(path),
        external_data=sorted(external),
        external_data_sha256=external,
        inputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.inputs],
        outputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.outputs],
        dims={n: [r.min, r.opt, r.max] for n, r in spec.dims.items()},
        opset=OPSET,
        atol=spec.atol,
        rtol=spec.rtol,
        validation=[],
        passed=False,
    )


def optimize_for_onnxruntime(
    spec: GraphSpec, stages: Stages, directory: Path, entry: GraphEntry, external_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> None:
    """Save ONNX Runtime's graph beside the plain one: exported again with its rewrites when any
    applies to this graph, then optimised offline. EXTENDED, not ALL: ALL bakes in layout choices
    for the CPU it ran on, which would not travel to another machine. A graph whose weights went
    to external data keeps them external in its optimised copy too (ONNX Runtime writes them)."""
    optimized = f"{Path(entry.file).stem}.ort.onnx"
    rewrites = rewrites_for(ONNXRUNTIME_GRAPH_REWRITES, spec)
    with tempfile.TemporaryDirectory(prefix=".tandem-rewrite-", dir=directory.parent) as scratch:
        source = directory / entry.file
        if rewrites:
            source = Path(scratch) / entry.file
            _export_onnx(spec, stages, source, rewrites=rewrites, external_threshold=external_threshold)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(directory / optimized)
        options.log_severity_level = 3
        if entry.external_data:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", external_data_name(optimized)
            )
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_TENSOR_MIN_BYTES)
            )
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    external = _external_files(directory / optimized)
    entry.optimized_file = optimized
    entry.optimized_sha256 = sha256_file(directory / optimized)
    entry.optimized_external_data = sorted(external)
    entry.optimized_external_data_sha256 = external
    entry.optimized_rewrites = list(rewrites)


def validation_cases(spec: GraphSpec) -> list[dict[str, int]]:
    """Batch 1, an odd batch, the largest batch; for prompts (and verify blocks), short, typical and longest."""
    cases = [{"batch": 1}, {"batch": 3}, {"batch": MAX_BATCH}]
    if "block" in spec.dims:  # the verify graph: the shortest, typical and longest block
        r = spec.dims["block"]
        cases = [{"batch": 1, "block": r.max}, {"batch": 3, "block": r.min}, {"batch": MAX_BATCH, "block": r.opt}]
    if "prompt_len" in spec.dims:
        r = spec.dims["prompt_len"]
        cases = [{"batch": 1, "prompt_len": r.min}, {"batch": 3, "prompt_len": r.opt}, {"batch": 2, "prompt_len": r.max}]
    return cases


def compare(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> OutputError:
    if actual.shape != expected.shape:
        raise ExportValidationError(f"output shape {actual.shape} != PyTorch's {expected.shape}")
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    within = bool(np.all(diff <= atol + rtol * np.abs(expected)))
    return OutputError(
        max_abs=float(diff.max(initial=0.0)),
        max_rel=float((diff / (np.abs(expected) + atol)).max(initial=0.0)),
        within_tolerance=within,
    )


def validate_graph(spec: GraphSpec, reference, session: ort.InferenceSession) -> list[ValidationCase]:
    results = []
    for seed, dims in enumerate(validation_cases(spec), start=1):
        feeds = spec.sample_inputs(dims, seed=seed)
        expected = reference.run(spec.name, feeds)
        actual = dict(zip(spec.output_names, session.run(spec.output_names, feeds)))
        errors = {name: compare(actual[name], expected[name], spec.atol, spec.rtol) for name in spec.output_names}
        results.append(
            ValidationCase(dims=dims, seed=seed, outputs=errors, passed=all(e.within_tolerance for e in errors.values()))
        )
    return results


def check_generation(
    reference, candidate, prompts: list[str], seed: int = 0, variant: str = "onnxruntime", expected=None
) -> GenerationCheck:
    """A whole greedy generation (batched, so padding is exercised) must give identical tokens.
    ``expected``: the reference's (tokens, images) for these prompts, when already generated."""
    from tandem.pipeline import Pipeline
    from tandem.sampling import SamplingParams

    params = SamplingParams(seed=seed)
    ref_tokens, ref_images = expected or reference_generation(reference, prompts, seed)
    cand_pipe = Pipeline(candidate)
    cand_tokens = cand_pipe.generate_tokens(prompts, params)
    mismatched = int((ref_tokens != cand_tokens).sum())
    # Images are compared on the same (reference) tokens so a token mismatch is not counted twice.
    diff = np.abs(ref_images.astype(np.int16) - cand_pipe.render(ref_tokens).astype(np.int16))
    image_diff = float(diff.max())
    return GenerationCheck(
        variant=variant,
        prompts=prompts,
        seed=seed,
        tokens_equal=mismatched == 0,
        mismatched_tokens=mismatched,
        image_max_abs_diff=image_diff,
        image_atol=IMAGE_ATOL,
        passed=mismatched == 0 and image_diff <= IMAGE_ATOL,
    )


def reference_generation(reference, prompts: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from tandem.pipeline import Pipeline
    from tandem.sampling import SamplingParams

    pipe = Pipeline(reference)
    tokens = pipe.generate_tokens(prompts, SamplingParams(seed=seed))
    return tokens, pipe.render(tokens)


GENERATION_GRAPHS = ["reasoning_prefill", "reasoning_decode", "refinement"]


def generation_checks(reference, artifacts: Path) -> list[GenerationCheck]:
    """Greedy generations of both shipped variants (ONNX Runtime's graphs, the standard-op graphs
    other compilers take) against PyTorch, at the largest batch (the validation prompts first, so
    padding is exercised) and at batch 1 (the first of them alone)."""
    from tandem.runtimes.onnxruntime import OnnxRuntime

    full = [*VALIDATION_PROMPTS, *(f"{VALIDATION_PROMPTS[i % 2]} {i}" for i in range(MAX_BATCH - len(VALIDATION_PROMPTS)))]
    batches = [full, VALIDATION_PROMPTS[:1]]
    expected = [reference_generation(reference, prompts) for prompts in batches]
    checks = []
    for variant, optimized in (("onnxruntime", True), ("plain", False)):
        # Sequential greedy generation runs prefill, decode and refinement only: leaving the verify
        # graph out keeps one copy of the reasoning weights fewer in memory (3.2 GB for medium).
        candidate = OnnxRuntime(artifacts, optimized=optimized, device="cpu", graphs=GENERATION_GRAPHS)
        checks += [check_generation(reference, candidate, p, variant=variant, expected=e) for p, e in zip(batches, expected)]
        del candidate  # one variant's sessions (each a copy of the weights) in memory at a time
    return checks


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def weights_label(config: ModelConfig, checkpoint: str | Path | None) -> str:
    checkpoint = checkpoint if checkpoint is not None else config.checkpoint
    return f"checkpoint:{sha256_file(Path(checkpoint))}" if checkpoint else f"seed:{config.seed}"


def export_inputs_sha256(config: ModelConfig, checkpoint: str | Path | None, external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> str:
    """One hash of everything an export depends on: the config, the weights' content, the code that
    builds, exports and validates the graphs, and the tool versions (as `tandem build` hashes its step)."""
    from tandem.util import code_hash, hash_json

    return hash_json({
        "config": config.model_dump(mode="json"),
        "weights": weights_label(config, checkpoint),
        "code": code_hash("tandem.export.onnx_export"),  # the exporter and everything it imports
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "external_threshold": external_threshold,
    })


def up_to_date(out: str | Path, config: ModelConfig, checkpoint: str | Path | None = None,
               external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Manifest | None:
    """The manifest of the export in ``out`` when it was made from exactly these inputs, passed
    validation and every file it lists is intact; else None (export again)."""
    from tandem.formats.export_manifest import verify_graph_files

    try:
        manifest = read_manifest(out)
        if not manifest.passed or manifest.precision is not None or manifest.inputs_sha256 is None:
            return None
        if manifest.inputs_sha256 != export_inputs_sha256(config, checkpoint, external_threshold):
            return None
        for entry in manifest.graphs.values():
            verify_graph_files(out, entry, optimized=False)
            if entry.optimized_file:
                verify_graph_files(out, entry, optimized=True)
    except TandemError:
        return None
    return manifest


def export_files(directory: Path) -> set[str]:
    """What an export in ``directory`` wrote (its manifest and every file it lists); empty when it
    holds no readable manifest."""
    try:
        manifest = Manifest.model_validate_json((Path(directory) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return set()
    names = {MANIFEST_NAME}
    for entry in manifest.graphs.values():
        names |= {entry.file, *entry.external_data, *entry.optimized_external_data}
        names |= {entry.optimized_file} if entry.optimized_file else set()
    return names


def check_replaceable(out: Path, force: bool) -> None:
    """An export replaces ``out`` as a whole, so ``out`` must be absent, empty or an earlier export
    holding nothing but its own files; anything else (notes, other outputs) is kept unless ``force``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise TandemError(f"{out} exists and is not a folder; choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in export_files(out))
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TandemError(
            f"{out} holds files a tandem export did not write ({shown}); exporting would replace the folder and delete them. "
            "Choose another --out, or pass --force to replace it"
        )


def export_model(
    config: ModelConfig,
    out: str | Path,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> ExportResult:
    """Export and validate both stages into ``out``, staged and swapped in whole. ``out`` must not
    hold files an export did not write unless ``force`` (see :func:`check_replaceable`).
    ``external_threshold``: a graph whose weights exceed this many bytes is written as
    ``<graph>.onnx`` plus ``<graph>.onnx.data`` (tests lower it to cross it with the tiny config)."""
    from tandem.runtimes.torch_eager import TorchRuntime

    out = Path(out)
    check_replaceable(out, force)
    require_export_memory(config)  # refuses before any weight is allocated
    stages = build_stages(config, checkpoint)
    reference = TorchRuntime(config, stages=stages)
    specs = graph_specs(config)
    steps = tqdm(total=3 * len(specs) + 1, desc=f"export {config.name}", unit="step", disable=not progress)
    with atomic_directory(out) as staging:
        entries: dict[str, GraphEntry] = {}
        for spec in specs.values():
            steps.set_postfix_str(f"{spec.name}: torch.onnx.export")
            entry = export_graph(spec, stages, staging, external_threshold)
            steps.update()
            steps.set_postfix_str(f"{spec.name}: validate")
            entry.validation = validate_graph(spec, reference, _session(staging / entry.file))
            steps.update()
            steps.set_postfix_str(f"{spec.name}: rewrite and optimise for onnxruntime")
            optimize_for_onnxruntime(spec, stages, staging, entry, external_threshold)
            entry.optimized_validation = validate_graph(spec, reference, _session(staging / entry.optimized_file))
            entry.passed = all(case.passed for case in (*entry.validation, *entry.optimized_validation))
            steps.update()
            entries[spec.name] = entry
        manifest = Manifest(
            config=config,
            config_fingerprint=config.fingerprint(),
            weights=weights_label(config, checkpoint),
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            graphs=entries,
            inputs_sha256=export_inputs_sha256(config, checkpoint, external_threshold),
        )
        # The generation check loads the staged artifacts exactly as a user would.
        manifest.passed = all(e.passed for e in entries.values())
        manifest.write(staging)
        steps.set_postfix_str("greedy generation vs PyTorch")
        if manifest.passed:
            manifest.generation_checks = generation_checks(reference, staging)
            manifest.generation = manifest.generation_checks[0]
            manifest.passed = all(check.passed for check in manifest.generation_checks)
        manifest.write(staging)
        steps.update()
        steps.close()
        if not manifest.passed:
            raise ExportValidationError(_failure_report(manifest, out))
    return ExportResult(out=out, manifest=manifest)


def _failure_report(manifest: Manifest, out: Path) -> str:
    lines = [f"export to {out} failed validation against PyTorch; nothing was written:"]
    for entry in manifest.graphs.values():
        for case in (*entry.validation, *entry.optimized_validation):
            for name, err in case.outputs.items():
                if not err.within_tolerance:
                    lines.append(
                        f"  {entry.name} {case.dims} output {name}: max abs {err.max_abs:.3g} "
                        f"(atol {entry.atol}, rtol {entry.rtol})"
                    )
    for g in manifest.generation_checks:
        if not g.passed:
            lines.append(
                f"  greedy generation ({g.variant} graphs, batch {len(g.prompts)}): {g.mismatched_tokens} tokens "
                f"differ, image max diff {g.image_max_abs_diff}"
            )
    return "\n".join(lines)
