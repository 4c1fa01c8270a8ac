"""Device check: the reasoning stage's decode step on one accelerator, in one bounded run.

    python benchmarks/device_check.py                      # CUDA: small and medium, within 8 minutes
    python benchmarks/device_check.py --device cpu --configs tiny --budget-s 90   # here (tests)

Needs only PyTorch (with CUDA for the GPU phases), numpy and this repository. For each config it
builds the reasoning stage on the device from the repository's config (and checkpoint, when the
config names one; seeded weights otherwise), with cuda-torch's decode-step form (the
``capturable_experts`` rewrite: routed experts at static shapes, no host synchronisation) and
measures, at batch 1 and 8:

- the decode step run four ways: ``eager`` (PyTorch), ``compiled`` (``torch.compile``, Inductor),
  ``graph`` (the eager step captured once as a ``torch.cuda.CUDAGraph`` and replayed) and
  ``compiled_graph`` (the compiled step captured). The captured step is the whole step: the decode
  graph with its in-graph sampling (per-row temperature, top-k and a uniform read from a device
  table by a device step counter), the new keys and values written into the static cache, the
  sampled token fed back as the next step's input and appended to a device history. Nothing crosses
  to the host until the generation's tokens are read at its end; on CUDA the replay loop runs under
  ``torch.cuda.set_sync_debug_mode("error")`` once, to show that no step synchronises.
- whole generations (prefill, eager, then every scene token), per path: ms per image and tokens/s.

Paths are timed in interleaved rounds (each round runs one whole generation per path, in turn), and
the report gives each path's median over rounds, the spread (min..max) and each path's ratio to eager
per round. Tokens of every path are compared with eager's (greedy rows must be identical; sampled
rows are reported). The roofline: the device's copy bandwidth (a large ``copy_`` timed), and the
bytes each step must read with routed experts (the distinct experts each layer's rows really picked,
counted from the eager generation's routing, the other weights, the static cache); the capturable
form's own traffic (it copies the picked experts' slabs before ``bmm``) is reported beside it.

Every phase prints progress as it starts and has a share of ``--budget-s``; a phase that would not
fit is skipped with the reason, and a watchdog writes the report and exits 1 if the whole run
overruns. Results: ``<out>/results.json`` and ``<out>/report.md`` (default
``benchmarks/results/device-<device name>-<date>/``). Exit 0 when every phase that ran passed, 1 when
one failed or a check did not hold, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PATHS = ("eager", "compiled", "graph", "compiled_graph")
EXPERT_STACKS = ("w_gate", "w_up", "w_down")
# Held-out captions (tandem.data.scenes' grammar, never trained on), short enough for every config.
PROMPTS = (
    "a red square below a red circle",
    "a blue square left of a yellow circle",
    "a green triangle",
    "a yellow square right of a green circle",
    "a red square right of a purple square",
    "a blue circle above a red triangle",
    "a purple triangle left of a red square",
    "a yellow circle below a green square",
)


# ----------------------------------------------------------------------------- config (stdlib only)
# tandem.config validates with pydantic, which a GPU machine with only torch and numpy lacks: this
# reads the same YAML files (their flat two-level subset) into the fields the reasoning stage uses,
# with tandem.config's defaults; tests/test_device_check.py checks it against tandem.config.


class _Section:
    def __init__(self, values: dict, defaults: dict, where: str):
        unknown = set(values) - set(defaults)
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        self.__dict__.update(defaults | values)


class DeviceConfig:
    SCENE = {"grid_height": 16, "grid_width": 16, "codebook_size": 512}
    REASONING = {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 512, "n_experts": 8, "top_k": 2, "max_prompt_len": 64, "norm_eps": 1e-5}

    def __init__(self, path: Path):
        data = _read_yaml(path)
        self.name = data.get("name", path.stem)
        self.seed = int(data.get("seed", 0))
        checkpoint = data.get("checkpoint")
        self.checkpoint = str((path.parent / checkpoint).resolve()) if checkpoint else None
        self.scene = _Section(data.get("scene", {}), self.SCENE, f"{path}: scene")
        self.scene.num_tokens = self.scene.grid_height * self.scene.grid_width
        self.reasoning = _Section(data.get("reasoning", {}), self.REASONING, f"{path}: reasoning")
        self.reasoning.head_dim = self.reasoning.d_model // self.reasoning.n_heads
        self.max_len = self.reasoning.max_prompt_len + self.scene.num_tokens


def _scalar(text: str):
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(t) for t in text[1:-1].split(",") if t.strip()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def _read_yaml(path: Path) -> dict:
    """``key: value`` at the top level and one level down (two-space indent), comments, inline lists."""
    data: dict = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        key, _, value = line.strip().partition(":")
        if raw.startswith((" ", "\t")):
            if section is None:
                raise ValueError(f"{path}: indented line outside a section: {raw!r}")
            data[section][key] = _scalar(value)
        elif value.strip():
            data[key], section = _scalar(value), None
        else:
            data[key], section = {}, key
    return data


def load_device_config(name: str) -> DeviceConfig:
    path = Path(name)
    if not path.suffix:
        path = ROOT / "configs" / "models" / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no config {name!r} ({path} does not exist)")
    return DeviceConfig(path)


def build_reasoning(config: DeviceConfig, device: torch.device):
    """The reasoning stage as ``tandem.models.build_stages`` makes it (the same seeded draws, or the
    config's checkpoint, which needs safetensors), on ``device``."""
    from tandem.models import _materialize_seeded
    from tandem.models.reasoning import ReasoningTransformer

    with torch.device("meta"):
        model = ReasoningTransformer(config)
    if config.checkpoint:
        from safetensors import safe_open  # on the GPU image; tandem's own requirement

        with safe_open(config.checkpoint, framework="pt") as handle:
            # stored as the checkpoint was saved (small's is fp16); run in fp32, as build_stages does
            state = {k[len("reasoning."):]: handle.get_tensor(k).float() for k in handle.keys() if k.startswith("reasoning.")}
        model.load_state_dict(state, assign=True, strict=True)
    else:
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(config.seed)
            _materialize_seeded(model, torch.float32)
        finally:
            torch.random.set_rng_state(state)
    return model.eval().requires_grad_(False).to(device)


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Run:
    """Results so far (written by the watchdog too, so always in a writable state)."""

    def __init__(self, args, out: Path):
        self.start = time.monotonic()
        self.budget = args.budget_s
        self.out = out
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.results: dict = {"args": vars(args) | {"out": str(out)}, "phases": [], "configs": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def phase(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.results["phases"].append({"phase": name, "status": status, "seconds": round(seconds, 2), "detail": detail})
        if status == "failed":
            self.failures.append(f"{name}: {detail}")
        log(f"{name}: {status} in {seconds:.1f} s{(' - ' + detail) if detail else ''}")

    def write(self, final_status: str) -> None:
        with self.lock:
            self.results["status"] = final_status
            self.results["failures"] = list(self.failures)
            self.results["elapsed_s"] = round(self.elapsed(), 1)
            self.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.results, indent=2, default=str)
            (self.out / "results.json").write_text(text + "\n")
            (self.out / "report.md").write_text(render_report(self.results))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "multiprocessors": props.multi_processor_count,
        }
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info |= {"name": platform.processor() or platform.machine() or "cpu", "threads": torch.get_num_threads()}
    return info


def copy_bandwidth(device: torch.device, seconds: float) -> dict:
    """GB/s of ``dst.copy_(src)`` (bytes read plus bytes written), median of timed repetitions."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(size // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    rates, until = [], time.monotonic() + seconds
    while time.monotonic() < until or len(rates) < 3:
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        rates.append(2 * size / (time.perf_counter() - t0) / 1e9)
    del src, dst
    return {"copy_bytes": size, "repetitions": len(rates), "gb_s_median": round(statistics.median(rates), 1), "gb_s_max": round(max(rates), 1)}


# ----------------------------------------------------------------------------- the model and its step


class Generator:
    """One config's reasoning stage on the device with static buffers for ``batch`` rows: cache,
    step inputs, sampling table, token history; the decode step as one function of those buffers."""

    def __init__(self, model, config, batch: int, device: torch.device, seed: int = 0):
        from tandem.stages import cache_layout, interleave
        from tandem.tokenizer import encode_batch

        self.model, self.config, self.batch, self.device = model, config, batch, device
        self.steps = config.scene.num_tokens - 1  # prefill samples the first token
        layout = cache_layout(config)
        self.keys = [torch.zeros(layout.shape(batch), device=device) for _ in range(layout.n_layers)]
        self.values = [torch.zeros(layout.shape(batch), device=device) for _ in range(layout.n_layers)]
        self.cache = interleave(self.keys, self.values)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        ids, lengths = encode_batch(prompts, config.reasoning.max_prompt_len)
        self.prompts = prompts
        self.input_ids = torch.from_numpy(ids).to(device)
        self.lengths = torch.from_numpy(lengths).to(device)
        # Even rows greedy, odd rows sampled (temperature 1, top-k 8), uniforms from a seeded table.
        rows = torch.arange(batch)
        self.temperature = torch.where(rows % 2 == 1, 1.0, 0.0).to(torch.float32).to(device)
        self.top_k = torch.where(rows % 2 == 1, 8, 0).to(torch.int64).to(device)
        rng = np.random.default_rng(seed)
        self.uniform_table = torch.from_numpy(rng.random((self.steps + 1, batch)).astype(np.float32)).to(device)
        self.uniform = torch.zeros(batch, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.history = torch.zeros(batch, self.steps + 1, dtype=torch.int64, device=device)
        self.row_index = torch.arange(batch, device=device)
        self.core = self._eager_core
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}

    def _eager_core(self, tokens, positions, temperature, top_k, uniform, *cache):
        """The decode graph (cuda-torch's form): -> next token ids, new keys and values."""
        from tandem.models.reasoning import sample_tokens

        logits, keys, values = self.model.decode_step(tokens, positions, cache[0::2], cache[1::2])
        return (sample_tokens(logits, temperature, top_k, uniform), *keys, *values)

    def prefill(self) -> None:
        """Eager prefill into the cache; the first token into the history and the step input."""
        from tandem.models.reasoning import sample_tokens

        with torch.inference_mode():
            logits, keys, values = self.model.prefill(self.input_ids, self.lengths)
            width = self.input_ids.shape[1]
            for cache, new in zip(self.keys + self.values, keys + values):
                cache.zero_()
                cache[:, :, :width].copy_(new)
            first = sample_tokens(logits, self.temperature, self.top_k, self.uniform_table[0])
            self.history.zero_()
            self.history[:, 0].copy_(first)
            self.tokens.copy_(first)
            self.positions.copy_(self.lengths)
            self.counter.fill_(1)

    def step(self, core) -> None:
        """One whole decode step over the static buffers (what a CUDA graph captures)."""
        self.uniform.copy_(self.uniform_table.index_select(0, self.counter).view(-1))
        out = core(self.tokens, self.positions, self.temperature, self.top_k, self.uniform, *self.cache)
        next_tokens, news = out[0], out[1:]
        n = len(self.keys)
        for cache, new in zip(self.keys + self.values, list(news[:n]) + list(news[n:])):
            cache[self.row_index, :, self.positions] = new[:, :, 0, :]
        self.history.index_copy_(1, self.counter, next_tokens.view(-1, 1))
        self.tokens.copy_(next_tokens)
        self.positions.add_(1)
        self.counter.add_(1)

    def capture(self, name: str, core) -> None:
        """``step(core)`` captured as one CUDA graph (warm-up on a side stream first)."""
        self.prefill()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(3):
                self.step(core)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            self.step(core)
        self.graphs[name] = graph

    def generate(self, path: str, cores: dict) -> tuple[float, float, np.ndarray]:
        """One whole generation by ``path`` -> (prefill ms, decode ms, tokens [B, num_tokens])."""
        sync(self.device)
        t0 = time.perf_counter()
        self.prefill()
        sync(self.device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            if path in self.graphs:
                graph = self.graphs[path]
                for _ in range(self.steps):
                    graph.replay()
            else:
                core = cores[path]
                for _ in range(self.steps):
                    self.step(core)
        tokens = self.history.cpu().numpy()  # the only device-to-host copy: the generation's tokens
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, tokens


def routing_counts(gen: Generator) -> list[list[int]]:
    """Distinct experts each layer's rows picked at every decode step of one eager generation."""
    from tandem.models.reasoning import MoEFeedForward

    counts: list[list[int]] = []
    current: list[int] = []
    hooks = []

    def hook(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        current.append(int(module.route(x)[1].unique().numel()))

    for module in gen.model.modules():
        if isinstance(module, MoEFeedForward):
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        gen.prefill()
        with torch.inference_mode():
            for _ in range(gen.steps):
                current.clear()
                gen.step(gen._eager_core)
                counts.append(list(current))
    finally:
        for h in hooks:
            h.remove()
    return counts


def step_bytes(model, config, batch: int, counts: list[list[int]]) -> dict:
    """Bytes one decode step must read: routed experts (distinct picks per layer), every other
    weight except the embeddings (one row per token each), the static cache (attention reads all
    ``max_len`` slots), this step's cache writes."""
    r = config.reasoning
    elem = 4
    slab = 3 * r.d_model * r.d_ff * elem  # one expert's gate, up and down
    other = 0
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in EXPERT_STACKS or "embedding" in name:
            continue
        other += p.numel() * p.element_size()
    embeddings = 2 * batch * r.d_model * elem
    cache_read = 2 * r.n_layers * batch * r.n_heads * config.max_len * r.head_dim * elem
    cache_write = 2 * r.n_layers * batch * r.n_heads * r.head_dim * elem
    distinct = [sum(step) for step in counts]
    slots = min(r.n_experts, batch * r.top_k)
    routed = statistics.mean(distinct) * slab
    fixed = other + embeddings + cache_read + cache_write
    return {
        "expert_slab_bytes": slab,
        "distinct_experts_per_layer_mean": round(statistics.mean(distinct) / r.n_layers, 3),
        "routed_bytes_mean": int(routed + fixed),
        "dense_bytes": int(r.n_experts * r.n_layers * slab + fixed),
        # forward_capturable: gather copies slots slabs per layer (read + write), bmm reads them again
        "capturable_traffic_bytes": int(3 * slots * r.n_layers * slab + fixed),
        "other_weights_bytes": other,
        "cache_read_bytes": cache_read,
    }


# ----------------------------------------------------------------------------- phases


def check_config(run: Run, name: str, device: torch.device, args, share: float) -> None:
    from tandem.export.rewrites import graph_rewrites
    from tandem.models import Stages

    entry: dict = {"batches": {}}
    run.results["configs"][name] = entry
    deadline = time.monotonic() + share
    t0 = time.monotonic()
    log(f"{name}: building the reasoning stage (config {name}) ...")
    try:
        config = load_device_config(name)
        stages = Stages(build_reasoning(config, device), None)  # refinement is not measured here
        entry["checkpoint"] = Path(config.checkpoint).name if config.checkpoint else "seeded init"
        entry["parameters"] = sum(p.numel() for p in stages.reasoning.parameters())
        entry["num_tokens"] = config.scene.num_tokens
        run.phase(f"{name}/build", "ok", time.monotonic() - t0, f"{entry['parameters'] / 1e6:.1f}M reasoning parameters, {entry['checkpoint']}")
    except Exception as exc:
        run.phase(f"{name}/build", "failed", time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
        return
    with graph_rewrites(("capturable_experts",), stages):
        for bi, batch in enumerate(args.batches):
            left = deadline - time.monotonic()
            batch_share = left / (len(args.batches) - bi)
            check_batch(run, f"{name}/b{batch}", stages, config, batch, device, args, entry, batch_share)
    del stages
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_batch(run: Run, tag: str, stages, config, batch: int, device: torch.device, args, entry: dict, share: float) -> None:
    deadline = time.monotonic() + share
    record: dict = {"paths": {}, "skipped": {}}
    entry["batches"][str(batch)] = record
    gen = Generator(stages.reasoning, config, batch, device)
    record["prompts"] = gen.prompts
    cores = {"eager": gen._eager_core}

    # eager first: the reference tokens and a first timing (also the compile's fallback)
    t0 = time.monotonic()
    log(f"{tag}: eager generation ({gen.steps} decode steps) ...")
    try:
        _, decode_ms, tokens = gen.generate("eager", cores)
        reference = tokens
        record["eager_tokens"] = tokens.tolist()  # [B, num_tokens]: even rows greedy, odd rows sampled
        run.phase(f"{tag}/eager", "ok", time.monotonic() - t0, f"{decode_ms / gen.steps:.3f} ms/step (first run)")
    except Exception as exc:
        run.phase(f"{tag}/eager", "failed", time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
        log(traceback.format_exc())
        return
    available = ["eager"]

    # torch.compile (Inductor) of the decode graph; the cache writes and token feedback stay eager
    if "compiled" in args.paths:
        if deadline - time.monotonic() < args.compile_reserve_s:
            record["skipped"]["compiled"] = f"budget: {deadline - time.monotonic():.0f} s left of this batch's share, a compile needs ~{args.compile_reserve_s:.0f} s"
        else:
            t0 = time.monotonic()
            log(f"{tag}: torch.compile of the decode step (first call compiles) ...")
            try:
                compiled = torch.compile(gen._eager_core, dynamic=False, fullgraph=True)
                cores["compiled"] = compiled
                gen.generate("compiled", cores)  # compiles
                available.append("compiled")
                run.phase(f"{tag}/compile", "ok", time.monotonic() - t0)
            except Exception as exc:
                cores.pop("compiled", None)
                run.phase(f"{tag}/compile", "failed", time.monotonic() - t0, f"{type(exc).__name__}: {str(exc)[:400]}")

    # CUDA graphs of the whole step (eager and compiled cores)
    for path, core in (("graph", "eager"), ("compiled_graph", "compiled")):
        if path not in args.paths:
            continue
        if device.type != "cuda":
            record["skipped"][path] = "CUDA graphs need a CUDA device (torch.cuda.CUDAGraph); this run is on the CPU"
            continue
        if core not in cores:
            record["skipped"][path] = f"no {core} step to capture"
            continue
        t0 = time.monotonic()
        log(f"{tag}: capturing the whole {core} step as one CUDA graph ...")
        try:
            gen.capture(path, cores[core])
            gen.prefill()
            torch.cuda.set_sync_debug_mode("error")  # any synchronising op in the replay loop raises
            try:
                with torch.inference_mode():
                    for _ in range(gen.steps):
                        gen.graphs[path].replay()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            available.append(path)
            run.phase(f"{tag}/capture-{path}", "ok", time.monotonic() - t0, "replayed every step with sync debug mode 'error': no host synchronisation")
        except Exception as exc:
            gen.graphs.pop(path, None)
            run.phase(f"{tag}/capture-{path}", "failed", time.monotonic() - t0, f"{type(exc).__name__}: {str(exc)[:400]}")

    # interleaved rounds: one whole generation per path per round
    t0 = time.monotonic()
    rounds: dict[str, list[tuple[float, float]]] = {p: [] for p in available}
    agreement: dict[str, dict] = {}
    log(f"{tag}: timing {', '.join(available)} in interleaved rounds (up to {args.rounds}) ...")
    reserve = 3.0
    for r in range(args.rounds):
        if r >= 2 and time.monotonic() > deadline - reserve:
            record["rounds_cut"] = f"stopped after {r} rounds: this batch's share of the budget was spent"
            break
        order = available[r % len(available):] + available[: r % len(available)]
        for path in order:
            prefill_ms, decode_ms, tokens = gen.generate(path, cores)
            rounds[path].append((prefill_ms, decode_ms))
            same = tokens == reference
            greedy = same[0::2]
            sampled = same[1::2]
            a = agreement.setdefault(path, {"greedy_rows_identical": True, "sampled_positions_equal": 0, "sampled_positions": 0})
            a["greedy_rows_identical"] &= bool(greedy.all())
            a["sampled_positions_equal"] += int(sampled.sum())
            a["sampled_positions"] += int(sampled.size)
    n_rounds = min(len(v) for v in rounds.values())
    run.phase(f"{tag}/rounds", "ok", time.monotonic() - t0, f"{n_rounds} rounds")
    record["rounds"] = n_rounds
    for path in available:
        decode = [d / gen.steps for _, d in rounds[path]]
        whole = [p + d for p, d in rounds[path]]
        eager_decode = [d / gen.steps for _, d in rounds["eager"]]
        ratio = [e / d for e, d in zip(eager_decode, decode)]
        record["paths"][path] = {
            "step_ms_median": round(statistics.median(decode), 4),
            "step_ms_spread": [round(min(decode), 4), round(max(decode), 4)],
            "speedup_vs_eager_median": round(statistics.median(ratio), 3),
            "speedup_vs_eager_spread": [round(min(ratio), 3), round(max(ratio), 3)],
            "generation_ms_median": round(statistics.median(whole), 3),  # prefill + every step, all rows: a batch's latency
            "generation_ms_spread": [round(min(whole), 3), round(max(whole), 3)],
            "ms_per_image_median": round(statistics.median(whole) / batch, 3),
            "prefill_ms_median": round(statistics.median(p for p, _ in rounds[path]), 3),
            "tokens_per_s_median": round(batch * (gen.steps + 1) / (statistics.median(whole) / 1e3), 1),
            "tokens": agreement[path],
        }
        if not agreement[path]["greedy_rows_identical"]:
            run.failures.append(f"{tag}/{path}: greedy tokens differ from eager's")
    # roofline from the eager generation's real routing
    try:
        counts = routing_counts(gen)
        work = step_bytes(stages.reasoning, config, batch, counts)
        bandwidth = run.results.get("bandwidth", {}).get("gb_s_median")
        if bandwidth:
            work["routed_floor_ms"] = round(work["routed_bytes_mean"] / (bandwidth * 1e9) * 1e3, 4)
            work["dense_floor_ms"] = round(work["dense_bytes"] / (bandwidth * 1e9) * 1e3, 4)
            work["capturable_traffic_floor_ms"] = round(work["capturable_traffic_bytes"] / (bandwidth * 1e9) * 1e3, 4)
            for path, res in record["paths"].items():
                res["routed_roofline_share"] = round(work["routed_floor_ms"] / res["step_ms_median"], 3)
        record["roofline"] = work
    except Exception as exc:
        run.phase(f"{tag}/roofline", "failed", 0.0, f"{type(exc).__name__}: {exc}")
    for path, why in record["skipped"].items():
        log(f"{tag}: {path} skipped: {why}")


def aot_phase(run: Run, device: torch.device, args) -> None:
    """cuda-torch as ``tandem build`` makes it, for the decode graph of the first config: torch.export
    with the toolchain's CUDA rewrites, an AOTInductor package, the runtime's CUDA-graph replay."""
    name = args.configs[0]
    tag = f"{name}/cuda-torch-package"
    if device.type != "cuda":
        run.phase(tag, "skipped", 0.0, "cuda-torch packages need a CUDA device (cpu-aot is checked by tests/test_routed.py)")
        return
    if run.left() < args.aot_reserve_s:
        run.phase(tag, "skipped", 0.0, f"budget: {run.left():.0f} s left, the package needs ~{args.aot_reserve_s:.0f} s")
        return
    import tempfile

    try:  # the build path needs the repository's own requirements (pydantic, onnx, ...)
        from tandem.compiler.torch_aot import export_programs
        from tandem.config import load_config
        from tandem.export.onnx_export import export_patches
        from tandem.formats.targets import get_target
        from tandem.runtimes.torch_aot import _CudaGraphed
        from tandem.stages import graph_specs
        from tandem.toolchains import get_toolchain
    except ImportError as exc:
        run.phase(tag, "skipped", 0.0, f"tandem build's modules need {exc.name} (pip install -e . there, or carry its wheels): {exc}")
        return

    t0 = time.monotonic()
    log(f"{tag}: torch.export + AOTInductor package of reasoning_decode ...")
    try:
        config = load_config(name)
        rewrites = get_toolchain("torch_aot").rewrites_for_target(get_target("cuda-torch"))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            export_programs(config, None, folder, graphs=["reasoning_decode"], rewrites=rewrites)
            with export_patches():
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(torch.export.load(str(folder / "reasoning_decode.pt2")), "cuda")
                package = torch._inductor.aoti_compile_and_package(program, package_path=str(folder / "decode.pt2"))
            model = torch._inductor.aoti_load_package(package, device_index=device.index or 0)
            spec = graph_specs(config)["reasoning_decode"]
            feeds = spec.sample_inputs({"batch": 1}, seed=0)
            tensors = [torch.from_numpy(feeds[n]).to(device) for n in spec.input_names]
            graphed = _CudaGraphed(model)
            with torch.inference_mode():
                expected = model(*tensors)
                actual = graphed(*tensors, fixed_inputs=True)
            captured = not graphed.failed
            same = bool(torch.equal(expected[0], actual[0]))
        detail = f"runtime's CUDA-graph capture {'succeeded' if captured else 'FAILED (fell back to launches)'}; tokens {'equal' if same else 'differ'}"
        run.results["cuda_torch_package"] = {"config": name, "rewrites": list(rewrites), "captured": captured, "tokens_equal": same}
        run.phase(tag, "ok" if captured and same else "failed", time.monotonic() - t0, detail)
    except Exception as exc:
        run.phase(tag, "failed", time.monotonic() - t0, f"{type(exc).__name__}: {str(exc)[:400]}")


# ----------------------------------------------------------------------------- report


def render_report(results: dict) -> str:
    info = results.get("device_info", {})
    lines = [
        f"# Device check: {info.get('name', '?')}",
        "",
        f"Status: **{results.get('status')}** in {results.get('elapsed_s')} s (budget {results['args'].get('budget_s')} s). "
        f"torch {info.get('torch')}, CUDA {info.get('cuda', '-')}, triton {info.get('triton', '-')}, capability {info.get('capability', '-')}.",
        "",
    ]
    bw = results.get("bandwidth")
    if bw:
        lines += [f"Copy bandwidth: {bw['gb_s_median']} GB/s median (max {bw['gb_s_max']}) over {bw['repetitions']} copies of {bw['copy_bytes'] / 2**20:.0f} MiB.", ""]
    lines += [
        "Decode step: cuda-torch's form (`capturable_experts`), whole generations per path in interleaved rounds;",
        "median over rounds (spread min..max). `graph` replays the whole step (sampling, cache writes, token",
        "feedback) as one CUDA graph; `compiled_graph` the torch.compile'd step captured the same way.",
        "",
        "| config | batch | path | step ms | x eager | generation ms | ms/image | tokens/s | routed roofline share | greedy tokens = eager | sampled positions = eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.get("configs", {}).items():
        for batch, rec in entry.get("batches", {}).items():
            for path, res in rec.get("paths", {}).items():
                t = res["tokens"]
                lines.append(
                    f"| {name} | {batch} | {path} | {res['step_ms_median']} ({res['step_ms_spread'][0]}..{res['step_ms_spread'][1]}) "
                    f"| {res['speedup_vs_eager_median']} ({res['speedup_vs_eager_spread'][0]}..{res['speedup_vs_eager_spread'][1]}) "
                    f"| {res['generation_ms_median']} | {res['ms_per_image_median']} | {res['tokens_per_s_median']} | {res.get('routed_roofline_share', '-')} "
                    f"| {t['greedy_rows_identical']} | {t['sampled_positions_equal']}/{t['sampled_positions']} |"
                )
            for path, why in rec.get("skipped", {}).items():
                lines.append(f"| {name} | {batch} | {path} | skipped: {why} | | | | | | | |")
    lines += ["", "Roofline per step (bytes a routed step must read; the capturable form's own traffic beside it):", "",
              "| config | batch | rounds | distinct experts/layer | routed MB | floor ms | capturable-form MB | its floor ms | dense MB | dense floor ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.get("configs", {}).items():
        for batch, rec in entry.get("batches", {}).items():
            w = rec.get("roofline")
            if not w:
                continue
            lines.append(
                f"| {name} | {batch} | {rec.get('rounds')} | {w['distinct_experts_per_layer_mean']} | {w['routed_bytes_mean'] / 1e6:.1f} | {w.get('routed_floor_ms', '-')} "
                f"| {w['capturable_traffic_bytes'] / 1e6:.1f} | {w.get('capturable_traffic_floor_ms', '-')} | {w['dense_bytes'] / 1e6:.1f} | {w.get('dense_floor_ms', '-')} |"
            )
    pkg = results.get("cuda_torch_package")
    if pkg:
        lines += ["", f"cuda-torch package ({pkg['config']}, rewrites {pkg['rewrites']}): runtime CUDA-graph capture {'succeeded' if pkg['captured'] else 'failed'}, tokens {'equal' if pkg['tokens_equal'] else 'differ'}."]
    lines += ["", "Phases:", "", "| phase | status | s | detail |", "|---|---|---|---|"]
    for p in results.get("phases", []):
        lines.append(f"| {p['phase']} | {p['status']} | {p['seconds']} | {p['detail']} |")
    if results.get("failures"):
        lines += ["", "Failures:", ""] + [f"- {f}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--configs", default=None, help="comma-separated configs (default: small,medium on cuda, tiny,small on cpu)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per batch (fewer if the budget runs out; at least 2)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="whole run (default 420 s: 7 minutes)")
    parser.add_argument("--compile-reserve-s", type=float, default=None, help="skip torch.compile when a batch has less time than this left")
    parser.add_argument("--aot-reserve-s", type=float, default=90.0, help="skip the cuda-torch package phase with less time than this left")
    parser.add_argument("--no-aot", action="store_true", help="skip the cuda-torch package phase")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --device cpu, a functional run that "
                        "stays steady on a shared machine; torch's default on cuda)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA GPU (run with --device cpu here)")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        args.configs = (args.configs or ("small,medium" if device.type == "cuda" else "tiny,small")).split(",")
        args.batches = [int(b) for b in args.batches.split(",")]
        args.paths = args.paths.split(",")
        unknown = set(args.paths) - set(PATHS)
        if unknown or "eager" not in args.paths:
            parser.error(f"--paths: {sorted(unknown)} unknown; choose from {PATHS}, eager included")
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.compile_reserve_s is None:
        args.compile_reserve_s = 45.0 if device.type == "cuda" else 20.0
    info = device_info(device)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    out = args.out or ROOT / "benchmarks" / "results" / f"device-{slug(info['name'])}-{stamp}"
    run = Run(args, out)
    run.results["device_info"] = info
    run.results["started_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    log(f"{info['name']} torch {info['torch']}; budget {args.budget_s:.0f} s; configs {args.configs}; results -> {out}")

    def watchdog() -> None:
        run.failures.append(f"watchdog: the run passed its budget of {args.budget_s:.0f} s by 30 s; partial report written")
        log(run.failures[-1])
        run.write("failed")
        os._exit(1)

    timer = threading.Timer(args.budget_s + 30.0, watchdog)
    timer.daemon = True
    timer.start()
    torch.manual_seed(0)
    t0 = time.monotonic()
    log("copy bandwidth ...")
    try:
        run.results["bandwidth"] = copy_bandwidth(device, seconds=2.0 if device.type == "cuda" else 1.0)
        run.phase("bandwidth", "ok", time.monotonic() - t0, f"{run.results['bandwidth']['gb_s_median']} GB/s")
    except Exception as exc:
        run.phase("bandwidth", "failed", time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
    aot_share = 0.0 if args.no_aot or device.type != "cuda" else args.aot_reserve_s
    for i, name in enumerate(args.configs):
        # later configs are bigger: each gets an equal share of what is left now, the last one the rest
        share = (run.left() - aot_share) / (len(args.configs) - i)
        try:
            check_config(run, name, device, args, share)
        except Exception as exc:
            run.phase(f"{name}", "failed", 0.0, f"{type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        run.write("running")
    if args.no_aot:
        run.phase("cuda-torch-package", "skipped", 0.0, "--no-aot")
    else:
        aot_phase(run, device, args)
    timer.cancel()
    status = "failed" if run.failures else "ok"
    run.write(status)
    log(f"{status}: {out / 'report.md'}")
    print(json.dumps({"status": status, "out": str(out), "failures": run.failures}))
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
