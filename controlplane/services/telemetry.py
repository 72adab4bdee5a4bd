"""Agent telemetry: deduplicated batch ingest, and bucketed queries.

Ingest: one INSERT ... ON CONFLICT DO NOTHING per batch (executemany),
so a redelivered sample (same device and seq) is stored once, and the agent is
told the highest seq stored for it. A batch is all-or-nothing: one bad sample
rejects the batch and nothing is stored.

Queries bucket samples over time by `step` and aggregate in SQL. How each
metric aggregates a bucket (see METRICS): latency percentiles and max are the
MAX of the samples' values. Percentiles of different intervals cannot be merged
exactly from the percentiles alone; the max is a conservative bound (the worst
device-interval in the bucket), which is what a latency budget is checked
against. Rates are ratios of sums (sum(errors) / sum(requests)), so busy
devices weigh more, and a bucket with no requests has no rate point. Buckets
with no samples have no point at all.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Float, cast, func, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from controlplane.db.models import DeviceClassRow, DeviceRow, TelemetryRow, utcnow
from controlplane.db.uow import Database
from controlplane.errors import InvalidArgument, NotFound, ResourceExhausted

# Bounds one upload's transaction and message size (500 samples ~ 60 KB).
MAX_BATCH = 500
# Samples older than this are refused (the agent's buffer is bounded well below).
MAX_AGE = dt.timedelta(days=30)
# Device clocks may run ahead a little; more than this is a broken clock.
MAX_SKEW = dt.timedelta(minutes=10)
MAX_BUCKETS = 10_000
MAX_POINTS = 50_000
DEFAULT_RANGE = dt.timedelta(hours=1)
DEFAULT_BUCKETS = 60
_MAX_INT = 2**63 - 1
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

GROUP_BY = ("", "model_version", "class", "device")


@dataclass(frozen=True)
class Sample:
    """One interval of one model version on one device, as the agent reports it.
    Timeouts are a subset of errors, errors a subset of requests."""

    seq: int
    at: dt.datetime
    model_name: str = ""
    model_version: str = ""
    request_count: int = 0
    error_count: int = 0
    timeout_count: int = 0
    dropped_samples: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    memory_mb: float = 0.0
    cpu_percent: float = 0.0


@dataclass(frozen=True)
class Point:
    at: dt.datetime
    value: float


@dataclass(frozen=True)
class Series:
    group: str
    points: list[Point]


def _ratio(num: Any, den: Any) -> ColumnElement[Any]:
    return cast(func.sum(num), Float) / func.nullif(cast(func.sum(den), Float), 0.0)


T = TelemetryRow
# metric name -> aggregate over one bucket's rows, given the bucket length in seconds.
METRICS: dict[str, Callable[[float], ColumnElement[Any]]] = {
    "latency_p50_ms": lambda _: func.max(T.latency_p50_ms),
    "latency_p95_ms": lambda _: func.max(T.latency_p95_ms),
    "latency_p99_ms": lambda _: func.max(T.latency_p99_ms),
    "latency_max_ms": lambda _: func.max(T.latency_max_ms),
    "error_rate": lambda _: _ratio(T.error_count, T.request_count),
    "timeout_rate": lambda _: _ratio(T.timeout_count, T.request_count),
    "request_rate": lambda s: cast(func.sum(T.request_count), Float) / s,
    "request_count": lambda _: cast(func.sum(T.request_count), Float),
    "error_count": lambda _: cast(func.sum(T.error_count), Float),
    "dropped_samples": lambda _: cast(func.sum(T.dropped_samples), Float),
    "memory_mb": lambda _: func.max(T.memory_mb),
    "cpu_percent": lambda _: func.avg(T.cpu_percent),
}

_COUNTS = ("request_count", "error_count", "timeout_count", "dropped_samples")
_GAUGES = (
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms", "memory_mb",
    "cpu_percent",
)  # fmt: skip


def epoch_ms(at: dt.datetime) -> int:
    if at.tzinfo is None:
        raise InvalidArgument("timestamps must carry a time zone")
    return (at - _EPOCH) // dt.timedelta(milliseconds=1)


def validate_sample(sample: Sample, now: dt.datetime) -> None:
    """Raise InvalidArgument naming what is wrong with one sample."""
    where = f"sample seq={sample.seq}"
    if not 0 < sample.seq <= _MAX_INT:
        raise InvalidArgument(f"{where}: seq must be between 1 and {_MAX_INT}")
    if not now - MAX_AGE <= sample.at <= now + MAX_SKEW:
        raise InvalidArgument(
            f"{where}: time {sample.at.isoformat()} is not within {MAX_AGE.days} days before "
            f"and {int(MAX_SKEW.total_seconds() // 60)} minutes after the control plane's clock "
            f"({now.isoformat()}); check the device clock"
        )
    if len(sample.model_name) > 100 or len(sample.model_version) > 64:
        raise InvalidArgument(f"{where}: model name or version too long")
    for name in _COUNTS:
        if not 0 <= getattr(sample, name) <= _MAX_INT:
            raise InvalidArgument(f"{where}: {name} must be between 0 and {_MAX_INT}")
    if sample.error_count > sample.request_count:
        raise InvalidArgument(f"{where}: error_count exceeds request_count")
    if sample.timeout_count > sample.error_count:
        raise InvalidArgument(f"{where}: timeout_count exceeds error_count (timeouts are errors)")
    for name in _GAUGES:
        value = getattr(sample, name)
        if not (math.isfinite(value) and value >= 0):
            raise InvalidArgument(f"{where}: {name} must be a finite, non-negative number")
    if not sample.latency_p50_ms <= sample.latency_p95_ms <= sample.latency_p99_ms:
        raise InvalidArgument(f"{where}: latency percentiles must satisfy p50 <= p95 <= p99")
    if sample.latency_max_ms and sample.latency_max_ms < sample.latency_p99_ms:
        raise InvalidArgument(f"{where}: latency_max_ms is below latency_p99_ms")


class TelemetryService:
    def __init__(self, db: Database, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self._db = db
        self._clock = clock

    # ------------------------------------------------------------ ingest

    def ingest(self, device_id: str, samples: Sequence[Sample]) -> int:
        """Store a batch once per (device, seq); the highest seq now stored for
        the device (0: none). An empty batch just reports it."""
        if len(samples) > MAX_BATCH:
            raise ResourceExhausted(
                f"{len(samples)} samples in one upload; send at most {MAX_BATCH} per call"
            )
        now = self._clock()
        for sample in samples:
            validate_sample(sample, now)
        with self._db.unit_of_work() as uow:
            session = uow.session
            class_name = self._class_of(session, device_id)
            if samples:
                # One compiled (cached) statement for the whole batch: never a
                # round trip per row.
                session.connection().execute(
                    self._insert(session), self._rows(device_id, class_name, samples)
                )
            acked = session.scalar(
                select(func.max(TelemetryRow.seq)).where(TelemetryRow.device_id == device_id)
            )
            uow.commit()
        return int(acked or 0)

    @staticmethod
    def _class_of(session: Session, device_id: str) -> str:
        row = session.execute(
            select(DeviceRow.id, DeviceClassRow.name)
            .outerjoin(DeviceClassRow, DeviceRow.class_id == DeviceClassRow.id)
            .where(DeviceRow.id == device_id)
        ).first()
        if row is None:
            raise NotFound(f"no device with id {device_id!r}")
        return row[1] or ""

    @staticmethod
    def _rows(device_id: str, class_name: str, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        rows = []
        for sample in samples:
            values = {f.name: getattr(sample, f.name) for f in fields(Sample) if f.name != "at"}
            values.update(device_id=device_id, class_name=class_name, at_ms=epoch_ms(sample.at))
            rows.append(values)
        return rows

    @staticmethod
    def _insert(session: Session) -> Any:
        # Executed with the batch's rows: sqlite3's executemany of one prepared
        # statement, psycopg's pipelined executemany. (RETURNING would make
        # SQLAlchemy send multi-row VALUES to PostgreSQL, but measured slower.)
        postgres = session.get_bind().dialect.name == "postgresql"
        insert = pg_insert if postgres else sqlite_insert
        return insert(TelemetryRow).on_conflict_do_nothing(index_elements=["device_id", "seq"])

    # ------------------------------------------------------------ queries

    def query(
        self,
        *,
        metric: str,
        group_by: str = "",
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        step: dt.timedelta | None = None,
        device_id: str = "",
        class_name: str = "",
        model_name: str = "",
        model_version: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> list[Series]:
        """One series per group, each point a bucket [at, at + step) that has
        samples. Time range defaults to the last hour, step to 1/60 of it."""
        if metric not in METRICS:
            raise InvalidArgument(f"unknown metric {metric!r}; one of: {', '.join(METRICS)}")
        if group_by not in GROUP_BY:
            raise InvalidArgument(f"unknown grouping {group_by!r}; one of: {', '.join(GROUP_BY)}")
        end = end or self._clock()
        start = start or end - DEFAULT_RANGE
        if start >= end:
            raise InvalidArgument("the time range is empty: start must be before end")
        span = end - start
        if not step:
            step = max(dt.timedelta(seconds=math.ceil(span.total_seconds() / DEFAULT_BUCKETS)),
                       dt.timedelta(seconds=1))  # fmt: skip
        if step < dt.timedelta(seconds=1):
            raise InvalidArgument("step must be at least one second")
        if span / step > MAX_BUCKETS:
            raise InvalidArgument(
                f"{math.ceil(span / step)} buckets of {step}; at most {MAX_BUCKETS}: "
                "use a larger step or a shorter range"
            )
        start_ms, end_ms = epoch_ms(start), epoch_ms(end)
        step_ms = step // dt.timedelta(milliseconds=1)

        # SQLAlchemy's // is integer (floor) division on both backends; the
        # operands are never negative (at_ms >= start_ms).
        bucket = ((T.at_ms - literal(start_ms, BigInteger)) // literal(step_ms, BigInteger)).label(
            "bucket"
        )
        value = METRICS[metric](step.total_seconds()).label("value")
        group = {
            "": None,
            "model_version": T.model_name + "@" + T.model_version,
            "class": T.class_name,
            "device": T.device_id,
        }[group_by]

        with self._db.unit_of_work(readonly=True) as uow:
            filters = [T.at_ms >= start_ms, T.at_ms < end_ms]
            if device_id:
                filters.append(T.device_id == device_id)
            if class_name:
                filters.append(T.class_name == class_name)
            if model_name:
                filters.append(T.model_name == model_name)
            if model_version:
                filters.append(T.model_version == model_version)
            if labels:
                wanted = dict(labels)
                ids = [
                    id_
                    for id_, have in uow.session.execute(select(DeviceRow.id, DeviceRow.labels))
                    if all(have.get(k) == v for k, v in wanted.items())
                ]
                if not ids:
                    return []
                filters.append(T.device_id.in_(ids))
            keys = [] if group is None else [group.label("grp")]
            stmt = (
                select(*keys, bucket, value)
                .where(*filters)
                .group_by(*keys, bucket)
                .order_by(*keys, bucket)
                .limit(MAX_POINTS + 1)
            )
            rows = [
                (str(row[0]) if keys else "all", *row[-2:]) for row in uow.session.execute(stmt)
            ]
        if len(rows) > MAX_POINTS:
            raise ResourceExhausted(
                f"the answer has more than {MAX_POINTS} points; use a larger step, a shorter "
                "range or a filter"
            )
        series: dict[str, list[Point]] = {}
        for grp_value, index, agg in rows:
            if agg is None:
                continue  # e.g. an error rate over a bucket with no requests
            at = start + step * int(index)
            series.setdefault(grp_value, []).append(Point(at, float(agg)))
        return [Series(g, pts) for g, pts in series.items()]
