"""The decode step against its routed-bytes roofline, per runtime (issue 28): the ``decode-step``
section of ``tandem bench``, the one a config too big for the CPU's caches (``medium``: 3.2 GB of
fp32 weights, the memory-bound proxy for a GPU) runs by default.

Steps as generation runs them (:mod:`tandem.bench.replay`): greedy generations over held-out
captions are recorded once through eager PyTorch (the reference whose routing the roofline reads),
each with the cache its prefill left; every runtime's decode engine is loaded with that cache and
replays the generation's steps (the first ``max_steps`` of them), each step timed. The experts each
step routed to come from the PyTorch reference teacher-forced over the same tokens, and give each
step's compulsory bytes (:func:`tandem.bench.replay.step_bytes`): only the experts some row picked,
the cache read at the rows' positions, every other weight once. The dense figure counts every
expert (what the standard-op graph reads).

Arms, each a replayed generation at batch 1 or 8:

- ``onnxruntime``: the export's ONNX Runtime graph (``com.microsoft`` MoE kernels: routed);
- ``onnxruntime_dense``: the standard-op graph (every expert over every row, zero gates for the
  unchosen: the graph TensorRT, Neuron and AOTInductor take before their rewrites), under ONNX
  Runtime: the dense figure;
- ``torch``: eager PyTorch (the dense form too);
- ``torch_aot``: the ``cpu-aot`` build's AOTInductor package (routed experts), when a build of this
  config exists under build/ or is given with ``--compiled``; otherwise listed as not available
  with the command that builds it.

Each runtime holds its own copy of the weights, so the arms run in groups (interleaved rounds within
a group, each round with a large array copy whose bandwidth that round's roofline uses), loaded and
released in turn: eager PyTorch first (with the recording), then ONNX Runtime with the dense graph,
then ONNX Runtime with cpu-aot (the ratio a target compares lies within one group). At most two
copies of the reasoning weights are resident at once. The host share of whole generations (time
outside the runtime's calls) is measured on ONNX Runtime between the first two groups.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tandem.bench import replay as rp
from tandem.bench.rounds import Ratio, Rounds, RoundsBudget, block, run_rounds
from tandem.bench.timing import Budget
from tandem.errors import TandemError

SECTION = "decode-step"
DECODE = "reasoning_decode"
BATCHES = (1, 8)
# The runtimes in the order their groups run; the dense figure is onnxruntime_dense.
RUNTIMES = ("torch", "onnxruntime", "onnxruntime_dense", "torch_aot")
TARGET_RUNTIMES = ("onnxruntime", "torch_aot", "torch")  # judged against their routed-bytes roofline
ROOFLINE_SHARE = 0.5
AOT_VS_ORT = 1.3
DESCRIPTIONS = {
    "onnxruntime": "ONNX Runtime, the export's graph (com.microsoft MoE kernels: routed experts)",
    "onnxruntime_dense": "ONNX Runtime, the standard-op graph (every expert over every row: dense)",
    "torch": "eager PyTorch (dense: every expert over every row)",
    "torch_aot": "cpu-aot, AOTInductor package (routed experts)",
}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DecodeStepBudgets:
    rounds: RoundsBudget  # per group
    generations_b1: int  # held-out captions recorded one at a time
    generations_b8: int  # batches of 8 held-out captions
    max_steps: int | None  # steps replayed per generation (its first ones); None: all of them
    host_generations: dict[int, Budget]  # whole generations timed for the host share, per batch
    copy_mib: int

    @classmethod
    def full(cls) -> "DecodeStepBudgets":
        return cls(RoundsBudget(rounds=8, min_rounds=5, max_seconds=90.0, warmup_rounds=1, pause_s=0.1),
                   generations_b1=2, generations_b8=1, max_steps=32,
                   host_generations={1: Budget(warmup=1, iterations=3, min_iterations=2, max_seconds=10.0),
                                     8: Budget(warmup=0, iterations=2, min_iterations=1, max_seconds=15.0)},
                   copy_mib=128)

    @classmethod
    def quick(cls) -> "DecodeStepBudgets":
        return cls(RoundsBudget(rounds=2, min_rounds=2, max_seconds=0.0, warmup_rounds=0, pause_s=0.02),
                   generations_b1=1, generations_b8=1, max_steps=4,
                   host_generations={1: Budget(warmup=0, iterations=1, min_iterations=1, max_seconds=5.0)},
                   copy_mib=32)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds.as_dict(), "generations_batch1": self.generations_b1,
                "generations_batch8": self.generations_b8, "max_steps": self.max_steps,
                "host_generations": {str(b): v.as_dict() for b, v in self.host_generations.items()}, "copy_mib": self.copy_mib}


def cpu_aot_build_command(config_name: str, artifacts: Path) -> str:
    return (f"tandem build --config {config_name} --target cpu-aot --artifacts {artifacts} "
            f"--out build/{config_name}-cpu-aot")


def find_cpu_aot(config, compiled: list[Path] | None) -> tuple[Path | None, str]:
    """The compiled folder of a cpu-aot build of ``config`` among ``compiled`` (else why not)."""
    from tandem.formats import folders
    from tandem.formats.build_manifest import BUILD_MANIFEST

    reasons = []
    for directory in compiled or []:
        directory = Path(directory)
        manifest = directory / BUILD_MANIFEST
        if manifest.exists():
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError) as exc:
                reasons.append(f"{directory}: unreadable build manifest ({exc})")
                continue
            if data.get("target") != "cpu-aot":
                continue  # another target's build: not a reason worth listing
            if data.get("config_fingerprint") != config.fingerprint():
                reasons.append(f"{directory}: a cpu-aot build of another config")
                continue
            if not data.get("passed", True):
                reasons.append(f"{directory}: its build did not pass")
                continue
        try:
            found = folders.compiled_dir(directory)
            text = (found / "manifest.json").read_text()
        except (TandemError, OSError) as exc:
            reasons.append(f"{directory}: {exc}")
            continue
        if '"torch_aot"' in text and '"cpu' in text:
            return found, ""
    return None, "; ".join(reasons)


def _cache_arrays(engine) -> dict[str, np.ndarray]:
    tensors = getattr(engine, "tensors", None)
    if tensors is not None:
        return {name: t.detach().cpu().numpy().copy() for name, t in tensors.items()}
    return {name: a.copy() for name, a in engine.cache.items()}


def record(reference, captions: list[str], batch: int, max_steps: int | None) -> list[rp.Recorded]:
    """Generations of ``captions`` at ``batch`` recorded on ``reference`` (eager PyTorch), cut to
    their first ``max_steps`` steps, each with the cache its prefill left (what every runtime's
    engine starts from: no runtime needs its prefill graph loaded to replay)."""
    from tandem.decoding import make_decode_engine

    # a generation cut after max_steps steps (the scheduler told a shorter scene) is the same
    # generation's first steps: eager PyTorch at medium scale takes seconds a step on a busy CPU
    num_tokens = None if max_steps is None or max_steps + 1 >= reference.config.scene.num_tokens else max_steps + 1
    recordings = rp.record_generations(reference, captions, batch, num_tokens)
    engine = make_decode_engine(reference, batch)
    out = []
    for rec in recordings:
        engine.prefill(range(rec.batch), rec.input_ids, rec.lengths)
        steps = rec.steps if max_steps is None else min(rec.steps, max_steps)
        out.append(replace(rec, token_ids=rec.token_ids[:steps], positions=rec.positions[:steps], cache=_cache_arrays(engine)))
    return out


def _copy_arm(mib: int) -> tuple[Callable[[], float], int]:
    n = mib * 1024 * 1024 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    return (lambda: block(lambda: np.copyto(dst, src), 3)), 2 * src.nbytes


def _load_ort(artifacts: Path, optimized: bool, graphs: list[str], name: str):
    from tandem.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime(artifacts, optimized=optimized, device="cpu", graphs=graphs)
    runtime.name = name
    return runtime


def measure(artifacts: Path, config, compiled: list[Path] | None, budgets: DecodeStepBudgets, tick: Progress,
            runtimes: list[str] | None = None) -> dict:
    """Everything the decode-step section reports (JSON-ready)."""
    from tandem.bench.roofline import count_graph_work
    from tandem.bench.stagebench import bench_pipeline
    from tandem.models import build_stages
    from tandem.runtimes.torch_eager import TorchRuntime

    wanted = [r for r in RUNTIMES if runtimes is None or r in runtimes or (r == "onnxruntime_dense" and "onnxruntime" in runtimes)]
    out: dict = {"budgets": budgets.as_dict(), "descriptions": DESCRIPTIONS, "groups": {}, "rows": {}, "ratios": {},
                 "unavailable": {}, "follows_recording": {}}
    aot_dir, why = find_cpu_aot(config, compiled)
    if "torch_aot" in wanted and aot_dir is None:
        out["unavailable"]["torch_aot"] = (
            (why + "; " if why else "") + f"no cpu-aot build of {config.name} found under build/ or given with --artifacts: "
            f"`{cpu_aot_build_command(config.name, artifacts)}` builds one (then rerun, or pass it with --artifacts DIR)")
        wanted.remove("torch_aot")
    out["cpu_aot_build"] = str(aot_dir) if aot_dir else None

    tick("decode step: eager PyTorch reference, recording held-out generations")
    stages = build_stages(config)
    reference = TorchRuntime(config, stages=stages)
    spec = reference.specs[DECODE]
    captions = rp.replay_captions(config.reasoning.max_prompt_len - 2, budgets.generations_b1 + 8 * budgets.generations_b8)
    recs = {1: record(reference, captions[:budgets.generations_b1], 1, budgets.max_steps),
            8: record(reference, captions[budgets.generations_b1:], 8, budgets.max_steps)}
    if not recs[1] or not recs[8]:
        raise TandemError("no generation could be recorded for the decode-step replay")
    tick("decode step: routed experts per step (PyTorch reference, teacher-forced)")
    works = {b: count_graph_work(stages, spec, b) for b in BATCHES}
    n_experts = out["n_experts"] = config.reasoning.n_experts
    experts = {b: [rp.routed_experts(stages.reasoning, r) for r in recs[b]] for b in BATCHES}
    routed = {b: [rp.step_bytes(works[b], e, r.positions) for e, r in zip(experts[b], recs[b])] for b in BATCHES}
    dense = {b: [rp.step_bytes(works[b], np.full_like(e, n_experts), r.positions) for e, r in zip(experts[b], recs[b])]
             for b in BATCHES}
    out["work"] = {str(b): {k: v for k, v in works[b].items() if k != "flops_by_op"} for b in BATCHES}
    out["recorded"] = {str(b): {"generations": len(recs[b]), "steps_replayed": [r.steps for r in recs[b]],
                                "captions": [r.captions for r in recs[b]]} for b in BATCHES}
    out["routing"] = {str(b): {
        "routed_experts_per_layer_mean": [round(float(x), 3) for x in np.concatenate(experts[b]).mean(axis=0)],
        "routed_bytes_p50": float(np.median(np.concatenate(routed[b]))),
        "dense_bytes_p50": float(np.median(np.concatenate(dense[b]))),
        "weight_bytes_total": works[b]["weight_bytes_total"],
    } for b in BATCHES}
    copy, copied = _copy_arm(budgets.copy_mib)

    def group(name: str, loaded: dict, rows_for: set[str] | None = None) -> Rounds:
        arms: dict[str, Callable[[], float]] = {"copy": copy}
        replays = {}
        for rt, runtime in loaded.items():
            for b in BATCHES:
                replays[f"{rt}_b{b}"] = rp.ReplayArm(runtime, recs[b], check_tokens=True)
        arms.update(replays)
        tick(f"decode step: {name} group, interleaved rounds")
        rounds = run_rounds(arms, budgets.rounds)
        warm = budgets.rounds.warmup_rounds
        bandwidth = [copied / s for s in rounds.figures["copy"]]
        out["groups"][name] = {**rounds.as_dict(), "bandwidth_gb_s": [bw / 1e9 for bw in bandwidth]}
        for arm_name, arm in replays.items():
            rt, b = arm_name.rsplit("_b", 1)
            b = int(b)
            if rows_for is not None and rt not in rows_for:
                continue
            used, seconds = arm.used[warm:], arm.seconds[warm:]
            floors = [float(np.median(routed[b][g])) / bw for g, bw in zip(used, bandwidth)]
            dense_floors = [float(np.median(dense[b][g])) / bw for g, bw in zip(used, bandwidth)]
            steps = rounds.figures[arm_name]
            share = Ratio.of([f / t for f, t in zip(floors, steps)], rounds.wall_s)
            dense_share = Ratio.of([f / t for f, t in zip(dense_floors, steps)], rounds.wall_s)
            all_steps = np.concatenate(seconds) if seconds else np.array([])
            out["rows"].setdefault(rt, {})[str(b)] = {
                "group": name,
                "step_ms_median": 1e3 * float(np.median(steps)),
                "step_ms_round_medians": [1e3 * s for s in steps],
                "step_ms_spread": [1e3 * float(x) for x in np.percentile(steps, [10, 90])],
                "step_ms_p90": 1e3 * float(np.percentile(all_steps, 90)) if all_steps.size else None,
                "steps_timed": int(all_steps.size),
                "routed_floor_ms": 1e3 * float(np.median(floors)),
                "dense_floor_ms": 1e3 * float(np.median(dense_floors)),
                "of_routed_roofline": share.as_dict() if share else None,
                "of_dense_roofline": dense_share.as_dict() if dense_share else None,
                "achieved_gb_s_routed": float(np.median(routed[b][used[0]])) / float(np.median(steps)) / 1e9 if used else None,
            }
            out["follows_recording"][arm_name] = min(arm.follows.values()) if arm.follows else None
        return rounds

    if "torch" in wanted:
        group("torch", {"torch": reference})
    del reference, stages
    gc.collect()

    ort = None
    if any(r in wanted for r in ("onnxruntime", "onnxruntime_dense", "torch_aot")):
        tick("decode step: host share of whole generations (ONNX Runtime)")
        ort = _load_ort(artifacts, True, ["reasoning_prefill", DECODE, "refinement"], "onnxruntime")
        host = {}
        for b, budget in budgets.host_generations.items():
            stats = bench_pipeline(ort, b, budget)
            phases = stats.get("phase_ms_per_generation") or {}
            inside = sum(phases.values())
            host[str(b)] = {
                "generation_ms_mean": stats["mean_ms"], "inside_runtime_ms": inside, "phases_ms": phases,
                "generations": stats["n"], "host_share": max(0.0, 1.0 - inside / stats["mean_ms"]),
                "decode_steps": (stats.get("graph_calls_per_generation") or {}).get(DECODE),
            }
        out["host_share"] = host
        for graph in ("reasoning_prefill", "refinement"):  # the rounds need only the decode graph
            ort.sessions.pop(graph, None)
        gc.collect()
        if "onnxruntime" in wanted or "onnxruntime_dense" in wanted:
            loaded = {"onnxruntime": ort}
            if "onnxruntime_dense" in wanted:
                loaded["onnxruntime_dense"] = _load_ort(artifacts, False, [DECODE], "onnxruntime_dense")
            group("onnxruntime", loaded)
            del loaded
            gc.collect()
        if "torch_aot" in wanted:
            from tandem.runtimes.torch_aot import TorchAOTRuntime

            try:
                aot = TorchAOTRuntime(aot_dir, graphs=[DECODE])
            except Exception as exc:  # an incompatible or broken build: listed, the rest still measured
                out["unavailable"]["torch_aot"] = f"{aot_dir}: {type(exc).__name__}: {exc}"
            else:
                # ONNX Runtime again beside it: the ratio compares two arms of the same rounds (its
                # own row stays the one of its group, unless that group did not run)
                rows_for = {"torch_aot"} | ({"onnxruntime"} if "onnxruntime" not in out["rows"] else set())
                rounds = group("cpu-aot", {"onnxruntime": ort, "torch_aot": aot}, rows_for)
                ratio = rounds.ratio("torch_aot_b1", "onnxruntime_b1")
                if ratio:
                    out["ratios"]["cpu_aot_vs_onnxruntime_b1"] = {
                        **ratio.as_dict(), "arms": {"torch_aot_s": rounds.median("torch_aot_b1"),
                                                    "onnxruntime_s": rounds.median("onnxruntime_b1")}}
                del aot
                gc.collect()
        del ort
        gc.collect()
    out["measured"] = [r for r in RUNTIMES if r in out["rows"]]
    return out


def targets(results: dict) -> list:
    """Per runtime, its decode step at batch 1 and 8 vs its routed-bytes roofline (>= 50%), and the
    cpu-aot batch-1 step vs ONNX Runtime's (<= 1.3x), from the decode-step section."""
    from tandem.bench.present import Target

    section = results.get("decode_step") or {}
    error = section.get("error")
    rows, out = section.get("rows") or {}, []
    names = {"onnxruntime": "ONNX Runtime", "torch_aot": "cpu-aot (AOTInductor)", "torch": "eager PyTorch"}
    for rt in TARGET_RUNTIMES:
        for b in BATCHES:
            t = Target(f"decode_step_roofline_{rt}_b{b}",
                       f"{names[rt]} decode step at batch {b} vs its routed-bytes roofline (replayed generations: compulsory "
                       "bytes of the experts each step routed to / copy bandwidth of the same round)", ROOFLINE_SHARE, ">=", "%")
            row = (rows.get(rt) or {}).get(str(b))
            if not row or not row.get("of_routed_roofline"):
                missing = error or section.get("unavailable", {}).get(rt) or (
                    "not measured in this run" if section else "the decode-step section did not run (--section decode-step)")
                out.append(t.evaluate(None, "", missing))
                continue
            ratio = Ratio.from_dict(row["of_routed_roofline"])
            roof = section["routing"][str(b)]
            detail = (f"{row['step_ms_median']:.2f} ms per replayed step vs {row['routed_floor_ms']:.2f} ms to move "
                      f"{roof['routed_bytes_p50'] / 1e6:.4g} MB (experts routed to per layer on average: "
                      f"{_mean(roof['routed_experts_per_layer_mean']):.2f} of {section.get('n_experts')}); "
                      f"dense bytes {roof['dense_bytes_p50'] / 1e6:.4g} MB ({row['dense_floor_ms']:.2f} ms)")
            if ratio.median < ROOFLINE_SHARE:
                if rt == "torch":
                    detail += ("; eager PyTorch runs the dense form (every expert over every row), so it reads "
                               f"{roof['dense_bytes_p50'] / roof['routed_bytes_p50']:.2f}x the routed bytes: only a routed "
                               "evaluation (forward_routed, or a grouped GEMM) can approach this roofline")
                else:
                    detail += ("; below half its roofline the step is bound by per-op overhead or by compute at this "
                               "batch rather than by the bytes the routed experts take; fewer, fused ops (the expert "
                               "matmuls as one grouped GEMM, attention over the cache as one kernel) would close it")
            out.append(t.evaluate(ratio, detail))
    t = Target("decode_step_cpu_aot_vs_onnxruntime_b1", "cpu-aot (AOTInductor, routed) decode step vs ONNX Runtime's at batch 1 "
               "(replayed generations, the same rounds)", AOT_VS_ORT, "<=", "x")
    entry = (section.get("ratios") or {}).get("cpu_aot_vs_onnxruntime_b1")
    if entry:
        arms = entry.get("arms", {})
        detail = f"{1e3 * (arms.get('torch_aot_s') or 0):.2f} ms cpu-aot vs {1e3 * (arms.get('onnxruntime_s') or 0):.2f} ms ONNX Runtime per replayed step"
        ratio = Ratio.from_dict(entry)
        if ratio.median > AOT_VS_ORT:
            detail += ("; AOTInductor's routed program runs each expert as its own index_select + matmuls + index_add "
                       "(data-dependent shapes, no fused kernel) where ONNX Runtime's MoE kernel runs the routed experts in "
                       "one op: a grouped-GEMM MoE op in the program would close it")
        out.append(t.evaluate(ratio, detail))
    else:
        out.append(t.evaluate(None, "", error or section.get("unavailable", {}).get("torch_aot")
                              or ("needs the onnxruntime and torch_aot runtimes" if section else
                                  "the decode-step section did not run (--section decode-step)")))
    return out


