"""A rollout's lifecycle: its states, its members' states, the stage phases,
and the one transition table each, used by operator actions
(services/rollouts.py) and the orchestrator's planner (rollout_plan.py)
alike. The values are what the database stores and the API maps to its
enums (api/convert.py).

A stage's state (phase, bake start, last judged counts and gate values) is a
typed StageState, serialized to and from the rollout row's JSON here only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from edgefleet.controlplane.errors import FailedPrecondition


class RolloutState(StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    PAUSED = "paused"
    # Every stage passed; every member committed or was skipped.
    SUCCEEDED = "succeeded"
    # Every stage passed; every member finished, some failed.
    SUCCEEDED_WITH_FAILURES = "succeeded_with_failures"
    ABORTED = "aborted"


class RolloutEvent(StrEnum):
    # Operators'.
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    APPROVE = "approve"
    PROMOTE = "promote"
    RETRY = "retry"
    SKIP = "skip"
    UPDATE = "update"
    ABORT = "abort"
    # The orchestrator's.
    BEGIN = "begin"  # a scheduled rollout's start time came
    ADVANCE = "advance"  # a stage passed and baked; the next one starts
    AWAIT_APPROVAL = "await_approval"
    STAGE_FAILED = "stage_failed"  # with on_failure pause
    FINISH = "finish"


S, E = RolloutState, RolloutEvent
# (state, event) -> the states it may lead to. Anything else is refused.
ROLLOUT_TRANSITIONS: Mapping[tuple[RolloutState, RolloutEvent], frozenset[RolloutState]] = {
    (S.DRAFT, E.START): frozenset({S.SCHEDULED, S.RUNNING}),
    (S.DRAFT, E.UPDATE): frozenset({S.DRAFT}),
    (S.DRAFT, E.ABORT): frozenset({S.ABORTED}),
    (S.SCHEDULED, E.BEGIN): frozenset({S.RUNNING}),
    (S.SCHEDULED, E.PAUSE): frozenset({S.PAUSED}),
    (S.SCHEDULED, E.SKIP): frozenset({S.SCHEDULED}),
    (S.SCHEDULED, E.UPDATE): frozenset({S.SCHEDULED}),
    (S.SCHEDULED, E.ABORT): frozenset({S.ABORTED}),
    (S.RUNNING, E.PAUSE): frozenset({S.PAUSED}),
    (S.RUNNING, E.PROMOTE): frozenset({S.RUNNING}),
    (S.RUNNING, E.RETRY): frozenset({S.RUNNING}),
    (S.RUNNING, E.SKIP): frozenset({S.RUNNING}),
    (S.RUNNING, E.UPDATE): frozenset({S.RUNNING}),
    (S.RUNNING, E.ABORT): frozenset({S.ABORTED}),
    (S.RUNNING, E.ADVANCE): frozenset({S.RUNNING}),
    (S.RUNNING, E.AWAIT_APPROVAL): frozenset({S.WAITING_APPROVAL}),
    (S.RUNNING, E.STAGE_FAILED): frozenset({S.PAUSED}),
    (S.RUNNING, E.FINISH): frozenset({S.SUCCEEDED, S.SUCCEEDED_WITH_FAILURES}),
    (S.WAITING_APPROVAL, E.APPROVE): frozenset({S.RUNNING}),
    (S.WAITING_APPROVAL, E.PROMOTE): frozenset({S.RUNNING}),
    (S.WAITING_APPROVAL, E.PAUSE): frozenset({S.PAUSED}),
    (S.WAITING_APPROVAL, E.RETRY): frozenset({S.WAITING_APPROVAL}),
    (S.WAITING_APPROVAL, E.SKIP): frozenset({S.WAITING_APPROVAL}),
    (S.WAITING_APPROVAL, E.UPDATE): frozenset({S.WAITING_APPROVAL}),
    (S.WAITING_APPROVAL, E.ABORT): frozenset({S.ABORTED}),
    # Members keep finishing while paused: a stage left waiting for approval
    # may still see members fail, and a finished one is judged on resume.
    (S.PAUSED, E.RESUME): frozenset({S.RUNNING, S.SCHEDULED}),
    (S.PAUSED, E.PROMOTE): frozenset({S.RUNNING}),
    (S.PAUSED, E.RETRY): frozenset({S.RUNNING, S.SCHEDULED}),
    (S.PAUSED, E.SKIP): frozenset({S.PAUSED}),
    (S.PAUSED, E.UPDATE): frozenset({S.PAUSED}),
    (S.PAUSED, E.ABORT): frozenset({S.ABORTED}),
    # Failed members may try again after the rollout finished with them.
    (S.SUCCEEDED_WITH_FAILURES, E.RETRY): frozenset({S.RUNNING}),
}  # fmt: skip
del S, E

# Rollouts that hold their devices and need the orchestrator (a draft only plans).
ACTIVE = (
    RolloutState.SCHEDULED, RolloutState.RUNNING, RolloutState.WAITING_APPROVAL,
    RolloutState.PAUSED,
)  # fmt: skip
TERMINAL = (
    RolloutState.SUCCEEDED, RolloutState.SUCCEEDED_WITH_FAILURES, RolloutState.ABORTED,
)  # fmt: skip


def sources(event: RolloutEvent) -> list[RolloutState]:
    """The states `event` may happen in, in the enum's order."""
    return [s for s in RolloutState if (s, event) in ROLLOUT_TRANSITIONS]


