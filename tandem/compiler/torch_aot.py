"""Ahead-of-time compiled PyTorch: torch.export + AOTInductor packages (``.pt2``).

The optimise step exports every graph with ``torch.export`` (dynamic batch and prompt axes from
the stage description; the decode step's KV cache is a static, preallocated input) and checks the
exported program against eager PyTorch at the smallest and largest shapes. The compile step turns
each exported program into an AOTInductor package for one device: ``cuda-torch`` for the local
NVIDIA GPU (Triton kernels compiled for its compute capability; the runtime replays the decode
step as a CUDA graph), ``cpu-aot`` for this CPU (C++ kernels built with the system compiler for
its vector instruction set). Packages link against the exact libtorch that built them, so the
manifest pins torch's version.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch

from tandem.formats.compiled_manifest import CompiledArtifact, CompiledManifest
from tandem.compiler.steps import StepFailed
from tandem.formats.targets import Target, sm_arch
from tandem.config import ModelConfig
from tandem.errors import ToolchainMissingError
from tandem.formats.export_manifest import Manifest, TensorEntry
from tandem.stages import graph_specs
from tandem.util import sha256_file

CUDA_HINT = (
    "target cuda-torch needs a CUDA GPU: torch {version} here {why}. Run `tandem build --target cuda-torch` on a "
    "machine with an NVIDIA GPU and a CUDA build of torch (https://pytorch.org/get-started/locally/), "
    "or build `--target cpu-aot` for this CPU"
)


def cpu_arch() -> str:
    """``cpu-<isa>``: the vector instruction set Inductor generates C++ kernels for on this machine."""
    from torch._inductor import cpu_vec_isa

    isa = str(cpu_vec_isa.pick_vec_isa()) or "scalar"
    return f"cpu-{isa}"


def require_device(target: Target) -> tuple[str, str]:
    """(arch, device description) of the device the packages are compiled for, or a clear refusal."""
    if target.device == "cuda":
        if not torch.cuda.is_available():
            why = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
            raise ToolchainMissingError(CUDA_HINT.format(version=torch.__version__, why=why))
        return sm_arch(torch.cuda.get_device_capability()), f"cuda ({torch.cuda.get_device_name()})"
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
    except Exception as exc:  # inductor raises its own error types when no compiler is found
        raise ToolchainMissingError(f"target {target.name} needs a C++ compiler for AOTInductor: apt-get install g++ ({exc})") from exc
    if shutil.which(compiler) is None and not Path(compiler).exists():
        raise ToolchainMissingError(f"target {target.name} needs a C++ compiler for AOTInductor ({compiler} not found): apt-get install g++")
    return cpu_arch(), "cpu"


# Inductor's options for a package, per device. On the CPU the weights are frozen into the package as
# constants and every matmul is autotuned at build time between Inductor's C++ GEMM template (weights
# prepacked into its blocked layout, micro-kernels for this machine's vector ISA; it takes the routed
# experts' data-dependent row counts) and ATen's (MKL here). The routed experts' one-row matmuls are
# where it matters: the medium decode step ran 1.8x (batch 1) and 2.3x (batch 8) faster than with ATen's
# mm (README, "Decode step on medium"). The autotuner times the routed matmuls' data-dependent row count
# at Inductor's size hint for unbacked sizes, not at a decode step's 1-8 rows, so its pick is a guess
# the bench then checks.
# On CUDA Inductor's defaults (Triton kernels, ATen's cuBLAS for matmuls).
CPU_INDUCTOR_CONFIGS = {
    "freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
    # the autotuner's tables would flood a build's output (dozens per graph): the step's line says what ran
    "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False,
}
CPU_FALLBACK_CONFIGS: dict[str, object] = {}  # ATen's matmuls, when the template cannot be made safe (below)

# Inductor's C++ GEMM template (torch 2.13) sizes its thread blocks from the row count M and divides by
# them: with a data-dependent M of 0 (an expert no row picked, which the routed form runs as a matmul
# over zero rows so that its weights are never read) the package dies of SIGFPE. The guard below makes
# the template return at once when M is 0 (there is nothing to compute or write: every buffer the
# kernel and its fused epilogue touch has M rows). Where the template's text differs (another torch),
# the CPU packages are built with ATen's matmuls instead.
_GEMM_DYNAMIC_M = "    const int64_t Mr_blocks = (M + Mr - 1) / Mr;\n{%- else %}"
_GEMM_EMPTY_RETURN = "    const int64_t Mr_blocks = (M + Mr - 1) / Mr;\n    if (M == 0) return;  // tandem: no rows\n{%- else %}"


def _gemm_template():
    import torch._inductor.lowering  # noqa: F401 - first: the template module imported alone is a circular import
    from torch._inductor.codegen import cpp_gemm_template

    return cpp_gemm_template


def gemm_template_guardable() -> bool:
    """Whether this torch's C++ GEMM template has the text the zero-row guard patches."""
    try:
        return _GEMM_DYNAMIC_M in _gemm_template().GEMM_TEMPLATE_INIT_BLOCKING_BASIC_BLOCK
    except (ImportError, AttributeError):
        return False


