"""Agent telemetry: histogram percentiles, the bounded on-disk buffer, and an
agent that is offline and then back against a real control plane."""

from __future__ import annotations

import datetime as dt
import math
import os
import random
import socket
import sqlite3
import stat
import threading
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import generate_latest

from edgefleet.agent.telemetry import (
    PERCENTILE_ERROR,
    IntervalSample,
    LatencyHistogram,
    PowerStatus,
    RequestStats,
    Resources,
)
from edgefleet.agent.telemetry_buffer import Pending, TelemetryBuffer
from edgefleet.agent.telemetry_uploader import (
    TelemetryMetrics,
    TelemetryUploader,
    serve_metrics,
    to_proto,
)
from edgefleet.controlplane.client import bearer_metadata
from edgefleet.controlplane.server import ControlPlane
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN

ADMIN = bearer_metadata(ADMIN_TOKEN)
RES = Resources(
    memory_mb=40.0, cpu_percent=3.0, system_memory_used_percent=50.0, temperature_c=61.5
)


def _stats() -> RequestStats:
    return RequestStats(probe=lambda: RES)


def _true_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


# ---------------------------------------------------------------- histogram


@pytest.mark.parametrize(
    "latencies",
    [
        [i / 1000 for i in range(1, 1001)],  # 1 .. 1000 ms, uniform
        [random.Random(7).lognormvariate(math.log(0.004), 0.8) for _ in range(5000)],
        [0.002] * 990 + [0.5] * 10,  # a fat tail past p99
        [0.00005, 59.0],  # the two ends of the range
    ],
    ids=["uniform", "lognormal", "tail", "ends"],
)
def test_histogram_percentiles_are_within_the_bucket_error(latencies: list[float]) -> None:
    hist = LatencyHistogram()
    for value in latencies:
        hist.add(value)
    for q in (0.5, 0.95, 0.99):
        true = _true_percentile(latencies, q)
        assert hist.percentile(q) == pytest.approx(true, rel=PERCENTILE_ERROR + 1e-9), q
    assert hist.percentile(1.0) == hist.max_s == max(latencies)
    assert hist.percentile(0.5) <= hist.percentile(0.95) <= hist.percentile(0.99) <= hist.max_s


def test_histogram_outside_its_range_reports_the_min_or_max_seen() -> None:
    hist = LatencyHistogram()
    for value in (0.00001, 0.00002, 0.00003, 75.0, 80.0, 90.0):
        hist.add(value)
    assert hist.percentile(0.5) == 0.00001  # within MIN_LATENCY_S (absolute) of the truth
    assert hist.percentile(0.6) == hist.percentile(0.99) == hist.percentile(1.0) == 90.0
    hist.add(math.inf)  # a broken clock counts as the largest bucket, not a crash
    assert hist.max_s == 90.0 and hist.total == 7


def test_request_stats_per_model_version_and_reset() -> None:
    stats = _stats()
    now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    assert [s.model_name for s in stats.snapshot_and_reset(now)] == [""]  # device-level only

    def worker(n: int) -> None:
        for i in range(500):
            outcome = "timeout" if i % 50 == 0 else "error" if i % 10 == 0 else "ok"
            stats.record("digits", f"{n % 2}.0", 0.001 * (1 + i % 20), outcome)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with pytest.raises(ValueError):
        stats.record("digits", "0.0", 0.1, "lost")

    a, b = stats.snapshot_and_reset(now)
    assert (a.model_version, b.model_version) == ("0.0", "1.0")
    for s in (a, b):
        assert (s.request_count, s.error_count, s.timeout_count) == (1000, 100, 20)
        assert s.latency_max_ms == pytest.approx(20.0)
        assert s.latency_p50_ms == pytest.approx(10.0, rel=PERCENTILE_ERROR)
        assert (s.memory_mb, s.cpu_percent, s.at) == (40.0, 3.0, now)
    assert [s.request_count for s in stats.snapshot_and_reset(now)] == [0]


