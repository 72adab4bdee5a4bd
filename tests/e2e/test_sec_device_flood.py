"""Two findings against the device-facing API.

1. Telemetry numbers were unbounded: a sample with request_count 2^63-1 was
   stored, and once another sample landed in the same window every
   QueryTelemetry of a summed metric failed for every user (SQLite's SUM
   overflowed int64: "UNAVAILABLE: the database is unavailable"). Every
   number of a sample now has a plausible range (api/limits.py RANGES),
   refused with INVALID_ARGUMENT naming the field and the range before the
   upload joins a group commit; and the SQL sums floats and clamps rollup
   rows, so a row an older server stored breaks no query and no rollup.

2. Status reports were not rate-limited: one Sync stream sent 20,000 in 6 s,
   each stored as a deployment event. Each device now has two buckets
   (services/ratelimit.py StatusRateLimit): past the written rate a stream
   coalesces its reports (only the latest is kept and written when a token
   comes), past the received rate the stream ends with RESOURCE_EXHAUSTED.

Here, real `edgefleet server` processes on SQLite and PostgreSQL attacked
by real gRPC clients; the ranges, the buckets and the agent's own reporting
through the real StatusReporter: tests/unit/test_sec_device_flood.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.api.rpc import RETRY_AFTER_MS
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.db.engine import make_engine
from edgefleet.controlplane.db.models import TelemetryRollupRow, TelemetryRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.services import telemetry as telemetry_service
from edgefleet.controlplane.services.deployments import MULTI_MODEL_PROTOCOL, ONE_MODEL_PROTOCOL
from edgefleet.controlplane.services.ratelimit import (
    STATUS_BURST,
    STATUS_RATE_PER_S,
    STATUS_WRITE_BURST,
    STATUS_WRITE_RATE_PER_S,
)
from edgefleet.controlplane.services.telemetry import TelemetryService
from edgefleet.update_state import of_status, to_wire
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.fuzzing import ServerMemory
from testkit.harness import ADMIN_TOKEN, ControlPlane
from testkit.sample_ranges import INT64_MAX, OUT_OF_RANGE, UINT64_MAX

pytestmark = pytest.mark.timeout(300)
ADMIN = bearer_metadata(ADMIN_TOKEN)


# ---------------------------------------------------------------- helpers


def _stamp(at: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _sample(seq: int, at: dt.datetime, **fields: Any) -> d.TelemetrySample:
    values: dict[str, Any] = {
        "model_name": "m", "model_version": "1", "request_count": 100, "error_count": 5,
        "timeout_count": 1, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0,
        "latency_p99_ms": 3.0, "latency_max_ms": 4.0, "memory_mb": 64.0, "cpu_percent": 25.0,
    }  # fmt: skip
    return d.TelemetrySample(seq=seq, at=_stamp(at), **(values | fields))


async def _enroll(channel: grpc.aio.Channel, hw_id: str) -> d.EnrollResponse:
    token = await og.OperatorServiceStub(channel).CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name=hw_id, policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT),
        metadata=ADMIN,
    )
    return await dg.DeviceServiceStub(channel).Enroll(
        d.EnrollRequest(enrollment_token=token.secret, hardware_id=hw_id)
    )


def _scalar(db_url: str, sql: str, **params: Any) -> Any:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()
    finally:
        engine.dispose()


async def _query_every_metric(
    op: og.OperatorServiceStub, start: dt.datetime, end: dt.datetime
) -> dict[str, dict[str, list[float]]]:
    """Every metric, grouped by device: what QueryTelemetry answers."""
    answers: dict[str, dict[str, list[float]]] = {}
    for metric in o.TelemetryMetric.values():
        if metric == o.TELEMETRY_METRIC_UNSPECIFIED:
            continue
        response = await op.QueryTelemetry(
            o.QueryTelemetryRequest(
                metric=metric, start=_stamp(start), end=_stamp(end),
                group_by=o.TELEMETRY_GROUP_BY_DEVICE,
            ),
            metadata=ADMIN, timeout=30,
        )  # fmt: skip
        answers[o.TelemetryMetric.Name(metric)] = {
            s.group: [p.value for p in s.points] for s in response.series
        }
    return answers


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path / "cp", db_url)
    cp.start()
    try:
        yield cp
    finally:
        cp.close()


@pytest.fixture
async def channel(server: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


# ---------------------------------------------------------------- finding 1


async def test_samples_out_of_range_are_refused_whole_and_queries_keep_working(
    channel: grpc.aio.Channel, db_url: str
) -> None:
    stub, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
    attacker, victim = await _enroll(channel, "hw-attacker"), await _enroll(channel, "hw-victim")
    as_attacker = bearer_metadata(attacker.device_credential)
    now = dt.datetime.now(dt.UTC)
    for field, value, says in OUT_OF_RANGE:
        good = _sample(1, now)
        bad = _sample(2, now)
        if field == "seq":
            bad.seq = UINT64_MAX
            says = "between 1 and 9,223,372,036,854,775,807"
        else:
            setattr(bad, field, value)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.UploadTelemetry(
                d.UploadTelemetryRequest(samples=[good, bad]), metadata=as_attacker, timeout=30
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        details = refused.value.details() or ""
        assert details.startswith(f"samples[1].{field} is "), details
        assert says in details, details
    # Nothing of any refused upload was stored, not even its good sample.
    stored = _scalar(db_url, "SELECT count(*) FROM telemetry WHERE device_id = :d",
                     d=attacker.device_id)  # fmt: skip
    assert stored == 0

    # The finding's attack: 2^63-1 requests, then an ordinary sample beside
    # it. The first is refused; the other device's data answers every metric.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.UploadTelemetry(
            d.UploadTelemetryRequest(samples=[_sample(1, now, request_count=INT64_MAX)]),
            metadata=as_attacker,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for seq in (1, 2):
        await stub.UploadTelemetry(
            d.UploadTelemetryRequest(samples=[_sample(seq, now)]),
            metadata=bearer_metadata(victim.device_credential),
        )
    await stub.UploadTelemetry(
        d.UploadTelemetryRequest(samples=[_sample(1, now, request_count=10**9)]),
        metadata=as_attacker,
    )  # the most a sample may count is accepted
    answers = await _query_every_metric(
        op, now - dt.timedelta(minutes=5), now + dt.timedelta(minutes=5)
    )
    assert answers["TELEMETRY_METRIC_REQUEST_COUNT"][victim.device_id] == [200.0]
    assert answers["TELEMETRY_METRIC_REQUEST_COUNT"][attacker.device_id] == [1e9]
    assert answers["TELEMETRY_METRIC_ERROR_RATE"][victim.device_id] == [pytest.approx(0.05)]


def _legacy_row(device_id: str, seq: int, at_ms: int) -> dict[str, Any]:
    """A sample as a server before the ranges stored it: the largest counts
    and finite gauges the old checks let through."""
    return {
        "device_id": device_id, "class_name": "", "seq": seq, "at_ms": at_ms,
        "model_name": "m", "model_version": "1", "request_count": INT64_MAX,
        "error_count": INT64_MAX, "timeout_count": INT64_MAX, "dropped_samples": INT64_MAX,
        "latency_p50_ms": 1e308, "latency_p95_ms": 1e308, "latency_p99_ms": 1e308,
        "latency_max_ms": 1e308, "memory_mb": 1e308, "cpu_percent": 1e308,
        "system_memory_percent": 100.0, "shadow_requests": INT64_MAX,
    }  # fmt: skip


async def test_rows_stored_before_the_ranges_break_no_query_and_no_rollup(
    channel: grpc.aio.Channel, db_url: str
) -> None:
    stub, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
    old, other = await _enroll(channel, "hw-old"), await _enroll(channel, "hw-other")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    now_ms = int(now.timestamp() * 1000)
    for credential in (old.device_credential, other.device_credential):
        await stub.UploadTelemetry(
            d.UploadTelemetryRequest(samples=[_sample(1, now), _sample(2, now)]),
            metadata=bearer_metadata(credential),
        )
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(TelemetryRow),
                [_legacy_row(old.device_id, 3, now_ms), _legacy_row(old.device_id, 4, now_ms)],
            )
        start, end = now - dt.timedelta(hours=2), now + dt.timedelta(hours=1)
        # Before the fix: "UNAVAILABLE: the database is unavailable" on SQLite
        # (integer overflow), "value out of range" on PostgreSQL (float sums).
        answers = await _query_every_metric(op, start, end)
        assert answers["TELEMETRY_METRIC_REQUEST_COUNT"][other.device_id] == [200.0]
        assert answers["TELEMETRY_METRIC_REQUEST_COUNT"][old.device_id] == [
            pytest.approx(200 + 2 * INT64_MAX, rel=1e-9)
        ]

        # The hourly rollup of those rows (the job would have been stuck on
        # that hour for good), then a late sample merged into a rollup row
        # that an old server made of one such sample.
        service = TelemetryService(Database(engine))
        assert service.roll_up(now=now + dt.timedelta(days=8)) == 6
        with engine.begin() as conn:
            hour_ms = now_ms - now_ms % 3_600_000
            columns = set(TelemetryRollupRow.__table__.c.keys()) - {"device_id"}
            rollup = {k: v for k, v in _legacy_row("", 0, 0).items() if k in columns}
            conn.execute(
                sa.insert(TelemetryRollupRow),
                [rollup | {"device_id": old.device_id, "hour_ms": hour_ms, "model_version": "2",
                           "sample_count": 1, "max_latency_p50_ms": 1e308,
                           "max_latency_p95_ms": 1e308, "max_latency_p99_ms": 1e308,
                           "limited_samples": 0}],
            )  # fmt: skip
            conn.execute(
                sa.insert(TelemetryRow),
                [_legacy_row(old.device_id, 5, now_ms) | {"model_version": "2"}],
            )
        assert service.roll_up(now=now + dt.timedelta(days=8)) == 1
        with engine.connect() as conn:
            merged = conn.execute(
                sa.select(TelemetryRollupRow.request_count).where(
                    TelemetryRollupRow.device_id == old.device_id,
                    TelemetryRollupRow.model_version == "2",
                )
            ).scalar_one()
        assert telemetry_service.ROW_COUNT_CAP < merged <= INT64_MAX
        answers = await _query_every_metric(op, start, end)
        assert answers["TELEMETRY_METRIC_REQUEST_COUNT"][other.device_id] == [200.0]
        assert answers["TELEMETRY_METRIC_ERROR_RATE"][other.device_id] == [pytest.approx(0.05)]
        assert all(
            math.isfinite(v) for series in answers.values() for vs in series.values() for v in vs
        )
    finally:
        engine.dispose()


# ---------------------------------------------------------------- finding 2

REASON = "r" * 16_000  # near the 16,384-character limit of a reason


def _hello(protocol: int = MULTI_MODEL_PROTOCOL, **fields: Any) -> d.AgentMessage:
    """A Hello as an agent of `protocol` sends it (the current agent: 2)."""
    return d.AgentMessage(hello=d.Hello(protocol=protocol, **fields))


def _report(
    i: int, state: str | None = None, protocol: int = MULTI_MODEL_PROTOCOL, reason: str = REASON
) -> d.AgentMessage:
    """The finding's flood: Downloading and Verifying in turn, each with a
    16 KB reason, so every report is a new step of the history. As the
    current agent reports it (one model's status in StatusReport.models), or
    as a one-model agent did (StatusReport.update, the state a string)."""
    name = state or ("downloading" if i % 2 == 0 else "verifying")
    status = c.UpdateStatus(
        model_name="m", model_version="1.0.0", sequence=1, reason=reason,
        bytes_done=i, bytes_total=10**9,
    )  # fmt: skip
    if protocol < MULTI_MODEL_PROTOCOL:
        status.legacy_state = name
        return d.AgentMessage(status=d.StatusReport(applied_revision=1, update=status))
    status.state = to_wire(name)
    return d.AgentMessage(status=d.StatusReport(applied_revision=1, models=[status]))


def _events(db_url: str, device_id: str) -> int:
    return int(_scalar(db_url, "SELECT count(*) FROM deployment_events WHERE device_id = :d",
                       d=device_id))  # fmt: skip


def _states(db_url: str, device_id: str) -> list[str]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT state FROM deployment_events WHERE device_id = :d ORDER BY id"),
                {"d": device_id},
            )
            return [str(s) for (s,) in rows]
    finally:
        engine.dispose()


async def _wait_state(op: og.OperatorServiceStub, device_id: str, state: str) -> c.UpdateStatus:
    got = None
    for _ in range(200):
        got = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
        if of_status(got.update) == state:
            return got.update
        await asyncio.sleep(0.05)
    raise AssertionError(f"device {device_id} never reported {state}: {got}")


async def test_a_status_flood_is_cut_off_with_bounded_events_and_memory_while_another_device_syncs(
    server: ControlPlane, channel: grpc.aio.Channel, db_url: str
) -> None:
    stub, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
    attacker, victim = await _enroll(channel, "hw-flood"), await _enroll(channel, "hw-agent")
    sqlite_file = Path(db_url.removeprefix("sqlite:///")) if db_url.startswith("sqlite") else None

    def db_bytes() -> int:
        if sqlite_file is None:
            return 0
        return sum(p.stat().st_size for p in sqlite_file.parent.glob(sqlite_file.name + "*"))

    # Warm up the server (both streams' code paths) before measuring memory.
    warm = stub.Sync(
        iter([_hello(), _report(0)]),
        metadata=bearer_metadata(victim.device_credential),
    )
    await warm.read()
    warm.cancel()
    await asyncio.sleep(0.5)

    sent = 0
    flood_done = asyncio.Event()
    flood_over = threading.Event()

    def flood_messages() -> Iterator[d.AgentMessage]:
        nonlocal sent
        yield _hello(applied_revision=1)
        for i in range(5000):
            yield _report(i)
            sent += 1
        flood_over.wait(120)

    def flood() -> grpc.RpcError:
        """The flooder on the blocking stack: grpc.aio may report a write
        racing the server's early status as INTERNAL in its place
        (grpc/grpc#36066); the blocking stack reports the real status."""
        with grpc.insecure_channel(server.address) as blocking:
            replies = dg.DeviceServiceStub(blocking).Sync(
                flood_messages(), metadata=bearer_metadata(attacker.device_credential),
                timeout=120,
            )  # fmt: skip
            try:
                for _ in replies:
                    pass
            except grpc.RpcError as exc:
                return exc
        raise AssertionError(f"the flood was never cut off ({sent} reports)")

    victim_steps = ["downloading"] * 4 + ["verifying", "validating", "activating", "committed"]
    victim_end: list[Any] = []

    async def victim_messages() -> AsyncIterator[d.AgentMessage]:
        yield _hello(applied_revision=1)
        # As an agent does it: progress every 0.5 s, every state change,
        # heartbeats, while the flood runs.
        for i, state in enumerate(victim_steps):
            await asyncio.sleep(0.5 if state == "downloading" else 0.05)
            yield _report(i, state, reason="")
            yield d.AgentMessage(heartbeat=d.Heartbeat(seq=i + 1))
        await flood_done.wait()

    async def run_victim() -> None:
        call = stub.Sync(victim_messages(), metadata=bearer_metadata(victim.device_credential))
        acks = 0
        try:
            async for message in call:
                acks += message.WhichOneof("kind") == "heartbeat_ack"
                if acks == len(victim_steps):
                    break
        finally:
            victim_end.append(acks)
            call.cancel()

    size_before = db_bytes()
    started = time.monotonic()
    assert server.proc is not None
    # The peak (VmHWM, reset first), not samples of it (bench/fuzzing.py).
    memory = ServerMemory(server.proc.pid)
    rss_before = memory.before_call()
    victim_task = asyncio.create_task(run_victim())
    ended: Any = await asyncio.to_thread(flood)
    elapsed = time.monotonic() - started
    flood_over.set()
    flood_done.set()
    await asyncio.wait_for(victim_task, 30)
    await asyncio.sleep(1.0)  # the status buffer's flushes
    growth_mb = memory.growth(rss_before) / 2**20
    assert ended.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = ended.details() or ""
    assert f"device {attacker.device_id} sent more than {STATUS_BURST} status reports" in details
    assert "the Hello carries the current status" in details
    retry_ms = [int(v) for k, v in ended.trailing_metadata() or () if k == RETRY_AFTER_MS]
    assert len(retry_ms) == 1 and 0 < retry_ms[0] <= 1000 / STATUS_RATE_PER_S + 1

    # Cut off after the received bucket: its burst and rate over the time it ran
    # (the client had queued some more when the stream ended).
    assert sent < 5000
    events = _events(db_url, attacker.device_id)
    bound = STATUS_WRITE_BURST + STATUS_WRITE_RATE_PER_S * elapsed + 2
    growth = db_bytes() - size_before
    print(
        f"\nflood: {sent} reports queued by the client in {elapsed:.2f} s; "
        f"{events} deployment events stored (bound {bound:.0f}); server RSS "
        f"+{growth_mb:.1f} MB at peak; database +{growth / 2**20:.2f} MB"
    )
    assert 0 < events <= bound, (events, bound)
    assert growth_mb < 40, growth_mb
    if sqlite_file is not None:
        assert growth < 8 * 2**20, growth

    # The other device: its stream was never refused, every heartbeat acked,
    # and every step of its update is in the history.
    assert victim_end == [len(victim_steps)]
    assert of_status(await _wait_state(op, victim.device_id, "committed")) == "committed"
    # (The warm-up's "downloading" was the same step as the first here.)
    steps = ["downloading", "verifying", "validating", "activating", "committed"]
    assert _states(db_url, victim.device_id) == steps

    # The attacker reconnects as an agent does, after the delay it was told:
    # its Hello carries its current status, which is recorded.
    await asyncio.sleep(max(retry_ms[0] / 1000, 1.0))
    hello = _hello(
        applied_revision=1,
        models=[c.UpdateStatus(state=c.UPDATE_STATE_FAILED, model_name="m",
                               model_version="1.0.0", sequence=1, reason="gave up")],
    )  # fmt: skip

    async def again() -> AsyncIterator[d.AgentMessage]:
        yield hello
        await asyncio.sleep(30)

    call = stub.Sync(again(), metadata=bearer_metadata(attacker.device_credential))
    first = await call.read()
    assert first.WhichOneof("kind") == "desired"
    status = await _wait_state(op, attacker.device_id, "failed")
    assert status.reason == "gave up"
    call.cancel()


@pytest.mark.parametrize("protocol", [ONE_MODEL_PROTOCOL, MULTI_MODEL_PROTOCOL])
async def test_reports_over_the_written_rate_are_coalesced_and_the_latest_is_kept(
    channel: grpc.aio.Channel, db_url: str, protocol: int
) -> None:
    """Under the received bucket (no cut-off) but past the written one: the
    stream stays up, the database gets at most the written rate, and the
    last report sent is what the device's status says; from a current agent
    and from a one-model one (its statuses come in another field)."""
    stub, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
    device = await _enroll(channel, "hw-burst")
    count = STATUS_BURST // 2
    stop = asyncio.Event()

    async def messages() -> AsyncIterator[d.AgentMessage]:
        yield _hello(protocol, applied_revision=1)
        for i in range(count - 1):
            yield _report(i, protocol=protocol)
        yield _report(count, "validating", protocol, reason="the last one")
        await stop.wait()

    started = time.monotonic()
    call = stub.Sync(messages(), metadata=bearer_metadata(device.device_credential))
    assert (await call.read()).WhichOneof("kind") == "desired"
    status = await _wait_state(op, device.device_id, "validating")
    elapsed = time.monotonic() - started
    assert status.reason == "the last one"
    await asyncio.sleep(0.5)
    stop.set()
    call.cancel()
    events = _events(db_url, device.device_id)
    assert 0 < events <= STATUS_WRITE_BURST + STATUS_WRITE_RATE_PER_S * (elapsed + 0.5) + 2
    # The history ends with the latest report, however many were folded.
    assert _states(db_url, device.device_id)[-1] == "validating"
