"""Rollouts, the operator's side: planning (the dry run), creating, and the
actions (start, pause, resume, approve, abort, and the remediation: retry,
skip, promote, update), each a transition of domain/rollout_states.py's
table. The orchestrator (orchestrator.py) drives running rollouts from the
rows these write.

A rollout's cohort is the accepted devices in its classes and/or carrying its
labels. A device is excluded, with the reason, when it is pending or rejected,
matches no class, its class has no successful build of the version, it is
offline, or it is already in another active rollout of the same model (an
aborted one holds the devices it is still reverting). At most one active
rollout per device and model: creating one that would take a device from
another rollout of the model fails with the list of devices. Rollouts of
different models may hold the same devices at once (a device holds several
models, issue 20): each assigns, judges and reverts its own model only."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from sqlalchemy import ColumnElement, Select, case, func, select, update
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.bulk import insert_rows
from edgefleet.controlplane.db.in_list import padded
from edgefleet.controlplane.db.models import (
    DeviceClassRow,
    DeviceRow,
    ModelRow,
    ModelVersionRow,
    RolloutDeviceRow,
    RolloutRow,
    utcnow,
)
from edgefleet.controlplane.db.uow import Database, UnitOfWork
from edgefleet.controlplane.domain import secrets
from edgefleet.controlplane.domain.rollout_plan import (
    KEEP,
    NEVER_NOTIFIED,
    REVERT,
    outcome_words,
)
from edgefleet.controlplane.domain.rollout_spec import RolloutSpec, SpecError
from edgefleet.controlplane.domain.rollout_states import (
    ACTIVE,
    FAILED_STATES,
    MEMBER_TRANSITIONS,
    MemberEvent,
    MemberState,
    RolloutEvent,
    RolloutState,
    StagePhase,
    member_can,
    member_transition,
    read_stages,
    rollout_transition,
    write_stages,
)
from edgefleet.controlplane.domain.rollouts import CohortDevice, plan_stages
from edgefleet.controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.deployments import (
    artifact_for,
    holding_refusals,
    revert_targets,
)
from edgefleet.controlplane.services.devices import ACCEPTED, EventSink
from edgefleet.controlplane.services.events import FleetEvent
from edgefleet.controlplane.services.registry import require_assignable

# Members an aborted rollout with revert has yet to put back.
_UNREVERTED = (
    MemberState.WAITING, MemberState.NOTIFIED, MemberState.IN_PROGRESS, MemberState.COMMITTED,
    MemberState.REVERTING,
)  # fmt: skip
_FINISHED = (MemberState.COMMITTED, *FAILED_STATES)
_MOVING = (MemberState.NOTIFIED, MemberState.IN_PROGRESS, MemberState.REVERTING)


def unfinished_abort() -> ColumnElement[bool]:
    """SQL: the rollout is aborted but not finished (still reverting): it
    needs the orchestrator, and holds the devices it has yet to put back."""
    return (RolloutRow.state == RolloutState.ABORTED) & RolloutRow.finished_at.is_(None)


@dataclass(frozen=True)
class PlannedDevice:
    device_id: str
    name: str
    class_name: str
    stage: int
    # The model version the device was assigned before (to revert to).
    previous_model_version_id: str | None


@dataclass(frozen=True)
class Excluded:
    device_id: str
    name: str
    reason: str


@dataclass(frozen=True)
class Plan:
    devices: list[PlannedDevice]
    excluded: list[Excluded]


# Members per (stage, state); acknowledged failed members per stage.
_Counts = tuple[dict[tuple[int, str], int], dict[int, int]]


@dataclass(frozen=True)
class RolloutView:
    row: RolloutRow
    spec: RolloutSpec
    devices: list[RolloutDeviceRow]
    names: dict[str, str]
    # Devices per (stage, state), counted in SQL: a summary carries these
    # instead of the device rows.
    counts: dict[tuple[int, str], int] | None = None
    # Failed members a resume acknowledged, per stage (with `counts`).
    acknowledged: dict[int, int] | None = None

    @property
    def acknowledged_failed(self) -> dict[int, int]:
        """Failed members a resume acknowledged, per stage."""
        if self.acknowledged is not None:
            return self.acknowledged
        out: dict[int, int] = {}
        for d in self.devices:
            if d.acknowledged and d.state in FAILED_STATES:
                out[d.stage] = out.get(d.stage, 0) + 1
        return out

    def stage_counts(self, stage: int) -> dict[str, int]:
        """Devices of `stage` per device state."""
        if self.counts is not None:
            return {state: n for (s, state), n in self.counts.items() if s == stage}
        counted: dict[str, int] = {}
        for d in self.devices:
            if d.stage == stage:
                counted[d.state] = counted.get(d.state, 0) + 1
        return counted


def active_rollout_of(
    session: Session, device_ids: Iterable[str], *, model_id: str | None = None
) -> dict[str, str]:
    """device id -> the active rollout (of the model `model_id`; None: of
    any model) holding it. An aborted rollout that is still reverting holds
    the devices it has yet to put back: a rollout of the model that took one
    meanwhile would assign it over its revert, and the aborted rollout would
    wait for that revert's report forever."""
    ids = list(device_ids)
    if not ids:
        return {}
    stmt = select(RolloutDeviceRow.device_id, RolloutRow.id).join(
        RolloutRow, RolloutRow.id == RolloutDeviceRow.rollout_id
    )
    if model_id is not None:
        stmt = stmt.join(ModelVersionRow, ModelVersionRow.id == RolloutRow.model_version_id).where(
            ModelVersionRow.model_id == model_id
        )
    rows = session.execute(
        stmt.where(
            RolloutDeviceRow.device_id.in_(padded(ids)),
            RolloutRow.state.in_(list(ACTIVE)) | (
                unfinished_abort() & (RolloutRow.abort_mode == REVERT)
                & RolloutDeviceRow.state.in_(_UNREVERTED)
            ),
        )
    )  # fmt: skip
    return {device_id: rollout_id for device_id, rollout_id in rows}


