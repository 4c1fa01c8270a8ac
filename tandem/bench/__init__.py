"""`tandem bench`: cross-runtime and cross-hardware benchmarks with a report.

Measured: per stage and runtime latency/throughput (:mod:`.stagebench`), the served ensemble
under load (:mod:`.served`), this machine's roofline (:mod:`.roofline`). Modelled, and labelled
so: the same stages on other accelerators from published peaks (:mod:`.hardware`). The runner
(:mod:`.runner`) writes results.json, report.md and plots/ for every run."""

from tandem.bench.runner import BenchOptions, BenchResult, run_benchmark

__all__ = ["BenchOptions", "BenchResult", "run_benchmark"]
