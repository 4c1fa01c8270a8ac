"""One row against many weight matrices, the shape of a batch-1 decode step's routed experts on the
medium config (22 [1024 x 2816] fp32 matrices: 2 experts x 11 layers x one of gate/up; 254 MB, past
the last-level cache), through each GEMM backend a tandem runtime could call on this CPU:

- ``torch_mm_nn``: ``torch.mm(x, W)`` with W stored [d, f], as tandem's experts are and as the cpu-aot
  package's routed experts call it (AOTInductor lowers these matmuls to ``aten.mm``: MKL here);
- ``torch_mv_t``: ``torch.mv`` over the transposed view (MKL sgemv);
- ``torch_linear_nt``: ``F.linear`` over W stored [f, d];
- ``onednn_linear``: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``), what Inductor's CPU
  freezing passes use for linear layers;
- ``onnxruntime_matmul``: ONNX Runtime's ``MatMul`` (MLAS), the kernel under its ``MoE`` op's experts;
- ``aoti_cpu_configs``: an AOTInductor package of the same matmuls (the row count dynamic, as the routed
  experts' is) compiled with tandem's CPU options (``tandem.compiler.torch_aot.inductor_configs``: frozen
  weights, each matmul autotuned between Inductor's C++ GEMM template and ATen), what ``tandem build
  --target cpu-aot`` ships; ``aoti_aten``: the same package with Inductor's defaults (ATen's ``mm``), what
  it shipped before (``--no-aoti`` skips both: compiling takes a minute or two).

Rounds are interleaved (every backend, then a 256 MiB copy, in alternating order), so host drift falls
on all of them alike; each backend's figure is its median seconds per pass over all matrices, and its
ratio to ONNX Runtime is the median of the per-round ratios.

    python benchmarks/gemv_backends.py --out benchmarks/results/gemv-backends-<machine>-<date>
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for results.json and report.md")
    parser.add_argument("--matrices", type=int, default=22)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-aoti", action="store_true", help="skip the two AOTInductor packages")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; pick a new folder (this script never overwrites one)")

    import onnxruntime as ort
    import torch
    import torch.nn.functional as F
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(args.threads)
    n, d, f = args.matrices, 1024, 2816
    gen = torch.Generator().manual_seed(0)
    w_df = [torch.randn(d, f, generator=gen) for _ in range(n)]
    w_fd = [w.t().contiguous() for w in w_df]
    x = torch.randn(1, d, generator=gen)

    nodes, inits, outs = [], [], []
    for i, w in enumerate(w_df):
        inits.append(numpy_helper.from_array(w.numpy(), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, f]))
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])], outs, inits)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), options,
        providers=["CPUExecutionProvider"])
    xn = x.numpy()
    reference = [x @ w for w in w_df]

    backends = {
        "torch_mm_nn": lambda: [torch.mm(x, w) for w in w_df],
        "torch_mv_t": lambda: [torch.mv(w.t(), x[0]) for w in w_df],
        "torch_linear_nt": lambda: [F.linear(x, w) for w in w_fd],
        "onednn_linear": lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in w_fd],
        "onnxruntime_matmul": lambda: session.run(None, {"x": xn}),
    }
    skipped = {}
    if not args.no_aoti:
        import tempfile

        from tandem.compiler.torch_aot import aoti_compile

        class Matmuls(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for w in w_df])

            def forward(self, rows):
                return [torch.mm(rows, w) for w in self.w]

        rows_dim = torch.export.Dim("rows", min=1, max=8)
        program = torch.export.export(Matmuls().eval(), (torch.randn(2, d),), dynamic_shapes=({0: rows_dim},))
        scratch = tempfile.TemporaryDirectory(prefix="gemv-aoti-")
        for name, configs in (("aoti_cpu_configs", None), ("aoti_aten", {})):
            print(f"compiling {name} ...", flush=True)
            try:
                package = torch._inductor.aoti_load_package(aoti_compile(program, f"{scratch.name}/{name}.pt2", "cpu", configs))
            except Exception as exc:  # no C++ compiler, a torch whose template the guard does not know
                skipped[name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            backends[name] = (lambda p: lambda: p(x))(package)
    with torch.inference_mode():
        for name in list(backends):
            try:
                got = backends[name]()
            except Exception as exc:  # a backend this torch build lacks
                skipped[name] = f"{type(exc).__name__}: {exc}"[:200]
                del backends[name]
                continue
            err = max(float(np.abs(np.asarray(g).reshape(-1) - r.numpy().reshape(-1)).max()) for g, r in zip(got, reference))
            if err > 1e-2:
                raise SystemExit(f"{name} differs from x @ W by {err:.3g}")
        a = np.ones(2**26, np.float32)
        b = np.empty_like(a)
        arms = {"copy": lambda: np.copyto(b, a), **backends}
        for fn in arms.values():
            fn()
        seconds: dict[str, list[float]] = {k: [] for k in arms}
        start = time.perf_counter()
        for r in range(args.rounds):
            for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                t0 = time.perf_counter()
                for _ in range(5):
                    arms[name]()
                seconds[name].append((time.perf_counter() - t0) / 5)
            print(f"round {r + 1}/{args.rounds}", flush=True)
        wall = time.perf_counter() - start

    weight_bytes = n * d * f * 4
    copy_gb_s = [2 * a.nbytes / s / 1e9 for s in seconds["copy"]]
    rows = {}
    for name in backends:
        per_round = [s / o for s, o in zip(seconds[name], seconds["onnxruntime_matmul"])]
        rows[name] = {
            "median_ms": 1e3 * float(np.median(seconds[name])),
            "round_ms": [round(1e3 * s, 3) for s in seconds[name]],
            "vs_onnxruntime_median": float(np.median(per_round)),
            "vs_onnxruntime_spread": [float(np.percentile(per_round, 10)), float(np.percentile(per_round, 90))],
            "read_gb_s_median": float(np.median([weight_bytes / s / 1e9 for s in seconds[name]])),
        }
    results = {
        "machine": platform.processor() or platform.machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - wall)),
        "matrices": n, "shape": [d, f], "weight_bytes": weight_bytes, "threads": args.threads,
        "rounds": args.rounds, "wall_s": wall, "copy_gb_s_median": float(np.median(copy_gb_s)),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "backends": rows, "skipped": skipped,
    }
    args.out.mkdir(parents=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"# One row x {n} [{d} x {f}] fp32 matrices ({weight_bytes / 1e6:.0f} MB), {args.threads} threads",
        "",
        f"{args.rounds} interleaved rounds, {wall:.0f} s; copy bandwidth (read + write) {results['copy_gb_s_median']:.1f} GB/s "
        f"(median of the rounds); torch {torch.__version__} (CPU capability {results['torch_cpu_capability']}), "
        f"onnxruntime {ort.__version__}.",
        "",
        "| backend | median ms per pass | weights read, GB/s | vs ONNX Runtime MatMul (median of round ratios, 10-90%) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lo, hi = row["vs_onnxruntime_spread"]
        lines.append(f"| {name} | {row['median_ms']:.2f} | {row['read_gb_s_median']:.1f} | {row['vs_onnxruntime_median']:.2f}x ({lo:.2f}-{hi:.2f}x) |")
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
