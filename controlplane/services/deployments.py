"""Deployments: which artifact each device should run (its assignment), and
the history of what its agent did with it.

An assignment names a model version; each device gets the artifact its own
class's successful build published, with that build's signed manifest. The
assignment sequence counts up per device, so an agent can refuse anything
older than what it has seen. Assigning is all-or-nothing: if one device
cannot take the version, nothing is assigned and the error lists every
device that cannot, with the reason.

Every assignment carries an AssignmentStatement signed with the current
signing key (services/statements.py), made here when the assignment is
written and stored with it, so all replicas push the same bytes and the
push path signs nothing. Its `rollback` flag is the control plane's
explicit permission to go back to an older version (agents refuse a
downgrade without it); see `assign_devices`.

History: agents report their update state (agent/update/states.py) on the
sync stream; every change of (sequence, state) becomes a DeploymentEventRow.
Download progress updates the device's current status only, so the history
stays a list of states, not of chunks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.bulk import insert_rows, update_rows
from edgefleet.controlplane.db.in_list import padded
from edgefleet.controlplane.db.models import (
    ArtifactRow,
    BuildRow,
    DeploymentEventRow,
    DeviceAssignmentRow,
    DeviceClassRow,
    DeviceRow,
    ModelRow,
    ModelVersionRow,
    utcnow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import semver, signing
from edgefleet.controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.controlplane.services import audit, keys, statements
from edgefleet.controlplane.services.builds import SUCCEEDED
from edgefleet.controlplane.services.devices import ACCEPTED, DesiredView, EventSink
from edgefleet.controlplane.services.events import FleetEvent
from edgefleet.controlplane.services.registry import filter_by_model, require_version

MAX_DEVICES_PER_CALL = 1000
DEFAULT_HISTORY_LIMIT = 100
# Ids per IN (...) list: well under SQLite's and PostgreSQL's parameter limits.
_IN_CHUNK = 1000
_PUBLISHED_CACHE = 256
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
    statement: bytes = b""
    statement_signature: bytes = b""
    rollback: bool = False
    # The key that signed the manifest (manifest_signature).
    manifest_key_id: str = ""


# What a sync stream sends a device: its desired state and its assignment.
Desired = tuple[DesiredView, AssignmentView | None]


@dataclass(frozen=True)
class History:
    events: list[DeploymentEventRow]
    assignments: list[AssignmentView]


def artifact_for(session: Session, device: DeviceRow, mv: ModelVersionRow) -> ArtifactRow | str:
    """The artifact `device` would run for `mv`, or why there is none."""
    return _artifact(session, device.state, device.class_id, mv.id, {})


def _artifact(
    session: Session,
    state: str,
    class_id: str | None,
    model_version_id: str,
    cache: dict[tuple[str, str], ArtifactRow | str],
) -> ArtifactRow | str:
    if state != ACCEPTED:
        return f"device is {state}; only accepted devices take models"
    if class_id is None:
        return "device matches no device class"
    key = (class_id, model_version_id)
    if key not in cache:
        cache[key] = _class_artifact(session, class_id, model_version_id)
    return cache[key]


def _class_artifact(session: Session, class_id: str, model_version_id: str) -> ArtifactRow | str:
    build = session.scalar(
        select(BuildRow)
        .where(
            BuildRow.model_version_id == model_version_id,
            BuildRow.class_id == class_id,
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


def assign_devices(
    session: Session,
    mv: ModelVersionRow,
    device_ids: Sequence[str],
    *,
    actor: str,
    rollout_id: str | None = None,
    shadow: bool = False,
    rollback: bool = False,
    artifacts: dict[tuple[str, str], ArtifactRow | str] | None = None,
    at: dt.datetime | None = None,
) -> dict[str, tuple[int, ArtifactRow] | str]:
    """Make each device's class artifact of `mv` its assignment, in the
    caller's transaction: the next sequence and a new desired-state revision
    per device. Per device: (sequence, artifact), or why it cannot take `mv`
    (nothing written for it). Set-based, so assigning thousands of devices
    costs a few statements per chunk rather than several per device; the
    device rows are locked first (FOR UPDATE on PostgreSQL) so concurrent
    assignments cannot hand out one sequence twice. `artifacts` caches the
    per-class lookups across calls; `at` is the assignment time (default
    now). Unknown devices are absent from the result. The caller publishes
    the desired-state changes after its commit.

    Each assignment gets its signed statement. Its rollback flag is set when
    `rollback` says so (a rollout sending devices back: revert, abort with
    revert, a dropped class) and otherwise per device when `mv` is older
    (semver) than the version of the same model in the device's current
    assignment or in the last update of that model it reported committed:
    an operator assigning an older version, or a rollout of one. Erring
    towards the flag is safe (it permits, never forces); missing it makes
    the agent refuse the downgrade.

    The active key is read after the device rows are locked: a rotation
    locks them all first (keys.rotate), so an assignment either commits
    before it (and is signed again by it) or reads the new key."""
    cache = {} if artifacts is None else artifacts
    model_name = session.get_one(ModelRow, mv.model_id).name
    target = semver.sort_key(mv.version)
    signer: tuple[str, signing.Signer] | None = None
    manifest_digests: dict[str, str] = {}
    result: dict[str, tuple[int, ArtifactRow] | str] = {}
    now = at or dt.datetime.now(dt.UTC)
    ids = list(dict.fromkeys(device_ids))
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        rows = session.execute(
            select(
                DeviceRow.id, DeviceRow.state, DeviceRow.class_id, DeviceRow.assignment_seq,
                DeviceRow.desired_revision,
            )
            .where(DeviceRow.id.in_(padded(chunk)))
            # In id order: two assignments locking the same devices in
            # different orders would deadlock on PostgreSQL.
            .order_by(DeviceRow.id)
            .with_for_update()
        ).all()  # fmt: skip
        if signer is None and rows:
            key = keys.signing_key(session)
            signer = (key.key_id, signing.Signer(key.private_key))
        counters: list[dict[str, Any]] = []
        values: dict[str, dict[str, Any]] = {}
        for device_id, state, class_id, seq, revision in rows:
            found = _artifact(session, state, class_id, mv.id, cache)
            if isinstance(found, str):
                result[device_id] = found
                continue
            result[device_id] = (seq + 1, found)
            counters.append(
                {"id": device_id, "assignment_seq": seq + 1, "desired_revision": revision + 1}
            )
            values[device_id] = {
                "device_id": device_id, "sequence": seq + 1, "artifact_id": found.id,
                "model_version_id": mv.id, "rollout_id": rollout_id, "shadow": shadow,
                "assigned_by": actor, "assigned_at": now,
            }  # fmt: skip
        if not counters:
            continue
        assert signer is not None
        update_rows(session, DeviceRow, counters)
        existing, newer = _current_versions(session, list(values), mv.model_id, model_name)
        key_id, sign = signer
        for device_id, row in values.items():
            artifact = cast(tuple[int, ArtifactRow], result[device_id])[1]
            digest = manifest_digests.get(artifact.id)
            if digest is None:
                digest = manifest_digests[artifact.id] = statements.manifest_sha256(
                    artifact.manifest
                )
            back = rollback or any(semver.sort_key(v) > target for v in newer.get(device_id, ()))
            statement = statements.assignment_statement(
                device_id=device_id, sequence=row["sequence"], model_name=model_name,
                model_version=mv.version, artifact_sha256=artifact.digest,
                manifest_digest=digest, shadow=shadow, rollback=back, key_id=key_id,
                issued_at=now, rollout_id=row["rollout_id"] or "",
                artifact_size=artifact.size_bytes,
            )  # fmt: skip
            row.update(
                statement=statement, statement_signature=sign.sign(statement), rollback=back,
                key_id=key_id,
            )  # fmt: skip
        replaced = [v for k, v in values.items() if k in existing]
        added = [v for k, v in values.items() if k not in existing]
        if replaced:
            update_rows(session, DeviceAssignmentRow, replaced)
        if added:
            insert_rows(session, DeviceAssignmentRow, added)
    return result


def _current_versions(
    session: Session, device_ids: list[str], model_id: str, model_name: str
) -> tuple[set[str], dict[str, list[str]]]:
    """The devices that have an assignment; and per device the versions of
    the model a new assignment must not go below without the rollback flag:
    its current assignment's (if of this model) and the one it last reported
    committed."""
    existing: set[str] = set()
    versions: dict[str, list[str]] = {}
    current = session.execute(
        select(DeviceAssignmentRow.device_id, ModelVersionRow.model_id, ModelVersionRow.version)
        .join(ModelVersionRow, ModelVersionRow.id == DeviceAssignmentRow.model_version_id)
        .where(DeviceAssignmentRow.device_id.in_(padded(device_ids)))
    )
    for device_id, current_model, version in current:
        existing.add(device_id)
        if current_model == model_id:
            versions.setdefault(device_id, []).append(version)
    e = DeploymentEventRow
    committed: dict[str, str] = {}
    for device_id, version in session.execute(
        select(e.device_id, e.model_version)
        .where(
            e.device_id.in_(padded(device_ids)),
            e.model_name == model_name,
            e.state == "committed",
        )
        .order_by(e.id)
    ):
        committed[device_id] = version
    for device_id, version in committed.items():
        versions.setdefault(device_id, []).append(version)
    return existing, versions


def _published(session: Session, artifact_id: str, model_version_id: str) -> dict[str, Any]:
    """The parts of an assignment fixed once its artifact is published."""
    artifact = session.get_one(ArtifactRow, artifact_id)
    mv = session.get_one(ModelVersionRow, model_version_id)
    model = session.get_one(ModelRow, mv.model_id)
    build = session.get_one(BuildRow, artifact.build_id)
    return {
        "class_name": artifact.class_name,
        "model_name": model.name,
        "model_version": mv.version,
        "artifact_digest": artifact.digest,
        "artifact_size": artifact.size_bytes,
        "runtime": str(build.target.get("runtime", "")),
        "manifest": artifact.manifest,
        "manifest_signature": artifact.signature,
        "manifest_key_id": artifact.key_id,
    }


Published = dict[tuple[str, str, str], dict[str, Any]]


def _fixed(
    session: Session,
    artifact_id: str,
    model_version_id: str,
    key_id: str | None,
    cache: Published,
) -> dict[str, Any]:
    """_published, remembered in `cache` (bounded). Keyed by the key that
    signed the assignment's statement too: a rotation (on any replica) signs
    statements and manifests again in one transaction, so a row naming the
    new key never meets a manifest signature cached from before it. A read
    that straddled a rotation (the manifest signed by another key than the
    statement) is answered but not kept."""
    key = (artifact_id, model_version_id, key_id or "")
    fixed = cache.get(key)
    if fixed is None:
        fixed = _published(session, artifact_id, model_version_id)
        if key_id is not None and fixed["manifest_key_id"] != key_id:
            return fixed
        if len(cache) >= _PUBLISHED_CACHE:
            cache.clear()
        cache[key] = fixed
    return fixed


def _view(session: Session, row: DeviceAssignmentRow, cache: Published) -> AssignmentView:
    return AssignmentView(
        device_id=row.device_id,
        sequence=row.sequence,
        rollout_id=row.rollout_id or "",
        assigned_by=row.assigned_by,
        assigned_at=row.assigned_at,
        shadow=row.shadow,
        statement=row.statement,
        statement_signature=row.statement_signature,
        rollback=row.rollback,
        **_fixed(session, row.artifact_id, row.model_version_id, row.key_id, cache),
    )


@dataclass
class StatusReport:
    """What one agent reported since its last write: the revision it applied
    and its update statuses in arrival order (consecutive reports of the same
    (sequence, state), such as download progress, collapsed to the latest)."""

    applied_revision: int
    statuses: list[dict[str, Any]]

    def add(self, applied_revision: int, status: dict[str, Any]) -> None:
        """Fold a later report in."""
        self.applied_revision = applied_revision
        if not status:
            return
        if self.statuses and _same_step(self.statuses[-1], status):
            self.statuses[-1] = status
        else:
            self.statuses.append(status)

    def extend(self, later: StatusReport) -> None:
        """Fold in everything a later StatusReport of the device holds."""
        for status in later.statuses:
            self.add(later.applied_revision, status)
        self.applied_revision = later.applied_revision


def _same_step(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a.get("sequence") == b.get("sequence") and a.get("state") == b.get("state"))


def history_event(
    device_id: str, previous: dict[str, Any], status: dict[str, Any]
) -> dict[str, Any] | None:
    """The history row (as insert values) for `status` when its (sequence,
    state) differs from `previous`'s; None when it adds nothing."""
    state = status.get("state", "")
    if not state or not status.get("sequence") or _same_step(previous, status):
        return None
    return {
        "device_id": device_id,
        "sequence": int(status["sequence"]),
        "rollout_id": status.get("rollout_id") or None,
        "model_name": status.get("model_name", ""),
        "model_version": status.get("model_version", ""),
        "artifact_digest": status.get("artifact_digest", ""),
        "state": state,
        "reason": status.get("reason", ""),
        "bytes_done": int(status.get("bytes_done", 0)),
        "bytes_total": int(status.get("bytes_total", 0)),
        "at": utcnow(),
    }


