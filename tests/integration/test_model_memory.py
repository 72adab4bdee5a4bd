"""The memory a model adds, from the agent to the rollout gates' data
(issue 21, item 5): the agent measures each model it loads as the build
host measures a candidate, reports it per model in every telemetry sample
(model_memory_mb, apart from the agent's whole RSS), and the control plane
stores it, keeps its maximum in the rollups and serves it as the
MODEL_MEMORY_MB metric.

Real parts: ONNX models built with onnx.helper, a real ModelHost over real
ONNX Runtime in this process, the build host's measuring child
(agent.runtimes.measure) as the fresh measure to agree with, the agent's
RequestStats and wire conversion, and a real control plane (SQLite and
PostgreSQL) over a real channel."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from alembic import command
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import inspect, select, text

from edgefleet.agent.daemon import report_served
from edgefleet.agent.runtimes.measure import measure_in_child
from edgefleet.agent.runtimes.memory import LoadMeter, heap_in_use_mib
from edgefleet.agent.serving import ModelHost
from edgefleet.agent.telemetry import RequestStats, ResourceProbe
from edgefleet.agent.telemetry_buffer import Pending
from edgefleet.agent.telemetry_uploader import to_proto
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.db.engine import alembic_config, make_engine, upgrade
from edgefleet.controlplane.db.models import TelemetryRollupRow, TelemetryRow
from edgefleet.controlplane.server import ControlPlane
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.rpc import ADMIN, enroll_accepted

pytestmark = pytest.mark.timeout(120)


def matmul(path: Path, width: int, seed: int) -> Path:
    """x [1, width] -> x W: a width x width float32 weight (4 MB at 1024)."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def fresh_measure(path: Path) -> float:
    """What the build host (and a device's validation) measures the model
    adds: a fresh child process, its runtime already imported."""
    return measure_in_child(
        path, "onnxruntime", {}, threads=1, runs=20, timeout_s=60
    ).added_memory_mb


def agrees(agent_mb: float, fresh_mb: float, path: Path) -> bool:
    """At least the weights the model holds, and at most the fresh figure
    plus a few MB (or a third, for a large model). Not closer: the agent's
    process has run other loads, malloc reuses and fragments what they
    freed, and on a loaded machine the fresh child's figure itself varies by
    several MB (a session's arenas and threads)."""
    weights_mb = path.stat().st_size / 2**20
    return 0.9 * weights_mb <= agent_mb <= fresh_mb + max(5.0, fresh_mb / 3)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "small": matmul(folder / "small.onnx", 1024, 0),  # 4 MB of weights
        "large": matmul(folder / "large.onnx", 1536, 1),  # 9 MB
    }


def test_each_loaded_model_reports_what_a_fresh_measure_says_it_adds(
    models: dict[str, Path],
) -> None:
    host = ModelHost()
    try:
        loaded = {
            name: host.activate(name, "1.0.0", name, path, "onnxruntime")
            for name, path in models.items()
        }
        for name, path in models.items():
            fresh = fresh_measure(path)
            agent = loaded[name].memory_mb
            assert agent > 1.0, (name, agent)
            assert agrees(agent, fresh, models[name]), (name, agent, fresh)
        # The larger weights add more, in the agent as in the child.
        assert loaded["large"].memory_mb > loaded["small"].memory_mb

        # Every telemetry sample of a served model carries its own figure;
        # memory_mb stays the agent's whole RSS, the models' included.
        stats = RequestStats(ResourceProbe())
        report_served(stats, host)
        samples = stats.snapshot_and_reset(dt.datetime.now(dt.UTC))
        by_model = {s.model_name: s for s in samples}
        assert set(by_model) == set(models)
        for name, sample in by_model.items():
            assert sample.model_memory_mb == loaded[name].memory_mb
            assert sample.memory_mb > sum(m.memory_mb for m in loaded.values())
            wire = to_proto(Pending(seq=1, dropped_samples=0, sample=sample))
            assert wire.model_memory_mb == pytest.approx(loaded[name].memory_mb)
    finally:
        host.close()


