"""Agent telemetry: histogram percentiles, the resource probe, the samples'
wire form and the bounded on-disk buffer (SQLite, this process). Against a
real control plane: tests/integration/test_agent_telemetry_upload.py."""

from __future__ import annotations

import datetime as dt
import math
import os
import random
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

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
    to_proto,
)

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
