"""The agent's update state machine (agent/update), driven through fake ports.

The machine, the store, the download and the manifest verifier are real; the
ports (source of bytes, validator, activator, reporter, sleep) are fakes that
record what happened and raise injected faults (testkit/update_rig.py)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.errors import StateError
from edgefleet.agent.identity import save_trusted_keys
from edgefleet.agent.update.download import ResumableDownload, artifact_path, part_path
from edgefleet.agent.update.machine import RESTARTED_IN_ACTIVATION, UpdateInProgress, UpdateMachine
from edgefleet.agent.update.ports import (
    Chunk,
    FatalUpdateError,
    MirroredDownloader,
    RetryableUpdateError,
)
from edgefleet.agent.update.runner import UpdateRunner
from edgefleet.agent.update.states import TRANSITIONS, EventKind, State
from edgefleet.agent.update.store import Assignment, UpdateRecord, UpdateStore
from edgefleet.agent.update.verify import OTHER_CLASS, ManifestVerifier
from edgefleet.polling import wait_for
from testkit.update_rig import (
    CHUNK,
    CLASS,
    DATA,
    HAPPY,
    IL,
    OLD,
    STRANGER,
    TRUSTED,
    VA,
    A,
    C,
    CountingHasher,
    Crash,
    D,
    F,
    FakeDownloader,
    Free,
    R,
    Rig,
    V,
    fatal,
    make_assignment,
    retry,
    sha,
)

# ---------------------------------------------------------------- the table


def test_table_covers_every_state_and_only_known_events() -> None:
    sources = {state for state, _ in TRANSITIONS}
    assert sources == set(State)
    for state in State:
        if state not in (IL, F):
            assert (state, EventKind.SUCCESS) in TRANSITIONS
            assert (state, EventKind.FATAL) in TRANSITIONS
            assert TRANSITIONS[(state, EventKind.RETRYABLE)] is state
    # After the download, every fatal failure rolls back.
    for state in (V, VA, A, C):
        assert TRANSITIONS[(state, EventKind.FATAL)] is R
    assert TRANSITIONS[(D, EventKind.FATAL)] is F
    assert TRANSITIONS[(R, EventKind.SUCCESS)] is F
    assert TRANSITIONS[(R, EventKind.FATAL)] is F


# ---------------------------------------------------------------- state chains


ROLLED_BACK = [R, F, IL]
CHAINS: list[tuple[str, dict[State, list[BaseException]], list[State], str, str | None, int]] = [
    # id, faults, expected chain, outcome, reason (substring), backoff sleeps
    ("happy", {}, HAPPY, "committed", None, 0),
    (
        "download-fatal",
        {D: [fatal("no such artifact")]},
        [IL, D, F, IL],
        "failed",
        "no such artifact",
        0,
    ),
    ("download-retry", {D: [retry("unavailable")]}, HAPPY, "committed", None, 1),
    ("download-connection-error", {D: [ConnectionError("reset")]}, HAPPY, "committed", None, 1),
    (
        "verify-fatal",
        {V: [fatal("bad signature")]},
        [IL, D, V, *ROLLED_BACK],
        "failed",
        "bad signature",
        0,
    ),
    ("verify-retry", {V: [retry("busy")]}, HAPPY, "committed", None, 1),
    (
        "validate-fatal",
        {VA: [fatal("golden outputs differ")]},
        [IL, D, V, VA, *ROLLED_BACK],
        "failed",
        "golden outputs differ",
        0,
    ),
    (
        "validate-unexpected",
        {VA: [ValueError("boom")]},
        [IL, D, V, VA, *ROLLED_BACK],
        "failed",
        "ValueError: boom",
        0,
    ),
    ("validate-retry-twice", {VA: [retry("busy"), retry("busy")]}, HAPPY, "committed", None, 2),
    (
        "validate-retry-exhausted",
        {VA: [retry("busy")] * 3},
        [IL, D, V, VA, *ROLLED_BACK],
        "failed",
        "busy (gave up after 3 attempts)",
        2,
    ),
    (
        "activate-fatal",
        {A: [fatal("warm-up failed")]},
        [IL, D, V, VA, A, *ROLLED_BACK],
        "failed",
        "warm-up failed",
        0,
    ),
    ("activate-retry", {A: [retry("busy")]}, HAPPY, "committed", None, 1),
    (
        "commit-fatal",
        {C: [fatal("cannot drop standby")]},
        [IL, D, V, VA, A, C, *ROLLED_BACK],
        "failed",
        "cannot drop standby",
        0,
    ),
    ("commit-retry", {C: [retry("busy")]}, HAPPY, "committed", None, 1),
    (
        "rollback-retry",
        {VA: [fatal("too slow")], R: [retry("busy")]},
        [IL, D, V, VA, *ROLLED_BACK],
        "failed",
        "too slow",
        1,
    ),
]


@pytest.mark.parametrize(
    ("faults", "chain", "outcome", "reason", "sleeps"),
    [case[1:] for case in CHAINS],
    ids=[case[0] for case in CHAINS],
)
def test_state_chain(
    tmp_path: Path,
    faults: dict[State, list[BaseException]],
    chain: list[State],
    outcome: str,
    reason: str | None,
    sleeps: int,
) -> None:
    rig = Rig(tmp_path)
    rig.faults.queued = {state: list(errors) for state, errors in faults.items()}
    assignment = make_assignment()
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()

    assert record.history == [s.value for s in chain]
    assert rig.reporter.transitions() == chain[1:]
    assert record.outcome == outcome
    if reason is None:
        assert record.reason is None
    else:
        assert record.reason is not None and reason in record.reason
        assert rig.reporter.reports[-2] == (F, record.bytes_downloaded, len(DATA), record.reason)
    assert len(rig.sleeps) == sleeps
    rig.assert_consistent(record, assignment)
    # The record on disk says the same.
    assert UpdateStore(rig.state_dir).load() == record


def test_rollback_that_fails_is_reported_and_keeps_the_file(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.faults.queued = {A: [fatal("warm-up failed")], R: [fatal("old model gone")]}
    assignment = make_assignment()
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in [IL, D, V, VA, A, R, F, IL]]
    assert record.reason == "warm-up failed; rollback failed: old model gone"
    # The new artifact may still serve, so its file stays.
    assert rig.activator.current == assignment.artifact_digest
    assert artifact_path(rig.state_dir, assignment.artifact_digest).exists()


def test_backoff_doubles_and_is_capped(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_attempts=10)
    rig.machine.backoff_cap = 5.0
    rig.faults.queued = {VA: [retry("busy")] * 5}
    rig.machine.assign(make_assignment())
    assert rig.machine.run_until_settled().outcome == "committed"
    assert rig.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_loop_guard_turns_endless_retries_into_failure(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_attempts=100, max_loops=6)
    rig.faults.forever = {D: retry("unavailable")}
    assignment = make_assignment()
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in [IL, D, F, IL]]
    assert record.reason == "loop guard: 6 steps without settling"
    assert len(rig.sleeps) == 6
    rig.assert_consistent(record, assignment)


def test_assign_while_running_is_refused_and_abort_fails_before_activation(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    rig.machine.assign(make_assignment())
    assert rig.machine.step() is D
    with pytest.raises(UpdateInProgress):
        rig.machine.assign(make_assignment())
    rig.machine.abort("superseded by version 3")
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in [IL, D, F, IL]]
    assert record.reason == "aborted: superseded by version 3"
    assert rig.activator.current == OLD
    assert rig.downloader.offsets == []


class InterruptingDownloader(FakeDownloader):
    """Serves the bytes; after `after` chunks it interrupts the machine
    (as the runner's submit does from the daemon's thread)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.machine: UpdateMachine | None = None

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        for served, chunk in enumerate(super().fetch(digest, offset), start=1):
            if served == self.after and self.machine is not None:
                self.machine.interrupt()
            yield chunk


