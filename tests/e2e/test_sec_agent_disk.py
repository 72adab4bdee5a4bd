"""Issue 18, finding 8: the agent on a full disk.

Before: with its state directory full the agent exited ("cannot write ...
desired.json"), was restarted, exited again, and its inference socket was
gone. Now a full disk never takes inference down: the agent keeps what it
learned in memory, keeps serving the active model, writes its state files
again with capped backoff (logged once per condition), reports "disk full"
to the control plane, and carries on without a restart once space frees.

The disks here are real: a small tmpfs per test (`mount -t tmpfs`, so the
tests need root; they skip with the mount's error elsewhere), filled to the
last byte by a file beside the agent's state. The end-to-end test runs a
real `edgefleet server` and a real `edgefleet-agent` process; the others run
the agent's own classes on the same kind of disk. The control plane's
database plays no part in this finding (the full disk is the device's), so
it runs on the default SQLite only."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import os
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

from edgefleet.agent.disk import DiskCondition, RetriedWrite, write_error
from edgefleet.agent.errors import DiskFull, StateError
from edgefleet.agent.identity import load_desired, save_desired
from edgefleet.agent.telemetry import IntervalSample
from edgefleet.agent.telemetry_buffer import TelemetryBuffer
from edgefleet.agent.update.download import artifact_path, part_path
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import UPDATE_FILE
from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess, wait_for
from testkit.fault_scenarios import small_disk, tmpfs_unavailable
from testkit.harness import ControlPlane
from tests.e2e.test_deployments_e2e import _served, _settled
from tests.e2e.test_signed_updates_e2e import publish_digits_versions
from tests.unit.test_update_machine import DATA, HAPPY, Rig, make_assignment

pytestmark = pytest.mark.timeout(420)

MODEL = "digits"
CLASS = "cpu"
VERSIONS = ("1.0.0", "2.0.0")
MIB = 1024 * 1024


# ---------------------------------------------------------------- the disk


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 4 MiB tmpfs (skips where mounting is not permitted)."""
    reason = tmpfs_unavailable(tmp_path / "probe")
    if reason:
        pytest.skip(reason)
    with small_disk(tmp_path / "disk", 4 * MIB) as where:
        yield where


