"""Which artifact served (issue 20, item 5): a telemetry sample's variant and
fallback_request_count are stored, checked at the boundary and in the group
commit, summed into the hourly rollups, and rows stored before migration
0011 read back as "" and 0; on SQLite and PostgreSQL, the RPC over a real
channel."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select, text

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.db.engine import make_engine, upgrade
from edgefleet.controlplane.db.models import (
    DeviceClassRow,
    DeviceRow,
    TelemetryRollupRow,
    TelemetryRow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.telemetry import Sample, TelemetryService, epoch_ms
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from testkit.rpc import enroll_accepted, telemetry_sample

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
START = NOW - dt.timedelta(minutes=10)
# Older than the default retention (7 days): rolled up at NOW.
OLD = NOW - dt.timedelta(days=8)
RECENT = NOW - dt.timedelta(days=6)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    engine = make_engine(db_url)
    upgrade(engine)
    database = Database(engine)
    with database.unit_of_work() as uow:
        uow.session.add(
            DeviceClassRow(id="pi4", name="pi4", runtime="onnxruntime", quantization="auto")
        )
        uow.session.flush()
        for dev_id in ("dev-a", "dev-b", "dev-c"):
            row = DeviceRow(id=dev_id, hardware_id=f"hw-{dev_id}", name=dev_id, state="accepted")
            row.labels, row.class_id, row.credential_hash = {}, "pi4", "x"
            uow.session.add(row)
        uow.commit()
    yield database
    database.dispose()


@pytest.fixture
def telemetry(db: Database) -> TelemetryService:
    return TelemetryService(db, clock=lambda: NOW)


def _sample(seq: int, at: dt.datetime = START, **kw: Any) -> Sample:
    base: dict[str, Any] = {
        "at_ms": epoch_ms(at), "model_name": "digits", "model_version": "1.0.0",
        "request_count": 100, "latency_p50_ms": 2.0, "latency_p95_ms": 5.0,
        "latency_p99_ms": 8.0, "latency_max_ms": 9.0, "memory_mb": 40.0, "cpu_percent": 10.0,
    }  # fmt: skip
    return Sample(seq=seq, **(base | kw))


def _served(db: Database, device_id: str | None = None) -> list[tuple[int, str, int]]:
    """(seq, variant, fallback_request_count) of the raw rows, by seq."""
    t = TelemetryRow
    stmt = select(t.seq, t.variant, t.fallback_request_count).order_by(t.device_id, t.seq)
    if device_id:
        stmt = stmt.where(t.device_id == device_id)
    with db.unit_of_work(readonly=True) as uow:
        return [tuple(row) for row in uow.session.execute(stmt)]  # type: ignore[misc]


def _rolled(db: Database) -> dict[tuple[str, int], tuple[int, int]]:
    """(device, hour) -> (request_count, fallback_request_count) of the rollups."""
    r = TelemetryRollupRow
    stmt = select(r.device_id, r.hour_ms, r.request_count, r.fallback_request_count)
    with db.unit_of_work(readonly=True) as uow:
        return {(dev, hour): (n, fb) for dev, hour, n, fb in uow.session.execute(stmt)}


# ---------------------------------------------------------------- ingest


def test_the_variant_and_the_fallbacks_requests_are_stored_per_sample(
    telemetry: TelemetryService, db: Database
) -> None:
    assert telemetry.ingest("dev-a", [
        _sample(1, variant="primary"),
        # Switched to the fallback during the interval: it served 40 of 100.
        _sample(2, variant="fallback", fallback_request_count=40),
        # All of them, and back on the primary by the interval's end.
        _sample(3, variant="primary", fallback_request_count=100),
        _sample(4),  # an agent that predates the fields
    ]) == 4  # fmt: skip
    assert _served(db) == [(1, "primary", 0), (2, "fallback", 40), (3, "primary", 100), (4, "", 0)]


def test_a_group_commit_refuses_only_the_upload_with_a_bad_variant_or_fallback_count(
    telemetry: TelemetryService, db: Database
) -> None:
    results = telemetry.ingest_many([
        ("dev-a", [_sample(1, variant="fallback", fallback_request_count=7)]),
        # The bad sample second: the column checks must find it, not only
        # the per-sample ones.
        ("dev-b", [_sample(1), _sample(2, request_count=10, fallback_request_count=11)]),
        ("dev-c", [_sample(1), _sample(2, variant="turbo")]),
        ("dev-b", [_sample(3), _sample(4, fallback_request_count=-1)]),
        ("dev-a", [_sample(2, variant="primary", fallback_request_count=100)]),
    ])  # fmt: skip
    # Both of dev-a's uploads are acked its mark once the commit is in.
    assert results[0] == results[4] == 2
    for index, says in (
        (1, "sample seq=2: fallback_request_count exceeds request_count"),
        (2, "sample seq=2: variant is 'turbo'; it must be 'primary', 'fallback' or ''"),
        (3, "sample seq=4: fallback_request_count must be between 0 and"),
    ):
        refused = results[index]
        assert isinstance(refused, InvalidArgument), (index, refused)
        assert says in refused.message, refused.message
    assert _served(db) == [(1, "fallback", 7), (2, "primary", 100)]
    # Exactly request_count is every request, and valid.
    assert telemetry.ingest("dev-b", [_sample(1, request_count=10, fallback_request_count=10)]) == 1


# ---------------------------------------------------------------- rollups


def test_roll_up_sums_the_fallbacks_requests_and_merges_late_samples(
    telemetry: TelemetryService, db: Database
) -> None:
    telemetry.ingest("dev-a", [
        _sample(1, OLD + dt.timedelta(minutes=5), variant="fallback", fallback_request_count=30),
        _sample(2, OLD + dt.timedelta(minutes=20), variant="primary"),
        _sample(3, OLD + dt.timedelta(minutes=40), request_count=60, variant="fallback",
                fallback_request_count=50),
        _sample(4, RECENT, variant="fallback", fallback_request_count=5),
    ])  # fmt: skip
    telemetry.ingest("dev-c", [_sample(1, OLD + dt.timedelta(minutes=1))])
    assert telemetry.roll_up(now=NOW) == 4
    hour = epoch_ms(OLD) - epoch_ms(OLD) % 3_600_000
    assert _rolled(db) == {("dev-a", hour): (260, 80), ("dev-c", hour): (100, 0)}
    # The recent sample stays raw, with its variant.
    assert _served(db) == [(4, "fallback", 5)]

    # A late sample of the rolled-up hour merges into its rollup row.
    assert telemetry.ingest("dev-c", [
        _sample(2, OLD + dt.timedelta(minutes=50), variant="fallback", fallback_request_count=20)
    ]) == 2  # fmt: skip
    assert telemetry.roll_up(now=NOW) == 1
    assert _rolled(db)[("dev-c", hour)] == (200, 20)
    assert telemetry.roll_up(now=NOW) == 0
    assert _rolled(db) == {("dev-a", hour): (260, 80), ("dev-c", hour): (200, 20)}


def test_rows_stored_before_0011_read_back_unspecified_and_zero(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0010")
    hour = epoch_ms(OLD) - epoch_ms(OLD) % 3_600_000
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO devices (id, hardware_id, name, state, labels, hardware, runtime,"
            " class_pinned, credential_hash, enrolled_at, desired_revision, applied_revision,"
            " update_status, state_reason, assignment_seq) VALUES ('d', 'hw', 'd', 'accepted',"
            " '{}', '{}', '{}', false, 'x', '2026-11-22 00:00:00+00', 1, 0, '{}', '', 0)"
        ))  # fmt: skip
        conn.execute(text(
            "INSERT INTO telemetry (device_id, seq, at_ms, model_name, model_version,"
            " class_name, request_count, error_count, timeout_count, dropped_samples,"
            " latency_p50_ms, latency_p95_ms, latency_p99_ms, latency_max_ms, memory_mb,"
            " cpu_percent) VALUES ('d', 5, :at, 'digits', '1.0.0', '', 40, 0, 0, 0, 1, 1, 1,"
            " 1, 1, 1)"
        ), {"at": hour + 60_000})  # fmt: skip
        conn.execute(text(
            "INSERT INTO telemetry_rollups (device_id, hour_ms, model_name, model_version,"
            " class_name, sample_count, request_count, error_count, timeout_count,"
            " dropped_samples, latency_p50_ms, latency_p95_ms, latency_p99_ms,"
            " max_latency_p50_ms, max_latency_p95_ms, max_latency_p99_ms, latency_max_ms,"
            " memory_mb, cpu_percent, system_memory_percent, limited_samples) VALUES ('d', :h,"
            " 'digits', '1.0.0', '', 2, 30, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0)"
        ), {"h": hour})  # fmt: skip
    upgrade(engine)
    db = Database(engine)
    try:
        assert _served(db) == [(5, "", 0)]
        assert _rolled(db) == {("d", hour): (30, 0)}
        # The old raw row merges into the old rollup row with a new one's
        # fallback requests.
        svc = TelemetryService(db, clock=lambda: NOW)
        late = _sample(6, OLD, request_count=10, variant="fallback", fallback_request_count=4)
        assert svc.ingest("d", [late]) == 6
        assert svc.roll_up(now=NOW) == 2
        assert _rolled(db) == {("d", hour): (80, 4)}
    finally:
        db.dispose()


# ---------------------------------------------------------------- the RPC


async def test_uploads_carry_the_variant_and_a_bad_one_is_refused_alone(
    cp: ControlPlane,
) -> None:
    async with grpc.aio.insecure_channel(cp.address) as channel:
        dev = dg.DeviceServiceStub(channel)
        a, b = await enroll_accepted(channel, "hw-a"), await enroll_accepted(channel, "hw-b")
        as_a, as_b = bearer_metadata(a.device_credential), bearer_metadata(b.device_credential)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)

        def at(seq: int, **fields: Any) -> d.TelemetrySample:
            return telemetry_sample(seq, now - dt.timedelta(seconds=30 - seq), **fields)

        good = [
            at(1, variant=c.ARTIFACT_VARIANT_PRIMARY),
            at(2, variant=c.ARTIFACT_VARIANT_FALLBACK, fallback_request_count=4),
            at(3),
        ]
        # B's bad sample passes the field ranges (it is checked in the group
        # commit with A's upload); A's is stored all the same.
        bad = [at(1), at(2, fallback_request_count=11)]  # of 10 requests
        acked_a, refused = await asyncio.gather(
            dev.UploadTelemetry(d.UploadTelemetryRequest(samples=good), metadata=as_a),
            dev.UploadTelemetry(d.UploadTelemetryRequest(samples=bad), metadata=as_b),
            return_exceptions=True,
        )
        assert isinstance(acked_a, d.UploadTelemetryResponse) and acked_a.acked_seq == 3
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fallback_request_count exceeds request_count" in (refused.details() or "")

        for samples, says in (
            ([at(1), at(2, variant=7)], "sample seq=2: unknown variant 7"),
            ([at(1, variant=-1)], "sample seq=1: unknown variant -1"),
            ([at(1, request_count=10**9, fallback_request_count=10**9 + 1)],
             "samples[0].fallback_request_count is 1000000001; it must be an integer between"),
        ):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=samples), metadata=as_b)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in (info.value.details() or ""), info.value.details()

        with cp.db.unit_of_work(readonly=True) as uow:
            t = TelemetryRow
            assert uow.session.scalar(
                select(func.count()).select_from(t).where(t.device_id == b.device_id)
            ) == 0  # fmt: skip
        assert _served(cp.db, a.device_id) == [(1, "primary", 0), (2, "fallback", 4), (3, "", 0)]
        resp = await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=bad[:1]), metadata=as_b)
        assert resp.acked_seq == 1


def test_samples_of_no_model_group_as_no_model_not_an_at_sign(
    telemetry: TelemetryService,
) -> None:
    # An agent serving no model still reports (memory, temperature): its
    # samples have no model name or version.
    telemetry.ingest("dev-a", [_sample(1), _sample(2, model_name="", model_version="")])
    series = telemetry.query(
        metric="memory_mb", group_by="model_version", start=START - dt.timedelta(minutes=1),
        end=START + dt.timedelta(minutes=1), step=dt.timedelta(minutes=2),
    )  # fmt: skip
    assert sorted(s.group for s in series) == ["(no model)", "digits@1.0.0"]
