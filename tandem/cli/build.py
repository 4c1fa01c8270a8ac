"""`tandem build`: the one command CI runs to produce deployable artifacts for a target."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.common import add_alias, add_config_argument, add_json_argument, default_build_dir, finish
from tandem.compiler.targets import TARGETS
from tandem.errors import EXIT_CHECK_FAILED, EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    targets = "\n".join(f"  {t.name:<11} {t.description}" for t in TARGETS.values())
    p = sub.add_parser(
        "build",
        help="export -> optimise -> compile -> Triton model repository for one target, step by step",
        description="Build deployable artifacts for one target. Each step reports ok / failed / skipped; a re-run "
        "skips steps whose inputs (content hashes) did not change. Targets:\n" + targets,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p, required=True)
    p.add_argument("--target", required=True, choices=list(TARGETS), help="what to build for")
    p.add_argument("--out", help="build folder, one per target (default build/<config>-<target>)")
    p.add_argument("--checkpoint", help="safetensors weights (default: the config's, else seeded init)")
    p.add_argument("--precision", help="fp32 / fp16 / bf16 / fp8 where the target offers it (default: the target's)")
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
    repo.add_argument("--max-batch-size", type=int, default=8)
    repo.add_argument("--instances", type=int, default=1, help="model instances per stage")
    repo.add_argument("--neuron-cores-per-instance", type=int, default=1, help="inf2: NeuronCores each instance is pinned to")
    add_json_argument(p)
    p.set_defaults(handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from tandem import folders
    from tandem.compiler.core import BUILD_MANIFEST, BuildOptions, run_build
    from tandem.compiler.steps import summary_table
    from tandem.config import load_config
    from tandem.preflight import require_memory, require_target

    config = load_config(args.config)
    out = Path(args.out) if args.out else default_build_dir(f"{config.name}-{args.target}")
    reuse = folders.export_dir(args.reuse_export) if args.reuse_export else None
    # Cheap checks first: a missing toolchain or too little memory is reported before exporting anything.
    if not args.no_preflight:
        require_target(args.target)
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
        repository=repository,
    )
    print(f"tandem build: {config.name} for {args.target} -> {out}", flush=True)
    result = run_build(config, args.target, out, options)
    print(f"\n{summary_table(result.records)}")
    print(f"build manifest: {out / BUILD_MANIFEST}")
    code = EXIT_OK
    if not result.passed:
        failed = next(r for r in result.records if r.status == "failed")
        print(f"tandem build: FAILED at step '{failed.name}': {failed.reason}", file=sys.stderr)
        code = EXIT_CHECK_FAILED
    elif result.manifest.repository:
        print(f"model repository: {out / result.manifest.repository}\nserve it: tandem serve --repository {out}")
    return finish(args, {"out": str(out.resolve()), "build_manifest": str((out / BUILD_MANIFEST).resolve()), "build": result.manifest.model_dump(mode="json")}, code)
