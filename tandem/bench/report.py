"""The Markdown report of a benchmark run: targets first, then every table, then the plots.

Everything here is read back from the results dict (the same one written as JSON), so the report
and the JSON cannot disagree."""

from __future__ import annotations

from tandem.bench.present import fmt, sig, table


def split_report_section(results: dict) -> list[str]:
    from tandem.bench.split import report_section

    return report_section(results)


def _host_speed_line(results: dict) -> list[str]:
    """The host's own speed in this run, from figures its rounds measured anyway: the copy bandwidth
    of the decode rounds and the numpy GEMM of the refinement rounds (medians). The busy figure sees
    only this machine's processes; a shared physical host can run several times slower with this
    VM quiet (the 15:53 run on 2026-12-07: copy 13 GB/s, GEMM 129 GFLOP/s, where the runs before it
    measured 41-78 GB/s and 230-248 GFLOP/s), and every absolute figure of the run moves with it."""
    parts = []
    roof = ((results.get("replay") or {}).get("roofline") or {}).get("1") or {}
    if roof.get("bandwidth_gb_s_median"):
        parts.append(f"copy bandwidth {roof['bandwidth_gb_s_median']:.1f} GB/s (read + write, median of the decode rounds)")
    peak = (results.get("ratios") or {}).get("refinement_peak") or {}
    gemm_s, n = (peak.get("arms") or {}).get("gemm"), peak.get("gemm_n")
    if gemm_s and n:
        parts.append(f"{peak.get('gemm_library', 'GEMM')} n={n} {2 * n**3 / gemm_s / 1e9:.0f} GFLOP/s (median of the refinement rounds)")
    if not parts:
        return []
    return ["- Host speed in this run: " + ", ".join(parts) + "; the busy figure above sees only this machine's processes, "
            "so compare absolute figures between runs only where these agree (ratios come from interleaved rounds)"]


def _served_group_text(served: dict) -> str:
    """What a round of the served group ran, from the arms the run recorded (the arms changed in
    48ad99e and 3f38ec2; a re-rendered older run keeps its own description)."""
    arms = (served.get("rounds") or {}).get("arms") or []
    c1, c8 = served.get("c1_requests", "?"), served.get("c8_requests", "?")
    if "c1_interleaved" not in arms:
        return (f"in-process generations ({c1} one at a time, 8 at batch 8), the same requests served at concurrency 1 ({c1}) "
                f"and 8 ({c8}) per protocol, each arm through one client whose connections an untimed request (c=1) or "
                "wave (c=8) opened first, and in-process prefill + 2 decode steps at batch 8")
    c1_records = [r for name, recs in (served.get("records") or {}).items() if name.endswith("_c1") for r in recs]
    paired = bool(c1_records) and all("paired_ratio" in r for r in c1_records)
    first = (f"concurrency 1: {c1} prompts, each generated in-process and then served over each protocol, request by "
             "request (the order rotating by one every request"
             + ("; a round's ratio is the median of each request's served/in-process ratio" if paired else "") + "); ")
    if "c8_interleaved" not in arms:
        return first + (f"concurrency 8: {c8} images in-process at batch 8 and the same number served per protocol, each "
                        "served arm through one client whose connections an untimed request (c=1) or wave (c=8) opened "
                        "first; in-process prefill + 2 decode steps at batch 8")
    return first + (f"concurrency 8: {max(1, int(c8) // 8) if isinstance(c8, int) else '?'} waves, each an in-process "
                    "generation at batch 8 and then 8 requests at concurrency 8 over each protocol, wave by wave (rotating "
                    "likewise; each protocol's client opened its connections with an untimed request or wave first); "
                    "in-process prefill + 2 decode steps at batch 8")


