"""The update machine with a version's lighter fallback artifact
(agent/update/fallback.py), through the fake ports of testkit/update_rig.py:
both artifacts go through every state, progress counts both, a fallback
that fails any check fails the update with a reason naming it, a restart in
any state (or in the fallback's download) ends consistent, and the files
the update downloaded go or stay with their version. The real-model side
(ModelHost, HostActivator, the real validator) is
tests/integration/test_agent_fallback.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.update.download import artifact_path, part_path
from edgefleet.agent.update.fallback import (
    assignment_digests,
    check_nested,
    download_total,
    fallback_of,
)
from edgefleet.agent.update.machine import RESTARTED_IN_ACTIVATION
from edgefleet.agent.update.ports import FatalUpdateError
from edgefleet.agent.update.remote import StatusReporter
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import Assignment, UpdateStore
from edgefleet.v1 import common_pb2
from testkit.update_rig import (
    DATA,
    FALLBACK_DATA,
    HAPPY,
    IL,
    OLD,
    SIGNER,
    VA,
    A,
    C,
    Crash,
    D,
    F,
    FakeDownloader,
    R,
    Rig,
    V,
    fallback_nested,
    make_assignment,
    retry,
    sha,
)

FALLBACK = sha(FALLBACK_DATA)
LABEL = f"fallback artifact (int8, {FALLBACK[:12]})"


def with_nested(nested: bytes) -> Assignment:
    """make_assignment()'s, its signed manifest naming `nested` as the fallback's."""
    base = make_assignment()
    outer = common_pb2.ArtifactManifest.FromString(base.manifest)
    outer.fallback_manifest = nested
    signed = outer.SerializeToString()
    return dataclasses.replace(base, manifest=signed, manifest_signature=SIGNER.sign(signed))


def rig_with_fallback(tmp_path: Path, **kwargs: Any) -> Rig:
    """A rig whose source also serves FALLBACK_DATA by its digest."""
    downloader = kwargs.pop("downloader", None) or FakeDownloader()
    downloader.others.setdefault(FALLBACK, FALLBACK_DATA)
    return Rig(tmp_path, downloader=downloader, **kwargs)


# ---------------------------------------------------------------- the nested manifest


def test_the_fallback_a_manifest_names() -> None:
    assignment = make_assignment(fallback=FALLBACK_DATA)
    fallback = fallback_of(assignment.manifest)
    assert fallback is not None
    assert (fallback.digest, fallback.size, fallback.precision) == (
        FALLBACK, len(FALLBACK_DATA), "int8",
    )  # fmt: skip
    assert fallback.label == LABEL
    assert check_nested(assignment.manifest) == fallback
    assert assignment_digests(assignment) == {sha(DATA), FALLBACK}
    assert download_total(assignment) == len(DATA) + len(FALLBACK_DATA)
    plain = make_assignment()
    assert fallback_of(plain.manifest) is None and check_nested(plain.manifest) is None
    assert assignment_digests(plain) == {sha(DATA)} and download_total(plain) == len(DATA)


@pytest.mark.parametrize(
    ("nested", "reason"),
    [
        (b"\x12\xff\x01", "the fallback artifact's manifest does not parse"),
        (fallback_nested(sha256="../../etc/passwd"), "is not a sha256 hex digest"),
        (fallback_nested(sha256=FALLBACK.upper()), "is not a sha256 hex digest"),
        (fallback_nested(size_bytes=0), "gives its size as 0 bytes"),
    ],
)
def test_a_nested_manifest_that_names_no_artifact_is_refused(nested: bytes, reason: str) -> None:
    broken = with_nested(nested)
    with pytest.raises(FatalUpdateError, match=reason):
        fallback_of(broken.manifest)
    # Which files to keep never fails: the primary's at least.
    assert assignment_digests(broken) == {sha(DATA)}
    assert download_total(broken) == len(DATA)


# ---------------------------------------------------------------- the happy path


def test_both_artifacts_go_through_every_state(tmp_path: Path) -> None:
    rig = rig_with_fallback(tmp_path)
    assignment = make_assignment(fallback=FALLBACK_DATA)
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.outcome == "committed", record.reason
    assert record.history == [s.value for s in HAPPY]
    # Primary first, then the fallback, each fetched once.
    assert rig.downloader.digests == [sha(DATA), FALLBACK]
    assert rig.validator.validated == [sha(DATA), FALLBACK]
    total = len(DATA) + len(FALLBACK_DATA)
    downloading = [r for r in rig.reporter.reports if r[0] is D]
    assert {r[2] for r in downloading} == {total}
    assert [r[1] for r in downloading] == sorted(r[1] for r in downloading)
    assert downloading[-1][1] == total and record.bytes_downloaded == total
    rig.assert_consistent(record, assignment)
    # What a Hello says once the update settled.
    reporter = StatusReporter(lambda _s: None, lambda: record, lambda: ("2", sha(DATA)))
    assert reporter.current().bytes_total == total


# ---------------------------------------------------------------- a bad fallback


REJECTIONS: list[tuple[str, dict[str, Any], dict[str, Any], str, list[State]]] = [
    # (id, nested manifest fields, downloader args, reason, chain)
    ("corrupted", {}, {"others": {FALLBACK: FALLBACK_DATA[:-1] + b"\x01"}}, "sha256 mismatch",
     [IL, D, F, IL]),
    ("wrong size", {"size_bytes": len(FALLBACK_DATA) + 1}, {}, "the source says the artifact has",
     [IL, D, F, IL]),
    ("another model", {"model_name": "other"}, {}, "names model_name 'other'",
     [IL, D, V, R, F, IL]),
    ("another version", {"model_version": "3"}, {}, "names model_version '3'",
     [IL, D, V, R, F, IL]),
    ("another class", {"class_name": "pi"}, {}, "names class_name 'pi'", [IL, D, V, R, F, IL]),
    ("another build", {"build_id": "b2"}, {}, "names build_id 'b2'", [IL, D, V, R, F, IL]),
    ("a fallback of its own", {"fallback_manifest": fallback_nested()}, {},
     "names a fallback of its own", [IL, D, V, R, F, IL]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("nested", "downloader", "reason", "chain"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_a_bad_fallback_fails_the_update_naming_it(
    tmp_path: Path,
    nested: dict[str, Any],
    downloader: dict[str, Any],
    reason: str,
    chain: list[State],
) -> None:
    rig = rig_with_fallback(tmp_path, downloader=FakeDownloader(**downloader))
    rig.machine.assign(with_nested(fallback_nested(**nested)))
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in chain]
    assert record.reason is not None and record.reason.startswith(LABEL), record.reason
    assert reason in record.reason
    assert rig.activator.current == OLD and rig.activator.paths == []
    for digest in (sha(DATA), FALLBACK):
        assert not artifact_path(rig.state_dir, digest).exists()
        assert not part_path(rig.state_dir, digest).exists()


def test_a_fallback_that_fails_validation_fails_the_update(tmp_path: Path) -> None:
    rig = rig_with_fallback(tmp_path)
    rig.validator.refuse.add(FALLBACK)
    assignment = make_assignment(fallback=FALLBACK_DATA)
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in (IL, D, V, VA, R, F, IL)]
    assert record.reason == f"{LABEL}: output 'y' is outside the golden tolerance"
    rig.assert_consistent(record, assignment)


def test_a_retryable_failure_of_the_fallbacks_download_names_it_and_is_retried(
    tmp_path: Path,
) -> None:
    # The primary downloads whole; the fallback's first fetch is cut.
    rig = rig_with_fallback(tmp_path, downloader=FakeDownloader(cuts=[None, 2000]))
    assignment = make_assignment(fallback=FALLBACK_DATA)
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.outcome == "committed"
    retried = [r for r in rig.reporter.reports if r[0] is D and r[3]]
    assert retried and retried[0][3] == f"{LABEL}: download interrupted at 2000 of 6144 bytes"
    assert rig.downloader.digests == [sha(DATA), FALLBACK, FALLBACK]
    assert rig.downloader.offsets == [0, 0, 2000]
    rig.assert_consistent(record, assignment)


def test_failed_keeps_a_fallback_file_its_own_records_still_name(tmp_path: Path) -> None:
    """The failed version's fallback may be the file of a version on record
    (the same bytes): Failed deletes what only the failed update used."""
    rig = rig_with_fallback(tmp_path)
    rig.kept = {FALLBACK}
    rig.faults.queued = {VA: [retry("x"), retry("x"), retry("x")]}
    assignment = make_assignment(fallback=FALLBACK_DATA)
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.outcome == "failed"
    assert not artifact_path(rig.state_dir, sha(DATA)).exists()
    assert artifact_path(rig.state_dir, FALLBACK).read_bytes() == FALLBACK_DATA


# ---------------------------------------------------------------- restarts


RESTART_POINTS = [(state, when) for state in (D, V, VA, A, C) for when in ("entered", "during")]


@pytest.mark.parametrize(
    ("state", "when"), RESTART_POINTS, ids=[f"{s}-{w}" for s, w in RESTART_POINTS]
)
def test_restart_in_each_state_ends_consistent(tmp_path: Path, state: State, when: str) -> None:
    rig = rig_with_fallback(tmp_path)
    if when == "entered":
        rig.reporter.crash_on_enter.add(state)
    else:
        rig.faults.queued = {state: [Crash(f"killed during {state}")]}
    assignment = make_assignment(fallback=FALLBACK_DATA)
    rig.machine.assign(assignment)
    with pytest.raises(Crash):
        rig.machine.run_until_settled()
    assert UpdateStore(rig.state_dir).load().state is state
    record = rig.restart().run_until_settled()
    rig.assert_consistent(record, assignment)
    if state is A:
        assert record.outcome == "failed" and record.reason == RESTARTED_IN_ACTIVATION
    else:
        assert record.outcome == "committed", record.reason
        assert record.history == [s.value for s in HAPPY]


def test_restart_in_the_fallbacks_download_resumes_from_the_bytes_on_disk(
    tmp_path: Path,
) -> None:
    # The fallback's fetch is cut at 3,000 bytes and the agent killed as it
    # backs off: the restarted machine fetches only the rest of it.
    rig = rig_with_fallback(tmp_path, downloader=FakeDownloader(cuts=[None, 3000]))
    rig.crash_on_sleep = True
    assignment = make_assignment(fallback=FALLBACK_DATA)
    rig.machine.assign(assignment)
    with pytest.raises(Crash):
        rig.machine.run_until_settled()
    assert artifact_path(rig.state_dir, sha(DATA)).exists()
    assert part_path(rig.state_dir, FALLBACK).stat().st_size == 3000
    record = rig.restart().run_until_settled()
    assert record.outcome == "committed"
    assert rig.downloader.digests == [sha(DATA), FALLBACK, FALLBACK]
    assert rig.downloader.offsets == [0, 0, 3000]
    assert rig.downloader.bytes_served == len(DATA) + len(FALLBACK_DATA)
    # The fallback's prefix hashed once more from disk after the restart.
    assert rig.hashed[0] == len(DATA) + len(FALLBACK_DATA) + 3000
    rig.assert_consistent(record, assignment)


@pytest.mark.parametrize("state", [R, F])
def test_restart_while_failing_on_the_fallback_still_ends_on_the_old_model(
    tmp_path: Path, state: State
) -> None:
    rig = rig_with_fallback(tmp_path)
    rig.validator.refuse.add(FALLBACK)
    rig.reporter.crash_on_enter.add(state)
    assignment = make_assignment(fallback=FALLBACK_DATA)
    rig.machine.assign(assignment)
    with pytest.raises(Crash):
        rig.machine.run_until_settled()
    record = rig.restart().run_until_settled()
    assert record.reason is not None and record.reason.startswith(LABEL)
    rig.assert_consistent(record, assignment)


def test_a_fallback_corrupted_on_disk_before_a_restarted_verifying_fails_it(
    tmp_path: Path,
) -> None:
    # Killed on entering Verifying; the file rots (same size) meanwhile: the
    # restarted Verifying hashes it again, refuses it naming the fallback,
    # and removes it so that the next assignment downloads it afresh.
    rig = rig_with_fallback(tmp_path)
    rig.reporter.crash_on_enter.add(V)
    assignment = make_assignment(fallback=FALLBACK_DATA)
    rig.machine.assign(assignment)
    with pytest.raises(Crash):
        rig.machine.run_until_settled()
    path = artifact_path(rig.state_dir, FALLBACK)
    rotten = bytearray(path.read_bytes())
    rotten[100] ^= 0xFF
    path.write_bytes(bytes(rotten))
    record = rig.restart().run_until_settled()
    assert record.outcome == "failed"
    assert record.reason is not None and record.reason.startswith(LABEL), record.reason
    assert "corrupted" in record.reason
    assert not path.exists()
    assert rig.activator.current == OLD
