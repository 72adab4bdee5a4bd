"""The rollout planner (controlplane/domain/rollout_plan.py), state by event:
small snapshots in, the exact actions of one step out; then whole rollouts
run in memory through `plan` and `apply` alone, crashed between any two
actions of any step, and shown to end the same.

Each row names a snapshot (a few members in given states and stages, a spec)
and the actions `plan` returns, summarized one string each by `summary`
("notify a0,a1", "judge 0 3/1/1/1": total/committed/failed/in progress).
Rollouts through a real control plane: tests/integration/test_rollouts.py."""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import pytest

from edgefleet.controlplane.domain import rollout_plan
from edgefleet.controlplane.domain.rollout_plan import (
    KEEP,
    NOTIFY_CHUNK,
    REVERT,
    Abort,
    Action,
    Admit,
    Advance,
    AwaitApproval,
    Begin,
    DropClasses,
    Finish,
    Judge,
    Member,
    Notify,
    Pause,
    Plan,
    Report,
    Revert,
    RevertDone,
    SetMembers,
    Snapshot,
    StartBake,
    apply,
    plan,
)
from edgefleet.controlplane.domain.rollout_spec import (
    ABORT_REVERT,
    PacingSpec,
    RolloutSpec,
    StageSpec,
)
from edgefleet.controlplane.domain.rollout_states import (
    FOLLOWED_STATES,
    MemberState,
    RolloutState,
    StagePhase,
    StageState,
)
from edgefleet.controlplane.domain.rollouts import ClassLimits, DeviceHealth, Gates

R = RolloutState
W, N, IP, C, F, TO = (
    MemberState.WAITING, MemberState.NOTIFIED, MemberState.IN_PROGRESS, MemberState.COMMITTED,
    MemberState.FAILED, MemberState.TIMED_OUT,
)  # fmt: skip
RVG, RVD, SK = MemberState.REVERTING, MemberState.REVERTED, MemberState.SKIPPED
RVF, DR = MemberState.REVERT_FAILED, MemberState.DROPPED
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


NOW = at(10)

# ---------------------------------------------------------------- helpers


def member(device_id: str, state: MemberState = W, **fields: Any) -> Member:
    """A member of stage 0, class "a"; one notified at T0 (one attempt)
    unless it is still waiting."""
    waiting = state == W
    base: dict[str, Any] = dict(
        device_id=device_id, class_name="a", stage=0, state=state, reason="",
        attempts=0 if waiting else 1, sequence=0 if waiting else 1,
        notified_at=None if waiting else T0, finished_at=None, next_attempt_at=None,
        previous_model_version_id="v1",
    )  # fmt: skip
    return Member(**{**base, **fields})


def members(prefix: str, n: int, state: MemberState = W, **fields: Any) -> list[Member]:
    """n members named prefix0, prefix1, ... (zero-padded so they sort)."""
    width = len(str(n - 1))
    return [member(f"{prefix}{i:0{width}d}", state, **fields) for i in range(n)]


def stage(name: str = "s", **fields: Any) -> StageSpec:
    return StageSpec(name=name, percent=50, **fields)


ONE = (stage("one"),)
UNPACED = PacingSpec()
TWO = (stage("one"), stage("two"))


def snap(
    *groups: Member | Iterable[Member],
    stages: tuple[StageSpec, ...] = ONE,
    pacing: PacingSpec = UNPACED,
    state: RolloutState = R.RUNNING,
    current: int = 0,
    phase: StagePhase | None = None,
    counts: tuple[int, int, int, int] | None = None,
    bake_started_at: dt.datetime | None = None,
    dynamic: bool = False,
    **fields: Any,
) -> Snapshot:
    """A rollout in `state` at stage `current` (earlier stages passed, that
    one rolling unless `phase` says otherwise), with these members."""
    flat = [m for g in groups for m in ([g] if isinstance(g, Member) else g)]
    started = state not in (R.DRAFT, R.SCHEDULED)
    stage_states = []
    for i in range(len(stages)):
        if i < current:
            stage_states.append(StageState(StagePhase.PASSED, started_at=T0, finished_at=T0))
        elif i == current and started:
            stage_states.append(StageState(
                phase or StagePhase.ROLLING, started_at=T0, counts=counts,
                bake_started_at=bake_started_at,
            ))  # fmt: skip
        else:
            stage_states.append(StageState())
    spec = RolloutSpec(
        model_name="digits", model_version="2", class_names=("a",), stages=stages,
        pacing=pacing, dynamic=dynamic,
    )  # fmt: skip
    base: dict[str, Any] = dict(
        rollout_id="r1", state=state, spec=spec, current_stage=current,
        stages=tuple(stage_states), members={m.device_id: m for m in flat},
        started_at=T0 if started else None, notify_started_at=T0 if started else None,
    )  # fmt: skip
    return Snapshot(**{**base, **fields})


def rep(**states: str) -> dict[str, Report]:
    """Agents' reports by device id: rep(a0="committed", a1="downloading")."""
    return {device_id: Report(state, "bad hash" if state == "failed" else "") for device_id,
            state in states.items()}  # fmt: skip


def summary(action: Action) -> str:
    """One action as a short string a table can list."""
    match action:
        case Begin():
            return "begin"
        case SetMembers(members=ms):
            return "set " + ",".join(f"{m.device_id}={m.state}" for m in ms)
        case Admit(members=ms):
            return "admit " + ",".join(f"{m.device_id}@{m.stage}" for m in ms)
        case Notify(device_ids=ids, shadow=shadow):
            return "notify " + ",".join(ids) + (" shadow" if shadow else "")
        case Revert(items=items):
            return "revert " + ",".join(device_id for device_id, _ in items)
        case Judge(stage=index, counts=c):
            return f"judge {index} {c.total}/{c.committed}/{c.failed}/{c.in_progress}"
        case StartBake(stage=index):
            return f"bake {index}"
        case AwaitApproval(stage=index):
            return f"approval {index}"
        case Advance(stage=index):
            return f"advance {index}"
        case Pause(stage=index):
            return f"pause {index}"
        case Abort(stage=index):
            return f"abort {index}"
        case DropClasses(classes=classes):
            return "drop " + ",".join(classes)
        case Finish(state=state):
            return f"finish {state}"
        case RevertDone():
            return "revert done"
    raise AssertionError(action)


