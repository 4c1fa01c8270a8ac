"""``tandem bench``: run every measurement, then write results.json, report.md and plots/ into
``benchmarks/results/<machine>-<date>/`` in one atomic directory swap."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from tandem.bench import environment, hardware, notes, plots, ratios, report, roofline, stagebench
from tandem.bench.rounds import RoundsBudget
from tandem.bench.served import ServedSettings, run_served
from tandem.bench.split import SplitSettings, run_split
from tandem.bench.targets import evaluate_targets, reported_figures
from tandem.bench.timing import Budget
from tandem.config import ModelConfig, load_config
from tandem.formats.build_manifest import BUILD_MANIFEST
from tandem.errors import ArtifactError, TandemError
from tandem.util import atomic_directory

log = logging.getLogger(__name__)

RESULTS_ROOT = Path("benchmarks") / "results"
SCHEMA = "tandem-bench/1"
GRAPHS = ("reasoning_prefill", "reasoning_decode", "refinement")


@dataclass(frozen=True)
class Budgets:
    batch1: Budget
    batched: Budget
    positions: Budget
    recompute: Budget
    pipeline: Budget
    peak: Budget
    gemm_sizes: tuple[int, ...]
    copy_mib: int
    pipeline_batches: dict[str, tuple[int, ...]]
    settle_seconds: float

    @classmethod
    def full(cls) -> "Budgets":
        return cls(
            batch1=Budget(warmup=10, iterations=300, min_iterations=30, max_seconds=6.0),
            batched=Budget(warmup=3, iterations=100, min_iterations=10, max_seconds=4.0),
            positions=Budget(warmup=5, iterations=150, min_iterations=30, max_seconds=2.0),
            recompute=Budget(warmup=2, iterations=20, min_iterations=3, max_seconds=1.0),
            pipeline=Budget(warmup=1, iterations=5, min_iterations=3, max_seconds=15.0),
            peak=Budget(warmup=2, iterations=15, min_iterations=5, max_seconds=2.0),
            gemm_sizes=roofline.GEMM_SIZES,
            copy_mib=256,
            pipeline_batches={"onnxruntime": (1, 8), "torch": (1,), "onnxruntime_basic": (), "onnxruntime_int8": (1,)},
            settle_seconds=0.5,
        )

    @classmethod
    def quick(cls) -> "Budgets":
        return cls(
            batch1=Budget(warmup=2, iterations=10, min_iterations=3, max_seconds=0.3),
            batched=Budget(warmup=1, iterations=3, min_iterations=2, max_seconds=0.3),
            positions=Budget(warmup=1, iterations=5, min_iterations=2, max_seconds=0.2),
            recompute=Budget(warmup=1, iterations=2, min_iterations=1, max_seconds=0.2),
            pipeline=Budget(warmup=1, iterations=1, min_iterations=1, max_seconds=1.0),
            peak=Budget(warmup=1, iterations=3, min_iterations=2, max_seconds=0.3),
            gemm_sizes=(256, 512),
            copy_mib=32,
            pipeline_batches={"onnxruntime": (1,), "torch": (1,), "onnxruntime_basic": (), "onnxruntime_int8": (1,)},
            settle_seconds=0.05,
        )


@dataclass
class BenchOptions:
    config: str = "configs/models/small.yaml"
    artifacts: Path | None = None  # default build/<config name>; exported there when missing or stale
    out: Path | None = None  # default benchmarks/results/<machine>-<date>[-<config>]; quick: build/bench-...-quick
    quick: bool = False
    skip_served: bool = False
    hardware_file: Path | None = None
    runtimes: list[str] | None = None  # default: every runtime tandem knows
    compiled: list[Path] | None = None  # `tandem build` output directories for the compiled runtimes
    batches: tuple[int, ...] = (1, 2, 4, 8)
    served: ServedSettings = field(default_factory=ServedSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    progress: bool = True
    force: bool = False  # replace --out even if it holds files tandem bench did not write
    sections: tuple[str, ...] | None = None  # default: default_sections(config)


REPORT_FILES = ("results.json", "report.md", "plots")

# `standard`: every section the small bench runs (per stage, positions, generations, roofline, the
# ratio rounds, Jacobi, served, split, modelled hardware); `decode-step`: the decode step per runtime
# against its routed-bytes roofline, with the dense figure and the host share (tandem.bench.decode_step).
SECTIONS = ("standard", "decode-step")
# A config whose fp32 weights pass this gets only the decode-step section by default: every runtime
# of the standard sections holds its own copy of the weights (medium: 3.2 GB each, six runtimes and a
# served ensemble), its per-stage tables and served sweeps would take hours on a small CPU, and the
# point of such a config here is the memory-bound decode step.
DECODE_STEP_ONLY_ABOVE_BYTES = 1 << 30
SKIPPED_REASON = (
    "skipped for this config by default (its fp32 weights are {gib:.1f} GiB, above {limit:.0f} GiB): every runtime of the "
    "standard sections holds its own copy of the weights, and the per-stage tables, served sweeps, split path and "
    "Jacobi rounds would take hours here; the decode step is what a config that does not fit the CPU's caches "
    "measures. `--section standard,decode-step` runs them all"
)


def weight_bytes(config: ModelConfig) -> int:
    from tandem.memory import parameter_count

    return 4 * parameter_count(config)


def default_sections(config: ModelConfig) -> tuple[str, ...]:
    return ("decode-step",) if weight_bytes(config) > DECODE_STEP_ONLY_ABOVE_BYTES else ("standard",)


def check_report_out(out: Path, force: bool = False) -> None:
    """A report replaces its folder as a whole, so the folder must be absent, empty or an earlier
    report holding nothing but a report's files (plots/ only PNGs); anything else is kept unless
    ``force``."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise TandemError(f"{out} exists and is not a folder; choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
    if (out / "plots").is_dir():
        foreign += sorted(f"plots/{p.name}" for p in (out / "plots").iterdir() if p.suffix != ".png" or not p.is_file())
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TandemError(
            f"{out} holds files tandem bench did not write ({shown}); writing the report replaces the folder and would "
            "delete them. Choose another --out, or pass --force to replace it"
        )


