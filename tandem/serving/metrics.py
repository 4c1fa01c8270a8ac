"""Reading Triton's Prometheus metrics endpoint: the reasoning model's own histograms and counters
(see :mod:`tandem.serving.models.reasoning`) for the bench and the tests. Parsing is
prometheus_client's; a percentile is read from the difference of two scrapes' histogram buckets
(linear within a bucket, as Prometheus' ``histogram_quantile`` does)."""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from tandem.errors import TandemError

FIRST_STEP = "tandem_reasoning_first_step_seconds"
QUEUE = "tandem_reasoning_queue_seconds"
SCHEDULER_EVENTS = "tandem_reasoning_scheduler_total"


@dataclass(frozen=True)
class Scrape:
    """Samples of one scrape: (sample name, sorted label pairs) -> value."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
        wanted = set(labels.items())
        return sum(v for (n, lbl), v in self.samples.items() if n == name and wanted <= set(lbl))

    def buckets(self, name: str, **labels: str) -> dict[float, float]:
        """Cumulative bucket counts of histogram ``name``: upper bound -> count."""
        wanted = set(labels.items())
        out: dict[float, float] = {}
        for (n, lbl), v in self.samples.items():
            if n == f"{name}_bucket" and wanted <= set(lbl):
                bound = float(dict(lbl)["le"])
                out[bound] = out.get(bound, 0.0) + v
        return out


def parse_metrics(text: str) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return Scrape(samples)


def scrape(url: str, timeout_s: float = 10.0) -> Scrape:
    """GET Triton's metrics endpoint (``http://host:port/metrics``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (an http URL we were given)
            return parse_metrics(response.read().decode("utf-8"))
    except OSError as exc:
        raise TandemError(f"cannot read Triton's metrics at {url} ({exc}); start the server with metrics enabled") from exc


def histogram_mean(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """The exact mean of the observations made between two scrapes, from the histogram's ``_sum`` and
    ``_count`` (NaN when there were none): no bucket bounds enter it, unlike a quantile read from
    buckets, which is exact only to a bucket's width."""
    count = after.value(f"{name}_count", **labels) - before.value(f"{name}_count", **labels)
    if count <= 0:
        return math.nan
    return (after.value(f"{name}_sum", **labels) - before.value(f"{name}_sum", **labels)) / count


def histogram_quantile(before: Scrape, after: Scrape, name: str, q: float, **labels: str) -> float:
    """The ``q`` quantile of the observations made between two scrapes (NaN when there were none)."""
    if not 0.0 <= q <= 1.0:
        raise TandemError(f"quantile must lie in [0, 1], got {q}")
    start, end = before.buckets(name, **labels), after.buckets(name, **labels)
    bounds = sorted(end)
    counts = [end[b] - start.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return math.nan
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, count
    return lower
