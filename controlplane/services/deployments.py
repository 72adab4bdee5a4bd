"""Deployments: which artifacts each device should run (its assignments, at
most one per model: a device holds several models, issue 20), and the
history of what its agent did with them.

An assignment names a model version; each device gets the artifact its own
class's successful build published, with that build's signed manifest.
Assigning a model adds it to the device or replaces that model's version;
the device's other models are untouched. The assignment sequence counts up
per device over all its models (devices.assignment_seq), so an agent can
refuse anything at or below what it verified for the model. Assigning is
all-or-nothing: if one device cannot take the version, nothing is assigned
and the error lists every device that cannot, with the reason. A device
cannot take a version when:

- it is not accepted, matches no class, or its class has no build of it;
- its agent speaks the one-model protocol (Hello.protocol below 2, stored as
  devices.agent_protocol 1) and it already holds another model: that agent
  reads DesiredState.assignment only, so a second model would silently
  replace the first on the device. Upgrade the agent. A device whose agent
  never connected (agent_protocol 0) is allowed: most agents are current,
  and an old one that connects later is served the compatible one-model view
  (the highest-sequence assignment; api/device_servicer.py), so the worst
  case is one model of the two running until the agent is upgraded;
- its class sets a device memory budget (ConstraintProfile.device_memory_mb)
  and the measured memory (ArtifactManifest.memory_mb) of the artifacts it
  would hold afterwards adds up past it. An artifact built before the
  measurement was recorded counts 0 MB (unknown, not refused).

Rollouts assign through the same function (`assign_devices`), so a device a
rollout cannot give the version is marked rejected in the rollout with the
same reason, and the others carry on.

Unassigning removes one model from devices (`DeploymentService.unassign`);
the agent unloads a model its desired state no longer lists. A device an
active rollout of that model holds is refused (FAILED_PRECONDITION naming
the rollout): the rollout would wait for a report that never comes, or
assign the model again; abort the rollout first.

Every assignment carries an AssignmentStatement signed with the current
signing key (services/statements.py), made here when the assignment is
written and stored with it, so all replicas push the same bytes and the
push path signs nothing. Its `rollback` flag is the control plane's
explicit permission to go back to an older version (agents refuse a
downgrade without it); see `assign_devices`.

History: agents report each model's update state (agent/update/states.py)
on the sync stream; every change of a model's (sequence, state) becomes a
DeploymentEventRow. Download progress updates the device's current status of
that model only, so the history stays a list of states, not of chunks. The
agent is the truth of what it serves: a report of a model the device was
never assigned is stored too, keyed by its name, but at most
MAX_MODELS_PER_DEVICE models per device (the excess is dropped with a log
line)."""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import delete, select
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
from edgefleet.controlplane.domain.delivery import Delivery
from edgefleet.controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.controlplane.services import audit, keys, statements
from edgefleet.controlplane.services.builds import SUCCEEDED
from edgefleet.controlplane.services.devices import ACCEPTED, DesiredView, EventSink
from edgefleet.controlplane.services.events import FleetEvent
from edgefleet.controlplane.services.registry import (
    filter_by_model,
    mark_assigned,
    require_assignable,
)
from edgefleet.v1 import common_pb2 as c

MAX_DEVICES_PER_CALL = 1000
DEFAULT_HISTORY_LIMIT = 100
# Ids per IN (...) list: well under SQLite's and PostgreSQL's parameter limits.
_IN_CHUNK = 1000
_PUBLISHED_CACHE = 256
MAX_HISTORY_LIMIT = 10_000
# Models whose statuses one device's row keeps (assigned or only reported).
MAX_MODELS_PER_DEVICE = 32
# Update states in which a model's update has settled (its active version
# is what the device serves of it for good).
_SETTLED = ("committed", "failed", "idle")
# devices.agent_protocol: 0 never connected; 1 one model (Hello.protocol 0
# or 1); 2 several models.
UNKNOWN_PROTOCOL, ONE_MODEL_PROTOCOL, MULTI_MODEL_PROTOCOL = 0, 1, 2

log = logging.getLogger(__name__)


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


# What a sync stream sends a device: its desired state and its assignments
# (one per model, sorted by model name; empty when it has none).
Desired = tuple[DesiredView, list[AssignmentView]]