def test_an_interrupt_stops_the_download_keeps_its_bytes_and_is_no_attempt(
    tmp_path: Path,
) -> None:
    """A newer assignment must not wait for a slow source to finish: the
    download stops at its next bytes, the step counts no attempt and keeps
    where it got, and the abort that follows ends the update before any
    activation."""
    downloader = InterruptingDownloader(after=2)
    rig = Rig(tmp_path, downloader=downloader)
    downloader.machine = rig.machine
    rig.machine.assign(make_assignment())
    assert rig.machine.step() is D
    assert rig.machine.step() is D  # interrupted, not failed
    record = rig.machine.record
    assert record.attempts.get(D.value, 0) == 0 and record.reason is None
    assert 0 < record.bytes_downloaded < len(DATA)
    assert part_path(rig.state_dir, sha(DATA)).stat().st_size == record.bytes_downloaded
    rig.machine.abort("superseded by assignment 8")
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in [IL, D, F, IL]]
    assert record.reason == "aborted: superseded by assignment 8"
    assert rig.activator.current == OLD
    # The next update starts clean: no interrupt left over from this one.
    downloader.machine = None
    rig.machine.assign(make_assignment())
    assert rig.machine.run_until_settled().outcome == "committed"


class TricklingDownloader(FakeDownloader):
    """Its first download sends a chunk every 0.5 s (a 5 s artifact); the
    next ones are quick."""

    def __init__(self) -> None:
        super().__init__()
        self.trickled = 0

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        first = len(self.offsets) == 0
        for chunk in super().fetch(digest, offset):
            if first:
                time.sleep(0.5)
                self.trickled += 1
            yield chunk


