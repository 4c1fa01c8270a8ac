"""Triton's dynamic batcher in front of a model that batches itself: the 500 ms stall.

In-flight reasoning takes each request in an ``execute`` that returns within a few milliseconds.
With ``dynamic_batching`` in its config.pbtxt (as tandem wrote it before 2026-12-07), Triton's batcher
thread waits for the instance to be free on a condition variable guarded by a mutex of its own
(``DynamicBatchScheduler::WaitForPayloadSlotAvailable`` in triton-inference-server/core), so the
"instance free" notification can come before the wait begins, and the requests queued meanwhile wait
out the batcher's 500 ms default. This script sends waves of 8 concurrent gRPC requests straight to
``reasoning``, back to back, with and without the batcher, and records each wave's wall time and
Triton's mean queue time per request over all waves (from Triton's statistics).

    .venv/bin/python benchmarks/batcher_stall.py            # about 1 minute
    .venv/bin/python benchmarks/batcher_stall.py --waves 20

Writes results.json and report.md to benchmarks/results/batcher-stall-<machine>-<date>/ (or --out)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import tempfile
from pathlib import Path

import numpy as np

STALL_MS = 300.0  # a wave this much slower than the arm's fastest stalled


def main(argv: list[str] | None = None) -> int:
    from tandem.bench import environment
    from tandem.bench import served as sv
    from tandem.formats.export_manifest import read_manifest
    from tandem.serving.interface import REASONING, served_models
    from tandem.serving.repository import write_repository
    from tandem.serving.server import TritonServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="build/small", help="an export folder (default build/small)")
    parser.add_argument("--waves", type=int, default=12, help="waves of 8 requests per arm (default 12)")
    parser.add_argument("--out", help="report folder (default benchmarks/results/batcher-stall-<machine>-<date>)")
    args = parser.parse_args(argv)
    artifacts = Path(args.artifacts)
    env = environment.collect()
    out = Path(args.out or f"benchmarks/results/batcher-stall-{env['machine']}-{dt.date.today().isoformat()}")
    out.mkdir(parents=True, exist_ok=True)
    model = served_models(read_manifest(artifacts).config)[REASONING]
    arms = {
        "without Triton's batcher (tandem's default)": {},
        "with Triton's batcher (max_queue_delay 0, as before)": {"triton_batcher": True, "max_queue_delay_us": 0},
    }
    results: dict = {"started": env["started_utc"], "environment": env, "waves": args.waves, "arms": {}}
    for name, options in arms.items():
        with tempfile.TemporaryDirectory(prefix="tandem-batcher-stall-") as tmp:
            repository = write_repository(artifacts, Path(tmp) / "repository", flavor="local", **options)
            with TritonServer(repository, startup_timeout=300) as server:
                proto = sv._Protocol("grpc", server.grpc_url)
                address = server.http_url.split("://", 1)[-1]
                asyncio.run(sv._run_level(proto, model, 8, list(range(8)), 120, lambda: None))  # warm-up
                waves = []
                sent = sv._answered(sv._statistics(address), REASONING)
                before = sv._statistics(address)
                for _ in range(args.waves):  # back to back: no pause, no statistics call in between
                    answers, wall = asyncio.run(sv._run_level(proto, model, 8, list(range(8)), 120, lambda: None))
                    waves.append({"wall_ms": 1e3 * wall, "failed": sum(not a.ok for a in answers)})
                after = sv.settled_statistics(address, REASONING, sent + 8 * args.waves)
                stats = sv.statistics_delta(before, after).get(REASONING, {})
        walls = [w["wall_ms"] for w in waves]
        results["arms"][name] = {"options": options, "waves": waves, "triton": stats,
                                 "stalled_waves": sum(w >= min(walls) + STALL_MS for w in walls),
                                 "wall_ms_median": float(np.median(walls)), "wall_ms_max": float(max(walls)),
                                 "queue_ms_per_request": stats.get("queue_ms_per_request")}
    results["load_average_end"] = environment.load_average()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [
        "# Triton's dynamic batcher in front of in-flight reasoning",
        "",
        f"- Run: {results['started']} UTC on {env['machine']}, `{artifacts}`, {args.waves} waves of 8 concurrent gRPC "
        f"requests straight to `reasoning` per arm, back to back; load average at start {env['load_average_start']}, "
        f"at end {results['load_average_end']}",
        f"- A wave stalled when it took >= {STALL_MS:g} ms longer than the arm's fastest wave.",
        "",
        "| arm | stalled waves | wave wall ms, median / max | Triton queue ms per request (mean over the waves) | failed |",
        "|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        lines.append(f"| {name} | {arm['stalled_waves']} of {args.waves} | {arm['wall_ms_median']:.0f} / {arm['wall_ms_max']:.0f} | "
                     f"{arm['queue_ms_per_request'] or 0:.1f} | {sum(w['failed'] for w in arm['waves'])} |")
    lines += ["", "Wall ms per wave, in order:", ""]
    for name, arm in results["arms"].items():
        lines.append(f"- {name}: " + ", ".join(f"{w['wall_ms']:.0f}" for w in arm["waves"]))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