def summaries(p: Plan) -> list[str]:
    return [summary(a) for a in p.actions]


def only(p: Plan, kind: type[Any]) -> Any:
    (found,) = [a for a in p.actions if isinstance(a, kind)]
    return found


class Case(NamedTuple):
    id: str
    snapshot: Snapshot
    now: dt.datetime
    actions: list[str]
    more: bool = False
    # When the plan says the next step is due (a bake's end).
    due: dt.datetime | None = None


def cases(table: list[Case]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", table, ids=[c.id for c in table])


def check(case: Case) -> Plan:
    p = plan(case.snapshot, case.now)
    assert summaries(p) == case.actions
    assert p.more is case.more
    assert p.due == case.due
    return p


# ---------------------------------------------------------------- scheduling

SCHEDULING = [
    Case("before-start-at-nothing",
         snap(members("a", 2), state=R.SCHEDULED, start_at=at(60)), NOW, []),
    Case("start-at-came-begins-and-notifies",
         snap(members("a", 2), state=R.SCHEDULED, start_at=NOW), NOW,
         ["begin", "notify a0,a1", "judge 0 2/0/0/2"]),
    Case("no-start-at-begins-at-once",
         snap(members("a", 2), state=R.SCHEDULED), NOW,
         ["begin", "notify a0,a1", "judge 0 2/0/0/2"]),
    Case("begin-notifies-the-first-stage-only",
         snap(member("a0"), member("b0", stage=1), stages=TWO, state=R.SCHEDULED), NOW,
         ["begin", "notify a0", "judge 0 1/0/0/1"]),
]  # fmt: skip


@cases(SCHEDULING)
def test_scheduling(case: Case) -> None:
    check(case)


def test_begin_starts_the_rollout_and_its_first_stage() -> None:
    s = apply(snap(members("a", 1), stages=TWO, state=R.SCHEDULED), Begin(), NOW)
    assert (s.state, s.started_at) == (R.RUNNING, NOW)
    assert [st.phase for st in s.stages] == [StagePhase.ROLLING, StagePhase.PENDING]


# ---------------------------------------------------------------- reports, timeouts, backoff

TIMEOUT = PacingSpec(device_timeout_s=60)
RETRY_ONCE = PacingSpec(device_timeout_s=60, device_retries=1)
LENIENT = (stage("one", error_threshold_percent=50),)

FOLLOWING = [
    Case("reports-commit-fail-working",
         snap(member("a0", N), member("a1", N), member("a2", N), member("a3", IP), stages=LENIENT,
              reports=rep(a0="committed", a1="failed", a2="downloading")), NOW,
         ["set a0=committed,a1=failed,a2=in_progress", "judge 0 4/1/1/2"]),
    Case("in-progress-without-report-stays",
         snap(member("a0", IP)), NOW, ["judge 0 1/0/0/1"]),
    Case("report-of-a-waiting-member-ignored",
         snap(member("a0"), reports=rep(a0="committed")), NOW,
         ["notify a0", "judge 0 1/0/0/1"]),
    Case("timeout-not-yet-at-the-limit",
         snap(member("a0", N), pacing=TIMEOUT), at(60), ["judge 0 1/0/0/1"]),
    Case("timeout-without-retries-times-out",
         snap(member("a0", N), pacing=TIMEOUT), at(61),
         ["set a0=timed_out", "judge 0 1/0/1/0", "pause 0"]),
    Case("timeout-despite-working-reports",
         snap(member("a0", IP), pacing=TIMEOUT, reports=rep(a0="downloading")), at(61),
         ["set a0=timed_out", "judge 0 1/0/1/0", "pause 0"]),
    Case("timeout-with-a-retry-left-backs-off",
         snap(member("a0", N), pacing=RETRY_ONCE), at(61),
         ["set a0=waiting", "judge 0 1/0/0/1"]),
    Case("failure-with-a-retry-left-backs-off",
         snap(member("a0", IP), pacing=RETRY_ONCE, reports=rep(a0="failed")), NOW,
         ["set a0=waiting", "judge 0 1/0/0/1"]),
    Case("failure-with-retries-spent-fails",
         snap(member("a0", IP, attempts=2), pacing=RETRY_ONCE, reports=rep(a0="failed")), NOW,
         ["set a0=failed", "judge 0 1/0/1/0", "pause 0"]),
    Case("backoff-not-over-waits",
         snap(member("a0", attempts=1, next_attempt_at=at(11)), pacing=RETRY_ONCE), NOW,
         ["judge 0 1/0/0/1"]),
    Case("backoff-over-notifies-again",
         snap(member("a0", attempts=1, next_attempt_at=NOW), pacing=RETRY_ONCE), NOW,
         ["notify a0", "judge 0 1/0/0/1"]),
]  # fmt: skip


@cases(FOLLOWING)
def test_members_follow_reports_timeouts_and_backoff(case: Case) -> None:
    check(case)


@pytest.mark.parametrize(
    ("attempts", "timeout_s", "delay_s"),
    # Backoff doubles per attempt, in units of the device timeout up to 30 s.
    [(1, 0, 30), (2, 0, 60), (3, 0, 120), (1, 10, 10), (2, 10, 20), (1, 600, 30)],
    ids=lambda v: str(v),
)
def test_backoff_sets_the_next_attempt_and_says_why(
    attempts: int, timeout_s: float, delay_s: float
) -> None:
    s = snap(
        member("a0", IP, attempts=attempts),
        pacing=PacingSpec(device_timeout_s=timeout_s, device_retries=5),
        reports=rep(a0="failed"),
    )
    (backed_off,) = only(plan(s, NOW), SetMembers).members
    assert backed_off.state == W
    assert backed_off.next_attempt_at == NOW + dt.timedelta(seconds=delay_s)
    assert backed_off.reason == f"attempt {attempts} failed: bad hash; retrying"


def test_a_timed_out_member_says_how_long_it_had() -> None:
    (timed_out,) = only(plan(snap(member("a0", N), pacing=TIMEOUT), at(61)), SetMembers).members
    assert (timed_out.reason, timed_out.finished_at) == ("no result within 60 s", at(61))


# ---------------------------------------------------------------- pacing


def paced(n_notified: int, n_waiting: int, pacing: PacingSpec, **fields: Any) -> Snapshot:
    return snap(members("n", n_notified, N), members("w", n_waiting), pacing=pacing, **fields)


TWO_A_MINUTE = PacingSpec(max_per_minute=2)

PACING = [
    Case("unlimited-notifies-every-waiting-member",
         paced(0, 3, UNPACED), NOW, ["notify w0,w1,w2", "judge 0 3/0/0/3"]),
    Case("rate-one-at-once", paced(0, 5, TWO_A_MINUTE), at(0), ["notify w0", "judge 0 5/0/0/5"]),
    # A fixed rate banks nothing: half a minute into the rollout with nobody
    # notified yet (a bake, a pause), one device, not a half-minute's worth.
    Case("rate-banks-no-quiet-time",
         paced(0, 5, TWO_A_MINUTE), at(30), ["notify w0", "judge 0 5/0/0/5"]),
    Case("rate-due-now-notifies-one",
         paced(1, 4, TWO_A_MINUTE, paced_until=at(30)), at(30), ["notify w0", "judge 0 5/0/0/5"]),
    Case("rate-counts-those-notified",
         paced(1, 4, TWO_A_MINUTE), at(30), ["notify w0", "judge 0 5/0/0/5"]),
    Case("rate-spent-notifies-nobody",
         paced(2, 3, TWO_A_MINUTE, paced_until=at(45)), at(30), ["judge 0 5/0/0/5"]),
    Case("rate-counts-retries-as-notifications",
         snap(member("a0", attempts=1), members("w", 3), pacing=TWO_A_MINUTE), at(30),
         ["notify a0", "judge 0 4/0/0/4"]),
    Case("ramp-doubles-each-minute",
         paced(0, 5, PacingSpec(ramp_base_per_minute=1, ramp_factor=2)), at(60),
         ["notify w0,w1", "judge 0 5/0/0/5"]),
    Case("stragglers-of-earlier-stages-notified-first",
         snap(member("a0"), member("b0", stage=1), member("c0", stage=1), stages=TWO, current=1,
              pacing=PacingSpec(max_per_minute=60)), at(30),
         ["notify a0,b0", "judge 1 2/0/0/2"]),
]  # fmt: skip


@cases(PACING)
def test_pacing(case: Case) -> None:
    check(case)


BIG = NOTIFY_CHUNK + 1


@pytest.mark.parametrize(
    ("waiting", "per_minute", "notified", "more"),
    [
        (BIG, 0, NOTIFY_CHUNK, True),  # unlimited: a chunk now, the next at once
        (NOTIFY_CHUNK, 0, NOTIFY_CHUNK, False),  # the last chunk
        (BIG, 60 * (NOTIFY_CHUNK + 199), NOTIFY_CHUNK, True),  # the pacing allows more
        (BIG, 60 * (NOTIFY_CHUNK - 1), NOTIFY_CHUNK, False),  # the pacing allows exactly a chunk
        (BIG, 2, 1, False),  # the pacing's turn: wait for the next tick
    ],
    ids=["unlimited", "last-chunk", "paced-above-chunk", "paced-at-chunk", "paced-below"],
)
def test_notify_chunk_caps_a_step_and_asks_for_more(
    waiting: int, per_minute: int, notified: int, more: bool
) -> None:
    # A rate of N a minute allows 1 + N/60 at once (a second early at most).
    p = plan(paced(0, waiting, PacingSpec(max_per_minute=per_minute)), at(60))
    assert len(only(p, Notify).device_ids) == notified
    assert p.more is more


def test_notify_takes_members_as_notified_and_starts_the_pacing_clock() -> None:
    s = snap(member("a0"), member("a1", attempts=1, next_attempt_at=NOW), notify_started_at=None)
    after = apply(s, Notify(("a0", "a1")), NOW)
    assert after.notify_started_at == NOW
    assert [(m.state, m.attempts, m.notified_at, m.next_attempt_at)
            for m in after.members.values()] == [(N, 1, NOW, None), (N, 2, NOW, None)]  # fmt: skip
    assert s.members["a0"].state == W  # copied, not changed in place


# ---------------------------------------------------------------- judging a stage

BAKE = (stage("one", bake_time_s=600), stage("two"))
APPROVAL = (stage("one", require_approval=True), stage("two"))
HALF = (stage("one", success_threshold_percent=50), stage("two"))
NEXT = member("b0", stage=1)
SILENCE = (stage("one", gates=Gates(max_silence_s=60)),)

JUDGING = [
    Case("pending-while-installing", snap(member("a0", N), member("a1", C)), NOW,
         ["judge 0 2/1/0/1"]),
    Case("an-unchanged-judgement-is-not-rewritten",
         snap(member("a0", N), member("a1", C), counts=(2, 1, 0, 1)), NOW, []),
    Case("passed-bakes-and-advances", snap(members("a", 2, C), NEXT, stages=TWO), NOW,
         ["judge 0 2/2/0/0", "bake 0", "advance 0"], more=True),
    Case("passed-starts-baking", snap(members("a", 2, C), NEXT, stages=BAKE), NOW,
         ["judge 0 2/2/0/0", "bake 0"], due=NOW + dt.timedelta(seconds=600)),
    Case("baking", snap(members("a", 2, C), NEXT, stages=BAKE, phase=StagePhase.BAKING,
                        bake_started_at=at(0), counts=(2, 2, 0, 0)), at(599), [], due=at(600)),
    Case("baked-advances", snap(members("a", 2, C), NEXT, stages=BAKE, phase=StagePhase.BAKING,
                                bake_started_at=at(0), counts=(2, 2, 0, 0)), at(600),
         ["advance 0"], more=True),
    Case("passed-waits-for-approval", snap(members("a", 2, C), NEXT, stages=APPROVAL), NOW,
         ["judge 0 2/2/0/0", "bake 0", "approval 0"]),
    Case("success-threshold-met-before-all-finished",
         snap(member("a0", C), member("a1", N), NEXT, stages=HALF), NOW,
         ["judge 0 2/1/0/1", "bake 0", "advance 0"], more=True),
    Case("an-empty-stage-passes", snap(NEXT, stages=TWO), NOW,
         ["judge 0 0/0/0/0", "bake 0", "advance 0"], more=True),
    Case("a-silent-committed-member-counts-failed",
         snap(member("a0", C), stages=SILENCE,
              health=[DeviceHealth("a0", "a", None, None, None, last_report_age_s=120)]), NOW,
         ["judge 0 1/0/1/0", "pause 0"]),
    Case("threshold-failure-pauses", snap(member("a0", C), member("a1", F)), NOW,
         ["judge 0 2/1/1/0", "pause 0"]),
]  # fmt: skip


@cases(JUDGING)
def test_judging_a_stage(case: Case) -> None:
    check(case)


def test_advance_starts_the_next_stage() -> None:
    s = apply(snap(members("a", 1, C), NEXT, stages=TWO), Advance(0), NOW)
    assert (s.state, s.current_stage, s.reason) == (R.RUNNING, 1, "")
    assert [st.phase for st in s.stages] == [StagePhase.PASSED, StagePhase.ROLLING]
    assert s.stages[1].started_at == NOW


def test_a_pause_says_which_stage_failed_and_why() -> None:
    p = plan(snap(member("a0", C), member("a1", F)), NOW)
    reason = "stage 1 (one): 1 of 2 finished devices failed (50% > 0% error threshold)"
    assert only(p, Pause).reason == reason
    s = apply(snap(member("a0", C), member("a1", F)), only(p, Pause), NOW)
    assert (s.state, s.reason, s.stages[0].phase) == (R.PAUSED, reason, StagePhase.FAILED)


# ---------------------------------------------------------------- acknowledged and skipped

ACKED_OUT = (stage("one", error_threshold_percent=40), stage("two"))

ACKNOWLEDGED = [
    Case("acknowledged-failure-leaves-the-denominator",
         snap(member("a0", F, acknowledged=True), members("c", 2, C), NEXT, stages=TWO), NOW,
         ["judge 0 3/2/1/0", "bake 0", "advance 0"], more=True),
    Case("unacknowledged-failure-fails-the-stage",
         snap(member("a0", F), members("c", 2, C), NEXT, stages=TWO), NOW,
         ["judge 0 3/2/1/0", "pause 0"]),
    # 1 failed of 3 finished is under 40%; of the 1 finished since the
    # resume (the 2 committed were acknowledged) it is 100%.
    Case("error-rate-of-all-finished-under-threshold",
         snap(members("c", 2, C), member("f0", F), member("i0", IP), NEXT, stages=ACKED_OUT), NOW,
         ["judge 0 4/2/1/1"]),
    Case("error-rate-counts-only-what-finished-since-resume",
         snap(members("c", 2, C, acknowledged=True), member("f0", F), member("i0", IP), NEXT,
              stages=ACKED_OUT), NOW,
         ["judge 0 4/2/1/1", "pause 0"]),
    Case("skipped-leave-the-denominator",
         snap(member("a0", SK), member("a1", C), NEXT, stages=TWO), NOW,
         ["judge 0 1/1/0/0", "bake 0", "advance 0"], more=True),
]  # fmt: skip


@cases(ACKNOWLEDGED)
def test_acknowledged_and_skipped_members(case: Case) -> None:
    check(case)


def test_the_error_rate_since_resume_says_so() -> None:
    p = plan(ACKNOWLEDGED[3].snapshot, NOW)
    assert "1 of 1 newly finished devices failed since resume" in only(p, Pause).reason


# ---------------------------------------------------------------- abort, revert, drop a class

ABORTING = (stage("one", on_failure=ABORT_REVERT), stage("two"))
LIMITS = {"pi": ClassLimits(None, max_memory_mb=10), "gw": ClassLimits(None, max_memory_mb=100)}


def memory_gate(on_failure: str, *classes: str) -> Snapshot:
    """Stage 1 has one committed member per class, stage 2 one waiting; the
    pi's model takes 50 MB of its 10."""
    stages = (stage("one", gates=Gates(memory_limit_factor=1.0), on_failure=on_failure),
              stage("two"))  # fmt: skip
    return snap(
        [member(f"{c}0", C, class_name=c) for c in classes],
        [member(f"{c}1", class_name=c, stage=1) for c in classes],
        stages=stages, limits=LIMITS,
        health=[DeviceHealth(f"{c}0", c, None, None, None, 1.0, model_memory_mb=50 if c == "pi"
                             else 5) for c in classes],
    )  # fmt: skip


FAILING = [
    Case("abort-drops-the-waiting-and-reverts-committed-first",
         snap(member("a0", IP), member("a1", C), member("a2", F), NEXT, stages=ABORTING), NOW,
         ["judge 0 3/1/1/1", "abort 0", "set b0=dropped", "revert a1,a0"]),
    Case("gate-failing-on-one-class-drops-it",
         memory_gate(ABORT_REVERT, "gw", "pi"), NOW,
         ["judge 0 2/2/0/0", "drop pi", "set pi1=dropped", "revert pi0"]),
    Case("gate-failing-on-every-class-aborts",
         memory_gate(ABORT_REVERT, "pi"), NOW,
         ["judge 0 1/1/0/0", "abort 0", "set pi1=dropped", "revert pi0"]),
    Case("gate-failing-on-one-class-with-pause-pauses",
         memory_gate("pause", "gw", "pi"), NOW, ["judge 0 2/2/0/0", "pause 0"]),
    Case("threshold-failure-with-two-classes-aborts-all",
         snap(member("a0", C), member("b0", F, class_name="b"), stages=ABORTING), NOW,
         ["judge 0 2/1/1/0", "abort 0", "revert a0"]),
]  # fmt: skip


@cases(FAILING)
def test_failing_stages_pause_abort_or_drop(case: Case) -> None:
    check(case)


def test_a_dropped_class_is_reverted_saying_why_and_named_at_the_finish() -> None:
    p = plan(memory_gate(ABORT_REVERT, "gw", "pi"), NOW)
    why = only(p, DropClasses).reason
    assert why.startswith("health gate failed: memory failing on 1 of 2 devices (pi0)")
    assert only(p, Revert).items == (("pi0", f"class pi dropped: {why}"),)
    (dropped,) = only(p, SetMembers).members
    assert dropped.reason == f"class pi dropped: {why}; never notified"
    # Later, every stage passed and the pi put back: it says so, and a
    # class that failed a gate is a failure of the version there.
    done = snap(
        member("gw0", C, class_name="gw"), member("gw1", C, class_name="gw", stage=1),
        member("pi0", RVD, class_name="pi", reason=f"class pi dropped: {why}"), dropped,
        stages=TWO, current=1, phase=StagePhase.PASSED,
    )  # fmt: skip
    assert only(plan(done, NOW), Finish) == Finish(
        R.SUCCEEDED_WITH_FAILURES, "all 2 stages passed; 2 committed; dropped and reverted: pi"
    )
    # A revert that failed is its own state, and the finish counts it.
    assert dropped.state is DR
    failed_back = replace(done.members["pi0"], state=RVF, reason="revert failed: disk full")
    done = replace(done, members={**done.members, "pi0": failed_back})
    assert only(plan(done, NOW), Finish).reason == (
        "all 2 stages passed; 2 committed; dropped and reverted: pi; 1 revert failed"
    )


def test_reverts_go_in_chunks_committed_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollout_plan, "NOTIFY_CHUNK", 2)
    s = snap(member("a0", IP), member("a1", N), member("a2", C), member("a3", C),
             state=R.ABORTED, abort_mode=REVERT)  # fmt: skip
    first = plan(s, NOW)
    assert (summaries(first), first.more) == (["revert a2,a3"], True)
    for action in first.actions:
        s = apply(s, action, NOW)
    second = plan(s, NOW)
    assert (summaries(second), second.more) == (["revert a0,a1"], False)