def test_a_newer_assignment_does_not_wait_for_a_slow_download(tmp_path: Path) -> None:
    """The runner on its thread, the daemon submitting from another: the
    newer assignment interrupts the download of the one it supersedes."""
    downloader = TricklingDownloader()
    rig = Rig(tmp_path, downloader=downloader)
    runner = UpdateRunner(rig.machine)
    older = dataclasses.replace(make_assignment(), sequence=7)
    runner.start()
    try:
        runner.submit(older)
        wait_for(lambda: downloader.trickled >= 2, 10, what="the slow download")
        started = time.monotonic()
        runner.submit(dataclasses.replace(older, sequence=8))

        def committed() -> bool:
            record = rig.machine.record
            return bool(record.assignment and record.assignment.sequence == 8 and record.outcome)

        wait_for(committed, 10, what="the newer assignment committed")
        assert time.monotonic() - started < 2.5  # the trickle had ~4 s to go
        assert downloader.trickled <= 4
        assert rig.machine.record.outcome == "committed"
    finally:
        runner.stop()


# ---------------------------------------------------------------- restarts


RESTART_POINTS = [(state, when) for state in (D, V, VA, A, C) for when in ("entered", "during")]


@pytest.mark.parametrize(
    ("state", "when"), RESTART_POINTS, ids=[f"{s}-{w}" for s, w in RESTART_POINTS]
)
def test_restart_in_each_state_ends_consistent(tmp_path: Path, state: State, when: str) -> None:
    rig = Rig(tmp_path)
    if when == "entered":
        rig.reporter.crash_on_enter.add(state)
    else:
        rig.faults.queued = {state: [Crash(f"killed during {state}")]}
    assignment = make_assignment()
    rig.machine.assign(assignment)
    with pytest.raises(Crash):
        rig.machine.run_until_settled()
    assert UpdateStore(rig.state_dir).load().state is state

    record = rig.restart().run_until_settled()
    rig.assert_consistent(record, assignment)
    if state is A:
        # The documented rule: a restart in Activating rolls back.
        assert record.outcome == "failed"
        assert record.reason == RESTARTED_IN_ACTIVATION
        assert record.history[-4:] == [A.value, R.value, F.value, IL.value]
    else:
        assert record.outcome == "committed"
        assert record.history == [s.value for s in HAPPY]


@pytest.mark.parametrize("state", [R, F])
def test_restart_while_failing_still_ends_on_the_old_model(tmp_path: Path, state: State) -> None:
    rig = Rig(tmp_path)
    rig.faults.queued = {VA: [fatal("too slow")]}
    rig.reporter.crash_on_enter.add(state)
    assignment = make_assignment()
    rig.machine.assign(assignment)
    with pytest.raises(Crash):
        rig.machine.run_until_settled()
    record = rig.restart().run_until_settled()
    assert record.reason == "too slow"
    rig.assert_consistent(record, assignment)