@dataclass(frozen=True)
class Unassigned:
    """What an unassign did: the devices the model was removed from, and
    those that did not hold it."""

    removed: list[str]
    not_assigned: list[str]


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
    """Make each device's class artifact of `mv` its assignment of that
    model, in the caller's transaction: the next sequence and a new
    desired-state revision per device; its other models are untouched. Per
    device: (sequence, artifact), or why it cannot take `mv` (nothing
    written for it; see the module docstring). Set-based, so assigning
    thousands of devices costs a few statements per chunk rather than
    several per device; the device rows are locked first (FOR UPDATE on
    PostgreSQL) so concurrent assignments cannot hand out one sequence
    twice. `artifacts` caches the per-class lookups across calls; `at` is
    the assignment time (default now). Unknown devices are absent from the
    result. The caller publishes the desired-state changes after its commit.

    Each assignment gets its signed statement. Its rollback flag is set when
    `rollback` says so (a rollout sending devices back: revert, abort with
    revert, a dropped class) and otherwise per device when `mv` is older
    (semver) than the version of the same model in the device's current
    assignment of it or in the last update of that model it reported
    committed: an operator assigning an older version, or a rollout of one.
    Erring towards the flag is safe (it permits, never forces); missing it
    makes the agent refuse the downgrade.

    The active key is read after the device rows are locked: a rotation
    locks them all first (keys.rotate), so an assignment either commits
    before it (and is signed again by it) or reads the new key."""
    cache = artifacts if artifacts is not None else {}
    model_name = session.get_one(ModelRow, mv.model_id).name
    target = semver.sort_key(mv.version)
    signer: tuple[str, signing.Signer] | None = None
    manifest_digests: dict[str, str] = {}
    memory: dict[str, float] = {}
    result: dict[str, tuple[int, ArtifactRow] | str] = {}
    now = at or dt.datetime.now(dt.UTC)
    # Sorted, so the chunks lock in one id order too (see below).
    ids = sorted(set(device_ids))
    d = DeviceRow
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        rows = session.execute(
            select(
                d.id, d.state, d.class_id, d.assignment_seq, d.desired_revision,
                d.agent_protocol, DeviceClassRow.device_memory_mb, DeviceClassRow.name,
            )
            .outerjoin(DeviceClassRow, DeviceClassRow.id == d.class_id)
            .where(d.id.in_(padded(chunk)))
            # In id order: two assignments locking the same devices in
            # different orders would deadlock on PostgreSQL.
            .order_by(d.id)
            .with_for_update(of=d)
        ).all()  # fmt: skip
        if signer is None and rows:
            key = keys.signing_key(session)
            signer = (key.key_id, signing.Signer(key.private_key))
        held = _held(session, [row[0] for row in rows], mv.model_id)
        counters: list[dict[str, Any]] = []
        values: dict[str, dict[str, Any]] = {}
        for device_id, state, class_id, seq, revision, protocol, budget, class_name in rows:
            found = _artifact(session, state, class_id, mv.id, cache)
            if not isinstance(found, str):
                found = _cannot_hold(
                    session, found, f"{model_name}@{mv.version}", held.others.get(device_id, []),
                    protocol, budget, class_name or "", memory,
                ) or found  # fmt: skip
            if isinstance(found, str):
                result[device_id] = found
                continue
            result[device_id] = (seq + 1, found)
            counters.append(
                {"id": device_id, "assignment_seq": seq + 1, "desired_revision": revision + 1}
            )
            values[device_id] = {
                "device_id": device_id, "model_id": mv.model_id, "sequence": seq + 1,
                "artifact_id": found.id, "model_version_id": mv.id, "rollout_id": rollout_id,
                "shadow": shadow, "assigned_by": actor, "assigned_at": now,
            }  # fmt: skip
        if not counters:
            continue
        assert signer is not None
        mark_assigned(session, mv, now)
        update_rows(session, DeviceRow, counters)
        newer = _committed_versions(session, list(values), model_name, held.versions)
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
        replaced = [v for k, v in values.items() if k in held.versions]
        added = [v for k, v in values.items() if k not in held.versions]
        if replaced:
            update_rows(session, DeviceAssignmentRow, replaced)
        if added:
            insert_rows(session, DeviceAssignmentRow, added)
    return result


@dataclass(frozen=True)
class _Other:
    """A model a device holds besides the one being assigned."""

    label: str  # name@version
    artifact_id: str


@dataclass(frozen=True)
class _Held:
    # Device -> the version of the model being assigned it holds now.
    versions: dict[str, str]
    # Device -> its other models.
    others: dict[str, list[_Other]]


