"""A rollout's lifecycle tables (controlplane/domain/rollout_states.py):
every (state, event) pair of rollouts and of members is either in its table
or refused, and a stage's state reads back what it wrote, and what servers
before the phase field wrote. The planner that drives these tables:
test_rollout_plan.py."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from typing import Any

import pytest

from edgefleet.controlplane.domain.rollout_states import (
    ACTIVE,
    FAILED_STATES,
    FOLLOWED_STATES,
    MEMBER_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    SETTLED_STATES,
    TERMINAL,
    GateValue,
    MemberEvent,
    MemberState,
    RolloutEvent,
    RolloutState,
    StagePhase,
    StageState,
    member_can,
    member_transition,
    read_stages,
    rollout_transition,
    sources,
    write_stages,
)
from edgefleet.controlplane.errors import FailedPrecondition

R, E = RolloutState, RolloutEvent
M, V = MemberState, MemberEvent
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def _human(value: str) -> str:
    return value.replace("_", " ")


# ---------------------------------------------------------------- rollouts

ROLLOUT_PAIRS = list(itertools.product(RolloutState, RolloutEvent))


@pytest.mark.parametrize(
    ("state", "event"), ROLLOUT_PAIRS, ids=[f"{s}-{e}" for s, e in ROLLOUT_PAIRS]
)
def test_every_rollout_pair_is_in_the_table_or_refused_saying_where(
    state: RolloutState, event: RolloutEvent
) -> None:
    allowed = ROLLOUT_TRANSITIONS.get((state, event))
    if allowed:
        for target in sorted(allowed):
            assert rollout_transition("r1", state, event, target) is target
        if len(allowed) == 1:
            assert rollout_transition("r1", state, event) in allowed
        else:
            with pytest.raises(ValueError, match="needs a target"):
                rollout_transition("r1", state, event)
        return
    with pytest.raises(FailedPrecondition) as refused:
        rollout_transition("r1", state, event)
    message = str(refused.value)
    assert message.startswith(f"rollout r1 is {_human(state)}; {_human(event)} applies to")
    where = sources(event)
    assert where, f"{event} happens nowhere"
    for source in where:
        assert _human(source) in message


def test_a_target_outside_the_table_is_a_bug_not_a_refusal() -> None:
    with pytest.raises(ValueError, match="not in the table"):
        rollout_transition("r1", R.RUNNING, E.FINISH, R.ABORTED)


# (id, state, event, the states it may lead to): the rows the docs promise.
ROLLOUT_ROWS: list[tuple[str, RolloutState, RolloutEvent, set[RolloutState]]] = [
    ("start-runs-or-schedules", R.DRAFT, E.START, {R.RUNNING, R.SCHEDULED}),
    ("begin-runs", R.SCHEDULED, E.BEGIN, {R.RUNNING}),
    ("stage-failed-pauses", R.RUNNING, E.STAGE_FAILED, {R.PAUSED}),
    ("finish-with-or-without-failures", R.RUNNING, E.FINISH,
     {R.SUCCEEDED, R.SUCCEEDED_WITH_FAILURES}),
    ("await-approval", R.RUNNING, E.AWAIT_APPROVAL, {R.WAITING_APPROVAL}),
    ("approve-runs", R.WAITING_APPROVAL, E.APPROVE, {R.RUNNING}),
    ("resume-back-where-it-was", R.PAUSED, E.RESUME, {R.RUNNING, R.SCHEDULED}),
    ("retry-after-failures", R.SUCCEEDED_WITH_FAILURES, E.RETRY, {R.RUNNING}),
    *[(f"abort-{s}", s, E.ABORT, {R.ABORTED}) for s in (R.DRAFT, *ACTIVE)],
]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "event", "targets"),
    [row[1:] for row in ROLLOUT_ROWS],
    ids=[row[0] for row in ROLLOUT_ROWS],
)
def test_rollout_rows(state: RolloutState, event: RolloutEvent, targets: set[RolloutState]) -> None:
    assert ROLLOUT_TRANSITIONS[(state, event)] == targets


@pytest.mark.parametrize(
    ("state", "allowed"),
    [(R.SUCCEEDED, set()), (R.ABORTED, set()), (R.SUCCEEDED_WITH_FAILURES, {E.RETRY})],
    ids=str,
)
def test_finished_rollouts_allow_nothing_but_a_retry_of_failures(
    state: RolloutState, allowed: set[RolloutEvent]
) -> None:
    assert {e for s, e in ROLLOUT_TRANSITIONS if s is state} == allowed
    assert state in TERMINAL and state not in ACTIVE


def test_nothing_leads_back_to_a_draft_and_no_event_is_dead() -> None:
    assert all(
        R.DRAFT not in targets
        for (s, _), targets in ROLLOUT_TRANSITIONS.items()
        if s is not R.DRAFT
    )
    assert all(sources(event) for event in RolloutEvent)


# ---------------------------------------------------------------- members

MEMBER_PAIRS = list(itertools.product(MemberState, MemberEvent))


@pytest.mark.parametrize(
    ("state", "event"), MEMBER_PAIRS, ids=[f"{s}-{e}" for s, e in MEMBER_PAIRS]
)
def test_every_member_pair_is_in_the_table_or_a_value_error(
    state: MemberState, event: MemberEvent
) -> None:
    target = MEMBER_TRANSITIONS.get((state, event))
    assert member_can(state, event) is (target is not None)
    if target is not None:
        assert member_transition(state, event) is target
        assert member_transition(state.value, event) is target  # as the database stores it
        return
    with pytest.raises(ValueError, match=f"member {state} --{event}--> is not in the table"):
        member_transition(state, event)


# (id, state, event, target): the member rows the planner relies on.
MEMBER_ROWS: list[tuple[str, MemberState, MemberEvent, MemberState]] = [
    ("notify", M.WAITING, V.NOTIFY, M.NOTIFIED),
    ("refused", M.WAITING, V.REFUSE, M.REJECTED),
    ("never-notified-dropped", M.WAITING, V.DROP, M.DROPPED),
    ("agent-working", M.NOTIFIED, V.WORKING, M.IN_PROGRESS),
    ("commit", M.IN_PROGRESS, V.COMMIT, M.COMMITTED),
    ("fail", M.NOTIFIED, V.FAIL, M.FAILED),
    ("time-out", M.IN_PROGRESS, V.TIME_OUT, M.TIMED_OUT),
    ("back-off", M.IN_PROGRESS, V.BACK_OFF, M.WAITING),
    ("revert-committed", M.COMMITTED, V.REVERT, M.REVERTING),
    ("revert-installing", M.IN_PROGRESS, V.REVERT, M.REVERTING),
    ("revert-reported", M.REVERTING, V.REVERTED, M.REVERTED),
    ("revert-reported-failed", M.REVERTING, V.REVERT_FAILED, M.REVERT_FAILED),
    ("revert-not-assignable-committed", M.COMMITTED, V.REVERT_FAILED, M.REVERT_FAILED),
    ("revert-not-assignable-installing", M.IN_PROGRESS, V.REVERT_FAILED, M.REVERT_FAILED),
    ("retry-failed", M.FAILED, V.RETRY, M.WAITING),
    ("retry-timed-out", M.TIMED_OUT, V.RETRY, M.WAITING),
    ("skip-rejected", M.REJECTED, V.SKIP, M.SKIPPED),
    ("shadow-rejoin", M.COMMITTED, V.REJOIN, M.WAITING),
]


@pytest.mark.parametrize(
    ("state", "event", "target"), [r[1:] for r in MEMBER_ROWS], ids=[r[0] for r in MEMBER_ROWS]
)
def test_member_rows(state: MemberState, event: MemberEvent, target: MemberState) -> None:
    assert member_transition(state, event) is target


@pytest.mark.parametrize("state", [M.SKIPPED, M.REVERTED, M.REVERT_FAILED, M.DROPPED], ids=str)
def test_skipped_reverted_and_dropped_members_are_terminal(state: MemberState) -> None:
    assert not [e for e in MemberEvent if member_can(state, e)]


@pytest.mark.parametrize(
    ("state", "event"),
    [(M.FAILED, V.REVERT), (M.TIMED_OUT, V.REVERT), (M.REVERTING, V.REVERT), (M.COMMITTED, V.FAIL),
     (M.WAITING, V.COMMIT), (M.COMMITTED, V.NOTIFY), (M.WAITING, V.REVERT_FAILED)],
    ids=lambda v: str(v),
)  # fmt: skip
def test_member_moves_that_would_hide_a_bug_are_refused(
    state: MemberState, event: MemberEvent
) -> None:
    # A failed device rolled itself back (nothing to revert); a committed one
    # is not notified again without a retry.
    assert not member_can(state, event)


def test_state_groups_are_consistent() -> None:
    assert set(FAILED_STATES) <= set(SETTLED_STATES)
    assert not set(FOLLOWED_STATES) & set(SETTLED_STATES)
    # Every member state is settled, followed, or waiting to be notified.
    assert set(SETTLED_STATES) | set(FOLLOWED_STATES) | {M.WAITING} == set(MemberState)


# ---------------------------------------------------------------- stages

GATES = (GateValue("latency_p95", 180.0, 120.0, False), GateValue("memory", 12.5, 64.0, True))
STAGE_STATES: list[tuple[str, StageState]] = [
    ("pending", StageState()),
    ("rolling", StageState(StagePhase.ROLLING, started_at=T0, counts=(5, 1, 0, 4))),
    ("baking-with-gates", StageState(
        StagePhase.BAKING, started_at=T0, bake_started_at=T0 + dt.timedelta(minutes=3),
        counts=(5, 5, 0, 0), gates=GATES,
    )),
    ("shadow-agreement", StageState(StagePhase.ROLLING, started_at=T0, agreement=(0.875, 400))),
    ("waiting-approval", StageState(StagePhase.WAITING_APPROVAL, started_at=T0)),
    ("passed", StageState(
        StagePhase.PASSED, started_at=T0, bake_started_at=T0, finished_at=T0 + dt.timedelta(hours=1)
    )),
    ("promoted", StageState(StagePhase.PROMOTED, started_at=T0, finished_at=T0, promoted_by="ana")),
    ("failed", StageState(StagePhase.FAILED, started_at=T0, counts=(4, 1, 3, 0))),
]  # fmt: skip


@pytest.mark.parametrize("state", [s for _, s in STAGE_STATES], ids=[i for i, _ in STAGE_STATES])
def test_stage_state_round_trips_through_json(state: StageState) -> None:
    # Through json as the rollout row stores it: tuples come back as lists.
    document = json.loads(json.dumps(state.to_dict()))
    assert StageState.from_dict(document) == state


def test_an_empty_stage_state_writes_its_phase_only() -> None:
    assert StageState().to_dict() == {"phase": "pending"}


STAMP = T0.isoformat()
# (id, what an older server wrote, the phase read).
OLD_DOCUMENTS: list[tuple[str, dict[str, Any], StagePhase]] = [
    ("nothing-pending", {}, StagePhase.PENDING),
    ("started-rolling", {"started_at": STAMP}, StagePhase.ROLLING),
    ("bake-baking", {"started_at": STAMP, "bake_started_at": STAMP}, StagePhase.BAKING),
    ("finished-passed", {"started_at": STAMP, "bake_started_at": STAMP, "finished_at": STAMP},
     StagePhase.PASSED),
    ("finished-wins-over-bake", {"bake_started_at": STAMP, "finished_at": STAMP},
     StagePhase.PASSED),
    ("unknown-phase-by-times", {"phase": "exploded", "started_at": STAMP}, StagePhase.ROLLING),
    ("ack-failed-ignored", {"started_at": STAMP, "ack_failed": 3, "counts": [4, 1, 3, 0]},
     StagePhase.ROLLING),
    ("phase-wins-over-times", {"phase": "failed", "finished_at": STAMP}, StagePhase.FAILED),
]  # fmt: skip


@pytest.mark.parametrize(
    ("document", "phase"), [d[1:] for d in OLD_DOCUMENTS], ids=[d[0] for d in OLD_DOCUMENTS]
)
def test_stage_state_reads_what_servers_before_the_phase_wrote(
    document: dict[str, Any], phase: StagePhase
) -> None:
    state = StageState.from_dict(document)
    assert state.phase is phase
    if "started_at" in document:
        assert state.started_at == T0
    # What it writes back has the phase, and nothing it no longer keeps.
    written = state.to_dict()
    assert written["phase"] == phase.value
    assert "ack_failed" not in written


def test_stage_state_ignores_malformed_counts_and_agreement() -> None:
    state = StageState.from_dict({"phase": "rolling", "counts": [1, 2], "agreement": [0.5]})
    assert state.counts is None and state.agreement is None


def test_read_stages_pads_to_the_spec_and_drops_extra_documents() -> None:
    written = write_stages([StageState(StagePhase.PASSED, finished_at=T0)])
    assert read_stages(written, 3) == [
        StageState(StagePhase.PASSED, finished_at=T0), StageState(), StageState(),
    ]  # fmt: skip
    assert read_stages(written * 3, 1) == [StageState(StagePhase.PASSED, finished_at=T0)]


def test_started_keeps_the_first_start_and_done_records_who_promoted() -> None:
    later = T0 + dt.timedelta(minutes=5)
    rolling = StageState().started(T0)
    assert rolling.started(later) == rolling == StageState(StagePhase.ROLLING, started_at=T0)
    assert rolling.done(later).phase is StagePhase.PASSED
    promoted = rolling.done(later, promoted_by="ana")
    assert (promoted.phase, promoted.finished_at, promoted.promoted_by) == (
        StagePhase.PROMOTED, later, "ana",
    )  # fmt: skip