# ---------------------------------------------------------------- finishing

PASSED = StagePhase.PASSED
ONE_A_MINUTE = PacingSpec(max_per_minute=1)

FINISHING = [
    # The field bug: the last stage's threshold met with a member never
    # notified (paced out) must not finish the rollout.
    Case("last-stage-passed-with-a-waiting-member-advances-without-finishing",
         snap(member("a0", C), member("a1"), stages=(stage("one", success_threshold_percent=50),),
              pacing=ONE_A_MINUTE, paced_until=at(40)), NOW,
         ["judge 0 2/1/0/1", "bake 0", "advance 0"]),
    Case("stages-passed-the-waiting-member-is-notified",
         snap(member("a0", C), member("a1"), phase=PASSED, pacing=ONE_A_MINUTE), at(60),
         ["notify a1"]),
    Case("stages-passed-an-installing-member-holds-the-finish",
         snap(member("a0", C), member("a1", IP), phase=PASSED), NOW, []),
    Case("stages-passed-a-backing-off-member-holds-the-finish",
         snap(member("a0", C), member("a1", IP), phase=PASSED, pacing=RETRY_ONCE,
              reports=rep(a1="failed")), NOW, ["set a1=waiting"]),
    Case("an-earlier-stage-straggler-holds-the-finish",
         snap(member("a0", attempts=1, next_attempt_at=at(100)), member("b0", C, stage=1),
              stages=TWO, current=1), NOW,
         ["judge 1 1/1/0/0", "bake 1", "advance 1"]),
    Case("last-report-finishes", snap(member("a0", C), member("a1", N), phase=PASSED,
                                      reports=rep(a1="committed")), NOW,
         ["set a1=committed", "finish succeeded"]),
    Case("last-stage-passes-and-finishes-in-one-step", snap(members("a", 2, C)), NOW,
         ["judge 0 2/2/0/0", "bake 0", "advance 0", "finish succeeded"]),
    Case("approval-is-not-asked-after-the-last-stage",
         snap(members("a", 2, C), stages=(stage("one", require_approval=True),)), NOW,
         ["judge 0 2/2/0/0", "bake 0", "advance 0", "finish succeeded"]),
    Case("finished-with-failures",
         snap(member("a0", C), member("a1", F), member("a2", TO), member("a3", SK),
              phase=PASSED), NOW, ["finish succeeded_with_failures"]),
]  # fmt: skip