def render(results: dict) -> str:
    env = results["environment"]
    cfg = results["config"]
    out: list[str] = []
    mode = "QUICK (smoke run: few iterations, not for comparison)" if results["quick"] else "full"
    out += [
        f"# tandem benchmark: `{cfg['name']}` on {env['cpu_model']}",
        "",
        f"- Machine: **{env['machine']}** - {env['cpu_model']}, {env['cpu_cores_usable']} usable cores, "
        f"{fmt(env.get('memory_gib'), 1)} GiB RAM, GPUs: {', '.join(env['gpus']) or 'none'}",
        f"- Run: {results['started_utc']} UTC, {results['duration_s']:.0f} s, mode {mode}"
        + (
            " (" + ", ".join(f"{k} {v:.0f} s" for k, v in results["phase_seconds"].items()) + ")"
            if results.get("phase_seconds")
            else ""
        ),
        f"- CPU used by other processes during the run: "
        + (
            f"{100 * results['interference']['other_processes_share']:.1f}% of capacity"
            if results.get("interference")
            else "unknown"
        )
        + f" (load average at start {env.get('load_average_start')}, at end {results.get('load_average_end')}; "
        "the end figure includes this run itself)",
        *_host_speed_line(results),
        f"- Model: config `{cfg['name']}` (fingerprint `{cfg['fingerprint']}`, weights `{cfg['weights']}`), "
        f"{cfg['scene_tokens']} scene tokens, KV cache of {cfg['max_len']} positions, image {cfg['image']}",
        f"- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- Threads: {env['threads']}",
        "- Runtimes measured: "
        + ", ".join(
            f"{name} ({desc}; {results['runtimes'].get('sources', {}).get(name, results['artifacts'])})"
            for name, desc in results["runtimes"]["measured"].items()
        )
        + "; not available here: "
        + (
            "; ".join(f"{k} ({v})" for k, v in results["runtimes"]["unavailable"].items())
            if results["runtimes"]["unavailable"]
            else "none"
        ),
        "",
    ]
    busy = busy_warning(results)
    if busy:
        out += [f"> **{busy}**", ""]
    out += [
        "Every figure below is *measured* in this run unless its row says *modelled*. Latencies are wall-clock per "
        "call after warm-up; p50/p90/p99 are over the samples stored in `results.json`.",
        "",
        "## Targets",
        "",
    ]
    for t in results["targets"]:
        out.append(f"- {t['line']}")
    out.append("")
    if "standard" not in results.get("sections", ["standard"]):
        from tandem.bench.decode_step import report_section

        out += report_section(results)
        for name, why in (results.get("skipped") or {}).items():
            out += [f"The {name} sections (per stage, decode vs position, whole generations, roofline table, ratio rounds, "
                    f"Jacobi decoding, served, split path, modelled hardware): {why}.", ""]
        out += _plots_section(results, drawn_only=True)
        return "\n".join(out).rstrip() + "\n"
    out += _rounds_section(results)

    out += ["## Per stage, per runtime (batch 1 latency)", ""]
    rows = []
    stages = results.get("stages", {})
    for graph in ("reasoning_prefill", "reasoning_decode", "refinement"):
        base = stages.get("torch", {}).get(graph, {}).get("batches", {}).get("1")
        for runtime, graphs in stages.items():
            s = graphs.get(graph, {}).get("batches", {}).get("1")
            if s is None:
                continue
            if "p50_ms" not in s:
                rows.append([graph, runtime, "error", "-", "-", "-", s.get("error", "")[:80]])
                continue
            speedup = f"{base['p50_ms'] / s['p50_ms']:.2f}x" if base and "p50_ms" in base else "-"
            rows.append(
                [graph, runtime, fmt(s["p50_ms"], 3), fmt(s["p90_ms"], 3), fmt(s["p99_ms"], 3), s["n"], speedup]
            )
    out += table(["graph", "runtime", "p50 ms", "p90 ms", "p99 ms", "samples", "vs torch (p50)"], rows)
    prefill_dims = stages.get("onnxruntime", stages.get("torch", {})).get("reasoning_prefill", {})
    if prefill_dims:
        dims = prefill_dims["batches"]["1"].get("dims")
        out += [f"Prefill is measured at {dims}.", ""]

    out += ["## Throughput vs batch", ""]
    batches = sorted({int(b) for g in stages.values() for s in g.values() for b in s["batches"]})
    rows = []
    for runtime, graphs in stages.items():
        for graph, s in graphs.items():
            rows.append(
                [graph, runtime]
                + [
                    f"{s['batches'][str(b)]['items_per_s']:.1f} ({s['batches'][str(b)]['p50_ms']:.2f} ms)"
                    if "p50_ms" in s["batches"].get(str(b), {})
                    else ("error" if str(b) in s["batches"] else "-")
                    for b in batches
                ]
            )
    out += table(["graph", "runtime"] + [f"batch {b}: items/s (p50)" for b in batches], rows)

    positions = results.get("decode_positions", {})
    if positions:
        out += ["## Decode cost per token vs position (batch 1)", ""]
        xs = sorted({int(p) for per in positions.values() for p in per})
        rows = [[rt] + [fmt(per.get(str(x), {}).get("p50_ms"), 3) for x in xs] for rt, per in positions.items()]
        recompute = results.get("recompute_positions", {})
        if recompute:
            rows.append(["no cache, recompute prefix (torch)"] + [fmt(recompute.get(str(x), {}).get("p50_ms"), 3) for x in xs])
        out += table(["p50 ms per token"] + [f"pos {x}" for x in xs], rows)
        out += [
            "The static KV cache is preallocated to max_len and every step attends over it with a mask, so a step costs "
            "the same at every position; the recompute row shows what a step would cost without a cache.",
            "",
        ]

    out += _replay_section(results)

    pipeline = results.get("pipeline", {})
    if pipeline:
        out += ["## Whole generations in-process (prompt -> tokens -> image)", ""]
        rows = []
        for runtime, per_batch in pipeline.items():
            for batch, s in sorted(per_batch.items(), key=lambda kv: int(kv[0])):
                if "p50_ms" not in s:
                    rows.append([runtime, batch, "error", "-", "-", s.get("error", "")[:80]])
                    continue
                phases = ", ".join(f"{g} {ms:.0f} ms" for g, ms in s["phase_ms_per_generation"].items())
                rows.append([runtime, batch, fmt(s["p50_ms"], 1), fmt(s["images_per_s"], 3), s["n"], phases])
        out += table(["runtime", "batch", "p50 ms / generation", "images/s", "samples", "time per generation by graph"], rows)

    from tandem.bench.decode_step import report_section

    out += report_section(results)
    out += _served_section(results)
    out += _scheduler_section(results)
    out += split_report_section(results)
    out += _roofline_section(results)
    out += _cross_hardware_section(results)

    if results.get("eval"):
        out += ["## Compositional accuracy", ""]
        out += [f"From `{results['eval']['path']}` (written by `tandem eval`):", "", "```json", results["eval"]["summary"], "```", ""]

    failed = [t for t in results["targets"] if t["status"] == "FAIL"]
    notes = results.get("notes", [])
    if failed or notes:
        out += ["## Closing notes: missed targets, why, and what would fix them", ""]
        for note in notes:
            out += [f"- {note}"]
        out.append("")

    out += _plots_section(results)
    return "\n".join(out).rstrip() + "\n"