def test_loads_at_once_take_turns_so_each_figure_is_its_own(models: dict[str, Path]) -> None:
    """Each model's update runs on a thread of its own: two loads at once
    must not count in each other's figure."""
    host = ModelHost()
    barrier = threading.Barrier(2)
    figures: dict[str, float] = {}

    def load(name: str) -> None:
        barrier.wait()
        figures[name] = host.activate(name, "1.0.0", name, models[name], "onnxruntime").memory_mb

    try:
        threads = [threading.Thread(target=load, args=(name,)) for name in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for name, path in models.items():
            fresh = fresh_measure(path)
            assert figures[name] > 1.0 and agrees(figures[name], fresh, path), (figures, fresh)
    finally:
        host.close()


def test_memory_reused_from_an_earlier_load_still_counts() -> None:
    """A load that takes memory an earlier one freed (malloc keeps it, so
    the resident set does not grow) still counts what it holds: the CI run
    that loaded the large model first measured the small one (4 MB of
    weights) at 0.5 MB."""
    if heap_in_use_mib() is None:
        pytest.skip("needs glibc's mallinfo2 (2.33 or later)")
    meter = LoadMeter()
    # An earlier load's transient memory: many small blocks, which malloc
    # keeps on its free lists once they are freed (not mmapped, not all
    # given back by malloc_trim while a live block shares their pages).
    earlier = [bytearray(4000) for _ in range(6000)]  # ~24 MB
    del earlier[::2]  # every other block freed: no page wholly free
    with meter.measure() as reading:
        held = [bytearray(4000) for _ in range(3000)]  # ~12 MB, in the freed blocks
    assert len(held) == 3000
    assert reading.added_mb >= 10.0, reading.added_mb


def test_a_load_that_cannot_wait_its_turn_is_not_measured() -> None:
    """Where one load waits past the meter's patience (a TensorRT engine
    build takes minutes), both it and the load it overlapped report 0."""
    meter = LoadMeter(wait_s=0.05)
    started, release = threading.Event(), threading.Event()
    readings = []

    def long_load() -> None:
        with meter.measure() as reading:
            readings.append(reading)
            started.set()
            release.wait(10)
            _ballast = bytearray(8 * 1024 * 1024)  # 8 MB that would count
            del _ballast

    thread = threading.Thread(target=long_load)
    thread.start()
    assert started.wait(10)
    with meter.measure() as quick:
        pass
    release.set()
    thread.join(10)
    (slow,) = readings
    assert (quick.added_mb, slow.added_mb) == (0.0, 0.0)
    assert quick.why == slow.why == "another model loaded at the same time"
    # Alone again, a load is measured.
    with meter.measure() as alone:
        ballast = bytearray(16 * 1024 * 1024)
        ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    del ballast
    assert alone.why == "" and alone.added_mb >= 15.0


async def test_the_control_plane_stores_it_and_serves_it_as_a_metric(
    cp: ControlPlane, models: dict[str, Path]
) -> None:
    host = ModelHost()
    try:
        for name, path in models.items():
            host.activate(name, "1.0.0", name, path, "onnxruntime")
        stats = RequestStats(ResourceProbe())
        report_served(stats, host)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        samples = stats.snapshot_and_reset(now - dt.timedelta(seconds=10))
    finally:
        host.close()
    expected = {s.model_name: s.model_memory_mb for s in samples}
    wire = [
        to_proto(Pending(seq=i + 1, dropped_samples=0, sample=s)) for i, s in enumerate(samples)
    ]

    async with grpc.aio.insecure_channel(cp.address) as channel:
        enrolled = await enroll_accepted(channel, "hw-model-memory")
        dev, op = dg.DeviceServiceStub(channel), og.OperatorServiceStub(channel)
        resp = await dev.UploadTelemetry(
            d.UploadTelemetryRequest(samples=wire),
            metadata=bearer_metadata(enrolled.device_credential),
        )
        assert resp.acked_seq == len(wire)
        with cp.db.unit_of_work(readonly=True) as uow:
            rows = uow.session.execute(
                select(
                    TelemetryRow.model_name, TelemetryRow.model_memory_mb, TelemetryRow.memory_mb
                )
            ).all()
        assert {name: mb for name, mb, _ in rows} == pytest.approx(expected)
        assert all(rss > mb > 1.0 for _, mb, rss in rows)

        start, end, step = Timestamp(), Timestamp(), Duration()
        start.FromDatetime(now - dt.timedelta(minutes=5))
        end.FromDatetime(now + dt.timedelta(minutes=1))
        step.FromTimedelta(dt.timedelta(minutes=6))
        got = await op.QueryTelemetry(
            o.QueryTelemetryRequest(
                metric=o.TELEMETRY_METRIC_MODEL_MEMORY_MB, start=start, end=end, step=step,
                group_by=o.TELEMETRY_GROUP_BY_MODEL_VERSION,
            ),
            metadata=ADMIN,
        )  # fmt: skip
        served = {s.group: [p.value for p in s.points] for s in got.series}
        assert served == {f"{n}@1.0.0": [pytest.approx(mb)] for n, mb in expected.items()}
        # A figure the agent could not have measured is refused, naming the field.
        bad = d.TelemetrySample()
        bad.CopyFrom(wire[0])
        bad.seq, bad.model_memory_mb = 99, -1.0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await dev.UploadTelemetry(
                d.UploadTelemetryRequest(samples=[bad]),
                metadata=bearer_metadata(enrolled.device_credential),
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model_memory_mb" in (info.value.details() or "")


def test_rows_from_before_0013_read_back_unmeasured_and_the_migration_goes_down(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0012")
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
            " cpu_percent) VALUES ('d', 5, 0, 'digits', '1.0.0', '', 40, 0, 0, 0, 1, 1, 1,"
            " 1, 95, 1)"
        ))  # fmt: skip
    upgrade(engine)
    try:
        with engine.connect() as conn:
            stored = select(TelemetryRow.memory_mb, TelemetryRow.model_memory_mb)
            assert conn.execute(stored).all() == [(95.0, 0.0)]
            assert conn.execute(select(TelemetryRollupRow.model_memory_mb)).all() == []
        config = alembic_config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0012")
        for table in ("telemetry", "telemetry_rollups"):
            assert "model_memory_mb" not in {c["name"] for c in inspect(engine).get_columns(table)}
        upgrade(engine)
    finally:
        engine.dispose()
