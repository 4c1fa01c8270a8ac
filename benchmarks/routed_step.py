"""The decode step of one config on this CPU: ONNX Runtime's graph (com.microsoft MoE kernels),
the cpu-aot package with routed experts (tandem's ``routed_experts`` rewrite) and the cpu-aot
package of the dense standard-op graph, each against the step's routed-bytes roofline.

    python benchmarks/routed_step.py --config medium --artifacts build/medium \
        --routed pk/routed/decode.cpu.pt2 --dense pk/dense/decode.cpu.pt2 --out benchmarks/results/<run>

The packages are AOTInductor compilations of ``reasoning_decode`` for this CPU (``--build DIR``
makes them: torch.export with and without the rewrite, then ``aoti_compile_and_package`` with the
Inductor options of ``tandem.compiler.torch_aot.inductor_configs``, as ``tandem build --target cpu-aot``
does). Rounds are interleaved (each round times every runtime at
every batch in turn, the order reversed every other round) so that drift in the machine's load falls on all of them alike; the report
gives each runtime's median over rounds and the spread (min..max of the round medians). Feeds are
the stage description's sample inputs (seed 0), the same arrays for every runtime, and the logits
are compared first (greedy tokens must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def build_packages(config, out: Path) -> dict[str, Path]:
    from tandem.compiler.torch_aot import aoti_compile, export_programs
    from tandem.export.onnx_export import export_patches

    packages = {}
    for form, rewrites in (("routed", ("routed_experts",)), ("dense", ())):
        folder = out / form
        folder.mkdir(parents=True, exist_ok=True)
        package = folder / "decode.cpu.pt2"
        if not package.exists():
            export_programs(config, None, folder, graphs=["reasoning_decode"], rewrites=rewrites)
            with export_patches():
                program = torch.export.load(str(folder / "reasoning_decode.pt2"))
                aoti_compile(program, str(package), "cpu")
        packages[form] = package
    return packages


def main() -> None:
    from tandem.bench.roofline import count_graph_work, measure_memory_bandwidth
    from tandem.bench.timing import Budget
    from tandem.config import load_config
    from tandem.models import build_stages
    from tandem.runtimes.onnxruntime import OnnxRuntime
    from tandem.stages import graph_specs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="medium")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifacts", help="the config's export (ONNX Runtime's graphs)")
    source.add_argument("--onnx", type=Path, help="instead of a whole export: ONNX Runtime's reasoning_decode graph alone (the "
                        "reasoning_decode.ort.onnx an export writes), loaded with the session options tandem's runtime uses")
    parser.add_argument("--routed", type=Path, help="cpu-aot package of reasoning_decode, routed experts")
    parser.add_argument("--dense", type=Path, help="cpu-aot package of reasoning_decode, dense standard-op graph")
    parser.add_argument("--package", action="append", default=[], metavar="NAME=PATH",
                        help="another reasoning_decode package timed in the same rounds (e.g. one built with other "
                        "Inductor options), under NAME; repeatable")
    parser.add_argument("--build", type=Path, help="make both packages in this folder first")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per runtime per batch per round")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    extra = []
    for item in args.package:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--package takes NAME=PATH, got {item!r}")
        if name in ("onnxruntime", "cpu-aot routed", "cpu-aot dense"):
            parser.error(f"--package NAME {name!r} is taken by a built-in runtime; pick another")
        extra.append((name, Path(path)))

    config = load_config(args.config)
    spec = graph_specs(config)["reasoning_decode"]
    batches = [int(b) for b in args.batches.split(",")]
    if args.build:
        packages = build_packages(config, args.build)
        args.routed, args.dense = packages["routed"], packages["dense"]

    feeds = {b: spec.sample_inputs({"batch": b}, seed=0) for b in batches}
    stages = build_stages(config)
    work = {b: count_graph_work(stages, spec, b, seed=0) for b in batches}
    with torch.inference_mode():
        reference = {b: stages.reasoning.decode_step(
            torch.from_numpy(feeds[b]["token_ids"]), torch.from_numpy(feeds[b]["positions"]),
            [torch.from_numpy(feeds[b][n]) for n in spec.input_names if n.startswith("past_key")],
            [torch.from_numpy(feeds[b][n]) for n in spec.input_names if n.startswith("past_value")],
        )[0].numpy() for b in batches}
    dense_weight_bytes = sum(
        p.numel() * p.element_size() for p in spec.make_module(stages).parameters()
    )
    del stages

    if args.onnx is not None:
        import onnxruntime as ort

        from tandem.runtimes.onnxruntime import session_options  # OnnxRuntime's own options

        session = ort.InferenceSession(str(args.onnx), session_options(), providers=["CPUExecutionProvider"])
    else:
        session = OnnxRuntime(args.artifacts, graphs=["reasoning_decode"]).sessions["reasoning_decode"]
    logits_at = spec.output_names.index("logits")  # the graphs return next_token_ids first (sampling in the graph)
    runners = {"onnxruntime": lambda b: session.run(["logits"], feeds[b])[0]}
    tensors = {b: [torch.from_numpy(feeds[b][n]) for n in spec.input_names] for b in batches}
    for name, path in (("cpu-aot routed", args.routed), ("cpu-aot dense", args.dense), *extra):
        if path is not None:
            model = torch._inductor.aoti_load_package(str(path))
            runners[name] = (lambda m: lambda b: m(*tensors[b])[logits_at].numpy())(model)

    agreement = {}
    for name, run in runners.items():
        for b in batches:
            with torch.inference_mode():
                logits = run(b)
            agreement[f"{name} b{b}"] = {
                "max_abs_vs_pytorch": float(np.abs(logits - reference[b]).max()),
                "greedy_equal": bool((logits.argmax(-1) == reference[b].argmax(-1)).all()),
            }

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bandwidth = measure_memory_bandwidth(Budget(warmup=2, iterations=20, min_iterations=10, max_seconds=3.0))
    rounds: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in runners}
    load_start = os.getloadavg()
    with torch.inference_mode():
        for name in runners:  # warm-up
            for b in batches:
                runners[name](b)
        for r in range(args.rounds):
            for b in batches:
                # the order reverses every other round (odd rounds run it backwards), so a runner's place in the round falls on every figure alike
                for name, run in (list(runners.items()) if r % 2 == 0 else list(runners.items())[::-1]):
                    samples = []
                    for _ in range(args.calls):
                        t = time.perf_counter()
                        run(b)
                        samples.append((time.perf_counter() - t) * 1e3)
                    rounds[name][b].append(statistics.median(samples))
    load_end = os.getloadavg()

    gb_s = bandwidth["bandwidth_gb_s"]
    rows = []
    for b in batches:
        roofline_ms = work[b]["bytes"] / (gb_s * 1e9) * 1e3
        dense_bytes = work[b]["bytes"] - work[b]["routed_expert_bytes"] + sum(work[b]["expert_bytes_per_layer"]) * config.reasoning.n_experts
        for name in runners:
            values = rounds[name][b]
            median = statistics.median(values)
            rows.append({
                "runtime": name, "batch": b, "median_ms": median, "min_ms": min(values), "max_ms": max(values),
                "rounds_ms": values, "routed_roofline_ms": roofline_ms, "of_routed_roofline": roofline_ms / median,
                "dense_roofline_ms": dense_bytes / (gb_s * 1e9) * 1e3,
            })
    ratios = {}  # the median over rounds of each round's ratio (both figures of a ratio from the same round)

    def paired(a: str, b_: str, b: int) -> float:
        return statistics.median(x / y for x, y in zip(rounds[a][b], rounds[b_][b]))

    for b in batches:
        for name in runners:
            if name != "onnxruntime":
                ratios[f"b{b} {name} / onnxruntime"] = paired(name, "onnxruntime", b)
        if "cpu-aot dense" in runners and "cpu-aot routed" in runners:
            ratios[f"b{b} cpu-aot dense / routed"] = paired("cpu-aot dense", "cpu-aot routed", b)
    result = {
        "config": args.config, "torch": torch.__version__, "bandwidth": bandwidth, "work": work,
        "dense_weight_bytes": dense_weight_bytes, "agreement": agreement, "rows": rows, "ratios": ratios,
        "rounds": args.rounds, "calls_per_round": args.calls, "loadavg_start": load_start, "loadavg_end": load_end,
        "onnxruntime_graph": str(args.onnx) if args.onnx is not None else f"{args.artifacts} (reasoning_decode)",
        "packages": {name: str(path) for name, path in (("cpu-aot routed", args.routed), ("cpu-aot dense", args.dense), *extra)
                     if path is not None},
        "started_utc": started,
        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"),
        "cores": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Decode step, {args.config}, {result['cpu']} ({result['cores']} cores)",
        "",
        f"Memory bandwidth (copy, read + write): {gb_s:.1f} GB/s. {args.rounds} interleaved rounds x {args.calls} calls; "
        f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; started {started} UTC.",
        "",
        f"ONNX Runtime's graph: {result['onnxruntime_graph']}. Packages: "
        + "; ".join(f"{name}: {path}" for name, path in result["packages"].items()) + ".",
        "",
        "| runtime | batch | median ms | spread (round medians) | routed-bytes roofline ms | % of routed roofline | dense-bytes roofline ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['batch']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}..{r['max_ms']:.1f} | "
            f"{r['routed_roofline_ms']:.1f} | {100 * r['of_routed_roofline']:.0f}% | {r['dense_roofline_ms']:.1f} |"
        )
    lines += ["", "Ratios (median over rounds of each round's ratio):", "", *(f"- {k}: {v:.2f}x" for k, v in ratios.items()), "", "Logits vs eager PyTorch (same feeds):", ""]
    lines += [f"- {k}: max abs {v['max_abs_vs_pytorch']:.2e}, greedy equal {v['greedy_equal']}" for k, v in agreement.items()]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