@dataclass
class BenchResult:
    out: Path
    results: dict


def weights_label(config: ModelConfig) -> str:
    from tandem.util import sha256_file

    return f"checkpoint:{sha256_file(Path(config.checkpoint))}" if config.checkpoint else f"seed:{config.seed}"


def ensure_artifacts(config: ModelConfig, artifacts: Path | None, progress: bool) -> Path:
    """An export of ``config`` that passed validation: the given directory, or build/<name>, exported
    (with progress) when the default directory is missing or was built from another config/weights."""
    from tandem.formats.export_manifest import read_manifest

    explicit = artifacts is not None
    directory = Path(artifacts) if explicit else Path("build") / config.name
    reason = None
    if not (directory / "manifest.json").exists():
        reason = "no export there yet"
    else:
        manifest = read_manifest(directory)
        if manifest.config_fingerprint != config.fingerprint():
            reason = f"it was exported from another config (fingerprint {manifest.config_fingerprint})"
        elif manifest.weights != weights_label(config):
            reason = f"it holds other weights ({manifest.weights})"
        elif not manifest.passed:
            reason = "its export failed validation"
    if reason is None:
        return directory
    if explicit and (directory / "manifest.json").exists():
        raise ArtifactError(
            f"{directory} cannot be benchmarked for config {config.name}: {reason}; "
            f"run `tandem export --config <config> --out {directory}` or drop --artifacts"
        )
    from tandem.export.onnx_export import export_model

    log.info("exporting %s to %s (%s)", config.name, directory, reason)
    export_model(config, directory, progress=progress)
    return directory


def discover_compiled(config: ModelConfig, root: Path = Path("build")) -> list[Path]:
    """`tandem build` output directories under build/ built from this very config."""
    found = []
    for manifest in sorted(root.glob(f"*/{BUILD_MANIFEST}")):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("config_fingerprint") == config.fingerprint():
            found.append(manifest.parent)
    return found


