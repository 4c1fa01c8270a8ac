"""The issue's performance targets, evaluated on one run's figures: PASS, FAIL (with how far off)
or NOT RUN (with why). Ratios always compare figures measured in the same run."""

from __future__ import annotations

from tandem.bench.present import Target




def _p50(results: dict, runtime: str, graph: str, batch: int = 1) -> float | None:
    try:
        return results["stages"][runtime][graph]["batches"][str(batch)]["p50_ms"]
    except KeyError:
        return None


# What a --quick run can judge: correctness (token-identical served requests, the int8 gate's token
# agreement). Every other target is a timing ratio, and a quick run's few iterations cannot judge one.
QUICK_JUDGED = frozenset({"served_exact", "cpu_int8_token_agreement"})
QUICK_NOT_JUDGED = "quick mode times too few iterations to judge a timing target; run `tandem bench` without --quick"


def evaluate_targets(results: dict) -> list[Target]:
    targets = _evaluate_targets(results)
    if results.get("quick"):
        for t in targets:
            if t.id not in QUICK_JUDGED:
                t.not_judged(QUICK_NOT_JUDGED)
    return targets


def _evaluate_targets(results: dict) -> list[Target]:
    targets = []

    for tid, graph, label, threshold in (
        ("ort_decode_speedup", "reasoning_decode", "decode step", 2.0),
        ("ort_refinement_speedup", "refinement", "refinement", 1.3),
    ):
        eager, ort = _p50(results, "torch", graph), _p50(results, "onnxruntime", graph)
        detail = f"p50 {eager:.3f} ms eager vs {ort:.3f} ms ONNX Runtime" if eager and ort else ""
        variant = _p50(results, "onnxruntime_basic", graph)
        if detail and variant:
            detail += f" (BASIC instead of ALL at load, not shipped: {variant:.3f} ms, {eager / variant:.2f}x)"
        t = Target(tid, f"ONNX Runtime {label} vs eager PyTorch, batch 1", threshold, ">=", "x")
        targets.append(t.evaluate(eager / ort if eager and ort else None, detail, "needs both the torch and onnxruntime runtimes"))

    targets += decode_targets(results)

    positions = results.get("decode_positions", {}).get("onnxruntime", {})
    t = Target("decode_flat", "decode cost per token at position 256 vs position 16 (ONNX Runtime)", 1.5, "<=", "x")
    if "p50_ms" in positions.get("256", {}) and "p50_ms" in positions.get("16", {}):
        a, b = positions["16"]["p50_ms"], positions["256"]["p50_ms"]
        t.evaluate(b / a, f"p50 {b:.3f} ms at 256 vs {a:.3f} ms at 16")
    else:
        t.evaluate(None, "", f"positions measured: {sorted(map(int, positions)) or 'none'} (max_len too small for 256?)")
    targets.append(t)

    served = results.get("served", {})
    ok = served.get("status") == "ok"
    inproc = served.get("inprocess", {}).get("latency", {}).get("p50_ms") if ok else None
    for protocol in ("http", "grpc"):
        levels = served.get("protocols", {}).get(protocol, {}) if ok else {}
        absent = f"not run: {protocol} not among the protocols measured" if ok and protocol not in served.get("protocols", {}) else None
        c1 = levels.get("1", {})
        p50 = c1.get("latency", {}).get("p50_ms")
        t = Target(
            f"served_overhead_{protocol}",
            f"served ensemble ({protocol.upper()}) vs in-process ONNX Runtime pipeline, concurrency 1, p50 latency",
            1.10,
            "<=",
            "x",
        )
        targets.append(
            t.evaluate(
                p50 / inproc if p50 and inproc else None,
                f"p50 {p50:.1f} ms served vs {inproc:.1f} ms in-process" if p50 and inproc else "",
                served.get("status", "not run") if not ok else absent or f"no {protocol} level at concurrency 1",
            )
        )
        c8 = levels.get("8", {})
        r1, r8 = c1.get("images_per_s"), c8.get("images_per_s")
        t = Target(
            f"served_scaling_{protocol}",
            f"served throughput ({protocol.upper()}) at concurrency 8 vs concurrency 1",
            2.5,
            ">=",
            "x",
        )
        targets.append(
            t.evaluate(
                r8 / r1 if r1 and r8 else None,
                f"{r8:.2f} vs {r1:.2f} images/s" if r1 and r8 else "",
                served.get("status", "not run") if not ok else absent or f"no {protocol} levels at concurrency 1 and 8",
            )
        )

    targets += served_scheduler_targets(results)

    # CPU int8: the decode step's speed-up over fp32 in the same run, and the gate's token agreement.
    fp32, int8 = _p50(results, "onnxruntime", "reasoning_decode"), _p50(results, "onnxruntime_int8", "reasoning_decode")
    t = Target("cpu_int8_decode_speedup", "int8 decode step vs fp32 (ONNX Runtime CPU), batch 1, p50", 1.5, ">=", "x")
    targets.append(
        t.evaluate(
            fp32 / int8 if fp32 and int8 else None,
            f"p50 {fp32:.3f} ms fp32 vs {int8:.3f} ms int8" if fp32 and int8 else "",
            "needs the onnxruntime runtime and a cpu int8 build (tandem build --target cpu --precision int8)",
        )
    )
    generation = (results.get("precision", {}).get("onnxruntime_int8") or {}).get("generation") or {}
    t = Target("cpu_int8_token_agreement", "int8 greedy tokens equal to fp32's (held-out captions, teacher-forced positions)", 0.98, ">=", "%")
    targets.append(
        t.evaluate(
            generation.get("token_agreement"),
            f"{generation.get('agreeing_positions')} of {generation.get('positions')} positions over "
            f"{generation.get('captions')} captions (the build's precision gate)" if generation else "",
            "no cpu int8 build measured",
        )
    )

    best = results.get("roofline", {}).get("refinement_best")
    variant = results.get("roofline", {}).get("refinement_best_variant")
    t = Target("refinement_peak", "refinement achieved FLOP/s vs measured matmul peak", 0.5, ">=", "%")
    detail = ""
    if best:
        detail = (
            f"{best['achieved_gflops']:.1f} GFLOP/s ({best['runtime']}, batch {best['batch']}) vs "
            f"{best['peak_gflops']:.1f} GFLOP/s peak"
        )
        if variant:
            detail += (
                f" (not shipped: {variant['runtime']} reaches {100 * variant['fraction_of_matmul_peak']:.0f}% "
                f"at batch {variant['batch']})"
            )
    targets.append(t.evaluate(best["fraction_of_matmul_peak"] if best else None, detail, "roofline not measured"))

    from tandem.bench.split import split_targets

    targets += split_targets(results)
    return targets


