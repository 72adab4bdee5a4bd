"""Two findings against the device-facing API, the parts that need no server:
every number of a telemetry sample has a range (api/limits.py RANGES) that
no summed value can overflow, a number out of its range is refused naming
the field and the range, and status reports pass through two buckets per
device (services/ratelimit.py StatusRateLimit), which the agent's own
StatusReporter never waits for. Real `edgefleet server` processes attacked
by real gRPC clients: tests/e2e/test_sec_device_flood.py."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from edgefleet.agent.update.machine import UpdateMachine
from edgefleet.agent.update.remote import StatusReporter
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import UpdateRecord
from edgefleet.controlplane.api import limits
from edgefleet.controlplane.errors import InvalidArgument, ResourceExhausted
from edgefleet.controlplane.services import telemetry as telemetry_service
from edgefleet.controlplane.services.ratelimit import (
    STATUS_BURST,
    STATUS_RATE_PER_S,
    STATUS_WRITE_BURST,
    STATUS_WRITE_RATE_PER_S,
    StatusRateLimit,
)
from edgefleet.controlplane.services.telemetry import Sample
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from testkit.clock import FakeClock
from testkit.sample_ranges import INT64_MAX, OUT_OF_RANGE, UINT64_MAX

_NUMERIC = {
    FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip


def test_every_number_of_a_sample_has_a_range_and_every_range_names_a_field() -> None:
    numbers = [f.name for f in d.TelemetrySample.DESCRIPTOR.fields if f.type in _NUMERIC]
    assert len(numbers) == 21
    missing = [n for n in numbers if f"TelemetrySample.{n}" not in limits.RANGES]
    assert missing == []
    assert limits.unknown_keys() == []
    # The service's Sample carries every one of them under the same name.
    assert set(numbers) <= set(Sample._fields)


def test_no_sample_within_the_ranges_can_overflow_what_the_sql_sums() -> None:
    """The counts keep a device's lifetime sum and an hourly rollup row far
    inside int64, and the caps the SQL clamps stored rows to are above every
    range: nothing a device may send now is clamped."""
    count = limits.RANGES["TelemetrySample.request_count"]
    for name in (
        "error_count", "timeout_count", "dropped_samples", "shadow_requests",
        "fallback_request_count",
    ):  # fmt: skip
        assert limits.RANGES[f"TelemetrySample.{name}"] == count
    assert count.high == 10**9
    # One device at the default telemetry rate (5 samples/s), every sample
    # at the maximum, for fifty years.
    assert count.high * 5 * 3600 * 24 * 366 * 50 < INT64_MAX
    assert count.high <= telemetry_service.ROW_COUNT_CAP
    for key, number in limits.RANGES.items():
        # shadow_max_diff is never summed nor averaged.
        if isinstance(number.high, float) and key != "TelemetrySample.shadow_max_diff":
            assert number.high <= telemetry_service.ROW_GAUGE_CAP, key
    # 9 million capped rows in one hour of one device still fit a rollup row.
    assert 9_000_000 * telemetry_service.ROW_COUNT_CAP < INT64_MAX


def _row(**fields: Any) -> Sample:
    base: dict[str, Any] = {
        "seq": 1, "at_ms": 0, "model_name": "m", "model_version": "1", "request_count": 10,
        "error_count": 2, "timeout_count": 1, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0,
        "latency_p99_ms": 3.0, "latency_max_ms": 4.0, "memory_mb": 100.0, "cpu_percent": 50.0,
        "system_memory_percent": 40.0, "temperature_c": 45.0, "battery_percent": 80.0,
    }  # fmt: skip
    return Sample(**(base | fields))


@pytest.mark.parametrize(
    ("field", "value", "says"), OUT_OF_RANGE, ids=[f"{f}={v!r}" for f, v, _ in OUT_OF_RANGE]
)
def test_a_number_out_of_its_range_is_refused_naming_the_field_and_the_range(
    field: str, value: Any, says: str
) -> None:
    rows = [_row(seq=i + 1) for i in range(300)]
    rows[217] = rows[217]._replace(**{field: value})
    with pytest.raises(InvalidArgument) as refused:
        limits.check_rows(rows, "TelemetrySample", "samples")
    message = refused.value.message
    assert message.startswith(f"samples[217].{field} is {value!r}; it must be "), message
    assert says in message, message


def test_the_extremes_of_every_range_and_what_the_agent_sends_pass() -> None:
    highs = {
        key.removeprefix("TelemetrySample."): number.high
        for key, number in limits.RANGES.items()
        if key.startswith("TelemetrySample.")
    }
    lows = {
        key.removeprefix("TelemetrySample."): number.low
        for key, number in limits.RANGES.items()
        if key.startswith("TelemetrySample.")
    }
    rows = [_row(**highs), _row(**lows), _row(temperature_c=None, battery_percent=None), _row()]
    # The agent's stand-in for outputs it cannot compare: the largest float,
    # twice (their sum overflows: the column is then checked value by value).
    rows.append(_row(shadow_max_diff=sys.float_info.max))
    limits.check_rows(rows, "TelemetrySample", "samples")
    assert limits.RANGES["TelemetrySample.shadow_max_diff"].high == sys.float_info.max


def test_status_numbers_no_column_holds_are_refused_by_the_message_check() -> None:
    report = d.AgentMessage(status=d.StatusReport(applied_revision=UINT64_MAX))
    with pytest.raises(InvalidArgument, match=r"^status\.applied_revision is 18446744073709551615"):
        limits.check(report)
    hello = d.AgentMessage(hello=d.Hello(update=c.UpdateStatus(bytes_total=2**63)))
    with pytest.raises(
        InvalidArgument, match=r"^hello\.update\.bytes_total is 9223372036854775808"
    ):
        limits.check(hello)
    limits.check(d.AgentMessage(status=d.StatusReport(applied_revision=INT64_MAX)))


def test_the_status_buckets_receive_and_write_at_their_rates_per_device() -> None:
    clock = FakeClock()
    limit = StatusRateLimit(rate_per_s=10.0, burst=20, write_rate_per_s=2.0, write_burst=5,
                            clock=clock)  # fmt: skip
    for _ in range(20):
        limit.receive("flood")
    with pytest.raises(ResourceExhausted) as refused:
        limit.receive("flood")
    assert refused.value.retry_after_s == pytest.approx(0.1)
    message = refused.value.message
    assert "device flood" in message and "more than 20 status reports" in message
    assert "10 a second" in message and "reconnect in 0.1 s" in message
    limit.receive("other")  # its own bucket
    assert [limit.write("flood") for _ in range(5)] == [0.0] * 5
    assert limit.write("flood") == pytest.approx(0.5)
    clock.now += 0.5
    assert limit.write("flood") == 0.0
    limit.receive("flood")  # refilled 5 in 0.5 s


def test_the_default_buckets_follow_the_agent() -> None:
    """What a real agent sends (agent/update/remote.py, agent/update/
    machine.py) is far under the written rate: a burst of five whole
    updates passes, and the received bucket is ten times that."""
    reporter_interval = StatusReporter.__init__.__kwdefaults__["progress_interval_s"]
    assert reporter_interval == 0.5
    retry_backoff = UpdateMachine.__init__.__kwdefaults__["backoff_base"]
    # Progress every 0.5 s plus a retried step's reports once a second.
    sustained = 1 / reporter_interval + 1 / retry_backoff
    assert sustained * 1.5 <= STATUS_WRITE_RATE_PER_S
    # One update: a revision report, first and last progress, every state.
    per_update = 1 + 2 + len(State)
    assert 5 * per_update <= STATUS_WRITE_BURST
    assert STATUS_RATE_PER_S == 10 * STATUS_WRITE_RATE_PER_S
    assert STATUS_BURST == 10 * STATUS_WRITE_BURST


def test_a_real_status_reporter_through_an_update_never_waits_for_the_bucket() -> None:
    """The agent's StatusReporter, driven as the update machine drives it:
    a 200 MB download in 1 MB chunks at 10 MB/s, two retries, then verifying,
    validating, activating, committed; then four small updates back to back.
    Every report it publishes is let through the written bucket at once."""
    clock = FakeClock()
    limit = StatusRateLimit(clock=clock)
    published: list[c.UpdateStatus] = []
    waits: list[float] = []

    def publish(status: c.UpdateStatus) -> None:
        limit.receive("dev")
        waits.append(limit.write("dev"))
        published.append(status)

    record = UpdateRecord()
    reporter = StatusReporter(publish, lambda: record, lambda: ("1.0.0", "a" * 64), clock=clock)

    def update(size: int, chunk: int, seconds_per_chunk: float, retries: int) -> None:
        record.state, record.outcome = State.DOWNLOADING, None
        publish(c.UpdateStatus())  # the applied-revision report of its desired state
        for attempt in range(retries + 1):
            for done in range(0, size + 1, chunk):
                reporter.report(State.DOWNLOADING, done, size, None)
                clock.now += seconds_per_chunk
            if attempt < retries:
                clock.now += 2.0**attempt  # the machine's backoff
        for state in (State.VERIFYING, State.VALIDATING, State.ACTIVATING):
            record.state = state
            reporter.report(state, size, size, None)
        record.state, record.outcome = State.IDLE, "committed"
        reporter.report(State.IDLE, size, size, None)

    update(200 << 20, 1 << 20, 0.1, retries=2)
    for _ in range(4):
        update(1 << 20, 1 << 20, 0.001, retries=0)
    assert len(published) > 60
    assert waits == [0.0] * len(waits)
