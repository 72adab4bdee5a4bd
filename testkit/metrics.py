"""Reading a control plane's /metrics (the Prometheus text exposition) from a
test or a benchmark: histograms and gauges as scraped, several processes'
histograms merged, and what a histogram observed between two scrapes."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class HistogramScrape:
    """One histogram (of one label set) as scraped: cumulative count per
    upper bound, and the sum of what was observed."""

    buckets: dict[float, float]
    total: float


def _metric_families(url: str) -> Iterable[Metric]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return text_string_to_metric_families(text)


def scrape_histograms(url: str, names: tuple[str, ...]) -> dict[str, HistogramScrape]:
    """The named histograms at `url` (a Prometheus text endpoint). A
    labelled one is named with its labels, as in the exposition:
    'edgefleet_gc_pause_seconds{generation="2"}'."""
    buckets: dict[str, dict[float, float]] = {}
    totals: dict[str, float] = {}
    for family in _metric_families(url):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            name = family.name + (
                "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                if labels else ""
            )  # fmt: skip
            if name not in names:
                continue
            if sample.name.endswith("_bucket"):
                buckets.setdefault(name, {})[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                totals[name] = sample.value
    return {n: HistogramScrape(b, totals.get(n, 0.0)) for n, b in buckets.items()}


def scrape_gauge(url: str, name: str) -> float | None:
    """An unlabelled gauge's value at `url` (a Prometheus text endpoint)."""
    for family in _metric_families(url):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def merge_histograms(scrapes: Sequence[dict[str, HistogramScrape]]) -> dict[str, HistogramScrape]:
    """The same histograms scraped from several processes (the workers) as
    one: per bound the counts add up, and so do the sums."""
    merged: dict[str, HistogramScrape] = {}
    for scrape in scrapes:
        for name, h in scrape.items():
            into = merged.get(name, HistogramScrape({}, 0.0))
            buckets = {b: into.buckets.get(b, 0.0) + h.buckets.get(b, 0.0)
                       for b in into.buckets.keys() | h.buckets.keys()}  # fmt: skip
            merged[name] = HistogramScrape(buckets, into.total + h.total)
    return merged


def histogram_summary(before: HistogramScrape, after: HistogramScrape) -> dict[str, float]:
    """What was observed between two scrapes: the count, the sum and, for
    p50, p99 and p99.9, the upper bound of the bucket the quantile falls in
    (a histogram knows no finer; inf: above the largest bound)."""
    bounds = sorted(after.buckets)
    counts = [after.buckets[b] - before.buckets.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    summary: dict[str, float] = {"count": total, "sum_s": after.total - before.total}
    for label, q in (("p50_le_s", 0.50), ("p99_le_s", 0.99), ("p999_le_s", 0.999)):
        summary[label] = next(
            (b for b, c in zip(bounds, counts, strict=True) if total and c >= q * total),
            math.nan,
        )
    return summary
