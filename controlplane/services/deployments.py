"""Deployments: which artifact each device should run (its assignment), and
the history of what its agent did with it.

An assignment names a model version; each device gets the artifact its own
class's successful build published, with that build's signed manifest. The
assignment sequence counts up per device, so an agent can refuse anything
older than what it has seen. Assigning is all-or-nothing: if one device
cannot take the version, nothing is assigned and the error lists every
device that cannot, with the reason.

History: agents report their update state (agent/update/states.py) on the
sync stream; every change of (sequence, state) becomes a DeploymentEventRow.
Download progress updates the device's current status only, so the history
stays a list of states, not of chunks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane.db.models import (
    ArtifactRow,
    BuildRow,
    DeploymentEventRow,
    DeviceAssignmentRow,
    DeviceRow,
    ModelRow,
    ModelVersionRow,
)
from controlplane.db.uow import Database
from controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from controlplane.services import audit
from controlplane.services.builds import SUCCEEDED
from controlplane.services.devices import ACCEPTED, EventSink
from controlplane.services.events import FleetEvent
from controlplane.services.registry import filter_by_model, require_version

MAX_DEVICES_PER_CALL = 1000
DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 10_000


@dataclass(frozen=True)
class AssignmentView:
    """A device's current assignment, with what the agent needs to install it."""

    device_id: str
    class_name: str
    model_name: str
    model_version: str
    artifact_digest: str
    artifact_size: int
    runtime: str
    manifest: bytes
    manifest_signature: bytes
    sequence: int
    rollout_id: str
    assigned_by: str
    assigned_at: dt.datetime
    shadow: bool = False


@dataclass(frozen=True)
class History:
    events: list[DeploymentEventRow]
    assignments: list[AssignmentView]


def artifact_for(session: Session, device: DeviceRow, mv: ModelVersionRow) -> ArtifactRow | str:
    """The artifact `device` would run for `mv`, or why there is none."""
    if device.state != ACCEPTED:
        return f"device is {device.state}; only accepted devices take models"
    if device.class_id is None:
        return "device matches no device class"
    build = session.scalar(
        select(BuildRow)
        .where(
            BuildRow.model_version_id == mv.id,
            BuildRow.class_id == device.class_id,
            BuildRow.state == SUCCEEDED,
        )
        .order_by(BuildRow.finished_at.desc())
        .limit(1)
    )
    if build is None:
        return "its class has no successful build of this version (edgefleet builds ls)"
    artifact = session.scalar(select(ArtifactRow).where(ArtifactRow.build_id == build.id))
    if artifact is None:
        return f"build {build.id} published no artifact"
    return artifact


def assign_device(
    session: Session,
    device: DeviceRow,
    mv: ModelVersionRow,
    artifact: ArtifactRow,
    *,
    actor: str,
    rollout_id: str | None = None,
    shadow: bool = False,
) -> DeviceAssignmentRow:
    """Make `artifact` the device's assignment in the caller's transaction:
    the next sequence, a new desired-state revision. The caller publishes
    the desired-state change after its commit."""
    device.assignment_seq += 1
    device.desired_revision += 1
    row = session.get(DeviceAssignmentRow, device.id)
    if row is None:
        row = DeviceAssignmentRow(device_id=device.id)
        session.add(row)
    row.sequence = device.assignment_seq
    row.artifact_id = artifact.id
    row.model_version_id = mv.id
    row.rollout_id = rollout_id
    row.shadow = shadow
    row.assigned_by = actor
    row.assigned_at = dt.datetime.now(dt.UTC)
    session.flush()
    return row


def _view(session: Session, row: DeviceAssignmentRow) -> AssignmentView:
    artifact = session.get_one(ArtifactRow, row.artifact_id)
    mv = session.get_one(ModelVersionRow, row.model_version_id)
    model = session.get_one(ModelRow, mv.model_id)
    build = session.get_one(BuildRow, artifact.build_id)
    return AssignmentView(
        device_id=row.device_id,
        class_name=artifact.class_name,
        model_name=model.name,
        model_version=mv.version,
        artifact_digest=artifact.digest,
        artifact_size=artifact.size_bytes,
        runtime=str(build.target.get("runtime", "")),
        manifest=artifact.manifest,
        manifest_signature=artifact.signature,
        sequence=row.sequence,
        rollout_id=row.rollout_id or "",
        assigned_by=row.assigned_by,
        assigned_at=row.assigned_at,
        shadow=row.shadow,
    )


def current_assignment(session: Session, device_id: str) -> AssignmentView | None:
    """The device's assignment, for its desired state."""
    row = session.get(DeviceAssignmentRow, device_id)
    return _view(session, row) if row is not None else None


def record_report(session: Session, device: DeviceRow, status: dict[str, Any]) -> bool:
    """Add a history event when the reported (sequence, state) differs from
    the last one recorded for the device. True if one was added."""
    state = status.get("state", "")
    if not state or not status.get("sequence"):
        return False
    previous = device.update_status or {}
    if previous.get("sequence") == status["sequence"] and previous.get("state") == state:
        return False
    session.add(
        DeploymentEventRow(
            device_id=device.id,
            sequence=int(status["sequence"]),
            rollout_id=status.get("rollout_id") or None,
            model_name=status.get("model_name", ""),
            model_version=status.get("model_version", ""),
            artifact_digest=status.get("artifact_digest", ""),
            state=state,
            reason=status.get("reason", ""),
            bytes_done=int(status.get("bytes_done", 0)),
            bytes_total=int(status.get("bytes_total", 0)),
        )
    )
    return True