def _all_levels(served: dict):
    """(scheduler, where, level) for every closed-loop and open-loop level of every scheduler."""
    for scheduler, entry in served.get("schedulers", {}).items():
        for protocol, levels in entry.get("protocols", {}).items():
            for conc, level in levels.items():
                yield scheduler, f"{protocol} concurrency {conc}", level
        for rate, level in entry.get("open_loop", {}).items():
            yield scheduler, f"open loop {rate}/s", level


def _shared_cores(served: dict, protocol: str) -> str:
    """Why a served level is slower than its in-process figures when the scheduler is not the
    cause: both stages' ONNX Runtime threads and the python-backend stubs share the machine, so
    refinement's compute per request grows with load (Triton's own statistics, this run)."""
    levels = served.get("protocols", {}).get(protocol, {})
    r1 = (levels.get("1", {}).get("triton", {}).get("refinement") or {}).get("compute_ms_per_request")
    r8 = (levels.get("8", {}).get("triton", {}).get("refinement") or {}).get("compute_ms_per_request")
    if not r1 or not r8:
        return ""
    return (
        f"refinement compute per request {r1:.1f} ms at concurrency 1 vs {r8:.1f} ms at 8 (Triton statistics): both stages "
        "and the python-backend stubs share this machine's cores; fix: run the stages on separate pools "
        "(tandem deploy, the split path) or give the server more cores"
    )


