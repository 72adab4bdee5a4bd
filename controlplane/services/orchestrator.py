"""The rollout orchestrator: a reconcile loop over persisted state.

Every tick (default 0.5 s; after a long tick longer, so that ticks take at
most a quarter of the time outside notify bursts) each replica looks at the
rollouts that need work and, for each, tries to take its lease (or renew it,
once half of it is used up): one conditional UPDATE that succeeds only when
the lease is free, expired or already ours. Only the
lease holder drives a rollout, so with several replicas on PostgreSQL exactly
one drives each rollout at a time, and another takes over when the holder
stops renewing (it died). A driving step is one transaction that reads the
rollout and its devices, decides, and writes the decisions together with the
assignments they imply: a replica killed mid-step leaves nothing half done,
and a step repeated after a crash finds its work already recorded (a device
is notified once: its row says `notified` in the same commit as its
assignment). While a replica's lease is unbroken it keeps its copy of the
devices' rows between steps instead of reading them again (only the lease
holder writes them).

One step, in order:
1. scheduled rollouts whose start time came begin;
2. device states follow what the agents reported for the rollout's
   assignment sequence; devices past their timeout, and failed ones, are
   retried with backoff while retries remain, else count as timed out/failed;
3. an aborted rollout with "revert" assigns every device that took the new
   version its previous one (at most NOTIFY_CHUNK per step, those running
   it first; the next step follows at once), and finishes once they all
   report back;
4. dynamic rollouts admit devices that started matching;
5. waiting devices of the current (and earlier) stages are notified, as
   many as the pacing allows, at most NOTIFY_CHUNK per step (the next
   step follows at once);
6. the current stage is judged: thresholds (domain/rollouts.judge_stage) and
   health gates over the new version's telemetry from the stage's devices
   (silence counts as failure); failure pauses or aborts and reverts, success
   bakes for the stage's bake time, then waits for approval or moves on.
Every transition is written to the audit log (actor "orchestrator") and
published as a "rollout.updated" event."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, TypeVar

from sqlalchemy import Float, Select, cast, func, or_, select, update
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.bulk import insert_rows, update_rows
from edgefleet.controlplane.db.models import (
    ArtifactRow,
    DeviceClassRow,
    DeviceRow,
    ModelVersionRow,
    RolloutDeviceRow,
    RolloutRow,
    TelemetryRow,
    utcnow,
)
from edgefleet.controlplane.db.uow import Database, UnitOfWork
from edgefleet.controlplane.domain.rollout_spec import ABORT_REVERT, RolloutSpec, StageSpec
from edgefleet.controlplane.domain.rollouts import (
    Acknowledged,
    ClassLimits,
    DeviceHealth,
    GateResult,
    StageCounts,
    Verdict,
    describe,
    device_timed_out,
    evaluate_gates,
    judge_stage,
    late_stage,
    notify_allowance,
    retry_delay_s,
    should_retry,
)
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.deployments import (
    assign_devices,
    revert_targets,
    unassign_devices,
)
from edgefleet.controlplane.services.devices import EventSink
from edgefleet.controlplane.services.events import FleetEvent
from edgefleet.controlplane.services.rollouts import (
    ABORTED,
    ACTIVE,
    COMMITTED,
    FAILED,
    FAILED_STATES,
    IN_PROGRESS,
    KEEP,
    NOTIFIED,
    PAUSED,
    REJECTED,
    REVERT,
    REVERTED,
    REVERTING,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    TIMED_OUT,
    WAITING,
    WAITING_APPROVAL,
    abort,
    active_rollout_of,
    advance_stage,
    cohort_exclusion,
    matching_devices,
    unfinished_abort,
)
from edgefleet.controlplane.services.telemetry import ROW_COUNT_CAP, at_most, float_sum

log = logging.getLogger(__name__)

ACTOR = "orchestrator"


# Agent update states that mean "still working on it".
def _model_status(statuses: dict[str, Any] | None, model_name: str) -> dict[str, Any]:
    """A device's stored status of one model (devices.update_status is keyed
    by model name); {} when it reported none."""
    status = (statuses or {}).get(model_name)
    return status if isinstance(status, dict) else {}


_WORKING = {"downloading", "verifying", "validating", "activating", "rolling_back"}
# Member states whose agents' reports a step follows.
_FOLLOWED = (NOTIFIED, IN_PROGRESS, REVERTING)
_S = TypeVar("_S", bound=Select[*tuple[Any, ...]])


@dataclass
class Step:
    """What one step changed: devices whose desired state must be pushed,
    and whether the rollout changed at all."""

    pushed: list[str] = field(default_factory=list)
    changed: bool = False
    # Work left that the pacing already allows (the next notify chunk).
    more: bool = False


# Devices notified per transaction: a stage of thousands is assigned in
# chunks, each committed (and pushed) before the next, so agents start
# installing after the first chunk and SQLite's write lock is never held
# for long. The next chunk follows at once, not a tick later.
NOTIFY_CHUNK = 1000
# The most of the wall time the orchestrator's ticks may take (see
# Orchestrator.pause_after).
MAX_BUSY_SHARE = 0.25

_MEMBER_FIELDS = (
    "device_id", "class_name", "stage", "state", "reason", "attempts", "sequence",
    "notified_at", "finished_at", "next_attempt_at", "previous_model_version_id",
)  # fmt: skip
_member_values = attrgetter(*_MEMBER_FIELDS)


@dataclass
class Member:
    """One device's part in a rollout, as a step sees it: a plain copy of
    its RolloutDeviceRow (read with one Core query; ORM objects for 10,000
    rows cost a third of a second per tick), written back only if changed."""

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

    def values(self) -> tuple[object, ...]:
        # attrgetter builds the tuple in C: a step compares every member's
        # values twice, and for 10,000 members the getattr loop was 9 ms a
        # pass, this 2.8 ms.
        return _member_values(self)


def revert_order(d: Member) -> tuple[bool, int, str]:
    """The order a revert takes devices in: those running the version
    first, then those still installing it; by stage and id within."""
    return (d.state != COMMITTED, d.stage, d.device_id)


def _iso(value: dt.datetime) -> str:
    return value.isoformat()


def _parse(value: object) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else None


class Orchestrator:
    def __init__(
        self,
        db: Database,
        events: EventSink,
        *,
        owner: str,
        offline_after_s: float,
        lease_s: float = 10.0,
        tick_s: float = 0.5,
        clock: Callable[[], dt.datetime] = utcnow,
        on_tick: Callable[[float], None] = lambda _busy_s: None,
    ) -> None:
        self._db = db
        self._events = events
        self.owner = owner
        self._offline_after = dt.timedelta(seconds=offline_after_s)
        self._lease = dt.timedelta(seconds=lease_s)
        self.tick_s = tick_s
        self._clock = clock
        # Told each tick's wall time (the server exports it as a metric).
        self._on_tick = on_tick
        # What this replica knows of the rollouts it drives: the members as
        # its last committed step left them, and the lease expiry it last
        # wrote. Only the lease holder writes members, so while the lease
        # never left us (an unbroken chain of renewals, see _take_lease) the
        # copy is exact and a step need not reload 10,000 rows.
        self._members: dict[str, list[Member]] = {}
        self._lease_marks: dict[str, dt.datetime] = {}

    async def run(self, executor: Executor) -> None:
        """Tick until cancelled; a failing tick is logged, not fatal."""
        loop = asyncio.get_running_loop()
        while True:
            more = False
            started = loop.time()
            try:
                more = await loop.run_in_executor(executor, self.tick)
            except Exception:
                log.exception("rollout orchestrator tick failed")
            busy = loop.time() - started
            self._on_tick(busy)
            await asyncio.sleep(self.pause_after(busy, more))

    def pause_after(self, busy_s: float, more: bool) -> float:
        """How long to wait after a tick that took `busy_s`. Not at all
        when a step has more to do at once, a next chunk of notifications
        or reverts (spacing those out would slow the notification rate that
        bench_rollout holds to 10,000/min). Else tick_s, and at least long
        enough that ticks take no more than MAX_BUSY_SHARE of the time: a
        10,000-device rollout's step reads and compares every member inside
        a write transaction, and back to back its steps took 41 % of a
        soak's wall time, holding SQLite's writer and the interpreter the
        device streams need, only to notice reports a fraction of a second
        sooner."""
        if more:
            return 0.0
        return max(self.tick_s, busy_s * (1.0 - MAX_BUSY_SHARE) / MAX_BUSY_SHARE)

    def tick(self) -> bool:
        """Drive every rollout that needs work and whose lease we get; True
        if one has more to do right away."""
        with self._db.unit_of_work(readonly=True) as uow:
            ids = list(uow.session.scalars(
                select(RolloutRow.id)
                .where(RolloutRow.state.in_(ACTIVE) | unfinished_abort())
                .order_by(RolloutRow.created_at)
            ))  # fmt: skip
        self._forget_all_but(ids)
        more = False
        for rollout_id in ids:
            if self._take_lease(rollout_id):
                more = self.drive(rollout_id).more or more
        return more

    def _forget_all_but(self, ids: Iterable[str]) -> None:
        """Drop the copies and lease marks of rollouts that need no more
        work. drive() drops the members of a rollout it finishes, but one
        an operator finishes (aborted without revert) is never driven
        again, and no step drops a lease mark: kept, both would grow with
        every rollout the server ever ran (the members of a 10,000-device
        rollout are several MB)."""
        live = set(ids)
        for kept in (self._members, self._lease_marks):
            for rollout_id in kept.keys() - live:
                del kept[rollout_id]

    def _take_lease(self, rollout_id: str) -> bool:
        """Take or renew the rollout's lease. A renewal of the very lease we
        wrote last keeps our copy of its members; anything else (first
        take, a takeover after another replica held it) drops the copy."""
        now = self._clock()
        mark = self._lease_marks.get(rollout_id)
        if mark is not None and mark - now > self._lease / 2:
            # Ours for half a lease more: no replica takes a lease before it
            # expires, so this tick need not write (one write transaction
            # fewer per rollout per tick); renewed once half is used up.
            return True
        expires = now + self._lease
        self._lease_marks.pop(rollout_id, None)
        taken = False
        with self._db.unit_of_work() as uow:
            renewed = mark is not None and self._lease_update(
                uow.session, expires,
                (RolloutRow.id == rollout_id) & (RolloutRow.lease_owner == self.owner)
                & (RolloutRow.lease_expires_at == mark),
            )  # fmt: skip
            if not renewed:
                self._members.pop(rollout_id, None)
                taken = self._lease_update(
                    uow.session, expires,
                    (RolloutRow.id == rollout_id) & or_(
                        RolloutRow.lease_owner.is_(None),
                        RolloutRow.lease_owner == self.owner,
                        RolloutRow.lease_expires_at < now,
                    ),
                )  # fmt: skip
            uow.commit()
        if renewed or taken:
            self._lease_marks[rollout_id] = expires
            return True
        return False

    def _lease_update(self, session: Session, expires: dt.datetime, where: Any) -> bool:
        result = session.execute(
            update(RolloutRow)
            .where(where)
            .values(lease_owner=self.owner, lease_expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def release(self) -> None:
        """Give up our leases (a clean shutdown), so another replica takes
        over at once instead of after the lease expires."""
        with self._db.unit_of_work() as uow:
            uow.session.execute(
                update(RolloutRow)
                .where(RolloutRow.lease_owner == self.owner)
                .values(lease_owner=None, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )
            uow.commit()

    # ------------------------------------------------------------ one step

    def drive(self, rollout_id: str) -> Step:
        """One reconcile step of one rollout, in one transaction."""
        now = self._clock()
        with self._db.unit_of_work() as uow:
            session = uow.session
            row = session.scalar(
                select(RolloutRow).where(RolloutRow.id == rollout_id).with_for_update()
            )
            if row is None or row.lease_owner != self.owner:
                self._members.pop(rollout_id, None)
                return Step()
            step = Step()
            # The step changes the copy in place: if it fails, forget it.
            known = self._members.pop(rollout_id, None)
            driver = _Driver(self, uow, row, now, step, known)
            driver.run()
            driver.save_members()
            uow.commit()
            if row.finished_at is None:
                self._members[rollout_id] = driver.devices
        if step.pushed:
            self._events.publish(
                FleetEvent("device.assigned", tuple(step.pushed), desired_changed=True)
            )
        if step.changed:
            self._events.publish(FleetEvent("rollout.updated", subject=rollout_id))
        return step


class _Driver:
    """The decisions of one step (see the module docstring)."""

    def __init__(
        self, orchestrator: Orchestrator, uow: UnitOfWork, row: RolloutRow, now: dt.datetime,
        step: Step, members: list[Member] | None = None,
    ) -> None:  # fmt: skip
        self.o = orchestrator
        self.uow = uow
        self.session: Session = uow.session
        self.row = row
        self.now = now
        self.step = step
        self.spec = RolloutSpec.from_dict(row.spec)
        self._stages = [dict(s) for s in row.stages]
        self.mv = self.session.get_one(ModelVersionRow, row.model_version_id)
        if members is None:
            columns = [getattr(RolloutDeviceRow, name) for name in _MEMBER_FIELDS]
            members = [
                Member(*r)
                for r in self.session.execute(
                    select(*columns).where(RolloutDeviceRow.rollout_id == row.id)
                )
            ]
        self.devices = members
        self._loaded = {d.device_id: d.values() for d in self.devices}
        # Per-class artifact lookups, shared by every assignment of the step.
        self._artifacts: dict[tuple[str, str], ArtifactRow | str] = {}

    def save_members(self) -> None:
        """Write back the members this step changed, and insert new ones."""
        changed: list[dict[str, object]] = []
        added: list[dict[str, object]] = []
        for d in self.devices:
            loaded = self._loaded.get(d.device_id)
            values = d.values()
            if loaded == values:
                continue
            params = dict(zip(_MEMBER_FIELDS, values, strict=True), rollout_id=self.row.id)
            (added if loaded is None else changed).append(params)
        if changed:
            update_rows(self.session, RolloutDeviceRow, changed)
        if added:
            insert_rows(self.session, RolloutDeviceRow, added)

    def record(self, action: str, **details: object) -> None:
        audit.record(self.uow, ACTOR, action, f"rollout:{self.row.id}", **details)
        self.step.changed = True

    def run(self) -> None:
        row = self.row
        if row.state == SCHEDULED and (row.start_at is None or row.start_at <= self.now):
            row.state = RUNNING
            row.started_at = self.now
            self.stage_state(0)["started_at"] = _iso(self.now)
            self.save_stages()
            self.record("rollout.begin")
        self.follow_devices()
        if row.state == ABORTED:
            self.revert()
            return
        if row.state != RUNNING:
            return
        if self.spec.dynamic:
            self.admit_late_devices()
        self.notify()
        self.judge()

    # ------------------------------------------------------------ stage state

    def stage_state(self, index: int) -> dict[str, object]:
        """The persisted per-stage dict (a copy: JSON columns change only on
        assignment); save_stages() writes the copies back."""
        return self._stages[index]

    def save_stages(self) -> None:
        self.row.stages = [dict(s) for s in self._stages]

    # ------------------------------------------------------------ devices

    def follow_devices(self) -> None:
        """Device states from the agents' reports; timeouts and retries."""
        pacing = self.spec.pacing
        # Selected by the rollout's rows, whose states are the members' (the
        # last step wrote them), not by IN (the devices): see _of_rollout.
        # Each device's status of this rollout's model only: its other
        # models' updates (other rollouts, operators) are not this one's.
        model = self.spec.model_name
        statuses = {
            device_id: _model_status(status, model)
            for device_id, status in self.session.execute(
                self._of_rollout(select(DeviceRow.id, DeviceRow.update_status), DeviceRow.id)
                .where(RolloutDeviceRow.state.in_(_FOLLOWED))
            )
        } if any(d.state in _FOLLOWED for d in self.devices) else {}  # fmt: skip
        for d in self.devices:
            if d.state not in _FOLLOWED:
                continue
            status = statuses.get(d.device_id, {})
            reported = status.get("state", "") if status.get("sequence") == d.sequence else ""
            before = d.state
            if d.state == REVERTING:
                if reported == "committed":
                    # Keep why it was reverted ("class X dropped: ...").
                    self.finish(d, REVERTED, d.reason.replace("reverting to", "reverted to"))
                elif reported == "failed":
                    self.finish(d, REVERTED, f"revert failed: {status.get('reason', '')}")
                continue
            # A shadow stage's assignment reports committed once it is
            # loaded beside the active version: that is its device done.
            if reported == "committed":
                self.finish(d, COMMITTED, "")
            elif reported == "failed":
                self.fail(d, FAILED, status.get("reason") or "the update failed")
            elif reported in _WORKING and d.state == NOTIFIED:
                d.state = IN_PROGRESS
            notified = d.notified_at.timestamp() if d.notified_at else self.now.timestamp()
            if d.state in (NOTIFIED, IN_PROGRESS) and device_timed_out(
                notified, self.now.timestamp(), pacing.device_timeout_s or None
            ):
                self.fail(d, TIMED_OUT, f"no result within {pacing.device_timeout_s:g} s")
            if d.state != before:
                self.step.changed = True

    def _of_rollout(self, stmt: _S, device_id: Any, stage: int | None = None) -> _S:
        """`stmt` limited to this rollout's devices (of `stage`) by a join.
        A step used to pass the devices it wanted as IN (?, ?, ...): one
        statement text per number of devices, so nearly every tick prepared
        a new one, and SQLite keeps 128 per connection at about 200 bytes per
        parameter (2 MB for 10,000 devices): the control plane's RSS grew
        through a soak. These statements' text never changes; the rows of
        devices the step does not ask about are left out in Python."""
        stmt = stmt.join(RolloutDeviceRow, RolloutDeviceRow.device_id == device_id).where(
            RolloutDeviceRow.rollout_id == self.row.id
        )
        return stmt if stage is None else stmt.where(RolloutDeviceRow.stage == stage)

    def finish(self, d: Member, state: str, reason: str) -> None:
        d.state, d.reason, d.finished_at = state, reason, self.now

    def fail(self, d: Member, state: str, reason: str) -> None:
        """A failure, or a retry (with backoff) while retries remain."""
        retries = self.spec.pacing.device_retries
        if should_retry(d.attempts, retries):
            d.state = WAITING
            d.reason = f"attempt {d.attempts} {state.replace('_', ' ')}: {reason}; retrying"
            # Backoff in units of the device timeout (a device that needs
            # minutes is not retried every 30 s), else 30 s.
            base = min(30.0, self.spec.pacing.device_timeout_s or 30.0)
            delay = retry_delay_s(d.attempts, base_s=base)
            d.next_attempt_at = self.now + dt.timedelta(seconds=delay)
        else:
            self.finish(d, state, reason)

    def notify(self) -> None:
        """Assign the version to waiting devices of the stages reached, as
        many as the pacing allows now."""
        row = self.row
        if row.notify_started_at is None:
            row.notify_started_at = self.now
        notified = sum(d.attempts for d in self.devices)
        elapsed = (self.now - row.notify_started_at).total_seconds()
        allowance = notify_allowance(self.spec.pacing.pacing, elapsed, notified)
        ready = [
            d for d in self.devices
            if d.state == WAITING and d.stage <= row.current_stage
            and (d.next_attempt_at is None or d.next_attempt_at <= self.now)
        ]  # fmt: skip
        ready.sort(key=lambda d: (d.stage, d.device_id))
        batch = ready[: max(0, min(allowance, NOTIFY_CHUNK))]
        self.step.more = len(batch) < min(len(ready), max(0, allowance))
        for shadow in (False, True):
            group = [d for d in batch if self.spec.stages[d.stage].shadow is shadow]
            if not group:
                continue
            assigned = assign_devices(
                self.session, self.mv, [d.device_id for d in group],
                actor=f"rollout:{row.id}", rollout_id=row.id, shadow=shadow,
                artifacts=self._artifacts,
            )  # fmt: skip
            for d in group:
                done = assigned.get(d.device_id, "the device no longer exists")
                if isinstance(done, str):
                    self.finish(d, REJECTED, done)
                    continue
                d.state, d.sequence, d.notified_at = NOTIFIED, done[0], self.now
                d.attempts += 1
                d.next_attempt_at = None
                self.step.pushed.append(d.device_id)
            self.step.changed = True

    def admit_late_devices(self) -> None:
        """Dynamic rollouts: devices that match now and can take part join
        the current stage."""
        candidates, classes = matching_devices(self.session, self.spec)
        known = {d.device_id for d in self.devices}
        fresh = [c for c in candidates if c.id not in known]
        if not fresh:
            return
        busy = active_rollout_of(self.session, (c.id for c in fresh), model_id=self.mv.model_id)
        offline_before = self.now - self.o._offline_after
        reasons: dict[str | None, str | None] = {}
        stage = late_stage(self.row.current_stage, None, len(self.spec.stages))
        for device in fresh:
            if device.id in busy or cohort_exclusion(
                self.session, device, self.mv, offline_before=offline_before,
                artifact_reasons=reasons,
            ):  # fmt: skip
                continue
            previous = revert_targets(self.session, [device.id], self.mv.model_id)[device.id]
            late = Member(
                device_id=device.id, class_name=classes.get(device.class_id or "", ""),
                stage=stage, state=WAITING, reason="joined while the rollout ran", attempts=0,
                sequence=0, notified_at=None, finished_at=None, next_attempt_at=None,
                previous_model_version_id=previous,
            )  # fmt: skip
            self.devices.append(late)
            self.record("rollout.admit", device=device.id, stage=stage)

    # ------------------------------------------------------------ judging

    def judge(self) -> None:
        row, index = self.row, self.row.current_stage
        stage = self.spec.stages[index]
        # Devices of dropped classes (reverting/reverted) no longer count.
        members = [
            d for d in self.devices if d.stage == index and d.state not in (REVERTING, REVERTED)
        ]
        health, silent = self.health(stage, members)
        gates = evaluate_gates(health, stage.gates, self.class_limits())
        agreement = self.shadow_agreement(stage, members) if stage.shadow else None
        counts = StageCounts(
            total=len(members),
            committed=sum(d.state == COMMITTED and d.device_id not in silent for d in members),
            failed=sum(d.state in FAILED_STATES or d.device_id in silent for d in members),
            in_progress=sum(d.state in (WAITING, NOTIFIED, IN_PROGRESS) for d in members),
        )
        state = self.stage_state(index)
        ack = Acknowledged(int(state.get("ack_failed", 0) or 0),  # type: ignore[call-overload]
                           int(state.get("ack_finished", 0) or 0))  # type: ignore[call-overload]  # fmt: skip
        outcome = judge_stage(counts, stage.rule, ack)
        state["counts"] = [counts.total, counts.committed, counts.failed, counts.in_progress]
        state["gates"] = [[g.name, g.value, g.limit, g.passing] for g in gates]
        failing = [g for g in gates if not g.passing]
        if agreement is not None:
            state["agreement"] = agreement
        problem = ""
        if outcome.verdict is Verdict.FAILED:
            problem = outcome.reason
        elif failing and counts.committed:
            problem = "health gate failed: " + "; ".join(describe(g) for g in failing)
            if self.isolate(stage, failing, problem):
                self.save_stages()
                return
        elif (
            agreement is not None and stage.min_agreement is not None
            and agreement[1] > 0 and agreement[0] < stage.min_agreement
            and outcome.verdict is Verdict.SUCCEEDED
        ):  # fmt: skip
            problem = (
                f"shadow agreement {agreement[0]:.3f} over {agreement[1]} mirrored requests "
                f"is below the stage's minimum {stage.min_agreement:g}"
            )
        if problem:
            state.pop("bake_started_at", None)
            self.save_stages()
            self.on_failure(stage, f"stage {index + 1} ({stage.name or index + 1}): {problem}")
            return
        if outcome.verdict is not Verdict.SUCCEEDED:
            self.save_stages()
            return
        if stage.shadow and (agreement is None or agreement[1] == 0):
            self.save_stages()
            return  # no mirrored requests yet: nothing to judge agreement on
        baking = _parse(state.get("bake_started_at"))
        if baking is None:
            state["bake_started_at"] = _iso(self.now)
            self.save_stages()
            self.record("rollout.stage_passed", stage=index, reason=outcome.reason)
            baking = self.now
        if (self.now - baking).total_seconds() < stage.bake_time_s:
            self.save_stages()
            return
        self.save_stages()
        if index == len(self.spec.stages) - 1:
            row.state = SUCCEEDED
            row.finished_at = self.now
            row.reason = f"all {len(self.spec.stages)} stages passed"
            dropped = sorted({d.class_name for d in self.devices if "dropped:" in d.reason})
            if dropped:
                row.reason += f" for the other classes; dropped and reverted: {', '.join(dropped)}"
            self.record("rollout.succeeded")
        elif stage.require_approval:
            row.state = WAITING_APPROVAL
            row.reason = f"stage {index + 1} passed; waiting for an operator's approval"
            self.record("rollout.waiting_approval", stage=index)
        else:
            advance_stage(row, self.now)
            if stage.shadow:
                self.promote_shadow(index)
            self.record("rollout.stage", stage=row.current_stage)

    def isolate(self, stage: StageSpec, failing: Sequence[GateResult], problem: str) -> bool:
        """With on_failure abort-and-revert, a gate that fails only on some
        classes' devices drops those classes (reverting their devices) and
        lets the others continue; True if it did. One class's bad artifact
        should not hold back the classes whose artifacts are fine."""
        if stage.on_failure != ABORT_REVERT:
            return False
        class_of = {d.device_id: d.class_name for d in self.devices}
        bad = {class_of[i] for g in failing for i in g.failing_devices if i in class_of}
        remaining = {d.class_name for d in self.devices if d.state not in (REVERTING, REVERTED)}
        if not bad or bad >= remaining:
            return False  # every class fails: abort the whole rollout
        self.drop_classes(bad, problem)
        return True

    def promote_shadow(self, index: int) -> None:
        """After a shadow stage its devices take the version for real, with
        the next stage."""
        for d in self.devices:
            if d.stage == index:
                d.stage, d.state, d.reason, d.attempts = index + 1, WAITING, "shadow passed", 0

    def on_failure(self, stage: StageSpec, reason: str) -> None:
        row = self.row
        if stage.on_failure == ABORT_REVERT:
            abort(row, REVERT, reason)
            self.record("rollout.abort", reason=reason, revert=True)
        else:
            row.state = PAUSED
            row.reason = reason
            self.record("rollout.pause", reason=reason)

    def class_limits(self) -> dict[str, ClassLimits]:
        return {
            c.name: ClassLimits(c.latency_budget_p95_ms, c.max_memory_mb)
            for c in self.session.scalars(select(DeviceClassRow))
        }

    def health(
        self, stage: StageSpec, members: Sequence[Member]
    ) -> tuple[list[DeviceHealth], set[str]]:
        """Per committed device: the new version's telemetry since it
        committed; and the devices silent for longer than the stage allows."""
        committed = [d for d in members if d.state == COMMITTED and d.finished_at]
        if not committed or stage.shadow:
            return [], set()
        since = min(d.finished_at for d in committed if d.finished_at).timestamp() * 1000
        t = TelemetryRow
        # Sums in floating point, over capped rows: a row an older server
        # stored with an absurd count must not overflow the gate's query.
        stmt = select(
            t.device_id, func.max(t.latency_p95_ms),
            float_sum(at_most(t.error_count, ROW_COUNT_CAP)),
            float_sum(at_most(t.request_count, ROW_COUNT_CAP)),
            func.max(t.memory_mb), func.max(t.at_ms),
        )  # fmt: skip
        rows = self.session.execute(
            self._of_rollout(stmt, t.device_id, self.row.current_stage).where(
                t.at_ms >= int(since), t.model_name == self.spec.model_name,
                t.model_version == self.spec.model_version,
            ).group_by(t.device_id)
        )  # fmt: skip
        stats = {r[0]: r for r in rows}
        health, silent = [], set()
        max_silence = stage.gates.max_silence_s
        for d in committed:
            r = stats.get(d.device_id)
            last = (r[5] / 1000) if r and r[5] else None
            age = self.now.timestamp() - last if last else None
            if age is None and d.finished_at:
                age_since_commit = (self.now - d.finished_at).total_seconds()
                age = age_since_commit if max_silence and age_since_commit > max_silence else 0.0
            requests = int(r[3] or 0) if r else 0
            health.append(DeviceHealth(
                d.device_id, d.class_name,
                latency_p95_ms=float(r[1]) if r and requests else None,
                error_rate=(int(r[2] or 0) / requests) if r and requests else None,
                memory_mb=float(r[4]) if r else None,
                last_report_age_s=age,
            ))  # fmt: skip
            if max_silence and age is not None and age > max_silence:
                silent.add(d.device_id)
        return health, silent

    def shadow_agreement(
        self, stage: StageSpec, members: Sequence[Member]
    ) -> tuple[float, int] | None:
        """(request-weighted argmax agreement, mirrored requests) of the
        candidate on the stage's devices."""
        ids = {d.device_id for d in members if d.state == COMMITTED}
        if not ids:
            return None
        t = TelemetryRow
        requests_col = at_most(t.shadow_requests, ROW_COUNT_CAP)
        stmt = select(
            t.device_id, float_sum(requests_col),
            float_sum(cast(at_most(t.shadow_agreement, 1.0), Float) * cast(requests_col, Float)),
        )  # fmt: skip
        per_device = self.session.execute(
            self._of_rollout(stmt, t.device_id, self.row.current_stage)
            .where(t.shadow_version == self.spec.model_version)
            .group_by(t.device_id)
        )  # fmt: skip
        requests, weighted = 0, 0.0
        for device_id, n, w in per_device:
            if device_id in ids:
                requests, weighted = requests + int(n or 0), weighted + float(w or 0)
        return ((float(weighted or 0) / requests) if requests else 0.0, requests)

    # ------------------------------------------------------------ revert

    def revert_devices(self, reverting: Sequence[tuple[Member, str]]) -> None:
        """Assign each device (with why) its previous version (REVERTING
        until it reports back); one with none to go back to is marked
        reverted with the reason."""
        if not reverting:
            return
        self.step.changed = True
        by_version: dict[str, list[tuple[Member, str]]] = {}
        unassign: list[tuple[Member, str]] = []
        for d, why in reverting:
            prefix = f"{why}; " if why else ""
            if d.previous_model_version_id is None:
                unassign.append((d, prefix))
            else:
                by_version.setdefault(d.previous_model_version_id, []).append((d, prefix))
        if unassign:
            # The device held no version of the model before: going back is
            # removing the model (its other models stay). Nothing to wait
            # for: the agent unloads it, and reports no update for that.
            model = self.spec.model_name
            removed, _ = unassign_devices(
                self.session, self.mv.model_id, [d.device_id for d, _ in unassign]
            )
            gone = set(removed)
            for d, prefix in unassign:
                self.finish(d, REVERTED, (
                    f"{prefix}unassigned {model}: the device held no version of it before"
                    if d.device_id in gone
                    else f"{prefix}nothing to revert to: {model} is no longer assigned"
                ))  # fmt: skip
                if d.device_id in gone:
                    self.step.pushed.append(d.device_id)
        for version_id, group in by_version.items():
            previous = self.session.get_one(ModelVersionRow, version_id)
            # A revert is a rollback by definition, whatever the versions
            # compare like: the agents must take it.
            assigned = assign_devices(
                self.session, previous, [d.device_id for d, _ in group],
                actor=f"rollout:{self.row.id}", rollout_id=self.row.id, rollback=True,
                artifacts=self._artifacts,
            )  # fmt: skip
            for d, prefix in group:
                done = assigned.get(d.device_id, "the device no longer exists")
                if isinstance(done, str):
                    d.state, d.reason = REVERTED, f"{prefix}cannot revert: {done}"
                    continue
                d.state, d.sequence, d.notified_at = REVERTING, done[0], self.now
                d.reason = f"{prefix}reverting to {previous.version}"
                self.step.pushed.append(d.device_id)

    def drop_classes(self, classes: set[str], reason: str) -> None:
        """Take classes out of the rollout: their devices that took the
        version go back to their previous one, the rest are never notified;
        the other classes carry on."""
        reverting = []
        for d in self.devices:
            if d.class_name not in classes:
                continue
            why = f"class {d.class_name} dropped: {reason}"
            if d.state in (COMMITTED, NOTIFIED, IN_PROGRESS):
                reverting.append((d, why))
            elif d.state == WAITING:
                d.state, d.reason = REVERTED, f"{why}; never notified"
        self.revert_devices(reverting)
        self.record("rollout.class_dropped", classes=sorted(classes), reason=reason)

    def revert(self) -> None:
        """Aborted with revert: every device that took (or may be taking)
        the version gets its previous one; the rollout finishes when none is
        still reverting."""
        row = self.row
        if row.abort_mode == KEEP:
            row.finished_at = row.finished_at or self.now
            return
        reverting = []
        for d in self.devices:
            if d.state in (COMMITTED, NOTIFIED, IN_PROGRESS):
                reverting.append(d)
            elif d.state == WAITING:
                d.state, d.reason = REVERTED, "never notified"
                self.step.changed = True
        # In chunks, like notifications, the devices running the version
        # first: a revert of 5,500 devices in one step held SQLite's writer
        # for seconds and woke them all in the same instant. The next chunk
        # follows at once.
        reverting.sort(key=revert_order)
        self.revert_devices([(d, "") for d in reverting[:NOTIFY_CHUNK]])
        self.step.more = len(reverting) > NOTIFY_CHUNK
        if not self.step.more and not any(d.state == REVERTING for d in self.devices):
            row.finished_at = self.now
            self.record("rollout.reverted")