@cases(FINISHING)
def test_finishing(case: Case) -> None:
    check(case)


@pytest.mark.parametrize(
    ("states", "finish"),
    [
        ((C, C), Finish(R.SUCCEEDED, "all 1 stage passed; 2 committed")),
        ((C, SK), Finish(R.SUCCEEDED, "all 1 stage passed; 1 committed; 1 skipped")),
        ((C, F, TO, SK), Finish(
            R.SUCCEEDED_WITH_FAILURES, "all 1 stage passed; 1 committed; 2 failed; 1 skipped"
        )),
        ((F,), Finish(R.SUCCEEDED_WITH_FAILURES, "all 1 stage passed; 0 committed; 1 failed")),
    ],
    ids=["all-committed", "skipped", "failed-and-skipped", "all-failed"],
)  # fmt: skip
def test_the_finish_counts_what_happened(states: tuple[MemberState, ...], finish: Finish) -> None:
    ms = [member(f"a{i}", state) for i, state in enumerate(states)]
    assert plan(snap(ms, phase=PASSED), NOW).actions == (finish,)


# ---------------------------------------------------------------- aborted, paused, not started

ABORTED: dict[str, Any] = dict(state=R.ABORTED, abort_mode=REVERT)

NOT_RUNNING = [
    Case("aborted-keeping-the-version-is-done",
         snap(member("a0", C), member("a1", N), state=R.ABORTED, abort_mode=KEEP), NOW,
         ["revert done"]),
    Case("aborted-with-nothing-to-revert-is-done",
         snap(member("a0", F), member("a1", RVD), **ABORTED), NOW, ["revert done"]),
    Case("aborted-waits-for-its-reverts", snap(member("a0", RVG), **ABORTED), NOW, []),
    Case("aborted-revert-reported", snap(member("a0", RVG), reports=rep(a0="committed"),
                                         **ABORTED), NOW, ["set a0=reverted", "revert done"]),
    Case("aborted-revert-failed-is-done-too",
         snap(member("a0", RVG), reports=rep(a0="failed"), **ABORTED), NOW,
         ["set a0=revert_failed", "revert done"]),
    Case("aborted-a-silent-revert-waits-for-the-device-timeout",
         snap(member("a0", RVG), pacing=PacingSpec(device_timeout_s=60), **ABORTED), at(59),
         []),
    Case("aborted-a-silent-revert-settles-after-the-device-timeout",
         snap(member("a0", RVG), pacing=PacingSpec(device_timeout_s=60), **ABORTED), at(61),
         ["set a0=reverted", "revert done"]),
    Case("aborted-a-silent-revert-settles-after-an-hour-without-a-device-timeout",
         snap(member("a0", RVG), **ABORTED), at(3601), ["set a0=reverted", "revert done"]),
    Case("aborted-a-late-commit-is-reverted",
         snap(member("a0", N), reports=rep(a0="committed"), **ABORTED), NOW,
         ["set a0=committed", "revert a0"]),
    Case("aborted-never-notified-dropped-not-notified",
         snap(member("a0"), **ABORTED), NOW, ["set a0=dropped", "revert done"]),
    Case("finished-does-nothing",
         snap(member("a0", C), member("a1"), finished_at=T0), NOW, []),
    Case("paused-follows-reports-only",
         snap(member("a0", N), member("a1"), state=R.PAUSED, reports=rep(a0="committed")), NOW,
         ["set a0=committed"]),
    Case("paused-notifies-and-judges-nothing",
         snap(member("a0"), members("c", 2, C), state=R.PAUSED), NOW, []),
    Case("waiting-approval-follows-reports-only",
         snap(member("a0", N), NEXT, stages=APPROVAL, state=R.WAITING_APPROVAL,
              phase=StagePhase.WAITING_APPROVAL, reports=rep(a0="failed")), NOW,
         ["set a0=failed"]),
    Case("draft-does-nothing", snap(member("a0"), state=R.DRAFT), NOW, []),
]  # fmt: skip