def _plots_section(results: dict, drawn_only: bool = False) -> list[str]:
    """The plots, each linked; those not drawn with the reason (``drawn_only``: left out, for a run
    whose report lists the sections it skipped)."""
    out = ["## Plots", ""]
    for name, state in results.get("plots", {}).items():
        if state == "drawn":
            out += [f"![{name}](plots/{name})", ""]
        elif not drawn_only:
            out += [f"- `{name}`: {state}", ""]
    return out


def busy_warning(results: dict) -> str:
    """A warning when other processes used more than 10% of the machine's CPU during the run (busy
    CPU time from /proc/stat minus this run's own): on a small machine that inflates every number,
    eager PyTorch's most (its OpenMP threads wait on each other when one is descheduled)."""
    share = (results.get("interference") or {}).get("other_processes_share")
    if share is not None and share > 0.10:
        cores = results["environment"].get("cpu_cores_usable")
        return (
            f"Busy machine: other processes used {100 * share:.0f}% of the {cores} cores' CPU time during this run. "
            "These numbers are not representative; re-run on a quiet machine."
        )
    return ""


def _scheduler_section(results: dict) -> list[str]:
    """In-flight vs request-level batching of reasoning, measured in the same run: the closed-loop
    sweep with time to first decode step, and the open-loop sweep with its knee."""
    served = results.get("served", {})
    runs = served.get("schedulers") or {}
    if served.get("status") != "ok" or not runs:
        return []
    loop = served.get("open_loop", {})
    out = [
        "## Served: in-flight vs request-level batching of reasoning",
        "",
        "One server per scheduler, same requests. *inflight*: requests join and leave the running decode batch at every "
        "step (tandem.scheduler); *request*: Triton's dynamic batcher groups requests and each group runs its whole "
        "generation. Time to first decode step is server-side: the reasoning model's histogram (arrival at the model to "
        "its first decode step, percentile within 15% by bucket width) plus Triton's mean queue time in front of it. "
        "With in-flight batching Triton's compute time for `reasoning` (tables above) only covers handing requests to "
        "the scheduler: the generation runs on its loop thread.",
        "",
    ]
    rows = []
    for scheduler, entry in runs.items():
        for protocol, levels in entry.get("protocols", {}).items():
            for conc, lv in sorted(levels.items(), key=lambda kv: int(kv[0])):
                first = lv.get("first_step") or {}
                rows.append(
                    [
                        scheduler, protocol, conc, fmt(lv["images_per_s"], 3), fmt(lv["latency"].get("p50_ms"), 1),
                        fmt(lv["latency"].get("p99_ms"), 1), fmt(first.get("p50_ms"), 1), fmt(first.get("p99_ms"), 1),
                        f"{lv['failed']}/{lv['requests']}", lv["tokens_mismatched"],
                    ]
                )
    out += table(
        ["scheduler", "protocol", "concurrency", "images/s", "p50 ms", "p99 ms", "first step p50 ms", "first step p99 ms",
         "failed", "tokens differing"],
        rows,
    )
    out += [
        f"Open loop over {loop.get('protocol', '?')}: Poisson arrivals, {loop.get('requests_per_rate', '?')} requests per "
        f"offered rate (multiples of the in-process sequential rate). The knee is the offered rate at which p99 latency "
        f"crosses {loop.get('slo_p99_factor', '?')}x the in-process p50 latency (a failed request breaks it too), interpolated "
        "between the two offered rates around the crossing.",
        "",
    ]
    rows = []
    for scheduler, entry in runs.items():
        for rate, lv in sorted(entry.get("open_loop", {}).items(), key=lambda kv: float(kv[0])):
            first = lv.get("first_step") or {}
            rows.append(
                [
                    scheduler, sig(lv.get("offered_per_s")), fmt(lv["images_per_s"], 3), fmt(lv["latency"].get("p50_ms"), 1),
                    fmt(lv["latency"].get("p99_ms"), 1), fmt(first.get("p50_ms"), 1), f"{lv['failed']}/{lv['requests']}",
                    lv["tokens_mismatched"],
                ]
            )
    out += table(
        ["scheduler", "offered req/s", "achieved images/s", "p50 ms", "p99 ms", "first step p50 ms", "failed", "tokens differing"],
        rows,
    )
    def knee(k: dict) -> str:
        if k.get("below_sweep"):
            return f"below {sig(k.get('lowest_rate_per_s'))} req/s (the lowest rate offered broke the budget)"
        return f"{sig(k.get('rate_per_s'))} req/s" + ("" if k.get("reached") else " (no offered rate broke the budget: a lower bound)")

    knees = [f"{name}: {knee(entry.get('open_loop_knee', {}))}" for name, entry in runs.items()]
    out += [f"Knee (p99 budget {fmt(next(iter(runs.values())).get('open_loop_knee', {}).get('budget_p99_ms'), 0)} ms): "
            + "; ".join(knees) + ".", ""]
    return out


