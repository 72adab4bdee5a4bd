"""Garbage-collector settings for a serving control plane.

CPython's cyclic collector stops every thread while it runs. With the
defaults (700, 10, 10) a control plane holding 2,000 sync streams ran a
full (generation 2) collection every 5 s, 270-340 ms each: every stream's
heartbeat waited behind it, and that alone put the sync p99 near 300 ms
(bench/bench_soak.py, docs/benchmarks.md "Soak"). Two changes:

- freeze what start-up made (modules, mappers, the schema: about 150,000
  objects) so no collection walks it again;
- collect the youngest generation every 50,000 allocations, not 700, so
  the objects of requests in flight die young instead of being promoted
  and walked by full collections. A young collection then takes 30-90 ms
  every few seconds;
- collect the middle generation every 100 young collections, not 20
  (CPython's default is 10). Nearly half of what a young collection finds
  at 10,000 devices is the read each sync stream keeps posted between two
  of its messages (a dozen grpc.aio objects that live up to a heartbeat
  interval, then die by reference count). Every 20 young collections
  (about a minute there) the middle one walked them again, for
  250-500 ms. Every 100 it runs every 4-5 minutes, and a full
  collection (every 20 middle ones) about every 90 minutes.

Reference cycles are still collected, later: cyclic garbage that survives
into the oldest generation waits for the next full collection."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Histogram

THRESHOLDS = (50_000, 100, 20)
# Overrides THRESHOLDS: three integers, e.g. "10000,20,20".
THRESHOLDS_ENV = "EDGEFLEET_GC_THRESHOLDS"


def thresholds(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """THRESHOLDS, or what THRESHOLDS_ENV says; ValueError naming the
    variable if it is not three positive integers."""
    raw = environ.get(THRESHOLDS_ENV, "").strip()
    if not raw:
        return THRESHOLDS
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{THRESHOLDS_ENV}={raw!r}: give three positive integers, e.g. "
                         f"{','.join(map(str, THRESHOLDS))}")  # fmt: skip
    return values[0], values[1], values[2]


def tune_for_serving(limits: tuple[int, int, int] = THRESHOLDS) -> None:
    """Freeze the start-up heap and set `limits` (call once, when serving)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*limits)


def pause_histogram(registry: CollectorRegistry) -> Histogram:
    """Collections' pauses by generation, registered in `registry`."""
    return Histogram(
        "edgefleet_gc_pause_seconds",
        "How long a cyclic garbage collection stopped every thread, by generation",
        ["generation"],
        registry=registry,
        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    )


def observe_pauses(histogram: Histogram) -> Callable[[], None]:
    """Time every collection into `histogram` (a gc callback); returns the
    function that stops it. A full collection walks every live object that
    is not frozen, and with 10,000 device streams that is millions of them:
    this is where such a pause shows, rather than as an unexplained stall of
    every stream at once."""
    by_generation = [histogram.labels(str(g)) for g in range(3)]
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            by_generation[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)
    return lambda: gc.callbacks.remove(callback)