@cases(NOT_RUNNING)
def test_aborted_paused_and_not_started_rollouts(case: Case) -> None:
    check(case)


def test_a_revert_reported_keeps_why_it_was_reverted() -> None:
    s = snap(member("a0", RVG, reason="class pi dropped: reverting to v1"),
             member("a1", RVG), reports={"a1": Report("failed", "disk full"),
                                         "a0": Report("committed")}, **ABORTED)  # fmt: skip
    reasons = {m.device_id: m.reason for m in only(plan(s, NOW), SetMembers).members}
    assert reasons == {"a0": "class pi dropped: reverted to v1", "a1": "revert failed: disk full"}


# ---------------------------------------------------------------- dynamic rollouts, shadow stages

DYNAMIC = [
    Case("a-newcomer-joins-the-current-stage",
         snap(member("a0", C), member("b0", N, stage=1), stages=TWO, current=1, dynamic=True,
              newcomers=[member("n0")]), NOW,
         ["admit n0@1", "notify n0", "judge 1 2/0/0/2"]),
    Case("a-known-device-is-not-admitted-again",
         snap(member("b0", N), dynamic=True, newcomers=[member("b0")]), NOW, ["judge 0 1/0/0/1"]),
    Case("a-static-rollout-admits-nobody",
         snap(member("b0", N), newcomers=[member("n0")]), NOW, ["judge 0 1/0/0/1"]),
    Case("a-paused-rollout-admits-nobody",
         snap(member("b0", N), state=R.PAUSED, dynamic=True, newcomers=[member("n0")]), NOW, []),
]  # fmt: skip


