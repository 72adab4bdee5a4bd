"""Telemetry on the control plane: deduplicated batch ingest, hourly rollups
and bucketed queries, on SQLite and PostgreSQL; then the two RPCs, the CLI and
the server's roll-up task over a real channel."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, insert, select, text, update

from edgefleet.controlplane.api import device_servicer
from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.db.engine import make_engine, upgrade
from edgefleet.controlplane.db.models import (
    DeviceClassRow,
    DeviceRow,
    TelemetryRollupRow,
    TelemetryRow,
    TelemetryWatermarkRow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import InvalidArgument, NotFound, ResourceExhausted
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.controlplane.services.telemetry import (
    INSERT_COLUMNS,
    MAX_BATCH,
    METRICS,
    Sample,
    Series,
    TelemetryService,
    epoch_ms,
)
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import enroll_accepted, telemetry_sample

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
        "at_ms": epoch_ms(at),
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
    return Sample(seq=seq, **(base | kw))


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


def test_a_group_commit_answers_each_upload_and_refuses_only_the_bad_ones(
    telemetry: TelemetryService, db: Database
) -> None:
    telemetry.ingest("dev-c", [_sample(1), _sample(2)])
    results = telemetry.ingest_many([
        ("dev-a", [_sample(1), _sample(2)]),
        ("dev-b", [_sample(1), _sample(2)._replace(request_count=-1)]),  # a bad sample
        ("no-such-device", [_sample(1)]),
        ("dev-b", [_sample(i + 1) for i in range(MAX_BATCH + 1)]),  # too many
        # dev-a again in the same commit, overlapping the first: stored once,
        # and both uploads are told the device's mark once this commits.
        ("dev-a", [_sample(2), _sample(3)]),
        ("dev-c", [_sample(2), _sample(3)]),  # one redelivery, one new
        ("dev-b", []),
    ])  # fmt: skip
    assert [r if isinstance(r, int) else type(r).__name__ for r in results] == [
        3, "InvalidArgument", "NotFound", "ResourceExhausted", 3, 3, 0,
    ]  # fmt: skip
    assert "sample seq=2" in str(results[1]) and "no-such-device" in str(results[2])
    assert (_stored(db, "dev-a"), _stored(db, "dev-b"), _stored(db, "dev-c")) == (3, 0, 3)
    assert telemetry.ingest_many([]) == []
    # Only refused uploads: nothing to store, nothing opened.
    (alone,) = telemetry.ingest_many([("dev-b", [_sample(0)])])
    assert isinstance(alone, InvalidArgument) and _stored(db) == 6


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
        "too old": {"at_ms": epoch_ms(NOW - dt.timedelta(days=31))},
        "in the future": {"at_ms": epoch_ms(NOW + dt.timedelta(hours=1))},
        "never set": {"at_ms": 0},
        "negative count": {"request_count": -1},
        "more errors than requests": {"error_count": 101},
        "timeouts not errors": {"timeout_count": 2},
        "negative memory": {"memory_mb": -1.0},
        "nan latency": {"latency_p95_ms": math.nan},
        "infinite cpu": {"cpu_percent": math.inf},
        "unordered percentiles": {"latency_p50_ms": 6.0},
        "max below p99": {"latency_max_ms": 7.0},
        "long model name": {"model_name": "m" * 101},
        "nan system memory": {"system_memory_percent": math.nan},
        "system memory over 100": {"system_memory_percent": 100.5},
        "infinite temperature": {"temperature_c": math.inf},
        "below absolute zero": {"temperature_c": -300.0},
        "battery over 100": {"battery_percent": 101.0},
        "negative battery": {"battery_percent": -1.0},
        "long power mode": {"power_mode": "x" * 33},
        "concurrency past int32": {"concurrency_limit": 2**31},
    }
    for case, change in bad.items():
        batch = [_sample(1), _sample(2)._replace(**change), _sample(3)]
        # The message names the sample: the column-wise checks found the batch
        # bad, and the per-sample ones said why.
        with pytest.raises(InvalidArgument, match=f"sample seq={batch[1].seq}: "):
            telemetry.ingest("dev-a", batch)
        assert _stored(db) == 0, case
    with pytest.raises(ResourceExhausted):
        telemetry.ingest("dev-a", [_sample(i + 1) for i in range(MAX_BATCH + 1)])
    with pytest.raises(NotFound):
        telemetry.ingest("no-such-device", [_sample(1)])
    assert _stored(db) == 0
    # A full batch is fine.
    assert telemetry.ingest("dev-a", [_sample(i + 1) for i in range(MAX_BATCH)]) == MAX_BATCH


def test_unusual_but_valid_samples_are_stored(telemetry: TelemetryService, db: Database) -> None:
    huge = 1e308  # the column sums overflow to inf: the per-sample checks decide
    batch = [
        _sample(1, latency_p50_ms=huge, latency_p95_ms=huge, latency_p99_ms=huge,
                latency_max_ms=huge),
        _sample(2, latency_p50_ms=huge, latency_p95_ms=huge, latency_p99_ms=huge,
                latency_max_ms=0.0),  # 0: no maximum reported
        _sample(3, temperature_c=-40.0, battery_percent=0.0, system_memory_percent=100.0),
        _sample(4, at=NOW + dt.timedelta(minutes=9)),  # a clock slightly ahead
        _sample(5, request_count=0, error_count=0, power_mode="", concurrency_limit=2**31 - 1),
    ]  # fmt: skip
    assert telemetry.ingest("dev-a", batch) == 5
    assert _stored(db) == 5


def test_seqs_at_or_below_the_high_water_mark_are_redeliveries(
    telemetry: TelemetryService, db: Database
) -> None:
    # The agent numbers, sends and forgets samples in seq order, so a seq
    # below the highest stored one can only be a resend.
    assert telemetry.ingest("dev-a", [_sample(5), _sample(3), _sample(4)]) == 5
    assert telemetry.ingest("dev-a", [_sample(2), _sample(6)]) == 6
    with db.unit_of_work(readonly=True) as uow:
        seqs = uow.session.scalars(select(TelemetryRow.seq).order_by(TelemetryRow.seq)).all()
    assert seqs == [3, 4, 5, 6]


def test_an_upload_racing_another_of_the_same_device_stores_each_seq_once(
    telemetry: TelemetryService, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Another upload of dev-a (a retry of an earlier batch) holds seqs 1..3,
    uncommitted, while this one (1..5) reads the mark and inserts. PostgreSQL:
    the COPY waits on the other's index entries, fails once it commits, and
    the batch is redone; SQLite: this upload waits for the writer lock."""
    caplog.set_level(logging.INFO, logger="edgefleet.controlplane.services.telemetry")
    other = db.engine.connect()
    other.begin()
    for seq in (1, 2, 3):
        row = {c: v for c, v in zip(INSERT_COLUMNS, ("dev-a", "pi4", *_sample(seq)), strict=True)}
        other.execute(insert(TelemetryRow).values(row | {"request_count": 7}))
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(telemetry.ingest, "dev-a", [_sample(i) for i in range(1, 6)])
        time.sleep(0.5)
        assert not upload.done()
        other.commit()
        other.close()
        assert upload.result(timeout=30) == 5
    with db.unit_of_work(readonly=True) as uow:
        rows = uow.session.execute(select(TelemetryRow.seq, TelemetryRow.request_count)).all()
    assert sorted(rows) == [(1, 7), (2, 7), (3, 7), (4, 100), (5, 100)]
    if db.engine.dialect.name == "postgresql":
        assert "raced another" in caplog.text


