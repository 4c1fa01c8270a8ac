"""Interleaved rounds: ratios that hold on a machine whose speed drifts during a day.

A ratio of two figures measured minutes apart measures the drift as much as the code (the same
fp32 decode step took 0.41 ms one morning and 0.78 ms that afternoon on the same host). Here every
compared figure is measured in *rounds*: each round runs every arm once (A, B, then B, A in the next
round: the order alternates so that a slow linear drift lands on every arm alike), each round gives
one ratio, and the ratio reported is the median over rounds with its spread (the 10-90% interval of
the round ratios, and min/max), the number of rounds and the wall time they took.

An *arm* is any callable returning one figure for its round: seconds per call over a short block of
calls (:func:`block`), images/s of a batch of served requests, a latency percentile. A ratio can
combine any arms of the same rounds (:meth:`Rounds.combine`).

A verdict is only given when the spread lies on one side of the threshold
(:func:`tandem.bench.present.judge`): otherwise the target says UNSTABLE.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

Arm = Callable[[], float]
SPREAD_PERCENTILES = (10.0, 90.0)


@dataclass(frozen=True)
class RoundsBudget:
    """At most ``rounds`` rounds after ``warmup_rounds`` untimed ones; once ``min_rounds`` are done,
    stop as soon as ``max_seconds`` of wall time have passed."""

    rounds: int
    min_rounds: int
    max_seconds: float
    warmup_rounds: int = 1
    pause_s: float = 0.0  # untimed pause before each arm: worker threads still spinning from the last arm settle

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "min_rounds": self.min_rounds, "max_seconds": self.max_seconds,
                "warmup_rounds": self.warmup_rounds, "pause_s": self.pause_s}


@dataclass
class Ratio:
    """The median of per-round ratios, with their spread."""

    median: float
    low: float  # 10th percentile of the round ratios
    high: float  # 90th percentile
    minimum: float
    maximum: float
    rounds: int
    wall_s: float
    per_round: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: list[float], wall_s: float) -> "Ratio | None":
        values = [float(v) for v in values if v is not None and np.isfinite(v)]
        if not values:
            return None
        low, median, high = np.percentile(values, [SPREAD_PERCENTILES[0], 50.0, SPREAD_PERCENTILES[1]])
        return cls(float(median), float(low), float(high), min(values), max(values), len(values), float(wall_s), values)

    @property
    def spread(self) -> tuple[float, float]:
        return self.low, self.high

    def as_dict(self) -> dict:
        return {
            "median": self.median,
            "spread": [self.low, self.high],
            "spread_percentiles": list(SPREAD_PERCENTILES),
            "min": self.minimum,
            "max": self.maximum,
            "rounds": self.rounds,
            "wall_s": round(self.wall_s, 3),
            "per_round": [round(v, 6) for v in self.per_round],
        }

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "Ratio | None":
        if not data or data.get("median") is None:
            return None
        low, high = data["spread"]
        return cls(data["median"], low, high, data["min"], data["max"], data["rounds"], data["wall_s"], list(data.get("per_round", [])))

    def text(self, unit: str = "x", digits: int = 2) -> str:
        """``1.23x median of 8 rounds (10-90%: 1.10-1.35x, 12.3 s)``."""
        scale = 100.0 if unit == "%" else 1.0
        f = lambda v: f"{v * scale:.{digits}f}"  # noqa: E731
        return (
            f"{f(self.median)}{unit} median of {self.rounds} round{'s' * (self.rounds != 1)} "
            f"(10-90%: {f(self.low)}-{f(self.high)}{unit}, {self.wall_s:.1f} s)"
        )


@dataclass
class Rounds:
    """Every arm's figure in every round (in the order each round ran them) and the wall time."""

    arms: tuple[str, ...]
    figures: dict[str, list[float]]
    orders: list[tuple[str, ...]]
    wall_s: float

    @property
    def count(self) -> int:
        return len(self.orders)

    def combine(self, fn: Callable[[dict[str, float]], float | None]) -> Ratio | None:
        """``fn`` applied to each round's figures ({arm: figure}); rounds where it gives None are left out."""
        values = [fn({arm: self.figures[arm][i] for arm in self.arms}) for i in range(self.count)]
        return Ratio.of([v for v in values if v is not None], self.wall_s)

    def ratio(self, numerator: str, denominator: str, scale: float = 1.0) -> Ratio | None:
        """scale x numerator / denominator, round by round."""
        return self.combine(lambda f: scale * f[numerator] / f[denominator] if f[numerator] and f[denominator] else None)

    def median(self, arm: str) -> float | None:
        values = [v for v in self.figures.get(arm, []) if v is not None and np.isfinite(v)]
        return float(np.median(values)) if values else None

    def as_dict(self) -> dict:
        return {
            "arms": list(self.arms),
            "rounds": self.count,
            "wall_s": round(self.wall_s, 3),
            "orders": [list(o) for o in self.orders],
            "figures": {arm: [None if v is None else round(float(v), 9) for v in values] for arm, values in self.figures.items()},
        }


def run_rounds(arms: Mapping[str, Arm], budget: RoundsBudget, on_round: Callable[[int], None] | None = None) -> Rounds:
    """Run ``arms`` in interleaved rounds: forward order in even rounds, reversed in odd ones."""
    names = tuple(arms)
    if not names:
        raise ValueError("run_rounds needs at least one arm")
    for _ in range(budget.warmup_rounds):
        for name in names:
            arms[name]()
    figures: dict[str, list[float]] = {name: [] for name in names}
    orders: list[tuple[str, ...]] = []
    start = time.perf_counter()
    while len(orders) < budget.rounds:
        order = names if len(orders) % 2 == 0 else names[::-1]
        for name in order:
            if budget.pause_s:
                time.sleep(budget.pause_s)
            figures[name].append(arms[name]())
        orders.append(order)
        if on_round is not None:
            on_round(len(orders))
        if len(orders) >= budget.min_rounds and time.perf_counter() - start >= budget.max_seconds:
            break
    return Rounds(names, figures, orders, time.perf_counter() - start)


def block_samples(fn: Callable[[], object], calls: int) -> np.ndarray:
    """``calls`` timed calls of ``fn`` (seconds each), the garbage collector paused."""
    samples = np.empty(calls, dtype=np.float64)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(calls):
            t0 = time.perf_counter_ns()
            fn()
            samples[i] = (time.perf_counter_ns() - t0) / 1e9
    finally:
        if was_enabled:
            gc.enable()
    return samples


def block(fn: Callable[[], object], calls: int) -> float:
    """One round's figure for a callable: the median seconds per call over ``calls`` calls."""
    return float(np.median(block_samples(fn, calls)))


def calls_for(fn: Callable[[], object], seconds: float, at_most: int = 200, at_least: int = 3) -> int:
    """How many calls of ``fn`` fill about ``seconds`` (timed from one call after a warm-up call)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    return int(min(at_most, max(at_least, round(seconds / once))))