def _mean(values) -> float:
    return float(np.mean(values)) if values else 0.0


def report_section(results: dict) -> list[str]:
    from tandem.bench.present import fmt, table

    section = results.get("decode_step")
    if not section:
        return []
    out = ["## Decode step vs its routed-bytes roofline (replayed held-out generations)", ""]
    if section.get("error"):
        return out + [f"Not measured: {section['error']}", ""]
    b = section["budgets"]
    out += [
        f"Greedy generations over held-out captions recorded through eager PyTorch ({b['generations_batch1']} at batch 1, "
        f"{b['generations_batch8']} batch(es) of 8), each replayed from the cache its prefill left, its first "
        f"{b['max_steps'] or 'all'} steps timed on every runtime's decode engine. Roofline: each step's compulsory bytes "
        "(the experts its rows routed to, its cache rows, every other weight once) at the copy bandwidth measured in "
        "the same round; `dense` counts every expert (what the standard-op graph reads). Shares are the median of the "
        "rounds' shares with their 10-90% spread; a routed step above 100% of the dense roofline is faster than any "
        "graph that reads every expert could be.",
        "",
    ]
    rows = []
    for rt in section.get("measured", []):
        for batch, row in sorted(section["rows"][rt].items(), key=lambda kv: int(kv[0])):
            share, dense_share = Ratio.from_dict(row.get("of_routed_roofline")), Ratio.from_dict(row.get("of_dense_roofline"))
            follows = section.get("follows_recording", {}).get(f"{rt}_b{batch}")
            rows.append([
                f"{rt}" + (" *(dense figure)*" if rt == "onnxruntime_dense" else ""), batch, row["group"],
                f"{row['step_ms_median']:.2f}", f"{row['step_ms_spread'][0]:.2f}-{row['step_ms_spread'][1]:.2f}",
                f"{row['routed_floor_ms']:.2f}",
                f"{100 * share.median:.0f}% ({100 * share.low:.0f}-{100 * share.high:.0f}%)" if share else "-",
                f"{row['dense_floor_ms']:.2f}",
                f"{100 * dense_share.median:.0f}%" if dense_share else "-",
                "-" if follows is None else f"{100 * follows:.1f}%",
            ])
    out += table(["runtime", "batch", "group", "step ms (median of rounds)", "10-90% of rounds", "routed floor ms",
                  "% of routed roofline", "dense floor ms", "% of dense roofline", "greedy tokens follow the recording"], rows)
    for rt, desc in section.get("descriptions", {}).items():
        if rt in section.get("measured", []):
            out.append(f"- `{rt}`: {desc}")
    for rt, why in section.get("unavailable", {}).items():
        out.append(f"- `{rt}` not available: {why}")
    out.append("")
    routing = section.get("routing", {})
    if routing:
        out += table(["batch", "distinct experts per layer (mean over steps)", "routed bytes per step (p50)",
                      "dense bytes per step (p50)", "all weights"],
                     [[bt, ", ".join(f"{x:.2f}" for x in r["routed_experts_per_layer_mean"]), f"{r['routed_bytes_p50'] / 1e6:.4g} MB",
                       f"{r['dense_bytes_p50'] / 1e6:.4g} MB", f"{r['weight_bytes_total'] / 1e6:.4g} MB"] for bt, r in routing.items()])
    groups = section.get("groups", {})
    if groups:
        out += table(["group", "arms", "rounds", "wall s", "copy bandwidth GB/s (median, min-max)"],
                     [[name, ", ".join(g["arms"]), g["rounds"], f"{g['wall_s']:.1f}",
                       f"{np.median(g['bandwidth_gb_s']):.1f} ({min(g['bandwidth_gb_s']):.1f}-{max(g['bandwidth_gb_s']):.1f})"]
                      for name, g in groups.items()])
    host = section.get("host_share") or {}
    if host:
        out += ["Host share of whole in-process ONNX Runtime generations (prompt -> tokens -> image; time outside the "
                "runtime's calls, the decode engine's step counted as inside):", ""]
        out += table(["batch", "generations", "generation ms (mean)", "inside runtime calls ms", "host share"],
                     [[bt, h["generations"], f"{h['generation_ms_mean']:.1f}", f"{h['inside_runtime_ms']:.1f}",
                       f"{100 * h['host_share']:.1f}%"] for bt, h in host.items()])
    ratio = (section.get("ratios") or {}).get("cpu_aot_vs_onnxruntime_b1")
    if ratio:
        out += [f"cpu-aot vs ONNX Runtime at batch 1: {Ratio.from_dict(ratio).text()}", ""]
    return out