class DeploymentService:
    def __init__(self, db: Database, events: EventSink) -> None:
        self._db = db
        self._events = events

    def assign(
        self,
        actor: str,
        device_ids: Sequence[str],
        model_name: str,
        version: str,
        *,
        reason: str = "",
        rollout_id: str | None = None,
    ) -> list[AssignmentView]:
        """Assign `model_name@version` to every device in `device_ids`, each
        its class's artifact; nothing is assigned unless all of them can."""
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise InvalidArgument("name at least one device to assign to")
        if len(ids) > MAX_DEVICES_PER_CALL:
            raise InvalidArgument(f"at most {MAX_DEVICES_PER_CALL} devices per call")
        if not model_name or not version:
            raise InvalidArgument("model name and version are required (MODEL@VERSION)")
        with self._db.unit_of_work() as uow:
            session = uow.session
            mv = require_version(session, model_name, version)
            rows = session.scalars(select(DeviceRow).where(DeviceRow.id.in_(ids)))
            devices = {d.id: d for d in rows}
            missing = [i for i in ids if i not in devices]
            if missing:
                raise NotFound(f"no device with id {', '.join(repr(i) for i in missing)}")
            chosen: dict[str, ArtifactRow] = {}
            refused: list[str] = []
            for device_id in ids:
                found = artifact_for(session, devices[device_id], mv)
                if isinstance(found, str):
                    refused.append(f"{device_id}: {found}")
                else:
                    chosen[device_id] = found
            if refused:
                raise FailedPrecondition(
                    f"cannot assign {model_name}@{version} to {len(refused)} of {len(ids)} "
                    f"device(s); nothing was assigned: " + "; ".join(refused)
                )
            views = []
            for device_id in ids:
                row = assign_device(
                    session, devices[device_id], mv, chosen[device_id], actor=actor,
                    rollout_id=rollout_id,
                )  # fmt: skip
                views.append(_view(session, row))
                audit.record(
                    uow,
                    actor,
                    "device.assign",
                    f"device:{device_id}",
                    model=f"{model_name}@{version}",
                    artifact=chosen[device_id].digest,
                    sequence=row.sequence,
                    reason=reason,
                )
            uow.commit()
        self._events.publish(
            FleetEvent("device.assigned", tuple(ids), desired_changed=True, subject=model_name)
        )
        return views

    def current(self, device_id: str) -> AssignmentView | None:
        """The device's assignment (None: nothing assigned)."""
        with self._db.unit_of_work(readonly=True) as uow:
            return current_assignment(uow.session, device_id)

    def record_status(
        self, device_id: str, applied_revision: int, update_status: dict[str, Any]
    ) -> None:
        """Store what an agent reported: the revision it applied and where
        its update is; a new (sequence, state) is added to the history."""
        with self._db.unit_of_work() as uow:
            row = uow.session.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(f"no device with id {device_id!r}")
            row.applied_revision = applied_revision
            changed = False
            if update_status:
                changed = record_report(uow.session, row, update_status)
                row.update_status = update_status
            uow.commit()
        kind = "deployment.updated" if changed else "device.updated"
        self._events.publish(FleetEvent(kind, (device_id,), subject=update_status.get("state", "")))

    def history(
        self,
        *,
        device_id: str = "",
        model_name: str = "",
        version: str = "",
        limit: int = 0,
    ) -> History:
        """Reported update states, newest first, and the current assignments
        of the devices the filter matches."""
        if version and not model_name:
            raise InvalidArgument("a model version filter needs the model name")
        if limit < 0 or limit > MAX_HISTORY_LIMIT:
            raise InvalidArgument(f"limit must be between 0 and {MAX_HISTORY_LIMIT}")
        with self._db.unit_of_work(readonly=True) as uow:
            session = uow.session
            if device_id and session.get(DeviceRow, device_id) is None:
                raise NotFound(f"no device with id {device_id!r}")
            stmt = select(DeploymentEventRow).order_by(DeploymentEventRow.id.desc())
            if device_id:
                stmt = stmt.where(DeploymentEventRow.device_id == device_id)
            if model_name:
                stmt = stmt.where(DeploymentEventRow.model_name == model_name)
            if version:
                stmt = stmt.where(DeploymentEventRow.model_version == version)
            events = list(session.scalars(stmt.limit(limit or DEFAULT_HISTORY_LIMIT)))
            current = select(DeviceAssignmentRow).order_by(DeviceAssignmentRow.device_id)
            if device_id:
                current = current.where(DeviceAssignmentRow.device_id == device_id)
            current = filter_by_model(
                current, DeviceAssignmentRow.model_version_id, model_name, version
            )
            assignments = [_view(session, row) for row in session.scalars(current)]
            return History(events, assignments)