def test_crash_loop_in_one_state_ends_in_failure(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_attempts=3)
    rig.faults.forever = {VA: Crash("killed during validation")}
    assignment = make_assignment()
    rig.machine.assign(assignment)
    record = rig.settle_through_crashes()
    assert record.outcome == "failed"
    assert record.reason == "validating did not complete in 3 attempts"
    assert record.attempts[VA.value] == 4
    rig.assert_consistent(record, assignment)


def test_a_download_cut_more_often_than_max_attempts_finishes_while_it_progresses(
    tmp_path: Path,
) -> None:
    # Five cuts, each further on, against three attempts: a flaky link.
    downloader = FakeDownloader(cuts=[1000, 2000, 3000, 4000, 5000])
    rig = Rig(tmp_path, downloader=downloader, max_attempts=3)
    assignment = make_assignment()
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.outcome == "committed", record.reason
    assert downloader.offsets == [0, 1000, 2000, 3000, 4000, 5000]
    assert downloader.bytes_served == len(DATA)
    # Each retry after progress backs off as a first one.
    assert rig.sleeps == [1.0] * 5
    rig.assert_consistent(record, assignment)


def test_restart_during_download_resumes_from_the_bytes_on_disk(tmp_path: Path) -> None:
    downloader = FakeDownloader(cuts=[3500])
    rig = Rig(tmp_path, downloader=downloader)
    # Kill the agent the moment the first fetch is cut: the retry never runs.
    rig.crash_on_sleep = True
    assignment = make_assignment()
    rig.machine.assign(assignment)
    with pytest.raises(Crash):
        rig.machine.run_until_settled()
    assert part_path(rig.state_dir, assignment.artifact_digest).stat().st_size == 3500
    record = rig.restart().run_until_settled()
    assert record.outcome == "committed"
    assert downloader.offsets == [0, 3500]
    assert downloader.bytes_served == len(DATA)  # nothing fetched twice
    # The prefix was hashed once more after the restart, from disk; no more.
    assert rig.hashed[0] == len(DATA) + 3500
    rig.assert_consistent(record, assignment)


# ---------------------------------------------------------------- downloads


def _download(tmp_path: Path, **kwargs: Any) -> tuple[ResumableDownload, list[int]]:
    counter = [0]
    free = kwargs.get("free", 10**12)
    download = ResumableDownload(
        tmp_path,
        sha(DATA),
        len(DATA),
        hash_factory=lambda: CountingHasher(counter),
        disk_usage=lambda _p: Free(free),
        margin=100,
    )
    return download, counter


@pytest.mark.parametrize("cuts", [[1], [1000, 5000, 5001, 9999], [CHUNK * 3], [10239]], ids=str)
def test_download_resumes_and_hashes_every_byte_once(tmp_path: Path, cuts: list[int]) -> None:
    downloader = FakeDownloader(cuts=list(cuts))
    download, hashed = _download(tmp_path)
    for _ in cuts:
        with pytest.raises(RetryableUpdateError, match="download interrupted"):
            download.run(downloader)
    path = download.run(downloader)
    assert path.read_bytes() == DATA
    assert downloader.offsets == [0, *cuts]
    assert downloader.bytes_served == len(DATA)
    assert hashed[0] == len(DATA)
    assert not part_path(tmp_path, sha(DATA)).exists()


def test_download_refuses_a_chunk_at_the_wrong_offset(tmp_path: Path) -> None:
    download, _ = _download(tmp_path)
    with pytest.raises(RetryableUpdateError, match="chunk at offset 1 refused: expected offset 0"):
        download.run(FakeDownloader(bad_offset=True))
    assert download.run(FakeDownloader()).read_bytes() == DATA


def test_download_restarts_from_zero_when_the_source_ignores_the_offset(tmp_path: Path) -> None:
    download, _ = _download(tmp_path)
    with pytest.raises(RetryableUpdateError):
        download.run(FakeDownloader(cuts=[4000]))
    ignoring = FakeDownloader(ignore_offset=True)
    assert download.run(ignoring).read_bytes() == DATA
    assert ignoring.offsets == [4000]
    assert ignoring.bytes_served == len(DATA)