def test_a_group_commit_that_loses_a_deadlock_is_redone_not_internal(
    telemetry: TelemetryService, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Another writer holds dev-b's seq 1 and then wants dev-a's seq 1, while
    a group commit of both devices holds dev-a's and waits for dev-b's: a
    deadlock on PostgreSQL, which rolls the group back. Its COPY raised the
    raw psycopg error, and every upload of the group came back INTERNAL
    (bench_rollout on two replicas); now the group is redone and answers
    each upload. SQLite has one writer: the group just waits."""
    caplog.set_level(logging.INFO, logger="edgefleet.controlplane.services.telemetry")
    postgres = db.engine.dialect.name == "postgresql"

    def row(device_id: str) -> dict[str, Any]:
        values = (device_id, "pi4", *_sample(1))
        return {c: v for c, v in zip(INSERT_COLUMNS, values, strict=True)} | {"request_count": 7}

    other = db.engine.connect()
    other.begin()
    other.execute(insert(TelemetryRow).values(row("dev-b")))
    with ThreadPoolExecutor(1) as pool:
        group = pool.submit(
            telemetry.ingest_many, [("dev-a", [_sample(1)]), ("dev-b", [_sample(1)])]
        )
        time.sleep(0.5)
        if postgres:
            # Blocks until PostgreSQL breaks the cycle by rolling the group back.
            other.execute(insert(TelemetryRow).values(row("dev-a")))
        other.commit()
        other.close()
        assert group.result(timeout=30) == [1, 1]
    with db.unit_of_work(readonly=True) as uow:
        rows = uow.session.execute(
            select(TelemetryRow.device_id, TelemetryRow.seq, TelemetryRow.request_count)
        ).all()
    if postgres:
        assert sorted(rows) == [("dev-a", 1, 7), ("dev-b", 1, 7)]
        assert "lost a lock conflict (DeadlockDetected)" in caplog.text
    else:
        assert sorted(rows) == [("dev-a", 1, 100), ("dev-b", 1, 7)]


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


def test_system_memory_temperature_and_battery_skip_missing_sensors(
    telemetry: TelemetryService,
) -> None:
    s = START
    telemetry.ingest("dev-a", [
        _sample(1, s + dt.timedelta(seconds=5), system_memory_percent=40.0, temperature_c=50.0),
        _sample(2, s + dt.timedelta(seconds=35), system_memory_percent=60.0,
                battery_percent=80.0),
        _sample(3, s + 3 * MINUTE, system_memory_percent=30.0),
    ])  # fmt: skip
    telemetry.ingest("dev-b", [
        _sample(1, s + dt.timedelta(seconds=50), system_memory_percent=70.0,
                temperature_c=65.0, battery_percent=30.0),
    ])  # fmt: skip
    assert _q(telemetry, "system_memory_percent", group_by="device") == {
        "dev-a": [(0, 60.0), (3, 30.0)],
        "dev-b": [(0, 70.0)],
    }
    # Hottest sensor and emptiest battery per bucket; a bucket where no
    # device has the sensor has no point.
    assert _q(telemetry, "temperature_c") == {"all": [(0, 65.0)]}
    assert _q(telemetry, "battery_percent", group_by="device") == {
        "dev-a": [(0, 80.0)],
        "dev-b": [(0, 30.0)],
    }


# ---------------------------------------------------------------- rollups

HOUR = dt.timedelta(hours=1)
# With the default 7-day retention, a roll-up at NOW moves what is older
# than NOW - 7 days (NOW is on the hour).
OLD = NOW - dt.timedelta(days=8)
RECENT = NOW - dt.timedelta(days=6)


def _rollups(db: Database) -> list[dict[str, Any]]:
    with db.unit_of_work(readonly=True) as uow:
        rows = uow.session.scalars(
            select(TelemetryRollupRow).order_by(
                TelemetryRollupRow.hour_ms, TelemetryRollupRow.device_id,
                TelemetryRollupRow.model_version,
            )
        ).all()  # fmt: skip
        return [
            {c.key: getattr(r, c.key) for c in TelemetryRollupRow.__table__.columns} for r in rows
        ]


def _watermarks(db: Database) -> dict[str, int]:
    with db.unit_of_work(readonly=True) as uow:
        return dict(
            uow.session.execute(
                select(TelemetryWatermarkRow.device_id, TelemetryWatermarkRow.max_seq)
            ).all()
        )


@pytest.fixture
def history(telemetry: TelemetryService) -> TelemetryService:
    """Two old hours (rolled up at NOW) and one recent hour (kept raw)."""
    telemetry.ingest("dev-a", [
        _sample(1, OLD + dt.timedelta(minutes=5), request_count=100, error_count=5,
                timeout_count=2, dropped_samples=1, latency_p50_ms=2.0, latency_p95_ms=10.0,
                latency_p99_ms=12.0, latency_max_ms=20.0, memory_mb=50.0, cpu_percent=20.0,
                system_memory_percent=40.0, temperature_c=50.0, model_memory_mb=3.5),
        _sample(2, OLD + dt.timedelta(minutes=35), request_count=300, error_count=0,
                latency_p50_ms=4.0, latency_p95_ms=30.0, latency_p99_ms=31.0,
                latency_max_ms=40.0, memory_mb=70.0, cpu_percent=40.0,
                system_memory_percent=60.0, battery_percent=80.0, power_mode="limited",
                concurrency_limit=2, model_memory_mb=5.25),
        # Idle: no latency figures, so no weight in the means.
        _sample(3, OLD + dt.timedelta(minutes=59), request_count=0, error_count=0,
                latency_p50_ms=0.0, latency_p95_ms=0.0, latency_p99_ms=0.0, latency_max_ms=0.0,
                memory_mb=45.0, cpu_percent=30.0, system_memory_percent=50.0,
                temperature_c=55.0, battery_percent=75.0, power_mode="limited",
                concurrency_limit=4),
        _sample(4, OLD + HOUR + dt.timedelta(minutes=1), model_version="2.0.0"),
        _sample(5, RECENT, request_count=10, error_count=0),
    ])  # fmt: skip
    telemetry.ingest("dev-c", [
        _sample(1, OLD + dt.timedelta(minutes=10), request_count=1000, error_count=10,
                latency_p95_ms=3.0, latency_p99_ms=4.0, temperature_c=70.0),
        _sample(2, RECENT + dt.timedelta(minutes=10), temperature_c=40.0),
    ])  # fmt: skip
    return telemetry


def test_roll_up_aggregates_each_hour_and_deletes_the_raw_rows(
    history: TelemetryService, db: Database
) -> None:
    assert history.roll_up(now=NOW) == 5
    assert _stored(db) == 2  # the recent ones
    hour = epoch_ms(OLD)
    got = {(r["device_id"], r["hour_ms"], r["model_version"]): r for r in _rollups(db)}
    assert set(got) == {("dev-a", hour, "1.0.0"), ("dev-c", hour, "1.0.0"),
                        ("dev-a", hour + 3_600_000, "2.0.0")}  # fmt: skip
    a = got[("dev-a", hour, "1.0.0")]
    assert a == pytest.approx({
        "device_id": "dev-a", "hour_ms": hour, "model_name": "digits", "model_version": "1.0.0",
        "class_name": "pi4", "sample_count": 3, "request_count": 400, "error_count": 5,
        "timeout_count": 2, "dropped_samples": 1,
        # Request-weighted means: (2 * 100 + 4 * 300) / 400 ...
        "latency_p50_ms": 3.5, "latency_p95_ms": 25.0, "latency_p99_ms": 26.25,
        "max_latency_p50_ms": 4.0, "max_latency_p95_ms": 30.0, "max_latency_p99_ms": 31.0,
        "latency_max_ms": 40.0, "memory_mb": 70.0, "cpu_percent": 30.0,
        "system_memory_percent": 60.0, "temperature_c": 55.0, "battery_percent": 75.0,
        "limited_samples": 2, "min_concurrency_limit": 2, "fallback_request_count": 0,
        "model_memory_mb": 5.25,  # the max
    })  # fmt: skip
    c = got[("dev-c", hour, "1.0.0")]
    assert (c["class_name"], c["sample_count"]) == ("jetson", 1)
    assert (c["battery_percent"], c["temperature_c"]) == (None, 70.0)
    assert (c["limited_samples"], c["min_concurrency_limit"]) == (0, None)
    # The highest seq rolled up per device: raw rows no longer show it.
    assert _watermarks(db) == {"dev-a": 4, "dev-c": 1}


def test_roll_up_twice_changes_nothing_and_late_samples_merge(
    history: TelemetryService, db: Database
) -> None:
    history.roll_up(now=NOW)
    before = (_rollups(db), _watermarks(db), _stored(db))
    assert history.roll_up(now=NOW) == 0
    assert (_rollups(db), _watermarks(db), _stored(db)) == before

    # The agent missed the ack of dev-a's seq 5 and resends 2..5: all are
    # already stored (2..4 only as rollups), so nothing is stored twice.
    assert history.ingest("dev-a", [_sample(i, OLD) for i in (2, 3, 4, 5)]) == 5
    assert _stored(db, "dev-a") == 1
    # A device offline for 8 days delivers an old sample late: stored raw,
    # then merged into the hour already rolled up.
    late = _sample(
        6, OLD + dt.timedelta(minutes=50), request_count=100, error_count=1,
        latency_p50_ms=6.0, latency_p95_ms=50.0, latency_p99_ms=60.0, latency_max_ms=70.0,
        memory_mb=20.0, cpu_percent=10.0, system_memory_percent=90.0, temperature_c=45.0,
        battery_percent=20.0,
    )  # fmt: skip
    assert history.ingest("dev-a", [late]) == 6
    assert history.roll_up(now=NOW) == 1
    a = next(r for r in _rollups(db) if r["device_id"] == "dev-a")
    assert a == pytest.approx(before[0][0] | {
        "sample_count": 4, "request_count": 500, "error_count": 6,
        "latency_p50_ms": 4.0, "latency_p95_ms": 30.0, "latency_p99_ms": 33.0,
        "max_latency_p50_ms": 6.0, "max_latency_p95_ms": 50.0, "max_latency_p99_ms": 60.0,
        "latency_max_ms": 70.0, "cpu_percent": 25.0, "system_memory_percent": 90.0,
        "battery_percent": 20.0,
    })  # fmt: skip
    assert _watermarks(db)["dev-a"] == 6


def _all_answers(svc: TelemetryService, step: dt.timedelta) -> dict[tuple[str, str], Any]:
    start = OLD - dt.timedelta(days=1)
    return {
        (metric, group): _points_at(svc.query(metric=metric, group_by=group, start=start,
                                             end=NOW, step=step))
        for metric in METRICS
        for group in ("", "model_version", "class", "device")
    }  # fmt: skip


def _points_at(series: list[Series]) -> dict[str, list[tuple[dt.datetime, Any]]]:
    return {s.group: [(p.at, pytest.approx(p.value)) for p in s.points] for s in series}


@pytest.mark.parametrize("step", [HOUR, dt.timedelta(hours=6)], ids=["1h", "6h"])
def test_queries_answer_the_same_before_and_after_a_roll_up(
    history: TelemetryService, step: dt.timedelta
) -> None:
    """Over hour-aligned buckets a query spanning rolled-up and raw time gives
    the same answer for every metric and grouping, before and after."""
    before = _all_answers(history, step)
    assert before[("request_count", "")]["all"]  # the data is in range
    assert history.roll_up(now=NOW) == 5
    assert _all_answers(history, step) == before


def test_rolled_up_time_has_hourly_points(history: TelemetryService) -> None:
    start = OLD - HOUR
    query = {"metric": "request_count", "start": start, "end": NOW, "step": 10 * MINUTE}
    before = _points_at(history.query(**query))["all"]
    history.roll_up(now=NOW)
    after = _points_at(history.query(**query))["all"]
    # The old hour's samples fall into four 10-minute buckets while raw;
    # rolled up, the hour's total stands at the hour's start.
    assert [at - OLD for at, _ in before[:4]] == [m * MINUTE for m in (0, 10, 30, 50)]
    assert after[0] == (OLD, pytest.approx(1400.0))
    assert before[4:] == after[1:]  # the next hour (one sample at :01), then raw rows


def test_concurrent_roll_ups_neither_lose_nor_double_count(
    history: TelemetryService, db: Database
) -> None:
    """Two replicas' jobs at once: PostgreSQL lets one in (advisory lock) and
    REPEATABLE READ keeps what each sees and deletes the same; SQLite
    serializes them on its writer lock."""
    expected = _all_answers(history, HOUR)
    other = TelemetryService(db, clock=lambda: NOW)
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(svc.roll_up, now=NOW) for svc in (history, other)]
        moved = [job.result() for job in jobs]
    assert sum(moved) == 5
    assert history.roll_up(now=NOW) == 0
    assert _all_answers(history, HOUR) == expected
    assert sum(r["sample_count"] for r in _rollups(db)) == 5


def test_retention_is_whole_hours_and_at_least_one(db: Database) -> None:
    with pytest.raises(ValueError, match="at least"):
        TelemetryService(db, retention=dt.timedelta(minutes=59))
    svc = TelemetryService(db, clock=lambda: NOW, retention=dt.timedelta(hours=1, minutes=30))
    svc.ingest("dev-a", [_sample(1, NOW - dt.timedelta(hours=2, minutes=1)),
                         _sample(2, NOW - dt.timedelta(hours=1, minutes=59))])  # fmt: skip
    # Cut-off: the hour that holds NOW - 1h30 starts at NOW - 2h.
    assert svc.roll_up(now=NOW) == 1
    assert _stored(db) == 1


def test_migration_0005_gives_existing_rows_the_new_columns(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0004")
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
            " cpu_percent) VALUES ('d', 1, 1, 'm', '1', '', 1, 0, 0, 0, 1, 1, 1, 1, 1, 1)"
        ))  # fmt: skip
    upgrade(engine)
    with engine.connect() as conn:
        row = conn.execute(
            select(TelemetryRow.system_memory_percent, TelemetryRow.temperature_c,
                   TelemetryRow.battery_percent, TelemetryRow.power_mode,
                   TelemetryRow.concurrency_limit)
        ).one()  # fmt: skip
    assert tuple(row) == (0.0, None, None, "", 0)
    engine.dispose()


# ---------------------------------------------------------------- RPCs


@pytest.fixture
async def channel(server: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


async def test_a_busy_control_plane_sheds_uploads_with_resource_exhausted_and_loses_nothing(
    channel: grpc.aio.Channel, server: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = dg.DeviceServiceStub(channel)
    a = await enroll_accepted(channel, "hw-busy")
    as_a = bearer_metadata(a.device_credential)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    batch = [telemetry_sample(i, now - dt.timedelta(seconds=10 - i)) for i in (1, 2)]
    # As if the limit of uploads already held or waited for database threads.
    monkeypatch.setattr(device_servicer, "MAX_TELEMETRY_IN_FLIGHT", 0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=batch), metadata=as_a)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "send them with the next upload" in (err.value.details() or "")
    monkeypatch.undo()
    # The device resends them with its next sample: all three are stored.
    batch.append(telemetry_sample(3, now))
    resp = await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=batch), metadata=as_a)
    assert resp.acked_seq == 3


async def test_upload_is_deduplicated_per_authenticated_device_and_queryable(
    channel: grpc.aio.Channel, server: ControlPlane
) -> None:
    dev, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
    a, b = await enroll_accepted(channel, "hw-a"), await enroll_accepted(channel, "hw-b")
    as_a, as_b = bearer_metadata(a.device_credential), bearer_metadata(b.device_credential)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    batch = [telemetry_sample(i, now - dt.timedelta(seconds=30 - i)) for i in (1, 2, 3)]

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
    a = await enroll_accepted(channel, "hw-a")
    as_a = bearer_metadata(a.device_credential)
    now = dt.datetime.now(dt.UTC)
    cases = {
        "no time": [d.TelemetrySample(seq=1)],
        "errors above requests": [
            telemetry_sample(1, now),
            telemetry_sample(2, now, error_count=11),
        ],
        "seq 0": [telemetry_sample(0, now)],
    }
    for case, samples in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await dev.UploadTelemetry(d.UploadTelemetryRequest(samples=samples), metadata=as_a)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    with pytest.raises(grpc.aio.AioRpcError) as info:
        too_many = [telemetry_sample(i + 1, now) for i in range(MAX_BATCH + 1)]
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


async def test_every_sample_field_is_stored_and_the_new_metrics_are_queryable(
    channel: grpc.aio.Channel, server: ControlPlane
) -> None:
    dev, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
    a = await enroll_accepted(channel, "hw-a")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    at = now - dt.timedelta(seconds=20)
    full = telemetry_sample(
        1, at + dt.timedelta(microseconds=123_456), request_count=20, error_count=3,
        timeout_count=1, dropped_samples=4, latency_p50_ms=1.5, latency_p95_ms=2.5,
        latency_p99_ms=3.5, latency_max_ms=4.5, memory_mb=42.0, cpu_percent=12.5,
        system_memory_percent=55.5, temperature_c=61.25, battery_percent=33.0,
        power_mode="limited", concurrency_limit=2, shadow_version="1.1.0", shadow_requests=7,
        shadow_agreement=0.75, shadow_max_diff=0.125, shadow_latency_p95_ms=3.25,
        variant=c.ARTIFACT_VARIANT_FALLBACK, fallback_request_count=12, model_memory_mb=7.75,
    )  # fmt: skip
    bare = telemetry_sample(2, at + dt.timedelta(seconds=5), system_memory_percent=70.0)
    resp = await dev.UploadTelemetry(
        d.UploadTelemetryRequest(samples=[full, bare]),
        metadata=bearer_metadata(a.device_credential),
    )
    assert resp.acked_seq == 2
    with server.db.unit_of_work(readonly=True) as uow:
        rows = uow.session.scalars(select(TelemetryRow).order_by(TelemetryRow.seq)).all()
    stored = [{c: getattr(r, c) for c in Sample._fields} for r in rows]
    assert stored[0] == {
        "seq": 1, "at_ms": epoch_ms(at) + 123, "model_name": "digits", "model_version": "1.0.0",
        "request_count": 20, "error_count": 3, "timeout_count": 1, "dropped_samples": 4,
        "latency_p50_ms": 1.5, "latency_p95_ms": 2.5, "latency_p99_ms": 3.5,
        "latency_max_ms": 4.5, "memory_mb": 42.0, "cpu_percent": 12.5,
        "system_memory_percent": 55.5, "temperature_c": 61.25, "battery_percent": 33.0,
        "power_mode": "limited", "concurrency_limit": 2, "shadow_version": "1.1.0",
        "shadow_requests": 7, "shadow_agreement": 0.75, "shadow_max_diff": 0.125,
        "shadow_latency_p95_ms": 3.25, "variant": "fallback", "fallback_request_count": 12,
        "model_memory_mb": 7.75,
    }  # fmt: skip
    # No sensor: NULL, not 0 (a 0 % battery is a real reading).
    assert (stored[1]["temperature_c"], stored[1]["battery_percent"]) == (None, None)
    assert (stored[1]["power_mode"], stored[1]["concurrency_limit"]) == ("", 0)

    start, end, step = Timestamp(), Timestamp(), Duration()
    start.FromDatetime(now - dt.timedelta(minutes=5))
    end.FromDatetime(now + dt.timedelta(minutes=1))
    step.FromTimedelta(dt.timedelta(minutes=6))
    for metric, value in (
        (o.TELEMETRY_METRIC_SYSTEM_MEMORY_PERCENT, 70.0),
        (o.TELEMETRY_METRIC_TEMPERATURE_C, 61.25),
        (o.TELEMETRY_METRIC_BATTERY_PERCENT, 33.0),
        (o.TELEMETRY_METRIC_FALLBACK_REQUEST_COUNT, 12.0),
        # 12 of the two samples' 20 + 10 requests.
        (o.TELEMETRY_METRIC_FALLBACK_SHARE, 0.4),
        (o.TELEMETRY_METRIC_MODEL_MEMORY_MB, 7.75),
    ):
        query = o.QueryTelemetryRequest(metric=metric, start=start, end=end, step=step)
        got = await op.QueryTelemetry(query, metadata=ADMIN)
        assert [(s.group, [p.value for p in s.points]) for s in got.series] == [("all", [value])]

    args = ["--server", server.address, "--token", ADMIN_TOKEN, "telemetry", "query"]
    runner = CliRunner(env={"COLUMNS": "200"})
    for metric, shown in (("temperature-c", "61.25"), ("battery-percent", "33"),
                          ("system-memory-percent", "70")):  # fmt: skip
        result = await asyncio.to_thread(runner.invoke, cli, [*args, metric, "--since", "10m"])
        assert result.exit_code == 0, result.output
        assert shown in result.stdout, result.stdout


async def test_the_server_rolls_telemetry_up_in_the_background(tmp_path: Path) -> None:
    """Retention 1 h, the job every 0.2 s: samples 2-3 h old become rollups
    on their own, and queries over the whole range still count them."""
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp",
            listen="127.0.0.1:0",
            admin_token=ADMIN_TOKEN,
            build_workers=0,
            telemetry_retention_s=3600,
            telemetry_rollup_every_s=0.2,
        )
    )
    try:
        async with grpc.aio.insecure_channel(cp.address) as ch:
            a = await enroll_accepted(ch, "hw-a")
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)
            samples = [
                telemetry_sample(1, now - dt.timedelta(hours=3), temperature_c=50.0),
                telemetry_sample(2, now - dt.timedelta(hours=2, minutes=30), temperature_c=58.0),
                telemetry_sample(3, now - dt.timedelta(minutes=1), temperature_c=40.0),
            ]
            resp = await dg.DeviceServiceStub(ch).UploadTelemetry(
                d.UploadTelemetryRequest(samples=samples),
                metadata=bearer_metadata(a.device_credential),
            )
            assert resp.acked_seq == 3
            for _ in range(100):
                if _stored(cp.db) == 1:
                    break
                await asyncio.sleep(0.1)
            assert _stored(cp.db) == 1
            assert sum(r["sample_count"] for r in _rollups(cp.db)) == 2

            start, end, step = Timestamp(), Timestamp(), Duration()
            start.FromDatetime(now - dt.timedelta(hours=4))
            end.FromDatetime(now)
            step.FromTimedelta(dt.timedelta(hours=4))
            op = og.OperatorServiceStub(ch)
            for metric, value in (
                (o.TELEMETRY_METRIC_REQUEST_COUNT, 30.0),
                (o.TELEMETRY_METRIC_TEMPERATURE_C, 58.0),
                (o.TELEMETRY_METRIC_ERROR_RATE, 0.1),
            ):
                query = o.QueryTelemetryRequest(metric=metric, start=start, end=end, step=step)
                got = await op.QueryTelemetry(query, metadata=ADMIN)
                assert [p.value for p in got.series[0].points] == [pytest.approx(value)]
    finally:
        await cp.stop(grace=0.5)
