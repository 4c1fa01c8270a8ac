"""Why `tandem repo` splits the thread budget as it does: the serving targets of `tandem bench` under
several thread plans, each plan on its own server, every ratio measured in interleaved rounds against
the same in-process pipeline (tandem.bench.served.ratio_rounds, the code the bench's targets use).

    .venv/bin/python benchmarks/thread_plans.py                 # about 3 minutes per plan on 2 cores
    .venv/bin/python benchmarks/thread_plans.py --rounds 4 --plans run,space

Writes results.json and report.md to benchmarks/results/thread-plans-<machine>-<date>/ (or --out).
Run it on a quiet machine: the plans are measured one after another, so only the ratios inside a
plan (served vs in-process, same rounds) compare; a plan's figures minutes apart do not."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name -> (what it is, repository options)
PLANS = {
    "run": ("every stage on the whole budget, threads spin only inside a run (the default)", {}),
    "space": ("the budget split in space: half the cores per stage, spinning only when the threads fit "
              "(the plan before 2026-12-07)", {"stage_threads": (("reasoning", 1), ("refinement", 1)), "spinning": "always"}),
    "always": ("every stage on the whole budget, ONNX Runtime's default spinning (idle threads spin after a run too)",
               {"spinning": "always"}),
    "never": ("every stage on the whole budget, no spinning (idle threads sleep at once)", {"spinning": "never"}),
}
TARGETS = ("served_vs_inprocess", "served_overhead", "served_first_step", "served_tail")


class _NoBar:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, *args):
        pass

    def close(self):
        pass

    def set_postfix_str(self, *args):
        pass


def main(argv: list[str] | None = None) -> int:
    from tandem.bench import environment
    from tandem.bench import served as sv
    from tandem.bench.rounds import RoundsBudget
    from tandem.formats.export_manifest import read_manifest
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime
    from tandem.serving.interface import ENSEMBLE, served_models
    from tandem.serving.repository import thread_plan, write_repository, RepositoryOptions, REASONING, REFINEMENT
    from tandem.serving.server import TritonServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="build/small", help="an export folder (default build/small)")
    parser.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated, of {list(PLANS)}")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per plan (default 6)")
    parser.add_argument("--out", help="report folder (default benchmarks/results/thread-plans-<machine>-<date>)")
    args = parser.parse_args(argv)
    plans = [p for p in args.plans.split(",") if p]
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        parser.error(f"unknown plans {unknown}; choose from {list(PLANS)}")
    artifacts = Path(args.artifacts)
    env = environment.collect()
    out = Path(args.out or f"benchmarks/results/thread-plans-{env['machine']}-{dt.date.today().isoformat()}")
    out.mkdir(parents=True, exist_ok=True)

    model = served_models(read_manifest(artifacts).config)[ENSEMBLE]
    pipeline = Pipeline(make_runtime("onnxruntime", artifacts=artifacts))
    reference = sv.inprocess_reference(pipeline, 16, lambda _: None)
    expected = reference.pop("tokens")
    results: dict = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "environment": env,
                     "artifacts": str(artifacts), "rounds": args.rounds, "plans": {}}
    load_start = environment.load_average()
    for name in plans:
        what, options = PLANS[name]
        threads = {stage: t.describe() for stage, t in thread_plan(RepositoryOptions(**options), (REASONING, REFINEMENT)).items()}
        print(f"plan {name}: {threads}", file=sys.stderr, flush=True)
        settings = sv.ServedSettings(ratio_rounds=RoundsBudget(rounds=args.rounds, min_rounds=args.rounds, max_seconds=0.0, warmup_rounds=1))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tandem-thread-plans-") as tmp:
            repository = write_repository(artifacts, Path(tmp) / "repository", flavor="local", **options)
            with TritonServer(repository, startup_timeout=300) as server:
                measured = sv.ratio_rounds(server, model, settings, "inflight", pipeline, expected, _NoBar)
        cores = {arm: float(np.median([r["cores_busy"] for r in recs if r.get("cores_busy") is not None]))
                 for arm, recs in measured["records"].items()}
        results["plans"][name] = {"description": what, "options": {k: v for k, v in options.items()}, "threads": threads,
                                  "ratios": measured["ratios"], "cores_busy": cores, "check": measured["check"],
                                  "wall_s": round(time.perf_counter() - started, 1)}
    results["load_average"] = {"start": load_start, "end": environment.load_average()}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render(results))
    print(out / "report.md")
    return 0


def render(results: dict) -> str:
    lines = [
        "# Thread plans: the serving targets under each plan",
        "",
        f"- Run: {results['started']} UTC, {results['rounds']} interleaved rounds per plan (after one warm-up round), "
        f"`{results['artifacts']}`; load average at start {results['load_average']['start']}, at end {results['load_average']['end']}",
        f"- Machine: {results['environment']['machine']}",
        "- Each cell: median of the per-round ratios (10-90% of the rounds). Served = the `tandem` ensemble over "
        "HTTP / gRPC through the front door; in-process = the ONNX Runtime pipeline in the measuring process, the same rounds. "
        "Targets (tandem bench): c=8 images/s >= 0.9x in-process batch 8; c=1 p50 <= 1.10x in-process; time to first decode "
        "step at c=8 <= in-process prefill + 2 steps at batch 8; p99 <= 1.5x p50 at c=8.",
        "",
        "| plan | threads | c=8 vs in-process b8 (http / grpc) | c=1 p50 vs in-process (http / grpc) | first step c=8 (http / grpc) | p99/p50 c=8 (http / grpc) | cores busy at c=8 (http) | failed / differing tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(ratios: dict, target: str) -> str:
        parts = []
        for protocol in ("http", "grpc"):
            r = ratios.get(f"{target}_{protocol}")
            parts.append("-" if not r else f"{r['median']:.2f}x ({r['spread'][0]:.2f}-{r['spread'][1]:.2f})")
        return " / ".join(parts)

    for name, plan in results["plans"].items():
        threads = "; ".join(f"{stage}: {text}" for stage, text in plan["threads"].items())
        check = plan["check"]
        lines.append(
            f"| **{name}**: {plan['description']} | {threads} | {cell(plan['ratios'], 'served_vs_inprocess')} | "
            f"{cell(plan['ratios'], 'served_overhead')} | {cell(plan['ratios'], 'served_first_step')} | "
            f"{cell(plan['ratios'], 'served_tail')} | {plan['cores_busy'].get('http_c8', float('nan')):.2f} | "
            f"{check['failed']} / {check['tokens_mismatched']} |"
        )
    lines += ["", "Plans were measured one after another: compare the ratios (each measured within its plan's rounds), "
              "not figures across plans.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