def _held(session: Session, device_ids: list[str], model_id: str) -> _Held:
    """What the devices hold now, in one query."""
    a = DeviceAssignmentRow
    versions: dict[str, str] = {}
    others: dict[str, list[_Other]] = {}
    if not device_ids:
        return _Held(versions, others)
    rows = session.execute(
        select(a.device_id, a.model_id, a.artifact_id, ModelRow.name, ModelVersionRow.version)
        .join(ModelVersionRow, ModelVersionRow.id == a.model_version_id)
        .join(ModelRow, ModelRow.id == a.model_id)
        .where(a.device_id.in_(padded(device_ids)))
        .order_by(a.device_id, ModelRow.name)
    )
    for device_id, held_model, artifact_id, name, version in rows:
        if held_model == model_id:
            versions[device_id] = version
        else:
            others.setdefault(device_id, []).append(_Other(f"{name}@{version}", artifact_id))
    return _Held(versions, others)


def _cannot_hold(
    session: Session,
    artifact: ArtifactRow,
    label: str,
    others: list[_Other],
    protocol: int,
    budget: float | None,
    class_name: str,
    memory: dict[str, float],
) -> str | None:
    """Why a device cannot hold `artifact` (`label`: name@version) beside
    its `others` (None: it can): its agent's one-model protocol, or its
    class's memory budget. `memory` caches artifact MB by id."""
    if protocol == ONE_MODEL_PROTOCOL and others:
        return (
            f"its agent speaks the one-model protocol and already holds "
            f"{', '.join(o.label for o in others)}; upgrade the agent to give it a second model"
        )
    if budget is not None:
        return _over_budget(session, artifact, label, others, budget, class_name, memory)
    return None


def holding_refusals(
    session: Session, devices: Sequence[DeviceRow], mv: ModelVersionRow, model_name: str
) -> dict[str, str]:
    """The devices of `devices` that could not hold `mv` beside their other
    models, with why: the checks assign_devices makes, for a rollout's plan
    (and its dry run) to leave such devices out up front rather than have
    them rejected when notified. Devices with no artifact of `mv` are the
    caller's to exclude (artifact_for)."""
    held = _held(session, [d.id for d in devices], mv.model_id)
    classes = {
        class_id: (budget, name)
        for class_id, budget, name in session.execute(
            select(DeviceClassRow.id, DeviceClassRow.device_memory_mb, DeviceClassRow.name)
        )
    }
    memory: dict[str, float] = {}
    artifacts: dict[tuple[str, str], ArtifactRow | str] = {}
    refused: dict[str, str] = {}
    for device in devices:
        found = _artifact(session, device.state, device.class_id, mv.id, artifacts)
        if isinstance(found, str):
            continue
        budget, class_name = classes.get(device.class_id or "", (None, ""))
        reason = _cannot_hold(
            session, found, f"{model_name}@{mv.version}", held.others.get(device.id, []),
            device.agent_protocol, budget, class_name, memory,
        )  # fmt: skip
        if reason is not None:
            refused[device.id] = reason
    return refused


def revert_targets(
    session: Session, device_ids: Sequence[str], model_id: str
) -> dict[str, str | None]:
    """Per device, the version of the model a revert goes back to (its
    model_versions id; None: remove the model): the version the device
    reports serving, not merely the one assigned, since an assignment whose
    update failed left the device on its old version (and a revert to the
    failed one would install the very version being backed out). A device
    that never reported the model, or is still installing its assignment,
    goes back to that assignment."""
    model_name = session.get_one(ModelRow, model_id).name
    ids = list(device_ids)
    assigned: dict[str, str] = {}
    statuses: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = padded(ids[start : start + _IN_CHUNK])
        # Pairs, not the Result itself: dict.update reads an object with
        # .keys() (as a Result has) as a mapping.
        assigned.update(
            (device_id, version_id)
            for device_id, version_id in session.execute(
                select(DeviceAssignmentRow.device_id, DeviceAssignmentRow.model_version_id).where(
                    DeviceAssignmentRow.device_id.in_(chunk),
                    DeviceAssignmentRow.model_id == model_id,
                )
            )
        )
        for device_id, reported in session.execute(
            select(DeviceRow.id, DeviceRow.update_status).where(DeviceRow.id.in_(chunk))
        ):
            status = (reported or {}).get(model_name)
            if isinstance(status, dict):
                statuses[device_id] = status
    version_ids = {
        version: version_id
        for version, version_id in session.execute(
            select(ModelVersionRow.version, ModelVersionRow.id).where(
                ModelVersionRow.model_id == model_id
            )
        )
    }
    targets: dict[str, str | None] = {}
    for device_id in ids:
        status = statuses.get(device_id)
        if status is None or status.get("state") not in _SETTLED:
            # Never reported, or still installing its assignment (a report
            # may also lag behind the device): where the operator sent it.
            targets[device_id] = assigned.get(device_id)
        else:
            targets[device_id] = version_ids.get(str(status.get("active_model_version") or ""))
    return targets