def fill_to_the_last_byte(filler: Path) -> None:
    """Write `filler` until the file system refuses even one more byte."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (MIB, 4096, 1):
            data = b"\0" * block
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, data)
        with pytest.raises(OSError) as refused:
            os.write(fd, b"\0")
        assert refused.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert shutil.disk_usage(filler.parent).free == 0


def temp_files(directory: Path) -> list[str]:
    """Leftovers of atomic writes (`.<name>.<random>.tmp`): none, ever."""
    return sorted(p.name for p in directory.rglob("*.tmp"))


# ---------------------------------------------------------------- the update machine


def test_a_full_disk_makes_the_update_wait_not_fail_and_it_resumes(disk: Path) -> None:
    """The update record (update.json) cannot be written: the machine waits
    with capped backoff, reports "disk full" once, counts no attempt (its
    limit is 2 here, it waits 7 times), runs no handler, and installs once
    there is room. The device keeps its old model throughout."""
    rig = Rig(disk, max_attempts=2)
    filler = disk / "filler"
    assignment = make_assignment()
    fill_to_the_last_byte(filler)

    rig.machine.assign(assignment)  # accepted in memory; the disk takes nothing
    assert not (rig.state_dir / UPDATE_FILE).exists()
    for _ in range(7):
        assert rig.machine.step() is State.IDLE
    assert rig.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # capped
    ((state, _, total, reason),) = rig.reporter.reports  # once, not per retry
    assert (state, total) == (State.IDLE, len(DATA))
    assert reason is not None and reason.startswith("disk full: cannot write")
    assert "update.json" in reason and "No space left on device" in reason
    assert rig.machine.waiting == reason
    assert rig.downloader.offsets == []  # no work before the record is on disk
    assert rig.activator.current == "old-artifact"
    assert temp_files(rig.state_dir) == []

    filler.unlink()
    record = rig.machine.run_until_settled()
    assert record.outcome == "committed"
    assert rig.reporter.transitions() == HAPPY
    assert rig.activator.current == assignment.artifact_digest
    assert rig.machine.waiting is None
    assert max(record.attempts.values()) == 1


def test_a_disk_that_fills_mid_update_holds_the_state_and_finishes(disk: Path) -> None:
    """The disk fills after the download: Verifying cannot record its
    attempt. The machine stays in Verifying (the record on disk says so
    too), burns no attempt, and finishes once there is room; the artifact
    on disk is the complete one, never a partial file."""
    rig = Rig(disk, max_attempts=2)
    filler = disk / "filler"
    assignment = make_assignment()
    rig.machine.assign(assignment)
    while rig.machine.state is not State.VERIFYING:
        rig.machine.step()
    fill_to_the_last_byte(filler)
    for _ in range(4):
        assert rig.machine.step() is State.VERIFYING
    on_disk = json.loads((rig.state_dir / UPDATE_FILE).read_text())
    assert on_disk["state"] == "verifying"
    assert rig.machine.record.attempts.get("verifying", 0) == 0
    waits = [r for r in rig.reporter.reports if r[3] and r[3].startswith("disk full")]
    assert len(waits) == 1 and waits[0][0] is State.VERIFYING
    assert artifact_path(rig.state_dir, assignment.artifact_digest).read_bytes() == DATA
    assert not part_path(rig.state_dir, assignment.artifact_digest).exists()
    assert rig.activator.current == "old-artifact"

    filler.unlink()
    record = rig.machine.run_until_settled()
    assert record.outcome == "committed" and record.attempts["verifying"] == 1
    assert rig.activator.current == assignment.artifact_digest


def test_an_update_that_settles_on_a_full_disk_is_saved_before_the_next(disk: Path) -> None:
    """The disk fills during the commit, so the settled record (Idle,
    committed) cannot be written: nothing is pending, yet the machine keeps
    trying until it is on disk, and only then says the disk is fine again."""
    rig = Rig(disk)
    filler = disk / "filler"
    commit = rig.activator.commit

    def commit_then_the_disk_fills() -> None:
        commit()
        fill_to_the_last_byte(filler)

    rig.activator.commit = commit_then_the_disk_fills  # type: ignore[method-assign]
    rig.machine.assign(make_assignment())
    while rig.machine.state is not State.COMMITTED:
        rig.machine.step()
    assert rig.machine.step() is State.IDLE  # committed, in memory only
    assert rig.machine.unsaved and not rig.machine.record.pending
    assert json.loads((rig.state_dir / UPDATE_FILE).read_text())["state"] == "committed"
    assert rig.machine.disk.waiting() == ["the update's state"]
    for _ in range(3):
        rig.machine.step()
    assert rig.machine.unsaved

    filler.unlink()
    record = rig.machine.run_until_settled()  # saves it
    assert not rig.machine.unsaved and rig.machine.disk.waiting() == []
    on_disk = json.loads((rig.state_dir / UPDATE_FILE).read_text())
    assert (on_disk["state"], on_disk["outcome"]) == ("idle", "committed") == (
        record.state.value, record.outcome,
    )  # fmt: skip


def test_a_state_file_a_step_cannot_write_makes_it_wait_then_run_again(disk: Path) -> None:
    """A port whose own state file cannot be written (active.json, trust.json:
    DiskFull) makes the step wait and run again, uncounted, instead of
    failing or rolling back a good update."""
    rig = Rig(disk, max_attempts=1)
    full = DiskFull(f"disk full: cannot write {rig.state_dir / 'active.json'} (No space left)")
    rig.faults.queued[State.ACTIVATING] = [full, full, full]
    rig.machine.assign(make_assignment())
    record = rig.machine.run_until_settled()
    assert record.outcome == "committed"
    assert rig.reporter.transitions() == HAPPY[1:]
    assert record.attempts["activating"] == 1  # with a limit of 1
    assert rig.sleeps == [1.0, 2.0, 4.0]


# ---------------------------------------------------------------- desired.json


async def test_a_desired_state_that_cannot_be_written_is_kept_and_lands_later(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    filler = disk / "filler"
    condition = DiskCondition()
    writes: RetriedWrite[d.DesiredState] = RetriedWrite(
        "desired.json", lambda desired: save_desired(disk, desired), condition,
        initial_s=0.01, max_s=0.05,
    )  # fmt: skip
    assert writes.submit(d.DesiredState(revision=1, class_name="a"))
    fill_to_the_last_byte(filler)
    caplog.set_level(logging.INFO, logger="edgefleet.agent.disk")
    task = asyncio.create_task(writes.run())
    try:
        assert not writes.submit(d.DesiredState(revision=2, class_name="b"))
        assert not writes.submit(d.DesiredState(revision=3, class_name="c"))  # replaces 2
        await asyncio.sleep(0.5)  # many retries, all refused
        assert writes.pending and condition.waiting() == ["desired.json"]
        assert condition.reason is not None and condition.reason.startswith("disk full")
        stored = load_desired(disk)
        assert stored is not None and stored.revision == 1  # the old file, whole
        assert temp_files(disk) == []
        filler.unlink()
        for _ in range(500):  # lands within a few backoff steps
            if not writes.pending:
                break
            await asyncio.sleep(0.01)
        assert not writes.pending
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    stored = load_desired(disk)
    assert stored is not None and (stored.revision, stored.class_name) == (3, "c")
    assert condition.waiting() == []
    logged = [r.getMessage() for r in caplog.records]
    assert sum("writes desired.json again" in m for m in logged) == 1  # once, not per retry
    assert sum("desired.json written" in m for m in logged) == 1


def test_a_read_only_or_over_quota_disk_is_waited_out_like_a_full_one(disk: Path) -> None:
    """EROFS (a file system remounted read-only after an error) and EDQUOT
    are the same condition to the agent: DiskFull, not a fatal StateError;
    any other write error stays fatal."""
    import subprocess

    save_desired(disk, d.DesiredState(revision=1))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    try:
        with pytest.raises(DiskFull, match=r"^disk not writable \(read-only file system\)"):
            save_desired(disk, d.DesiredState(revision=2))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    stored = load_desired(disk)
    assert stored is not None and stored.revision == 1
    quota = write_error(disk / "x", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert isinstance(quota, DiskFull) and quota.message.startswith("disk full (quota exceeded)")
    denied = write_error(disk / "x", OSError(errno.EACCES, os.strerror(errno.EACCES)))
    assert type(denied) is StateError


# ---------------------------------------------------------------- telemetry buffer


def _sample(requests: int) -> IntervalSample:
    return IntervalSample(at=dt.datetime.now(dt.UTC), model_name=MODEL, request_count=requests)


def test_the_telemetry_buffer_never_fails_on_a_full_disk(disk: Path) -> None:
    """Appends go on in memory (served by pending(), bounded: the oldest are
    dropped and counted), acks and refusals are remembered; once there is
    room one write stores it all with the seqs already handed out."""
    filler = disk / "filler"
    condition = DiskCondition()
    buffer = TelemetryBuffer(disk, max_samples=5, disk=condition)
    try:
        assert buffer.append([_sample(1), _sample(2)]) == [1, 2]
        fill_to_the_last_byte(filler)
        # More than the buffer's bound, on a disk that takes nothing.
        seqs = [seq for n in range(3, 11) for seq in buffer.append([_sample(n)])]
        assert seqs == list(range(3, 11))
        assert condition.waiting() == ["the telemetry buffer"]
        assert condition.reason is not None and "disk full" in condition.reason
        # Held: the newest 5; seqs 3..5 dropped (counted), 1 and 2 stored.
        assert [p.seq for p in buffer.pending(100)] == [1, 2, 6, 7, 8, 9, 10]
        assert (buffer.held, buffer.dropped_total) == (5, 3)
        assert [p.dropped_samples for p in buffer.pending(100)][2] == 0
        assert buffer.ack(6) == 3  # two stored rows and one held sample
        assert [p.seq for p in buffer.pending(100)] == [7, 8, 9, 10]
        buffer.discard(8)  # refused by the control plane: counted, not resent
        assert [p.seq for p in buffer.pending(100)] == [7, 9, 10]
        # Every loss is counted once: carried by a later sample or pending.
        carried = [p.dropped_samples for p in buffer.pending(100)]
        assert carried == [0, 1, 1] and buffer.pending_drops == 2
        assert len(buffer) == 3 and buffer.dropped_total == 4 == sum(carried) + 2
        assert temp_files(disk) == []

        filler.unlink()
        assert buffer.append([_sample(11)]) == [11]  # stores everything held back
        assert condition.waiting() == []
        assert buffer.held == 0
    finally:
        buffer.close()
    reopened = TelemetryBuffer(disk, max_samples=5)
    try:
        # On disk now, as if nothing had happened: the seqs handed out, the
        # drops carried by the next sample, the acked rows gone.
        assert [(p.seq, p.dropped_samples) for p in reopened.pending(100)] == [
            (7, 0), (9, 1), (10, 1), (11, 2),
        ]  # fmt: skip
        assert (reopened.next_seq, reopened.dropped_total) == (12, 4)
    finally:
        reopened.close()


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
        digests = publish_digits_versions(op, db, root, VERSIONS)
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
            assert _settled(fleet, device_id, _assign(fleet, device_id, "1.0.0")).state == (
                "committed"
            )
            assert _served(agent) == v1
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
            assert status.state == "idle", status
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
                assert _served(agent) == v1
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
            active = json.loads((state / "active.json").read_text())
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
            done = _settled(fleet, device_id, sequence, timeout=120)
            assert done.state == "committed", done
            assert _served(agent) == v2
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
            assert _settled(fleet, device_id, _assign(fleet, device_id, "1.0.0")).state == (
                "committed"
            )
            fill_to_the_last_byte(filler)
            assert agent.stop() == 0
            sequence = _assign(fleet, device_id, "2.0.0")  # while it is down

            agent.start()
            agent.wait_for(lambda: _served(agent) == ("1.0.0", fleet.digests["1.0.0"]), 60)

            def waiting() -> bool:
                update = _device(fleet, device_id).update
                return update.sequence == sequence and "disk full" in update.reason

            agent.wait_for(waiting, 60)
            time.sleep(5)  # several retries later it still runs and serves
            assert agent.running
            assert _served(agent) == ("1.0.0", fleet.digests["1.0.0"])
            assert temp_files(state) == []

            filler.unlink()
            assert _settled(fleet, device_id, sequence, timeout=120).state == "committed"
            assert _served(agent) == ("2.0.0", fleet.digests["2.0.0"])
            assert agent.log().count("inference API on") == 2  # the one restart we made
        finally:
            agent.close()