@contextlib.contextmanager
def zero_row_gemm_guard():
    """While compiling: the C++ GEMM template returns at once for a matmul over zero rows."""
    module = _gemm_template()
    original = module.GEMM_TEMPLATE_INIT_BLOCKING_BASIC_BLOCK
    if _GEMM_DYNAMIC_M not in original:
        raise StepFailed(
            f"torch {torch.__version__}'s C++ GEMM template differs from the one tandem's zero-row guard patches: packages "
            "using it could die of SIGFPE on an expert no row picked. Build with torch==2.13.0, or without the template "
            "(tandem.compiler.torch_aot.CPU_FALLBACK_CONFIGS)"
        )
    module.GEMM_TEMPLATE_INIT_BLOCKING_BASIC_BLOCK = original.replace(_GEMM_DYNAMIC_M, _GEMM_EMPTY_RETURN)
    try:
        yield
    finally:
        module.GEMM_TEMPLATE_INIT_BLOCKING_BASIC_BLOCK = original


def inductor_configs(device: str) -> dict[str, object]:
    """The ``inductor_configs`` a package for ``device`` ("cpu" or "cuda") is compiled with."""
    if device != "cpu":
        return {}
    return dict(CPU_INDUCTOR_CONFIGS if gemm_template_guardable() else CPU_FALLBACK_CONFIGS)


def aoti_compile(program, package_path: str, device: str, configs: dict[str, object] | None = None, guard: bool = True) -> str:
    """One AOTInductor package of ``program`` for ``device``, with :func:`inductor_configs` (or
    ``configs``). On the CPU it compiles under :func:`zero_row_gemm_guard` whenever the template can
    be guarded (``TORCHINDUCTOR_MAX_AUTOTUNE=1`` in the environment turns the template on even with
    no configs); ``guard=False`` only for the test that shows what the guard prevents."""
    configs = inductor_configs(device) if configs is None else configs
    guarded = guard and device == "cpu" and (gemm_template_guardable() or bool(configs.get("max_autotune")))
    with zero_row_gemm_guard() if guarded else contextlib.nullcontext():
        return torch._inductor.aoti_compile_and_package(program, package_path=package_path, inductor_configs=configs)


def package_name(graph: str, arch: str) -> str:
    return f"{graph}.{arch}.pt2"


