"""Per-device rate limits: token buckets for telemetry samples, and for the
status reports and Hellos of the Sync stream (StatusRateLimit, at the end).

A device may store `rate_per_s` samples a second on average and `burst` at
once. Each UploadTelemetry call costs its number of samples (at least one:
an empty upload still costs a query); a call the bucket cannot pay for is
refused whole, costs nothing, and is told how long until it could be paid
for (`ResourceExhausted.retry_after_s`, sent to the client as the trailing
metadata key `retry-after-ms`, see api/rpc.py). The agent keeps the batch and
waits at least that long.

Defaults, from the agent (agent/config.py, agent/telemetry.py,
agent/telemetry_uploader.py): one sample per model version per telemetry
interval, 10 s by default, uploaded in batches of at most 500. A device
serving five model versions sends 0.5 samples/s; the default rate is ten
times that. The burst is four full batches, so an agent that was offline
flushes up to 2,000 buffered samples at once and the rest of its on-disk
backlog (at most 20,000 samples, over a day of one model) at the rate, about
an hour for a full buffer, while a flooding credential stores at most
5 samples/s (18,000 rows an hour) instead of tens of thousands a second.

The buckets live in the serving process: with `--workers N` or several
replicas a device may be served by more than one process (its reconnects
land anywhere), each with its own bucket, so the fleet-wide bound for one
device is up to N times the rate. Not thread-safe: used on the event loop
only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet.controlplane.errors import ResourceExhausted

# The agent's largest upload (agent/telemetry_uploader.py MAX_BATCH, the
# control plane's services/telemetry.py MAX_BATCH): a burst below it would
# refuse a full batch forever.
MAX_UPLOAD = 500
DEFAULT_RATE_PER_S = 5.0
DEFAULT_BURST = 4 * MAX_UPLOAD
# Float rounding must not refuse a batch retried after exactly its delay.
_EPSILON = 1e-9


@dataclass
class TokenBucket:
    """`tokens` as of `updated` (clock seconds); refills at `rate_per_s` up
    to `burst`."""

    tokens: float
    updated: float

    def refill(self, now: float, rate_per_s: float, burst: float) -> None:
        # A clock that stepped back (it is monotonic by default) refills nothing.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(burst, self.tokens + elapsed * rate_per_s)
        self.updated = max(self.updated, now)


class RateLimiter:
    """Token buckets by key, all with one rate and burst. A key not seen
    yet (or whose bucket refilled completely and was pruned) has a full
    bucket."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate must be a positive number, not {rate_per_s!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = 1024

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str, cost: int) -> float:
        """Take `cost` tokens from `key`'s bucket and return 0.0, or take
        nothing and return the seconds until the bucket will hold `cost`
        (math.inf when `cost` is above the burst: it never will)."""
        if cost > self.burst:
            return math.inf
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._maybe_prune(now)
            bucket = self._buckets[key] = TokenBucket(float(self.burst), now)
        else:
            bucket.refill(now, self.rate_per_s, self.burst)
        if bucket.tokens + _EPSILON >= cost:
            bucket.tokens = max(0.0, bucket.tokens - cost)
            return 0.0
        return (cost - bucket.tokens) / self.rate_per_s

    def _maybe_prune(self, now: float) -> None:
        """Forget buckets that have refilled completely: they decide exactly
        as a new one would. Amortised: only when the table doubled."""
        if len(self._buckets) < self._prune_at:
            return
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now, self.rate_per_s, self.burst)
            if bucket.tokens >= self.burst:
                del self._buckets[key]
        self._prune_at = max(1024, 2 * len(self._buckets))


