"""The capacity model (tandem.deploy.capacity): the simulation reproduces queueing theory where
theory has an answer, bursts keep the mean rate, equal cost is equal, every figure is simulated."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.bench.hardware import load_hardware
from tandem.deploy.capacity import (
    SIMULATED,
    Arrivals,
    StageTimes,
    _arrival_times,
    compare,
    default_scenarios,
    monolithic,
    simulate,
    split_layouts,
)
from tandem.errors import TandemError


def exponential_times(mean_r: float, mean_f: float, n: int = 20_000, seed: int = 3) -> StageTimes:
    rng = np.random.default_rng(seed)
    return StageTimes(tuple(rng.exponential(mean_r, n)), tuple(rng.exponential(mean_f, n)), source="test")


def test_one_pod_matches_the_m_m_1_queue():
    """Exponential service (reasoning ~0 so the pod is one exponential server) and Poisson arrivals at
    rho = 0.5: mean sojourn 1/(mu - lambda) and median ln(2)/(mu - lambda)."""
    times = exponential_times(1e-6, 0.1)
    outcome = simulate(monolithic(1, 1.0), Arrivals("steady", rate=5.0), times, requests=30_000, seed=1)
    expected_mean = 1.0 / (10.0 - 5.0)
    assert outcome.p50_s == pytest.approx(np.log(2) * expected_mean, rel=0.1)
    assert outcome.p99_s == pytest.approx(np.log(100) * expected_mean, rel=0.15)
    assert outcome.utilisation == pytest.approx(0.5, abs=0.03)
    assert outcome.label == SIMULATED


def test_bursty_arrivals_keep_the_mean_rate_and_are_burstier():
    rng = np.random.default_rng(0)
    steady = _arrival_times(Arrivals("steady", 10.0), 5_000.0, rng)
    bursty = _arrival_times(Arrivals("bursty", 10.0, mean_burst_s=5.0), 5_000.0, rng)
    assert len(bursty) / 5_000.0 == pytest.approx(10.0, rel=0.08)
    counts = [np.histogram(t, bins=np.arange(0, 5_000.0, 10.0))[0] for t in (steady, bursty)]
    dispersion = [c.var() / c.mean() for c in counts]
    assert dispersion[0] == pytest.approx(1.0, abs=0.2) and dispersion[1] > 3 * dispersion[0]
    with pytest.raises(TandemError, match="burst_factor x burst_fraction"):
        _arrival_times(Arrivals("bursty", 10.0, burst_factor=5.0, burst_fraction=0.3), 10.0, rng)


def test_split_layouts_spend_the_budget_and_no_more():
    for layout in split_layouts(10.0, reasoning_price=1.5, refinement_price=0.4):
        assert 10.0 - 0.4 < layout.usd_per_hour <= 10.0 + 1e-9
        assert all(pool.pods >= 1 for pool in layout.pools)


def test_compare_labels_every_figure_simulated_and_states_the_claim():
    times = exponential_times(0.2, 0.05, n=500)
    hw = load_hardware(None)
    report = compare(times, default_scenarios(hw, 0.1, pods=4), loads=(0.6,), requests=1_500)
    assert [s["name"] for s in report.scenarios] == ["same hardware", "refinement on inf2", "refinement on inf2, 16x refinement work"]
    assert len(report.rows) == 2 * len(report.verdicts) == 2 * 3 * 2  # (mono, split) x scenarios x arrival kinds
    assert {row["label"] for row in report.rows} == {SIMULATED} and {v["label"] for v in report.verdicts} == {SIMULATED}
    for verdict in report.verdicts:
        assert verdict["claim_holds"] == (verdict["p99_reduction"] >= 0.40)


def test_stage_times_refuse_too_few_samples():
    with pytest.raises(TandemError, match="at least 2 positive samples"):
        StageTimes((0.1,), (0.1, 0.2))