def export_programs(
    config: ModelConfig,
    checkpoint: str | Path | None,
    out: Path,
    graphs: list[str] | None = None,
    rewrites: tuple[str, ...] = (),
) -> list[Path]:
    """The optimise step: torch.export every graph with ``rewrites`` (:mod:`tandem.export.rewrites`;
    the toolchain's ``graph_rewrites``) and check the exported program against eager PyTorch's
    standard graph."""
    from tandem.export.onnx_export import compare, dynamic_shapes, export_patches
    from tandem.export.rewrites import graph_rewrites, rewrites_for
    from tandem.models import build_stages

    stages = build_stages(config, checkpoint)
    written = []
    for spec in graph_specs(config).values():
        if graphs is not None and spec.name not in graphs:
            continue
        module = spec.make_module(stages).eval()
        example = spec.sample_inputs(spec.export_dims, seed=0)
        args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
        with export_patches():
            with graph_rewrites(rewrites_for(rewrites, spec), stages):
                program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(spec, module))
            exported = program.module()
            for seed, which in enumerate(("min", "max"), start=1):
                dims = {name: getattr(r, which) for name, r in spec.dims.items()}
                feeds = spec.sample_inputs(dims, seed=seed)
                tensors = [torch.from_numpy(feeds[n]) for n in spec.input_names]
                expected, actual = module(*tensors), exported(*tensors)
                expected = expected if isinstance(expected, tuple) else (expected,)
                actual = actual if isinstance(actual, tuple) else (actual,)
                for name, e, a in zip(spec.output_names, expected, actual):
                    err = compare(a.numpy(), e.numpy(), spec.atol, spec.rtol)
                    if not err.within_tolerance:
                        raise StepFailed(
                            f"torch.export of {spec.name} differs from eager PyTorch at {which} shapes {dims}: "
                            f"{name} max abs {err.max_abs:.3g} (atol {spec.atol})"
                        )
        path = out / f"{spec.name}.pt2"  # ``out`` is a staging directory swapped in when complete
        torch.export.save(program, str(path))
        written.append(path)
    return written


def compile_packages(
    target: Target,
    optimised: Path,
    staging: Path,
    export_manifest: Manifest,
    inputs: dict[str, str],
    graphs: list[str] | None = None,
) -> CompiledManifest:
    """The compile step: one AOTInductor package per graph for the local device."""
    arch, device = require_device(target)
    from tqdm.auto import tqdm

    from tandem.export.onnx_export import export_patches

    config = export_manifest.config
    specs = [s for s in graph_specs(config).values() if graphs is None or s.name in graphs]
    artifacts = []
    for spec in tqdm(specs, desc=f"aotinductor {target.name}", unit="graph"):
        source = optimised / f"{spec.name}.pt2"
        if not source.exists():
            raise StepFailed(f"{source} is missing: the optimise step did not finish; run the build again")
        with export_patches():
            program = torch.export.load(str(source))
            if target.device == "cuda":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, "cuda")
            name = package_name(spec.name, arch)
            # ``staging`` is swapped into place only when every package is built (atomic_directory).
            aoti_compile(program, str(staging / name), target.device)
        artifacts.append(
            CompiledArtifact(
                graph=spec.name,
                stage=spec.stage,
                file=name,
                sha256=sha256_file(staging / name),
                size=(staging / name).stat().st_size,
                inputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.inputs],
                outputs=[TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in spec.outputs],
                profile={w: {k: list(v) for k, v in spec.profile(w).items()} for w in ("min", "opt", "max")},
            )
        )
    return CompiledManifest(
        target=target.name,
        toolchain=target.toolchain,
        arch=arch,
        device=device,
        precision="fp32",
        config=config,
        config_fingerprint=export_manifest.config_fingerprint,
        weights=export_manifest.weights,
        tool_versions={"torch": torch.__version__, "numpy": np.__version__},
        pinned=["torch"],
        inputs=inputs,
        builder={"compiler": "torch._inductor.aoti_compile_and_package", "inductor_configs": inductor_configs(target.device),
                 "zero_row_gemm_guard": target.device == "cpu" and gemm_template_guardable(),
                 "cuda_graphs_for": ["reasoning_decode"] if target.device == "cuda" else []},
        artifacts=artifacts,
    )
