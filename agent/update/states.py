"""States, events and the one transition table of the update machine.

Handlers never pick their successor: a handler returns an Event, and
TRANSITIONS[(state, event.kind)] is the next state. A pair missing from the
table is a programming error (the machine raises), so every state lists every
event it can produce.

Retryable failures stay in the same state (the machine backs off and counts
attempts; past the limit it turns them into fatal ones). So does waiting for
room to write a state file (a full disk): the machine backs off without
counting an attempt, since the step did not fail, it could not be recorded. Fatal failures before
the artifact is downloaded go to Failed (nothing on the device changed); fatal
failures after it go to RollingBack, which makes the previous model active
again and then goes to Failed. Committed and Failed report and return to Idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


class EventKind(StrEnum):
    SUCCESS = "success"
    RETRYABLE = "retryable"  # Failure(retryable, reason)
    FATAL = "fatal"  # Failure(fatal, reason)
    NOTHING_TO_DO = "nothing_to_do"
    ABORTED = "aborted"
    # A state file could not be written (the disk is full): try the same
    # state again once there is room; not a failure, no attempt counted.
    WAITING = "waiting"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    reason: str | None = None

    @classmethod
    def success(cls) -> Event:
        return cls(EventKind.SUCCESS)

    @classmethod
    def failure(cls, reason: str, *, fatal: bool) -> Event:
        return cls(EventKind.FATAL if fatal else EventKind.RETRYABLE, reason)

    @classmethod
    def nothing_to_do(cls) -> Event:
        return cls(EventKind.NOTHING_TO_DO)

    @classmethod
    def aborted(cls, reason: str) -> Event:
        return cls(EventKind.ABORTED, reason)

    @classmethod
    def waiting(cls, reason: str) -> Event:
        return cls(EventKind.WAITING, reason)


# States a newer assignment (or the model's removal) aborts; once activation
# started, an update finishes first. fleetsim's simulated devices use it too.
ABORTABLE = frozenset({State.DOWNLOADING, State.VERIFYING, State.VALIDATING})

S, E = State, EventKind

TRANSITIONS: dict[tuple[State, EventKind], State] = {
    # An assignment is pending / nothing to do.
    (S.IDLE, E.SUCCESS): S.DOWNLOADING,
    (S.IDLE, E.NOTHING_TO_DO): S.IDLE,
    # Nothing on the device has changed yet: fatal or aborted -> Failed.
    (S.DOWNLOADING, E.SUCCESS): S.VERIFYING,
    (S.DOWNLOADING, E.RETRYABLE): S.DOWNLOADING,
    (S.DOWNLOADING, E.WAITING): S.DOWNLOADING,
    (S.DOWNLOADING, E.FATAL): S.FAILED,
    (S.DOWNLOADING, E.ABORTED): S.FAILED,
    # After the download every fatal failure goes through RollingBack, so the
    # previous model is active (again) whatever happened before.
    (S.VERIFYING, E.SUCCESS): S.VALIDATING,
    (S.VERIFYING, E.RETRYABLE): S.VERIFYING,
    (S.VERIFYING, E.WAITING): S.VERIFYING,
    (S.VERIFYING, E.FATAL): S.ROLLING_BACK,
    (S.VERIFYING, E.ABORTED): S.ROLLING_BACK,
    (S.VALIDATING, E.SUCCESS): S.ACTIVATING,
    (S.VALIDATING, E.RETRYABLE): S.VALIDATING,
    (S.VALIDATING, E.WAITING): S.VALIDATING,
    (S.VALIDATING, E.FATAL): S.ROLLING_BACK,
    (S.VALIDATING, E.ABORTED): S.ROLLING_BACK,
    (S.ACTIVATING, E.SUCCESS): S.COMMITTED,
    (S.ACTIVATING, E.RETRYABLE): S.ACTIVATING,
    (S.ACTIVATING, E.WAITING): S.ACTIVATING,
    (S.ACTIVATING, E.FATAL): S.ROLLING_BACK,
    # Committed: drop the standby. Until that succeeded the standby is still
    # loaded, so a fatal commit error can still roll back.
    (S.COMMITTED, E.SUCCESS): S.IDLE,
    (S.COMMITTED, E.RETRYABLE): S.COMMITTED,
    (S.COMMITTED, E.WAITING): S.COMMITTED,
    (S.COMMITTED, E.FATAL): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.SUCCESS): S.FAILED,
    (S.ROLLING_BACK, E.RETRYABLE): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.WAITING): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.FATAL): S.FAILED,
    # Failed: clean up and report; always back to Idle.
    (S.FAILED, E.SUCCESS): S.IDLE,
}

del S, E
