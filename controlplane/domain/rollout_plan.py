"""The rollout planner: `plan(snapshot, now)` decides what one orchestrator
step does, as a list of actions, from what the step read (the rollout, its
members, the agents' reports and the stage's telemetry). Pure: no I/O, no
clock, no randomness, no mutation of the snapshot; the same snapshot gives
the same actions on any replica, before or after a restart.

The orchestrator (services/orchestrator.py) reads a snapshot, plans, and
applies the actions in one transaction; `apply` here is the state part of
that application, shared by the orchestrator and the planner's tests, so a
test can run a rollout to its end through the planner alone.

One step, in order (docs/operators/rollouts.md has the semantics table):
1. a scheduled rollout whose start time came begins;
2. members follow their agents' reports for the rollout's assignment;
   members past their timeout, and failed ones, back off and try again while
   retries remain, else count as timed out or failed;
3. an aborted rollout with revert puts back, NOTIFY_CHUNK at a time, every
   member that took (or may be taking) the version; it finishes once none
   is still reverting;
4. a dynamic rollout admits the devices that started matching;
5. waiting members of the stages reached are notified, as many as the
   pacing allows, NOTIFY_CHUNK at a time;
6. the current stage is judged: thresholds (rollouts.judge_stage) and
   health gates; failure pauses, or aborts and reverts (or, when only some
   classes fail a gate, drops those classes); success bakes, then waits for
   approval or advances;
7. after the last stage passed, the rollout finishes once every member is
   settled (committed, failed, skipped, reverted, revert-failed or dropped):
   SUCCEEDED when none failed, else SUCCEEDED_WITH_FAILURES. Members of
   passed stages are notified all the same: a threshold met is a stage
   passed, not a member forgotten.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from edgefleet.controlplane.domain.rollout_spec import ABORT_REVERT, RolloutSpec, StageSpec
from edgefleet.controlplane.domain.rollout_states import (
    DONE_PHASES,
    FAILED_STATES,
    FOLLOWED_STATES,
    SETTLED_STATES,
    GateValue,
    MemberEvent,
    MemberState,
    RolloutState,
    StagePhase,
    StageState,
    member_can,
    member_transition,
)
from edgefleet.controlplane.domain.rollouts import (
    Acknowledged,
    ClassLimits,
    DeviceHealth,
    GateResult,
    StageCounts,
    StageOutcome,
    Verdict,
    describe,
    device_timed_out,
    evaluate_gates,
    judge_stage,
    notify_allowance,
    rate_allowance,
    rate_due,
    retry_delay_s,
    should_retry,
)

# Members notified (or reverted) per step: a stage of thousands is assigned
# in chunks, each committed (and pushed) before the next, so agents start
# installing after the first chunk and SQLite's write lock is never held for
# long. The next chunk follows at once (Plan.more).
NOTIFY_CHUNK = 1000
# How long a reverting member waits for its device's report when the spec
# sets no device timeout: long enough for a device that reboots or roams,
# short enough that an aborted rollout does not show "reverting" for days.
REVERT_TIMEOUT_S = 3600.0
REVERT, KEEP = "revert", "keep"

# Agent update states that mean "still working on it".
WORKING = frozenset({"downloading", "verifying", "validating", "activating", "rolling_back"})


@dataclass
class Member:
    """One device's part in a rollout: a plain copy of its row. The planner
    never changes one in place; it plans new copies (SetMembers)."""

    device_id: str
    class_name: str
    stage: int
    state: str
    reason: str
    attempts: int
    sequence: int
    notified_at: dt.datetime | None
    finished_at: dt.datetime | None
    next_attempt_at: dt.datetime | None
    previous_model_version_id: str | None
    acknowledged: bool = False


@dataclass(frozen=True)
class Report:
    """What the member's agent last reported for this rollout's model at the
    member's assignment sequence ("" when nothing yet)."""

    state: str
    reason: str = ""