def _served_section(results: dict) -> list[str]:
    served = results.get("served", {})
    out = ["## Served: tritonserver ensemble under load", ""]
    if served.get("status") != "ok":
        reason = served.get("reason", "")
        return out + [f"**{served.get('status', 'not run')}**" + (f" - {reason}" if reason else ""), ""]
    inproc = served["inprocess"]
    out += [
        f"Model `{served['model']}`, {served['requests_per_level']} requests per concurrency level (request i = caption "
        f"i mod 8, seed i, greedy), after an untimed warm-up, reasoning with {served.get('scheduler', 'request')} batching "
        f"(both schedulers side by side below). Queue limits per model: {served.get('queue_limits')}.",
        f"In-process ONNX Runtime pipeline, same requests one after another: p50 {inproc['latency']['p50_ms']:.1f} ms, "
        f"p99 {inproc['latency']['p99_ms']:.1f} ms, {inproc['images_per_s']:.3f} images/s.",
        "",
    ]
    rows = []
    for protocol, levels in served["protocols"].items():
        for conc, lv in sorted(levels.items(), key=lambda kv: int(kv[0])):
            lat = lv["latency"]
            reasoning = lv["triton"].get("reasoning", {})
            rows.append(
                [
                    protocol,
                    conc,
                    fmt(lv["images_per_s"], 3),
                    fmt(lat.get("p50_ms"), 1),
                    fmt(lat.get("p95_ms"), 1),
                    fmt(lat.get("p99_ms"), 1),
                    f"{lv['failed']}/{lv['requests']}",
                    lv["tokens_mismatched"],
                    fmt(reasoning.get("queue_ms_per_request"), 1),
                    fmt(reasoning.get("compute_ms_per_request"), 1),
                    reasoning.get("batch_sizes_formed", {}),
                ]
            )
    out += table(
        [
            "protocol",
            "concurrency",
            "images/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "failed",
            "tokens differing from in-process",
            "reasoning queue ms/req",
            "reasoning compute ms/req",
            "reasoning batch sizes formed {size: executions}",
        ],
        rows,
    )
    out += ["Triton statistics per model (deltas over each level; compute = input + infer + output):", ""]
    rows = []
    for protocol, levels in served["protocols"].items():
        for conc, lv in sorted(levels.items(), key=lambda kv: int(kv[0])):
            for model, st in lv["triton"].items():
                if not st["requests"]:
                    continue
                rows.append(
                    [
                        protocol,
                        conc,
                        model,
                        st["requests"],
                        st["executions"],
                        fmt(st.get("mean_batch_size"), 2),
                        fmt(st.get("queue_ms_per_request"), 2),
                        fmt(st.get("compute_ms_per_request"), 2),
                        st.get("batch_sizes_formed", {}),
                    ]
                )
    out += table(
        ["protocol", "concurrency", "model", "requests", "executions", "mean batch", "queue ms/req", "compute ms/req", "batch sizes formed"],
        rows,
    )
    return out


