"""Agent telemetry: deduplicated batch ingest, hourly rollups, bucketed queries.

Ingest. A batch is all-or-nothing: one bad sample rejects it and nothing is
stored. A device's seqs only grow (the agent numbers samples in order, sends
them in order and forgets everything at or below the seq it is acked), so
the highest seq stored for a device (raw or rolled up) is a high-water mark:
a sample at or below it is a redelivery and is skipped, and the agent is
acked the mark. One query reads the device's class and mark, then the new
rows go in as plain tuples: on SQLite in multi-row INSERTs of 100 rows (its
writer lock, taken at BEGIN, keeps the read and the insert consistent), on
PostgreSQL with one COPY. Two uploads of one device racing on PostgreSQL
make the later COPY hit the unique (device_id, seq) index; that batch is then
redone with INSERT ... ON CONFLICT DO NOTHING. This path was profiled
against a raw bulk insert (bench/bench_telemetry.py, docs/benchmarks.md):
validation runs column by column in C builtins, and per-row Python work is
building one tuple.

Rollups. Raw rows are kept for `retention` (whole hours), then `roll_up`
moves them into telemetry_rollups, one row per (hour, device, model name,
model version, class): aggregate, merge into any rollup row already there
(late samples), record the device's highest rolled-up seq, delete the raw
rows, all in one transaction that sees one snapshot (SQLite: the writer lock;
PostgreSQL: REPEATABLE READ, so rows committed meanwhile are neither counted
nor deleted and wait for the next run). Every sample is therefore in exactly
one of the two tables, and running the job twice changes nothing. Replicas
on PostgreSQL skip a run while another holds the job's advisory lock.
Percentiles cannot be merged exactly (see TelemetryRollupRow): a rollup keeps
the request-weighted mean of each latency percentile and, for queries, its
maximum.

Which artifact served (a device class's lighter fallback, served while the
agent's power/thermal policy asks for less work): a sample's variant is
the artifact serving at the end of its interval, kept on raw rows only;
its fallback_request_count is a count like request_count (at most it),
summed into the rollups, so it means the same over either kind of row.

Queries bucket samples over time by `step` and aggregate in SQL, over raw
rows and rollup rows together (UNION ALL in one statement, so one snapshot:
nothing is missed or counted twice while the job moves rows). Rollup rows
count at the start of their hour, so rolled-up time has hourly resolution.
How each metric aggregates a bucket (see METRICS): latency percentiles and
max are the MAX of the samples' values. Percentiles of different intervals
cannot be merged exactly from the percentiles alone; the max is a
conservative bound (the worst device-interval in the bucket), which is what
a latency budget is checked against, and it is the same whether the samples
are raw or rolled up. Rates are ratios of sums (sum(errors) / sum(requests)),
so busy devices weigh more, and a bucket with no requests has no rate point.
Memory (the agent's RSS, and the memory its model adds), system memory and
temperature are the MAX, battery the MIN, CPU the mean over samples.
Buckets with no samples have no point at all.

No aggregate can fail on a value a column holds. Counts are summed as
floats in queries (exact up to 2^53), and the rollups clamp each raw row to
ROW_COUNT_CAP and ROW_GAUGE_CAP: before the API's ranges (api/limits.py
RANGES: counts at most 10^9 a sample) a device could store request_count
2^63-1, and then SQLite's integer SUM overflowed in every query and rollup
that met another sample ("integer overflow", for every user, and the
rollup job stuck on that hour for good), PostgreSQL's bigint and float
arithmetic likewise ("out of range"). The caps are far above the API's
ranges, so they change nothing a device can send now.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import le
from typing import Any, NamedTuple

import psycopg
import sqlalchemy.exc
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Float,
    Select,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from edgefleet.controlplane.db.in_list import padded
from edgefleet.controlplane.db.models import (
    DeviceRow,
    TelemetryRollupRow,
    TelemetryRow,
    TelemetryWatermarkRow,
    utcnow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import DomainError, InvalidArgument, NotFound, ResourceExhausted

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
DEFAULT_RETENTION = dt.timedelta(days=7)
MIN_RETENTION = dt.timedelta(hours=1)
HOUR_MS = 3_600_000
_MAX_INT = 2**63 - 1
_MAX_INT32 = 2**31 - 1
_MS = dt.timedelta(milliseconds=1)
_MAX_AGE_MS = MAX_AGE // _MS
_MAX_SKEW_MS = MAX_SKEW // _MS
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# pg_try_advisory_xact_lock key of the rollup job ("efrollup" in ASCII).
_ROLLUP_LOCK = int.from_bytes(b"efrollup", "big") % 2**63
# SQLite's limit of parameters in one statement (32766 since 3.32, 999
# before); PostgreSQL's is 65535.
_MAX_PARAMS = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
# What an aggregate takes of one stored row at most (see the module
# docstring): far above the API's ranges (10^9 requests, a day of latency,
# 102,400 % CPU a sample), so only rows stored before them are clamped; a
# rollup of capped rows stays within int64 up to 9 million rows an hour.
ROW_COUNT_CAP = 10**12
ROW_GAUGE_CAP = 1e12
# A rollup row's counts before a merge adds late samples to them.
_ROLLUP_COUNT_CAP = 2**62
# Power modes that mean "not limited" ("" from agents that predate the field).
UNLIMITED_MODES = ("", "normal")
# A sample's variant: which artifact served ("": the agent did not say).
PRIMARY, FALLBACK = "primary", "fallback"
VARIANTS = frozenset({"", PRIMARY, FALLBACK})

GROUP_BY = ("", "model_version", "class", "device")

log = logging.getLogger(__name__)

# What the database raises for a value it cannot store (a NUL in text on
# PostgreSQL, a string past its column, a number past its type); sqlite3
# raises OverflowError for an int past 64 bits.
_UNSTORABLE = (psycopg.DataError, sqlalchemy.exc.DataError, OverflowError)


class Sample(NamedTuple):
    """One interval of one model version on one device, as the agent reports it.
    Timeouts are a subset of errors, errors a subset of requests. A tuple in
    the telemetry table's column order after device_id and class_name, so
    that ingest stores it as it is (see INSERT_COLUMNS). temperature_c and
    battery_percent are None where the device has no such sensor."""

    seq: int
    at_ms: int  # integer epoch milliseconds, UTC
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
    system_memory_percent: float = 0.0
    temperature_c: float | None = None
    battery_percent: float | None = None
    power_mode: str = ""
    concurrency_limit: int = 0
    # A shadow stage's candidate and how it compared with the active model.
    shadow_version: str = ""
    shadow_requests: int = 0
    shadow_agreement: float = 0.0
    shadow_max_diff: float = 0.0
    shadow_latency_p95_ms: float = 0.0
    # Which artifact of the version served at the end of the interval (one
    # of VARIANTS) and how many of request_count its lighter fallback served.
    variant: str = ""
    fallback_request_count: int = 0
    # The memory the model adds to the agent, MB (memory_mb is the agent's
    # whole RSS): what rollout memory gates compare with the class's
    # max_memory_mb. 0: not measured.
    model_memory_mb: float = 0.0

    @property
    def at(self) -> dt.datetime:
        """The sample's time, an aware UTC datetime."""
        return _EPOCH + self.at_ms * _MS


