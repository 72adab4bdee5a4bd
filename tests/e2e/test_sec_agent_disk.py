"""Issue 18, finding 8: the agent on a full disk.

Before: with its state directory full the agent exited ("cannot write ...
desired.json"), was restarted, exited again, and its inference socket was
gone. Now a full disk never takes inference down: the agent keeps what it
learned in memory, keeps serving the active model, writes its state files
again with capped backoff (logged once per condition), reports "disk full"
to the control plane, and carries on without a restart once space frees.

The disks here are real: a small tmpfs per test (`mount -t tmpfs`, so the
tests need root; they skip with the mount's error elsewhere), filled to the
last byte by a file beside the agent's state. These tests run a real
`edgefleet server` and a real `edgefleet-agent` process; the agent's own
classes on the same kind of disk: tests/integration/test_sec_agent_disk.py.
The control plane's database plays no part in this finding (the full disk
is the device's), so it runs on the default SQLite only."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess, wait_for
from testkit.builds import publish_digits_versions
from testkit.deployments import served, settled
from testkit.fault_scenarios import small_disk, tmpfs_unavailable
from testkit.full_disk import MIB, fill_to_the_last_byte, small_tmpfs, temp_files
from testkit.harness import ControlPlane

pytestmark = pytest.mark.timeout(420)
MODEL = "digits"
CLASS = "cpu"
VERSIONS = ("1.0.0", "2.0.0")


# ---------------------------------------------------------------- the disk


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 4 MiB tmpfs (skips where mounting is not permitted)."""
    with small_tmpfs(tmp_path) as where:
        yield where


# ---------------------------------------------------------------- end to end


@dataclass
class Fleet:
    cp: ControlPlane
    op: Any
    token: str
    digests: dict[str, str]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A control plane with two signed versions of the digits model for one
    class (builds answered by hand: this is about what comes after)."""
    root = tmp_path_factory.mktemp("disk")
    cp = ControlPlane(root / "cp")
    cp.start()
    db = Database(make_engine(sqlite_url(cp.data_dir)))
    try:
        op = cp.operator()
        digests = publish_digits_versions(op, db, root, VERSIONS, blob_dir=cp.data_dir / "blobs")
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="disk")).secret
        yield Fleet(cp, op, token, digests)
    finally:
        db.dispose()
        cp.close()


def _device(fleet: Fleet, device_id: str) -> c.Device:
    return fleet.op.GetDevice(o.GetDeviceRequest(id=device_id))  # type: ignore[no-any-return]


def _assign(fleet: Fleet, device_id: str, version: str) -> int:
    (done,) = fleet.op.AssignModel(
        o.AssignModelRequest(device_ids=[device_id], model_name=MODEL, model_version=version)
    ).assignments
    return int(done.sequence)


def _requests_stored(fleet: Fleet, since: dt.datetime) -> float:
    """Requests the control plane holds in telemetry for the fleet's devices."""
    start, end, step = Timestamp(), Timestamp(), Duration()
    start.FromDatetime(since - dt.timedelta(minutes=1))
    end.FromDatetime(since + dt.timedelta(minutes=9))
    step.FromTimedelta(dt.timedelta(minutes=10))
    series = fleet.op.QueryTelemetry(o.QueryTelemetryRequest(
        metric=o.TELEMETRY_METRIC_REQUEST_COUNT, group_by=o.TELEMETRY_GROUP_BY_DEVICE,
        start=start, end=end, step=step,
    )).series  # fmt: skip
    return float(sum(p.value for s in series for p in s.points))


def _disk_full_gauge(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("edgefleet_agent_state_disk_full ")]
    return float(line.split()[1])


