"""Capacity model: monolithic replicas (both stages in every pod) vs split pools, at equal hourly cost.

A discrete-event simulation (simpy) driven by *measured* per-stage service times (the reasoning
and refinement hop times of the split path, sampled with replacement, so their real spread and
tail carry into the model). Every figure it produces is **simulated**, and labelled so.

The model, stated so it can be argued with:

* a pod holds one accelerator and runs one request's stage at a time (the two stages of a
  monolithic pod share it: a request holds the pod for reasoning + refinement);
* each layout's pools are fed from one queue per pool (least-loaded routing, as KServe's
  activator/queue-proxy with container concurrency 1 approximates); the split path adds the
  measured hop overhead between the pools;
* ``steady`` arrivals are Poisson; ``bursty`` arrivals are a two-state Markov-modulated Poisson
  process with the same mean rate (bursts of ``burst_factor`` x the mean for ``burst_fraction`` of
  the time, the rest quieter);
* equal hourly cost: the split layout gets the reasoning/refinement pod counts (at each pool's
  price) whose total cost does not exceed the monolithic layout's, the best of those by
  simulated p99;
* a pool on other hardware runs ``speed`` x faster (``speed`` from published peaks in
  configs/hardware.yaml: *modelled*, not measured).

USD per 1,000 images = the layout's hourly cost / images completed per hour x 1,000.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

from tandem.errors import TandemError

SIMULATED = "simulated"
CLAIM = 0.40
HIGH_RESOLUTION_SCALE = 16.0  # refinement work of a 4x larger image side (16x the pixels)  # "the split is credited with about 40% lower p99 under bursty load"


@dataclass(frozen=True)
class StageTimes:
    """Measured per-request service times in seconds (batch 1)."""

    reasoning: tuple[float, ...]
    refinement: tuple[float, ...]
    hop_overhead: float = 0.0  # extra seconds the split path spends between the pools (measured)
    source: str = "measured"

    def __post_init__(self) -> None:
        for name in ("reasoning", "refinement"):
            values = getattr(self, name)
            if len(values) < 2 or min(values) <= 0:
                raise TandemError(f"{name} service times need at least 2 positive samples, got {len(values)}")

    @property
    def mean_total(self) -> float:
        return float(np.mean(self.reasoning) + np.mean(self.refinement))


@dataclass(frozen=True)
class PoolSpec:
    stages: tuple[str, ...]  # ("reasoning", "refinement") for a monolithic pod
    pods: int
    usd_per_hour: float  # per pod
    speed: float = 1.0  # service-time divisor (modelled hardware)


@dataclass(frozen=True)
class Layout:
    name: str
    pools: tuple[PoolSpec, ...]

    @property
    def usd_per_hour(self) -> float:
        return sum(p.pods * p.usd_per_hour for p in self.pools)

    def describe(self) -> str:
        return " + ".join(f"{p.pods}x {'+'.join(p.stages)}" for p in self.pools)


@dataclass(frozen=True)
class Arrivals:
    kind: str  # "steady" | "bursty"
    rate: float  # mean requests per second
    burst_factor: float = 2.5
    burst_fraction: float = 0.2
    mean_burst_s: float = 20.0  # mean length of a burst (in units of the service time scale, see simulate)


@dataclass
class Outcome:
    layout: str
    arrivals: str
    rate_per_s: float
    pods: str
    usd_per_hour: float
    completed: int
    p50_s: float
    p99_s: float
    usd_per_1000_images: float
    utilisation: float
    label: str = SIMULATED

    def as_dict(self) -> dict:
        return asdict(self)


def _arrival_times(arrivals: Arrivals, horizon: float, rng: np.random.Generator) -> np.ndarray:
    if arrivals.kind == "steady":
        gaps = rng.exponential(1.0 / arrivals.rate, size=int(arrivals.rate * horizon * 1.3) + 100)
        times = np.cumsum(gaps)
        return times[times < horizon]
    if arrivals.kind != "bursty":
        raise TandemError(f"unknown arrival kind {arrivals.kind!r}; use steady or bursty")
    high = arrivals.rate * arrivals.burst_factor
    quiet_fraction = 1.0 - arrivals.burst_fraction
    low = max(arrivals.rate * (1.0 - arrivals.burst_fraction * arrivals.burst_factor) / quiet_fraction, 0.0)
    if arrivals.burst_fraction * arrivals.burst_factor >= 1.0:
        raise TandemError("burst_factor x burst_fraction must be < 1 (the bursts would carry more than the mean rate)")
    mean_quiet = arrivals.mean_burst_s * quiet_fraction / arrivals.burst_fraction
    times, t, bursting = [], 0.0, False
    while t < horizon:
        length = rng.exponential(arrivals.mean_burst_s if bursting else mean_quiet)
        rate = high if bursting else low
        if rate > 0:
            n = rng.poisson(rate * length)
            times.extend(t + np.sort(rng.uniform(0, length, size=n)))
        t += length
        bursting = not bursting
    times = np.asarray(times)
    return times[times < horizon]


def simulate(layout: Layout, arrivals: Arrivals, times: StageTimes, requests: int = 20_000, seed: int = 0) -> Outcome:
    """Run ``layout`` under ``arrivals`` until about ``requests`` requests have arrived; latency
    percentiles over the requests after the first 10% (warm-up)."""
    import simpy

    rng = np.random.default_rng(seed)
    horizon = requests / arrivals.rate
    arrival_times = _arrival_times(arrivals, horizon, rng)
    env = simpy.Environment()
    pools = {p.stages: (simpy.Resource(env, capacity=p.pods), p) for p in layout.pools}
    samples = {"reasoning": np.asarray(times.reasoning), "refinement": np.asarray(times.refinement)}
    latencies = np.full(len(arrival_times), np.nan)
    busy = {p.stages: 0.0 for p in layout.pools}
    split = len(layout.pools) > 1

    def request(index: int, t0: float):
        yield env.timeout(t0 - env.now)
        for stages, (resource, spec) in pools.items():
            with resource.request() as slot:
                yield slot
                work = sum(float(rng.choice(samples[s])) for s in stages) / spec.speed
                busy[stages] += work
                yield env.timeout(work)
            if split and stages != layout.pools[-1].stages:
                yield env.timeout(times.hop_overhead)
        latencies[index] = env.now - t0

    for i, t0 in enumerate(arrival_times):
        env.process(request(i, float(t0)))
    env.run()
    done = latencies[int(len(latencies) * 0.1):]
    done = done[~np.isnan(done)]
    span = float(arrival_times[-1]) if len(arrival_times) else 1.0
    images_per_hour = len(arrival_times) / span * 3600.0
    capacity = sum(spec.pods for _, spec in pools.values())
    return Outcome(
        layout=layout.name,
        arrivals=arrivals.kind,
        rate_per_s=arrivals.rate,
        pods=layout.describe(),
        usd_per_hour=round(layout.usd_per_hour, 4),
        completed=int(len(done)),
        p50_s=float(np.percentile(done, 50)),
        p99_s=float(np.percentile(done, 99)),
        usd_per_1000_images=layout.usd_per_hour / images_per_hour * 1000.0,
        utilisation=float(sum(busy.values()) / (span * capacity)),
    )


def monolithic(pods: int, usd_per_hour: float) -> Layout:
    return Layout("monolithic", (PoolSpec(("reasoning", "refinement"), pods, usd_per_hour),))


def split_layouts(budget_usd_per_hour: float, reasoning_price: float, refinement_price: float, refinement_speed: float = 1.0) -> list[Layout]:
    """Every split layout (at least one pod per pool) whose hourly cost fits the budget, using it fully
    (no pod could be added to either pool)."""
    layouts = []
    max_r = int(budget_usd_per_hour // reasoning_price)
    for r in range(1, max_r + 1):
        f = int((budget_usd_per_hour - r * reasoning_price + 1e-9) // refinement_price)
        if f >= 1:
            layouts.append(Layout("split", (
                PoolSpec(("reasoning",), r, reasoning_price),
                PoolSpec(("refinement",), f, refinement_price, refinement_speed),
            )))
    return layouts


def bottleneck(layout: Layout, times: StageTimes) -> float:
    """Work per request on the busiest pool, per pod (lower: more headroom)."""
    mean = {"reasoning": float(np.mean(times.reasoning)), "refinement": float(np.mean(times.refinement))}
    return max(sum(mean[s] for s in p.stages) / p.speed / p.pods for p in layout.pools)


def balanced(layouts: list[Layout], times: StageTimes, keep: int = 3) -> list[Layout]:
    """The ``keep`` split layouts with the most headroom on their busiest pool (the others cannot win on p99)."""
    return sorted(layouts, key=lambda layout: bottleneck(layout, times))[:keep]


@dataclass
class Scenario:
    name: str
    description: str
    monolithic_pods: int
    monolithic_price: float
    reasoning_price: float
    refinement_price: float
    refinement_speed: float = 1.0
    refinement_scale: float = 1.0  # refinement work x this (its cost follows resolution: 2x the side = 4x the pixels)
    basis: str = "measured service times, this machine's price"


@dataclass
class CapacityReport:
    scenarios: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    verdicts: list[dict] = field(default_factory=list)
    stage_times: dict = field(default_factory=dict)
    label: str = SIMULATED


def compare(times: StageTimes, scenarios: list[Scenario], loads: tuple[float, ...] = (0.5, 0.7, 0.85),
            requests: int = 20_000, seed: int = 0) -> CapacityReport:
    """For each scenario, arrival kind and load (a fraction of the monolithic layout's capacity):
    the monolithic layout, and the best equal-cost split layout by p99."""
    report = CapacityReport(stage_times={
        "reasoning_mean_s": float(np.mean(times.reasoning)), "refinement_mean_s": float(np.mean(times.refinement)),
        "reasoning_p99_s": float(np.percentile(times.reasoning, 99)), "refinement_p99_s": float(np.percentile(times.refinement, 99)),
        "hop_overhead_s": times.hop_overhead, "samples": len(times.reasoning), "source": times.source,
    })
    base_times = times
    for scenario in scenarios:
        report.scenarios.append(asdict(scenario))
        times = base_times
        if scenario.refinement_scale != 1.0:
            times = StageTimes(base_times.reasoning, tuple(t * scenario.refinement_scale for t in base_times.refinement),
                               base_times.hop_overhead, f"{base_times.source}; refinement x{scenario.refinement_scale:g} (modelled)")
        mono = monolithic(scenario.monolithic_pods, scenario.monolithic_price)
        candidates = split_layouts(mono.usd_per_hour, scenario.reasoning_price, scenario.refinement_price, scenario.refinement_speed)
        if not candidates:
            raise TandemError(f"scenario {scenario.name}: no split layout fits the monolithic layout's {mono.usd_per_hour:.2f} USD/h")
        capacity = scenario.monolithic_pods / times.mean_total  # requests/s the monolithic layout can serve
        for kind, load in itertools.product(("steady", "bursty"), loads):
            arrivals = Arrivals(kind, capacity * load, mean_burst_s=20 * times.mean_total)
            base = simulate(mono, arrivals, times, requests, seed)
            best = min((simulate(c, arrivals, times, requests, seed) for c in balanced(candidates, times)), key=lambda o: o.p99_s)
            for outcome in (base, best):
                report.rows.append({"scenario": scenario.name, "load": load, **outcome.as_dict()})
            reduction = 1.0 - best.p99_s / base.p99_s
            report.verdicts.append({
                "scenario": scenario.name, "arrivals": kind, "load": load,
                "monolithic_p99_s": base.p99_s, "split_p99_s": best.p99_s, "split_pods": best.pods,
                "p99_reduction": reduction, "claim_holds": reduction >= CLAIM, "label": SIMULATED,
            })
    return report


def default_scenarios(hw, measured_price: float, pods: int = 8) -> list[Scenario]:
    """Same hardware for both pools (this machine, its price), and refinement moved to a cheaper
    accelerator with the speed ratio of published peaks (modelled)."""
    scenarios = [Scenario(
        "same hardware", f"{pods} pods of this machine; split pools on the same machines", pods,
        measured_price, measured_price, measured_price,
    )]
    try:
        h100 = hw.instances["p5.48xlarge"]
        inf2 = hw.instances["inf2.xlarge"]
        gpu_price = h100.usd_per_hour / h100.accelerators
        inf2_price = inf2.usd_per_hour / inf2.accelerators
        peak = hw.model.precision
        speed = hw.accelerators[inf2.accelerator].peak_tflops[peak] / hw.accelerators[h100.accelerator].peak_tflops[peak]
    except (KeyError, AttributeError, TypeError):
        return scenarios
    basis = "measured service-time shapes; prices and the inf2/H100 speed ratio from configs/hardware.yaml (modelled)"
    for scale, label in ((1.0, ""), (HIGH_RESOLUTION_SCALE, f", {HIGH_RESOLUTION_SCALE:g}x refinement work")):
        scenarios.append(Scenario(
            f"refinement on inf2{label}", f"{pods} H100 pods vs H100 reasoning + Inferentia2 refinement at the same cost "
            f"(refinement {speed:.2f}x the H100's speed: {peak} peak ratio, modelled"
            + (f"; refinement work x{scale:g}, e.g. twice the image side, modelled" if scale != 1.0 else "") + ")",
            pods, gpu_price, gpu_price, inf2_price, refinement_speed=speed, refinement_scale=scale, basis=basis,
        ))
    return scenarios