def _roofline_section(results: dict) -> list[str]:
    roof = results.get("roofline", {})
    machine = roof.get("machine")
    if not machine:
        return []
    mm, mem = machine["matmul"], machine["memory"]
    out = [
        "## Roofline (this machine, measured peaks)",
        "",
        f"- Matmul peak: **{mm['peak_gflops']:.1f} GFLOP/s** fp32 ({mm['best']['library']}, n={mm['best']['n']}; "
        "best p50 over " + ", ".join(f"{r['library']} n={r['n']}: {r['gflops_p50']:.1f}" for r in mm["runs"]) + ")",
        f"- Memory bandwidth: **{mem['bandwidth_gb_s']:.1f} GB/s** ({mem['best']}, {mem['convention']})",
        f"- Machine balance: {mm['peak_gflops'] / mem['bandwidth_gb_s']:.1f} FLOP/byte",
        "",
        "FLOPs: matmuls and convolutions counted by torch.utils.flop_counter on the exported graph modules. Bytes: "
        "compulsory traffic (weights actually touched - embedding rows looked up, routed experts only in the sparse "
        "decode MoE - plus inputs and outputs, the whole KV cache in and out for decode). p50 latency per call.",
        "",
    ]
    rows = []
    for runtime, graphs in roof.get("measured", {}).items():
        for graph, per_batch in graphs.items():
            for batch, p in sorted(per_batch.items(), key=lambda kv: int(kv[0])):
                work = roof["work"][graph][batch]
                rows.append(
                    [
                        graph,
                        runtime,
                        batch,
                        f"{work['flops'] / 1e6:.1f}",
                        f"{p.get('bytes', work['bytes']) / 1e6:.2f}",
                        fmt(p["intensity_flop_per_byte"], 1),
                        p["bound"],
                        fmt(p["achieved_gflops"], 1),
                        f"{100 * p['fraction_of_matmul_peak']:.0f}%",
                        fmt(p["achieved_gb_s"], 1),
                        f"{100 * p['fraction_of_roofline']:.0f}%",
                    ]
                )
    out += table(
        [
            "graph",
            "runtime",
            "batch",
            "MFLOP",
            "MB moved",
            "FLOP/byte",
            "bound",
            "GFLOP/s",
            "% matmul peak",
            "GB/s",
            "% of roofline",
        ],
        rows,
    )
    return out


