"""Two ways to run a config's Mixture-of-Experts layers under ONNX Runtime on this CPU, timed in
interleaved rounds: the ``com.microsoft`` ``MoE`` kernel (what tandem's ONNX Runtime graphs use,
the ``moe_kernel`` rewrite) and the routed standard-op form (``MoEFeedForward.forward_routed``
exported by torch.onnx: ``NonZero`` per expert, ``Gather`` of its rows, ``MatMul`` against the
expert's weights, ``ScatterND``/``Add`` back; the form cpu-aot compiles).

ONNX Runtime's CPU ``MoE`` kernel splits the experts between its pool's threads in fixed contiguous
ranges and runs one single-threaded GEMM per expert, so when a step's routed experts fall unevenly
one core waits; in the routed form every ``MatMul`` is split over the pool. This measures what that
costs at batch 1 and 8 on ``--layers`` MoE layers of the config's dimensions (seeded random
weights, random rows: routing is then close to uniform, so batch 8 picks more distinct experts
per layer than real generations do; the report gives the count).

    .venv/bin/python benchmarks/ort_moe_forms.py --config medium --out benchmarks/results/<run>

Writes results.json and report.md to ``--out`` (refused if it exists)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_layers(config, layers: int, seed: int):
    import torch

    from tandem.models.reasoning import MoEFeedForward

    r = config.reasoning
    torch.manual_seed(seed)
    out = []
    for _ in range(layers):
        moe = MoEFeedForward(r.d_model, r.d_ff, r.n_experts, r.top_k)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        out.append(moe.eval())
    return out


def routed_graph(layers, d_model: int, path: Path) -> None:
    """The layers' routed standard-op form, exported by torch.onnx (dynamo) with a dynamic row count."""
    import torch

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, x):
            for moe in self.layers:
                x = x + moe.forward_routed(x)
            return x

    with torch.no_grad():
        program = torch.onnx.export(Stack().eval(), (torch.randn(2, d_model),), dynamic_shapes=({0: torch.export.Dim("rows", min=1, max=64)},),
                                    dynamo=True, external_data=True, verbose=False)
    program.save(str(path), external_data=True)


