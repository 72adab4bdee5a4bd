"""Telemetry on the control plane: deduplicated batch ingest and bucketed
queries, on SQLite and PostgreSQL; then the two RPCs over a real channel."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select, update

from controlplane.cli import cli
from controlplane.client import bearer_metadata
from controlplane.db.engine import make_engine, upgrade
from controlplane.db.models import DeviceClassRow, DeviceRow, TelemetryRow
from controlplane.db.uow import Database
from controlplane.errors import InvalidArgument, NotFound, ResourceExhausted
from controlplane.server import ControlPlane
from controlplane.services.telemetry import MAX_BATCH, Sample, Series, TelemetryService
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from tests.harness import ADMIN_TOKEN

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
START = NOW - dt.timedelta(minutes=10)
MINUTE = dt.timedelta(minutes=1)
ADMIN = bearer_metadata(ADMIN_TOKEN)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    engine = make_engine(db_url)
    upgrade(engine)
    database = Database(engine)
    with database.unit_of_work() as uow:
        for name in ("pi4", "jetson"):
            uow.session.add(
                DeviceClassRow(id=name, name=name, runtime="onnxruntime", quantization="auto")
            )
        uow.session.flush()
        for dev_id, cls, site in (("dev-a", "pi4", "lab"), ("dev-b", "pi4", "shop"),
                                  ("dev-c", "jetson", "lab")):  # fmt: skip
            row = DeviceRow(id=dev_id, hardware_id=f"hw-{dev_id}", name=dev_id, state="accepted")
            row.labels, row.class_id, row.credential_hash = {"site": site}, cls, "x"
            uow.session.add(row)
        uow.commit()
    yield database
    database.dispose()


@pytest.fixture
def telemetry(db: Database) -> TelemetryService:
    return TelemetryService(db, clock=lambda: NOW)


def _sample(seq: int, at: dt.datetime = START, **kw: Any) -> Sample:
    base: dict[str, Any] = {
        "model_name": "digits",
        "model_version": "1.0.0",
        "request_count": 100,
        "error_count": 1,
        "latency_p50_ms": 2.0,
        "latency_p95_ms": 5.0,
        "latency_p99_ms": 8.0,
        "latency_max_ms": 9.0,
        "memory_mb": 40.0,
        "cpu_percent": 10.0,
    }
    return Sample(seq=seq, at=at, **(base | kw))


def _stored(db: Database, device_id: str | None = None) -> int:
    with db.unit_of_work(readonly=True) as uow:
        stmt = select(func.count()).select_from(TelemetryRow)
        if device_id:
            stmt = stmt.where(TelemetryRow.device_id == device_id)
        return int(uow.session.scalar(stmt) or 0)


def _points(series: list[Series]) -> dict[str, list[tuple[int, float]]]:
    """group -> [(bucket index, value)] for readable assertions."""
    return {
        s.group: [(int((p.at - START) / MINUTE), round(p.value, 6)) for p in s.points]
        for s in series
    }


# ---------------------------------------------------------------- ingest


def test_redelivered_samples_are_stored_once_and_acked(
    telemetry: TelemetryService, db: Database
) -> None:
    assert telemetry.ingest("dev-a", []) == 0
    assert telemetry.ingest("dev-a", [_sample(i) for i in (1, 2, 3)]) == 3
    # The agent did not see the ack and resends, with newer samples.
    assert telemetry.ingest("dev-a", [_sample(i) for i in (2, 3, 4, 5)]) == 5
    assert telemetry.ingest("dev-a", [_sample(5), _sample(5)]) == 5  # duplicate within a batch
    assert _stored(db, "dev-a") == 5
    # Sequence numbers are per device.
    assert telemetry.ingest("dev-b", [_sample(1)]) == 1
    assert telemetry.ingest("dev-a", []) == 5
    assert _stored(db) == 6


def test_samples_record_the_class_at_ingest_time(telemetry: TelemetryService, db: Database) -> None:
    telemetry.ingest("dev-a", [_sample(1)])
    with db.unit_of_work() as uow:
        uow.session.execute(update(DeviceRow).where(DeviceRow.id == "dev-a").values(class_id=None))
        uow.commit()
    telemetry.ingest("dev-a", [_sample(2, START + MINUTE)])
    got = _points(telemetry.query(metric="request_count", group_by="class", start=START, end=NOW))
    assert got == {"": [(1, 100.0)], "pi4": [(0, 100.0)]}


def test_a_bad_sample_rejects_the_whole_batch(telemetry: TelemetryService, db: Database) -> None:
    bad = {
        "seq 0": {"seq": 0},
        "seq past int64": {"seq": 2**63},
        "too old": {"at": NOW - dt.timedelta(days=31)},
        "in the future": {"at": NOW + dt.timedelta(hours=1)},
        "never set": {"at": dt.datetime(1970, 1, 1, tzinfo=dt.UTC)},
        "negative count": {"request_count": -1},
        "more errors than requests": {"error_count": 101},
        "timeouts not errors": {"timeout_count": 2},
        "negative memory": {"memory_mb": -1.0},
        "nan latency": {"latency_p95_ms": math.nan},
        "infinite cpu": {"cpu_percent": math.inf},
        "unordered percentiles": {"latency_p50_ms": 6.0},
        "max below p99": {"latency_max_ms": 7.0},
        "long model name": {"model_name": "m" * 101},
    }
    for case, change in bad.items():
        batch = [_sample(1), dataclasses.replace(_sample(2), **change), _sample(3)]
        with pytest.raises(InvalidArgument):
            telemetry.ingest("dev-a", batch)
        assert _stored(db) == 0, case
    with pytest.raises(ResourceExhausted):
        telemetry.ingest("dev-a", [_sample(i + 1) for i in range(MAX_BATCH + 1)])
    with pytest.raises(NotFound):
        telemetry.ingest("no-such-device", [_sample(1)])
    assert _stored(db) == 0
    # A full batch is fine.
    assert telemetry.ingest("dev-a", [_sample(i + 1) for i in range(MAX_BATCH)]) == MAX_BATCH


# ---------------------------------------------------------------- queries


@pytest.fixture
def known(telemetry: TelemetryService) -> TelemetryService:
    """Buckets of one minute from START. dev-a and dev-b (pi4) run digits
    1.0.0, dev-c (jetson) runs 2.0.0."""
    s = START
    telemetry.ingest("dev-a", [
        _sample(1, s + dt.timedelta(seconds=5), request_count=100, error_count=5,
                latency_p95_ms=10.0, latency_p99_ms=12.0, latency_max_ms=20.0,
                memory_mb=50.0, cpu_percent=20.0, timeout_count=2),
        _sample(2, s + dt.timedelta(seconds=35), request_count=200, error_count=0,
                latency_p95_ms=30.0, latency_p99_ms=31.0, latency_max_ms=40.0,
                memory_mb=70.0, cpu_percent=40.0),
        _sample(3, s + 3 * MINUTE, request_count=60, error_count=6),
        # No requests in this interval: no error-rate point for the bucket.
        _sample(4, s + 5 * MINUTE, request_count=0, error_count=0),
    ])  # fmt: skip
    telemetry.ingest("dev-b", [
        _sample(1, s + dt.timedelta(seconds=50), request_count=300, error_count=15,
                latency_p95_ms=20.0, latency_p99_ms=25.0, latency_max_ms=30.0,
                memory_mb=60.0, cpu_percent=60.0),
    ])  # fmt: skip
    telemetry.ingest("dev-c", [
        _sample(1, s + dt.timedelta(seconds=1), model_version="2.0.0", request_count=1000,
                error_count=10, latency_p95_ms=3.0, latency_p99_ms=4.0),
        # Outside [START, NOW): never counted.
        _sample(2, START - dt.timedelta(seconds=1), model_version="2.0.0"),
        _sample(3, NOW, model_version="2.0.0"),
    ])  # fmt: skip
    return telemetry


def _q(svc: TelemetryService, metric: str, **kw: Any) -> dict[str, list[tuple[int, float]]]:
    args: dict[str, Any] = {"start": START, "end": NOW, "step": MINUTE} | kw
    return _points(svc.query(metric=metric, **args))


def test_error_rate_is_errors_over_requests_per_bucket(known: TelemetryService) -> None:
    assert _q(known, "error_rate", group_by="model_version") == {
        # bucket 0: (5 + 0 + 15) / (100 + 200 + 300); bucket 3: 6 / 60; bucket 5 has no requests
        "digits@1.0.0": [(0, round(20 / 600, 6)), (3, 0.1)],
        "digits@2.0.0": [(0, 0.01)],
    }
    assert _q(known, "timeout_rate", model_version="1.0.0") == {
        "all": [(0, round(2 / 600, 6)), (3, 0.0)]
    }


def test_latency_percentiles_are_the_worst_sample_in_the_bucket(known: TelemetryService) -> None:
    assert _q(known, "latency_p95_ms", group_by="model_version") == {
        "digits@1.0.0": [(0, 30.0), (3, 5.0), (5, 5.0)],
        "digits@2.0.0": [(0, 3.0)],
    }
    assert _q(known, "latency_p99_ms", group_by="device", model_version="1.0.0") == {
        "dev-a": [(0, 31.0), (3, 8.0), (5, 8.0)],
        "dev-b": [(0, 25.0)],
    }
    assert _q(known, "latency_max_ms", device_id="dev-a", step=10 * MINUTE) == {"all": [(0, 40.0)]}


def test_rates_memory_cpu_and_bucket_counts(known: TelemetryService) -> None:
    assert _q(known, "request_rate", group_by="class") == {
        "jetson": [(0, round(1000 / 60, 6))],
        "pi4": [(0, 10.0), (3, 1.0), (5, 0.0)],
    }
    assert _q(known, "request_count", step=5 * MINUTE) == {"all": [(0, 1660.0), (5, 0.0)]}
    assert _q(known, "error_count", class_name="pi4") == {"all": [(0, 20.0), (3, 6.0), (5, 0.0)]}
    assert _q(known, "memory_mb", class_name="pi4") == {"all": [(0, 70.0), (3, 40.0), (5, 40.0)]}
    # Mean of dev-a's 20 and 40, dev-b's 60, dev-c's 10.
    assert _q(known, "cpu_percent") == {"all": [(0, 32.5), (3, 10.0), (5, 10.0)]}
    # Labels select the devices that carry them now.
    assert _q(known, "request_count", group_by="device", labels={"site": "lab"}) == {
        "dev-a": [(0, 300.0), (3, 60.0), (5, 0.0)],
        "dev-c": [(0, 1000.0)],
    }
    assert _q(known, "request_count", labels={"site": "nowhere"}) == {}
    assert _q(known, "request_count", model_name="other") == {}


def test_query_defaults_and_bounds(known: TelemetryService) -> None:
    # The last hour in 60 buckets of a minute, ending now (excluded): dev-c's
    # sample a second before START now counts, the one at NOW still does not.
    series = known.query(metric="request_count", group_by="device")
    assert {s.group: len(s.points) for s in series} == {"dev-a": 3, "dev-b": 1, "dev-c": 2}
    assert series[0].points[0].at == NOW - dt.timedelta(hours=1) + 50 * MINUTE
    with pytest.raises(InvalidArgument, match="unknown metric"):
        known.query(metric="p42")
    with pytest.raises(InvalidArgument, match="grouping"):
        known.query(metric="error_rate", group_by="moon")
    with pytest.raises(InvalidArgument, match="empty"):
        known.query(metric="error_rate", start=NOW, end=START)
    with pytest.raises(InvalidArgument, match="buckets"):
        known.query(metric="error_rate", start=NOW - dt.timedelta(days=30), end=NOW,
                    step=dt.timedelta(seconds=1))  # fmt: skip


# ---------------------------------------------------------------- RPCs


@pytest.fixture
async def channel(server: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


async def _enroll(channel: grpc.aio.Channel, hw_id: str) -> d.EnrollResponse:
    op = og.OperatorServiceStub(channel)
    token = await op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name=hw_id, policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT),
        metadata=ADMIN,
    )
    return await dg.DeviceServiceStub(channel).Enroll(  # type: ignore[no-any-return]
        d.EnrollRequest(
            enrollment_token=token.secret,
            hardware_id=hw_id,
            hardware=c.HardwareProfile(arch="aarch64", memory_mb=2048, cpu_cores=4),
        )
    )


def _pb_sample(seq: int, at: dt.datetime, **kw: Any) -> d.TelemetrySample:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    fields: dict[str, Any] = {
        "model_name": "digits", "model_version": "1.0.0", "request_count": 10,
        "error_count": 1, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0, "latency_p99_ms": 3.0,
    }  # fmt: skip
    return d.TelemetrySample(seq=seq, at=stamp, **(fields | kw))


async def test_upload_is_deduplicated_per_authenticated_device_and_queryable(
    channel: grpc.aio.Channel, server: ControlPlane
) -> None:
    dev, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
    a, b = await _enroll(channel, "hw-a"), await _enroll(channel, "hw-b")
    as_a, as_b = bearer_metadata(a.device_credential), bearer_metadata(b.device_credential)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    batch = [_pb_sample(i, now - dt.timedelta(seconds=30 - i)) for i in (1, 2, 3)]

    resp = await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=batch), metadata=as_a)
    assert resp.acked_seq == 3
    resp = await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=batch), metadata=as_a)
    assert resp.acked_seq == 3
    # The same seqs under B's credential are B's samples: the device is the
    # credential's, never one named in the request.
    resp = await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=batch[:1]), metadata=as_b)
    assert resp.acked_seq == 1

    start, end, step = Timestamp(), Timestamp(), Duration()
    start.FromDatetime(now - dt.timedelta(minutes=5))
    end.FromDatetime(now + dt.timedelta(minutes=1))
    step.FromTimedelta(dt.timedelta(minutes=6))
    query = o.QueryTelemetryRequest(
        metric=o.TELEMETRY_METRIC_REQUEST_COUNT,
        group_by=o.TELEMETRY_GROUP_BY_DEVICE,
        start=start,
        end=end,
        step=step,
    )
    resp_q = await op.QueryTelemetry(query, metadata=ADMIN)
    got = {s.group: [p.value for p in s.points] for s in resp_q.series}
    assert got == {a.device_id: [30.0], b.device_id: [10.0]}
    assert resp_q.series[0].points[0].at == start

    query.metric = o.TELEMETRY_METRIC_ERROR_RATE
    query.group_by = o.TELEMETRY_GROUP_BY_MODEL_VERSION
    resp_q = await op.QueryTelemetry(query, metadata=ADMIN)
    assert [(s.group, [p.value for p in s.points]) for s in resp_q.series] == [
        ("digits@1.0.0", [0.1])
    ]

    # The CLI, against the same server (run off the event loop that serves it).
    args = ["--server", server.address, "--token", ADMIN_TOKEN, "telemetry", "query"]
    runner = CliRunner(env={"COLUMNS": "200"})
    result = await asyncio.to_thread(
        runner.invoke, cli, [*args, "error-rate", "--by", "model-version", "--since", "5m"]
    )
    assert result.exit_code == 0, result.output
    assert "digits@1.0.0" in result.stdout and "10.00%" in result.stdout
    result = await asyncio.to_thread(
        runner.invoke, cli, [*args, "request-count", "--by", "device", "--step", "1h", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {s["group"]: sum(p["value"] for p in s["points"]) for s in data} == {
        a.device_id: 30.0,
        b.device_id: 10.0,
    }


async def test_bad_uploads_and_queries_are_invalid_argument_and_store_nothing(
    channel: grpc.aio.Channel,
) -> None:
    dev, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
    a = await _enroll(channel, "hw-a")
    as_a = bearer_metadata(a.device_credential)
    now = dt.datetime.now(dt.UTC)
    cases = {
        "no time": [d.TelemetrySample(seq=1)],
        "errors above requests": [_pb_sample(1, now), _pb_sample(2, now, error_count=11)],
        "seq 0": [_pb_sample(0, now)],
    }
    for case, samples in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=samples), metadata=as_a)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    with pytest.raises(grpc.aio.AioRpcError) as info:
        too_many = [_pb_sample(i + 1, now) for i in range(MAX_BATCH + 1)]
        await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=too_many), metadata=as_a)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    resp = await dev.UploadTelemetry(d.UploadTelemetryRequest(), metadata=as_a)
    assert resp.acked_seq == 0  # nothing stored

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await op.QueryTelemetry(o.QueryTelemetryRequest(), metadata=ADMIN)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "metric" in (info.value.details() or "")
    # Operators only: a device credential cannot query.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await op.QueryTelemetry(
            o.QueryTelemetryRequest(metric=o.TELEMETRY_METRIC_ERROR_RATE), metadata=as_a
        )
    assert info.value.code() in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    )