@cases(DYNAMIC)
def test_dynamic_newcomers(case: Case) -> None:
    check(case)


SHADOW = (stage("shadow", shadow=True, min_agreement=0.9), stage("real"))


def shadowed(state: MemberState, agreement: tuple[float, int] | None) -> Snapshot:
    return snap(members("a", 2, state), NEXT, stages=SHADOW, agreement=agreement)


SHADOWING = [
    Case("shadow-members-load-it-beside", shadowed(W, None), NOW,
         ["notify a0,a1 shadow", "judge 0 2/0/0/2"]),
    Case("shadow-waits-for-mirrored-requests", shadowed(C, None), NOW, ["judge 0 2/2/0/0"]),
    Case("shadow-with-none-mirrored-yet-waits", shadowed(C, (1.0, 0)), NOW, ["judge 0 2/2/0/0"]),
    Case("shadow-under-min-agreement-fails", shadowed(C, (0.8, 100)), NOW,
         ["judge 0 2/2/0/0", "pause 0"]),
    Case("shadow-agreeing-passes", shadowed(C, (0.95, 100)), NOW,
         ["judge 0 2/2/0/0", "bake 0", "advance 0"], more=True),
]  # fmt: skip


@cases(SHADOWING)
def test_shadow_stages(case: Case) -> None:
    check(case)


def test_shadow_failure_says_the_agreement_and_members_rejoin_after_a_pass() -> None:
    failed = only(plan(shadowed(C, (0.8, 100)), NOW), Pause)
    assert failed.reason == (
        "stage 1 (shadow): shadow agreement 0.800 over 100 mirrored requests is below the "
        "stage's minimum 0.9"
    )
    s = shadowed(C, (0.95, 100))
    for action in plan(s, NOW).actions:
        s = apply(s, action, NOW)
    assert s.current_stage == 1
    assert {(m.device_id, m.stage, m.state, m.attempts) for m in s.members.values()} == {
        ("a0", 1, W, 0), ("a1", 1, W, 0), ("b0", 1, W, 0),
    }  # fmt: skip
    # The next step gives them the version for real (not beside).
    assert summaries(plan(replace(s, agreement=None), NOW))[0] == "notify a0,a1,b0"


def test_plan_is_pure() -> None:
    s = memory_gate(ABORT_REVERT, "gw", "pi")
    before = {i: replace(m) for i, m in s.members.items()}
    assert plan(s, NOW) == plan(s, NOW)
    assert dict(s.members) == before and s.state is R.RUNNING


# ---------------------------------------------------------------- whole rollouts, crashed anywhere

AGENT_REPORTS = {
    "commit": Report("committed"),
    "fail": Report("failed", "bad hash"),
    "hang": Report("downloading"),
}


