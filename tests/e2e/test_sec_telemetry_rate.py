"""Issue 18, finding 10: one device credential flooded UploadTelemetry (~30,000
samples/s stored). Each device now has a token bucket of samples: an upload
over it is refused whole with RESOURCE_EXHAUSTED and a `retry-after-ms`
trailer, before anything is stored, and the agent waits that long with its
samples kept.

The bucket itself with a fake clock; then, as the attacker would do it, a
real `edgefleet server` process flooded by a real gRPC client on SQLite and
PostgreSQL while another device uploads normally; then the uploader against a
real control plane with its clock in the test's hand; last a real agent with
an on-disk backlog against a server with a small limit."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import math
import re
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.telemetry import IntervalSample, RequestStats, Resources
from edgefleet.agent.telemetry_buffer import TelemetryBuffer
from edgefleet.agent.telemetry_uploader import RETRY_AFTER_MS, TelemetryUploader, retry_after_s
from edgefleet.controlplane.client import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.errors import ResourceExhausted
from edgefleet.controlplane.server import ControlPlane as InProcessControlPlane
from edgefleet.controlplane.server import create_server
from edgefleet.controlplane.services.ratelimit import (
    DEFAULT_BURST,
    DEFAULT_RATE_PER_S,
    RateLimiter,
    TelemetryRateLimit,
)
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.agent_harness import AgentProcess
from testkit.harness import ADMIN_TOKEN, ControlPlane

pytestmark = pytest.mark.timeout(300)

ADMIN = bearer_metadata(ADMIN_TOKEN)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- the bucket


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


# ---------------------------------------------------------------- helpers


def _sample(seq: int, at: dt.datetime) -> d.TelemetrySample:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return d.TelemetrySample(seq=seq, at=stamp, model_name="m", model_version="1", request_count=1)


async def _enroll(channel: grpc.aio.Channel, hw_id: str) -> d.EnrollResponse:
    token = await og.OperatorServiceStub(channel).CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name=hw_id, policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT),
        metadata=ADMIN,
    )
    return await dg.DeviceServiceStub(channel).Enroll(
        d.EnrollRequest(
            enrollment_token=token.secret,
            hardware_id=hw_id,
            hardware=c.HardwareProfile(arch="aarch64", memory_mb=2048, cpu_cores=4),
        )
    )


def _stored_seqs(db_url: str, device_id: str) -> list[int]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT seq FROM telemetry WHERE device_id = :d ORDER BY seq"),
                {"d": device_id},
            )
            return [int(seq) for (seq,) in rows]
    finally:
        engine.dispose()


def _retry_after_ms(exc: grpc.aio.AioRpcError) -> int:
    values = [v for k, v in exc.trailing_metadata() or () if k == RETRY_AFTER_MS]
    assert len(values) == 1, exc.trailing_metadata()
    return int(values[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refusals(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        body = r.read().decode()
    for line in body.splitlines():
        if (
            line.startswith("edgefleet_rpc_total{")
            and 'method="UploadTelemetry"' in line
            and 'code="RESOURCE_EXHAUSTED"' in line
        ):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


# ---------------------------------------------------------------- the attack

RATE, BURST, BATCH = 50.0, 500, 100


@pytest.fixture
def limited_server(tmp_path: Path, db_url: str) -> Iterator[ControlPlane]:
    cp = ControlPlane(
        tmp_path / "cp", db_url, "--telemetry-rate", str(RATE), "--telemetry-burst", str(BURST)
    )
    cp.start()
    try:
        yield cp
    finally:
        cp.close()


@pytest.fixture
async def channel(limited_server: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(limited_server.address) as ch:
        yield ch


async def test_a_flooding_device_is_held_to_its_rate_and_another_device_is_never_refused(
    channel: grpc.aio.Channel, db_url: str
) -> None:
    stub = dg.DeviceServiceStub(channel)
    attacker, victim = await _enroll(channel, "hw-flood"), await _enroll(channel, "hw-normal")
    as_attacker = bearer_metadata(attacker.device_credential)
    as_victim = bearer_metadata(victim.device_credential)
    now = dt.datetime.now(dt.UTC)
    accepted: list[int] = []
    refused: list[grpc.aio.AioRpcError] = []
    refused_seqs: list[int] = []
    victim_sent: list[int] = []
    flood_s = 3.0

    async def flood() -> None:
        # One call after another, as fast as the server answers: seqs only
        # grow, so every accepted batch must be stored whole.
        seq = 0
        stop = time.monotonic() + flood_s
        while time.monotonic() < stop:
            batch = [_sample(seq + i + 1, now) for i in range(BATCH)]
            seq += BATCH
            try:
                await stub.UploadTelemetry(
                    d.UploadTelemetryRequest(samples=batch), metadata=as_attacker, timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                refused.append(exc)
                refused_seqs.extend(s.seq for s in batch)
            else:
                accepted.extend(s.seq for s in batch)

    async def upload_normally() -> None:
        # Ten samples a second, one per call: a fast agent, under the limit.
        for seq in range(1, int(flood_s * 10) + 1):
            response = await stub.UploadTelemetry(
                d.UploadTelemetryRequest(samples=[_sample(seq, now)]),
                metadata=as_victim,
                timeout=30,
            )
            assert response.acked_seq == seq
            victim_sent.append(seq)
            await asyncio.sleep(0.1)

    started = time.monotonic()
    await asyncio.gather(flood(), upload_normally())
    elapsed = time.monotonic() - started

    attempts = len(accepted) // BATCH + len(refused)
    assert len(refused) > 10, f"the flood was never refused ({attempts} attempts)"
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    details = refused[0].details() or ""
    assert "rate limit" in details and "50 samples/s" in details and "send them again in" in details
    # The delay is what one more batch of 100 needs at 50/s at most.
    delays = [_retry_after_ms(e) for e in refused]
    assert all(1 <= ms <= math.ceil(BATCH / RATE * 1000) for ms in delays), delays
    # Stored: at most the burst plus the rate over the time it ran.
    bound = BURST + RATE * elapsed
    assert BURST <= len(accepted) <= bound, (len(accepted), bound, elapsed)
    # Whole batches or nothing: exactly the accepted seqs are stored.
    assert _stored_seqs(db_url, attacker.device_id) == accepted
    assert not set(refused_seqs) & set(accepted)
    # The other device, uploading all along, lost nothing.
    assert _stored_seqs(db_url, victim.device_id) == victim_sent == list(range(1, 31))

    # The delay is enough: refused, wait what the server said, and the same
    # batch passes whole.
    seq = accepted[-1] if accepted else 0
    for _ in range(20):
        batch = [_sample(seq + i + 1, now) for i in range(BATCH)]
        try:
            await stub.UploadTelemetry(
                d.UploadTelemetryRequest(samples=batch), metadata=as_attacker, timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(_retry_after_ms(exc) / 1000)
            response = await stub.UploadTelemetry(
                d.UploadTelemetryRequest(samples=batch), metadata=as_attacker, timeout=30
            )
            assert response.acked_seq == batch[-1].seq
            accepted.extend(s.seq for s in batch)
            break
        accepted.extend(s.seq for s in batch)
        seq += BATCH
    else:
        raise AssertionError("twenty batches in a row were not refused")
    assert _stored_seqs(db_url, attacker.device_id) == accepted


# ---------------------------------------------------------------- the uploader


@pytest.fixture
async def tiny_limit_server(tmp_path: Path) -> AsyncIterator[InProcessControlPlane]:
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=0, telemetry_rate_per_s=1.0, telemetry_burst=500,
        )
    )  # fmt: skip
    try:
        yield cp
    finally:
        await cp.stop(grace=0.5)


async def _uploads_refused(cp: InProcessControlPlane, at_least: int) -> int:
    """The server's count of refused uploads, once it reached `at_least`
    (the count is taken as the handler ends, which may be just after the
    client has its answer), and a moment later, so that a stray call shows."""
    labels = {"method": "UploadTelemetry", "code": "RESOURCE_EXHAUSTED"}
    for _ in range(100):
        if (cp.registry.get_sample_value("edgefleet_rpc_total", labels) or 0) >= at_least:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    return int(cp.registry.get_sample_value("edgefleet_rpc_total", labels) or 0)


async def test_the_uploader_keeps_a_refused_batch_and_sends_nothing_before_the_delay(
    tiny_limit_server: InProcessControlPlane, tmp_path: Path
) -> None:
    cp = tiny_limit_server
    async with grpc.aio.insecure_channel(cp.address) as ch:
        device = await _enroll(ch, "hw-uploader")
    now = dt.datetime.now(dt.UTC)
    stats = RequestStats(probe=lambda: Resources(memory_mb=10.0))
    buffer = TelemetryBuffer(tmp_path)
    buffer.append([IntervalSample(at=now - dt.timedelta(seconds=700 - i)) for i in range(600)])
    clock = FakeClock()
    uploader = TelemetryUploader(
        stats=stats, buffer=buffer, target=cp.address, credential=device.device_credential,
        clock=lambda: now, monotonic=clock,
    )  # fmt: skip
    try:
        # The burst takes the first 500; the next batch (100) needs 100 s at 1/s.
        result = await uploader.flush()
        assert (result.uploaded, result.acked_seq) == (500, 500)
        assert result.error == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server's own clock ran while it stored the first batch: a little less.
        assert result.retry_after_s is not None and 50 <= result.retry_after_s <= 110.01
        assert len(buffer) == 100 and buffer.dropped_total == 0
        assert await _uploads_refused(cp, 1) == 1
        wait = result.retry_after_s

        # Until the delay has passed: intervals still go into the buffer, and
        # nothing is sent (the server saw no further call).
        for _ in range(3):
            clock.now += wait / 4
            result = await uploader.tick()
            assert result.error == grpc.StatusCode.RESOURCE_EXHAUSTED and result.uploaded == 0
            assert result.retry_after_s is not None and 0 < result.retry_after_s < wait
        assert len(buffer) == 103 and await _uploads_refused(cp, 1) == 1

        # Past it (by the agent's clock) the batch is tried again; the server's
        # own clock has not moved 100 s, so it is refused again, once, and kept.
        clock.now += wait / 4 + 0.001
        result = await uploader.flush()
        assert result.error == grpc.StatusCode.RESOURCE_EXHAUSTED and result.uploaded == 0
        assert await _uploads_refused(cp, 2) == 2 and len(buffer) == 103
    finally:
        await uploader.close()
        buffer.close()


async def test_a_refusal_without_a_delay_keeps_the_old_behaviour(
    tiny_limit_server: InProcessControlPlane, tmp_path: Path
) -> None:
    """RESOURCE_EXHAUSTED with no trailer (the busy shedding): kept, and
    retried at the next flush, not held back."""
    from edgefleet.controlplane.api import device_servicer

    cp = tiny_limit_server
    async with grpc.aio.insecure_channel(cp.address) as ch:
        device = await _enroll(ch, "hw-busy")
    now = dt.datetime.now(dt.UTC)
    buffer = TelemetryBuffer(tmp_path)
    buffer.append([IntervalSample(at=now)])
    uploader = TelemetryUploader(
        stats=RequestStats(probe=Resources), buffer=buffer, target=cp.address,
        credential=device.device_credential, clock=lambda: now, monotonic=FakeClock(),
    )  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(device_servicer, "MAX_TELEMETRY_IN_FLIGHT", 0)
            result = await uploader.flush()
        assert result.error == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert result.retry_after_s is None and len(buffer) == 1
        result = await uploader.flush()
        assert result.error is None and result.acked_seq == 1
    finally:
        await uploader.close()
        buffer.close()


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


# ---------------------------------------------------------------- a real agent

_REFUSAL_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*telemetry rate-limited by the control plane; "
    r"kept buffered, next upload in ([\d.]+) s$",
    re.MULTILINE,
)


def test_a_real_agent_with_a_backlog_delivers_every_sample_at_the_allowed_rate(
    tmp_path: Path,
) -> None:
    backlog, rate, burst = 1700, 100.0, 500
    metrics_port = _free_port()
    cp = ControlPlane(
        tmp_path / "cp", None, "--telemetry-rate", str(rate), "--telemetry-burst", str(burst),
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
    )  # fmt: skip
    cp.start()
    token = cp.operator().CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="rate", policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT)
    )
    agent = AgentProcess(tmp_path / "agent", cp.address, token.secret, telemetry_interval_s=0.5)
    # A device that was offline for a while: its backlog is on disk.
    now = dt.datetime.now(dt.UTC)
    agent.state_dir.mkdir(parents=True)
    buffer = TelemetryBuffer(agent.state_dir)
    buffer.append(
        IntervalSample(at=now - dt.timedelta(seconds=backlog - i), model_name="m", request_count=1)
        for i in range(backlog)
    )
    buffer.close()
    db_url = f"sqlite:///{cp.data_dir / 'edgefleet.db'}"
    try:
        agent.start()
        device_id = str(agent.wait_for(agent.identity)["device_id"])
        started = time.monotonic()
        agent.wait_for(lambda: len(_stored_seqs(db_url, device_id)) >= backlog + 5, timeout=120)
        took = time.monotonic() - started
        assert agent.stop() == 0
        refusals = _refusals(metrics_port)
    finally:
        agent.close()
        cp.close()

    stored = _stored_seqs(db_url, device_id)
    # Every sample, once, in order: nothing was dropped or skipped.
    assert stored == list(range(1, len(stored) + 1))
    buffer = TelemetryBuffer(agent.state_dir)
    try:
        assert buffer.dropped_total == 0
        assert all(p.seq > stored[-1] for p in buffer.pending(10_000))
    finally:
        buffer.close()
    # The limit held it back: 1,200 samples past the burst at 100/s.
    assert took >= (backlog - burst) / rate * 0.9, took
    # And the agent waited as told: a few refusals (one per 500-sample batch
    # past the burst), not one per 0.5 s interval while it waited.
    log = agent.log()
    lines = [
        (dt.datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f"), float(delay))
        for at, delay in _REFUSAL_LINE.findall(log)
    ]
    assert 1 <= refusals <= 6, (refusals, log)
    assert len(lines) == refusals, log
    for (at, delay), (next_at, _) in itertools.pairwise(lines):
        assert (next_at - at).total_seconds() >= delay - 0.01, (at, delay, next_at)
