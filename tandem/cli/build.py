"""`tandem build`: the one command CI runs to produce deployable artifacts for a target."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tandem.compiler.targets import TARGETS


def register(sub: argparse._SubParsersAction) -> None:
    targets = "\n".join(f"  {t.name:<11} {t.description}" for t in TARGETS.values())
    p = sub.add_parser(
        "build",
        help="export -> optimise -> compile -> Triton model repository for one target, step by step",
        description="Build deployable artifacts for one target. Each step reports ok / failed / skipped; a re-run "
        "skips steps whose inputs (content hashes) did not change. Targets:\n" + targets,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="config name (tiny, small, seed) or YAML path")
    p.add_argument("--target", required=True, choices=list(TARGETS), help="what to build for")
    p.add_argument("--out", required=True, help="build directory (one per target)")
    p.add_argument("--checkpoint", help="safetensors weights (default: the config's, else seeded init)")
    p.add_argument("--precision", help="fp32 / fp16 / bf16 / fp8 where the target offers it (default: the target's)")
    p.add_argument("--export", dest="reuse_export", metavar="DIR", help="reuse this validated `tandem export` directory instead of exporting")
    p.add_argument("--force", action="store_true", help="run every step even when its inputs are unchanged")
    trt = p.add_argument_group("TensorRT (h100, a100)")
    trt.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder optimisation level 0-5 (default 3)")
    trt.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace memory pool (default 4 GiB)")
    trt.add_argument("--timing-cache", help="timing cache file to read and update (default <out>/cache/tensorrt-<arch>.timing)")
    repo = p.add_argument_group("model repository")
    repo.add_argument("--max-batch-size", type=int, default=8)
    repo.add_argument("--instances", type=int, default=1, help="model instances per stage")
    repo.add_argument("--neuron-cores-per-instance", type=int, default=1, help="inf2: NeuronCores each instance is pinned to")
    p.add_argument("--json", action="store_true", help="print the build manifest as JSON at the end")
    p.set_defaults(handler=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from tandem.compiler.core import BUILD_MANIFEST, BuildOptions, run_build
    from tandem.compiler.steps import summary_table
    from tandem.config import load_config

    config = load_config(args.config)
    repository = {"max_batch_size": args.max_batch_size, "instances": args.instances}
    if TARGETS[args.target].toolchain == "neuron":
        repository["neuron_cores_per_instance"] = args.neuron_cores_per_instance
    options = BuildOptions(
        precision=args.precision,
        checkpoint=args.checkpoint,
        reuse_export=Path(args.reuse_export) if args.reuse_export else None,
        force=args.force,
        opt_level=args.opt_level,
        workspace_gib=args.workspace_gib,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        repository=repository,
    )
    out = Path(args.out)
    print(f"tandem build: {config.name} for {args.target} -> {out}", flush=True)
    result = run_build(config, args.target, out, options)
    print(f"\n{summary_table(result.records)}")
    print(f"build manifest: {out / BUILD_MANIFEST}")
    if args.json:
        print(json.dumps(result.manifest.model_dump(mode="json"), indent=2))
    if not result.passed:
        failed = next(r for r in result.records if r.status == "failed")
        print(f"tandem build: FAILED at step '{failed.name}': {failed.reason}", file=sys.stderr)
        return 1
    if result.manifest.repository:
        print(f"model repository: {out / result.manifest.repository}\nserve it: tandem serve --repository {out / result.manifest.repository}")
    return 0