def test_download_checks_free_space_first(tmp_path: Path) -> None:
    download, _ = _download(tmp_path, free=len(DATA))  # no room for the margin
    downloader = FakeDownloader()
    # Retryable: space may free before the machine's attempts run out.
    with pytest.raises(RetryableUpdateError, match="disk full"):
        download.run(downloader)
    assert downloader.offsets == []


def test_a_disk_that_fills_during_the_download_fails_it_and_frees_the_partial_file(
    tmp_path: Path,
) -> None:
    download, _ = _download(tmp_path)  # the free-space check passes
    part = part_path(tmp_path, sha(DATA))
    part.parent.mkdir(parents=True)
    # Every write to /dev/full fails with ENOSPC, as on a disk that filled up.
    part.symlink_to("/dev/full")
    with pytest.raises(RetryableUpdateError, match="disk full while downloading"):
        download.run(FakeDownloader())
    assert not part.exists() and not part.is_symlink()
    assert download.run(FakeDownloader()).read_bytes() == DATA  # room again


def test_download_rejects_a_corrupted_chunk(tmp_path: Path) -> None:
    download, _ = _download(tmp_path)
    with pytest.raises(FatalUpdateError, match="sha256 mismatch"):
        download.run(FakeDownloader(corrupt_at=4321))
    assert not part_path(tmp_path, sha(DATA)).exists()
    assert not artifact_path(tmp_path, sha(DATA)).exists()


@pytest.mark.parametrize(
    ("downloader", "message"),
    [
        (FakeDownloader(data=DATA + b"x", total_size=len(DATA)), "more than the assigned"),
        (FakeDownloader(total_size=len(DATA) * 2), "the source says the artifact has"),
    ],
    ids=["too-long", "other-size"],
)
def test_download_refuses_the_wrong_size(
    tmp_path: Path, downloader: FakeDownloader, message: str
) -> None:
    download, _ = _download(tmp_path)
    with pytest.raises(FatalUpdateError, match=message):
        download.run(downloader)


class MirroredFake(FakeDownloader):
    """A mirror first (the faulty FakeDownloader's bytes), then the control
    plane (the right ones), as HttpDownloader orders its sources: distrust()
    names the mirror while it sent bytes since the download last started
    from 0, and a distrusted mirror is skipped from then on."""

    MIRROR = "http://mirror.example/blobs"

    def __init__(self, **faults: Any) -> None:
        super().__init__(**faults)
        self.honest = FakeDownloader()
        self.trusted = True
        self.sent_by_mirror = False

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        if not self.trusted:
            yield from self.honest.fetch(digest, offset)
            return
        if offset == 0:
            self.sent_by_mirror = False
        for chunk in super().fetch(digest, offset):
            self.sent_by_mirror = True
            yield chunk

    def distrust(self, digest: str) -> list[str]:
        bad = [self.MIRROR] if self.sent_by_mirror and self.trusted else []
        self.trusted = self.trusted and not bad
        return bad


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        ({"corrupt_at": 4321}, "sha256 mismatch"),
        ({"total_size": len(DATA) * 2}, "the source says the artifact has"),
        ({"data": DATA + b"x", "total_size": len(DATA)}, "more than the assigned"),
    ],
    ids=["other-bytes", "other-size", "too-long"],
)
def test_a_mirrors_wrong_bytes_are_dropped_and_the_next_source_serves(
    tmp_path: Path, faults: dict[str, Any], message: str
) -> None:
    """Not fatal when a mirror sent them: retried without that mirror (the
    same fault from the control plane is fatal: the tests above)."""
    assert isinstance(MirroredFake(), MirroredDownloader)
    downloader = MirroredFake(**faults)
    download, _ = _download(tmp_path)
    with pytest.raises(RetryableUpdateError, match=f"{message}.*from mirror {MirroredFake.MIRROR}"):
        download.run(downloader)
    assert not part_path(tmp_path, sha(DATA)).exists()
    assert download.run(downloader).read_bytes() == DATA
    assert not downloader.trusted and downloader.honest.offsets == [0]


# ---------------------------------------------------------------- rejections


