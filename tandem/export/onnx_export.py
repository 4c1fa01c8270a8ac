"""Per-stage ONNX export, validated against PyTorch.

Reads only the stage descriptions in :mod:`tandem.stages`. For every graph: export with the
dynamo exporter (named dynamic axes), validate several inputs (batch > 1 included) against
PyTorch, save an ONNX Runtime offline-optimised copy; then check a whole greedy generation
token for token. Everything is written into a staging directory that replaces ``out`` only when
complete, and the export fails (nothing replaced) when a tolerance is not met.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from tandem.config import ModelConfig
from tandem.errors import CheckFailed
from tandem.export.manifest import (
    GenerationCheck,
    GraphEntry,
    Manifest,
    OutputError,
    TensorEntry,
    ValidationCase,
)
from tandem.models import Stages, build_stages
from tandem.stages import MAX_BATCH, GraphSpec, graph_specs
from tandem.util import atomic_directory, sha256_file

log = logging.getLogger(__name__)

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf caps a file at 2 GiB; go external well before that
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


def _dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, torch.export.Dim] | None]:
    dims = {name: torch.export.Dim(name, min=r.min, max=r.max) for name, r in spec.dims.items()}
    return {t.name: ({i: dims[d] for i, d in t.dynamic_axes().items()} or None) for t in spec.inputs}


def export_graph(spec: GraphSpec, stages: Stages, directory: Path) -> GraphEntry:
    module = spec.make_module(stages).eval()
    example = spec.sample_inputs(spec.export_dims, seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    path = directory / f"{spec.name}.onnx"
    with export_patches():
        program = torch.onnx.export(
            module,
            args,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
        external = weight_bytes > EXTERNAL_DATA_THRESHOLD
        program.save(str(path), external_data=external)
    onnx.checker.check_model(str(path))
    external_files = [p.name for p in directory.iterdir() if p.name.startswith(f"{spec.name}.onnx.")]
    return GraphEntry(
        name=spec.name,
        stage=spec.stage,
        file=path.name,
        sha256=sha256_file(path),
        external_data=sorted(external_files),
        inputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.inputs],
        outputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.outputs],
        dims={n: [r.min, r.opt, r.max] for n, r in spec.dims.items()},
        opset=OPSET,
        atol=spec.atol,
        rtol=spec.rtol,
        validation=[],
        passed=False,
    )


def optimize_for_onnxruntime(directory: Path, entry: GraphEntry) -> None:
    """Save ONNX Runtime's offline-optimised graph beside the plain one. EXTENDED, not ALL: ALL
    bakes in layout choices for the CPU it ran on, which would not travel to another machine."""
    optimized = f"{Path(entry.file).stem}.ort.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(directory / optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(directory / entry.file), options, providers=["CPUExecutionProvider"])
    entry.optimized_file = optimized
    entry.optimized_sha256 = sha256_file(directory / optimized)


def validation_cases(spec: GraphSpec) -> list[dict[str, int]]:
    """Batch 1, an odd batch, the largest batch; for prompts, short, typical and longest."""
    cases = [{"batch": 1}, {"batch": 3}, {"batch": MAX_BATCH}]
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


def check_generation(reference, candidate, prompts: list[str], seed: int = 0) -> GenerationCheck:
    """A whole greedy generation (batched, so padding is exercised) must give identical tokens."""
    from tandem.pipeline import Pipeline
    from tandem.sampling import SamplingParams

    ref_pipe, cand_pipe = Pipeline(reference), Pipeline(candidate)
    params = SamplingParams(seed=seed)
    ref_tokens = ref_pipe.generate_tokens(prompts, params)
    cand_tokens = cand_pipe.generate_tokens(prompts, params)
    mismatched = int((ref_tokens != cand_tokens).sum())
    # Images are compared on the same (reference) tokens so a token mismatch is not counted twice.
    diff = np.abs(ref_pipe.render(ref_tokens).astype(np.int16) - cand_pipe.render(ref_tokens).astype(np.int16))
    image_diff = float(diff.max())
    return GenerationCheck(
        prompts=prompts,
        seed=seed,
        tokens_equal=mismatched == 0,
        mismatched_tokens=mismatched,
        image_max_abs_diff=image_diff,
        image_atol=IMAGE_ATOL,
        passed=mismatched == 0 and image_diff <= IMAGE_ATOL,
    )


def _weights_label(config: ModelConfig, checkpoint: str | Path | None) -> str:
    checkpoint = checkpoint if checkpoint is not None else config.checkpoint
    return f"checkpoint:{sha256_file(Path(checkpoint))}" if checkpoint else f"seed:{config.seed}"


def export_model(
    config: ModelConfig, out: str | Path, checkpoint: str | Path | None = None, progress: bool = True
) -> ExportResult:
    from tandem.runtimes.onnxruntime import OnnxRuntime
    from tandem.runtimes.torch_eager import TorchRuntime

    out = Path(out)
    stages = build_stages(config, checkpoint)
    reference = TorchRuntime(config, stages=stages)
    specs = graph_specs(config)
    steps = tqdm(total=3 * len(specs) + 1, desc=f"export {config.name}", unit="step", disable=not progress)
    with atomic_directory(out) as staging:
        entries: dict[str, GraphEntry] = {}
        for spec in specs.values():
            steps.set_postfix_str(f"{spec.name}: torch.onnx.export")
            entry = export_graph(spec, stages, staging)
            steps.update()
            steps.set_postfix_str(f"{spec.name}: validate")
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(staging / entry.file), options, providers=["CPUExecutionProvider"])
            entry.validation = validate_graph(spec, reference, session)
            entry.passed = all(case.passed for case in entry.validation)
            steps.update()
            steps.set_postfix_str(f"{spec.name}: optimise for onnxruntime")
            optimize_for_onnxruntime(staging, entry)
            steps.update()
            entries[spec.name] = entry
        manifest = Manifest(
            config=config,
            config_fingerprint=config.fingerprint(),
            weights=_weights_label(config, checkpoint),
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            graphs=entries,
        )
        # The generation check loads the staged artifacts exactly as a user would.
        manifest.passed = all(e.passed for e in entries.values())
        manifest.write(staging)
        steps.set_postfix_str("greedy generation vs PyTorch")
        if manifest.passed:
            candidate = OnnxRuntime(staging, optimized=True, device="cpu")
            manifest.generation = check_generation(reference, candidate, VALIDATION_PROMPTS)
            manifest.passed = manifest.generation.passed
        manifest.write(staging)
        steps.update()
        steps.close()
        if not manifest.passed:
            raise ExportValidationError(_failure_report(manifest, out))
    return ExportResult(out=out, manifest=manifest)


def _failure_report(manifest: Manifest, out: Path) -> str:
    lines = [f"export to {out} failed validation against PyTorch; nothing was written:"]
    for entry in manifest.graphs.values():
        for case in entry.validation:
            for name, err in case.outputs.items():
                if not err.within_tolerance:
                    lines.append(
                        f"  {entry.name} {case.dims} output {name}: max abs {err.max_abs:.3g} "
                        f"(atol {entry.atol}, rtol {entry.rtol})"
                    )
    if manifest.generation and not manifest.generation.passed:
        g = manifest.generation
        lines.append(f"  greedy generation: {g.mismatched_tokens} tokens differ, image max diff {g.image_max_abs_diff}")
    return "\n".join(lines)
