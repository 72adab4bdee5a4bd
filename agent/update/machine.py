"""UpdateMachine: runs the handler of the persisted state, turns its outcome
into an Event, looks the successor up in TRANSITIONS and persists it.

Persistence: before a handler runs, its attempt (per-state and loop counters)
is saved; after it, the next state is saved before anything of that state
happens. So the record on disk always names the state whose side effects may
be under way, and a restart re-enters that state:

- Idle, Verifying, Validating, RollingBack, Failed: run again (they are
  idempotent: checks, rollback to the recorded previous artifact, cleanup).
- Downloading: resume from the bytes in the .part file (download.py).
- Activating: ROLL BACK. A restart loses the warmed model and the standby, and
  whether the switch happened is unknown, so the rule is mender's: a restart
  before commit rolls back to the previous artifact, and reports
  "agent restarted during activation".
- Committed: run commit() again (idempotent); the new model stays active.

Errors: every port error is classified (ports.py). A retryable one keeps the
state, backs off (base * 2^(attempt-1), capped; the sleep is a port) and
counts an attempt; at `max_attempts` it becomes fatal. An interrupted download
that got further than the attempt before starts the count again: a link that
drops every few megabytes must not fail a large download after `max_attempts`
cuts, while one that makes no progress still fails. The loop guard counts
handler runs of one update, restarts included: past `max_loops` the next
handler is not run and a fatal "loop guard" failure is raised instead, so an
update that never settles ends in Failed. A state entered more than
`max_attempts` times (a crash loop: the process dies inside its handler) fails
the same way without running the handler again. Failed always settles to Idle
(its cleanup and report never fail).

A full disk (agent/disk.py): the artifact's own bytes are a retryable failure
(download.py), counted like any other. The small state files (update.json,
active.json, trust.json) are different: when one cannot be written (DiskFull)
the step did not fail, it could not be recorded, so the machine waits in the
same state (Event WAITING) with capped exponential backoff, without counting
an attempt or a loop, reports "disk full: ..." as the status's reason (once
per state and reason) and carries on once the write lands. A record that
could not be saved is held in memory and saved before any handler runs
again, so the record on disk still always names the state whose side
effects may be under way. Meanwhile the device serves what it served.

A version's lighter fallback artifact (fallback.py), when the manifest
names one, goes through the same states beside the primary: Downloading
fetches both (each resumable, shared by digest; progress counts both),
Verifying checks the nested manifest and the fallback's file, Validating
validates it against its own manifest, and Activating installs both
(activation.py). Whatever fails on the fallback fails the update with a
reason that names it, like a failure of the primary.

Shadow assignments (Assignment.shadow, a rollout's shadow stage) run through
the same states: only Activating branches, loading the candidate as the
shadow of its model name (Activator.shadow) instead of activating it, so the
active model, `previous` and what apps get never change. Committed keeps the
shadow loaded (commit() only drops a standby); RollingBack drops it, and so
does the next activation (a later normal assignment of the same artifact
finds the file already downloaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgefleet.agent.disk import RETRY_MAX_S, DiskCondition, disk_full_label
from edgefleet.agent.errors import AgentError, DiskFull, StateError

from .download import DEFAULT_MARGIN, Hasher, ResumableDownload, artifact_path, remove_download
from .fallback import assignment_digests, check_file, check_nested, download_total, fallback_of
from .ports import FatalUpdateError, Ports, RetryableUpdateError, UpdateError
from .states import ABORTABLE, TRANSITIONS, Event, EventKind, State
from .store import Assignment, UpdateRecord, UpdateStore
from .verify import check_names_assigned

RESTARTED_IN_ACTIVATION = "agent restarted during activation"


class Interrupted(Exception):
    """A download stopped on purpose (UpdateMachine.interrupt): newer work
    waits for the thread that runs it. Not a failure, not an attempt."""


class UpdateInProgress(AgentError):
    """An assignment arrived while another update is still running."""

    title = "Update in progress"


def classify(exc: Exception) -> Event:
    """The failure event for an exception raised by a port."""
    if isinstance(exc, DiskFull):
        return Event.waiting(exc.message)
    if isinstance(exc, UpdateError):
        return Event.failure(exc.message, fatal=exc.fatal)
    if isinstance(exc, ConnectionError | TimeoutError):
        return Event.failure(f"{type(exc).__name__}: {exc}", fatal=False)
    label = disk_full_label(exc)
    if label is not None:
        # Staging bytes (a port's scratch files) on a full disk: space may
        # free, so retried, up to the attempt limit.
        return Event.failure(f"{label}: {exc}", fatal=False)
    return Event.failure(f"{type(exc).__name__}: {exc}", fatal=True)


@contextlib.contextmanager
def _naming(label: str) -> Iterator[None]:
    """Re-raise a failure of the step inside as an UpdateError whose reason
    starts with `label` (the fallback artifact's), classified as it was; a
    state file that could not be written (DiskFull) passes unchanged."""
    try:
        yield
    except (StateError, Interrupted):  # DiskFull included: the machine waits for room
        raise
    except UpdateError as exc:
        if exc.message.startswith(label):
            raise
        raise type(exc)(f"{label}: {exc.message}") from exc
    except Exception as exc:
        event = classify(exc)
        error = RetryableUpdateError if event.kind is EventKind.RETRYABLE else FatalUpdateError
        raise error(f"{label}: {event.reason}") from exc


class UpdateMachine:
    def __init__(
        self,
        store: UpdateStore,
        ports: Ports,
        *,
        max_attempts: int = 5,
        max_loops: int = 50,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        hash_factory: Callable[[], Hasher] = hashlib.sha256,
        disk_usage: Callable[[Path], Any] = shutil.disk_usage,
        disk_margin: int = DEFAULT_MARGIN,
        disk: DiskCondition | None = None,
        disk_wait_cap: float = RETRY_MAX_S,
    ) -> None:
        self.store = store
        self.ports = ports
        self.max_attempts = max_attempts
        self.max_loops = max_loops
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.disk_wait_cap = disk_wait_cap
        self._hash_factory = hash_factory
        self._disk_usage = disk_usage
        self._disk_margin = disk_margin
        # Shared with the rest of the agent: it logs and reports the wait.
        self.disk = disk if disk is not None else DiskCondition()
        self.record = store.load()
        # Loaded in Activating: this process did not do (all of) the switch.
        self._restarted_in_activation = self.record.state is State.ACTIVATING
        # By digest: the primary's and the fallback's downloads, kept for
        # the process's life so a retry never hashes a prefix again.
        self._downloads: dict[str, ResumableDownload] = {}
        self._total: tuple[Assignment | None, int] = (None, 0)
        # The record in memory is ahead of the one on disk (a full disk).
        self._unsaved = False
        # Consecutive waits for room, and what the last one reported.
        self._waits = 0
        self._waited: tuple[State, str] | None = None
        # Set from another thread (interrupt()), read by a running download.
        self._interrupted = threading.Event()

    def interrupt(self) -> None:
        """Ask a running download to stop at its next bytes (thread-safe):
        a newer assignment, or the model's removal, would otherwise wait for
        the whole download, however slow its source. The step ends without
        counting an attempt; the runner then aborts the update as usual.
        Ignored by every other step."""
        self._interrupted.set()

    @property
    def waiting(self) -> str | None:
        """Why the machine waits for room on the disk; None when it does not."""
        return self._waited[1] if self._waited is not None else None

    @property
    def unsaved(self) -> bool:
        """The record in memory is not on disk yet (a full disk): stepping
        must go on until it is, even with nothing pending."""
        return self._unsaved

    @property
    def state(self) -> State:
        return self.record.state

    # ------------------------------------------------------------ commands

    def assign(self, assignment: Assignment) -> None:
        """Start installing `assignment` (persisted, not yet acted on)."""
        if self.record.pending:
            raise UpdateInProgress("an update is still running; abort it and let it settle first")
        self.record = UpdateRecord(assignment=assignment, history=[State.IDLE.value])
        self._downloads = {}
        self._interrupted.clear()  # asked of the update this one replaces
        # On a full disk it waits in memory: step() saves it before any work.
        self._persist()

    def abort(self, reason: str) -> None:
        """Give up the running update. Honoured before activation (Downloading,
        Verifying, Validating); once activation started the update finishes."""
        if not self.record.pending:
            return
        if self.record.state is State.IDLE:
            self.record.outcome, self.record.reason = "aborted", reason
        else:
            self.record.abort_reason = reason
        self._persist()

    # ------------------------------------------------------------ stepping

    def step(self) -> State:
        """Run the current state's handler once; persist and return the next
        state. Port errors become events; a record that cannot be saved for
        lack of room makes the machine wait (module docstring); any other
        StateError (the record cannot be persisted) propagates."""
        record = self.record
        state = record.state
        if self._unsaved:
            why = self._persist()
            if why is not None:
                return self._wait(state, why)
            # On disk at last: say where the update stands.
            self._report(state, record.reason if state in _FAILING else None)
        if state is State.IDLE:
            event = self._idle(record)
        else:
            record.attempts[state.value] = record.attempts.get(state.value, 0) + 1
            record.loops += 1
            why = self._persist()  # the attempt is on disk before its work
            if why is not None:
                self._uncount(state)
                return self._wait(state, why)
            try:
                event = self._guarded(state, record)
            except Interrupted:
                # Not an attempt: the runner has newer work (and aborts this
                # update at its next look); the record says where it got.
                self._interrupted.clear()
                self._uncount(state)
                self._persist()
                return state
        if event.kind is EventKind.RETRYABLE and (
            record.attempts.get(state.value, 0) >= self.max_attempts
        ):
            event = Event.failure(
                f"{event.reason} (gave up after {self.max_attempts} attempts)", fatal=True
            )
        successor = TRANSITIONS.get((state, event.kind))
        if successor is None:
            raise RuntimeError(f"no transition from {state} on {event.kind}")
        if event.kind is EventKind.WAITING:
            # Not an attempt: the step could not be recorded, it did not fail.
            self._uncount(state)
            return self._wait(state, event.reason or "disk full")
        self._no_longer_waiting()
        if state is State.IDLE and event.kind is EventKind.NOTHING_TO_DO:
            return state
        if event.kind in (EventKind.FATAL, EventKind.ABORTED):
            record.reason = (
                event.reason if record.reason is None else (f"{record.reason}; {event.reason}")
            )
        if event.kind is EventKind.RETRYABLE:
            attempt = record.attempts.get(state.value, 1)
            self._report(state, event.reason)
            self.ports.sleep(min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))
            return state
        if successor is State.IDLE:
            record.outcome = "committed" if state is State.COMMITTED else "failed"
        record.state = successor
        record.history.append(successor.value)
        why = self._persist()  # the next state is on disk before its work
        if why is not None:
            # Its work waits until it is (step() saves first).
            return self._wait(successor, why)
        self._report(successor, record.reason if successor in _FAILING else None)
        return successor

    # ------------------------------------------------------------ a full disk

    def _persist(self) -> str | None:
        """Save the record; None once it is on disk, else why it is not
        (DiskFull: it stays in memory, marked unsaved). Any other StateError
        propagates."""
        try:
            self.store.save(self.record)
        except DiskFull as exc:
            self._unsaved = True
            return exc.message
        self._unsaved = False
        return None

    def _uncount(self, state: State) -> None:
        """Take back the attempt and loop counted for a step that waited."""
        if state is not State.IDLE:
            record = self.record
            record.attempts[state.value] = max(0, record.attempts.get(state.value, 1) - 1)
            record.loops = max(0, record.loops - 1)

    def _wait(self, state: State, reason: str) -> State:
        """Back off until there may be room; report the wait when it is new."""
        self.disk.failed("the update's state", reason)  # logged once
        if self._waited != (state, reason):
            self._waited = (state, reason)
            self._report(state, reason)
        delay = min(self.disk_wait_cap, self.backoff_base * 2.0 ** min(self._waits, 32))
        self._waits += 1
        self.ports.sleep(delay)
        return state

    def _no_longer_waiting(self) -> None:
        if self._waited is not None:
            self._waited, self._waits = None, 0
            self.disk.recovered("the update's state")

    def run_until_settled(self) -> UpdateRecord:
        """Step until the machine is Idle with nothing pending (and saved)."""
        while self.record.pending or self.record.state is not State.IDLE or self._unsaved:
            self.step()
        return self.record

    # ------------------------------------------------------------ handlers

    def _guarded(self, state: State, record: UpdateRecord) -> Event:
        if state is not State.FAILED and record.loops > self.max_loops:
            return Event.failure(f"loop guard: {self.max_loops} steps without settling", fatal=True)
        if state is not State.FAILED and record.attempts[state.value] > self.max_attempts:
            # Only a crash loop gets here: retryable failures stop at the limit.
            return Event.failure(
                f"{state} did not complete in {self.max_attempts} attempts", fatal=True
            )
        if state is State.ACTIVATING and self._restarted_in_activation:
            self._restarted_in_activation = False
            return Event.failure(RESTARTED_IN_ACTIVATION, fatal=True)
        if state in ABORTABLE and record.abort_reason is not None:
            return Event.aborted(f"aborted: {record.abort_reason}")
        handler = self._handlers[state]
        try:
            return handler(self, record)
        except DiskFull as exc:
            return classify(exc)  # waits: a state file could not be written
        except (StateError, Interrupted):
            raise
        except Exception as exc:
            event = classify(exc)
            if state is State.ROLLING_BACK and event.reason is not None:
                event = Event(event.kind, f"rollback failed: {event.reason}")
            return event

    def _idle(self, record: UpdateRecord) -> Event:
        if not record.pending:
            return Event.nothing_to_do()
        record.previous = self.ports.activator.active()
        return Event.success()

    def _assignment(self, record: UpdateRecord) -> Assignment:
        if record.assignment is None:  # pending implies an assignment
            raise StateError(f"{self.store.path}: {record.state} without an assignment")
        return record.assignment

    def _artifact(self, record: UpdateRecord) -> Path:
        return artifact_path(self.store.state_dir, self._assignment(record).artifact_digest)

    def _download_of(self, digest: str, size: int) -> ResumableDownload:
        download = self._downloads.get(digest)
        if download is None or download.size != size:
            download = self._downloads[digest] = ResumableDownload(
                self.store.state_dir,
                digest,
                size,
                hash_factory=self._hash_factory,
                disk_usage=self._disk_usage,
                margin=self._disk_margin,
            )
        return download

    def _downloading(self, record: UpdateRecord) -> Event:
        assignment = self._assignment(record)
        # Read before the manifest is verified, only to know what to fetch
        # (fallback.py); a malformed one fails here, nothing changed yet.
        fallback = fallback_of(assignment.manifest)
        # The primary, then the fallback; progress counts both.
        parts = [(self._download_of(assignment.artifact_digest, assignment.artifact_size), "")]
        if fallback is not None:
            parts.append((self._download_of(fallback.digest, fallback.size), fallback.label))
        before = record.bytes_downloaded
        try:
            done = 0
            for download, label in parts:

                def progress(offset: int, base: int = done) -> None:
                    record.bytes_downloaded = base + offset
                    self._report(State.DOWNLOADING, None)
                    if self._interrupted.is_set():
                        raise Interrupted()

                with _naming(label) if label else contextlib.nullcontext():
                    download.run(self.ports.downloader, progress)
                done += download.size
        finally:
            record.bytes_downloaded = sum(download.bytes_done for download, _ in parts)
            if record.bytes_downloaded > before:
                record.attempts[State.DOWNLOADING.value] = 1  # progress: see the docstring
        return Event.success()

    def _verifying(self, record: UpdateRecord) -> Event:
        assignment = self._assignment(record)
        trust = self.ports.trust
        # The signed statement first (replay, downgrade, key rotations); the
        # trusted state it implies is persisted only after the manifest
        # checks passed as well, never before.
        verified = trust.check(assignment) if trust is not None else None
        self.ports.verifier.verify(
            self._artifact(record),
            digest=assignment.artifact_digest,
            manifest=assignment.manifest,
            signature=assignment.manifest_signature,
            **({} if verified is None else {"trusted_keys": verified.keys}),
        )
        check_names_assigned(assignment.manifest, assignment.model_name, assignment.model_version)
        # The fallback's manifest is signed inside the primary's, checked
        # just now: only from here on is what it says trusted.
        fallback = check_nested(assignment.manifest)
        if fallback is not None:
            check_file(self.store.state_dir, fallback)
        if trust is not None and verified is not None:
            trust.accept(verified)
        return Event.success()

    def _validating(self, record: UpdateRecord) -> Event:
        manifest = self._assignment(record).manifest
        self.ports.validator.validate(self._artifact(record), manifest)
        fallback = fallback_of(manifest)
        if fallback is not None:
            # Against its own manifest: its golden samples, tolerances, budgets.
            with _naming(fallback.label):
                self.ports.validator.validate(
                    artifact_path(self.store.state_dir, fallback.digest), fallback.manifest
                )
        return Event.success()

    def _activating(self, record: UpdateRecord) -> Event:
        assignment = self._assignment(record)
        # One state for both kinds: a shadow is loaded beside the active model
        # instead of replacing it; everything around it (commit, rollback on a
        # failure or a restart) is the same.
        if assignment.shadow:
            self.ports.activator.shadow(self._artifact(record), assignment.manifest)
        else:
            self.ports.activator.activate(self._artifact(record), assignment.manifest)
        return Event.success()

    def _committed(self, record: UpdateRecord) -> Event:
        self.ports.activator.commit()
        if self.ports.trust is not None:
            # After commit(): a restart re-runs this state, so the record
            # of the committed version is never ahead of the device.
            self.ports.trust.committed(self._assignment(record))
        return Event.success()

    def _rolling_back(self, record: UpdateRecord) -> Event:
        self.ports.activator.rollback(record.previous)
        return Event.success()

    def _failed(self, record: UpdateRecord) -> Event:
        # Never fails: keep the artifact files (the primary's and its
        # fallback's) only if they may still be in use (a rollback that did
        # not bring the previous artifact back).
        assignment = self._assignment(record)
        digest = assignment.artifact_digest
        try:
            active = self.ports.activator.active()
            # The failed artifact may also be the active one (an assignment,
            # e.g. a shadow, of the version already served): keep its files.
            in_use = active != record.previous or active == digest
            # The downloads are shared: another model may use the same file,
            # and this model's own versions may share a fallback's.
            needed = self.ports.shared() | self.ports.kept()
        except Exception:
            in_use, needed = True, set()
        for each in sorted(assignment_digests(assignment)):
            with contextlib.suppress(OSError):
                remove_download(self.store.state_dir, each, keep_final=in_use or each in needed)
        self._downloads = {}
        return Event.success()

    def _report(self, state: State, reason: str | None) -> None:
        total = self._total_bytes()
        # Reporting is best effort; the real reporter buffers.
        with contextlib.suppress(Exception):
            self.ports.reporter.report(state, self.record.bytes_downloaded, total, reason)

    def _total_bytes(self) -> int:
        """The bytes the current assignment downloads (both artifacts), parsed
        from its manifest once per assignment, not once per chunk."""
        assignment = self.record.assignment
        if assignment is None:
            return 0
        if self._total[0] is not assignment:
            self._total = (assignment, download_total(assignment))
        return self._total[1]

    _handlers: dict[State, Callable[[UpdateMachine, UpdateRecord], Event]] = {
        State.DOWNLOADING: _downloading,
        State.VERIFYING: _verifying,
        State.VALIDATING: _validating,
        State.ACTIVATING: _activating,
        State.COMMITTED: _committed,
        State.ROLLING_BACK: _rolling_back,
        State.FAILED: _failed,
    }


_FAILING = frozenset({State.ROLLING_BACK, State.FAILED})
