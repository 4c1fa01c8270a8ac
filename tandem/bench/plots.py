"""PNG plots of a benchmark run (matplotlib, Agg backend: no display needed).

Each function takes the results dict and a target path and returns True when it drew something;
a plot whose data was not measured (e.g. served, with --skip-served) is not drawn at all rather
than drawn empty."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tandem.bench.present import save_figure  # noqa: E402

log = logging.getLogger(__name__)

GRAPHS = ("reasoning_prefill", "reasoning_decode", "refinement")
COLORS = {"torch": "#d62728", "onnxruntime": "#1f77b4", "onnxruntime_basic": "#17becf", "onnxruntime_dense": "#aec7e8",
          "torch_aot": "#9467bd"}


def _color(name: str, index: int) -> str:
    return COLORS.get(name, f"C{index + 2}")


def _title(results: dict) -> str:
    env = results["environment"]
    return f"{results['config']['name']} on {env['cpu_model']} ({env['cpu_cores_usable']} cores)"


def throughput_vs_batch(results: dict, path: Path) -> bool:
    stages = results.get("stages", {})
    if not stages:
        return False
    fig, axes = plt.subplots(1, len(GRAPHS), figsize=(14, 4))
    for ax, graph in zip(axes, GRAPHS):
        for i, (runtime, graphs) in enumerate(stages.items()):
            if graph not in graphs:
                continue
            batches = sorted((b for b, st in graphs[graph]["batches"].items() if "items_per_s" in st), key=int)
            ax.plot(
                [int(b) for b in batches],
                [graphs[graph]["batches"][b]["items_per_s"] for b in batches],
                marker="o",
                label=runtime,
                color=_color(runtime, i),
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("calls x batch / s" if graph != "refinement" else "images / s")
        ax.set_title(graph)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Throughput vs batch (measured) - {_title(results)}")
    save_figure(fig, path)
    return True


def decode_cost_vs_position(results: dict, path: Path) -> bool:
    positions = results.get("decode_positions", {})
    if not positions:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (runtime, per_pos) in enumerate(positions.items()):
        xs = sorted((x for x, st in per_pos.items() if "p50_ms" in st), key=int)
        ax.errorbar(
            [int(x) for x in xs],
            [per_pos[x]["p50_ms"] for x in xs],
            yerr=[[0] * len(xs), [per_pos[x]["p90_ms"] - per_pos[x]["p50_ms"] for x in xs]],
            marker="o",
            capsize=3,
            label=f"{runtime}: decode step, static KV cache (p50, bar to p90)",
            color=_color(runtime, i),
        )
    recompute = results.get("recompute_positions", {})
    if recompute:
        xs = sorted(recompute, key=int)
        ax.plot(
            [int(x) for x in xs],
            [recompute[x]["p50_ms"] for x in xs],
            linestyle="--",
            marker="x",
            color="gray",
            label="no cache: recompute the prefix (torch eager, reference)",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position of the new token")
    ax.set_ylabel("ms per token (batch 1)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Per-token decode cost vs position (measured)\n{_title(results)}", fontsize=10)
    save_figure(fig, path)
    return True


def runtime_comparison(results: dict, path: Path) -> bool:
    stages = results.get("stages", {})
    if not stages:
        return False
    runtimes = list(stages)
    fig, axes = plt.subplots(1, len(GRAPHS), figsize=(13, 4))
    for ax, graph in zip(axes, GRAPHS):
        values, errors, names, colors = [], [], [], []
        for i, runtime in enumerate(runtimes):
            stats = stages[runtime].get(graph, {}).get("batches", {}).get("1")
            if stats is None or "p50_ms" not in stats:
                continue
            names.append(runtime)
            values.append(stats["p50_ms"])
            errors.append(stats["p90_ms"] - stats["p50_ms"])
            colors.append(_color(runtime, i))
        bars = ax.bar(names, values, yerr=[[0] * len(errors), errors], capsize=4, color=colors)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("p50 latency, ms (bar to p90)")
        ax.set_title(f"{graph}, batch 1")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Runtime comparison (measured) - {_title(results)}")
    save_figure(fig, path)
    return True


def _scheduler_runs(served: dict) -> dict[str, dict]:
    """{scheduler: its entry}; a run from before schedulers were compared has one, unnamed."""
    return served.get("schedulers") or {"": {"protocols": served.get("protocols", {})}}


def latency_vs_concurrency(results: dict, path: Path) -> bool:
    served = results.get("served", {})
    if served.get("status") != "ok" or not served.get("protocols"):
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = {"p50_ms": "-", "p99_ms": ":"}
    markers = ["o", "s", "^", "D"]
    for j, (scheduler, entry) in enumerate(_scheduler_runs(served).items()):
        for i, (protocol, levels) in enumerate(entry["protocols"].items()):
            xs = sorted(levels, key=int)
            color, name = f"C{i + 2 * j}", f"{scheduler} {protocol}".strip()
            for key, style in styles.items():
                ys = [levels[x]["latency"].get(key) for x in xs]
                left.plot([int(x) for x in xs], ys, linestyle=style, marker=markers[j % 4], color=color, label=f"{name} {key[:-3]}")
            right.plot([int(x) for x in xs], [levels[x]["images_per_s"] for x in xs], marker=markers[j % 4], color=color, label=name)
    inproc = served.get("inprocess", {}).get("latency", {})
    if inproc.get("p50_ms"):
        left.axhline(inproc["p50_ms"], color="gray", linestyle="-.", label="in-process p50 (sequential)")
        right.axhline(served["inprocess"]["images_per_s"], color="gray", linestyle="-.", label="in-process (sequential)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
    _finish_pair(
        fig, path, "concurrent requests (closed loop)",
        ("request latency, ms", "latency vs concurrency (solid p50, dotted p99)"),
        ("images / s", "throughput vs concurrency"),
        f"Served ensemble through tritonserver (measured) - {_title(results)}",
    )
    return True


def _finish_pair(fig, path: Path, xlabel: str, left_labels: tuple[str, str], right_labels: tuple[str, str], title: str) -> None:
    """Label, grid and save a figure of two side-by-side panels: (y label, title) per panel."""
    for ax, (ylabel, panel_title) in zip(fig.axes, (left_labels, right_labels)):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def open_loop(results: dict, path: Path) -> bool:
    """Latency and time to first decode step against offered load (Poisson arrivals), one line
    per scheduler, the p99 budget and each scheduler's knee marked."""
    served = results.get("served", {})
    runs = {k: v for k, v in (served.get("schedulers") or {}).items() if v.get("open_loop")}
    if served.get("status") != "ok" or not runs:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    budget = None
    for j, (scheduler, entry) in enumerate(runs.items()):
        levels = entry["open_loop"]
        xs = sorted(levels, key=float)
        rates = [float(x) for x in xs]
        color = f"C{j}"
        for key, style in (("p50_ms", "-"), ("p99_ms", ":")):
            left.plot(rates, [levels[x]["latency"].get(key) for x in xs], linestyle=style, marker="o", color=color, label=f"{scheduler} {key[:-3]}")
        first = [(levels[x].get("first_step") or {}).get("p50_ms") for x in xs]
        right.plot(rates, [f if f is not None else float("nan") for f in first], marker="o", color=color, label=f"{scheduler} p50")
        knee = entry.get("open_loop_knee", {})
        budget = knee.get("budget_p99_ms", budget)
        if knee.get("rate_per_s"):
            left.axvline(knee["rate_per_s"], color=color, alpha=0.4, linestyle="--", label=f"{scheduler} knee {knee['rate_per_s']:.3g}/s")
    if budget:
        left.axhline(budget, color="gray", linestyle="-.", label=f"p99 budget {budget:.0f} ms")
    for ax in (left, right):
        ax.set_yscale("log")
    _finish_pair(
        fig, path, "offered load, requests/s (Poisson arrivals)",
        ("request latency, ms", "latency vs offered load (solid p50, dotted p99)"),
        ("ms (server-side)", "time from arrival to first decode step"),
        f"Open loop: in-flight vs request-level batching (measured) - {_title(results)}",
    )
    return True