def artifact_memory_mb(manifest: bytes) -> float:
    """The measured memory an artifact's signed manifest records (0: not
    measured, an artifact built before it was recorded)."""
    parsed = c.ArtifactManifest.FromString(manifest)
    return parsed.memory_mb if math.isfinite(parsed.memory_mb) else 0.0


def _over_budget(
    session: Session,
    artifact: ArtifactRow,
    label: str,
    others: list[_Other],
    budget: float,
    class_name: str,
    memory: dict[str, float],
) -> str | None:
    """Why the device would hold more memory than its class's budget with
    `artifact` and its other models (None: it fits). `memory` caches each
    artifact's MB by id across the call."""
    missing = [o.artifact_id for o in others if o.artifact_id not in memory]
    if missing:
        for artifact_id, manifest in session.execute(
            select(ArtifactRow.id, ArtifactRow.manifest).where(ArtifactRow.id.in_(missing))
        ):
            memory[artifact_id] = artifact_memory_mb(manifest)
    if artifact.id not in memory:
        memory[artifact.id] = artifact_memory_mb(artifact.manifest)
    parts = [(label, memory[artifact.id])] + [(o.label, memory[o.artifact_id]) for o in others]
    total = sum(mb for _, mb in parts)
    if total <= budget:
        return None
    listed = " + ".join(f"{name} {mb:g} MB" for name, mb in sorted(parts))
    return (
        f"its models would need {listed} = {total:g} MB, over the {budget:g} MB device memory "
        f"budget of class {class_name}"
    )


def _committed_versions(
    session: Session, device_ids: list[str], model_name: str, current: dict[str, str]
) -> dict[str, list[str]]:
    """Per device, the versions of the model a new assignment must not go
    below without the rollback flag: its current assignment of the model
    (`current`) and the one it last reported committed."""
    versions: dict[str, list[str]] = {
        device_id: [current[device_id]] for device_id in device_ids if device_id in current
    }
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
    return versions