class TelemetryRateLimit:
    """The per-device limit on telemetry uploads."""

    def __init__(
        self,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        burst: int = DEFAULT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < MAX_UPLOAD:
            raise ValueError(
                f"the telemetry burst must be at least {MAX_UPLOAD} (the largest upload), "
                f"not {burst}: a full batch would be refused forever"
            )
        self._limiter = RateLimiter(rate_per_s, burst, clock)

    @property
    def rate_per_s(self) -> float:
        return self._limiter.rate_per_s

    @property
    def burst(self) -> int:
        return self._limiter.burst

    def charge(self, device_id: str, samples: int) -> None:
        """Let an upload of `samples` from `device_id` through, or raise
        ResourceExhausted (with the delay after which it would pass)."""
        wait = self._limiter.acquire(device_id, max(1, samples))
        if wait == 0.0:
            return
        if math.isinf(wait):
            raise ResourceExhausted(
                f"{samples} samples in one upload exceed this control plane's telemetry "
                f"burst of {self.burst}; send at most {self.burst} per call"
            )
        raise ResourceExhausted(
            f"device {device_id} is over its telemetry rate limit ({self.rate_per_s:g} "
            f"samples/s, bursts of {self.burst}); keep the {samples} samples and send them "
            f"again in {wait:.1f} s",
            retry_after_s=wait,
        )


# ---------------------------------------------------------------- status reports

# What a real agent sends on its Sync stream besides heartbeats (agent/update/
# remote.py StatusReporter, agent/daemon.py): download progress at most every
# 0.5 s (progress_interval_s); one report per state change of an update
# (downloading, verifying, validating, activating, then committed or failed;
# rolling back), whose retries back off from 1 s (agent/update/machine.py
# backoff_base); one applied-revision report per desired state pushed; a Hello
# when the disk fills or has room again. A busy agent sustains under 3 a
# second and bursts at most eleven, one whole update (its revision report,
# first and last progress, every state). Written: what reaches the database;
# over it a stream coalesces (keeps only the latest), so a real agent is
# never refused for a burst, and five updates back to back pass whole.
STATUS_WRITE_RATE_PER_S = 5.0
STATUS_WRITE_BURST = 60
# Received: what a device may send at all, ten times the written bucket; over
# it the stream ends with RESOURCE_EXHAUSTED. Only a device that floods gets
# there (one sent 20,000 reports in 6 s), and every message it sends is still
# parsed and checked, so past this it costs the event loop for nothing.
STATUS_RATE_PER_S = 10 * STATUS_WRITE_RATE_PER_S
STATUS_BURST = 10 * STATUS_WRITE_BURST


class StatusRateLimit:
    """Two buckets per device for the Hellos and status reports of its Sync
    streams (all its streams share them, so reconnecting refills nothing):
    `receive` for every such message, which raises past the received rate;
    `write` for each write to the database, which says how long to wait
    (the stream coalesces meanwhile; see api/device_servicer.py)."""

    def __init__(
        self,
        rate_per_s: float = STATUS_RATE_PER_S,
        burst: int = STATUS_BURST,
        write_rate_per_s: float = STATUS_WRITE_RATE_PER_S,
        write_burst: int = STATUS_WRITE_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._received = RateLimiter(rate_per_s, burst, clock)
        self._written = RateLimiter(write_rate_per_s, write_burst, clock)

    @property
    def rate_per_s(self) -> float:
        return self._received.rate_per_s

    @property
    def burst(self) -> int:
        return self._received.burst

    @property
    def write_rate_per_s(self) -> float:
        return self._written.rate_per_s

    def receive(self, device_id: str) -> None:
        """Count one Hello or status report of `device_id`, or raise
        ResourceExhausted (with the delay after which one would pass)."""
        wait = self._received.acquire(device_id, 1)
        if wait == 0.0:
            return
        raise ResourceExhausted(
            f"device {device_id} sent more than {self.burst} status reports at once or more "
            f"than {self.rate_per_s:g} a second; this sync stream is closed: reconnect in "
            f"{wait:.1f} s or later (the Hello carries the current status)",
            retry_after_s=wait,
        )

    def write(self, device_id: str) -> float:
        """Take one write of `device_id`'s reports: 0.0, or the seconds to
        wait for one (nothing taken)."""
        return self._written.acquire(device_id, 1)