def served_scheduler_targets(results: dict) -> list[Target]:
    """Issue 11's targets: tail latency, time to first decode step, the open-loop knee of in-flight
    vs request-level batching, and exactness at every level."""
    served = results.get("served", {})
    ok = served.get("status") == "ok"
    missing = served.get("status", "not run") if not ok else ""
    primary = served.get("scheduler", "?")
    targets = []
    for protocol in ("http", "grpc"):
        c8 = served.get("protocols", {}).get(protocol, {}).get("8", {}) if ok else {}
        p50, p99 = c8.get("latency", {}).get("p50_ms"), c8.get("latency", {}).get("p99_ms")
        shared = _shared_cores(served, protocol)
        t = Target(f"served_tail_{protocol}", f"served p99 vs p50 latency ({protocol.upper()}, {primary} batching), concurrency 8", 1.5, "<=", "x")
        targets.append(
            t.evaluate(
                p99 / p50 if p50 and p99 else None,
                f"p99 {p99:.1f} ms vs p50 {p50:.1f} ms" + (
                    "" if p99 <= 1.5 * p50
                    else f"; {shared}" if primary == "inflight" and shared
                    else "; a request waited behind others' generations: serve with --scheduler inflight and enough slots (--max-batch-size)"
                ) if p50 and p99 else "",
                missing or f"no {protocol} level at concurrency 8",
            )
        )

    c8 = served.get("protocols", {}).get("grpc", {}).get("8", {}) if ok else {}
    first = (c8.get("first_step") or {}).get("p50_ms")
    prefill, decode = _p50(results, "onnxruntime", "reasoning_prefill", 1), _p50(results, "onnxruntime", "reasoning_decode", 8)
    budget = prefill + 2 * decode if prefill and decode else None
    t = Target("served_first_step", f"time to first decode step, p50 at concurrency 8 (gRPC, {primary} batching) vs prefill + 2 decode steps", 1.0, "<=", "x")
    detail = ""
    if first and budget:
        detail = (
            f"{first:.1f} ms (server-side: Triton queue {c8['first_step']['triton_queue_ms']:.1f} ms + model histogram) vs "
            f"{prefill:.1f} ms prefill + 2 x {decode:.1f} ms decode (batch 8, in-process)"
        )
        if first > budget and primary == "inflight":
            detail += (
                "; most of the wait is in Triton's queue, before the reasoning model's execute hands the request to a slot"
                + (f"; {shared}" if (shared := _shared_cores(served, "grpc")) else "")
            )
        elif first > budget:
            detail += "; requests wait behind whole generations: serve with --scheduler inflight"
    targets.append(t.evaluate(first / budget if first and budget else None, detail, missing or "needs the gRPC level at concurrency 8 and the onnxruntime stage figures"))

    knees = {name: entry.get("open_loop_knee", {}) for name, entry in served.get("schedulers", {}).items()} if ok else {}
    t = Target("served_knee", "open-loop knee (highest offered rate within the same p99 budget), in-flight vs request-level batching", 1.0, ">", "x")
    if "inflight" in knees and "request" in knees:
        fast, slow = knees["inflight"], knees["request"]
        budget_ms = fast.get("budget_p99_ms", 0.0)
        rate = lambda k: f"{k['rate_per_s']:.3g}/s" if k.get("rate_per_s") else "none"  # noqa: E731
        said = f"in-flight {rate(fast)}{'' if fast.get('reached') else ' or more'} vs request-level {rate(slow)}" + (
            "" if slow.get("reached") else " or more") + f" within p99 {budget_ms:.0f} ms"
        if not fast.get("reached") and not slow.get("reached"):
            t.evaluate(None, "", f"{said}: the sweep stayed below both knees; offer higher rates (--open-loop-loads)")
        elif not fast.get("rate_per_s"):
            t.evaluate(0.0, f"{said}; in-flight batching missed the budget at the lowest rate: more slots or a larger p99 budget")
        elif not slow.get("rate_per_s"):
            t.evaluate(float("inf"), f"{said}; request-level batching missed the budget at every offered rate")
        else:
            t.evaluate(fast["rate_per_s"] / slow["rate_per_s"], said + ("" if fast.get("reached") else " (in-flight: a lower bound)"))
    else:
        t.evaluate(None, "", missing or "needs both schedulers measured in the same run")
    targets.append(t)

    bad = [(s, where, lv["failed"], lv["tokens_mismatched"]) for s, where, lv in _all_levels(served)] if ok else []
    wrong = [b for b in bad if b[2] or b[3]]
    t = Target("served_exact", "failed requests + token differences from the in-process pipeline, every level and scheduler", 0, "<=", "")
    detail = (
        "; ".join(f"{s} {where}: {f} failed, {m} differing" for s, where, f, m in wrong[:6]) + " (see the per-level errors)"
        if wrong else f"{len(bad)} levels checked"
    )
    targets.append(t.evaluate(sum(f + m for _, _, f, m in bad) if bad else None, detail, missing or "no served level measured"))
    return targets


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def decode_targets(results: dict) -> list[Target]:
    """Issue 16: the ONNX Runtime decode step against its memory roofline at batch 1 and 8, decode
    rows/s and in-process generation images/s at batch 8 vs batch 1."""
    targets = []
    roof = results.get("roofline", {})
    bandwidth = roof.get("machine", {}).get("memory", {}).get("bandwidth_gb_s")
    for batch in (1, 8):
        t = Target(
            f"decode_roofline_b{batch}",
            f"ONNX Runtime decode step at batch {batch} vs its memory roofline (compulsory bytes / measured bandwidth)",
            0.5,
            ">=",
            "%",
        )
        work = roof.get("work", {}).get("reasoning_decode", {}).get(str(batch))
        p50 = _p50(results, "onnxruntime", "reasoning_decode", batch)
        if not (work and p50 and bandwidth):
            targets.append(t.evaluate(None, "", f"needs the onnxruntime decode step and the roofline at batch {batch}"))
            continue
        floor_ms = 1e3 * work["bytes"] / (bandwidth * 1e9)
        experts = work.get("routed_experts_per_layer") or []
        detail = (
            f"p50 {p50:.3f} ms vs {floor_ms:.3f} ms to move {_mb(work['bytes'])} at {bandwidth:.1f} GB/s: weights "
            f"{_mb(work['weight_bytes_touched'])} (experts routed to per layer {experts}), cache read "
            f"{_mb(work.get('cache_read_bytes', 0))}, new rows {_mb(work.get('cache_written_bytes', 0))}, other I/O "
            f"{_mb(work['io_float_bytes'] + work['io_int_bytes'] - work.get('cache_read_bytes', 0) - work.get('cache_written_bytes', 0))}"
        )
        value = floor_ms / p50
        if value < 0.5:
            detail += (
                "; below half the roofline the step is bound by per-op overhead and the static cache the graph "
                f"reads in full ({_mb(work.get('cache_bytes_bound', 0))} bound): fewer, fused ops (attention "
                "over the cache as one kernel, e.g. GroupQueryAttention) or reading only [0, position) would close it"
            )
        targets.append(t.evaluate(value, detail))

    one, eight = _p50(results, "onnxruntime", "reasoning_decode", 1), _p50(results, "onnxruntime", "reasoning_decode", 8)
    t = Target("decode_rows_scaling", "ONNX Runtime decode rows/s at batch 8 vs batch 1", 2.5, ">=", "x")
    detail = f"p50 {one:.3f} ms per step at batch 1, {eight:.3f} ms at batch 8" if one and eight else ""
    w1, w8 = (roof.get("work", {}).get("reasoning_decode", {}).get(b) for b in ("1", "8"))
    if detail and w1 and w8:
        # Both steps at the same fraction of the memory roofline would scale by exactly this much.
        detail += (
            f"; compulsory bytes grow {w8['bytes'] / w1['bytes']:.2f}x (experts routed to per layer "
            f"{w1.get('routed_experts_per_layer')} -> {w8.get('routed_experts_per_layer')}), so at equal roofline "
            f"efficiency the ceiling is {8 * w1['bytes'] / w8['bytes']:.2f}x; beyond it only lighter weights "
            "(fp16/int8 experts) or a batch-1 step further below its roofline than batch 8 move the ratio"
        )
    targets.append(t.evaluate(8 * one / eight if one and eight else None, detail, "needs decode steps at batch 1 and 8"))

    runs = results.get("pipeline", {}).get("onnxruntime", {})
    r1, r8 = runs.get("1", {}).get("images_per_s"), runs.get("8", {}).get("images_per_s")
    t = Target("pipeline_scaling", "in-process ONNX Runtime generation images/s at batch 8 vs batch 1", 2.5, ">=", "x")
    targets.append(
        t.evaluate(
            r8 / r1 if r1 and r8 else None,
            f"{r8:.2f} vs {r1:.2f} images/s" if r1 and r8 else "",
            "needs in-process generations at batch 1 and 8 (the quick budget runs batch 1 only)",
        )
    )
    return targets
