"""Greedy parallel (Jacobi) decoding in the bench (issue 29): held-out captions generated
sequentially and with :class:`tandem.parallel.JacobiPipeline` on ONNX Runtime, in interleaved
rounds (each round runs both on the same captions, at batch 8 and at batch 1), every Jacobi token
checked against the sequential one. Gives the sequential model passes per image (the target) and the
wall-time ratio at each batch (figures: on a CPU a k-token verify step does k times a one-token
step's FLOPs and routes to more experts, so fewer passes need not mean proportionally less time).
``benchmarks/jacobi_pool.py`` runs the same over the whole held-out pool."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tandem.bench.rounds import Ratio, RoundsBudget, run_rounds


def measure(runtime, budget: RoundsBudget, on_round: Callable[[int], None] | None = None, batch: int = 8) -> dict:
    from tandem.decoding import VERIFY
    from tandem.eval.evaluate import eval_captions
    from tandem.parallel import DEFAULT_BLOCK, DEFAULT_PROPOSER, JacobiPipeline
    from tandem.pipeline import Pipeline

    if VERIFY not in runtime.specs:
        return {"error": f"the export has no {VERIFY} graph (export again with this tandem)"}
    from tandem.bench.stagebench import PROMPTS
    from tandem.errors import TandemError

    config = runtime.config
    rounds_needed = budget.rounds + budget.warmup_rounds
    wanted = batch * rounds_needed + rounds_needed
    try:
        captions, source = eval_captions(config, wanted), "held-out captions"
    except TandemError:  # a config whose grid cannot hold the synthetic scenes (tiny): the bench's prompts
        captions, source = [PROMPTS[i % len(PROMPTS)] for i in range(wanted)], "the bench's prompts (no held-out captions for this config)"

    sequential, jacobi = Pipeline(runtime), JacobiPipeline(runtime)
    tokens: dict[str, dict[int, np.ndarray]] = {"sequential": {}, "jacobi": {}}
    steps: list[int] = []
    calls = {name: 0 for name in ("sequential_b8", "jacobi_b8", "sequential_b1", "jacobi_b1")}

    def arm(name: str, pipe, size: int):
        def run() -> float:
            import time

            index = calls[name]
            calls[name] += 1
            start = (index * (batch + 1)) % max(1, len(captions) - batch)
            chunk = captions[start : start + batch] if size == batch else captions[start + batch : start + batch + 1]
            t0 = time.perf_counter()
            out = pipe.generate_tokens(chunk)
            seconds = time.perf_counter() - t0
            kind = name.split("_")[0]
            key = index * 2 + (size == 1)
            tokens[kind][key] = out
            if kind == "jacobi":
                steps.extend(pipe.last_stats.steps)
            return seconds

        return run

    arms = {
        "sequential_b8": arm("sequential_b8", sequential, batch),
        "jacobi_b8": arm("jacobi_b8", jacobi, batch),
        "sequential_b1": arm("sequential_b1", sequential, 1),
        "jacobi_b1": arm("jacobi_b1", jacobi, 1),
    }
    rounds = run_rounds(arms, budget, on_round)
    fig = rounds.figures
    compared = sorted(set(tokens["sequential"]) & set(tokens["jacobi"]))
    images = sum(len(tokens["jacobi"][k]) for k in compared)
    out = {
        "prompts": source,
        "block": DEFAULT_BLOCK,
        "proposer": DEFAULT_PROPOSER,
        "num_tokens": config.scene.num_tokens,
        "images": images,
        "images_differing": sum(
            int(not np.array_equal(a, b)) for k in compared for a, b in zip(tokens["sequential"][k], tokens["jacobi"][k])),
        "steps_mean": float(np.mean(steps)) if steps else None,
        "steps_p90": float(np.percentile(steps, 90)) if steps else None,
        "steps_max": int(max(steps)) if steps else None,
        "rounds": rounds.as_dict(),
        "ratios": {},
    }
    for b in ("b8", "b1"):
        ratio = Ratio.of([s / j for s, j in zip(fig[f"sequential_{b}"], fig[f"jacobi_{b}"])], rounds.wall_s)
        if ratio is not None:
            out["ratios"][f"jacobi_speedup_{b}"] = {
                **ratio.as_dict(),
                "arms": {"sequential_s": float(np.median(fig[f"sequential_{b}"])), "jacobi_s": float(np.median(fig[f"jacobi_{b}"]))},
            }
    return out