def _cross_hardware_section(results: dict) -> list[str]:
    cross = results.get("cross_hardware", {})
    rows_in = cross.get("rows", [])
    if not rows_in:
        return []
    out = [
        "## Cross-hardware: measured here vs *modelled* elsewhere",
        "",
        f"*Modelled* rows are NOT measurements: roofline lower bounds max(FLOPs / peak, bytes / bandwidth) per graph call "
        f"from the counted work and the published peaks in `{cross['hardware_file']}` at {cross['precision']} (weights and "
        "float tensors at that width), plus this run's measured host time per decode step (the step's bookkeeping in "
        "Python; the graphs sample), with no launch, synchronisation or kernel-efficiency overhead. "
        "Real engines will be slower, most of all the small decode step at batch 1. *As shipped*: what the target's "
        "graphs read at the modelled precision: TensorRT's reasoning graphs (h100, a100) route their experts at "
        "fp32/fp16/bf16 (tandem's plugin pair; dense factor 1) and read every expert at int8/fp8; Neuron's (inf2) "
        "standard-op graph evaluates every expert with zero gates for the unchosen, so every expert's weights are read "
        "at every step (the dense factor is that decode step's bytes over the routed one's); *routed*: only the experts "
        "each step routed to, the floor once a routed MoE kernel ships for the target. "
        "Per image = (prefill + decode steps x decode step + refinement) / batch + host time, "
        f"{cross['decode_steps']} decode steps per image.",
        "",
    ]
    rows = []
    for row in rows_in:
        kind = "*modelled*" if row["kind"] == "modelled" else "measured"
        costs = "; ".join(f"{c['instance']} ${c['usd_per_1000_images']:.3g}" for c in row.get("costs", []))
        rows.append(
            [
                kind,
                row["name"],
                row.get("precision", "fp32"),
                row["batch"],
                sig(row.get("decode_ms_per_token")),
                sig(row["seconds_per_image"] * 1e3),
                sig(row["routed_seconds_per_image"] * 1e3) if row.get("routed_seconds_per_image") else "-",
                f"{row['dense_factor']:.2f}x" if row.get("dense_factor") else "-",
                sig(row["host_ms_per_step"]) if row.get("host_ms_per_step") is not None else "-",
                sig(row["images_per_s"]),
                costs or "-",
            ]
        )
    out += table(
        ["kind", "hardware", "precision", "batch", "decode ms/token", "ms/image (as shipped)", "ms/image (routed)",
         "dense factor", "host ms/step", "images/s", "USD per 1,000 images"],
        rows,
    )
    prices = cross.get("prices", [])
    if prices:
        out += ["Prices used (on-demand, per accelerator share of the instance; edit the hardware file to change):", ""]
        out += [f"- {p}" for p in prices] + [""]
    return out


ROUND_GROUPS = {
    "decode": "decode steps replayed from held-out generations (batch 1 per runtime, batch 8 on ONNX Runtime) and a memory copy",
    "refinement": "refinement calls per runtime at batch 1, the best refinement cell and the peak GEMM",
    "positions": "ONNX Runtime decode step at position 16 and 256",
    "pipeline": "whole in-process generations at batch 1 and 8, and a batch-1 generation with ONNX Runtime's run calls timed (host share)",
}


