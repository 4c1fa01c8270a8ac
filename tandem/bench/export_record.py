"""An end-to-end record of one large export: ``tandem export`` run as a user runs it (its own
process, so its peak resident memory is its own), then a Triton repository of it served by a live
tritonserver, with wall time, peak RSS and file sizes written as JSON + markdown.

    python -m tandem.bench.export_record --config medium --work /scratch/medium --results benchmarks/results/export-medium

The slow test (tests/test_external_data.py, TANDEM_SLOW_TESTS=1) runs the same function."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from tandem.config import load_config
from tandem.memory import export_memory_estimate, gib

PROMPTS = ["a red circle above a blue square", "two green triangles"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_measured(command: list[str], interval_s: float = 0.5) -> dict:
    """Run ``command`` and sample its resident memory; the kernel's own peak (ru_maxrss of the
    waited-for child) is the figure reported, the samples show its shape over time."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(process.pid)
    samples: list[tuple[float, int]] = []
    while process.poll() is None:
        try:
            samples.append((round(time.monotonic() - start, 1), watched.memory_info().rss))
        except psutil.Error:
            pass
        time.sleep(interval_s)
    output = process.stdout.read() if process.stdout else ""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # largest child so far, KiB -> bytes
    sampled_peak = max((rss for _, rss in samples), default=0)
    return {
        "returncode": process.returncode,
        "wall_s": round(time.monotonic() - start, 1),
        "peak_rss_bytes": max(peak, sampled_peak),
        "sampled_peak_rss_bytes": sampled_peak,
        "rss_samples": samples[:: max(1, len(samples) // 200)],
        "output_tail": output[-4000:],
    }


def file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}


def record_export(config_name: str, work: Path, results: Path | None = None) -> dict:
    from tandem.formats.export_manifest import read_manifest
    from tandem.pipeline import Pipeline
    from tandem.runtimes.onnxruntime import OnnxRuntime
    from tandem.serving.client import generate_remote
    from tandem.serving.repository import write_repository
    from tandem.serving.server import TritonServer

    config = load_config(config_name)
    estimate = export_memory_estimate(config)
    artifacts = work / "export"
    export = run_measured([sys.executable, "-m", "tandem", "export", "--config", config_name, "--out", str(artifacts)])
    record: dict = {
        "config": config.name,
        "dtype": "fp32",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_total_bytes": psutil.virtual_memory().total,
            "note": "shared with other jobs (2 cores, several helpers at once): wall times are noisy",
        },
        "estimate": estimate.as_dict(),
        "export": {k: v for k, v in export.items() if k != "output_tail"},
    }
    if export["returncode"] != 0:
        record["export"]["output_tail"] = export["output_tail"]
        return _write(record, results)
    manifest = read_manifest(artifacts)
    weight_bytes = estimate.weight_bytes
    record["export"].update(
        files=file_sizes(artifacts),
        peak_over_weights=round(export["peak_rss_bytes"] / weight_bytes, 2),
        passed=manifest.passed,
        graphs={
            name: {
                "external_data": e.external_data,
                "optimized_external_data": e.optimized_external_data,
                "max_abs_error": max(err.max_abs for case in e.validation for err in case.outputs.values()),
                "onnxruntime_max_abs_error": max(
                    (err.max_abs for case in e.optimized_validation for err in case.outputs.values()), default=0.0
                ),
                "passed": e.passed,
            }
            for name, e in manifest.graphs.items()
        },
        generation_checks=[g.model_dump() for g in manifest.generation_checks],
    )
    # In-process tokens first (then freed), so the server's sessions are the only copy while serving.
    start = time.monotonic()
    pipeline = Pipeline(OnnxRuntime(artifacts))
    expected = [pipeline.generate(p, seed=i, temperature=0.8) for i, p in enumerate(PROMPTS)]
    del pipeline
    repository = write_repository(artifacts, work / "model_repository")
    served = []
    with TritonServer(repository, startup_timeout=900) as server:
        ready_s = time.monotonic() - start
        for i, prompt in enumerate(PROMPTS):
            tokens, image = generate_remote(server.http_url, prompt, i, 0.8, 0)
            served.append(bool(np.array_equal(tokens, expected[i].tokens) and np.array_equal(image, expected[i].image)))
        server_rss = sum(p.memory_info().rss for p in psutil.Process(server.process.pid).children(recursive=True))
    record["serve"] = {
        "repository_files": {str(p.relative_to(repository)): p.stat().st_size for p in sorted(repository.rglob("*.onnx*"))},
        "prompts": PROMPTS,
        "served_equals_in_process": served,
        "server_ready_s": round(ready_s, 1),
        "server_backends_rss_bytes": server_rss,
        "passed": all(served),
    }
    return _write(record, results)


def _write(record: dict, results: Path | None) -> dict:
    if results is None:
        return record
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / "README.md").write_text(markdown(record))
    return record


def markdown(record: dict) -> str:
    e, est = record["export"], record["estimate"]
    lines = [
        f"# Export of the `{record['config']}` config, end to end ({record['dtype']})",
        "",
        f"Machine: {record['machine']['platform']}, {record['machine']['cpus']} cores, "
        f"{gib(record['machine']['memory_total_bytes'])} RAM; {record['machine']['note']}.",
        "",
        f"- parameters: {est['parameters'] / 1e9:.3f}B, weights {gib(est['weight_bytes'])} ({record['dtype']})",
        f"- pre-flight estimate of the peak: {gib(est['peak_bytes'])}",
        f"- `tandem export`: exit {e['returncode']}, wall {e['wall_s']:.0f} s, peak RSS {gib(e['peak_rss_bytes'])}"
        + (f" ({e['peak_over_weights']}x the weights)" if "peak_over_weights" in e else ""),
    ]
    if "files" in e:
        lines += ["", "| file | size |", "|---|---|"]
        lines += [f"| {name} | {size / 1e6:,.1f} MB |" for name, size in e["files"].items()]
        lines += ["", "| graph | max abs err vs PyTorch (plain / onnxruntime) | passed |", "|---|---|---|"]
        lines += [
            f"| {n} | {g['max_abs_error']:.2e} / {g['onnxruntime_max_abs_error']:.2e} | {g['passed']} |" for n, g in e["graphs"].items()
        ]
        lines += [
            "",
            "Greedy generations vs PyTorch: "
            + ", ".join(f"{g['variant']} batch {len(g['prompts'])}: {g['mismatched_tokens']} tokens differ" for g in e["generation_checks"]),
        ]
    if "serve" in record:
        s = record["serve"]
        lines += [
            "",
            f"Served by tritonserver from a repository of the export (external data shipped): ready after "
            f"{s['server_ready_s']:.0f} s; sampled generations equal to in-process ONNX Runtime: {s['served_equals_in_process']}; "
            f"python backends' RSS {gib(s['server_backends_rss_bytes'])}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--work", required=True, help="folder for the export and its repository")
    parser.add_argument("--results", help="folder for results.json and README.md")
    args = parser.parse_args()
    record = record_export(args.config, Path(args.work), Path(args.results) if args.results else None)
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=2)[:6000])
    return 0 if record.get("serve", {}).get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