class _Phase:
    """A tqdm bar over the cells of one measurement phase; ``tick(label)`` starts the next cell."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, unit="cell", disable=not enabled, leave=True)
        self.started = False

    def tick(self, label: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(label)

    def close(self) -> None:
        if self.started:
            self.bar.update()
        self.bar.close()


@contextlib.contextmanager
def phase(total: int, desc: str, enabled: bool) -> Iterator[_Phase]:
    p = _Phase(total, desc, enabled)
    try:
        yield p
    finally:
        p.close()


QUICK_ROOT = Path("build")  # a quick (smoke) run is never a committed result: build/bench-..., untracked


def default_out(env: dict, config: ModelConfig, quick: bool) -> Path:
    """A full run's report folder is benchmarks/results/<machine>-<date>[-<config>] (the committed
    results); a --quick run's is build/bench-<machine>-<date>[-<config>]-quick (untracked), unless --out."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    name = f"{env['machine']}-{date}"
    if config.name != "small":
        name += f"-{config.name}"
    if quick:
        return QUICK_ROOT / f"bench-{name}-quick"
    return RESULTS_ROOT / name


def run_benchmark(opts: BenchOptions) -> BenchResult:
    started = time.monotonic()
    config = load_config(opts.config)
    hw = hardware.load_hardware(opts.hardware_file)
    budgets = Budgets.quick() if opts.quick else Budgets.full()
    for b in opts.batches:
        if not 1 <= b <= 8:
            raise TandemError(f"batch size {b} is outside the exported graphs' range [1, 8]")
    sections = tuple(opts.sections) if opts.sections else default_sections(config)
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown or not sections:
        raise TandemError(f"--section must name some of {','.join(SECTIONS)}, got {','.join(unknown) or 'none'}")
    env = environment.collect()
    out = Path(opts.out) if opts.out else default_out(env, config, opts.quick)
    check_report_out(out, opts.force)  # before minutes of exporting and measuring, not after
    artifacts = ensure_artifacts(config, opts.artifacts, opts.progress)
    stagebench.set_settle_seconds(budgets.settle_seconds)
    own_cpu = environment.OwnCpuMeter().start()  # this run's processes, tritonserver's stubs included
    cpu_start = environment.cpu_snapshot(0.0)
    results: dict = {
        "schema": SCHEMA,
        "quick": opts.quick,
        "sections": list(sections),
        "started_utc": env["started_utc"],
        "environment": env,
        "artifacts": str(artifacts),
        "budgets": {
            **{k: v.as_dict() for k, v in vars(budgets).items() if isinstance(v, Budget)},
            "settle_seconds": budgets.settle_seconds,
            "gemm_sizes": list(budgets.gemm_sizes),
            "copy_mib": budgets.copy_mib,
        },
    }
    from tandem.formats.export_manifest import read_manifest

    manifest = read_manifest(artifacts)
    config = manifest.config  # the exact config the graphs were built from (checkpoint path resolved)
    results["config"] = {
        "name": config.name,
        "fingerprint": manifest.config_fingerprint,
        "weights": manifest.weights,
        "max_len": config.max_len,
        "scene_tokens": config.scene.num_tokens,
        "image": f"{config.image_height}x{config.image_width}",
        "model": config.model_dump(mode="json"),
    }

    compiled = opts.compiled if opts.compiled is not None else discover_compiled(config)
    if "standard" not in sections:
        return _decode_step_only(opts, results, artifacts, config, compiled, out, started, own_cpu, cpu_start, env)
    runtimes, unavailable = stagebench.build_runtimes(artifacts, config, opts.runtimes, compiled)
    if not runtimes:
        raise TandemError(f"no runtime could be built here: {unavailable}")
    results["precision"] = {
        name: rt.precision_report for name, rt in runtimes.items() if getattr(rt, "precision_report", None)
    }  # the gate's figures for every runtime over precision graphs (token agreement, accuracy)
    results["runtimes"] = {
        "measured": {name: rt.describe() for name, rt in runtimes.items()},
        "sources": {name: getattr(rt, "bench_source", str(artifacts)) for name, rt in runtimes.items()},
        "compiled_dirs": [str(d) for d in compiled],
        "unavailable": unavailable,
    }
    specs = {name: runtimes[next(iter(runtimes))].specs[name] for name in GRAPHS}

    timings: dict[str, float] = {}
    results["phase_seconds"] = timings

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            timings[name] = round(time.monotonic() - t0, 2)

    # 1. per stage, per runtime
    batches = list(opts.batches)
    with timed("stages"), phase(len(runtimes) * len(specs) * len(batches), "stages", opts.progress) as p:
        results["stages"] = stagebench.bench_graphs(runtimes, specs, batches, budgets.batch1, budgets.batched, p.tick)
    positions = stagebench.decode_positions(config.max_len)
    has_torch = "torch" in runtimes
    cells = len(runtimes) * len(positions) + has_torch * len(positions)
    with timed("decode_positions"), phase(cells, "decode vs position", opts.progress) as p:
        results["decode_positions"] = stagebench.bench_decode_positions(
            runtimes, specs["reasoning_decode"], positions, budgets.positions, p.tick
        )
        results["recompute_positions"] = (
            stagebench.bench_recompute_positions(runtimes["torch"], positions, budgets.recompute, p.tick) if has_torch else {}
        )
    pipeline_cells = [(rt, b) for rt in runtimes for b in budgets.pipeline_batches.get(rt, (1,))]
    results["pipeline"] = {}
    with timed("pipeline"), phase(len(pipeline_cells), "in-process generations", opts.progress) as p:
        for rt, b in pipeline_cells:
            p.tick(f"{rt} batch {b}")
            try:
                stats = stagebench.bench_pipeline(runtimes[rt], b, budgets.pipeline)
            except TandemError as exc:
                stats = {"batch": b, "error": str(exc)}
            results["pipeline"].setdefault(rt, {})[str(b)] = stats

    # 3. roofline
    stages = reference_stages(runtimes)
    with timed("roofline"):
        results["roofline"] = measure_roofline(results, runtimes, specs, batches, budgets, opts.progress, stages)

    # 3b. every in-process ratio a target is judged on, in interleaved rounds; decode steps replayed
    # from real held-out generations
    with timed("ratios"):
        stagebench.settle()
        ratio_budgets = ratios.RatioBudgets.quick() if opts.quick else ratios.RatioBudgets.full()
        with phase(7, "ratio rounds", opts.progress) as p:
            measured = ratios.measure(runtimes, specs, stages, results["roofline"], config, ratio_budgets, p.tick)
        results["budgets"]["ratios"] = measured["budgets"]
        results["rounds"], results["ratios"], results["replay"] = measured["rounds"], measured["ratios"], measured["replay"]

    # 3c. greedy parallel (Jacobi) decoding vs sequential, the same captions, interleaved rounds
    if "onnxruntime" in runtimes:
        with timed("parallel_decoding"):
            from tandem.bench import parallel_decoding

            budget = RoundsBudget(rounds=2, min_rounds=1, max_seconds=10.0) if opts.quick else RoundsBudget(rounds=6, min_rounds=4, max_seconds=40.0)
            with phase(budget.rounds + budget.warmup_rounds, "parallel decoding rounds", opts.progress) as p:
                results["parallel_decoding"] = parallel_decoding.measure(runtimes["onnxruntime"], budget, lambda i: p.tick(f"round {i + 1}"))

    # 4. cross-hardware (modelled; no measurement)
    results["cross_hardware"] = cross_hardware(results, hw, config, opts.hardware_file)

    # 2. served (last: the in-process runtimes are released first so the server has the cores)
    del runtimes, stages
    if "decode-step" in sections:
        with timed("decode_step"):
            results["decode_step"] = _measure_decode_step(opts, artifacts, config, compiled)
    with timed("served"):
        if opts.skip_served:
            results["served"] = {"status": "not run: --skip-served"}
        else:
            try:
                results["served"] = run_served(artifacts, opts.served, lambda **kw: tqdm(disable=not opts.progress, **kw))
            except TandemError as exc:
                results["served"] = {"status": "failed", "reason": str(exc)}
            except Exception as exc:  # keep the in-process figures of a long run; the report says what broke
                log.exception("served benchmark failed")
                results["served"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    add_served_rows(results, hw)
    with timed("split"):  # issue 13: the split path (5 servers) and the capacity model it feeds (simulated)
        if opts.skip_served:
            results["split"] = {"status": "not run: --skip-served"}
        else:
            try:
                results["split"] = run_split(artifacts, opts.split, hw)
            except TandemError as exc:
                results["split"] = {"status": "failed", "reason": str(exc)}
            except Exception as exc:
                log.exception("split benchmark failed")
                results["split"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}

    results["targets"] = [t.as_dict() for t in evaluate_targets(results)]
    results["figures"] = reported_figures(results)
    results["notes"] = notes.explain(results)
    results["eval"] = read_eval(config.name)
    results["load_average_end"] = environment.load_average()
    results["interference"] = environment.interference(
        cpu_start, environment.cpu_snapshot(own_cpu.stop()), env["cpu_cores_usable"]
    )
    results["duration_s"] = time.monotonic() - started

    check_report_out(out, opts.force)  # again: the run took minutes, and the folder may have changed
    write_report(results, out)
    return BenchResult(out=out, results=results)


def _measure_decode_step(opts: BenchOptions, artifacts: Path, config: ModelConfig, compiled: list[Path]) -> dict:
    from tandem.bench import decode_step

    budgets = decode_step.DecodeStepBudgets.quick() if opts.quick else decode_step.DecodeStepBudgets.full()
    with phase(6, "decode step", opts.progress) as p:
        try:
            return decode_step.measure(artifacts, config, compiled, budgets, p.tick, opts.runtimes)
        except TandemError as exc:
            return {"error": str(exc), "budgets": budgets.as_dict()}


def _decode_step_only(opts: BenchOptions, results: dict, artifacts: Path, config: ModelConfig, compiled: list[Path],
                      out: Path, started: float, own_cpu, cpu_start, env: dict) -> BenchResult:
    """The decode-step section alone (the default for configs past DECODE_STEP_ONLY_ABOVE_BYTES)."""
    size = weight_bytes(config)
    results["skipped"] = {
        "standard": SKIPPED_REASON.format(gib=size / 2**30, limit=DECODE_STEP_ONLY_ABOVE_BYTES / 2**30)
        if size > DECODE_STEP_ONLY_ABOVE_BYTES else "not among the sections asked for (--section)"
    }
    t0 = time.monotonic()
    results["decode_step"] = _measure_decode_step(opts, artifacts, config, compiled)
    results["phase_seconds"] = {"decode_step": round(time.monotonic() - t0, 2)}
    section = results["decode_step"]
    results["runtimes"] = {
        "measured": {rt: section.get("descriptions", {}).get(rt, rt) for rt in section.get("measured", [])},
        "sources": {rt: section.get("cpu_aot_build") if rt == "torch_aot" else str(artifacts) for rt in section.get("measured", [])},
        "compiled_dirs": [str(d) for d in compiled],
        "unavailable": dict(section.get("unavailable", {})),
    }
    results["targets"] = [t.as_dict() for t in evaluate_targets(results)]
    results["figures"] = []
    results["notes"] = []
    results["load_average_end"] = environment.load_average()
    results["interference"] = environment.interference(
        cpu_start, environment.cpu_snapshot(own_cpu.stop()), env["cpu_cores_usable"]
    )
    results["duration_s"] = time.monotonic() - started
    check_report_out(out, opts.force)
    write_report(results, out)
    return BenchResult(out=out, results=results)


def write_report(results: dict, out: Path) -> None:
    """results.json, report.md and plots/ into ``out``, swapped in complete. If rendering fails the
    raw figures are still kept (results.json) and the error is raised after the swap."""
    failure = None
    with atomic_directory(out) as staging:
        (staging / "plots").mkdir()
        results["plots"] = plots.draw_all(results, staging / "plots")
        try:
            text = report.render(results)
        except Exception as exc:  # keep a finished run's numbers even if the report has a bug
            log.exception("rendering report.md failed")
            failure = exc
            text = f"# report rendering failed\n\n{type(exc).__name__}: {exc}\n\nThe raw figures are in results.json.\n"
        (staging / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
        (staging / "report.md").write_text(text)
    if failure is not None:
        raise TandemError(f"report.md could not be rendered ({failure}); results.json in {out} holds the figures")


def rerender(directory: Path) -> Path:
    """Redraw report.md and plots/ of an existing run from its results.json (no measurement)."""
    path = Path(directory) / "results.json"
    if not path.exists():
        raise TandemError(f"{path} does not exist; give the folder of a previous `tandem bench` run")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TandemError(f"{path} is not valid JSON ({exc})") from exc
    if results.get("schema") != SCHEMA:
        raise TandemError(f"{path} was written by another benchmark format ({results.get('schema')!r}, expected {SCHEMA!r})")
    check_report_out(Path(directory))
    write_report(results, Path(directory))
    return Path(directory)


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def reference_stages(runtimes: dict):
    """The PyTorch reference of the measured config (the torch runtime's, else built once)."""
    stages = getattr(runtimes.get("torch"), "stages", None)
    if stages is None:
        from tandem.models import build_stages

        stages = build_stages(next(iter(runtimes.values())).config)
    return stages


def measure_roofline(results: dict, runtimes: dict, specs: dict, batches: list[int], budgets: Budgets, progress: bool, stages=None) -> dict:
    stages = stages if stages is not None else reference_stages(runtimes)
    stagebench.settle()
    with phase(2 + len(specs) * len(batches), "roofline", progress) as p:
        p.tick("matmul peak")
        matmul = roofline.measure_matmul_peak(budgets.peak, budgets.gemm_sizes)
        p.tick("memory bandwidth")
        memory = roofline.measure_memory_bandwidth(budgets.peak, budgets.copy_mib)
        work: dict = {}
        for graph, spec in specs.items():
            for b in batches:
                p.tick(f"count {graph} batch {b}")
                work.setdefault(graph, {})[str(b)] = roofline.count_graph_work(stages, spec, b)
    peak, bw = matmul["peak_gflops"], memory["bandwidth_gb_s"]
    measured: dict = {}
    best = best_variant = None
    for rt, graphs in results["stages"].items():
        for graph, data in graphs.items():
            for b, stats in data["batches"].items():
                if "p50_ms" not in stats:
                    continue
                graph_work = work[graph][b]
                weight_bytes = getattr(runtimes.get(rt), "bytes_per_weight", {}).get(graph)
                if weight_bytes is not None:  # a quantized graph moves fewer weight bytes per call
                    graph_work = roofline.work_with_weights_at(graph_work, weight_bytes)
                point = roofline.analyse(graph_work, stats["p50_ms"] / 1e3, peak, bw)
                measured.setdefault(rt, {}).setdefault(graph, {})[b] = point
                # The target is judged on what tandem ships; the BASIC-at-load variant is reported beside it.
                shipped = rt not in stagebench.VARIANTS
                if graph == "refinement" and shipped and (
                    best is None or point["fraction_of_matmul_peak"] > best["fraction_of_matmul_peak"]
                ):
                    best = {**point, "runtime": rt, "batch": int(b), "peak_gflops": peak}
                if graph == "refinement" and not shipped and (
                    best_variant is None or point["fraction_of_matmul_peak"] > best_variant["fraction_of_matmul_peak"]
                ):
                    best_variant = {**point, "runtime": rt, "batch": int(b), "peak_gflops": peak}
    return {
        "machine": {"matmul": matmul, "memory": memory},
        "work": work,
        "measured": measured,
        "refinement_best": best,
        "refinement_best_variant": best_variant,
    }


def host_seconds_per_step(results: dict) -> dict[int, float]:
    """This run's host time per decode step of an in-process ONNX Runtime generation, per batch:
    (wall time - time inside runtime calls) / decode calls. The step's bookkeeping (sampling
    inputs, positions, each row's tokens) runs on the host for every target, so the modelled rows
    add it to every decode step."""
    out = {}
    for b, stats in (results.get("pipeline", {}).get("onnxruntime") or {}).items():
        phases, calls = stats.get("phase_ms_per_generation") or {}, stats.get("graph_calls_per_generation") or {}
        steps = calls.get("reasoning_decode")
        if stats.get("p50_ms") and phases and steps:
            out[int(b)] = max(0.0, (stats["p50_ms"] - sum(phases.values())) / steps / 1e3)
    return out


def cross_hardware(results: dict, hw: hardware.HardwareConfig, config: ModelConfig, hardware_file: Path | None) -> dict:
    decode_steps = config.scene.num_tokens - 1  # the last scene token needs no decode step after it
    rows = []
    machine_price = hw.measured_machine
    for rt, per_batch in results.get("pipeline", {}).items():
        for b, stats in sorted(per_batch.items(), key=lambda kv: int(kv[0])):
            if "images_per_s" not in stats:
                continue
            per_image = 1.0 / stats["images_per_s"]
            decode = results["stages"].get(rt, {}).get("reasoning_decode", {}).get("batches", {}).get(b, {})
            rows.append(
                {
                    "kind": "measured",
                    "hardware": "this-machine",
                    "name": f"this machine ({results['environment']['cpu_model']}), {rt} in-process",
                    "precision": "fp32",
                    "batch": int(b),
                    "decode_ms_per_token": decode["p50_ms"] / int(b) if "p50_ms" in decode else None,
                    "seconds_per_image": per_image,
                    "images_per_s": stats["images_per_s"],
                    "costs": _machine_cost(per_image, machine_price),
                }
            )
    rows += hardware.modelled_rows(hw, results["roofline"]["work"], decode_steps, config.reasoning.n_experts, host_seconds_per_step(results))
    prices = [
        f"{name}: ${inst.usd_per_hour:.4g}/h for {inst.accelerators} x {inst.accelerator} = "
        f"${inst.usd_per_accelerator_hour:.4g} per accelerator-hour (as of {inst.as_of}; {inst.source})"
        + (f" - {inst.notes}" if inst.notes else "")
        for name, inst in hw.instances.items()
    ]
    if machine_price:
        prices.append(
            f"measured rows: {machine_price.instance} at ${machine_price.usd_per_hour:.4g}/h "
            f"(as of {machine_price.as_of}; {machine_price.source})"
        )
    return {
        "hardware_file": str(hardware_file) if hardware_file else "configs/hardware.yaml",
        "precision": hw.model.precision,
        "decode_steps": decode_steps,
        "rows": rows,
        "prices": prices,
        "accelerators": {k: v.model_dump() for k, v in hw.accelerators.items()},
    }


def _machine_cost(per_image: float, machine_price) -> list[dict]:
    if machine_price is None:
        return []
    return [
        {
            "instance": machine_price.instance.split(" ")[0],
            "usd_per_accelerator_hour": machine_price.usd_per_hour,
            "usd_per_1000_images": hardware.cost_per_1000_images(per_image, machine_price.usd_per_hour),
            "price_as_of": machine_price.as_of,
            "price_source": machine_price.source,
        }
    ]


def add_served_rows(results: dict, hw: hardware.HardwareConfig) -> None:
    served = results.get("served", {})
    if served.get("status") != "ok":
        return
    best = None
    for protocol, levels in served["protocols"].items():
        for conc, level in levels.items():
            if level["failed"] == 0 and (best is None or level["images_per_s"] > best[2]["images_per_s"]):
                best = (protocol, conc, level)
    if best is None:
        return
    protocol, conc, level = best
    per_image = 1.0 / level["images_per_s"]
    results["cross_hardware"]["rows"].insert(
        0,
        {
            "kind": "measured",
            "hardware": "this-machine",
            "name": f"this machine, served ensemble ({protocol}, best concurrency {conc})",
            "precision": "fp32",
            "batch": int(conc),
            "decode_ms_per_token": None,
            "seconds_per_image": per_image,
            "images_per_s": level["images_per_s"],
            "costs": _machine_cost(per_image, hw.measured_machine),
        },
    )


def read_eval(config_name: str) -> dict | None:
    """The compositional-accuracy results `tandem eval` writes, when they exist (not produced here)."""
    path = RESULTS_ROOT / f"eval-{config_name}.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"path": str(path), "summary": "unreadable"}
    summary = {k: v for k, v in data.items() if not isinstance(v, (list, dict))} if isinstance(data, dict) else {}
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict) and all(not isinstance(x, (list, dict)) for x in value.values()):
                summary[key] = value
    return {"path": str(path), "summary": json.dumps(summary, indent=1)[:3000]}