def roofline(results: dict, path: Path) -> bool:
    roof = results.get("roofline", {})
    machine = roof.get("machine")
    if not machine or not roof.get("measured"):
        return False
    import numpy as np

    peak, bw = machine["matmul"]["peak_gflops"], machine["memory"]["bandwidth_gb_s"]
    xs = np.logspace(-2, 4, 200)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot(xs, np.minimum(peak, xs * bw), color="black", label=f"this machine: {peak:.0f} GFLOP/s, {bw:.1f} GB/s")
    markers = {"reasoning_prefill": "s", "reasoning_decode": "o", "refinement": "^"}
    for i, (runtime, graphs) in enumerate(roof["measured"].items()):
        for graph, per_batch in graphs.items():
            for batch, point in per_batch.items():
                ax.scatter(
                    point["intensity_flop_per_byte"],
                    point["achieved_gflops"],
                    marker=markers.get(graph, "o"),
                    color=_color(runtime, i),
                    s=20 + 6 * int(batch),
                    label=f"{runtime} {graph}" if batch == "1" else None,
                    alpha=0.8,
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity, FLOP / byte (compulsory traffic)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"Roofline (marker size grows with batch)\n{_title(results)}", fontsize=10)
    save_figure(fig, path)
    return True


def cross_hardware(results: dict, path: Path) -> bool:
    rows = results.get("cross_hardware", {}).get("rows", [])
    if not rows:
        return False
    labels, values, colors = [], [], []
    for row in rows:
        tag = "MODELLED" if row["kind"] == "modelled" else "measured"
        labels.append(f"{row['name']}\nbatch {row['batch']} [{tag}]")
        values.append(row["seconds_per_image"] * 1e3)
        colors.append("#bbbbbb" if row["kind"] == "modelled" else "#2ca02c")
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    bars = ax.barh(labels, values, color=colors)
    for bar, row in zip(bars, rows):
        if row["kind"] == "modelled":
            bar.set_hatch("//")
    ax.set_xscale("log")
    ax.set_xlabel("ms per image (log); modelled = roofline lower bound from published peaks")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.set_title(f"Cross-hardware: measured vs MODELLED\n{_title(results)}", fontsize=10)
    save_figure(fig, path)
    return True


