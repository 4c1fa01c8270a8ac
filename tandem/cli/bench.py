"""`tandem bench`: measure every runtime and the served ensemble, model other hardware, write a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.common import add_config_argument, add_json_argument, add_list_argument, finish, positive_int
from tandem.errors import EXIT_CHECK_FAILED, EXIT_OK, TandemError


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark runtimes, the served ensemble, roofline and modelled hardware; write a report",
        description=(
            "Measures every stage on every runtime available here (latency percentiles, throughput vs batch, decode "
            "cost vs position), the Triton ensemble under a concurrency sweep (HTTP and gRPC), this machine's matmul "
            "peak and memory bandwidth, and models H100/A100/Inferentia2 from published peaks. Writes results.json, "
            "report.md and plots/ to benchmarks/results/<machine>-<date>/ (--quick: build/bench-...-quick/; or --out). A full run "
            "takes about 10-12 minutes on 2 cores; every ratio a target compares is measured in interleaved rounds (median, 10-90% spread; UNSTABLE when the spread straddles the threshold); --quick a few minutes and judges only what it can measure (correctness targets)."
        ),
    )
    add_config_argument(p)
    add_list_argument(p, "--artifacts", item_type=Path, help="tandem output folders to benchmark, comma-separated: an "
                      "export and/or `tandem build` folders (their compiled/ feeds tensorrt, neuron, torch_aot; default "
                      "build/<config>, exported if missing)")
    p.add_argument("--out", type=Path, help="report directory (default benchmarks/results/<machine>-<date>[-<config>]; "
                   "with --quick build/bench-<machine>-<date>[-<config>]-quick, never the tracked benchmarks/results/)")
    p.add_argument("--quick", action="store_true", help="few iterations: a smoke run for tests and CI, not for comparison")
    p.add_argument("--skip-served", action="store_true", help="do not start tritonserver (the served section says so)")
    p.add_argument("--hardware", type=Path, help="published peaks and prices (default configs/hardware.yaml)")
    add_list_argument(p, "--runtime", help="runtimes to measure, comma-separated (default: every one that can be built here)")
    add_list_argument(p, "--runtimes", dest="runtime", help=argparse.SUPPRESS)  # old spelling
    add_list_argument(p, "--compiled", dest="artifacts", item_type=Path, help=argparse.SUPPRESS)  # old: now --artifacts
    add_list_argument(p, "--batch", dest="batches", item_type=positive_int, default=(1, 2, 4, 8),
                      help="batch sizes for throughput, comma-separated (default 1,2,4,8)")
    add_list_argument(p, "--concurrency", item_type=positive_int, help="served concurrency levels (default 1,2,4,8,16; quick: 1,2)")
    p.add_argument("--requests", type=positive_int, help="served requests per concurrency level and protocol (default 32; quick: 4)")
    add_list_argument(p, "--protocol", dest="protocols", default=("http", "grpc"), help="served protocols, comma-separated (default http,grpc)")
    add_list_argument(p, "--scheduler", dest="schedulers", default=("inflight", "request"),
                      help="reasoning schedulers to serve and compare, one server each, comma-separated (default inflight,request)")
    add_list_argument(p, "--open-loop-load", dest="open_loop_loads", item_type=_positive_float,
                      help="open-loop offered rates as multiples of the in-process rate (default 0.5,1,2,3,4,6; quick: 1,4)")
    # Old plural spellings, kept (hidden) for this release.
    add_list_argument(p, "--batches", dest="batches", item_type=positive_int, help=argparse.SUPPRESS)
    add_list_argument(p, "--protocols", dest="protocols", help=argparse.SUPPRESS)
    add_list_argument(p, "--schedulers", dest="schedulers", help=argparse.SUPPRESS)
    add_list_argument(p, "--open-loop-loads", dest="open_loop_loads", item_type=_positive_float, help=argparse.SUPPRESS)
    p.add_argument("--port-base", type=positive_int, metavar="PORT",
                   help="pin the servers' public ports: the served sweeps use PORT..PORT+5 (HTTP, gRPC, metrics of each "
                   "scheduler's server, up together), the split path's 5 servers PORT+6..PORT+20 (default: free ports)")
    add_list_argument(p, "--section", dest="sections",
                      help="what to measure, comma-separated: standard (every section of the small bench) and/or decode-step "
                      "(the decode step per runtime vs its routed-bytes roofline, the dense standard-op figure, the host share "
                      "of generations); default standard, and decode-step alone for configs whose fp32 weights pass 1 GiB "
                      "(medium)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="replace --out even if it holds files tandem bench did not write")
    p.add_argument("--rerender", type=Path, metavar="DIR", help="only redraw report.md and plots/ of DIR from its results.json")
    p.add_argument("--fail-on-target", action="store_true", help="exit 1 when a performance target line says FAIL (UNSTABLE, no verdict, does not)")
    add_json_argument(p)
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from tandem.bench import BenchOptions, run_benchmark
    from tandem.bench.rounds import RoundsBudget
    from tandem.bench.served import PROTOCOLS, ServedSettings
    from tandem.bench.split import SplitSettings

    if args.rerender:
        from tandem.bench.runner import rerender

        report_dir = rerender(args.rerender)
        print(f"benchmark report: {report_dir / 'report.md'}")
        return finish(args, {"out": str(report_dir.resolve()), "report": str((report_dir / "report.md").resolve())})

    protocols = tuple(dict.fromkeys(args.protocols))
    unknown = [x for x in protocols if x not in PROTOCOLS]
    if unknown:
        raise TandemError(f"--protocol must name some of {','.join(PROTOCOLS)}, got {','.join(unknown)}")
    from tandem.serving.models.common import SCHEDULERS

    schedulers = tuple(dict.fromkeys(args.schedulers))
    unknown = [x for x in schedulers if x not in SCHEDULERS]
    if unknown:
        raise TandemError(f"--scheduler must name some of {','.join(SCHEDULERS)}, got {','.join(unknown)}")
    if args.port_base is not None and args.port_base + 20 > 65535:
        raise TandemError(f"--port-base {args.port_base}: the bench needs 21 consecutive ports; choose one at most 65515")
    split_base = None if args.port_base is None else args.port_base + 6  # served: one server per scheduler, 3 ports each
    export, compiled = bench_folders(args.artifacts)
    served = ServedSettings(
        concurrencies=tuple(args.concurrency) if args.concurrency else ((1, 2) if args.quick else (1, 2, 4, 8, 16)),
        requests=args.requests or (4 if args.quick else 32),
        protocols=protocols,
        warmup_requests=2 if args.quick else 8,
        schedulers=schedulers,
        open_loop_loads=tuple(args.open_loop_loads) if args.open_loop_loads else ((1.0, 4.0) if args.quick else ServedSettings.open_loop_loads),
        open_loop_requests=args.requests or (4 if args.quick else 32),
        port_base=args.port_base,
        **({"ratio_rounds": RoundsBudget(rounds=2, min_rounds=2, max_seconds=0.0, warmup_rounds=0), "ratio_c1_requests": 2,
            "ratio_c8_requests": 8} if args.quick else {}),
    )
    options = BenchOptions(
        config=args.config,
        artifacts=export,
        out=args.out,
        force=args.force,
        quick=args.quick,
        skip_served=args.skip_served,
        hardware_file=args.hardware,
        runtimes=[bench_runtime(x) for x in args.runtime] if args.runtime else None,
        compiled=compiled,
        batches=tuple(args.batches),
        served=served,
        split=SplitSettings(requests=4, round_requests=2, warmup=1, simulated_requests=2_000, port_base=split_base) if args.quick
        else SplitSettings(port_base=split_base),
        progress=not args.no_progress,
        sections=tuple(dict.fromkeys(args.sections)) if args.sections else None,
    )
    result = run_benchmark(options)
    print(f"benchmark report: {result.out / 'report.md'}")
    from tandem.bench.report import busy_warning

    warning = busy_warning(result.results)
    if warning:
        print(f"  WARNING: {warning}")
    for target in result.results["targets"]:
        unit = target["unit"]  # a % target's value is already in percent
        if target["value"] is None:
            figure = target["detail"]
        elif target.get("spread"):
            low, high = target["spread"]
            if target.get("spread_of"):
                figure = f"{target['value']:.2f}{unit} (10-90% over {target['spread_of']}: {low:.2f}-{high:.2f}{unit})"
            else:
                figure = f"{target['value']:.2f}{unit} median of {target['rounds']} rounds (10-90%: {low:.2f}-{high:.2f}{unit})"
        else:
            figure = f"{target['value']:.2f}{unit}"
        print(f"  {target['status']:<9}{target['description']}: {figure}")
    # UNSTABLE is no verdict (the rounds straddle the threshold), so it never fails --fail-on-target
    missed = [t for t in result.results["targets"] if t["status"] == "FAIL"]
    code = EXIT_CHECK_FAILED if missed and args.fail_on_target else EXIT_OK
    if code:
        print(f"tandem bench: {len(missed)} target(s) missed (--fail-on-target)", file=sys.stderr)
    return finish(args, {
        "out": str(result.out.resolve()),
        "report": str((result.out / "report.md").resolve()),
        "results": str((result.out / "results.json").resolve()),
        "quick": args.quick,
        "busy_warning": warning or None,
        "targets": result.results["targets"],
        "missed_targets": [t["description"] for t in missed],
        **({"error": f"{len(missed)} target(s) missed (--fail-on-target): " + "; ".join(t["description"] for t in missed)} if code else {}),
    }, code)


def bench_runtime(name: str) -> str:
    """Runtime names as everywhere else (target names too), plus bench's own: the onnxruntime_basic
    variant and the runtimes over a build's precision graphs (onnxruntime_int8)."""
    from tandem.bench.stagebench import PRECISION_RUNTIMES, VARIANTS
    from tandem.cli.common import runtime_name

    return name if name in (*VARIANTS, *PRECISION_RUNTIMES) else runtime_name(name)


def bench_folders(paths: list[Path] | None) -> tuple[Path | None, list[Path] | None]:
    """--artifacts folders -> (the export for torch/onnxruntime, the folders with compiled artifacts)."""
    from tandem.formats import folders

    if not paths:
        return None, None
    export, compiled = None, []
    for path in paths:
        kind = folders.folder_kind(path)
        if kind in (folders.BUILD, folders.COMPILED) and (
            kind == folders.COMPILED
            or folders.folder_kind(Path(path) / "compiled") == folders.COMPILED
            or (Path(path) / "precision").is_dir()  # a build's precision graphs (onnxruntime_int8)
        ):
            compiled.append(Path(path))
        if kind != folders.COMPILED and export is None:
            export = folders.export_dir(path)
    if export is None:
        try:
            export = folders.export_dir(paths[0])  # a compiled folder inside a build: its sibling export/
        except TandemError:
            export = None  # compiled folders alone: the export defaults to build/<config>
    return export, compiled or None