@dataclass(frozen=True)
class Snapshot:
    """What one step read, for one rollout and its one model. `apply`
    gives the snapshot an action leaves."""

    rollout_id: str
    state: RolloutState
    spec: RolloutSpec
    current_stage: int
    stages: tuple[StageState, ...]
    # By device id.
    members: Mapping[str, Member]
    reason: str = ""
    abort_mode: str = ""  # REVERT or KEEP once aborted
    start_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    notify_started_at: dt.datetime | None = None
    # A fixed rate's next device is due then (rollouts.rate_allowance).
    paced_until: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    # Followed members' reports (device id -> report).
    reports: Mapping[str, Report] = field(default_factory=dict)
    # The current stage's committed members' telemetry since they committed.
    health: Sequence[DeviceHealth] = ()
    limits: Mapping[str, ClassLimits] = field(default_factory=dict)
    # A shadow stage's (agreement, mirrored requests) over its members.
    agreement: tuple[float, int] | None = None
    # Dynamic rollouts: devices that started matching and may join.
    newcomers: Sequence[Member] = ()


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Begin:
    """A scheduled rollout's start time came: running, stage 1 started."""


@dataclass(frozen=True)
class SetMembers:
    """Members' new states (reports followed, timeouts, backoff, drops)."""

    members: tuple[Member, ...]


@dataclass(frozen=True)
class Admit:
    """Devices that started matching join (dynamic rollouts)."""

    members: tuple[Member, ...]


@dataclass(frozen=True)
class Notify:
    """Assign the version to these members (a shadow stage's: beside the
    active one). Refused assignments make them REJECTED."""

    device_ids: tuple[str, ...]
    shadow: bool = False


@dataclass(frozen=True)
class Revert:
    """Assign these members their previous version (device id, why)."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Judge:
    """The current stage's judgement, kept for the API."""

    stage: int
    counts: StageCounts
    gates: tuple[GateValue, ...]
    agreement: tuple[float, int] | None
    reason: str


@dataclass(frozen=True)
class StartBake:
    stage: int
    reason: str


@dataclass(frozen=True)
class AwaitApproval:
    stage: int


@dataclass(frozen=True)
class Advance:
    """The current stage passed (promoted_by: an operator passed it); the
    next one starts. A shadow stage's members take the version for real
    with it."""

    stage: int
    promoted_by: str = ""


@dataclass(frozen=True)
class Pause:
    stage: int
    reason: str


@dataclass(frozen=True)
class Abort:
    """The stage failed with on_failure abort-and-revert."""

    stage: int
    reason: str


@dataclass(frozen=True)
class DropClasses:
    """A gate failed only on these classes' members (with abort-and-revert):
    the classes leave the rollout, their members that took the version are
    reverted (a Revert follows), the others carry on."""

    classes: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Finish:
    """Every stage passed and every member settled."""

    state: RolloutState
    reason: str


@dataclass(frozen=True)
class RevertDone:
    """An aborted rollout put back every member it had to; `outcome` counts
    how its members ended ("2 reverted, 1 revert failed"), for its reason."""

    outcome: str = ""


