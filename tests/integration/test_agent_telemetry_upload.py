"""Agent telemetry against a real control plane (in process): an agent offline
and then back delivers every sample exactly once and reports what it
dropped, a refused sample is discarded and counted without blocking the
rest, and the metrics are served on a local Prometheus endpoint."""

from __future__ import annotations

import datetime as dt
import socket
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import generate_latest

from edgefleet.agent.telemetry import (
    RequestStats,
    Resources,
)
from edgefleet.agent.telemetry_buffer import TelemetryBuffer
from edgefleet.agent.telemetry_uploader import (
    TelemetryMetrics,
    TelemetryUploader,
    serve_metrics,
    to_proto,
)
from edgefleet.controlplane.client.connection import bearer_metadata
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