@dataclass(frozen=True)
class World:
    """The agents and telemetry, as pure functions of the snapshot and the
    time (so a restarted orchestrator reads what the crashed one would
    have): an agent reports, from the step after its assignment on, what
    `outcomes` says for that attempt (commit when it says nothing); reverts
    always succeed."""

    outcomes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    model_memory_mb: Mapping[str, float] = field(default_factory=dict)  # by class
    agreement: tuple[float, int] | None = None
    newcomers: tuple[Member, ...] = ()
    newcomers_from: dt.datetime = T0

    def observe(self, s: Snapshot, now: dt.datetime) -> Snapshot:
        reports = {}
        for m in s.members.values():
            if m.notified_at is None or m.notified_at >= now:
                continue  # no agent answers within the instant it was assigned
            if m.state == RVG:
                reports[m.device_id] = Report("committed")
            elif m.state in FOLLOWED_STATES:
                planned = self.outcomes.get(m.device_id, ())
                outcome = planned[m.attempts - 1] if m.attempts <= len(planned) else "commit"
                reports[m.device_id] = AGENT_REPORTS[outcome]
        health = [
            DeviceHealth(m.device_id, m.class_name, None, None, None, 1.0,
                         model_memory_mb=self.model_memory_mb.get(m.class_name))
            for m in s.members.values() if m.state == C and m.stage == s.current_stage
            and m.finished_at is not None and m.finished_at < now  # telemetry after the commit
        ]  # fmt: skip
        return replace(
            s, reports=reports, health=health, agreement=self.agreement,
            newcomers=self.newcomers if now >= self.newcomers_from else (),
        )  # fmt: skip


def execute(s: Snapshot, action: Action, now: dt.datetime) -> Snapshot:
    """What the orchestrator does with an action, less the database: apply,
    and give each new assignment (notify or revert) its next sequence."""
    s = apply(s, action, now)
    if isinstance(action, Notify | Revert):
        ids = action.device_ids if isinstance(action, Notify) else [i for i, _ in action.items]
        s = replace(s, members={**s.members, **{
            i: replace(s.members[i], sequence=s.members[i].sequence + 1) for i in ids
        }})  # fmt: skip
    return s


def settled(s: Snapshot) -> bool:
    """Nothing more will happen without an operator."""
    if s.finished_at is not None:
        return True
    quiet = not any(m.state in FOLLOWED_STATES for m in s.members.values())
    return s.state in (R.PAUSED, R.WAITING_APPROVAL) and quiet


@dataclass
class Run:
    final: Snapshot
    steps: list[tuple[Action, ...]]  # each step's plan, as planned
    notified: Counter[str]  # Notify actions applied, per device


STEP_S = 10
MAX_STEPS = 200


def run(s: Snapshot, world: World, crash: tuple[int, int] | None = None) -> Run:
    """Steps until settled, `now` STEP_S seconds further each step (but
    for a step that asked for more). With
    `crash` (step, k), that step applies its first k actions only and the
    next plan, from what they left, comes at the same instant (a restart)."""
    now, notified = T0, Counter[str]()
    steps: list[tuple[Action, ...]] = []
    for index in range(MAX_STEPS):
        if settled(s):
            return Run(s, steps, notified)
        s = world.observe(s, now)
        p = plan(s, now)
        steps.append(p.actions)
        crashed = crash is not None and crash[0] == index
        for action in p.actions[: crash[1]] if crash is not None and crashed else p.actions:
            if isinstance(action, Notify):
                notified.update(action.device_ids)
            s = execute(s, action, now)
        # The next chunk the pacing allows (p.more) follows at once, as
        # does the restart.
        if not crashed and not p.more:
            now += dt.timedelta(seconds=STEP_S)
    raise AssertionError(f"no end after {MAX_STEPS} steps: {s.state}, {s.reason}")


def outcome(r: Run) -> tuple[Any, ...]:
    s = r.final
    return (
        s.state, s.reason, s.finished_at, s.current_stage, [st.phase for st in s.stages],
        {i: (m.state, m.stage, m.attempts, m.reason) for i, m in sorted(s.members.items())},
    )  # fmt: skip


class Scenario(NamedTuple):
    id: str
    snapshot: Snapshot
    world: World
    final: RolloutState
    members: dict[MemberState, int]  # members per final state
    # Actions that must happen, in this order (summaries): what it is about.
    moments: tuple[str, ...]
    notify_chunk: int = NOTIFY_CHUNK


def _in_classes(ms: list[Member], class_name: str, stage: int = 0) -> list[Member]:
    return [replace(m, class_name=class_name, stage=stage) for m in ms]