def decode_step(results: dict, path: Path) -> bool:
    """The decode step of replayed generations per runtime and batch: the median step (bar, with
    the 10-90% spread of the rounds' medians) against the floors it is judged by, the routed
    experts' bytes and every expert's bytes at the copy bandwidth of the same rounds."""
    rows = results.get("decode_step", {}).get("rows", {})
    batches = sorted({b for per in rows.values() for b in per}, key=int)
    if not batches:
        return False
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 0.55 * len(rows) + 2.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        names = [name for name in rows if batch in rows[name]]
        figures = [rows[name][batch] for name in names]
        medians = [f["step_ms_median"] for f in figures]
        low = [max(0.0, m - f["step_ms_spread"][0]) for m, f in zip(medians, figures)]
        high = [max(0.0, f["step_ms_spread"][1] - m) for m, f in zip(medians, figures)]
        ax.barh(names, medians, xerr=[low, high], color=[_color(n, i) for i, n in enumerate(names)], alpha=0.85, capsize=3)
        for y, f in enumerate(figures):
            ax.plot([f["routed_floor_ms"]] * 2, [y - 0.42, y + 0.42], color="black", linewidth=2,
                    label="routed-bytes floor" if y == 0 else None)
            ax.plot([f["dense_floor_ms"]] * 2, [y - 0.42, y + 0.42], color="grey", linestyle="--", linewidth=1.5,
                    label="dense-bytes floor (every expert)" if y == 0 else None)
            share = f.get("of_routed_roofline", {}).get("median")
            if share is not None:
                ax.annotate(f"{share * 100:.0f}% of routed roofline", (max(f["step_ms_spread"][1], f["dense_floor_ms"]), y),
                            xytext=(6, 0), textcoords="offset points", fontsize=7, va="center")
        ax.set_xlim(0, 1.45 * max(max(f["step_ms_spread"][1], f["dense_floor_ms"]) for f in figures))
        ax.invert_yaxis()
        ax.set_xlabel("ms per replayed decode step (median of rounds; bars: 10-90% of rounds)")
        ax.set_title(f"batch {batch}")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Decode step vs its bytes floors (measured) - {_title(results)}")
    save_figure(fig, path)
    return True


PLOTS = {
    "throughput_vs_batch.png": throughput_vs_batch,
    "decode_cost_vs_position.png": decode_cost_vs_position,
    "runtime_comparison.png": runtime_comparison,
    "latency_vs_concurrency.png": latency_vs_concurrency,
    "open_loop.png": open_loop,
    "roofline.png": roofline,
    "decode_step.png": decode_step,
    "cross_hardware.png": cross_hardware,
    "split_capacity.png": lambda results, path: split_plot(results, path),
}


def split_plot(results: dict, path: Path) -> bool:
    from tandem.bench.split import plot

    return plot(results, path)


def draw_all(results: dict, directory: Path) -> dict[str, str]:
    """Draw every plot whose data exists; returns {file name: what it shows or why it is absent}."""
    drawn = {}
    for name, fn in PLOTS.items():
        try:
            drawn[name] = "drawn" if fn(results, directory / name) else "not drawn: no data for it in this run"
        except Exception as exc:  # a plotting bug must not throw away a finished run's numbers
            log.exception("plot %s failed", name)
            drawn[name] = f"failed: {type(exc).__name__}: {exc}"
            plt.close("all")
    return drawn