# One device's upload: its id and its samples.
Upload = tuple[str, Sequence[Sample]]

INSERT_COLUMNS = ("device_id", "class_name", *Sample._fields)
# Text, not a Core select(): building and caching the select with its two
# subqueries cost 0.17 ms an upload, more than running it.
# Per device of a group commit: its class name now and its high-water mark
# (the highest seq stored, raw or rolled up), both in one snapshot, so a
# roll-up committing meanwhile cannot hide a seq from both. One statement
# for the whole group, not one per device (333 a second at 10,000 devices
# uploading every 30 s).
_DEVICE_MARKS = text(
    "SELECT d.id, c.name,"
    " (SELECT max(t.seq) FROM telemetry t WHERE t.device_id = d.id),"
    " (SELECT w.max_seq FROM telemetry_watermarks w WHERE w.device_id = d.id)"
    " FROM devices d LEFT OUTER JOIN device_classes c ON d.class_id = c.id"
    " WHERE d.id IN :ids"
).bindparams(bindparam("ids", expanding=True))
# Device ids per _DEVICE_MARKS statement.
_MARKS_CHUNK = 500
# Rows per multi-row INSERT: measured no faster past 100 on SQLite.
_ROWS_PER_STATEMENT = min(100, _MAX_PARAMS // len(INSERT_COLUMNS))


@dataclass(frozen=True)
class Point:
    at: dt.datetime
    value: float


@dataclass(frozen=True)
class Series:
    group: str
    points: list[Point]


def float_sum(column: Any) -> ColumnElement[Any]:
    """SUM as a float: a sum of integers past int64 is an error on SQLite
    (and a float on PostgreSQL's numeric SUM anyway)."""
    return func.sum(cast(column, Float))


def _ratio(num: Any, den: Any) -> ColumnElement[Any]:
    return float_sum(num) / func.nullif(float_sum(den), 0.0)


# The model-version group of samples of no model (an agent serving none).
NO_MODEL = "(no model)"


def at_most(column: Any, cap: float) -> ColumnElement[Any]:
    """`column`, or `cap` where it is larger (NULL stays NULL)."""
    bound = literal(cap, Float if isinstance(cap, float) else BigInteger)
    return case((column > cap, bound), else_=column)


# metric name -> aggregate over one bucket's rows (the columns of _source()'s
# union of raw and rollup rows), given the bucket length in seconds.
METRICS: dict[str, Callable[[Any, float], ColumnElement[Any]]] = {
    "latency_p50_ms": lambda u, _: func.max(u.latency_p50_ms),
    "latency_p95_ms": lambda u, _: func.max(u.latency_p95_ms),
    "latency_p99_ms": lambda u, _: func.max(u.latency_p99_ms),
    "latency_max_ms": lambda u, _: func.max(u.latency_max_ms),
    "error_rate": lambda u, _: _ratio(u.error_count, u.request_count),
    "timeout_rate": lambda u, _: _ratio(u.timeout_count, u.request_count),
    "request_rate": lambda u, s: float_sum(u.request_count) / s,
    "request_count": lambda u, _: float_sum(u.request_count),
    "error_count": lambda u, _: float_sum(u.error_count),
    "dropped_samples": lambda u, _: float_sum(u.dropped_samples),
    "memory_mb": lambda u, _: func.max(u.memory_mb),
    "cpu_percent": lambda u, _: _ratio(u.cpu_sum, u.samples),
    "system_memory_percent": lambda u, _: func.max(u.system_memory_percent),
    "temperature_c": lambda u, _: func.max(u.temperature_c),
    "battery_percent": lambda u, _: func.min(u.battery_percent),
    # The lighter fallback artifact's share of the work (docs/power.md); like
    # the error rate, a bucket without requests has no share.
    "fallback_request_count": lambda u, _: float_sum(u.fallback_request_count),
    "fallback_share": lambda u, _: _ratio(u.fallback_request_count, u.request_count),
    "model_memory_mb": lambda u, _: func.max(u.model_memory_mb),
}

_COUNTS = (
    "request_count", "error_count", "timeout_count", "dropped_samples", "fallback_request_count",
)  # fmt: skip
_GAUGES = (
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms", "memory_mb",
    "cpu_percent", "system_memory_percent", "model_memory_mb",
)  # fmt: skip
# What ingest checks the range of: the rolled-up columns and the shadow's.
_CHECKED_COUNTS = (*_COUNTS, "shadow_requests")
_CHECKED_GAUGES = (*_GAUGES, "shadow_agreement", "shadow_max_diff", "shadow_latency_p95_ms")


def epoch_ms(at: dt.datetime) -> int:
    """Integer epoch milliseconds of an aware datetime."""
    if at.tzinfo is None:
        raise InvalidArgument("timestamps must carry a time zone")
    return (at - _EPOCH) // _MS


def _iso(ms: int) -> str:
    """A time for a message; one no datetime holds (a device's clock, or a
    client, can send any int64 of seconds) as its milliseconds."""
    try:
        return (_EPOCH + ms * _MS).isoformat()
    except OverflowError:
        return f"{ms} ms since the epoch"


def _finite_in(value: float | None, low: float, high: float) -> bool:
    return value is None or (math.isfinite(value) and low <= value <= high)


def validate_sample(sample: Sample, now_ms: int) -> None:
    """Raise InvalidArgument naming what is wrong with one sample."""
    where = f"sample seq={sample.seq}"
    if not 0 < sample.seq <= _MAX_INT:
        raise InvalidArgument(f"{where}: seq must be between 1 and {_MAX_INT}")
    if not now_ms - _MAX_AGE_MS <= sample.at_ms <= now_ms + _MAX_SKEW_MS:
        raise InvalidArgument(
            f"{where}: time {_iso(sample.at_ms)} is not within {MAX_AGE.days} days before "
            f"and {int(MAX_SKEW.total_seconds() // 60)} minutes after the control plane's clock "
            f"({_iso(now_ms)}); check the device clock"
        )
    if len(sample.model_name) > 100 or len(sample.model_version) > 64:
        raise InvalidArgument(f"{where}: model name or version too long")
    if len(sample.shadow_version) > 64:
        raise InvalidArgument(f"{where}: shadow_version is longer than 64 characters")
    for name in _CHECKED_COUNTS:
        if not 0 <= getattr(sample, name) <= _MAX_INT:
            raise InvalidArgument(f"{where}: {name} must be between 0 and {_MAX_INT}")
    if sample.error_count > sample.request_count:
        raise InvalidArgument(f"{where}: error_count exceeds request_count")
    if sample.timeout_count > sample.error_count:
        raise InvalidArgument(f"{where}: timeout_count exceeds error_count (timeouts are errors)")
    if sample.fallback_request_count > sample.request_count:
        raise InvalidArgument(
            f"{where}: fallback_request_count exceeds request_count (the fallback's requests "
            "are some of the requests)"
        )
    if sample.variant not in VARIANTS:
        raise InvalidArgument(
            f"{where}: variant is {sample.variant!r}; it must be {PRIMARY!r}, {FALLBACK!r} "
            "or '' (not said)"
        )
    for name in _CHECKED_GAUGES:
        value = getattr(sample, name)
        if not (math.isfinite(value) and value >= 0):
            raise InvalidArgument(f"{where}: {name} must be a finite, non-negative number")
    if sample.system_memory_percent > 100:
        raise InvalidArgument(f"{where}: system_memory_percent must be at most 100")
    if not sample.latency_p50_ms <= sample.latency_p95_ms <= sample.latency_p99_ms:
        raise InvalidArgument(f"{where}: latency percentiles must satisfy p50 <= p95 <= p99")
    if sample.latency_max_ms and sample.latency_max_ms < sample.latency_p99_ms:
        raise InvalidArgument(f"{where}: latency_max_ms is below latency_p99_ms")
    if not _finite_in(sample.temperature_c, -273.15, 1000.0):
        raise InvalidArgument(f"{where}: temperature_c must be between -273.15 and 1000 (deg C)")
    if not _finite_in(sample.battery_percent, 0.0, 100.0):
        raise InvalidArgument(f"{where}: battery_percent must be between 0 and 100")
    if len(sample.power_mode) > 32:
        raise InvalidArgument(f"{where}: power_mode is longer than 32 characters")
    if not 0 <= sample.concurrency_limit <= _MAX_INT32:
        raise InvalidArgument(f"{where}: concurrency_limit must be between 0 and {_MAX_INT32}")


def _bounded(values: Sequence[Any], low: float, high: float) -> bool:
    return not values or (low <= min(values) and max(values) <= high)


def validate_batch(samples: Sequence[Sample], now_ms: int) -> None:
    """validate_sample for every sample, but column by column with builtins
    that loop in C: per-sample checks were the largest Python cost of ingest.
    Only a batch that fails these goes through validate_sample."""
    if not samples:
        return
    columns = dict(zip(Sample._fields, zip(*samples, strict=True), strict=True))
    temperatures = [v for v in columns["temperature_c"] if v is not None]
    batteries = [v for v in columns["battery_percent"] if v is not None]
    p50, p95, p99, top = (columns[n] for n in _GAUGES[:4])
    ok = (
        _bounded(columns["seq"], 1, _MAX_INT)
        and _bounded(columns["at_ms"], now_ms - _MAX_AGE_MS, now_ms + _MAX_SKEW_MS)
        and max(map(len, columns["model_name"])) <= 100
        and max(map(len, columns["model_version"])) <= 64
        and max(map(len, columns["shadow_version"])) <= 64
        and all(_bounded(columns[name], 0, _MAX_INT) for name in _CHECKED_COUNTS)
        and all(map(le, columns["error_count"], columns["request_count"]))
        and all(map(le, columns["timeout_count"], columns["error_count"]))
        and all(map(le, columns["fallback_request_count"], columns["request_count"]))
        and VARIANTS.issuperset(columns["variant"])
        # A finite sum means no NaN or infinity (checked first: min() and
        # max() are meaningless with a NaN among the values).
        and all(math.isfinite(sum(columns[n])) and min(columns[n]) >= 0 for n in _CHECKED_GAUGES)
        and max(columns["system_memory_percent"]) <= 100
        and all(map(le, p50, p95))
        and all(map(le, p95, p99))
        and all(m == 0 or m >= p for m, p in zip(top, p99, strict=True))
        and math.isfinite(sum(temperatures))
        and _bounded(temperatures, -273.15, 1000.0)
        and math.isfinite(sum(batteries))
        and _bounded(batteries, 0.0, 100.0)
        and max(map(len, columns["power_mode"])) <= 32
        and _bounded(columns["concurrency_limit"], 0, _MAX_INT32)
    )
    if not ok:
        # The fast checks may refuse a valid batch (a sum of huge values
        # overflows), never pass an invalid one; validate_sample decides.
        for sample in samples:
            validate_sample(sample, now_ms)


def _psycopg(conn: Connection) -> psycopg.Connection[Any]:
    """The driver's connection under a PostgreSQL one, for COPY (same transaction)."""
    dbapi = conn.connection.dbapi_connection
    assert isinstance(dbapi, psycopg.Connection)
    return dbapi


def _hour_floor(ms: int) -> int:
    return ms - ms % HOUR_MS


def _greatest(old: Any, new: Any, *, nullable: bool = False) -> ColumnElement[Any]:
    """The larger of two values, a NULL losing to any value (portable:
    SQLite's two-argument max() is NULL when either is)."""
    whens = [(old.is_(None), new), (new.is_(None), old)] if nullable else []
    return case(*whens, (old >= new, old), else_=new)


def _least(old: Any, new: Any) -> ColumnElement[Any]:
    return case((old.is_(None), new), (new.is_(None), old), (old <= new, old), else_=new)


def _weighted(old: Any, new: Any, old_w: Any, new_w: Any) -> ColumnElement[Any]:
    """Merge two means by their weights; 0 when both weigh nothing. In
    floats, the means capped: a row stored before the API's ranges must not
    overflow the arithmetic."""
    old_w, new_w = cast(old_w, Float), cast(new_w, Float)
    weighted = at_most(old, ROW_GAUGE_CAP) * old_w + at_most(new, ROW_GAUGE_CAP) * new_w
    return func.coalesce(weighted / func.nullif(old_w + new_w, 0.0), 0.0)


class TelemetryService:
    """Telemetry use cases over the database: ingest, roll_up, query."""

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        retention: dt.timedelta = DEFAULT_RETENTION,
    ) -> None:
        if retention < MIN_RETENTION:
            raise ValueError(f"telemetry retention must be at least {MIN_RETENTION}")
        self._db = db
        self._clock = clock
        self.retention = retention
        self._postgres = db.engine.dialect.name == "postgresql"
        row = f"({', '.join(['%s' if self._postgres else '?'] * len(INSERT_COLUMNS))})"
        self._insert_sql, self._insert_many_sql = (
            f"INSERT INTO telemetry ({', '.join(INSERT_COLUMNS)}) VALUES {values} "
            "ON CONFLICT (device_id, seq) DO NOTHING"
            for values in (row, ", ".join([row] * _ROWS_PER_STATEMENT))
        )
        self._copy_sql = f"COPY telemetry ({', '.join(INSERT_COLUMNS)}) FROM STDIN"

    # ------------------------------------------------------------ ingest

    def ingest(self, device_id: str, samples: Sequence[Sample]) -> int:
        """Store a batch once per (device, seq); the highest seq now stored for
        the device (0: none). An empty batch just reports it."""
        (result,) = self.ingest_many([(device_id, samples)])
        if isinstance(result, Exception):
            raise result
        return result

    def ingest_many(self, uploads: Sequence[Upload]) -> list[int | DomainError]:
        """Several devices' uploads in one transaction (a group commit): per
        upload, what ingest() returns, or the error that refused it alone
        (a bad sample, too many, an unknown device). A database error fails
        them all."""
        now_ms = epoch_ms(self._clock())
        refused: dict[int, DomainError] = {}
        valid: list[tuple[int, str, Sequence[Sample]]] = []
        for index, (device_id, samples) in enumerate(uploads):
            try:
                if len(samples) > MAX_BATCH:
                    raise ResourceExhausted(
                        f"{len(samples)} samples in one upload; send at most {MAX_BATCH} per call"
                    )
                validate_batch(samples, now_ms)
            except DomainError as error:
                refused[index] = error
            else:
                valid.append((index, device_id, samples))
        acked: dict[int, int | DomainError] = {}
        if valid:
            try:
                acked = self._store_group(valid)
            except _UNSTORABLE:
                # The checks above and the API's field limits (api/limits.py)
                # should leave nothing the database refuses; if one gets
                # through, it must fail its own upload, not every upload of
                # the group commit (on PostgreSQL a NUL in one sample did).
                log.warning(
                    "the database refused a value in a group commit of %d telemetry uploads; "
                    "storing them one by one", len(valid),
                )  # fmt: skip
                acked = self._store_each(valid)
        return [refused[i] if i in refused else acked[i] for i in range(len(uploads))]

    def _store_group(
        self, uploads: Sequence[tuple[int, str, Sequence[Sample]]]
    ) -> dict[int, int | DomainError]:
        try:
            return self._store(uploads, copy=self._postgres)
        except psycopg.errors.UniqueViolation:
            # Only COPY raises for a duplicate: another upload of a device
            # stored some of these seqs after our read. Redo, skipping them.
            log.info("a telemetry group commit raced another upload; redone with ON CONFLICT")
            return self._store(uploads, copy=False)
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as lost:
            # COPY runs on the raw psycopg cursor, so its errors arrive
            # unwrapped (uow maps only SQLAlchemy's OperationalError to
            # UNAVAILABLE): a deadlock or serialization failure here was an
            # INTERNAL for every upload of the group (2,329 of 80,854 in
            # bench_rollout on two replicas). Group commits insert in one
            # key order (_store) and cannot deadlock one another, but
            # another writer of these rows may; PostgreSQL rolled us back,
            # so redo once, skipping whatever the winner stored.
            log.info(
                "a telemetry group commit lost a lock conflict (%s); redone", type(lost).__name__
            )
            return self._store(uploads, copy=False)

    def _store_each(
        self, uploads: Sequence[tuple[int, str, Sequence[Sample]]]
    ) -> dict[int, int | DomainError]:
        """Each upload in a transaction of its own; one the database refuses
        is InvalidArgument, alone."""
        acked: dict[int, int | DomainError] = {}
        for upload in uploads:
            try:
                acked.update(self._store([upload], copy=False))
            except _UNSTORABLE as exc:
                reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                acked[upload[0]] = InvalidArgument(
                    f"the database cannot store a value of this upload ({reason}); "
                    "check the samples' text fields"
                )
        return acked

    def _store(
        self, uploads: Sequence[tuple[int, str, Sequence[Sample]]], *, copy: bool
    ) -> dict[int, int | DomainError]:
        refused: dict[int, DomainError] = {}
        rows: dict[tuple[str, int], tuple[Any, ...]] = {}
        with self._db.unit_of_work() as uow:
            conn = uow.session.connection()
            # device id -> (class name, the highest seq stored once this commits)
            marks = self._device_marks(conn, sorted({device_id for _, device_id, _ in uploads}))
            for index, device_id, samples in uploads:
                if device_id not in marks:
                    refused[index] = NotFound(f"no device with id {device_id!r}")
                    continue
                class_name, mark = marks[device_id]
                fresh = [s for s in samples if s.seq > mark]
                for s in fresh:
                    # A seq twice (in one upload, or two uploads of one
                    # device in this commit): the first sample is kept, as
                    # ON CONFLICT DO NOTHING would.
                    rows.setdefault((device_id, s.seq), (device_id, class_name, *s))
                if fresh:
                    marks[device_id] = class_name, max(mark, max(s.seq for s in fresh))
            if rows:
                # In key order: two group commits holding uploads of the same
                # devices (a retried upload in one, the original in the
                # other) then wait on each other's index entries in one
                # order, never in a cycle (a deadlock on PostgreSQL).
                self._insert(conn, [rows[k] for k in sorted(rows)], copy=copy)
            uow.commit()
        return {
            index: refused[index] if index in refused else marks[device_id][1]
            for index, device_id, _ in uploads
        }

    def _insert(self, conn: Connection, rows: list[tuple[Any, ...]], *, copy: bool) -> None:
        if copy:
            with _psycopg(conn).cursor() as cursor, cursor.copy(self._copy_sql) as pipe:
                for row in rows:
                    pipe.write_row(row)
            return
        # Multi-row VALUES of a fixed size (so the prepared statement is
        # cached), the rest one row per executemany step. On SQLite this beat
        # executemany by a third: one sqlite3_step, and one release of the
        # GIL, per statement instead of per row.
        whole = len(rows) - len(rows) % _ROWS_PER_STATEMENT
        for first in range(0, whole, _ROWS_PER_STATEMENT):
            chunk = rows[first : first + _ROWS_PER_STATEMENT]
            conn.exec_driver_sql(self._insert_many_sql, tuple(chain.from_iterable(chunk)))
        if whole < len(rows):
            conn.exec_driver_sql(self._insert_sql, rows[whole:])

    @staticmethod
    def _device_marks(conn: Connection, device_ids: list[str]) -> dict[str, tuple[str, int]]:
        """Per known device of `device_ids`: its class name and high-water
        mark (_DEVICE_MARKS); unknown devices are absent."""
        marks: dict[str, tuple[str, int]] = {}
        for first in range(0, len(device_ids), _MARKS_CHUNK):
            chunk = padded(device_ids[first : first + _MARKS_CHUNK])
            for device_id, class_name, raw, rolled in conn.execute(_DEVICE_MARKS, {"ids": chunk}):
                marks[device_id] = class_name or "", max(raw or 0, rolled or 0)
        return marks

    # ------------------------------------------------------------ rollups

    def roll_up(self, *, now: dt.datetime | None = None) -> int:
        """Move raw rows older than the retention (whole hours) into the hourly
        rollups, one hour per transaction, oldest first; how many raw rows
        were moved. Safe to run anywhere at any time: see the module docstring."""
        cutoff = _hour_floor(epoch_ms(now or self._clock()) - self.retention // _MS)
        moved = 0
        # Each pass moves at least one row, so this ends.
        while count := self._roll_up_oldest_hour(cutoff):
            moved += count
        return moved

    def _roll_up_oldest_hour(self, cutoff_ms: int) -> int:
        """Roll up the oldest hour before cutoff_ms; how many raw rows moved
        (0: none left, or on PostgreSQL another replica is rolling up)."""
        t = TelemetryRow
        with self._db.unit_of_work() as uow:
            if self._postgres:
                conn = uow.session.connection(
                    execution_options={"isolation_level": "REPEATABLE READ"}
                )
                locked = conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _ROLLUP_LOCK}
                ).scalar()
                if not locked:
                    return 0
            else:
                conn = uow.session.connection()
            oldest = conn.execute(select(func.min(t.at_ms)).where(t.at_ms < cutoff_ms)).scalar()
            if oldest is None:
                return 0
            hour = _hour_floor(oldest)
            in_hour = (t.at_ms >= hour, t.at_ms < hour + HOUR_MS)
            conn.execute(self._merge_rollups(hour, in_hour))
            conn.execute(self._merge_watermarks(in_hour))
            count = conn.execute(delete(t).where(*in_hour)).rowcount
            uow.commit()
        return int(count)

    def _upsert(self) -> Any:
        return pg_insert if self._postgres else sqlite_insert

    def _merge_rollups(self, hour: int, in_hour: tuple[ColumnElement[bool], ...]) -> Any:
        """INSERT the hour's aggregates ... ON CONFLICT merge them into the
        rollup rows already there (samples that arrived late)."""
        t, r = TelemetryRow, TelemetryRollupRow
        # Each raw row capped (see the module docstring), in floats where
        # values are multiplied.
        counts = {name: at_most(getattr(t, name), ROW_COUNT_CAP) for name in _COUNTS}
        requests = cast(counts["request_count"], Float)
        weighted = func.sum(requests)

        def wmean(column: Any) -> ColumnElement[Any]:
            product = cast(at_most(column, ROW_GAUGE_CAP), Float) * requests
            return func.coalesce(func.sum(product) / func.nullif(weighted, 0.0), 0.0)

        keys = (t.device_id, t.model_name, t.model_version, t.class_name)
        aggregates = {
            "device_id": t.device_id,
            "hour_ms": literal(hour, BigInteger),
            "model_name": t.model_name,
            "model_version": t.model_version,
            "class_name": t.class_name,
            "sample_count": func.count(),
            **{name: func.sum(capped) for name, capped in counts.items()},
            "latency_p50_ms": wmean(t.latency_p50_ms),
            "latency_p95_ms": wmean(t.latency_p95_ms),
            "latency_p99_ms": wmean(t.latency_p99_ms),
            "max_latency_p50_ms": func.max(t.latency_p50_ms),
            "max_latency_p95_ms": func.max(t.latency_p95_ms),
            "max_latency_p99_ms": func.max(t.latency_p99_ms),
            "latency_max_ms": func.max(t.latency_max_ms),
            "memory_mb": func.max(t.memory_mb),
            "model_memory_mb": func.max(t.model_memory_mb),
            "cpu_percent": func.avg(at_most(t.cpu_percent, ROW_GAUGE_CAP)),
            "system_memory_percent": func.max(t.system_memory_percent),
            "temperature_c": func.max(t.temperature_c),
            "battery_percent": func.min(t.battery_percent),
            "limited_samples": func.sum(case((t.power_mode.in_(UNLIMITED_MODES), 0), else_=1)),
            "min_concurrency_limit": func.min(
                case((t.concurrency_limit > 0, t.concurrency_limit), else_=None)
            ),
        }
        source = select(*aggregates.values()).where(*in_hour).group_by(*keys)
        stmt = self._upsert()(r).from_select(list(aggregates), source)
        old, new = r.__table__.c, stmt.excluded

        def by_requests(name: str) -> ColumnElement[Any]:
            return _weighted(old[name], new[name], old.request_count, new.request_count)

        merged: dict[str, Any] = {
            name: at_most(old[name], _ROLLUP_COUNT_CAP) + new[name]
            for name in ("sample_count", *_COUNTS, "limited_samples")
        }
        merged |= {name: by_requests(name) for name in _GAUGES[:3]}
        merged |= {
            name: _greatest(old[name], new[name])
            for name in ("max_latency_p50_ms", "max_latency_p95_ms", "max_latency_p99_ms",
                         "latency_max_ms", "memory_mb", "system_memory_percent",
                         "model_memory_mb")
        }  # fmt: skip
        merged["cpu_percent"] = _weighted(
            old.cpu_percent, new.cpu_percent, old.sample_count, new.sample_count
        )
        merged["temperature_c"] = _greatest(old.temperature_c, new.temperature_c, nullable=True)
        merged["battery_percent"] = _least(old.battery_percent, new.battery_percent)
        merged["min_concurrency_limit"] = _least(
            old.min_concurrency_limit, new.min_concurrency_limit
        )
        return stmt.on_conflict_do_update(index_elements=list(r.__table__.primary_key), set_=merged)

    def _merge_watermarks(self, in_hour: tuple[ColumnElement[bool], ...]) -> Any:
        t, w = TelemetryRow, TelemetryWatermarkRow
        source = select(t.device_id, func.max(t.seq)).where(*in_hour).group_by(t.device_id)
        stmt = self._upsert()(w).from_select(["device_id", "max_seq"], source)
        return stmt.on_conflict_do_update(
            index_elements=[w.device_id],
            set_={"max_seq": _greatest(w.__table__.c.max_seq, stmt.excluded.max_seq)},
        )

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
        step_ms = step // _MS

        with self._db.unit_of_work(readonly=True) as uow:
            ids: list[str] | None = None
            if labels:
                wanted = dict(labels)
                ids = [
                    id_
                    for id_, have in uow.session.execute(select(DeviceRow.id, DeviceRow.labels))
                    if all(have.get(k) == v for k, v in wanted.items())
                ]
                if not ids:
                    return []
            filters = {
                "device_id": device_id, "class_name": class_name, "model_name": model_name,
                "model_version": model_version,
            }  # fmt: skip
            u = _source(start_ms, end_ms, filters, ids).subquery("u")
            # SQLAlchemy's // is integer (floor) division on both backends; the
            # operands are never negative (at_ms >= start_ms).
            bucket = (
                (u.c.at_ms - literal(start_ms, BigInteger)) // literal(step_ms, BigInteger)
            ).label("bucket")
            value = METRICS[metric](u.c, step.total_seconds()).label("value")
            group = {
                "": None,
                # Samples an agent sends while it serves no model have no
                # name: "@" would say nothing to an operator.
                "model_version": case(
                    (u.c.model_name == "", literal(NO_MODEL)),
                    else_=u.c.model_name + "@" + u.c.model_version,
                ),
                "class": u.c.class_name,
                "device": u.c.device_id,
            }[group_by]
            keys = [] if group is None else [group.label("grp")]
            stmt = (
                select(*keys, bucket, value)
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


def _source(
    start_ms: int, end_ms: int, filters: Mapping[str, str], device_ids: list[str] | None
) -> Any:
    """Raw and rollup rows in [start_ms, end_ms) that pass the filters, with
    the same columns: what METRICS aggregate. A rollup row stands at the
    start of its hour and carries its percentiles' maxima, sample count and
    CPU sum, so each aggregate means the same over either kind of row."""
    t, r = TelemetryRow, TelemetryRollupRow

    def matching(table: Any, at: Any, stmt: Select[Any]) -> Select[Any]:
        stmt = stmt.where(at >= start_ms, at < end_ms)
        for name, wanted in filters.items():
            if wanted:
                stmt = stmt.where(getattr(table, name) == wanted)
        if device_ids is not None:
            stmt = stmt.where(table.device_id.in_(padded(device_ids)))
        return stmt

    shared = (
        "device_id", "class_name", "model_name", "model_version", *_COUNTS, "latency_max_ms",
        "memory_mb", "system_memory_percent", "temperature_c", "battery_percent",
        "model_memory_mb",
    )  # fmt: skip
    raw = select(
        *(getattr(t, name) for name in shared),
        t.at_ms.label("at_ms"),
        literal(1, BigInteger).label("samples"),
        at_most(t.cpu_percent, ROW_GAUGE_CAP).label("cpu_sum"),
        t.latency_p50_ms.label("latency_p50_ms"),
        t.latency_p95_ms.label("latency_p95_ms"),
        t.latency_p99_ms.label("latency_p99_ms"),
    )
    rolled = select(
        *(getattr(r, name) for name in shared),
        r.hour_ms.label("at_ms"),
        r.sample_count.label("samples"),
        (at_most(r.cpu_percent, ROW_GAUGE_CAP) * r.sample_count).label("cpu_sum"),
        r.max_latency_p50_ms.label("latency_p50_ms"),
        r.max_latency_p95_ms.label("latency_p95_ms"),
        r.max_latency_p99_ms.label("latency_p99_ms"),
    )
    return union_all(matching(t, t.at_ms, raw), matching(r, r.hour_ms, rolled))