Action = (
    Begin | SetMembers | Admit | Notify | Revert | Judge | StartBake | AwaitApproval | Advance
    | Pause | Abort | DropClasses | Finish | RevertDone
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    # Work the pacing already allows is left (the next chunk): step again at once.
    more: bool = False
    # When a step is due whatever the agents report (a bake's end): step
    # again then, not at the next tick after it.
    due: dt.datetime | None = None


# ---------------------------------------------------------------- planning


def plan(snapshot: Snapshot, now: dt.datetime) -> Plan:
    """The actions of one step (see the module docstring)."""
    planner = _Planner(snapshot, now)
    planner.run()
    return Plan(tuple(planner.actions), planner.more, planner.due)


class _Planner:
    def __init__(self, snapshot: Snapshot, now: dt.datetime) -> None:
        self.s = snapshot  # as the actions planned so far leave it
        self.now = now
        self.actions: list[Action] = []
        self.more = False
        self.due: dt.datetime | None = None

    @property
    def members(self) -> Mapping[str, Member]:
        return self.s.members

    def emit(self, action: Action) -> None:
        self.actions.append(action)
        self.s = apply(self.s, action, self.now)

    def change(self, members: list[Member]) -> None:
        if members:
            self.emit(SetMembers(tuple(members)))

    def run(self) -> None:
        s = self.s
        if s.finished_at is not None:
            return
        if s.state is RolloutState.SCHEDULED and (s.start_at is None or s.start_at <= self.now):
            self.emit(Begin())
        self.follow()
        if self.s.state is RolloutState.ABORTED:
            self.revert()
            return
        if self.s.state is not RolloutState.RUNNING:
            return
        if s.spec.dynamic and s.newcomers:
            # A class a gate dropped stays out, newcomers of it too.
            dropped = {m.class_name for m in self.members.values() if "dropped:" in m.reason}
            fresh = tuple(
                replace(m, stage=self.s.current_stage)
                for m in s.newcomers
                if m.device_id not in self.members and m.class_name not in dropped
            )
            if fresh:
                self.emit(Admit(fresh))
        if self.s.stages[self.s.current_stage].phase in DONE_PHASES:
            self.notify()
            self.finish_when_settled()
            return
        # A stage failing now notifies nobody more: they would be given the
        # version and reverted (or left paused on it) in the same step. The
        # one assessment serves the judgement too: notifying moves members
        # from waiting to notified, both counted as in progress.
        assessment = self.assess()
        if not assessment.problem:
            self.notify()
        self.judge(assessment)

    # ------------------------------------------------------------ members

    def follow(self) -> None:
        """Members follow their agents' reports; timeouts and backoff."""
        pacing = self.s.spec.pacing
        revert_timeout = pacing.device_timeout_s or REVERT_TIMEOUT_S
        changed = []
        for m in self.members.values():
            if m.state not in FOLLOWED_STATES:
                continue
            report = self.s.reports.get(m.device_id, Report(""))
            if m.state == MemberState.REVERTING:
                if report.state == "committed":
                    # Keep why it was reverted ("class X dropped: ...").
                    changed.append(self.settle(
                        m, MemberEvent.REVERTED, m.reason.replace("reverting to", "reverted to")
                    ))  # fmt: skip
                elif report.state == "failed":
                    changed.append(
                        self.settle(m, MemberEvent.REVERT_FAILED, f"revert failed: {report.reason}")
                    )
                elif device_timed_out(
                    (m.notified_at or self.now).timestamp(), self.now.timestamp(),
                    revert_timeout,
                ):  # fmt: skip
                    # A device that never reports (offline, gone) would hold
                    # an aborted rollout in "reverting" for ever. Its
                    # assignment is already the old version, which it takes
                    # when it next syncs: settled, and the reason says so.
                    changed.append(self.settle(m, MemberEvent.REVERTED, (
                        f"{m.reason.replace('reverting to', 'assigned back to')}; not "
                        f"confirmed within {revert_timeout:g} s (the device takes it when it "
                        "next connects)"
                    )))  # fmt: skip
                continue
            # A shadow stage's assignment reports committed once it is loaded
            # beside the active version: that is its member done.
            if report.state == "committed":
                changed.append(self.settle(m, MemberEvent.COMMIT, ""))
                continue
            if report.state == "failed":
                changed.append(self.fail(m, MemberEvent.FAIL, report.reason or "the update failed"))
                continue
            notified = m.notified_at or self.now
            if device_timed_out(
                notified.timestamp(), self.now.timestamp(), pacing.device_timeout_s or None
            ):
                changed.append(self.fail(
                    m, MemberEvent.TIME_OUT, f"no result within {pacing.device_timeout_s:g} s"
                ))  # fmt: skip
            elif report.state in WORKING and member_can(m.state, MemberEvent.WORKING):
                changed.append(replace(m, state=member_transition(m.state, MemberEvent.WORKING)))
        self.change(changed)

    def settle(self, m: Member, event: MemberEvent, reason: str) -> Member:
        return replace(
            m, state=member_transition(m.state, event), reason=reason, finished_at=self.now
        )

    def fail(self, m: Member, event: MemberEvent, reason: str) -> Member:
        """A failure, or a retry after a backoff while retries remain."""
        pacing = self.s.spec.pacing
        failed = member_transition(m.state, event)
        if not should_retry(m.attempts, pacing.device_retries):
            return self.settle(m, event, reason)
        # Backoff in units of the device timeout (a device that needs
        # minutes is not retried every 30 s), else 30 s.
        base = min(30.0, pacing.device_timeout_s or 30.0)
        delay = retry_delay_s(m.attempts, base_s=base)
        return replace(
            m,
            state=member_transition(m.state, MemberEvent.BACK_OFF),
            reason=f"attempt {m.attempts} {failed.value.replace('_', ' ')}: {reason}; retrying",
            next_attempt_at=self.now + dt.timedelta(seconds=delay),
        )

    def notify(self) -> None:
        """Waiting members of the stages reached, as many as the pacing
        allows now, NOTIFY_CHUNK at most."""
        s = self.s
        pacing = s.spec.pacing
        started = s.notify_started_at or self.now
        notified = sum(m.attempts for m in self.members.values())
        elapsed = (self.now - started).total_seconds()
        # The ramp counts from the start (what a minute did not use may be
        # used later); the fixed rate banks nothing (rate_allowance).
        ramp = replace(pacing.pacing, max_per_minute=0)
        allowance = min(
            notify_allowance(ramp, elapsed, notified),
            rate_allowance(pacing.max_per_minute, s.paced_until, self.now),
        )
        ready = [
            m for m in self.members.values()
            if m.state == MemberState.WAITING and m.stage <= s.current_stage
            and (m.next_attempt_at is None or m.next_attempt_at <= self.now)
        ]  # fmt: skip
        ready.sort(key=lambda m: (m.stage, m.device_id))
        batch = ready[: max(0, min(allowance, NOTIFY_CHUNK))]
        self.more = len(batch) < min(len(ready), max(0, allowance))
        for shadow in (False, True):
            ids = tuple(m.device_id for m in batch if s.spec.stages[m.stage].shadow is shadow)
            if ids:
                self.emit(Notify(ids, shadow))

    # ------------------------------------------------------------ judging

    def assess(self) -> _Assessment:
        """The current stage's counts, gates and verdict as things stand."""
        s = self.s
        index = s.current_stage
        spec = s.spec.stages[index]
        # Members of dropped classes (reverting, reverted) and skipped ones
        # no longer count; failures a resume acknowledged leave the success
        # denominator (judge_stage, Acknowledged).
        members = [
            m for m in self.members.values()
            if m.stage == index and m.state not in _OUT_OF_STAGE
        ]  # fmt: skip
        max_silence = spec.gates.max_silence_s
        committed_ids = {m.device_id for m in members if m.state == MemberState.COMMITTED}
        health = [h for h in s.health if h.device_id in committed_ids]
        silent = {
            h.device_id for h in health
            if max_silence and h.last_report_age_s is not None
            and h.last_report_age_s > max_silence
        }  # fmt: skip
        gates = evaluate_gates(health, spec.gates, s.limits)
        counts = StageCounts(
            total=len(members),
            committed=sum(
                m.state == MemberState.COMMITTED and m.device_id not in silent for m in members
            ),
            failed=sum(m.state in FAILED_STATES or m.device_id in silent for m in members),
            in_progress=sum(m.state in _MOVING for m in members),
        )
        # What a resume acknowledged and still is: the error threshold
        # counts what finished after the resume only.
        acknowledged = Acknowledged(
            failed=sum(m.acknowledged and m.state in FAILED_STATES for m in members),
            finished=sum(m.acknowledged and m.state in _FINISHED for m in members),
        )
        outcome = judge_stage(counts, spec.rule, acknowledged)
        agreement = s.agreement if spec.shadow else None
        problem = self.problem(spec, outcome, gates, counts, agreement)
        return _Assessment(counts, tuple(gates), agreement, outcome, problem)

    def judge(self, a: _Assessment) -> None:
        s = self.s
        index = s.current_stage
        spec = s.spec.stages[index]
        state = s.stages[index]
        counts, gates, outcome, problem = a.counts, a.gates, a.outcome, a.problem
        values = tuple(GateValue(g.name, g.value, g.limit, g.passing) for g in gates)
        if (state.counts, state.gates, state.agreement) != (
            (counts.total, counts.committed, counts.failed, counts.in_progress),
            values,
            a.agreement,
        ):
            self.emit(Judge(index, counts, values, a.agreement, outcome.reason))
        if problem is None:
            return
        if problem:
            self.stage_failed(spec, index, problem, gates)
            return
        if state.phase is StagePhase.WAITING_APPROVAL:
            return
        baking = state.bake_started_at
        if baking is None:
            self.emit(StartBake(index, outcome.reason))
            baking = self.now
        if (self.now - baking).total_seconds() < spec.bake_time_s:
            self.due = baking + dt.timedelta(seconds=spec.bake_time_s)
            return
        if index == len(s.spec.stages) - 1:
            self.emit(Advance(index))
            self.finish_when_settled()
        elif spec.require_approval:
            self.emit(AwaitApproval(index))
        else:
            self.emit(Advance(index))
            # The next stage's first notifications at once, not a tick later
            # (bench_rollout counted ~1 s per stage from its start to them).
            self.more = True

    def problem(
        self,
        spec: StageSpec,
        outcome: StageOutcome,
        gates: Sequence[GateResult],
        counts: StageCounts,
        agreement: tuple[float, int] | None,
    ) -> str | None:
        """Why the stage failed (a non-empty string), "" when it passed,
        None while it is still undecided."""
        failing = [g for g in gates if not g.passing]
        if outcome.verdict is Verdict.FAILED:
            return outcome.reason
        if failing and counts.committed:
            return "health gate failed: " + "; ".join(describe(g) for g in failing)
        if outcome.verdict is not Verdict.SUCCEEDED:
            return None
        if spec.shadow:
            if agreement is None or agreement[1] == 0:
                return None  # no mirrored requests yet: nothing to judge agreement on
            if spec.min_agreement is not None and agreement[0] < spec.min_agreement:
                return (
                    f"shadow agreement {agreement[0]:.3f} over {agreement[1]} mirrored "
                    f"requests is below the stage's minimum {spec.min_agreement:g}"
                )
        return ""

    def stage_failed(
        self, spec: StageSpec, index: int, problem: str, gates: Sequence[GateResult]
    ) -> None:
        reason = f"stage {index + 1}{f' ({spec.name})' if spec.name else ''}: {problem}"
        if spec.on_failure != ABORT_REVERT:
            self.emit(Pause(index, reason))
            return
        # One class's bad artifact should not hold back the classes whose
        # artifacts are fine: a gate failing only on some classes drops them.
        class_of = {m.device_id: m.class_name for m in self.members.values()}
        bad = {
            class_of[i] for g in gates if not g.passing for i in g.failing_devices if i in class_of
        }
        remaining = {m.class_name for m in self.members.values() if m.state not in _OUT_OF_STAGE}
        if bad and not bad >= remaining and problem.startswith("health gate failed"):
            self.emit(DropClasses(tuple(sorted(bad)), problem))
            # All at once: no later step comes back to a dropped class.
            self.revert_members(
                [m for m in self.members.values() if m.class_name in bad],
                lambda m: f"class {m.class_name} dropped: {problem}",
                chunk=None,
            )
            return
        self.emit(Abort(index, reason))
        self.revert()

    def finish_when_settled(self) -> None:
        """Every stage passed: finished once every member settled."""
        members = self.members.values()
        if any(m.state not in SETTLED_STATES for m in members):
            return
        failed = sum(m.state in FAILED_STATES for m in members)
        committed = sum(m.state == MemberState.COMMITTED for m in members)
        skipped = sum(m.state == MemberState.SKIPPED for m in members)
        n = len(self.s.spec.stages)
        parts = [f"all {n} stage{'s' if n != 1 else ''} passed", f"{committed} committed"]
        if failed:
            parts.append(f"{failed} failed")
        if skipped:
            parts.append(f"{skipped} skipped")
        dropped = sorted({m.class_name for m in members if "dropped:" in m.reason})
        if dropped:
            parts.append(f"dropped and reverted: {', '.join(dropped)}")
        revert_failed = sum(m.state == MemberState.REVERT_FAILED for m in members)
        if revert_failed:
            parts.append(f"{revert_failed} revert failed")
        # A class that failed a gate and went back is a failure of the
        # version on that class, whatever the others did.
        state = (
            RolloutState.SUCCEEDED_WITH_FAILURES if failed or dropped else RolloutState.SUCCEEDED
        )
        self.emit(Finish(state, "; ".join(parts)))

    # ------------------------------------------------------------ revert

    def revert(self) -> None:
        """Aborted with revert: every member that took (or may be taking)
        the version goes back; never-notified ones are dropped."""
        if self.s.abort_mode == KEEP:
            self.emit(RevertDone())
            return
        self.revert_members(list(self.members.values()), lambda m: "")
        if not self.more and not any(
            m.state == MemberState.REVERTING for m in self.members.values()
        ):
            self.emit(RevertDone(revert_outcome(self.members.values())))

    def revert_members(
        self, members: list[Member], why: _Why, chunk: int | None = NOTIFY_CHUNK
    ) -> None:
        dropped = [
            replace(m, state=member_transition(m.state, MemberEvent.DROP),
                    reason=f"{why(m)}; {NEVER_NOTIFIED}" if why(m) else NEVER_NOTIFIED)
            for m in members if m.state == MemberState.WAITING
        ]  # fmt: skip
        self.change(dropped)
        # In chunks, like notifications, those running the version first:
        # a revert of 5,500 members in one step held SQLite's writer for
        # seconds and woke them all in the same instant.
        reverting = sorted(
            (m for m in members if member_can(m.state, MemberEvent.REVERT)), key=revert_order
        )
        size = NOTIFY_CHUNK if chunk is not None else len(reverting)
        if reverting:
            self.emit(Revert(tuple((m.device_id, why(m)) for m in reverting[:size])))
        self.more = self.more or len(reverting) > size


@dataclass(frozen=True)
class _Assessment:
    counts: StageCounts
    gates: tuple[GateResult, ...]
    agreement: tuple[float, int] | None
    outcome: StageOutcome
    # Why the stage failed; "" passed; None undecided (_Planner.problem).
    problem: str | None


# Why a member that was never notified is dropped.
NEVER_NOTIFIED = "never notified"


def revert_outcome(members: Iterable[Member]) -> str:
    """How an abort left its members, the states it moved them to, in
    words: `2 reverted, 1 revert failed, 9 dropped (never notified)`."""
    return outcome_words(Counter(m.state for m in members))


def outcome_words(counts: Mapping[str, int]) -> str:
    """revert_outcome's words for counts by member state (those not counted: none)."""
    parts = (
        (MemberState.REVERTED, "reverted"),
        (MemberState.REVERT_FAILED, "revert failed"),
        (MemberState.DROPPED, "dropped (never notified)"),
    )
    return ", ".join(f"{counts[state]} {words}" for state, words in parts if counts.get(state, 0))


def revert_order(m: Member) -> tuple[bool, int, str]:
    """Those running the version first, then those still installing it; by
    stage and id within."""
    return (m.state != MemberState.COMMITTED, m.stage, m.device_id)


_Why = Callable[[Member], str]

_OUT_OF_STAGE = (
    MemberState.REVERTING, MemberState.REVERTED, MemberState.REVERT_FAILED, MemberState.DROPPED,
    MemberState.SKIPPED,
)  # fmt: skip
_MOVING = (MemberState.WAITING, MemberState.NOTIFIED, MemberState.IN_PROGRESS)
_FINISHED = (MemberState.COMMITTED, *FAILED_STATES)


# ---------------------------------------------------------------- applying


def apply(s: Snapshot, action: Action, now: dt.datetime) -> Snapshot:
    """The snapshot `action` leaves: the rollout's state, stages and members.
    Notify and Revert are taken as done here; the orchestrator puts what the
    assignments really gave (sequences, refusals) over them. Members are
    copied, never changed in place."""
    stages = list(s.stages)
    if isinstance(action, SetMembers | Admit):
        return replace(s, members={**s.members, **{m.device_id: m for m in action.members}})
    if isinstance(action, Notify):
        members: dict[str, Member] = dict(s.members)
        for device_id in action.device_ids:
            m = members[device_id]
            members[device_id] = replace(
                m, state=member_transition(m.state, MemberEvent.NOTIFY), notified_at=now,
                attempts=m.attempts + 1, next_attempt_at=None,
            )  # fmt: skip
        return replace(
            s, members=members, notify_started_at=s.notify_started_at or now,
            paced_until=rate_due(
                s.spec.pacing.max_per_minute, s.paced_until, now, len(action.device_ids)
            ),
        )  # fmt: skip
    if isinstance(action, Revert):
        members = dict(s.members)
        for device_id, _ in action.items:
            m = members[device_id]
            members[device_id] = replace(
                m, state=member_transition(m.state, MemberEvent.REVERT), notified_at=now
            )
        return replace(s, members=members)
    if isinstance(action, Begin):
        stages[0] = stages[0].started(now)
        return replace(s, state=RolloutState.RUNNING, started_at=now, stages=tuple(stages))
    if isinstance(action, Judge):
        c = action.counts
        stages[action.stage] = replace(
            stages[action.stage], counts=(c.total, c.committed, c.failed, c.in_progress),
            gates=action.gates, agreement=action.agreement,
        )  # fmt: skip
        return replace(s, stages=tuple(stages))
    if isinstance(action, StartBake):
        stages[action.stage] = replace(
            stages[action.stage], phase=StagePhase.BAKING, bake_started_at=now
        )
        return replace(s, stages=tuple(stages))
    if isinstance(action, AwaitApproval):
        stages[action.stage] = replace(stages[action.stage], phase=StagePhase.WAITING_APPROVAL)
        return replace(
            s, state=RolloutState.WAITING_APPROVAL, stages=tuple(stages),
            reason=f"stage {action.stage + 1} passed; waiting for an operator's approval",
        )  # fmt: skip
    if isinstance(action, Pause | Abort):
        stages[action.stage] = replace(
            stages[action.stage], phase=StagePhase.FAILED, bake_started_at=None
        )
        if isinstance(action, Pause):
            return replace(s, state=RolloutState.PAUSED, reason=action.reason, stages=tuple(stages))
        return replace(
            s, state=RolloutState.ABORTED, abort_mode=REVERT, reason=action.reason,
            stages=tuple(stages),
        )  # fmt: skip
    if isinstance(action, Advance):
        stages[action.stage] = stages[action.stage].done(now, action.promoted_by)
        if action.stage + 1 >= len(stages):
            return replace(
                s, state=RolloutState.RUNNING, stages=tuple(stages),
                reason=f"all {len(stages)} stages passed; waiting for every member to finish",
            )  # fmt: skip
        stages[action.stage + 1] = stages[action.stage + 1].started(now)
        moved: Mapping[str, Member] = s.members
        if s.spec.stages[action.stage].shadow:
            moved = {**moved, **{m.device_id: m for m in rejoined(moved, action.stage)}}
        return replace(
            s, state=RolloutState.RUNNING, current_stage=action.stage + 1,
            stages=tuple(stages), members=moved, reason="",
        )  # fmt: skip
    if isinstance(action, Finish):
        return replace(s, state=action.state, reason=action.reason, finished_at=now)
    if isinstance(action, RevertDone):
        reason = "; ".join(filter(None, (s.reason, action.outcome)))
        return replace(s, finished_at=now, reason=reason)
    assert isinstance(action, DropClasses)
    return s


def rejoined(members: Mapping[str, Member], stage: int) -> list[Member]:
    """After a shadow stage its members take the version for real, with the
    next stage."""
    return [
        replace(
            m,
            stage=stage + 1,
            state=member_transition(m.state, MemberEvent.REJOIN),
            reason="shadow passed",
            attempts=0,
        )
        for m in members.values()
        if m.stage == stage and member_can(m.state, MemberEvent.REJOIN)
    ]