def cohort_exclusion(
    session: Session,
    device: DeviceRow,
    mv: ModelVersionRow,
    *,
    offline_before: dt.datetime,
    artifact_reasons: dict[str | None, str | None],
) -> str | None:
    """Why `device` cannot take part (None: it can). `artifact_reasons`
    caches the build check per class."""
    if device.state != ACCEPTED:
        return f"device is {device.state}"
    if device.class_id is None:
        return "device matches no device class"
    if device.class_id not in artifact_reasons:
        found = artifact_for(session, device, mv)
        artifact_reasons[device.class_id] = found if isinstance(found, str) else None
    if artifact_reasons[device.class_id] is not None:
        return artifact_reasons[device.class_id]
    if device.last_seen_at is None or device.last_seen_at < offline_before:
        return "device is offline"
    return None


def matching_devices(session: Session, spec: RolloutSpec) -> tuple[list[DeviceRow], dict[str, str]]:
    """Devices in the spec's classes (if any) carrying its labels (if any),
    and class id -> name."""
    classes = {c.id: c.name for c in session.scalars(select(DeviceClassRow))}
    stmt = select(DeviceRow).where(DeviceRow.state != "decommissioned")
    if spec.class_names:
        known = {name: cid for cid, name in classes.items()}
        missing = [n for n in spec.class_names if n not in known]
        if missing:
            raise NotFound(f"no device class named {', '.join(repr(n) for n in missing)}")
        stmt = stmt.where(DeviceRow.class_id.in_([known[n] for n in spec.class_names]))
    selector = spec.label_selector
    rows = [
        d
        for d in session.scalars(stmt.order_by(DeviceRow.id))
        if all(d.labels.get(k) == v for k, v in selector.items())
    ]
    return rows, classes


