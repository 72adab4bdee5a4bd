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
  every few seconds and a full one runs about every half hour.

Reference cycles are still collected, later: cyclic garbage that survives
into the oldest generation waits for the next full collection."""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 20)


def tune_for_serving() -> None:
    """Freeze the start-up heap and set THRESHOLDS (call once, when serving)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