def rollout_transition(
    rollout_id: str, state: str, event: RolloutEvent, target: RolloutState | None = None
) -> RolloutState:
    """The state `event` leads to from `state` (`target` where it may lead to
    several); FailedPrecondition, saying where it may happen, where the
    table has no such transition."""
    current = RolloutState(state)
    allowed = ROLLOUT_TRANSITIONS.get((current, event))
    if not allowed:
        where = ", ".join(s.value.replace("_", " ") for s in sources(event))
        raise FailedPrecondition(
            f"rollout {rollout_id} is {current.value.replace('_', ' ')}; "
            f"{event.value.replace('_', ' ')} applies to a rollout that is {where}"
        )
    if target is None:
        if len(allowed) != 1:
            raise ValueError(f"{current} --{event}--> needs a target: one of {sorted(allowed)}")
        (target,) = allowed
    if target not in allowed:
        raise ValueError(f"{current} --{event}--> {target} is not in the table")
    return target


class MemberState(StrEnum):
    WAITING = "waiting"  # not notified yet, or waiting for a retry's backoff
    NOTIFIED = "notified"
    IN_PROGRESS = "in_progress"
    COMMITTED = "committed"
    FAILED = "failed"
    REJECTED = "rejected"  # the assignment was refused (no artifact, no budget, ...)
    TIMED_OUT = "timed_out"
    REVERTING = "reverting"
    REVERTED = "reverted"
    # Its revert failed, or could not be made: it may still run the version.
    REVERT_FAILED = "revert_failed"
    # Never notified, and now never will be (an abort, its class dropped).
    DROPPED = "dropped"
    SKIPPED = "skipped"  # an operator left it on the version it runs


class MemberEvent(StrEnum):
    NOTIFY = "notify"  # assigned the version
    REFUSE = "refuse"  # the assignment was refused
    WORKING = "working"  # the agent reports it is installing
    COMMIT = "commit"
    FAIL = "fail"
    TIME_OUT = "time_out"
    BACK_OFF = "back_off"  # failed or timed out with retries left: waits, then again
    RETRY = "retry"  # an operator's retry: a fresh retry budget
    SKIP = "skip"
    REVERT = "revert"  # assigned its previous version
    REVERTED = "reverted"  # its revert reported back (or there was nothing to revert)
    REVERT_FAILED = "revert_failed"  # its revert reported failure, or could not be assigned
    DROP = "drop"  # never notified, and now never will be (abort, dropped class)
    REJOIN = "rejoin"  # a shadow stage's member takes the version for real next


M, V = MemberState, MemberEvent
MEMBER_TRANSITIONS: Mapping[tuple[MemberState, MemberEvent], MemberState] = {
    (M.WAITING, V.NOTIFY): M.NOTIFIED,
    (M.WAITING, V.REFUSE): M.REJECTED,
    (M.WAITING, V.SKIP): M.SKIPPED,
    (M.WAITING, V.DROP): M.DROPPED,
    **{(state, event): target for state in (M.NOTIFIED, M.IN_PROGRESS) for event, target in (
        (V.COMMIT, M.COMMITTED), (V.FAIL, M.FAILED), (V.TIME_OUT, M.TIMED_OUT),
        (V.BACK_OFF, M.WAITING), (V.SKIP, M.SKIPPED), (V.REVERT, M.REVERTING),
        (V.REVERTED, M.REVERTED), (V.REVERT_FAILED, M.REVERT_FAILED),
    )},
    (M.NOTIFIED, V.WORKING): M.IN_PROGRESS,
    (M.COMMITTED, V.REVERT): M.REVERTING,
    (M.COMMITTED, V.REVERTED): M.REVERTED,
    (M.COMMITTED, V.REVERT_FAILED): M.REVERT_FAILED,
    # A shadow stage passed: its members take the version for real next.
    **{(state, V.REJOIN): M.WAITING for state in (
        M.WAITING, M.NOTIFIED, M.IN_PROGRESS, M.COMMITTED, M.FAILED, M.REJECTED, M.TIMED_OUT,
    )},
    **{(state, event): target for state in (M.FAILED, M.REJECTED, M.TIMED_OUT)
       for event, target in ((V.RETRY, M.WAITING), (V.SKIP, M.SKIPPED))},
    (M.REVERTING, V.REVERTED): M.REVERTED,
    (M.REVERTING, V.REVERT_FAILED): M.REVERT_FAILED,
}  # fmt: skip
del M, V