def _truncate_after_download(rig: Rig, assignment: Assignment) -> None:
    original = rig.verifier.verify

    def verify(path: Path, **kwargs: Any) -> None:
        with path.open("r+b") as handle:
            handle.truncate(len(DATA) - 10)
        original(path, **kwargs)

    rig.verifier.verify = verify  # type: ignore[method-assign]


REJECTIONS = [
    (
        "corrupted-chunk",
        {"downloader": FakeDownloader(corrupt_at=777)},
        {},
        "sha256 mismatch",
        [IL, D, F, IL],
    ),
    (
        "truncated-stream",
        {"downloader": FakeDownloader(cuts=[5000, 5000, 5000])},
        {},
        "download interrupted at 5000 of 10240 bytes (gave up after 3 attempts)",
        [IL, D, F, IL],
    ),
    (
        "truncated-file",
        {},
        {},
        "artifact truncated or padded: 10230 bytes on disk",
        [IL, D, V, R, F, IL],
    ),
    (
        "wrong-signature",
        {},
        {"signer": STRANGER},
        "manifest signature does not match any pinned signing key",
        [IL, D, V, R, F, IL],
    ),
    ("other-class", {}, {"class_name": "raspberry-pi-5"}, OTHER_CLASS, [IL, D, V, R, F, IL]),
    # A signed manifest published for another model (issue 18: a reused
    # build's manifest named the first model pushed with the same bytes).
    (
        "other-model",
        {},
        {"manifest_model": "text-detector"},
        "manifest is for text-detector@2, the assignment for digits@2",
        [IL, D, V, R, F, IL],
    ),
]


@pytest.mark.parametrize(
    ("rig_args", "assignment_args", "reason", "chain"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_bad_artifacts_are_rejected_and_the_old_model_keeps_serving(
    tmp_path: Path,
    rig_args: dict[str, Any],
    assignment_args: dict[str, Any],
    reason: str,
    chain: list[State],
) -> None:
    rig = Rig(tmp_path, **rig_args)
    assignment = make_assignment(**assignment_args)
    if reason.startswith("artifact truncated"):
        _truncate_after_download(rig, assignment)
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in chain]
    assert record.reason is not None and reason in record.reason
    failed = [r for r in rig.reporter.reports if r[0] is F]
    assert failed and reason in (failed[-1][3] or "")
    assert rig.activator.current == OLD
    assert rig.activator.paths == []
    assert rig.validator.validated == []
    rig.assert_consistent(record, assignment)


def test_verifier_uses_the_pinned_keys_in_the_state_dir(tmp_path: Path) -> None:
    save_trusted_keys(tmp_path, TRUSTED)
    assignment = make_assignment()
    path = tmp_path / "artifact"
    path.write_bytes(DATA)
    verifier = ManifestVerifier.from_state_dir(tmp_path, CLASS)
    verifier.verify(
        path,
        digest=assignment.artifact_digest,
        manifest=assignment.manifest,
        signature=assignment.manifest_signature,
    )
    rehashing = ManifestVerifier(trusted_keys=TRUSTED, class_name=CLASS, rehash=True)
    path.write_bytes(DATA[:-1] + b"\x00")
    with pytest.raises(FatalUpdateError, match="corrupted"):
        rehashing.verify(
            path,
            digest=assignment.artifact_digest,
            manifest=assignment.manifest,
            signature=assignment.manifest_signature,
        )
    with pytest.raises(FatalUpdateError, match="no pinned signing keys"):
        ManifestVerifier(trusted_keys={}, class_name=CLASS).verify(
            path, digest="", manifest=b"", signature=b""
        )


# ---------------------------------------------------------------- the store


def test_store_round_trips_and_refuses_garbage(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path)
    assert store.load() == UpdateRecord()
    record = UpdateRecord(
        state=A,
        assignment=make_assignment(),
        bytes_downloaded=10,
        attempts={"downloading": 2},
        loops=4,
        previous=OLD,
        history=["idle", "downloading"],
    )
    store.save(record)
    assert store.load() == record
    assert (tmp_path / "update.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "update.json").write_text('{"state": "sideways"}')
    with pytest.raises(StateError, match="not an update record"):
        store.load()
