"""Roofline: this machine's measured peaks, each graph's work (FLOPs, bytes), and how close a
measured latency comes to what the machine could do.

- Matmul peak: best of PyTorch and NumPy fp32 GEMMs at a few square sizes (GFLOP/s = 2n^3 / t).
- Memory bandwidth: a large array copy, counted STREAM-style as bytes read + bytes written.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the same graph modules the exporter
  traces (matmuls and convolutions; elementwise work, softmax and norms are not counted).
- Bytes: the compulsory traffic of one call: the weights it actually touches (embedding rows looked
  up, only the experts some token is routed to, everything else in full) plus its inputs and
  outputs. For the decode step the cache counts as what a step must read (each row's keys and
  values at positions [0, position)) and write (its new rows), not the whole static buffer the
  graph is handed (``cache_bytes_bound`` records that).
  Intermediate activations are assumed to stay in cache, so this is a lower bound on traffic and
  the roofline time derived from it a lower bound on latency.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tandem.bench.timing import Budget, measure, summarize
from tandem.models import Stages
from tandem.models.reasoning import MoEFeedForward
from tandem.stages import GraphSpec, cache_layout

GEMM_SIZES = (512, 1024, 2048)


def measure_matmul_peak(budget: Budget, sizes: tuple[int, ...] = GEMM_SIZES) -> dict:
    rng = np.random.default_rng(0)
    runs = []
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out_np, out_t = np.empty_like(a), torch.empty_like(ta)
        cases: list[tuple[str, Callable[[], object]]] = [
            ("torch.mm", lambda: torch.mm(ta, tb, out=out_t)),
            ("numpy.matmul", lambda: np.matmul(a, b, out=out_np)),
        ]
        for library, fn in cases:
            stats = summarize(measure(fn, budget))
            gflops = 2 * n**3 / (stats["p50_ms"] / 1e3) / 1e9
            runs.append({"library": library, "n": n, "dtype": "float32", "gflops_p50": gflops, "latency": stats})
    best = max(runs, key=lambda r: r["gflops_p50"])
    return {"peak_gflops": best["gflops_p50"], "best": {k: best[k] for k in ("library", "n")}, "runs": runs}


def measure_memory_bandwidth(budget: Budget, mib: int = 256) -> dict:
    n = mib * 1024 * 1024 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    runs = []
    for library, fn in (("numpy.copyto", lambda: np.copyto(dst, src)), ("torch.copy_", lambda: tdst.copy_(tsrc))):
        stats = summarize(measure(fn, budget))
        gbs = 2 * src.nbytes / (stats["p50_ms"] / 1e3) / 1e9
        runs.append({"library": library, "mib": mib, "gb_s_p50": gbs, "latency": stats})
    best = max(runs, key=lambda r: r["gb_s_p50"])
    return {
        "bandwidth_gb_s": best["gb_s_p50"],
        "best": best["library"],
        "convention": "copy, bytes read + bytes written",
        "runs": runs,
    }


def count_graph_work(stages: Stages, spec: GraphSpec, batch: int, seed: int = 0) -> dict:
    """FLOPs and compulsory bytes of one call of ``spec`` at ``batch`` (fp32 as exported)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = spec.make_module(stages).eval()
    feeds = spec.sample_inputs({"batch": batch}, seed=seed)
    args = [torch.from_numpy(feeds[n]) for n in spec.input_names]

    lookups: dict[nn.Embedding, set[int]] = {}
    moe_experts: dict[MoEFeedForward, set[int]] = {}
    handles = []
    for sub in module.modules():
        if isinstance(sub, nn.Embedding):
            lookups[sub] = set()
            handles.append(
                sub.register_forward_pre_hook(lambda m, a: lookups[m].update(np.unique(a[0].numpy()).tolist()))
            )
        elif isinstance(sub, MoEFeedForward):
            moe_experts[sub] = set()

            def post(m, a, out):
                if m.last_routing is not None:
                    moe_experts[m].update(m.last_routing.unique().tolist())

            handles.append(sub.register_forward_hook(post))
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.inference_mode():
            outputs = module(*args)
    finally:
        for h in handles:
            h.remove()
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)

    special: set[int] = set()
    weight_bytes = 0
    for emb, rows in lookups.items():
        special.add(id(emb.weight))
        weight_bytes += len(rows) * emb.embedding_dim * emb.weight.element_size()
    routed_bytes = 0
    expert_bytes: list[int] = []  # one expert's weights, per MoE layer
    for moe, experts in moe_experts.items():
        fraction = len(experts) / moe.n_experts  # what a kernel that reads only routed experts reads
        expert_bytes.append(sum(w.numel() * w.element_size() for w in (moe.w_gate, moe.w_up, moe.w_down)) // moe.n_experts)
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            special.add(id(w))
            routed_bytes += int(fraction * w.numel() * w.element_size())
    weight_bytes += routed_bytes
    weight_total = 0
    for p in module.parameters():
        weight_total += p.numel() * p.element_size()
        if id(p) not in special:
            weight_bytes += p.numel() * p.element_size()

    def split(arrays) -> tuple[int, int]:
        floats = sum(a.nbytes for a in arrays if np.issubdtype(a.dtype, np.floating))
        ints = sum(a.nbytes for a in arrays if not np.issubdtype(a.dtype, np.floating))
        return floats, ints

    layout = cache_layout(stages.reasoning.config)
    past = [n for n in layout.names("past") if n in feeds]
    in_float, in_int = split(v for k, v in feeds.items() if k not in past)
    out_float, out_int = split(o.numpy() for o in outputs)
    cache_bound = sum(feeds[n].nbytes for n in past)
    cache_read = int(feeds["positions"].sum()) * layout.bytes_per_position if past else 0
    cache_written = sum(o.numpy().nbytes for o, n in zip(outputs, spec.output_names) if n in layout.names("new"))
    in_float += cache_read
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    total_bytes = weight_bytes + in_float + in_int + out_float + out_int
    flops = int(counter.get_total_flops())
    return {
        "graph": spec.name,
        "batch": batch,
        "dims": {name: (batch if name == "batch" else r.opt) for name, r in spec.dims.items()},
        "flops": flops,
        "flops_by_op": by_op,
        "weight_bytes_touched": int(weight_bytes),
        "weight_bytes_total": int(weight_total),
        "io_float_bytes": int(in_float + out_float),
        "io_int_bytes": int(in_int + out_int),
        "cache_read_bytes": int(cache_read),
        "cache_written_bytes": int(cache_written),
        "cache_bytes_bound": int(cache_bound),
        "cache_bytes_per_position": int(layout.bytes_per_position) if past else 0,
        "routed_expert_bytes": int(routed_bytes),
        "expert_bytes_per_layer": expert_bytes,
        "bytes": int(total_bytes),
        "intensity_flop_per_byte": flops / total_bytes if total_bytes else 0.0,
        "routed_experts_per_layer": [len(e) for e in moe_experts.values()] or None,
    }


def bytes_at_precision(work: dict, element_bytes: float) -> float:
    """Compulsory bytes if weights and float tensors were stored with ``element_bytes`` per value
    (4 = fp32 as measured, 2 = fp16/bf16, 1 = fp8); integer inputs/outputs keep their size."""
    scale = element_bytes / 4.0
    return (work["weight_bytes_touched"] + work["io_float_bytes"]) * scale + work["io_int_bytes"]


def work_with_weights_at(work: dict, bytes_per_weight: float) -> dict:
    """``work`` with its weights stored at ``bytes_per_weight`` instead of fp32's 4 (an int8 graph:
    1 plus its scales); activations, the KV cache and FLOPs are unchanged."""
    weights = work["weight_bytes_touched"] * bytes_per_weight / 4.0
    total = weights + work["io_float_bytes"] + work["io_int_bytes"]
    return {**work, "weight_bytes_touched": int(weights), "bytes": int(total), "intensity_flop_per_byte": work["flops"] / total if total else 0.0}


def analyse(work: dict, seconds: float, peak_gflops: float, bandwidth_gb_s: float) -> dict:
    """Where a measured call sits on this machine's roofline."""
    achieved_gflops = work["flops"] / seconds / 1e9
    achieved_gbs = work["bytes"] / seconds / 1e9
    intensity = work["intensity_flop_per_byte"]
    balance = peak_gflops / bandwidth_gb_s
    attainable = min(peak_gflops, intensity * bandwidth_gb_s)
    return {
        "seconds": seconds,
        "bytes": work["bytes"],
        "achieved_gflops": achieved_gflops,
        "fraction_of_matmul_peak": achieved_gflops / peak_gflops,
        "achieved_gb_s": achieved_gbs,
        "fraction_of_bandwidth": achieved_gbs / bandwidth_gb_s,
        "intensity_flop_per_byte": intensity,
        "machine_balance_flop_per_byte": balance,
        "bound": "compute" if intensity >= balance else "memory",
        "roofline_attainable_gflops": attainable,
        "fraction_of_roofline": achieved_gflops / attainable if attainable else 0.0,
        "roofline_seconds": max(work["flops"] / (peak_gflops * 1e9), work["bytes"] / (bandwidth_gb_s * 1e9)),
    }