def _rounds_section(results: dict) -> list[str]:
    """How the ratios behind the targets were measured: which arms shared rounds, how many, how long."""
    groups = dict(results.get("rounds") or {})
    served = results.get("served", {}).get("ratio_rounds") or {}
    if served.get("rounds"):
        groups["served"] = served["rounds"]
    split = results.get("split", {})
    if split.get("rounds"):
        groups["split"] = split["rounds"]
    figures = results.get("figures") or []
    if not groups and not figures:
        return []
    out = []
    if figures:
        out += ["Reported, not judged:", ""] + [f"- {f['line']}" for f in figures] + [""]
    out += [
        "### How the ratios were measured",
        "",
        "Every ratio above is measured in interleaved rounds: each round runs every arm of its group once, in the "
        "opposite order to the round before (A, B, then B, A), so drift of the machine's speed lands on both figures "
        "of a ratio alike; each round gives one ratio, the line shows their median and the 10-90% interval of the "
        "round ratios. Where the table below says so, a group interleaves finer: request by request or wave by wave, "
        "the order rotating by one every time. "
        "PASS or FAIL only when that interval lies on one side of the threshold, otherwise UNSTABLE. "
        + ("The open-loop knee comes from the two schedulers' sweeps interleaved rate by rate (each offered rate to one "
           "server, then the other, the order rotating); its spread is a bootstrap over each offered rate's requests."
           if (results.get("served", {}).get("open_loop") or {}).get("interleave") == "rate" else
           "The open-loop knee is one sweep per scheduler; its spread is a bootstrap over each offered rate's requests."),
        "",
    ]
    described = {
        **ROUND_GROUPS,
        "served": _served_group_text(served),
        "split": (f"{split.get('round_requests', '?')} requests per round, each through the single server, the split path and "
                  "the split path with mTLS before the next (the order rotating by one every request)"
                  + ("; a round's ratio is the median of its requests' paired ratios" if split.get("ratio_of") == "paired" else "")
                  if split.get("interleave") == "request" else
                  f"{split.get('round_requests', '?')} requests per path and round, single server vs split vs split with mTLS"),
    }
    rows = [[name, described.get(name, ""), ", ".join(g["arms"]), g["rounds"], f"{g['wall_s']:.1f}"] for name, g in groups.items()]
    out += table(["group", "what each round runs", "arms", "rounds", "wall s"], rows)
    return out


def _replay_section(results: dict) -> list[str]:
    replay = results.get("replay") or {}
    if not replay:
        return []
    out = ["## Decode steps as generation runs them (replayed held-out generations)", ""]
    if replay.get("error"):
        return out + [f"**not run** - {replay['error']}", ""]
    caps = replay.get("captions", {})
    out += [
        f"Greedy generations of {len(caps.get('batch1', []))} held-out captions one at a time and "
        f"{len(caps.get('batch8', []))} batches of 8 were recorded (token ids and positions of every decode step), then "
        "replayed step by step on each runtime's decode engine in the interleaved rounds, so the routing varies as in real "
        "generation. The fixed-input column is the per-stage figure above (one step repeated with the same inputs: the "
        "same experts every call). Routed experts: distinct experts per layer a step's rows were sent to, read from the "
        "PyTorch reference on the same tokens.",
        "",
    ]
    stages = results.get("stages", {})
    rows = []
    for name, st in (replay.get("runtimes") or {}).items():
        fixed = stages.get(st["runtime"], {}).get("reasoning_decode", {}).get("batches", {}).get(str(st["batch"]), {}).get("p50_ms")
        rows.append([st["runtime"], st["batch"], fmt(fixed, 3), fmt(st.get("p50_ms"), 3), fmt(st.get("p90_ms"), 3),
                     fmt(st.get("p99_ms"), 3), st.get("n"), st.get("generations"), st.get("routed_experts_per_layer_mean")])
    out += table(["runtime", "batch", "fixed-input p50 ms", "replayed p50 ms", "p90 ms", "p99 ms", "steps", "generations",
                  "routed experts per layer (mean)"], rows)
    roof = replay.get("roofline") or {}
    if roof:
        rows = [[b, f"{r['bytes_p50'] / 1e6:.3f}", f"{r['bytes_fixed_input'] / 1e6:.3f}", r["routed_experts_per_layer_mean"],
                 r["routed_experts_per_layer_fixed_input"], fmt(r["bandwidth_gb_s_median"], 1), fmt(r["floor_ms_median"], 3)]
                for b, r in roof.items()]
        out += table(["batch", "MB per replayed step (p50)", "MB, fixed input", "experts per layer (replayed mean)",
                      "experts per layer (fixed input)", "copy GB/s (rounds)", "roofline floor ms (p50)"], rows)
    return out