FAILED_STATES = (MemberState.FAILED, MemberState.REJECTED, MemberState.TIMED_OUT)
# Members a rollout no longer waits for: it finishes once every member is one.
SETTLED_STATES = (
    MemberState.COMMITTED, *FAILED_STATES, MemberState.REVERTED, MemberState.REVERT_FAILED,
    MemberState.DROPPED, MemberState.SKIPPED,
)  # fmt: skip
# Members whose agents' reports a step follows.
FOLLOWED_STATES = (MemberState.NOTIFIED, MemberState.IN_PROGRESS, MemberState.REVERTING)


def member_transition(state: str, event: MemberEvent) -> MemberState:
    """The state `event` leads a member in `state` to; ValueError where the
    table has none (a planner bug: the planner only asks allowed ones)."""
    target = MEMBER_TRANSITIONS.get((MemberState(state), event))
    if target is None:
        raise ValueError(f"member {state} --{event}--> is not in the table")
    return target


def member_can(state: str, event: MemberEvent) -> bool:
    return (MemberState(state), event) in MEMBER_TRANSITIONS


# ---------------------------------------------------------------- stages


class StagePhase(StrEnum):
    PENDING = "pending"
    ROLLING = "rolling"  # notifying and judging its members
    BAKING = "baking"  # thresholds and gates passed; baking
    WAITING_APPROVAL = "waiting_approval"
    PASSED = "passed"
    PROMOTED = "promoted"  # passed by an operator
    FAILED = "failed"  # its failure paused or aborted the rollout
    ABORTED = "aborted"  # an operator aborted the rollout while it ran


DONE_PHASES = (StagePhase.PASSED, StagePhase.PROMOTED)


@dataclass(frozen=True)
class GateValue:
    name: str
    value: float
    limit: float
    passing: bool


@dataclass(frozen=True)
class StageState:
    """What a rollout row keeps per stage. Counts and gates are those of the
    stage's last judgement (for the API; the planner judges afresh)."""

    phase: StagePhase = StagePhase.PENDING
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    bake_started_at: dt.datetime | None = None
    # total, committed, failed, in progress (domain.rollouts.StageCounts).
    counts: tuple[int, int, int, int] | None = None
    gates: tuple[GateValue, ...] = ()
    # (request-weighted agreement, mirrored requests) of a shadow stage.
    agreement: tuple[float, int] | None = None
    promoted_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase.value}
        for name in ("started_at", "finished_at", "bake_started_at"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.isoformat()
        if self.counts is not None:
            out["counts"] = list(self.counts)
        if self.gates:
            out["gates"] = [[g.name, g.value, g.limit, g.passing] for g in self.gates]
        if self.agreement is not None:
            out["agreement"] = list(self.agreement)
        if self.promoted_by:
            out["promoted_by"] = self.promoted_by
        return out

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> StageState:
        """Also reads what servers before the phase field wrote: the phase
        follows from the timestamps there."""
        times = {
            name: dt.datetime.fromisoformat(value)
            for name in ("started_at", "finished_at", "bake_started_at")
            if isinstance(value := document.get(name), str)
        }
        phase_value = str(document.get("phase", ""))
        if phase_value in set(StagePhase):
            phase = StagePhase(phase_value)
        elif "finished_at" in times:
            phase = StagePhase.PASSED
        elif "bake_started_at" in times:
            phase = StagePhase.BAKING
        elif "started_at" in times:
            phase = StagePhase.ROLLING
        else:
            phase = StagePhase.PENDING
        counts = document.get("counts")
        agreement = document.get("agreement")
        return cls(
            phase=phase,
            counts=tuple(int(n) for n in counts) if isinstance(counts, list) and len(counts) == 4
            else None,  # type: ignore[arg-type]
            gates=tuple(
                GateValue(str(n), float(v), float(lim), bool(ok))
                for n, v, lim, ok in document.get("gates", [])
            ),
            agreement=(float(agreement[0]), int(agreement[1]))
            if isinstance(agreement, list) and len(agreement) == 2 else None,
            promoted_by=str(document.get("promoted_by", "")),
            started_at=times.get("started_at"),
            finished_at=times.get("finished_at"),
            bake_started_at=times.get("bake_started_at"),
        )  # fmt: skip

    def started(self, now: dt.datetime) -> StageState:
        return replace(self, phase=StagePhase.ROLLING, started_at=self.started_at or now)

    def done(self, now: dt.datetime, promoted_by: str = "") -> StageState:
        return replace(
            self,
            phase=StagePhase.PROMOTED if promoted_by else StagePhase.PASSED,
            finished_at=now,
            promoted_by=promoted_by,
        )


def read_stages(documents: list[dict[str, Any]], n_stages: int) -> list[StageState]:
    """A rollout row's stages, one StageState per stage of its spec."""
    states = [StageState.from_dict(d) for d in documents[:n_stages]]
    return states + [StageState()] * (n_stages - len(states))


def write_stages(states: list[StageState]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in states]