SCENARIOS = [
    Scenario(
        "scheduled-paced-three-stages-with-a-newcomer",
        snap(members("a", 2), _in_classes(members("b", 3), "b", 1), members("c", 5, stage=2),
             stages=(stage("one", bake_time_s=20), stage("two"), stage("three")),
             pacing=PacingSpec(max_per_minute=6), dynamic=True, state=R.SCHEDULED,
             start_at=at(20)),
        World(newcomers=(member("n0"),), newcomers_from=at(50)),
        R.SUCCEEDED, {C: 11},
        # Nothing before its start time; paced one a step; the newcomer
        # joins the baking stage.
        ("begin", "notify a0", "notify a1", "bake 0", "admit n0@0", "notify n0", "advance 0",
         "advance 1", "notify c2", "notify c3", "notify c4", "finish succeeded"),
    ),
    Scenario(
        "retries-timeouts-and-failures-below-the-thresholds",
        snap(members("a", 6), stages=(stage("one", success_threshold_percent=50,
                                            error_threshold_percent=50),),
             pacing=PacingSpec(device_timeout_s=30, device_retries=1)),
        World(outcomes={"a0": ("fail", "commit"), "a1": ("hang", "hang"), "a2": ("fail", "fail")}),
        R.SUCCEEDED_WITH_FAILURES, {C: 4, TO: 1, F: 1},
        ("set a0=waiting,a1=in_progress,a2=waiting,a3=committed,a4=committed,a5=committed",
         "advance 0", "set a1=waiting", "notify a0,a2", "set a0=committed,a2=failed", "notify a1",
         "set a1=timed_out", "finish succeeded_with_failures"),
    ),
    Scenario(
        "abort-and-revert-in-chunks",
        snap(members("a", 4), members("b", 5, stage=1),
             stages=(stage("one"), stage("two", on_failure=ABORT_REVERT), stage("three")),
             pacing=PacingSpec(device_retries=1)),
        World(outcomes={"b0": ("fail", "fail")}),
        R.ABORTED, {RVD: 8, F: 1},
        # Notified and reverted two a step, those running the version first.
        ("notify a0,a1", "notify a2,a3", "advance 0", "notify b0,b1", "notify b2,b3", "notify b4",
         "set b0=waiting,b1=committed,b2=committed,b3=committed,b4=committed", "notify b0",
         "set b0=failed", "abort 1",
         "revert a0,a1", "revert a2,a3", "revert b1,b2", "revert b3,b4", "revert done"),
        notify_chunk=2,
    ),
    Scenario(
        "a-class-over-its-memory-is-dropped",
        snap(member("gw0", class_name="gw"), member("pi0", class_name="pi"),
             [member(f"{c}1", class_name=c, stage=1) for c in ("gw", "pi")],
             member("gw2", class_name="gw", stage=1),
             # A bake: telemetry comes after the commit.
             stages=(stage("one", gates=Gates(memory_limit_factor=1.0), on_failure=ABORT_REVERT,
                           bake_time_s=30), stage("two")), limits=LIMITS),
        World(model_memory_mb={"pi": 50, "gw": 5}),
        R.SUCCEEDED_WITH_FAILURES, {C: 3, RVD: 1, DR: 1},
        ("bake 0", "drop pi", "set pi1=dropped", "revert pi0", "set pi0=reverted", "advance 0",
         "notify gw1,gw2", "finish succeeded_with_failures"),
    ),
    Scenario(
        "shadow-then-for-real",
        snap(members("a", 2), members("b", 2, stage=1), stages=SHADOW),
        World(agreement=(0.97, 120)),
        R.SUCCEEDED, {C: 4},
        ("notify a0,a1 shadow", "advance 0", "notify a0,a1,b0,b1", "finish succeeded"),
    ),
    Scenario(
        "a-failing-stage-pauses-and-its-members-still-finish",
        snap(members("a", 2), members("b", 3, stage=1), stages=TWO,
             pacing=PacingSpec(device_timeout_s=25)),
        World(outcomes={"b0": ("fail",), "b2": ("hang",)}),
        R.PAUSED, {C: 3, F: 1, TO: 1},
        ("advance 0", "set b0=failed,b1=committed,b2=in_progress", "pause 1", "set b2=timed_out"),
    ),
]  # fmt: skip


def _scenario(s: Scenario, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setattr(rollout_plan, "NOTIFY_CHUNK", s.notify_chunk)
    return run(s.snapshot, s.world)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_a_rollout_runs_to_its_end(scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    r = _scenario(scenario, monkeypatch)
    assert r.final.state is scenario.final, r.final.reason
    assert Counter(m.state for m in r.final.members.values()) == scenario.members
    happened = iter(summary(a) for step in r.steps for a in step)
    for moment in scenario.moments:
        assert moment in happened, f"no {moment!r} (or not in this order)"
    # Notified once per attempt, a shadow stage's members once more (the
    # version beside the active one, then for real, attempts afresh).
    first = scenario.snapshot
    shadowed = {i for i, m in first.members.items() if first.spec.stages[m.stage].shadow}
    assert r.notified == Counter(
        {i: m.attempts + (i in shadowed) for i, m in r.final.members.items() if m.attempts}
    )


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_a_restart_between_any_two_actions_ends_the_same(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _scenario(scenario, monkeypatch)
    points = [(i, k) for i, step in enumerate(whole.steps) for k in range(len(step))]
    assert len(points) > 10
    for point in points:
        crashed = run(scenario.snapshot, scenario.world, crash=point)
        assert outcome(crashed) == outcome(whole), f"crashed at step {point[0]} after {point[1]}"
        # Nobody notified again for the crash.
        assert crashed.notified == whole.notified, f"crashed at step {point[0]} after {point[1]}"


def test_the_table_ids_are_unique() -> None:
    tables = [SCHEDULING, FOLLOWING, PACING, JUDGING, ACKNOWLEDGED, FAILING, FINISHING,
              NOT_RUNNING, DYNAMIC, SHADOWING]  # fmt: skip
    ids = [c.id for c in itertools.chain.from_iterable(tables)]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- found by this file


def test_a_stage_failing_now_notifies_nobody_more() -> None:
    """Notifying before judging gave two waiting members the version and
    reverted them in the same step."""
    failing = snap(
        member("a0", C), member("a1", N, sequence=1), members("w", 2),
        stages=(stage("one", on_failure=ABORT_REVERT),), reports=rep(a1="failed"),
    )  # fmt: skip
    actions = [summary(a) for a in plan(failing, NOW).actions]
    assert not any(a.startswith("notify") for a in actions), actions
    assert any(a.startswith("abort") for a in actions), actions
    paused = snap(
        member("a0", C), member("a1", N, sequence=1), members("w", 2), reports=rep(a1="failed")
    )
    actions = [summary(a) for a in plan(paused, NOW).actions]
    assert not any(a.startswith("notify") for a in actions), actions
    assert any(a.startswith("pause") for a in actions), actions


def test_a_dynamic_rollout_does_not_take_back_a_dropped_class() -> None:
    dropped = snap(
        member("gw0", C, class_name="gw"), member("gw1", N, class_name="gw", sequence=1),
        member("pi0", MemberState.REVERTED, class_name="pi", reason="class pi dropped: memory"),
        stages=TWO, current=1, dynamic=True,
        newcomers=[member("pi9", class_name="pi"), member("gw9", class_name="gw")],
    )  # fmt: skip
    (admitted,) = [a for a in plan(dropped, NOW).actions if isinstance(a, Admit)]
    assert [m.device_id for m in admitted.members] == ["gw9"]


def test_a_silent_revert_says_it_is_unconfirmed() -> None:
    """The member settles as reverted (the rollout can finish reverting),
    and its reason says the device has not confirmed it."""
    s = snap(member("a0", RVG, reason="reverting to 1.0.0"),
             pacing=PacingSpec(device_timeout_s=60), **ABORTED)  # fmt: skip
    p = plan(s, at(61))
    settled = apply(s, p.actions[0], at(61)).members["a0"]
    assert settled.state is RVD
    assert settled.reason == (
        "assigned back to 1.0.0; not confirmed within 60 s (the device takes it when it "
        "next connects)"
    )
