"""What the front door costs a served request at concurrency 1 (issue 27's c=1 target).

Two servers of one repository are up together: one behind tandem's front door (the default: TLS,
API keys, cancellation markers and limits in a Python process in front of tritonserver's Unix
sockets), one with ``front_door=False`` (tritonserver's own gRPC port). In interleaved rounds each
prompt is generated in-process and then sent over gRPC to each server, the order rotating by one
every request, and each served request is compared with its in-process twin (same prompt and
seed, the same second): a round's figure per server is the median of those ratios and of the
differences in ms. Around the rounds, the CPU seconds each process of the front-door server used
per request (tritonserver, each python-backend stub, the front door) come from /proc.

    .venv/bin/python benchmarks/front_door_cost.py            # about 3 minutes
    .venv/bin/python benchmarks/front_door_cost.py --rounds 8 --requests 9

Writes results.json and report.md to benchmarks/results/front-door-cost-<machine>-<date>/ (or --out),
never into a folder that exists."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu_seconds(processes) -> dict[str, float]:
    import psutil

    out = {}
    for role, proc in processes.items():
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[role] = times.user + times.system
    return out


def _roles(server) -> dict:
    """role -> psutil.Process of the front-door server's processes."""
    import psutil

    root = psutil.Process(server.process.pid)
    roles = {"tritonserver": root}
    for child in root.children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        model = next((Path(a).parent.parent.name for a in cmdline if a.endswith("model.py")), "?")
        roles[f"stub {model}"] = child
    if server._front is not None:
        roles["front door"] = psutil.Process(server._front.pid)
    return roles


def main(argv: list[str] | None = None) -> int:
    from tandem.bench import environment
    from tandem.bench import served as sv
    from tandem.bench.rounds import Ratio
    from tandem.bench.stagebench import PROMPTS
    from tandem.formats.export_manifest import read_manifest
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime
    from tandem.serving.interface import ENSEMBLE, served_models
    from tandem.serving.repository import write_repository
    from tandem.serving.server import TritonServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="build/small", help="an export folder (default build/small)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=9, help="prompts per round (default 9)")
    parser.add_argument("--out", help="report folder (default benchmarks/results/front-door-cost-<machine>-<date>)")
    args = parser.parse_args(argv)
    artifacts = Path(args.artifacts)
    env = environment.collect()
    out = Path(args.out or f"benchmarks/results/front-door-cost-{env['machine']}-{dt.date.today().isoformat()}")
    if out.exists():
        raise SystemExit(f"{out} exists; pick a new folder with --out (this script never overwrites one)")
    model = served_models(read_manifest(artifacts).config)[ENSEMBLE]
    pipeline = Pipeline(make_runtime("onnxruntime", artifacts=artifacts))
    pipeline.generate(PROMPTS[0], seed=0)  # warm-up, not timed
    paths = ("inprocess", "front door", "direct")
    ratios: dict[str, list[float]] = {"front door": [], "direct": []}
    diffs: dict[str, list[float]] = {"front door": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="tandem-front-door-") as tmp:
        repository = write_repository(artifacts, Path(tmp) / "repository", flavor="local")
        with TritonServer(repository, startup_timeout=300) as front, TritonServer(repository, front_door=False, startup_timeout=300) as direct:
            servers = {"front door": front, "direct": direct}
            protos = {name: sv._Protocol("grpc", s.grpc_url) for name, s in servers.items()}
            roles = _roles(front)

            async def rounds() -> tuple[float, int]:
                clients = {name: p.client() for name, p in protos.items()}
                outputs = {name: p.outputs(model) for name, p in protos.items()}
                try:
                    for name, p in protos.items():  # open each client's connection, untimed
                        await p.send(clients[name], model, 0, outputs[name], 60)
                    start, sent = time.perf_counter(), 0
                    for r in range(args.rounds):
                        seconds: dict[str, list[float]] = {p: [] for p in paths}
                        for j in range(args.requests):
                            i = r * args.requests + j
                            shift = i % len(paths)
                            for who in paths[shift:] + paths[:shift]:
                                if who == "inprocess":
                                    t0 = time.perf_counter()
                                    pipeline.generate(PROMPTS[i % len(PROMPTS)], seed=i)
                                    seconds[who].append(time.perf_counter() - t0)
                                else:
                                    got = await protos[who].send(clients[who], model, i, outputs[who], 60)
                                    if not got.ok:
                                        raise SystemExit(f"a request to the {who} server failed: {got.error}")
                                    seconds[who].append(got.seconds)
                                    sent += who == "front door"
                        base = np.array(seconds["inprocess"])
                        for name in ratios:
                            ratios[name].append(float(np.median(np.array(seconds[name]) / base)))
                            diffs[name].append(float(np.median(1e3 * (np.array(seconds[name]) - base))))
                        print(f"round {r + 1}/{args.rounds}: front door {ratios['front door'][-1]:.3f}x, "
                              f"direct {ratios['direct'][-1]:.3f}x", flush=True)
                    return time.perf_counter() - start, sent
                finally:
                    for client in clients.values():
                        await client.close()

            cpu_before = _cpu_seconds(roles)
            wall, sent = asyncio.run(rounds())
            cpu_after = _cpu_seconds(roles)
    cpu_ms = {role: 1e3 * (cpu_after[role] - cpu_before[role]) / sent for role in cpu_after if role in cpu_before}
    summary = {name: Ratio.of(values, wall).as_dict() for name, values in ratios.items()}
    difference = Ratio.of([f - d for f, d in zip(diffs["front door"], diffs["direct"])], wall).as_dict()
    results = {
        "started": env["started_utc"], "environment": env, "rounds": args.rounds, "requests_per_round": args.requests,
        "ratios_vs_inprocess": summary, "ms_over_inprocess": diffs, "front_door_minus_direct_ms": difference,
        "cpu_ms_per_request_front_door_server": cpu_ms, "load_average_end": environment.load_average(),
    }
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [
        "# What the front door costs a served request at concurrency 1",
        "",
        f"- Run: {results['started']} UTC on {env['machine']}, `{artifacts}`, {args.rounds} rounds of {args.requests} prompts, "
        f"each generated in-process and sent over gRPC to a server behind the front door and to one without it (order "
        f"rotating by one every request); load average at start {env['load_average_start']}, at end {results['load_average_end']}",
        "- A round's figure is the median over its requests of each served request against its in-process twin.",
        "",
        "| server | served / in-process (median of rounds, 10-90%) | ms over in-process per round |",
        "|---|---|---|",
    ]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['median']:.3f}x ({r['spread'][0]:.3f}-{r['spread'][1]:.3f}x) | "
                     + ", ".join(f"{v:.1f}" for v in diffs[name]) + " |")
    lines += [
        "",
        f"Front door minus direct, per round: {difference['median']:.1f} ms median (10-90%: {difference['spread'][0]:.1f} to "
        f"{difference['spread'][1]:.1f} ms).",
        "",
        "CPU ms per request of each process of the front-door server (over all rounds; /proc ticks are 10 ms, so a figure "
        "is good to about 10 ms / requests):",
        "",
    ] + [f"- {role}: {ms:.2f}" for role, ms in cpu_ms.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