def kernel_graph(layers, d_model: int, path: Path) -> None:
    """The same layers as com.microsoft MoE nodes, with the attributes and packed weights of tandem's
    moe_kernel rewrite (router MatMul, then MoE, then the residual Add)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tandem.export.rewrites import pack_moe_weights

    nodes, inits, current = [], [], "x"
    for i, moe in enumerate(layers):
        fc1, fc2 = pack_moe_weights(moe)
        inits += [numpy_helper.from_array(moe.router.weight.detach().t().contiguous().numpy(), f"router_{i}"),
                  numpy_helper.from_array(fc1.numpy(), f"fc1_{i}"), numpy_helper.from_array(fc2.numpy(), f"fc2_{i}")]
        nodes += [
            helper.make_node("MatMul", [current, f"router_{i}"], [f"logits_{i}"]),
            helper.make_node("MoE", [current, f"logits_{i}", f"fc1_{i}", "", f"fc2_{i}"], [f"moe_{i}"], domain="com.microsoft",
                             k=moe.top_k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                             activation_alpha=1.0, activation_beta=0.0),
            helper.make_node("Add", [current, f"moe_{i}"], [f"h_{i}"]),
        ]
        current = f"h_{i}"
    graph = helper.make_graph(nodes, "moe_kernel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", d_model])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["rows", d_model])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    from tandem.config import load_config
    from tandem.runtimes.onnxruntime import session_options

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="medium")
    parser.add_argument("--layers", type=int, default=3, help="MoE layers in the timed graph (default 3)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=10, help="timed calls per form, batch and round, each on new rows")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder (this script never overwrites one)")
    config = load_config(args.config)
    r = config.reasoning
    layers = build_layers(config, args.layers, seed=0)
    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    batches = (1, 8)
    with tempfile.TemporaryDirectory() as tmp:
        forms = {"moe_kernel": Path(tmp) / "moe_kernel.onnx", "routed_standard_ops": Path(tmp) / "routed.onnx"}
        kernel_graph(layers, r.d_model, forms["moe_kernel"])
        routed_graph(layers, r.d_model, forms["routed_standard_ops"])
        sessions = {name: ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
                    for name, path in forms.items()}
        rng = np.random.default_rng(0)
        check = rng.standard_normal((8, r.d_model), dtype=np.float32)
        with torch.no_grad():
            expected = torch.from_numpy(check)
            for moe in layers:
                expected = expected + moe(expected, sparse=False)
        agreement = {name: float(np.abs(s.run(None, {"x": check})[0] - expected.numpy()).max()) for name, s in sessions.items()}
        distinct = {}
        for b in batches:
            counts = []
            for _ in range(20):
                x = torch.from_numpy(rng.standard_normal((b, r.d_model), dtype=np.float32))
                with torch.no_grad():
                    for moe in layers:  # each layer routes the rows the previous one returned
                        counts.append(len(torch.unique(moe.route(x)[1])))
                        x = x + moe(x, sparse=False)
            distinct[str(b)] = statistics.mean(counts)
        times = {f"{name}_b{b}": [] for name in sessions for b in batches}
        names = list(sessions)
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for b in batches:
                rows = [rng.standard_normal((b, r.d_model), dtype=np.float32) for _ in range(args.calls + 1)]
                for name in order:
                    session = sessions[name]
                    session.run(None, {"x": rows[-1]})  # warm: the round's first call is not timed
                    t0 = time.perf_counter()
                    for x in rows[:-1]:
                        session.run(None, {"x": x})
                    times[f"{name}_b{b}"].append((time.perf_counter() - t0) / args.calls * 1e3)
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
    results = {
        "script": "benchmarks/ort_moe_forms.py", "started_utc": started.isoformat(timespec="seconds"),
        "config": config.name, "layers": args.layers, "rounds": args.rounds, "calls": args.calls,
        "dims": {"d_model": r.d_model, "d_ff": r.d_ff, "n_experts": r.n_experts, "top_k": r.top_k},
        "onnxruntime": ort.__version__, "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "max_abs_vs_pytorch": agreement, "distinct_experts_per_layer": distinct, "ms_per_call": times,
        "routed_vs_kernel": {},
    }
    lines = [
        f"# ONNX Runtime: `com.microsoft` `MoE` kernel vs the routed standard-op form ({config.name})", "",
        f"- Run: {results['started_utc']} UTC, {args.layers} MoE layers of {config.name} (d_model {r.d_model}, d_ff {r.d_ff}, "
        f"{r.n_experts} experts, top-{r.top_k}), seeded random weights and rows; onnxruntime {ort.__version__}, "
        f"the runtime's session options; load average at start {[round(v, 2) for v in load_start]}, at end "
        f"{[round(v, 2) for v in results['load_average_end']]}",
        f"- {args.rounds} interleaved rounds (the order reversed every other round) x {args.calls} calls per form and batch, "
        "each call on new rows; a round's figure is the mean of its calls",
        f"- Outputs vs eager PyTorch (8 rows): max abs difference {', '.join(f'{k} {v:.1e}' for k, v in agreement.items())}",
        f"- Distinct experts per layer (random rows): batch 1 {distinct['1']:.2f}, batch 8 {distinct['8']:.2f}", "",
        "| batch | MoE kernel ms (median of rounds) | routed standard ops ms | routed / kernel, median of per-round ratios (min-max) |",
        "|---|---|---|---|",
    ]
    for b in batches:
        kernel, routed = times[f"moe_kernel_b{b}"], times[f"routed_standard_ops_b{b}"]
        ratios = [x / y for x, y in zip(routed, kernel)]
        results["routed_vs_kernel"][str(b)] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        lines.append(f"| {b} | {statistics.median(kernel):.2f} | {statistics.median(routed):.2f} | "
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x) |")
    args.out.mkdir(parents=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