def test_real_resource_probe_reads_this_process() -> None:
    (sample,) = RequestStats().snapshot_and_reset(dt.datetime.now(dt.UTC))
    assert sample.memory_mb > 1 and sample.system_memory_available_mb > 1
    assert sample.cpu_percent >= 0 and 0 < sample.system_memory_used_percent <= 100


def _failing_policy() -> tuple[str, int]:
    raise RuntimeError("sensor bus gone")


@pytest.mark.parametrize(
    ("power_status", "expected"),
    [
        (None, ("normal", 0)),
        (lambda: ("limited", 2), ("limited", 2)),
        (lambda: ("normal", 0), ("normal", 0)),
        (_failing_policy, ("unknown", 0)),  # logged; telemetry goes on
        # Clipped to what the control plane accepts.
        (lambda: ("x" * 40, 2**40), ("x" * 32, 2**31 - 1)),
    ],
    ids=["no-policy", "limited", "normal", "policy-fails", "out-of-range"],
)
def test_samples_carry_the_power_policy_state(
    power_status: PowerStatus | None, expected: tuple[str, int]
) -> None:
    now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    given = RequestStats(probe=lambda: RES, power_status=power_status)
    set_later = RequestStats(probe=lambda: RES)  # the policy is built after the stats
    set_later.power_status = power_status
    for stats in (given, set_later):
        stats.record("digits", "1.0.0", 0.002, "ok")
        for sample in (*stats.snapshot_and_reset(now), *stats.snapshot_and_reset(now)):
            assert (sample.power_mode, sample.concurrency_limit) == expected


def test_the_wire_form_carries_every_field_and_leaves_missing_sensors_unset() -> None:
    now = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC)
    full = IntervalSample(
        at=now, model_name="digits", model_version="1.0.0", request_count=10, error_count=2,
        timeout_count=1, latency_p50_ms=1.0, latency_p95_ms=2.0, latency_p99_ms=3.0,
        latency_max_ms=4.0, memory_mb=40.0, cpu_percent=5.0, system_memory_used_percent=55.0,
        system_memory_available_mb=900.0, temperature_c=61.5, battery_percent=0.0,
        power_plugged=False, power_mode="limited", concurrency_limit=2,
    )  # fmt: skip
    msg = to_proto(Pending(seq=7, dropped_samples=3, sample=full))
    assert msg.at.ToDatetime(tzinfo=dt.UTC) == now
    assert (msg.seq, msg.dropped_samples, msg.model_name, msg.model_version) == (
        7, 3, "digits", "1.0.0",
    )  # fmt: skip
    assert (msg.request_count, msg.error_count, msg.timeout_count) == (10, 2, 1)
    assert (msg.latency_p50_ms, msg.latency_p95_ms, msg.latency_p99_ms, msg.latency_max_ms) == (
        1.0, 2.0, 3.0, 4.0,
    )  # fmt: skip
    assert (msg.memory_mb, msg.cpu_percent, msg.system_memory_percent) == (40.0, 5.0, 55.0)
    # An empty battery is a reading, sent as 0.0; only a missing sensor is unset.
    assert msg.HasField("temperature_c") and msg.temperature_c == 61.5
    assert msg.HasField("battery_percent") and msg.battery_percent == 0.0
    assert (msg.power_mode, msg.concurrency_limit) == ("limited", 2)
    bare = to_proto(Pending(seq=8, dropped_samples=0, sample=IntervalSample(at=now)))
    assert not bare.HasField("temperature_c") and not bare.HasField("battery_percent")
    assert (bare.power_mode, bare.concurrency_limit) == ("normal", 0)


# ---------------------------------------------------------------- buffer


