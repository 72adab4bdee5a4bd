"""The rollout orchestrator: a reconcile loop over persisted state.

Every tick (default 0.5 s; after a long tick longer, so that ticks take at
most a quarter of the time outside notify bursts) each replica looks at the
rollouts that need work and, for each, tries to take its lease (or renew it,
once half of it is used up): one conditional UPDATE that succeeds only when
the lease is free, expired or already ours. Only the lease holder drives a
rollout, so with several replicas on PostgreSQL exactly one drives each
rollout at a time, and another takes over when the holder stops renewing
(it died).

A step is one transaction: read a snapshot of the rollout (its row, its
members, their agents' reports for its model, the current stage's
telemetry), plan (domain/rollout_plan.plan, pure: what to do and why), and
apply the planned actions with the assignments and audit entries they
imply. A replica killed mid-step leaves nothing half done, and a step
repeated after a crash plans from what was committed (a member is notified
once: its row says `notified` in the same commit as its assignment). While
a replica's lease is unbroken it keeps its copy of the members between
steps instead of reading them again (only the lease holder writes them).
Every transition is written to the audit log (actor "orchestrator") and
published as a "rollout.updated" event."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
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
from edgefleet.controlplane.domain import rollout_plan
from edgefleet.controlplane.domain.rollout_plan import (
    KEEP,
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
    Report,
    Revert,
    RevertDone,
    SetMembers,
    Snapshot,
    StartBake,
    apply,
)
from edgefleet.controlplane.domain.rollout_spec import RolloutSpec
from edgefleet.controlplane.domain.rollout_states import (
    ACTIVE,
    FOLLOWED_STATES,
    MemberEvent,
    MemberState,
    RolloutState,
    member_transition,
    read_stages,
    write_stages,
)
from edgefleet.controlplane.domain.rollouts import ClassLimits, DeviceHealth
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.deployments import (
    assign_devices,
    revert_targets,
    unassign_devices,
)
from edgefleet.controlplane.services.devices import EventSink
from edgefleet.controlplane.services.events import FleetEvent
from edgefleet.controlplane.services.rollouts import (
    active_rollout_of,
    cohort_exclusion,
    matching_devices,
    unfinished_abort,
)
from edgefleet.controlplane.services.telemetry import ROW_COUNT_CAP, at_most, float_sum

log = logging.getLogger(__name__)

ACTOR = "orchestrator"


_S = TypeVar("_S", bound=Select[*tuple[Any, ...]])


@dataclass
class Step:
    """What one step changed: devices whose desired state must be pushed,
    and whether the rollout changed at all."""

    pushed: list[str] = field(default_factory=list)
    changed: bool = False
    # Work left that the pacing already allows (the next notify chunk).
    more: bool = False
    # When the next step is due whatever happens meanwhile (a bake's end).
    due: dt.datetime | None = None


@dataclass(frozen=True)
class Wake:
    """When the orchestrator ticks next: at once (`more`), by `due`, or
    after the usual pause (Orchestrator.pause_after)."""

    more: bool = False
    due: dt.datetime | None = None


# The most of the wall time the orchestrator's ticks may take (see
# Orchestrator.pause_after).
MAX_BUSY_SHARE = 0.25

_MEMBER_FIELDS = (
    "device_id", "class_name", "stage", "state", "reason", "attempts", "sequence",
    "notified_at", "finished_at", "next_attempt_at", "previous_model_version_id",
    "acknowledged",
)  # fmt: skip
_member_values = attrgetter(*_MEMBER_FIELDS)


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
        self._members: dict[str, tuple[int, Mapping[str, Member]]] = {}
        self._lease_marks: dict[str, dt.datetime] = {}

    async def run(self, executor: Executor) -> None:
        """Tick until cancelled; a failing tick is logged, not fatal."""
        loop = asyncio.get_running_loop()
        while True:
            wake = Wake()
            started = loop.time()
            try:
                wake = await loop.run_in_executor(executor, self.tick)
            except Exception:
                log.exception("rollout orchestrator tick failed")
            busy = loop.time() - started
            self._on_tick(busy)
            await asyncio.sleep(self.pause_for(busy, wake))

    def pause_for(self, busy_s: float, wake: Wake) -> float:
        """pause_after, cut short when a step is due sooner: a bake's end is
        one step, not a busy loop, and waiting for the next tick after it
        cost up to a tick per stage (bench_rollout)."""
        pause = self.pause_after(busy_s, wake.more)
        if wake.due is None:
            return pause
        return min(pause, max(0.0, (wake.due - self._clock()).total_seconds()))

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

    def tick(self) -> Wake:
        """Drive every rollout that needs work and whose lease we get; when
        the next tick is wanted."""
        with self._db.unit_of_work(readonly=True) as uow:
            ids = list(uow.session.scalars(
                select(RolloutRow.id)
                .where(RolloutRow.state.in_(list(ACTIVE)) | unfinished_abort())
                .order_by(RolloutRow.created_at)
            ))  # fmt: skip
        self._forget_all_but(ids)
        more, due = False, None
        for rollout_id in ids:
            if not self._take_lease(rollout_id):
                continue
            try:
                step = self.drive(rollout_id)
                more = step.more or more
                if step.due is not None and (due is None or step.due < due):
                    due = step.due
            except Exception:
                # One rollout's failing step (a bug, a spec an older server
                # let through) must not hold back every other rollout.
                log.exception("rollout %s: step failed; the next tick tries again", rollout_id)
        return Wake(more, due)

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
            # Forgotten until the step commits: if it fails, so is the copy.
            # Stale, too, when an operator changed members since (retry,
            # skip, resume): they bump the revision.
            revision, known = self._members.pop(rollout_id, (None, None))
            if revision != row.members_revision:
                known = None
            applier = _Applier(self, uow, row, now, known)
            step = applier.run()
            uow.commit()
            if row.finished_at is None:
                self._members[rollout_id] = (row.members_revision, applier.snapshot.members)
        if step.pushed:
            self._events.publish(
                FleetEvent("device.assigned", tuple(step.pushed), desired_changed=True)
            )
        if step.changed:
            self._events.publish(FleetEvent("rollout.updated", subject=rollout_id))
        return step


class _Applier:
    """One step: read the snapshot, plan, apply the actions (see the module
    docstring)."""

    def __init__(
        self, orchestrator: Orchestrator, uow: UnitOfWork, row: RolloutRow, now: dt.datetime,
        members: Mapping[str, Member] | None,
    ) -> None:  # fmt: skip
        self.o = orchestrator
        self.uow = uow
        self.session: Session = uow.session
        self.row = row
        self.now = now
        self.step = Step()
        self.spec = RolloutSpec.from_dict(row.spec)
        self.mv = self.session.get_one(ModelVersionRow, row.model_version_id)
        if members is None:
            columns = [getattr(RolloutDeviceRow, name) for name in _MEMBER_FIELDS]
            members = {
                r[0]: Member(*r)
                for r in self.session.execute(
                    select(*columns).where(RolloutDeviceRow.rollout_id == row.id)
                )
            }
        # What the step started from: a member changed when its object did
        # (the planner and apply copy, never change in place).
        self._initial = members
        # Per-class artifact lookups, shared by every assignment of the step.
        self._artifacts: dict[tuple[str, str], ArtifactRow | str] = {}
        self.snapshot = self.read(members)

    # ------------------------------------------------------------ reading

    def read(self, members: Mapping[str, Member]) -> Snapshot:
        row = self.row
        state = RolloutState(row.state)
        stages = tuple(read_stages(row.stages, len(self.spec.stages)))
        snapshot = Snapshot(
            rollout_id=row.id, state=state, spec=self.spec, current_stage=row.current_stage,
            stages=stages, members=members, reason=row.reason, abort_mode=row.abort_mode,
            start_at=row.start_at, started_at=row.started_at,
            notify_started_at=row.notify_started_at, paced_until=row.paced_until,
            finished_at=row.finished_at,
        )  # fmt: skip
        if state is RolloutState.ABORTED or state in ACTIVE:
            snapshot = replace(snapshot, reports=self.reports(members))
        if state is not RolloutState.RUNNING:
            return snapshot
        stage = self.spec.stages[row.current_stage]
        current = [m for m in members.values() if m.stage == row.current_stage]
        return replace(
            snapshot,
            health=[] if stage.shadow else self.health(current, stage.gates.max_silence_s),
            limits=self.class_limits(),
            agreement=self.shadow_agreement(current) if stage.shadow else None,
            newcomers=self.newcomers(members) if self.spec.dynamic else (),
        )

    def reports(self, members: Mapping[str, Member]) -> dict[str, Report]:
        """The followed members' agents' reports of this rollout's model, at
        the member's assignment sequence. Each device's status of this
        model only: its other models' updates are not this rollout's."""
        if not any(m.state in FOLLOWED_STATES for m in members.values()):
            return {}
        model = self.spec.model_name
        # The three fields this needs, taken out of the JSON by the
        # database: decoding each device's whole status document in Python
        # took a 10,000-device rollout's step up to a second on PostgreSQL
        # (bench_rollout), while installs wanted the same CPU. The sequence
        # stays JSON (a number, or whatever the agent stored), never cast: a
        # value past a column's range must not fail the step.
        field = DeviceRow.update_status
        columns = (field[(model, "sequence")], field[(model, "state")].as_string(),
                   field[(model, "reason")].as_string())  # fmt: skip
        out = {}
        # Selected by the rollout's rows, whose states are the members' (the
        # last step wrote them), not by IN (the devices): see _of_rollout.
        for device_id, sequence, state, reason in self.session.execute(
            self._of_rollout(select(DeviceRow.id, *columns), DeviceRow.id).where(
                RolloutDeviceRow.state.in_(FOLLOWED_STATES)
            )
        ):
            m = members.get(device_id)
            if m is not None and sequence == m.sequence:
                out[device_id] = Report(str(state or ""), str(reason or ""))
        return out

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

    def class_limits(self) -> dict[str, ClassLimits]:
        return {
            c.name: ClassLimits(c.latency_budget_p95_ms, c.max_memory_mb)
            for c in self.session.scalars(select(DeviceClassRow))
        }

    def health(self, members: list[Member], max_silence: float | None) -> list[DeviceHealth]:
        """Per committed member of the stage: the new version's telemetry
        since it committed."""
        committed = [m for m in members if m.state == MemberState.COMMITTED and m.finished_at]
        if not committed:
            return []
        since = min(m.finished_at for m in committed if m.finished_at).timestamp() * 1000
        t = TelemetryRow
        # Sums in floating point, over capped rows: a row an older server
        # stored with an absurd count must not overflow the gate's query.
        stmt = select(
            t.device_id, func.max(t.latency_p95_ms),
            float_sum(at_most(t.error_count, ROW_COUNT_CAP)),
            float_sum(at_most(t.request_count, ROW_COUNT_CAP)),
            func.max(t.memory_mb), func.max(t.at_ms), func.max(t.model_memory_mb),
        )  # fmt: skip
        rows = self.session.execute(
            self._of_rollout(stmt, t.device_id, self.row.current_stage).where(
                t.at_ms >= int(since), t.model_name == self.spec.model_name,
                t.model_version == self.spec.model_version,
            ).group_by(t.device_id)
        )  # fmt: skip
        stats = {r[0]: r for r in rows}
        health = []
        for m in committed:
            r = stats.get(m.device_id)
            last = (r[5] / 1000) if r and r[5] else None
            age = self.now.timestamp() - last if last else None
            if age is None and m.finished_at:
                # Nothing since it committed: silent for as long, once that
                # is longer than the gate allows.
                since_commit = (self.now - m.finished_at).total_seconds()
                age = since_commit if max_silence and since_commit > max_silence else 0.0
            requests = int(r[3] or 0) if r else 0
            health.append(DeviceHealth(
                m.device_id, m.class_name,
                latency_p95_ms=float(r[1]) if r and requests else None,
                error_rate=(int(r[2] or 0) / requests) if r and requests else None,
                memory_mb=float(r[4]) if r else None,
                last_report_age_s=age,
                # 0: the agent did not measure it (an older agent).
                model_memory_mb=float(r[6]) if r and r[6] else None,
            ))  # fmt: skip
        return health

    def shadow_agreement(self, members: list[Member]) -> tuple[float, int] | None:
        """(request-weighted argmax agreement, mirrored requests) of the
        candidate on the stage's committed members."""
        ids = {m.device_id for m in members if m.state == MemberState.COMMITTED}
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

    def newcomers(self, members: Mapping[str, Member]) -> list[Member]:
        """Dynamic rollouts: devices that match now and can take part (the
        planner puts them in the current stage)."""
        candidates, classes = matching_devices(self.session, self.spec)
        fresh = [c for c in candidates if c.id not in members]
        if not fresh:
            return []
        busy = active_rollout_of(self.session, (c.id for c in fresh), model_id=self.mv.model_id)
        offline_before = self.now - self.o._offline_after
        reasons: dict[str | None, str | None] = {}
        joining = [
            device for device in fresh
            if device.id not in busy and cohort_exclusion(
                self.session, device, self.mv, offline_before=offline_before,
                artifact_reasons=reasons,
            ) is None
        ]  # fmt: skip
        previous = revert_targets(self.session, [d.id for d in joining], self.mv.model_id)
        out = []
        for d in joining:
            out.append(Member(
                device_id=d.id, class_name=classes.get(d.class_id or "", ""), stage=0,
                state=MemberState.WAITING, reason="joined while the rollout ran", attempts=0,
                sequence=0, notified_at=None, finished_at=None, next_attempt_at=None,
                previous_model_version_id=previous[d.id],
            ))  # fmt: skip
        return out

    # ------------------------------------------------------------ applying

    def run(self) -> Step:
        planned = rollout_plan.plan(self.snapshot, self.now)
        for action in planned.actions:
            self.snapshot = apply(self.snapshot, action, self.now)
            self.side_effects(action)
        self.step.more, self.step.due = planned.more, planned.due
        self.save()
        return self.step

    def record(self, action: str, **details: object) -> None:
        audit.record(self.uow, ACTOR, action, f"rollout:{self.row.id}", **details)
        self.step.changed = True

    def side_effects(self, action: Action) -> None:
        """What an action does beyond the snapshot: assignments, the audit
        log, events. The audit log counts stages from 1, as the CLI and the
        TUI show them."""
        self.step.changed = True
        match action:
            case Begin():
                self.record("rollout.begin")
            case Admit(members=members):
                for m in members:
                    self.record("rollout.admit", device=m.device_id, stage=m.stage + 1)
            case Notify(device_ids=ids, shadow=shadow):
                self.notify(ids, shadow)
            case Revert(items=items):
                self.revert(items)
            case StartBake(stage=stage, reason=reason):
                self.record("rollout.stage_passed", stage=stage + 1, reason=reason)
            case AwaitApproval(stage=stage):
                self.record("rollout.waiting_approval", stage=stage + 1)
            case Advance(stage=stage) if stage + 1 < len(self.spec.stages):
                self.record("rollout.stage", stage=stage + 2)
            case Advance():
                self.record("rollout.stages_passed")
            case Pause(reason=reason):
                self.record("rollout.pause", reason=reason)
            case Abort(reason=reason):
                self.record("rollout.abort", reason=reason, revert=True)
            case DropClasses(classes=classes, reason=reason):
                self.record("rollout.class_dropped", classes=list(classes), reason=reason)
            case Finish(state=state, reason=reason):
                self.record(f"rollout.{state.value}", reason=reason)
            case RevertDone() if self.snapshot.abort_mode != KEEP:
                self.record("rollout.reverted")
            case Judge() | SetMembers() | RevertDone():
                pass

    def set_members(self, members: Iterable[Member]) -> None:
        self.snapshot = replace(
            self.snapshot, members={**self.snapshot.members, **{m.device_id: m for m in members}}
        )

    def notify(self, ids: tuple[str, ...], shadow: bool) -> None:
        """Assign the version; apply() took every one as notified: put the
        real sequences (or the refusals) over that."""
        assigned = assign_devices(
            self.session, self.mv, list(ids), actor=f"rollout:{self.row.id}",
            rollout_id=self.row.id, shadow=shadow, artifacts=self._artifacts,
        )  # fmt: skip
        members = self.snapshot.members
        fixed = []
        for device_id in ids:
            m = members[device_id]
            done = assigned.get(device_id, "the device no longer exists")
            if isinstance(done, str):
                # Refused: as if never notified, then rejected.
                fixed.append(replace(
                    m, state=member_transition(MemberState.WAITING, MemberEvent.REFUSE),
                    reason=done, finished_at=self.now,
                ))  # fmt: skip
            else:
                fixed.append(replace(m, sequence=done[0]))
                self.step.pushed.append(device_id)
        self.set_members(fixed)

    def revert(self, items: tuple[tuple[str, str], ...]) -> None:
        """Assign each member (with why) its previous version (REVERTING
        until it reports back); one with none to go back to has the model
        removed, or is marked reverted with the reason."""
        members = self.snapshot.members
        by_version: dict[str, list[tuple[Member, str]]] = {}
        unassign: list[tuple[Member, str]] = []
        for device_id, why in items:
            m = members[device_id]
            prefix = f"{why}; " if why else ""
            if m.previous_model_version_id is None:
                unassign.append((m, prefix))
            else:
                by_version.setdefault(m.previous_model_version_id, []).append((m, prefix))
        fixed = []
        if unassign:
            # The device held no version of the model before: going back is
            # removing the model (its other models stay). Nothing to wait
            # for: the agent unloads it, and reports no update for that.
            model = self.spec.model_name
            removed, _ = unassign_devices(
                self.session, self.mv.model_id, [m.device_id for m, _ in unassign]
            )
            gone = set(removed)
            for m, prefix in unassign:
                fixed.append(replace(
                    m, state=member_transition(m.state, MemberEvent.REVERTED),
                    finished_at=self.now, reason=(
                        f"{prefix}unassigned {model}: the device held no version of it before"
                        if m.device_id in gone
                        else f"{prefix}nothing to revert to: {model} is no longer assigned"
                    ),
                ))  # fmt: skip
                if m.device_id in gone:
                    self.step.pushed.append(m.device_id)
        for version_id, group in by_version.items():
            previous = self.session.get_one(ModelVersionRow, version_id)
            # A revert is a rollback by definition, whatever the versions
            # compare like: the agents must take it.
            assigned = assign_devices(
                self.session, previous, [m.device_id for m, _ in group],
                actor=f"rollout:{self.row.id}", rollout_id=self.row.id, rollback=True,
                artifacts=self._artifacts,
            )  # fmt: skip
            for m, prefix in group:
                done = assigned.get(m.device_id, "the device no longer exists")
                if isinstance(done, str):
                    fixed.append(replace(
                        m, state=member_transition(m.state, MemberEvent.REVERT_FAILED),
                        reason=f"{prefix}cannot revert: {done}",
                    ))  # fmt: skip
                    continue
                fixed.append(replace(
                    m, sequence=done[0], reason=f"{prefix}reverting to {previous.version}"
                ))  # fmt: skip
                self.step.pushed.append(m.device_id)
        self.set_members(fixed)

    def save(self) -> None:
        """The snapshot back into the row, and the members that changed."""
        s, row = self.snapshot, self.row
        if s.state != row.state:
            row.state = s.state.value
        for name in ("reason", "abort_mode", "current_stage", "started_at",
                     "notify_started_at", "paced_until", "finished_at"):  # fmt: skip
            if getattr(row, name) != getattr(s, name):
                setattr(row, name, getattr(s, name))
        stages = write_stages(list(s.stages))
        if stages != row.stages:
            row.stages = stages
        changed: list[dict[str, object]] = []
        added: list[dict[str, object]] = []
        for device_id, m in s.members.items():
            before = self._initial.get(device_id)
            if before is m:
                continue
            params = dict(zip(_MEMBER_FIELDS, _member_values(m), strict=True))
            params["rollout_id"] = row.id
            (added if before is None else changed).append(params)
        if changed:
            update_rows(self.session, RolloutDeviceRow, changed)
        if added:
            insert_rows(self.session, RolloutDeviceRow, added)
