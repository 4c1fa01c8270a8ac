"""`tandem build`: the one command CI runs to produce deployable artifacts for a target."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.common import add_alias, add_config_argument, add_json_argument, default_build_dir, finish, positive_int
from tandem.formats.targets import TARGETS
from tandem.errors import EXIT_CHECK_FAILED, EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    targets = "\n".join(f"  {t.name:<11} {t.description}" for t in TARGETS.values())
    p = sub.add_parser(
        "build",
        help="export -> optimise -> compile -> Triton model repository for one target, step by step",
        description="Build deployable artifacts for one target. Each step prints OK, FAILED or SKIPPED (ok / failed / skipped in the JSON); a re-run "
        "skips steps whose inputs (content hashes) did not change. Targets:\n" + targets,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--target", required=True, choices=list(TARGETS), help="what to build for")
    p.add_argument("--out", help="build folder, one per target (default build/<config>-<target>)")
    p.add_argument("--checkpoint", help="safetensors weights (default: the config's, else seeded init)")
    p.add_argument(
        "--precision",
        help="fp32 / fp16 / bf16 / int8 / fp8 where the target offers it (default: the target's); written into the "
        "graphs by the precision step and gated on accuracy",
    )
    add_gate_arguments(p)
    p.add_argument("--artifacts", dest="reuse_export", metavar="DIR",
                   help="reuse the validated export in DIR (a `tandem export` or another build folder) instead of exporting")
    add_alias(p, "--export", dest="reuse_export")
    p.add_argument("--force", action="store_true", help="run every step even when its inputs are unchanged")
    p.add_argument("--no-preflight", action="store_true", help="run the steps that can run here even when the target's "
                   "toolchain or device is missing (e.g. export and optimise on a CPU host; compile then fails, exit 1)")
    trt = p.add_argument_group("TensorRT (h100, a100)")
    trt.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder optimisation level 0-5 (default 3)")
    trt.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace memory pool (default 4 GiB)")
    trt.add_argument("--timing-cache", help="timing cache file to read and update (default <out>/cache/tensorrt-<arch>.timing)")
    repo = p.add_argument_group("model repository")
    repo.add_argument("--max-batch-size", type=positive_int, default=8, help="largest batch each served model takes (default 8)")
    repo.add_argument("--instances", type=int, default=1, help="model instances per stage")
    repo.add_argument("--neuron-cores-per-instance", type=int, default=1, help="inf2: NeuronCores each instance is pinned to")
    add_json_argument(p)
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser(
        "precision",
        help="write <graph>.<precision>.onnx for a target from an export, check it against fp32, gate it on accuracy",
    )
    p.add_argument("--artifacts", required=True, metavar="DIR",
                   help="a validated fp32 export (a `tandem export` folder or a build folder holding one)")
    p.add_argument("--target", required=True, choices=[t.name for t in TARGETS.values() if t.toolchain in ("onnxruntime", "tensorrt")],
                   help="the target the graphs are for (cpu: ONNX Runtime; h100, a100: TensorRT)")
    p.add_argument("--precision", required=True, help="a precision the target offers (int8 for cpu; fp16 / bf16 / int8 / fp8 for TensorRT)")
    p.add_argument("--out", required=True, help="directory for the precision graphs (an export's layout)")
    p.add_argument("--checkpoint", help="the weights the export was made from (default: the config's)")
    add_gate_arguments(p)
    add_json_argument(p)
    p.set_defaults(handler=cmd_precision)


def gate_captions_value(text: str) -> int | None:
    """``--gate-captions``: a positive count, or ``all`` (None) for the whole held-out pool."""
    if text.strip().lower() == "all":
        return None
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


gate_captions_value.__name__ = "count (a positive integer) or 'all'"


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    from tandem.compiler.precision_gate import DEFAULT_GATE_CAPTIONS

    p.add_argument(
        "--gate-captions", type=gate_captions_value, metavar="N|all", default=DEFAULT_GATE_CAPTIONS,
        help=f"held-out captions the accuracy gate generates from, spread evenly over the pool (default "
        f"{DEFAULT_GATE_CAPTIONS}, about a minute on 2 cores; 'all' for the whole pool: hours, the estimate is printed first)",
    )
    p.add_argument(
        "--accept-accuracy-loss", metavar="REASON",
        help="ship a precision the accuracy gate refuses; REASON is recorded in the manifests",
    )


def announce_gate(export_or_config, captions: int | None) -> None:
    """Say how many captions the gate generates from and, for the whole pool, how long it takes."""
    from tandem.compiler.precision_gate import DEFAULT_GATE_CAPTIONS, GATE_SECONDS_PER_CAPTION, gate_captions
    from tandem.config import ModelConfig

    if isinstance(export_or_config, ModelConfig):
        config = export_or_config
    else:
        from tandem.formats.export_manifest import read_manifest

        config = read_manifest(export_or_config).config
    pool = len(gate_captions(config, None))
    if captions is None:
        low, high = (pool * seconds / 3600 for seconds in GATE_SECONDS_PER_CAPTION)
        print(f"accuracy gate: the whole held-out pool, {pool:,} captions: about {low:.1f}-{high:.1f} h on 2 CPU cores "
              f"(quiet to busy; the default --gate-captions samples {DEFAULT_GATE_CAPTIONS} in under a minute)",
              file=sys.stderr, flush=True)
    else:
        print(f"accuracy gate: {min(captions, pool)} of the {pool:,} held-out captions (--gate-captions all for every one)",
              file=sys.stderr, flush=True)


def cmd_precision(args: argparse.Namespace) -> int:
    from tandem.formats import folders
    from tandem.compiler.precision_gate import make_precision_graphs

    target = TARGETS[args.target]
    precision = target.check_precision(args.precision)
    announce_gate(folders.export_dir(Path(args.artifacts)), args.gate_captions)
    report = make_precision_graphs(
        folders.export_dir(Path(args.artifacts)), args.out, target.toolchain, precision, checkpoint=args.checkpoint,
        captions=args.gate_captions, override=args.accept_accuracy_loss,
    )
    for g in report.graphs.values():
        print(f"  {g.graph:<20} {g.precision:<5} error {g.max_output_error:.2e} of fp32's range (limit {g.tolerance:g}), {g.validated_with}")
    if report.generation is not None:
        print(f"  greedy tokens agree with fp32 on {report.generation.token_agreement:.2%} of positions ({report.generation.captions} held-out captions)")
    if report.accuracy is not None:
        a = report.accuracy
        print(f"  compositional accuracy {a.precision:.2%} vs fp32 {a.fp32:.2%} ({a.drop_points:+.2f} points below)")
    elif report.accuracy_note:
        print(f"  {report.accuracy_note}")
    if report.override:
        print(f"  accuracy gate overridden ({report.override}): {'; '.join(report.refusals)}")
    print(f"{precision} graphs for {target.name}: {args.out} (manifest: {args.out}/manifest.json)")
    return finish(args, {"out": str(Path(args.out).resolve()), "precision": report.model_dump(mode="json")})


def cmd_build(args: argparse.Namespace) -> int:
    from tandem.formats import folders
    from tandem.compiler.core import BuildOptions, run_build
    from tandem.formats.build_manifest import BUILD_MANIFEST
    from tandem.compiler.steps import summary_table
    from tandem.config import load_config
    from tandem.preflight import require_memory, require_target

    config = load_config(args.config)
    out = Path(args.out) if args.out else default_build_dir(f"{config.name}-{args.target}")
    reuse = folders.export_dir(args.reuse_export) if args.reuse_export else None
    # Cheap checks first: a missing toolchain or too little memory is reported before exporting anything.
    TARGETS[args.target].check_precision(args.precision)  # a precision the target lacks is a usage error (exit 2)
    if not args.no_preflight:
        require_target(args.target, args.precision)
    if reuse is None:
        require_memory(config, "build")
    repository = {"max_batch_size": args.max_batch_size, "instances": args.instances}
    if TARGETS[args.target].toolchain == "neuron":
        repository["neuron_cores_per_instance"] = args.neuron_cores_per_instance
    options = BuildOptions(
        precision=args.precision,
        checkpoint=args.checkpoint,
        reuse_export=reuse,
        force=args.force,
        opt_level=args.opt_level,
        workspace_gib=args.workspace_gib,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        gate_captions=args.gate_captions,
        accept_accuracy_loss=args.accept_accuracy_loss,
        repository=repository,
    )
    print(f"tandem build: {config.name} for {args.target} -> {out}", flush=True)
    precision = TARGETS[args.target].check_precision(args.precision)
    if precision != "fp32" and TARGETS[args.target].toolchain in ("onnxruntime", "tensorrt"):
        announce_gate(config, args.gate_captions)
    result = run_build(config, args.target, out, options)
    print(f"\n{summary_table(result.records)}")
    print(f"build manifest: {out / BUILD_MANIFEST}")
    code, error = EXIT_OK, None
    if not result.passed:
        failed = next(r for r in result.records if r.status == "failed")
        error = f"step '{failed.name}' failed: {failed.reason}"
        print(f"tandem build: FAILED at step '{failed.name}': {failed.reason}", file=sys.stderr)
        code = EXIT_CHECK_FAILED
    elif result.manifest.repository:
        print(f"model repository: {out / result.manifest.repository}\nserve it: tandem serve --repository {out}")
    return finish(args, {"out": str(out.resolve()), "build_manifest": str((out / BUILD_MANIFEST).resolve()), "build": result.manifest.model_dump(mode="json"),
                           **({"error": error} if error else {})}, code)