def test_buffer_round_trips_every_field_and_reads_rows_from_before_them(
    tmp_path: Path,
) -> None:
    now = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC)
    sample = IntervalSample(
        at=now, model_name="digits", model_version="1.0.0", request_count=10,
        system_memory_used_percent=55.0, system_memory_available_mb=900.0,
        temperature_c=61.5, battery_percent=33.0, power_plugged=True, power_mode="limited",
        concurrency_limit=2,
    )  # fmt: skip
    buffer = TelemetryBuffer(tmp_path)
    buffer.append([sample, IntervalSample(at=now)])
    buffer.close()
    # A row written by an agent that predates the power and sensor fields.
    with sqlite3.connect(tmp_path / "telemetry.db") as old:
        old.execute(
            "INSERT INTO samples (seq, dropped, body) VALUES (3, 0, ?)",
            ('{"at":"2026-11-22T12:00:00+00:00","model_name":"digits","request_count":4}',),
        )
    buffer = TelemetryBuffer(tmp_path)
    got = [p.sample for p in buffer.pending(10)]
    buffer.close()
    assert got[:2] == [sample, IntervalSample(at=now)]
    assert got[2] == IntervalSample(at=now, model_name="digits", request_count=4)
    assert (got[2].power_mode, got[2].concurrency_limit, got[2].temperature_c) == (
        "normal", 0, None,
    )  # fmt: skip


def _fill(buffer: TelemetryBuffer, stats: RequestStats, start: dt.datetime, n: int) -> None:
    """n intervals, interval i with i requests."""
    for i in range(1, n + 1):
        for _ in range(i):
            stats.record("digits", "1.0.0", 0.002, "ok")
        buffer.append(stats.snapshot_and_reset(start + dt.timedelta(seconds=i)))


def test_buffer_bound_drops_oldest_counts_drops_and_persists_seq(tmp_path: Path) -> None:
    stats, start = _stats(), dt.datetime.now(dt.UTC)
    buffer = TelemetryBuffer(tmp_path, max_samples=3)
    _fill(buffer, stats, start, 5)  # seqs 1..5: appending 4 evicts 1, appending 5 evicts 2
    # Seq 5 reports the drop of seq 1; seq 2's drop waits for the next sample.
    assert [(p.seq, p.dropped_samples) for p in buffer.pending(10)] == [(3, 0), (4, 0), (5, 1)]
    assert (buffer.pending_drops, buffer.dropped_total, buffer.next_seq) == (1, 2, 6)
    buffer.close()

    buffer = TelemetryBuffer(tmp_path, max_samples=3)  # a restart
    assert [p.sample.request_count for p in buffer.pending(10)] == [3, 4, 5]
    assert buffer.pending(10)[0].sample.at == start + dt.timedelta(seconds=3)
    assert buffer.append(stats.snapshot_and_reset(start)) == [6]  # evicts 3
    assert [(p.seq, p.dropped_samples) for p in buffer.pending(10)] == [(4, 0), (5, 1), (6, 1)]
    # Evicting samples that carried drops passes their counts on: nothing is lost.
    assert buffer.append(stats.snapshot_and_reset(start) * 3) == [7, 8, 9]  # evict 4, 5, 6
    assert [(p.seq, p.dropped_samples) for p in buffer.pending(10)] == [(7, 1), (8, 0), (9, 0)]
    assert (buffer.pending_drops, buffer.dropped_total) == (3 + 2, 6)  # 1 + 5 == 6 reported

    assert buffer.ack(8) == 2 and [p.seq for p in buffer.pending(10)] == [9]
    # A control plane ahead of the buffer (its file was lost) moves seq past it.
    buffer.ack(100)
    assert (len(buffer), buffer.next_seq) == (0, 101)
    buffer.discard(12345)  # unknown seq: nothing happens
    assert buffer.pending_drops == 5


# ---------------------------------------------------------------- end to end