class RolloutService:
    def __init__(self, db: Database, events: EventSink, *, offline_after_s: float) -> None:
        self._db = db
        self._events = events
        self._offline_after = dt.timedelta(seconds=offline_after_s)

    # ------------------------------------------------------------ planning

    def _plan(
        self, session: Session, spec: RolloutSpec, mv: ModelVersionRow, exclude_rollout: str = ""
    ) -> Plan:
        devices, classes = matching_devices(session, spec)
        busy = active_rollout_of(session, (d.id for d in devices), model_id=mv.model_id)
        offline_before = utcnow() - self._offline_after
        reasons: dict[str | None, str | None] = {}
        members: list[DeviceRow] = []
        excluded: list[Excluded] = []
        for device in devices:
            reason = cohort_exclusion(
                session, device, mv, offline_before=offline_before, artifact_reasons=reasons
            )
            other = busy.get(device.id)
            if reason is None and other and other != exclude_rollout:
                reason = f"already in active rollout {other}"
            if reason is None:
                members.append(device)
            else:
                excluded.append(Excluded(device.id, device.name, reason))
        # What notifying them would refuse anyway (a full memory budget, an
        # old one-model agent): left out now, so the plan and its dry run
        # say so instead of the rollout rejecting them later.
        model_name = session.get_one(ModelRow, mv.model_id).name
        refused = holding_refusals(session, members, mv, model_name)
        if refused:
            excluded += [Excluded(d.id, d.name, refused[d.id]) for d in members if d.id in refused]
            members = [d for d in members if d.id not in refused]
        cohort = [CohortDevice(d.id, classes.get(d.class_id or "", "")) for d in members]
        stages = plan_stages(cohort, [s.size for s in spec.stages])
        by_id = {d.id: d for d in members}
        # The model's version each device serves (not its other models'):
        # what a revert of this rollout goes back to.
        previous = revert_targets(session, list(by_id), mv.model_id)
        planned = [
            PlannedDevice(
                device_id,
                by_id[device_id].name,
                classes.get(by_id[device_id].class_id or "", ""),
                index,
                previous.get(device_id),
            )
            for index, stage in enumerate(stages)
            for device_id in stage
        ]
        return Plan(planned, excluded)

    @staticmethod
    def _spec(spec: RolloutSpec) -> RolloutSpec:
        try:
            spec.validate()
        except SpecError as exc:
            raise InvalidArgument(str(exc)) from None
        return spec

    # ------------------------------------------------------------ create

    def create(
        self, actor: str, spec: RolloutSpec, *, dry_run: bool = False, start: bool = False
    ) -> tuple[RolloutView | None, Plan]:
        """Plan the rollout; unless `dry_run`, store it (a draft, or started
        when `start`). Fails if a cohort device is in another active rollout."""
        self._spec(spec)
        with self._db.unit_of_work() as uow:
            session = uow.session
            mv = require_assignable(session, spec.model_name, spec.model_version)
            plan = self._plan(session, spec, mv)
            if dry_run:
                return None, plan
            busy = [e for e in plan.excluded if e.reason.startswith("already in active rollout")]
            if busy and start:
                self._conflict(busy)
            if not plan.devices:
                raise FailedPrecondition(
                    "no device can take part: "
                    + ("; ".join(f"{e.name}: {e.reason}" for e in plan.excluded) or "none match")
                )
            row = RolloutRow(
                id=secrets.new_id(),
                model_version_id=mv.id,
                spec=spec.to_dict(),
                state=RolloutState.DRAFT,
                current_stage=0,
                stages=write_stages(read_stages([], len(spec.stages))),
                reason="",
                abort_mode="",
                created_by=actor,
                start_at=spec.start_at,
                excluded=[
                    {"device_id": e.device_id, "name": e.name, "reason": e.reason}
                    for e in plan.excluded
                ],
            )
            session.add(row)
            session.flush()
            if plan.devices:
                insert_rows(session, RolloutDeviceRow, [
                    {
                        "rollout_id": row.id, "device_id": p.device_id,
                        "class_name": p.class_name, "stage": p.stage,
                        "state": MemberState.WAITING,
                        "reason": "", "attempts": 0, "sequence": 0,
                        "previous_model_version_id": p.previous_model_version_id,
                    }
                    for p in plan.devices
                ])  # fmt: skip
            audit.record(
                uow, actor, "rollout.create", f"rollout:{row.id}",
                model=f"{spec.model_name}@{spec.model_version}", devices=len(plan.devices),
                excluded=len(plan.excluded),
            )  # fmt: skip
            if start:
                self._start(uow, row, actor)
            uow.commit()
            view = self._view(session, row)
        self._announce(view.row.id, "created")
        return view, plan

    @staticmethod
    def _refuse_busy(session: Session, row: RolloutRow, device_ids: Sequence[str]) -> None:
        """Refuse when any of `device_ids` is in another active rollout of
        this rollout's model, naming each device and that rollout."""
        model_id = session.get_one(ModelVersionRow, row.model_version_id).model_id
        busy = {
            d: r
            for d, r in active_rollout_of(session, device_ids, model_id=model_id).items()
            if r != row.id
        }
        if not busy:
            return
        rows = session.execute(
            select(DeviceRow.id, DeviceRow.name).where(DeviceRow.id.in_(padded(list(busy))))
        )
        names = {device_id: name for device_id, name in rows}
        RolloutService._conflict([
            Excluded(d, names.get(d, d), f"already in active rollout {r}") for d, r in busy.items()
        ])  # fmt: skip

    @staticmethod
    def _conflict(busy: Sequence[Excluded]) -> NoReturn:
        raise FailedPrecondition(
            f"{len(busy)} device(s) are already in another active rollout of the model (at "
            "most one per device and model; an aborted rollout holds the devices it is still "
            "reverting): " + "; ".join(f"{e.name} ({e.device_id}): {e.reason}" for e in busy)
        )

    def _start(self, uow: UnitOfWork, row: RolloutRow, actor: str) -> None:
        session = uow.session
        ids = list(session.scalars(
            select(RolloutDeviceRow.device_id).where(RolloutDeviceRow.rollout_id == row.id)
        ))  # fmt: skip
        self._refuse_busy(session, row, ids)
        now = utcnow()
        if row.start_at is not None and row.start_at > now:
            row.state = rollout_transition(row.id, row.state, RolloutEvent.START,
                                           RolloutState.SCHEDULED)  # fmt: skip
        else:
            row.state = rollout_transition(row.id, row.state, RolloutEvent.START,
                                           RolloutState.RUNNING)  # fmt: skip
            row.started_at = now
            stages = read_stages(row.stages, len(row.spec["stages"]))
            stages[0] = stages[0].started(now)
            row.stages = write_stages(stages)
        audit.record(uow, actor, "rollout.start", f"rollout:{row.id}", state=row.state)

    # ------------------------------------------------------------ actions

    def _act(
        self, actor: str, rollout_id: str, action: str, change: Any, **details: Any
    ) -> RolloutView:
        with self._db.unit_of_work() as uow:
            row = self._require(uow.session, rollout_id, for_update=True)
            change(uow, row)
            audit.record(uow, actor, f"rollout.{action}", f"rollout:{row.id}", state=row.state,
                         **details)  # fmt: skip
            uow.commit()
            view = self._view(uow.session, row)
        self._announce(rollout_id, action)
        return view

    def start(self, actor: str, rollout_id: str) -> RolloutView:
        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            rollout_transition(row.id, row.state, RolloutEvent.START, RolloutState.RUNNING)
            self._start(uow, row, actor)

        return self._act(actor, rollout_id, "started", change)

    def pause(self, actor: str, rollout_id: str, reason: str) -> RolloutView:
        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            row.state = rollout_transition(row.id, row.state, RolloutEvent.PAUSE)
            row.reason = f"paused by {actor}" + (f": {reason}" if reason else "")

        return self._act(actor, rollout_id, "pause", change, reason=reason)

    def resume(self, actor: str, rollout_id: str, reason: str) -> RolloutView:
        """Back to running. The current stage's failures so far are
        acknowledged: they leave its success denominator, and its error
        threshold counts only what finishes from now on."""

        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            target = RolloutState.RUNNING if row.started_at else RolloutState.SCHEDULED
            row.state = rollout_transition(row.id, row.state, RolloutEvent.RESUME, target)
            self._acknowledge(uow.session, row)
            row.reason = ""

        return self._act(actor, rollout_id, "resume", change, reason=reason)

    @staticmethod
    def _acknowledge(session: Session, row: RolloutRow) -> None:
        """Acknowledge the current stage's finished members and put a failed
        stage back to rolling (its bake starts afresh)."""
        r = RolloutDeviceRow
        session.execute(
            update(r)
            .where(r.rollout_id == row.id, r.stage == row.current_stage,
                   r.state.in_(list(_FINISHED)))
            .values(acknowledged=True)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
        row.members_revision += 1
        stages = read_stages(row.stages, len(row.spec["stages"]))
        current = stages[row.current_stage]
        if current.phase in (StagePhase.FAILED, StagePhase.BAKING):
            stages[row.current_stage] = replace(
                current, phase=StagePhase.ROLLING, bake_started_at=None
            )
        row.stages = write_stages(stages)

    @staticmethod
    def _at_stage(row: RolloutRow, stage: int | None) -> None:
        """Refuse when the operator meant another stage than the current one
        (a repeated promote would otherwise pass the next stage too)."""
        if stage is not None and stage != row.current_stage:
            raise FailedPrecondition(
                f"rollout {row.id} is at stage {row.current_stage + 1}, not stage {stage + 1}: "
                "nothing done (was it passed already?)"
            )

    def approve(self, actor: str, rollout_id: str, stage: int | None = None) -> RolloutView:
        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            self._at_stage(row, stage)
            row.state = rollout_transition(row.id, row.state, RolloutEvent.APPROVE)
            advance_stage(uow.session, row, utcnow())
            row.reason = ""

        return self._act(actor, rollout_id, "approve", change)

    def promote(
        self, actor: str, rollout_id: str, reason: str, stage: int | None = None
    ) -> RolloutView:
        """Pass the current stage now, whatever its thresholds and gates say
        (Argo Rollouts' promote): the next stage starts; after the last, the
        rollout finishes once every member settled."""

        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            self._at_stage(row, stage)
            row.state = rollout_transition(row.id, row.state, RolloutEvent.PROMOTE)
            stages = read_stages(row.stages, len(row.spec["stages"]))
            if stages[row.current_stage].phase in (StagePhase.PASSED, StagePhase.PROMOTED):
                raise FailedPrecondition(
                    f"rollout {row.id}: every stage passed already; it waits for its members "
                    "to finish (skip those it should not wait for)"
                )
            advance_stage(uow.session, row, utcnow(), promoted_by=actor)
            row.reason = ""

        # The audit log counts stages from 1, as the operator named it.
        shown = None if stage is None else stage + 1
        return self._act(actor, rollout_id, "promote", change, reason=reason, stage=shown)

    def retry(
        self, actor: str, rollout_id: str, device_ids: Sequence[str], reason: str
    ) -> RolloutView:
        """Failed members (all of them when `device_ids` is empty) try again,
        with a fresh retry budget; a paused rollout, or one that succeeded
        with failures, runs again."""

        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            session = uow.session
            target = RolloutState.RUNNING if row.started_at else RolloutState.SCHEDULED
            if row.state not in (RolloutState.PAUSED, RolloutState.SUCCEEDED_WITH_FAILURES):
                target = RolloutState(row.state)
            state = rollout_transition(row.id, row.state, RolloutEvent.RETRY, target)
            members = self._members(session, row.id, device_ids)
            if not device_ids:
                members = [m for m in members if member_can(m.state, MemberEvent.RETRY)]
                if not members:
                    raise FailedPrecondition(f"rollout {row.id} has no failed member to retry")
            self._refuse(members, MemberEvent.RETRY, "only failed, rejected or timed-out "
                         "members are retried")  # fmt: skip
            if row.state == RolloutState.SUCCEEDED_WITH_FAILURES:
                self._refuse_busy(session, row, [m.device_id for m in members])
                row.finished_at = None
            row.members_revision += 1
            why = f"retried by {actor}" + (f": {reason}" if reason else "")
            for m in members:
                m.state = member_transition(m.state, MemberEvent.RETRY)
                m.reason, m.attempts, m.acknowledged = why, 0, False
                m.next_attempt_at = m.finished_at = None
            row.state = state
            if state is RolloutState.RUNNING:
                row.reason = ""

        return self._act(actor, rollout_id, "retry", change, reason=reason,
                         devices=list(device_ids))  # fmt: skip

    def skip(
        self, actor: str, rollout_id: str, device_ids: Sequence[str], reason: str
    ) -> RolloutView:
        """Leave members on the version they run: the rollout no longer
        waits for them, and they leave their stage's success denominator."""

        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            rollout_transition(row.id, row.state, RolloutEvent.SKIP)
            if not device_ids:
                raise InvalidArgument("name the devices to skip")
            if not reason.strip():
                raise InvalidArgument("say why the devices are skipped (--reason)")
            members = self._members(uow.session, row.id, device_ids)
            self._refuse(members, MemberEvent.SKIP, "only waiting, notified, installing or "
                         "failed members are skipped")  # fmt: skip
            row.members_revision += 1
            for m in members:
                m.state = member_transition(m.state, MemberEvent.SKIP)
                m.reason, m.finished_at = f"skipped by {actor}: {reason}", utcnow()

        return self._act(actor, rollout_id, "skip", change, reason=reason,
                         devices=list(device_ids))  # fmt: skip

    def update(self, actor: str, rollout_id: str, spec: RolloutSpec, reason: str) -> RolloutView:
        """Change the thresholds, gates, bake times, approvals, on-failure
        actions and pacing of a rollout not finished; its model, cohort and
        stage sizes stay (its members are planned by them)."""
        changes: dict[str, Any] = {}

        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            rollout_transition(row.id, row.state, RolloutEvent.UPDATE)
            old = RolloutSpec.from_dict(row.spec)
            # What cannot change is checked first: its message is the useful
            # one (a stage added fails the sizes' validation too).
            for name, was, now in (
                ("model", f"{old.model_name}@{old.model_version}",
                 f"{spec.model_name}@{spec.model_version}"),
                ("classes", ", ".join(old.class_names) or "none",
                 ", ".join(spec.class_names) or "none"),
                ("label selector", _labels(old.label_selector), _labels(spec.label_selector)),
                ("dynamic cohort", str(old.dynamic).lower(), str(spec.dynamic).lower()),
                ("number of stages", str(len(old.stages)), str(len(spec.stages))),
            ):  # fmt: skip
                if was != now:
                    raise InvalidArgument(
                        f"a rollout's {name} cannot change (it is {was}, not {now}); "
                        "create another rollout"
                    )
            self._spec(spec)
            for index, (a, b) in enumerate(zip(old.stages, spec.stages, strict=True)):
                if (a.percent, a.count, a.stratified, a.shadow) != (
                    b.percent, b.count, b.stratified, b.shadow
                ):  # fmt: skip
                    raise InvalidArgument(
                        f"stage {index + 1}: its size and kind cannot change (its members are "
                        "planned); thresholds, gates, bake, approval and on-failure can"
                    )
            if spec.start_at != old.start_at and row.state != RolloutState.DRAFT:
                raise InvalidArgument("the start time changes only while the rollout is a draft")
            changes.update(_differences(old.to_dict(), spec.to_dict()))
            if not changes:
                raise InvalidArgument("the spec is the rollout's already: nothing to change")
            row.spec = spec.to_dict()
            row.start_at = spec.start_at

        return self._act(actor, rollout_id, "update", change, reason=reason, changes=changes)

    @staticmethod
    def _members(
        session: Session, rollout_id: str, device_ids: Sequence[str]
    ) -> list[RolloutDeviceRow]:
        """The rollout's members, those of `device_ids` when given (every
        one must be a member)."""
        members = RolloutService._devices(session, rollout_id)
        if not device_ids:
            return members
        wanted = set(device_ids)
        chosen = [m for m in members if m.device_id in wanted]
        missing = wanted - {m.device_id for m in chosen}
        if missing:
            raise NotFound(
                f"not in rollout {rollout_id}: {', '.join(sorted(missing)[:10])}"
                + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            )
        return chosen

    @staticmethod
    def _refuse(members: Sequence[RolloutDeviceRow], event: MemberEvent, rule: str) -> None:
        wrong = [m for m in members if not member_can(m.state, event)]
        if wrong:
            shown = ", ".join(f"{m.device_id} ({m.state.replace('_', ' ')})" for m in wrong[:10])
            more = f" and {len(wrong) - 10} more" if len(wrong) > 10 else ""
            raise FailedPrecondition(f"{rule}: {shown}{more}")

    def abort(self, actor: str, rollout_id: str, *, revert: bool, reason: str) -> RolloutView:
        def change(uow: UnitOfWork, row: RolloutRow) -> None:
            rollout_transition(row.id, row.state, RolloutEvent.ABORT)
            abort(row, REVERT if revert else KEEP, f"aborted by {actor}" + (
                f": {reason}" if reason else ""))  # fmt: skip
            if not revert:
                # Finished now: the orchestrator no longer steps it, so
                # those never notified are dropped here (with revert, its
                # planner drops them beside the reverts).
                result = uow.session.execute(
                    update(RolloutDeviceRow)
                    .where(RolloutDeviceRow.rollout_id == row.id,
                           RolloutDeviceRow.state == MemberState.WAITING)
                    .values(state=member_transition(MemberState.WAITING, MemberEvent.DROP),
                            reason=NEVER_NOTIFIED, finished_at=utcnow())
                )  # fmt: skip
                dropped = result.rowcount  # type: ignore[attr-defined]
                if dropped:
                    row.members_revision += 1
                    row.reason += f"; {outcome_words({MemberState.DROPPED: dropped})}"

        return self._act(actor, rollout_id, "abort", change, revert=revert, reason=reason)

    # ------------------------------------------------------------ queries

    def get(self, rollout_id: str, *, device_limit: int | None = None) -> RolloutView:
        """The rollout and its devices: every one, or the `device_limit` that
        most need a look (failed, then moving, then the rest; by stage and
        id), with the stage counts still of every device."""
        with self._db.unit_of_work(readonly=True) as uow:
            session = uow.session
            row = self._require(session, rollout_id)
            if device_limit is None:
                return self._view(session, row)
            r = RolloutDeviceRow
            attention = case(
                (r.state.in_(list(FAILED_STATES)), 0),
                (r.state.in_(_MOVING), 1),
                else_=2,
            )
            devices = list(session.scalars(
                select(r).where(r.rollout_id == rollout_id)
                .order_by(attention, r.stage, r.device_id).limit(device_limit)
            ))  # fmt: skip
            counts, acked = self._counts(session, rollout_id)[rollout_id]
            return RolloutView(row, RolloutSpec.from_dict(row.spec), devices,
                               self._names(session, devices), counts, acked)  # fmt: skip

    def summary(self, rollout_id: str) -> RolloutView:
        """The rollout with per-stage device counts but no device rows: what
        live views need on every change, cheap for 10,000 devices."""
        with self._db.unit_of_work(readonly=True) as uow:
            session = uow.session
            row = self._require(session, rollout_id)
            counts, acked = self._counts(session, rollout_id)[rollout_id]
            return RolloutView(row, RolloutSpec.from_dict(row.spec), [], {}, counts, acked)

    @staticmethod
    def _counts(session: Session, rollouts: str | Select[Any]) -> defaultdict[str, _Counts]:
        """Members per (stage, state), and acknowledged failed members per
        stage, of one rollout (an id) or of those a query of ids selects,
        counted in SQL; by rollout id."""
        r = RolloutDeviceRow
        where = r.rollout_id == rollouts if isinstance(rollouts, str) else r.rollout_id.in_(
            rollouts)  # fmt: skip
        counts: defaultdict[str, _Counts] = defaultdict(lambda: ({}, {}))
        for rollout_id, stage, state, acknowledged, n in session.execute(
            select(r.rollout_id, r.stage, r.state, r.acknowledged, func.count())
            .where(where).group_by(r.rollout_id, r.stage, r.state, r.acknowledged)
        ):  # fmt: skip
            per_state, acked = counts[rollout_id]
            per_state[(stage, state)] = per_state.get((stage, state), 0) + n
            if acknowledged and state in FAILED_STATES:
                acked[stage] = acked.get(stage, 0) + n
        return counts

    def list_rollouts(self, state: str = "") -> list[RolloutView]:
        """Every rollout (in `state`), newest first, as summaries: stage
        counts from one GROUP BY, no device rows (a list of rollouts of
        10,000 devices each read every member of every one)."""
        if state and state not in set(RolloutState):
            raise InvalidArgument(f"unknown rollout state {state!r}")
        in_state = [RolloutRow.state == state] if state else []
        stmt = select(RolloutRow).where(*in_state).order_by(RolloutRow.created_at.desc())
        with self._db.unit_of_work(readonly=True) as uow:
            rows = list(uow.session.scalars(stmt))
            counts = self._counts(uow.session, select(RolloutRow.id).where(*in_state))
            return [
                RolloutView(row, RolloutSpec.from_dict(row.spec), [], {}, *counts[row.id])
                for row in rows
            ]

    @staticmethod
    def _require(session: Session, rollout_id: str, *, for_update: bool = False) -> RolloutRow:
        if not rollout_id:
            raise InvalidArgument("rollout id is required")
        stmt = select(RolloutRow).where(RolloutRow.id == rollout_id)
        if for_update:
            stmt = stmt.with_for_update()
        row = session.scalar(stmt)
        if row is None:
            raise NotFound(f"no rollout with id {rollout_id!r}")
        return row

    @staticmethod
    def _devices(session: Session, rollout_id: str) -> list[RolloutDeviceRow]:
        return list(session.scalars(
            select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == rollout_id)
            .order_by(RolloutDeviceRow.stage, RolloutDeviceRow.device_id)
        ))  # fmt: skip

    def _view(self, session: Session, row: RolloutRow) -> RolloutView:
        devices = self._devices(session, row.id)
        # By a join, not IN (every member): SQLite keeps each compiled
        # statement per connection, and a 10,000-id one is 2 MB.
        names = {device_id: name for device_id, name in session.execute(
            select(DeviceRow.id, DeviceRow.name)
            .join(RolloutDeviceRow, RolloutDeviceRow.device_id == DeviceRow.id)
            .where(RolloutDeviceRow.rollout_id == row.id)
        )}  # fmt: skip
        return RolloutView(row, RolloutSpec.from_dict(row.spec), devices, names)

    @staticmethod
    def _names(session: Session, devices: Sequence[RolloutDeviceRow]) -> dict[str, str]:
        # Not dict(result): a Result has keys(), so dict() would index it.
        return {device_id: name for device_id, name in session.execute(
            select(DeviceRow.id, DeviceRow.name).where(
                DeviceRow.id.in_(padded([d.device_id for d in devices])))
        )}  # fmt: skip

    def _announce(self, rollout_id: str, what: str) -> None:
        self._events.publish(FleetEvent("rollout.updated", subject=rollout_id, message=what))


