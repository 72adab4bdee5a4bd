"""Telemetry rate limits without a server: the per-device token bucket
(services/ratelimit.py) fills, refills at its rate up to its burst and
forgets only full buckets; a refused batch takes nothing and passes after
exactly the delay it was told; the service's limit and its defaults; and
the agent reading the delay from the trailer. Against servers:
tests/integration/test_sec_telemetry_rate.py and
tests/e2e/test_sec_telemetry_rate.py."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import grpc.aio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.telemetry_uploader import RETRY_AFTER_MS, retry_after_s
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.errors import ResourceExhausted
from edgefleet.controlplane.services.ratelimit import (
    DEFAULT_BURST,
    DEFAULT_RATE_PER_S,
    RateLimiter,
    TelemetryRateLimit,
)
from testkit.clock import FakeClock


def test_a_new_bucket_is_full_then_refills_at_the_rate_up_to_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=10.0, burst=100, clock=clock)
    assert limiter.acquire("a", 60) == 0.0
    assert limiter.acquire("a", 40) == 0.0  # the whole burst at once
    assert limiter.acquire("a", 1) == pytest.approx(0.1)  # empty: one token in 0.1 s
    clock.now += 2.5
    assert limiter.acquire("a", 25) == 0.0  # 2.5 s x 10/s
    assert limiter.acquire("a", 1) == pytest.approx(0.1)
    clock.now += 3600  # an idle hour refills to the burst, not past it
    assert limiter.acquire("a", 100) == 0.0
    assert limiter.acquire("a", 1) > 0.0


def test_a_refused_batch_takes_nothing_and_passes_after_exactly_the_delay_it_was_told() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=4.0, burst=20, clock=clock)
    assert limiter.acquire("a", 18) == 0.0  # 2 left
    wait = limiter.acquire("a", 10)
    assert wait == pytest.approx(2.0)  # 8 more tokens at 4/s
    # Refusals took nothing: asking again and again changes no answer.
    for _ in range(5):
        assert limiter.acquire("a", 10) == pytest.approx(2.0)
    assert limiter.acquire("a", 2) == 0.0  # what is there can still be taken...
    assert limiter.acquire("a", 10) == pytest.approx(2.5)  # ...and moves the wait
    clock.now += 2.5
    assert limiter.acquire("a", 10) == 0.0  # the same batch, whole, after the delay
    assert limiter.acquire("a", 21) == math.inf  # above the burst: never


def test_devices_have_their_own_buckets_and_pruning_forgets_only_full_ones() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1.0, burst=10, clock=clock)
    assert limiter.acquire("flooder", 10) == 0.0
    assert limiter.acquire("flooder", 1) > 0
    assert limiter.acquire("victim", 10) == 0.0  # untouched by the flooder
    for i in range(3000):  # enough new keys to prune more than once
        assert limiter.acquire(f"dev-{i}", 1) == 0.0
        clock.now += 0.001
    # The flooder's bucket is not full (3 s of refill): it was kept, and is
    # still 7 tokens short of a full burst...
    assert limiter.acquire("flooder", 10) == pytest.approx(7.0, abs=0.01)
    # ...while buckets that refilled were dropped: the table stays bounded.
    clock.now += 10
    limiter.acquire("one-more", 1)
    assert len(limiter) < 3000


@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=2), st.integers(min_value=1, max_value=50)),
        max_size=200,
    )
)
@settings(max_examples=200, deadline=None)
def test_what_is_granted_never_exceeds_the_burst_plus_the_rate_times_the_time(
    steps: list[tuple[float, int]],
) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=7.0, burst=50, clock=clock)
    start, granted = clock.now, 0
    for advance, cost in steps:
        clock.now += advance
        wait = limiter.acquire("d", cost)
        if wait == 0.0:
            granted += cost
        else:
            assert wait > 0
            # The wait is honest: after it, the same cost passes.
            clock.now += wait
            assert limiter.acquire("d", cost) == 0.0
            granted += cost
        assert granted <= 50 + 7.0 * (clock.now - start) + 1e-6


def test_the_telemetry_limit_refuses_with_a_message_and_a_delay() -> None:
    clock = FakeClock()
    limit = TelemetryRateLimit(rate_per_s=2.0, burst=500, clock=clock)
    limit.charge("dev-1", 500)
    with pytest.raises(ResourceExhausted) as refused:
        limit.charge("dev-1", 10)
    assert refused.value.retry_after_s == pytest.approx(5.0)
    message = refused.value.message
    assert "dev-1" in message and "2 samples/s" in message and "500" in message
    assert "in 5.0 s" in message
    limit.charge("dev-2", 0)  # another device; an empty upload costs one token
    clock.now += 5.0
    limit.charge("dev-1", 10)
    with pytest.raises(ResourceExhausted) as refused:
        limit.charge("dev-1", 0)
    assert refused.value.retry_after_s == pytest.approx(0.5)
    with pytest.raises(ResourceExhausted) as refused:
        limit.charge("dev-3", 501)  # can never pass: no delay to wait for
    assert refused.value.retry_after_s is None and "at most 500" in refused.value.message


def test_limits_that_cannot_work_are_refused_and_the_defaults_follow_the_agent() -> None:
    for rate in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rate"):
            RateLimiter(rate, 10)
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(1.0, 0)
    with pytest.raises(ValueError, match="at least 500"):
        TelemetryRateLimit(5.0, 499)  # a full batch would never pass
    # Ten times a device with five model versions at the 10 s interval, and
    # four of the agent's 500-sample batches at once.
    from edgefleet.agent.config import AgentConfig
    from edgefleet.agent.telemetry_uploader import MAX_BATCH

    normal = 5 / AgentConfig(server="x").telemetry_interval_s
    assert pytest.approx(10 * normal) == DEFAULT_RATE_PER_S
    assert DEFAULT_BURST == 4 * MAX_BATCH
    config = ServerConfig(data_dir=Path("x"))
    assert config.telemetry_rate_per_s == DEFAULT_RATE_PER_S
    assert config.telemetry_burst == DEFAULT_BURST


def test_the_agent_reads_the_delay_from_the_trailer_and_caps_nonsense() -> None:
    def refusal(*trailers: tuple[str, str]) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*trailers),
        )

    assert retry_after_s(refusal((RETRY_AFTER_MS, "1500"))) == 1.5
    assert retry_after_s(refusal(("other", "1"))) is None
    assert retry_after_s(refusal((RETRY_AFTER_MS, "soon"))) is None
    assert retry_after_s(refusal((RETRY_AFTER_MS, str(10**12)))) == 3600.0