class DeploymentService:
    def __init__(self, db: Database, events: EventSink) -> None:
        self._db = db
        self._events = events
        # Artifact and version details by (artifact, version): immutable once
        # published, and the same for every device a rollout pushes to, so a
        # push to 10,000 devices reads them once instead of 10,000 times.
        self._published: Published = {}
        # The signing-key rotations agents get with every desired state, and
        # the key they lead to. Reloaded when an assignment names another
        # key: a rotation signs every stored statement again, so that is how
        # any replica notices one without being told.
        self._chain: tuple[str, tuple[tuple[bytes, bytes], ...]] | None = None

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
            now = dt.datetime.now(dt.UTC)
            # Written first, checked after: a refusal raises, and the unit of
            # work rolls every write of the call back (all or nothing).
            assigned = assign_devices(session, mv, ids, actor=actor, rollout_id=rollout_id, at=now)
            missing = [i for i in ids if i not in assigned]
            if missing:
                raise NotFound(f"no device with id {', '.join(repr(i) for i in missing)}")
            refused = [f"{i}: {done}" for i in ids if isinstance(done := assigned[i], str)]
            if refused:
                raise FailedPrecondition(
                    f"cannot assign {model_name}@{version} to {len(refused)} of {len(ids)} "
                    f"device(s); nothing was assigned: " + "; ".join(refused)
                )
            views = []
            for device_id in ids:
                sequence, artifact = cast(tuple[int, ArtifactRow], assigned[device_id])
                views.append(AssignmentView(
                    device_id=device_id, sequence=sequence, rollout_id=rollout_id or "",
                    assigned_by=actor, assigned_at=now,
                    **_fixed(session, artifact.id, mv.id, None, self._published),
                ))  # fmt: skip
                audit.record(
                    uow,
                    actor,
                    "device.assign",
                    f"device:{device_id}",
                    model=f"{model_name}@{version}",
                    artifact=artifact.digest,
                    sequence=sequence,
                    reason=reason,
                )
            uow.commit()
        self._events.publish(
            FleetEvent("device.assigned", tuple(ids), desired_changed=True, subject=model_name)
        )
        return views

    def desired_many(self, device_ids: Sequence[str]) -> dict[str, Desired]:
        """What each device's sync stream sends (its desired state and its
        assignment, None if it has none), many devices in one read: a rollout stage wakes
        thousands of sync streams in the same instant, and a query per
        stream cost more than the rows (bench/bench_soak.py). One query of
        the columns needed per _IN_CHUNK ids; loading each device row whole,
        with its JSON columns, was most of the cost. Unknown ids are left out."""
        d, a = DeviceRow, DeviceAssignmentRow
        found: dict[str, Desired] = {}
        ids = list(dict.fromkeys(device_ids))
        with self._db.unit_of_work(readonly=True) as uow:
            session = uow.session
            for start in range(0, len(ids), _IN_CHUNK):
                rows = session.execute(
                    select(
                        d.id, d.desired_revision, d.state, d.labels, DeviceClassRow.name,
                        a.device_id, a.sequence, a.artifact_id, a.model_version_id,
                        a.rollout_id, a.shadow, a.assigned_by, a.assigned_at, a.statement,
                        a.statement_signature, a.rollback, a.key_id, d.credential_hash,
                    )
                    .outerjoin(DeviceClassRow, DeviceClassRow.id == d.class_id)
                    .outerjoin(a, a.device_id == d.id)
                    .where(d.id.in_(padded(ids[start : start + _IN_CHUNK])))
                )  # fmt: skip
                for row in rows:
                    chain = self._key_rotations(session, row[16])
                    view = DesiredView(
                        row[1], row[2], row[4] or "", dict(row[3] or {}), chain,
                        credential_epoch=row[17] or "",
                    )  # fmt: skip
                    if row[5] is None:
                        found[row[0]] = (view, None)
                        continue
                    fixed = _fixed(session, row[7], row[8], row[16], self._published)
                    found[row[0]] = (view, AssignmentView(
                        device_id=row[0], sequence=row[6], rollout_id=row[9] or "",
                        shadow=bool(row[10]), assigned_by=row[11], assigned_at=row[12],
                        statement=row[13], statement_signature=row[14],
                        rollback=bool(row[15]), **fixed,
                    ))  # fmt: skip
        return found

    def _key_rotations(
        self, session: Session, key_id: str | None
    ) -> tuple[tuple[bytes, bytes], ...]:
        """The rotation chain, read again only when it is unknown or an
        assignment is signed by a key it does not lead to."""
        chain = self._chain
        if chain is None or (key_id is not None and key_id != chain[0]):
            chain = self._chain = (keys.active_key(session).key_id, keys.rotation_chain(session))
        return chain[1]

    def record_statuses(self, reports: dict[str, StatusReport]) -> None:
        """Store what agents reported, many devices in one transaction: the
        revision each applied and where its update is; every new (sequence,
        state) is added to its history. Reports of unknown devices are
        dropped (a device is never deleted while its agent still talks)."""
        if not reports:
            return
        changed: list[str] = []
        touched: list[str] = []
        with self._db.unit_of_work() as uow:
            session = uow.session
            ids = list(reports)
            previous: dict[str, dict[str, Any]] = {}
            for start in range(0, len(ids), _IN_CHUNK):
                previous.update(
                    (device_id, status or {})
                    for device_id, status in session.execute(
                        select(DeviceRow.id, DeviceRow.update_status).where(
                            DeviceRow.id.in_(padded(ids[start : start + _IN_CHUNK]))
                        )
                    )
                )
            revisions: list[dict[str, Any]] = []
            statuses: list[dict[str, Any]] = []
            events: list[dict[str, Any]] = []
            for device_id, report in reports.items():
                if device_id not in previous:
                    continue
                last = previous[device_id]
                added = False
                for status in report.statuses:
                    event = history_event(device_id, last, status)
                    if event is not None:
                        events.append(event)
                        added = True
                    last = status
                (changed if added else touched).append(device_id)
                if report.statuses:
                    statuses.append({
                        "id": device_id, "applied_revision": report.applied_revision,
                        "update_status": last,
                    })  # fmt: skip
                else:
                    revisions.append({"id": device_id, "applied_revision": report.applied_revision})
            # ORM bulk UPDATE by primary key: one executemany per key set,
            # no device row loaded.
            for params in (statuses, revisions):
                if params:
                    update_rows(session, DeviceRow, params)
            if events:
                insert_rows(session, DeploymentEventRow, events)
            uow.commit()
        if changed:
            self._events.publish(FleetEvent("deployment.updated", tuple(changed)))
        if touched:
            self._events.publish(FleetEvent("device.updated", tuple(touched)))

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
            assignments = [_view(session, row, self._published) for row in session.scalars(current)]
            return History(events, assignments)
