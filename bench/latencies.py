"""Latency samples of the soak, and their summaries: kept in flat arrays
because a 10-minute soak of 10,000 devices takes millions of them, and
passed between processes (bench/soak_probe.py) as plain lists."""

from __future__ import annotations

import bisect
import math
import time
from array import array
from collections.abc import Sequence


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of sorted values; NaN for none."""
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    """count, p50/p95/p99/max in milliseconds of latencies in seconds."""
    ordered = sorted(values)
    out = {f"p{q}_ms": percentile(ordered, q) * 1000 for q in (50, 95, 99)}
    out["max_ms"] = ordered[-1] * 1000 if ordered else math.nan
    return {"count": float(len(ordered)), **out}


class Latencies:
    """Latencies (seconds) stamped with when they were taken, kept in two
    flat arrays: millions of samples cost 16 bytes each."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.at = array("d")
        self.values = array("d")

    def reset(self, t0: float) -> None:
        """Start again, stamps counted from `t0` (what came before is dropped)."""
        self.t0 = t0
        self.at = array("d")
        self.values = array("d")

    def add(self, value: float) -> None:
        self.at.append(time.monotonic() - self.t0)
        self.values.append(value)

    def to_lists(self) -> tuple[list[float], list[float]]:
        """(stamps, values): what `extend` takes, e.g. from another process."""
        return list(self.at), list(self.values)

    def extend(self, at: Sequence[float], values: Sequence[float]) -> None:
        """Add samples stamped on the same clock (seconds after t0), in order."""
        self.at.extend(at)
        self.values.extend(values)

    def window(self, start: float, end: float) -> list[float]:
        """The values taken in [start, end) seconds after t0 (stamps are
        appended in order, give or take a callback's delay)."""
        lo, hi = bisect.bisect_left(self.at, start), bisect.bisect_left(self.at, end)
        return list(self.values[lo:hi])

    def per_minute(self, minutes: int) -> list[dict[str, float]]:
        return [latency_summary(self.window(60.0 * m, 60.0 * (m + 1))) for m in range(minutes)]

    def series(self, step_s: float, end_s: float) -> list[list[float]]:
        """[start s, count, p50 ms, p99 ms, max ms] per `step_s` window: to
        line slow moments up with the operators' timeline."""
        rows = []
        for i in range(math.ceil(end_s / step_s)):
            s = latency_summary(self.window(i * step_s, (i + 1) * step_s))
            rows.append([i * step_s, s["count"], s["p50_ms"], s["p99_ms"], s["max_ms"]])
        return rows