# ---------------------------------------------------------------- transitions


def advance_stage(
    session: Session, row: RolloutRow, now: dt.datetime, promoted_by: str = ""
) -> None:
    """Pass the current stage and start the next one (after a shadow stage
    its members take the version for real with it); after the last, the
    rollout runs on until every member settled (the planner finishes it)."""
    stages = read_stages(row.stages, len(row.spec["stages"]))
    index = row.current_stage
    stages[index] = stages[index].done(now, promoted_by)
    if index + 1 < len(stages):
        row.current_stage += 1
        stages[row.current_stage] = stages[row.current_stage].started(now)
        if RolloutSpec.from_dict(row.spec).stages[index].shadow:
            row.members_revision += 1
            r = RolloutDeviceRow
            session.execute(
                update(r)
                .where(r.rollout_id == row.id, r.stage == index,
                       r.state.in_([s for (s, e) in MEMBER_TRANSITIONS
                                    if e is MemberEvent.REJOIN]))
                .values(stage=index + 1, state=MemberState.WAITING, reason="shadow passed",
                        attempts=0)
                .execution_options(synchronize_session=False)
            )  # fmt: skip
    row.stages = write_stages(stages)


# Stage phases an operator's abort ends as ABORTED (a failed stage stays
# failed; one not started stays pending).
_ABORTABLE_PHASES = (StagePhase.ROLLING, StagePhase.BAKING, StagePhase.WAITING_APPROVAL)


def abort(row: RolloutRow, mode: str, reason: str) -> None:
    """Abort; with "revert" the orchestrator then puts every member that took
    the version back on its previous one, and finishes the rollout."""
    row.state = RolloutState.ABORTED
    row.abort_mode = mode
    row.reason = reason
    stages = read_stages(row.stages, len(row.spec["stages"]))
    current = stages[row.current_stage]
    if current.phase in _ABORTABLE_PHASES:
        stages[row.current_stage] = replace(current, phase=StagePhase.ABORTED)
        row.stages = write_stages(stages)
    if mode == KEEP:
        row.finished_at = utcnow()


def _labels(selector: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) or "none"


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Field path -> [old, new] for every leaf that differs (for the audit
    log). A stage is named as the CLI and the TUI name it: `stage 2.bake_time_s`."""
    out: dict[str, Any] = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_differences(a, b, path + "."))
        elif isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                item = f"stage {i + 1}" if path == "stages" else f"{path}[{i}]"
                if isinstance(x, dict) and isinstance(y, dict):
                    out.update(_differences(x, y, f"{item}."))
                elif x != y:
                    out[item] = [x, y]
        elif a != b:
            out[path] = [a, b]
    return out
