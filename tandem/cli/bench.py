"""`tandem bench`: measure every runtime and the served ensemble, model other hardware, write a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem.errors import TandemError


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark runtimes, the served ensemble, roofline and modelled hardware; write a report",
        description=(
            "Measures every stage on every runtime available here (latency percentiles, throughput vs batch, decode "
            "cost vs position), the Triton ensemble under a concurrency sweep (HTTP and gRPC), this machine's matmul "
            "peak and memory bandwidth, and models H100/A100/Inferentia2 from published peaks. Writes results.json, "
            "report.md and plots/ to benchmarks/results/<machine>-<date>/ (or --out)."
        ),
    )
    p.add_argument("--config", default="configs/models/small.yaml", help="config name or YAML (default: small)")
    p.add_argument("--artifacts", type=Path, help="export directory to benchmark (default build/<config>, exported if missing)")
    p.add_argument("--out", type=Path, help="report directory (default benchmarks/results/<machine>-<date>[-<config>][-quick])")
    p.add_argument("--quick", action="store_true", help="few iterations: a smoke run for tests and CI, not for comparison")
    p.add_argument("--skip-served", action="store_true", help="do not start tritonserver (the served section says so)")
    p.add_argument("--hardware", type=Path, help="published peaks and prices (default configs/hardware.yaml)")
    p.add_argument("--runtimes", help="comma-separated runtimes to measure (default: every one that can be built here)")
    p.add_argument(
        "--compiled",
        type=Path,
        action="append",
        metavar="DIR",
        help="a `tandem build` output directory for the compiled runtimes (tensorrt, neuron, torch_aot); repeatable",
    )
    p.add_argument("--batches", type=_int_list, default=(1, 2, 4, 8), help="batch sizes for throughput (default 1,2,4,8)")
    p.add_argument("--concurrency", type=_int_list, help="served concurrency levels (default 1,2,4,8,16; quick: 1,2)")
    p.add_argument("--requests", type=int, help="served requests per concurrency level and protocol (default 32; quick: 4)")
    p.add_argument("--protocols", default="http,grpc", help="served protocols (default http,grpc)")
    p.add_argument("--schedulers", default="inflight,request",
                   help="reasoning schedulers to serve and compare, one server each (default inflight,request)")
    p.add_argument("--open-loop-loads", type=_float_list,
                   help="open-loop offered rates as multiples of the in-process rate (default 0.5,1,2,3,4,6; quick: 1,4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--rerender", type=Path, metavar="DIR", help="only redraw report.md and plots/ of DIR from its results.json")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from tandem.bench import BenchOptions, run_benchmark
    from tandem.bench.served import PROTOCOLS, ServedSettings
    from tandem.bench.split import SplitSettings

    if args.rerender:
        from tandem.bench.runner import rerender

        print(f"benchmark report: {rerender(args.rerender) / 'report.md'}")
        return 0

    protocols = tuple(x.strip() for x in args.protocols.split(",") if x.strip())
    unknown = [x for x in protocols if x not in PROTOCOLS]
    if unknown or not protocols:
        raise TandemError(f"--protocols must be a comma-separated subset of {','.join(PROTOCOLS)}, got {args.protocols!r}")
    if args.requests is not None and args.requests < 1:
        raise TandemError(f"--requests must be >= 1, got {args.requests}")
    from tandem.serving.models.common import SCHEDULERS

    schedulers = tuple(x.strip() for x in args.schedulers.split(",") if x.strip())
    if not schedulers or any(x not in SCHEDULERS for x in schedulers) or len(set(schedulers)) != len(schedulers):
        raise TandemError(f"--schedulers must be a comma-separated subset of {','.join(SCHEDULERS)}, got {args.schedulers!r}")
    served = ServedSettings(
        concurrencies=args.concurrency or ((1, 2) if args.quick else (1, 2, 4, 8, 16)),
        requests=args.requests or (4 if args.quick else 32),
        protocols=protocols,
        warmup_requests=2 if args.quick else 8,
        schedulers=schedulers,
        open_loop_loads=args.open_loop_loads or ((1.0, 4.0) if args.quick else ServedSettings.open_loop_loads),
        open_loop_requests=args.requests or (4 if args.quick else 32),
    )
    options = BenchOptions(
        config=args.config,
        artifacts=args.artifacts,
        out=args.out,
        quick=args.quick,
        skip_served=args.skip_served,
        hardware_file=args.hardware,
        runtimes=[x.strip() for x in args.runtimes.split(",")] if args.runtimes else None,
        compiled=args.compiled,
        batches=args.batches,
        served=served,
        split=SplitSettings(requests=4, warmup=1, simulated_requests=2_000) if args.quick else SplitSettings(),
        progress=not args.no_progress,
    )
    result = run_benchmark(options)
    print(f"benchmark report: {result.out / 'report.md'}")
    from tandem.bench.report import busy_warning

    if busy_warning(result.results):
        print(f"  WARNING: {busy_warning(result.results)}")
    for target in result.results["targets"]:
        print(f"  {target['status']:<8}{target['description']}: " + (
            f"{target['value'] * (100 if target['unit'] == '%' else 1):.2f}{'%' if target['unit'] == '%' else 'x'}"
            if target["value"] is not None
            else target["detail"]
        ))
    return 0
