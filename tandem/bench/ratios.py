"""The in-process ratios the targets are judged on, each measured in interleaved rounds
(:mod:`tandem.bench.rounds`) so that the two figures of a ratio see the same machine:

- ``decode``: decode steps as generation runs them (:mod:`tandem.bench.replay`): every round replays
  one recorded held-out generation at batch 1 on each runtime, one at batch 8 on ONNX Runtime, and
  copies a large array (the bandwidth of that round). Gives ONNX Runtime vs eager, int8 vs fp32,
  rows/s at batch 8 vs 1, and each batch's share of its memory roofline, with the bytes counted from
  the experts each replayed step really routed to.
- ``refinement``: one refinement call per runtime at batch 1, plus the best refinement cell and the
  fp32 GEMM that gave the matmul peak (refinement FLOP/s vs peak).
- ``positions``: the ONNX Runtime decode step at position 16 and 256 (fixed inputs: only the
  position changes).
- ``pipeline``: whole in-process generations at batch 1 and batch 8, and a batch-1 generation with
  ONNX Runtime's run calls timed (the host share of a generation, :mod:`tandem.bench.hostshare`).

Every entry of ``ratios`` is a :class:`tandem.bench.rounds.Ratio` as a dict plus ``arms`` (the
median of each arm's figures, for the target's detail line)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tandem.bench import replay as rp
from tandem.bench.hostshare import HostSample, OrtCallClock, measure_generation
from tandem.bench.hostshare import summary as host_summary
from tandem.bench.rounds import Ratio, Rounds, RoundsBudget, block, calls_for, run_rounds
from tandem.errors import TandemError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RatioBudgets:
    decode: RoundsBudget
    other: RoundsBudget
    block_seconds: float  # how long one arm's block of calls lasts in a round
    replay_b1: int  # held-out captions generated (and replayed) one at a time
    replay_b8: int  # batches of 8 held-out captions

    @classmethod
    def full(cls) -> "RatioBudgets":
        return cls(RoundsBudget(rounds=16, min_rounds=6, max_seconds=40.0, pause_s=0.1),
                   RoundsBudget(rounds=15, min_rounds=6, max_seconds=12.0, pause_s=0.1),
                   block_seconds=0.1, replay_b1=12, replay_b8=3)

    @classmethod
    def quick(cls) -> "RatioBudgets":
        return cls(RoundsBudget(rounds=2, min_rounds=2, max_seconds=0.0, warmup_rounds=0, pause_s=0.02),
                   RoundsBudget(rounds=2, min_rounds=2, max_seconds=0.0, warmup_rounds=0, pause_s=0.02), block_seconds=0.01,
                   replay_b1=2, replay_b8=1)

    def as_dict(self) -> dict:
        return {"decode": self.decode.as_dict(), "other": self.other.as_dict(), "block_seconds": self.block_seconds,
                "replay_captions_batch1": self.replay_b1, "replay_batches_of_8": self.replay_b8}


def _entry(ratio: Ratio | None, rounds: Rounds, **arms: str) -> dict | None:
    if ratio is None:
        return None
    return {**ratio.as_dict(), "arms": {label: rounds.median(arm) for label, arm in arms.items()}}


def measure(runtimes: dict, specs: dict, stages, roofline: dict, config, budgets: RatioBudgets, tick: Progress) -> dict:
    """``{"rounds": {group: Rounds}, "ratios": {target id: entry}, "replay": {...}}``."""
    out: dict = {"budgets": budgets.as_dict(), "rounds": {}, "ratios": {}}
    try:
        out["replay"] = _decode_rounds(runtimes, specs, stages, roofline, config, budgets, tick, out)
    except TandemError as exc:
        out["replay"] = {"error": str(exc)}
    _refinement_rounds(runtimes, specs, roofline, budgets, tick, out)
    _position_rounds(runtimes, specs, config, budgets, tick, out)
    _pipeline_rounds(runtimes, budgets, tick, out)
    return out


def _copy_arm(roofline: dict, mib: int) -> tuple[Callable[[], float], int]:
    """A round's memory bandwidth figure: seconds per copy of a ``mib`` array (library that won the roofline's measurement)."""
    import torch

    n = mib * 1024 * 1024 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    best = roofline.get("machine", {}).get("memory", {}).get("best", "numpy.copyto")
    if best == "torch.copy_":
        tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
        fn = lambda: tdst.copy_(tsrc)  # noqa: E731
    else:
        fn = lambda: np.copyto(dst, src)  # noqa: E731
    calls = 3
    return (lambda: block(fn, calls)), 2 * src.nbytes


def _decode_rounds(runtimes, specs, stages, roofline, config, budgets: RatioBudgets, tick: Progress, out: dict) -> dict:
    from tandem.bench.roofline import count_graph_work

    if "onnxruntime" not in runtimes:
        raise TandemError("the replayed decode steps need the onnxruntime runtime")
    ort = runtimes["onnxruntime"]
    tick("decode replay: recording held-out generations")
    # the captions only need to fit the prompt (BOS + caption + BOI): a config too small to draw the
    # scenes (tiny) still generates from them
    max_caption_bytes = config.reasoning.max_prompt_len - 2
    captions = rp.replay_captions(max_caption_bytes, budgets.replay_b1 + 8 * budgets.replay_b8)
    rec1 = rp.record_generations(ort, captions[:budgets.replay_b1], 1)
    rec8 = rp.record_generations(ort, captions[budgets.replay_b1:], 8)
    if not rec1 or not rec8:
        raise TandemError("no generation could be recorded for the replay (the pipeline's decode loop did not run one "
                          "prefill and then steps over the whole batch)")
    tick("decode replay: routed experts (PyTorch reference)")
    work = roofline.get("work", {}).get("reasoning_decode", {})
    works = {b: work.get(str(b)) or count_graph_work(stages, specs["reasoning_decode"], b) for b in (1, 8)}
    experts = {1: [rp.routed_experts(stages.reasoning, r) for r in rec1], 8: [rp.routed_experts(stages.reasoning, r) for r in rec8]}
    step_bytes = {b: [rp.step_bytes(works[b], e, r.positions) for e, r in zip(experts[b], recs)]
                  for b, recs in ((1, rec1), (8, rec8))}

    copy, copied_bytes = _copy_arm(roofline, 64 if budgets.decode.rounds <= 2 else 128)
    arms: dict[str, Callable[[], float]] = {"copy": copy}
    replays: dict[str, rp.ReplayArm] = {}
    for name in ("torch", "onnxruntime", "onnxruntime_int8", "onnxruntime_basic"):
        if name in runtimes:
            replays[f"{name}_b1"] = rp.ReplayArm(runtimes[name], rec1)
    replays["onnxruntime_b8"] = rp.ReplayArm(ort, rec8)
    arms.update(replays)
    tick("decode replay: interleaved rounds")
    rounds = run_rounds(arms, budgets.decode)
    out["rounds"]["decode"] = rounds.as_dict()
    warm = budgets.decode.warmup_rounds

    ratios = out["ratios"]
    ratios["ort_decode_speedup"] = _entry(rounds.ratio("torch_b1", "onnxruntime_b1") if "torch_b1" in arms else None,
                                          rounds, torch="torch_b1", onnxruntime="onnxruntime_b1")
    ratios["decode_rows_scaling"] = _entry(rounds.ratio("onnxruntime_b1", "onnxruntime_b8", scale=8.0), rounds,
                                           batch1="onnxruntime_b1", batch8="onnxruntime_b8")
    if "onnxruntime_int8_b1" in arms:
        ratios["cpu_int8_decode_speedup"] = _entry(rounds.ratio("onnxruntime_b1", "onnxruntime_int8_b1"), rounds,
                                                   fp32="onnxruntime_b1", int8="onnxruntime_int8_b1")
    # Roofline share per round: that round's replayed generation's median compulsory bytes moved at
    # that round's copy bandwidth, over that round's median step time.
    bandwidth = [copied_bytes / s for s in rounds.figures["copy"]]
    summary: dict = {"captions": {"batch1": [r.captions[0] for r in rec1], "batch8": [r.captions for r in rec8]},
                     "runtimes": {}, "roofline": {}}
    for batch in (1, 8):
        arm = replays[f"onnxruntime_b{batch}"]
        used, _ = arm.timed(warm)
        floors = [float(np.median(step_bytes[batch][g])) / bw for g, bw in zip(used, bandwidth)]
        shares = [f / t for f, t in zip(floors, rounds.figures[f"onnxruntime_b{batch}"])]
        ratio = Ratio.of(shares, rounds.wall_s)
        all_bytes = np.concatenate(step_bytes[batch])
        allx = np.concatenate(experts[batch])
        summary["roofline"][str(batch)] = {
            "bytes_p50": float(np.median(all_bytes)),
            "bytes_fixed_input": works[batch]["bytes"],
            "bandwidth_gb_s_median": float(np.median(bandwidth)) / 1e9,
            "floor_ms_median": 1e3 * float(np.median(floors)),
            "routed_experts_per_layer_mean": [round(float(x), 3) for x in allx.mean(axis=0)],
            "routed_experts_per_layer_fixed_input": works[batch].get("routed_experts_per_layer"),
            "cache_read_bytes_p50": float(np.median(np.concatenate([r.positions.sum(axis=1) for r in (rec1 if batch == 1 else rec8)]))
                                          * works[batch]["cache_bytes_per_position"]),
            "routed_expert_bytes_p50": float(np.median(np.concatenate(
                [e @ np.asarray(works[batch]["expert_bytes_per_layer"], dtype=np.float64) for e in experts[batch]]))),
        }
        ratios[f"decode_roofline_b{batch}"] = None if ratio is None else {**ratio.as_dict(), "arms": {
            "step_s": rounds.median(f"onnxruntime_b{batch}"), "floor_s": float(np.median(floors))}}
    for name, arm in replays.items():
        used, seconds = arm.timed(warm)
        batch = 8 if name.endswith("_b8") else 1
        stats = rp.replay_summary(seconds, [experts[batch][g] for g in used], [step_bytes[batch][g] for g in used])
        stats.update(runtime=name.rsplit("_b", 1)[0], batch=batch, generations=len(used))
        summary["runtimes"][name] = stats
    return summary


def _refinement_rounds(runtimes, specs, roofline: dict, budgets: RatioBudgets, tick: Progress, out: dict) -> None:
    from tandem.bench.stagebench import graph_call, graph_feeds

    spec = specs["refinement"]
    arms: dict[str, Callable[[], float]] = {}
    flops: dict[str, int] = {}

    def add(name: str, runtime, batch: int) -> None:
        fn = graph_call(runtime, spec, graph_feeds(spec, batch))
        calls = calls_for(fn, budgets.block_seconds, at_most=50)
        arms[name] = lambda: block(fn, calls)
        flops[name] = (roofline.get("work", {}).get("refinement", {}).get(str(batch)) or {}).get("flops", 0)

    for name in ("torch", "onnxruntime", "onnxruntime_basic"):
        if name in runtimes:
            add(f"{name}_b1", runtimes[name], 1)
    best = roofline.get("refinement_best")
    matmul = roofline.get("machine", {}).get("matmul", {}).get("best")
    if best and matmul and best["runtime"] in runtimes:
        cell = f"{best['runtime']}_b{best['batch']}"
        if cell not in arms:
            add(cell, runtimes[best["runtime"]], best["batch"])
        import torch

        n = matmul["n"]
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        if matmul["library"] == "torch.mm":
            ta, tb, to = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)
            gemm = lambda: torch.mm(ta, tb, out=to)  # noqa: E731
        else:
            o = np.empty_like(a)
            gemm = lambda: np.matmul(a, b, out=o)  # noqa: E731
        gcalls = calls_for(gemm, budgets.block_seconds, at_most=50, at_least=2)
        arms["gemm"] = lambda: block(gemm, gcalls)
    if not arms:
        return
    tick("refinement: interleaved rounds")
    rounds = run_rounds(arms, budgets.other)
    out["rounds"]["refinement"] = rounds.as_dict()
    if "torch_b1" in arms and "onnxruntime_b1" in arms:
        out["ratios"]["ort_refinement_speedup"] = _entry(rounds.ratio("torch_b1", "onnxruntime_b1"), rounds,
                                                         torch="torch_b1", onnxruntime="onnxruntime_b1")
        if "onnxruntime_basic_b1" in arms:
            out["ratios"]["ort_refinement_speedup_basic"] = _entry(rounds.ratio("torch_b1", "onnxruntime_basic_b1"), rounds,
                                                                   torch="torch_b1", onnxruntime_basic="onnxruntime_basic_b1")
    if "gemm" in arms:
        cell = f"{best['runtime']}_b{best['batch']}"
        n = matmul["n"]
        ratio = rounds.combine(lambda f: (flops[cell] / f[cell]) / (2 * n**3 / f["gemm"]) if f[cell] and f["gemm"] else None)
        entry = _entry(ratio, rounds, refinement=cell, gemm="gemm")
        if entry:
            entry.update(runtime=best["runtime"], batch=best["batch"], flops=flops[cell], gemm_n=n, gemm_library=matmul["library"])
        out["ratios"]["refinement_peak"] = entry


def _position_rounds(runtimes, specs, config, budgets: RatioBudgets, tick: Progress, out: dict) -> None:
    from tandem.bench.stagebench import graph_call, graph_feeds

    if "onnxruntime" not in runtimes or config.max_len <= 256:
        return
    spec = specs["reasoning_decode"]
    arms = {}
    for position in (16, 256):
        feeds = graph_feeds(spec, 1)
        feeds["positions"] = np.array([position], dtype=np.int64)
        fn = graph_call(runtimes["onnxruntime"], spec, feeds)
        calls = calls_for(fn, budgets.block_seconds)
        arms[f"position_{position}"] = (lambda fn=fn, calls=calls: block(fn, calls))
    tick("decode vs position: interleaved rounds")
    rounds = run_rounds(arms, budgets.other)
    out["rounds"]["positions"] = rounds.as_dict()
    out["ratios"]["decode_flat"] = _entry(rounds.ratio("position_256", "position_16"), rounds,
                                          position_16="position_16", position_256="position_256")


def _pipeline_rounds(runtimes, budgets: RatioBudgets, tick: Progress, out: dict) -> None:
    from tandem.bench.stagebench import PROMPTS
    from tandem.pipeline import Pipeline
    from tandem.sampling import SamplingParams
    import time

    if "onnxruntime" not in runtimes:
        return
    pipeline = Pipeline(runtimes["onnxruntime"])

    def generation(batch: int) -> Callable[[], float]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        params = [SamplingParams(seed=i) for i in range(batch)]

        def run() -> float:  # images/s of one whole generation (prompt -> tokens -> image)
            t0 = time.perf_counter()
            pipeline.render(pipeline.generate_tokens(prompts, params))
            return batch / (time.perf_counter() - t0)

        return run

    # The host share: a batch-1 generation whose ONNX Runtime calls are timed (only in this arm, so
    # the other arms run the sessions untouched); one generation, one share, per round.
    clock = OrtCallClock(runtimes["onnxruntime"])
    samples: list[HostSample] = []

    def host_share() -> float:
        with clock:
            sample = measure_generation(pipeline, clock, [PROMPTS[0]], [SamplingParams(seed=0)])
        samples.append(sample)
        return sample.host_share

    tick("generations batch 1 vs 8, host share: interleaved rounds")
    rounds = run_rounds({"batch1": generation(1), "batch8": generation(8), "host_share_b1": host_share}, budgets.other)
    out["rounds"]["pipeline"] = rounds.as_dict()
    out["ratios"]["pipeline_scaling"] = _entry(rounds.ratio("batch8", "batch1"), rounds, batch1="batch1", batch8="batch8")
    entry = _entry(rounds.combine(lambda f: f["host_share_b1"]), rounds, host_share="host_share_b1")
    if entry is not None:
        timed = samples[budgets.other.warmup_rounds:]
        entry.update(generations=[s.as_dict() for s in timed], figures=host_summary(timed))
    out["ratios"]["host_share_b1"] = entry