@pytest.fixture
async def channel(server: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


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


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def _sum(
    channel: grpc.aio.Channel, metric: o.TelemetryMetric.ValueType, since: dt.datetime
) -> dict[str, float]:
    start, end, step = Timestamp(), Timestamp(), Duration()
    start.FromDatetime(since - dt.timedelta(minutes=1))
    end.FromDatetime(since + dt.timedelta(minutes=9))
    step.FromTimedelta(dt.timedelta(minutes=10))
    resp = await og.OperatorServiceStub(channel).QueryTelemetry(
        o.QueryTelemetryRequest(
            metric=metric, group_by=o.TELEMETRY_GROUP_BY_DEVICE, start=start, end=end, step=step
        ),
        metadata=ADMIN,
    )
    return {s.group: sum(p.value for p in s.points) for s in resp.series}


async def test_agent_offline_then_back_delivers_exactly_once_and_reports_drops(
    channel: grpc.aio.Channel, server: ControlPlane, tmp_path: Path
) -> None:
    device = await _enroll(channel, "hw-telemetry")
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=2)
    ticks = iter(start + dt.timedelta(seconds=i) for i in range(1, 100))
    stats, metrics = _stats(), TelemetryMetrics()

    def uploader(target: str, buffer: TelemetryBuffer) -> TelemetryUploader:
        return TelemetryUploader(
            stats=stats,
            buffer=buffer,
            target=target,
            credential=device.device_credential,
            metrics=metrics,
            clock=lambda: next(ticks),
            batch_size=3,  # several batches per flush
            rpc_timeout_s=30,
        )

    # Offline: 8 intervals (interval i: i + 2 requests, 2 errors, 1 timeout)
    # into a buffer bounded at 5; intervals 1..3 are dropped.
    buffer = TelemetryBuffer(tmp_path, max_samples=5)
    offline = uploader(_closed_port(), buffer)
    for i in range(1, 9):
        for j in range(i + 2):
            outcome = ("error", "timeout")[j] if j < 2 else "ok"
            stats.record("digits", "1.0.0", 0.001 * (j + 1), outcome)
        result = await offline.tick()
        assert result.error == grpc.StatusCode.UNAVAILABLE and result.uploaded == 0
    await offline.close()
    assert [p.seq for p in buffer.pending(10)] == [4, 5, 6, 7, 8]
    # Seqs 7 and 8 report the drops of 1 and 2; the drop of 3 waits for seq 9.
    assert [p.dropped_samples for p in buffer.pending(10)] == [0, 0, 0, 1, 1]
    assert buffer.pending_drops == 1
    exposed = generate_latest(metrics.registry).decode()
    assert "edgefleet_agent_telemetry_dropped_samples 3.0" in exposed
    assert "edgefleet_agent_telemetry_buffered_samples 5.0" in exposed
    assert 'edgefleet_agent_interval_requests{model="digits",version="1.0.0"} 10.0' in exposed

    # The agent is killed after uploading seqs 4..6 but before the ack is
    # stored: the buffer still holds them, and a restart resends them.
    sent = d.UploadTelemetryRequest(samples=[to_proto(p) for p in buffer.pending(3)])
    credential = bearer_metadata(device.device_credential)
    resp = await dg.DeviceServiceStub(channel).UploadTelemetry(sent, metadata=credential)
    assert resp.acked_seq == 6
    buffer.close()

    # Back online after the restart: the uploader first flushes the backlog
    # (4..6 again: stored once), then one more interval (11 requests, 1 error)
    # reports the last drop; everything arrives once.
    buffer = TelemetryBuffer(tmp_path, max_samples=5)
    online = uploader(server.address, buffer)
    result = await online.flush()
    assert result.error is None and result.acked_seq == 8 and result.uploaded == 5
    for j in range(11):
        stats.record("digits", "1.0.0", 0.001, "ok" if j else "error")
    result = await online.tick()
    await online.close()
    assert result.error is None and result.acked_seq == 9 and result.uploaded == 1
    assert len(buffer) == 0 and buffer.next_seq == 10

    counts = await _sum(channel, o.TELEMETRY_METRIC_REQUEST_COUNT, start)
    assert counts == {device.device_id: float(sum(i + 2 for i in range(4, 9)) + 11)}
    drops = await _sum(channel, o.TELEMETRY_METRIC_DROPPED_SAMPLES, start)
    assert drops == {device.device_id: 3.0}
    errors = await _sum(channel, o.TELEMETRY_METRIC_ERROR_COUNT, start)
    assert errors == {device.device_id: 2.0 * 5 + 1}
    # The resource figures came along: one bucket, so the sum is the value.
    temperature = await _sum(channel, o.TELEMETRY_METRIC_TEMPERATURE_C, start)
    assert temperature == {device.device_id: 61.5}
    memory = await _sum(channel, o.TELEMETRY_METRIC_SYSTEM_MEMORY_PERCENT, start)
    assert memory == {device.device_id: 50.0}
    assert await _sum(channel, o.TELEMETRY_METRIC_BATTERY_PERCENT, start) == {}  # no battery

    # Nothing pending: a later flush sends nothing, and the server still acks 9.
    assert (await TelemetryUploader(
        stats=stats, buffer=buffer, target=server.address, credential=device.device_credential
    ).flush()).uploaded == 0  # fmt: skip