def test_a_full_state_disk_keeps_serving_and_the_update_waits(fleet: Fleet, tmp_path: Path) -> None:
    reason = tmpfs_unavailable(tmp_path / "probe")
    if reason:
        pytest.skip(reason)
    with socket.socket() as probe:  # a free loopback port for /metrics
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    started = dt.datetime.now(dt.UTC)
    agent = AgentProcess(
        tmp_path / "agent", fleet.cp.address, fleet.token, labels={"tier": CLASS},
        telemetry_interval_s=1, metrics_listen=f"127.0.0.1:{metrics_port}",
    )  # fmt: skip
    state = agent.state_dir
    filler = state / "filler"
    v1, v2 = ("1.0.0", fleet.digests["1.0.0"]), ("2.0.0", fleet.digests["2.0.0"])
    # Room for the agent's state, one artifact and the download's 8 MiB margin.
    with small_disk(state, 24 * MIB):
        try:
            agent.start()
            device_id = str(agent.wait_for(agent.identity)["device_id"])
            agent.wait_for(lambda: _device(fleet, device_id).class_name == CLASS)
            first = settled(fleet.op, device_id, _assign(fleet, device_id, "1.0.0"))
            assert of_status(first) == "committed", first
            assert served(agent) == v1
            pid = agent.proc.pid if agent.proc else 0

            # Everything the agent made so far has reached the control plane.
            def settled_count() -> float | None:
                before = _requests_stored(fleet, started)
                time.sleep(2.5)
                return before if before and _requests_stored(fleet, started) == before else None

            stored = wait_for(settled_count, timeout=60)

            # The attack: nothing more fits on the device's disk.
            fill_to_the_last_byte(filler)
            sequence = _assign(fleet, device_id, "2.0.0")

            # The operator sees why the update does not go ahead.
            def waiting() -> c.UpdateStatus | None:
                update = _device(fleet, device_id).update
                if update.sequence == sequence and "disk full" in update.reason:
                    return update
                return None

            status = agent.wait_for(waiting, 60)
            assert of_status(status) == "idle", status
            assert (status.active_model_version, status.active_artifact_digest) == v1
            assert "update.json" in status.reason or "desired.json" in status.reason
            agent.wait_for(lambda: _device(fleet, device_id).hardware.disk_free_mb == 0, 30)
            agent.wait_for(lambda: _disk_full_gauge(metrics_port) == 1, 30)

            # It keeps serving the active model (same process, same socket)
            # and its telemetry keeps flowing, for well past the first
            # retries, while the disk stays full.
            predictions = 0
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                assert served(agent) == v1
                predictions += 1
                time.sleep(0.5)
            assert agent.running and agent.proc is not None and agent.proc.pid == pid
            agent.wait_for(lambda: _requests_stored(fleet, started) >= stored + predictions, 60)
            assert _device(fleet, device_id).update.sequence == sequence
            assert shutil.disk_usage(state).free == 0

            # Nothing half-written: no temp file, no artifact of 2.0.0, the
            # records whole and still naming what was there before.
            assert temp_files(state) == []
            downloads = sorted(p.name for p in (state / "downloads").iterdir())
            assert downloads == [v1[1]]
            active = json.loads((state / "models" / MODEL / "active.json").read_text())
            assert active["active"]["digest"] == v1[1]
            desired = agent.desired()
            assert desired is not None and "2.0.0" not in json.dumps(desired)
            # Logged once per condition, not once per retry.
            log = agent.log()
            assert log.count("writes desired.json again when there is room") == 1, log
            assert log.count("writes the update's state again when there is room") == 1, log

            # Room again: the pending writes land and the update goes ahead,
            # without a restart.
            filler.unlink()
            done = settled(fleet.op, device_id, sequence, timeout=120)
            assert of_status(done) == "committed", done
            assert served(agent) == v2
            assert agent.running and agent.proc is not None and agent.proc.pid == pid
            revision = _device(fleet, device_id).desired_revision
            agent.wait_for(lambda: (agent.desired() or {}).get("revision") == revision, 60)
            agent.wait_for(lambda: _device(fleet, device_id).update.reason == "", 60)
            agent.wait_for(lambda: _device(fleet, device_id).hardware.disk_free_mb > 0, 30)
            agent.wait_for(lambda: _disk_full_gauge(metrics_port) == 0, 30)
            log = agent.log()
            assert "the state directory takes writes again" in log
            assert log.count("inference API on") == 1, log  # never started again
        finally:
            # Before the unmount: a running agent keeps the tmpfs busy.
            agent.close()


def test_an_agent_started_on_a_full_disk_serves_and_catches_up(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The restart loop of the finding, from the other side: an agent that
    stops (SIGTERM) and starts again while its disk is full comes up,
    serves its active model and, once there is room, installs what was
    assigned meanwhile."""
    reason = tmpfs_unavailable(tmp_path / "probe")
    if reason:
        pytest.skip(reason)
    agent = AgentProcess(
        tmp_path / "agent", fleet.cp.address, fleet.token, labels={"tier": CLASS},
        telemetry_interval_s=1,
    )  # fmt: skip
    state = agent.state_dir
    filler = state / "filler"
    with small_disk(state, 24 * MIB):
        try:
            agent.start()
            device_id = str(agent.wait_for(agent.identity)["device_id"])
            agent.wait_for(lambda: _device(fleet, device_id).class_name == CLASS)
            first = settled(fleet.op, device_id, _assign(fleet, device_id, "1.0.0"))
            assert of_status(first) == "committed", first
            fill_to_the_last_byte(filler)
            assert agent.stop() == 0
            sequence = _assign(fleet, device_id, "2.0.0")  # while it is down

            agent.start()
            agent.wait_for(lambda: served(agent) == ("1.0.0", fleet.digests["1.0.0"]), 60)

            def waiting() -> bool:
                update = _device(fleet, device_id).update
                return update.sequence == sequence and "disk full" in update.reason

            agent.wait_for(waiting, 60)
            time.sleep(5)  # several retries later it still runs and serves
            assert agent.running
            assert served(agent) == ("1.0.0", fleet.digests["1.0.0"])
            assert temp_files(state) == []

            filler.unlink()
            assert of_status(settled(fleet.op, device_id, sequence, timeout=120)) == "committed"
            assert served(agent) == ("2.0.0", fleet.digests["2.0.0"])
            assert agent.log().count("inference API on") == 2  # the one restart we made
        finally:
            agent.close()