def unassign_devices(
    session: Session, model_id: str, device_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Remove the model's assignment from each device, in the caller's
    transaction, bumping the desired revision of those that held it (the
    agent unloads a model its desired state no longer lists); their other
    models are untouched. Returns (removed, not assigned); unknown devices
    are in neither. The caller publishes the desired-state changes after
    its commit."""
    removed: list[str] = []
    not_assigned: list[str] = []
    ids = sorted(set(device_ids))  # one lock order across chunks (assign_devices)
    a = DeviceAssignmentRow
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        rows = session.execute(
            select(DeviceRow.id, DeviceRow.desired_revision)
            .where(DeviceRow.id.in_(padded(chunk)))
            .order_by(DeviceRow.id)
            .with_for_update()
        ).all()
        holding = set(
            session.scalars(
                select(a.device_id).where(a.device_id.in_(padded(chunk)), a.model_id == model_id)
            )
        )
        counters = []
        for device_id, revision in rows:
            if device_id in holding:
                removed.append(device_id)
                counters.append({"id": device_id, "desired_revision": revision + 1})
            else:
                not_assigned.append(device_id)
        if counters:
            session.execute(
                delete(a).where(a.model_id == model_id, a.device_id.in_(padded(sorted(holding))))
            )
            update_rows(session, DeviceRow, counters)
    return removed, not_assigned


def _rolling_out(session: Session, device_ids: Sequence[str], model_id: str) -> dict[str, str]:
    """Device -> the active rollout of `model_id` holding it (rollouts.
    active_rollout_of, for one model; deployments cannot import rollouts)."""
    from edgefleet.controlplane.services.rollouts import active_rollout_of

    return active_rollout_of(session, device_ids, model_id=model_id)


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
    and its models' update statuses in arrival order (a report of the same
    model and (sequence, state) as that model's latest, such as download
    progress, replaces it)."""

    applied_revision: int
    statuses: list[dict[str, Any]]

    def add(self, applied_revision: int, status: dict[str, Any]) -> None:
        """Fold a later report in."""
        self.applied_revision = applied_revision
        if not status:
            return
        model = status.get("model_name", "")
        for index in range(len(self.statuses) - 1, -1, -1):
            if self.statuses[index].get("model_name", "") == model:
                if _same_step(self.statuses[index], status):
                    self.statuses[index] = status
                    return
                break
        self.statuses.append(status)

    def extend(self, later: StatusReport) -> None:
        """Fold in everything a later StatusReport of the device holds."""
        for status in later.statuses:
            self.add(later.applied_revision, status)
        self.applied_revision = later.applied_revision


def _same_step(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(
        a.get("model_name", "") == b.get("model_name", "")
        and a.get("sequence") == b.get("sequence")
        and a.get("state") == b.get("state")
    )


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


def _holds_nothing(status: dict[str, Any]) -> bool:
    """Whether a model's status says the agent holds nothing of it: idle, no
    assignment, nothing active (what an agent reports once it has unloaded
    an unassigned model; docs/agent-updates.md)."""
    return (
        status.get("state") == "idle"
        and not status.get("sequence")
        and not status.get("active_model_version")
    )


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
            mv = require_assignable(session, model_name, version)
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

    def unassign(
        self, actor: str, device_ids: Sequence[str], model_name: str, reason: str = ""
    ) -> Unassigned:
        """Remove `model_name` from every device in `device_ids`; their other
        models are untouched. All or nothing: an unknown device (NOT_FOUND)
        or one an active rollout of the model holds (FAILED_PRECONDITION,
        naming the rollout), or one whose agent speaks the one-model protocol
        and holds the model (FAILED_PRECONDITION: it would keep serving it)
        removes nothing."""
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise InvalidArgument("name at least one device to unassign from")
        if len(ids) > MAX_DEVICES_PER_CALL:
            raise InvalidArgument(f"at most {MAX_DEVICES_PER_CALL} devices per call")
        if not model_name:
            raise InvalidArgument("model name is required")
        with self._db.unit_of_work() as uow:
            session = uow.session
            model = session.scalar(select(ModelRow).where(ModelRow.name == model_name))
            if model is None:
                raise NotFound(f"no model named {model_name!r}")
            known: set[str] = set()
            old_agents: list[str] = []
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = padded(ids[start : start + _IN_CHUNK])
                for device_id, protocol in session.execute(
                    select(DeviceRow.id, DeviceRow.agent_protocol).where(DeviceRow.id.in_(chunk))
                ):
                    known.add(device_id)
                    if protocol == ONE_MODEL_PROTOCOL:
                        old_agents.append(device_id)
            missing = [i for i in ids if i not in known]
            if missing:
                raise NotFound(f"no device with id {', '.join(repr(i) for i in missing)}")
            # A one-model agent never unloads its model (it only replaces it):
            # removing the assignment would show it gone while it serves on.
            holding = _held(session, old_agents, model.id).versions
            if holding:
                raise FailedPrecondition(
                    f"cannot unassign {model_name}: the agent of {len(holding)} of the devices "
                    f"speaks the one-model protocol, which cannot unload a model, nothing was "
                    f"unassigned: {', '.join(sorted(holding))}; upgrade those agents first"
                )
            busy = _rolling_out(session, ids, model.id)
            if busy:
                listed = "; ".join(
                    f"{device_id} (rollout {rollout_id})" for device_id, rollout_id in busy.items()
                )
                raise FailedPrecondition(
                    f"cannot unassign {model_name}: an active rollout of it holds "
                    f"{len(busy)} of the devices, nothing was unassigned: {listed}; abort "
                    "the rollout first (edgefleet rollouts abort)"
                )
            removed, not_assigned = unassign_devices(session, model.id, ids)
            for device_id in removed:
                audit.record(
                    uow, actor, "device.unassign", f"device:{device_id}", model=model_name,
                    reason=reason,
                )  # fmt: skip
            uow.commit()
        if removed:
            self._events.publish(
                FleetEvent(
                    "device.assigned", tuple(removed), desired_changed=True, subject=model_name
                )
            )
        return Unassigned(removed, not_assigned)

    def desired_many(self, device_ids: Sequence[str]) -> dict[str, Desired]:
        """What each device's sync stream sends (its desired state and its
        assignments, by model name), many devices in one read: a rollout
        stage wakes thousands of sync streams in the same instant, and a
        query per stream cost more than the rows (bench/bench_soak.py). One
        query of the columns needed per _IN_CHUNK ids (a row per device and
        model); loading each device row whole, with its JSON columns, was
        most of the cost. Unknown ids are left out."""
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
                        DeviceClassRow.artifact_mirrors, DeviceClassRow.max_download_rate,
                    )
                    .outerjoin(DeviceClassRow, DeviceClassRow.id == d.class_id)
                    .outerjoin(a, a.device_id == d.id)
                    .where(d.id.in_(padded(ids[start : start + _IN_CHUNK])))
                )  # fmt: skip
                for row in rows:
                    desired = found.get(row[0])
                    if desired is None:
                        chain = self._key_rotations(session, row[16])
                        view = DesiredView(
                            row[1], row[2], row[4] or "", dict(row[3] or {}), chain,
                            credential_epoch=row[17] or "",
                            delivery=Delivery(tuple(row[18] or ()), row[19] or 0),
                        )  # fmt: skip
                        desired = found[row[0]] = (view, [])
                    elif row[16] is not None:
                        self._key_rotations(session, row[16])
                    if row[5] is None:
                        continue
                    fixed = _fixed(session, row[7], row[8], row[16], self._published)
                    desired[1].append(AssignmentView(
                        device_id=row[0], sequence=row[6], rollout_id=row[9] or "",
                        shadow=bool(row[10]), assigned_by=row[11], assigned_at=row[12],
                        statement=row[13], statement_signature=row[14],
                        rollback=bool(row[15]), **fixed,
                    ))  # fmt: skip
        for _, assignments in found.values():
            if len(assignments) > 1:
                assignments.sort(key=lambda v: v.model_name)
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
        revision each applied and where each model's update is; every new
        (model, sequence, state) is added to the history. Reports of unknown
        devices are dropped (a device is never deleted while its agent still
        talks); so are statuses without a model name (nothing to key them
        by) and those of models past MAX_MODELS_PER_DEVICE (logged)."""
        if not reports:
            return
        changed: list[str] = []
        touched: list[str] = []
        now = utcnow()
        with self._db.unit_of_work() as uow:
            session = uow.session
            # Every row locked up front, in id order (its updates below then
            # take no lock of their own): two replicas' batches, or a batch
            # and an assignment, locking the same devices in different
            # orders deadlocked on PostgreSQL (bench_rollout, 2 replicas).
            ids = sorted(reports)
            previous: dict[str, dict[str, Any]] = {}
            one_model: set[str] = set()
            for start in range(0, len(ids), _IN_CHUNK):
                for device_id, status, protocol in session.execute(
                    select(DeviceRow.id, DeviceRow.update_status, DeviceRow.agent_protocol)
                    .where(DeviceRow.id.in_(padded(ids[start : start + _IN_CHUNK])))
                    .order_by(DeviceRow.id)
                    .with_for_update()
                ):
                    previous[device_id] = dict(status or {})
                    if protocol == ONE_MODEL_PROTOCOL:
                        one_model.add(device_id)
            revisions: list[dict[str, Any]] = []
            statuses: list[dict[str, Any]] = []
            events: list[dict[str, Any]] = []
            for device_id, report in reports.items():
                if device_id not in previous:
                    continue
                models = previous[device_id]
                added = stored = False
                for status in report.statuses:
                    name = status.get("model_name", "")
                    if not name:
                        continue
                    if name not in models and len(models) >= MAX_MODELS_PER_DEVICE:
                        log.warning(
                            "device %s reports more than %d models; dropped the status of "
                            "model %r", device_id, MAX_MODELS_PER_DEVICE, name[:100],
                        )  # fmt: skip
                        continue
                    last = models.get(name)
                    event = history_event(device_id, last if isinstance(last, dict) else {}, status)
                    if event is not None:
                        event["at"] = now
                        events.append(event)
                        added = True
                    stored = True
                    if device_id in one_model:
                        # A one-model agent's report is about the one model
                        # it holds: whatever it held before is gone.
                        for other in [m for m in models if m != name]:
                            del models[other]
                    if _holds_nothing(status):
                        # The agent unloaded the model (an unassign): it is
                        # no longer the device's, only its history keeps it.
                        models.pop(name, None)
                        continue
                    models[name] = {**status, "updated_at": now.isoformat()}
                (changed if added else touched).append(device_id)
                if stored:
                    statuses.append({
                        "id": device_id, "applied_revision": report.applied_revision,
                        "update_status": models,
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
