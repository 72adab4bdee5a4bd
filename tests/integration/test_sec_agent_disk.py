"""Issue 18, finding 8: the agent on a full disk, its own classes in this
process. A full disk makes an update wait, not fail, and it resumes; a
disk that fills mid-update holds the state and finishes; a settled update
is saved before the next; a state file a step cannot write makes it wait
and run again; a desired state that cannot be written is kept and lands
later; a read-only or over-quota disk is waited out like a full one; and
the telemetry buffer never fails on a full disk.

The disks are real: a small tmpfs per test (`mount -t tmpfs`, so the tests
need root; they skip with the mount's error elsewhere), filled to the last
byte by a file beside the agent's state. A real `edgefleet server` and
`edgefleet-agent` on such a disk: tests/e2e/test_sec_agent_disk.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.disk import DiskCondition, RetriedWrite, write_error
from edgefleet.agent.errors import DiskFull, StateError
from edgefleet.agent.identity import load_desired, save_desired
from edgefleet.agent.telemetry import IntervalSample
from edgefleet.agent.telemetry_buffer import TelemetryBuffer
from edgefleet.agent.update.download import artifact_path, part_path
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import UPDATE_FILE
from edgefleet.v1 import device_pb2 as d
from testkit.full_disk import fill_to_the_last_byte, small_tmpfs, temp_files
from testkit.update_rig import DATA, HAPPY, Rig, make_assignment

pytestmark = pytest.mark.timeout(420)
MODEL = "digits"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 4 MiB tmpfs (skips where mounting is not permitted)."""
    with small_tmpfs(tmp_path) as where:
        yield where


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