async def test_a_refused_sample_is_discarded_and_counted_not_blocking(
    channel: grpc.aio.Channel, server: ControlPlane, tmp_path: Path
) -> None:
    device = await _enroll(channel, "hw-clock")
    now = dt.datetime.now(dt.UTC)
    stats, buffer = _stats(), TelemetryBuffer(tmp_path)
    buffer.append(stats.snapshot_and_reset(now - dt.timedelta(days=400)))  # broken clock
    buffer.append(stats.snapshot_and_reset(now - dt.timedelta(seconds=5)))
    uploader = TelemetryUploader(
        stats=stats,
        buffer=buffer,
        target=server.address,
        credential=lambda: device.device_credential,
        clock=lambda: now,
    )
    result = await uploader.tick()
    assert (result.discarded, result.uploaded, result.error) == (1, 2, None)
    assert result.acked_seq == 3 and len(buffer) == 0
    # The refused sample is reported as a drop in the next interval's sample.
    assert buffer.pending_drops == 1
    result = await uploader.tick()
    assert result.acked_seq == 4 and buffer.pending_drops == 0 and buffer.dropped_total == 1
    await uploader.close()


def test_metrics_are_served_on_a_local_prometheus_endpoint() -> None:
    metrics = TelemetryMetrics()
    stats = _stats()
    stats.record("digits", "1.0.0", 0.004, "timeout")
    metrics.observe(stats.snapshot_and_reset(dt.datetime.now(dt.UTC)))
    port = int(_closed_port().rsplit(":", 1)[1])
    serve_metrics(metrics, port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    assert 'edgefleet_agent_interval_timeouts{model="digits",version="1.0.0"} 1.0' in body
    assert "edgefleet_agent_process_rss_mb 40.0" in body
    assert "edgefleet_agent_temperature_celsius 61.5" in body
    assert 'edgefleet_agent_power_mode{mode="normal"} 1.0' in body
    assert "edgefleet_agent_concurrency_limit 0.0" in body
    assert "python_gc" not in body  # its own registry, not the process-global one


def test_the_buffer_files_are_private(tmp_path: Path) -> None:
    """Like every other state file, whatever the umask (the database and
    the -wal and -shm files SQLite makes with its mode)."""
    old = os.umask(0o022)
    try:
        buffer = TelemetryBuffer(tmp_path)
        buffer.close()
    finally:
        os.umask(old)
    made = [p for p in tmp_path.iterdir() if p.name.startswith("telemetry")]
    assert made
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in made} == {p.name: 0o600 for p in made}
