"""The control plane's manifest-signing keys, shared by every replica, and
their rotation.

A rotation (`rotate`) makes a new key, signs a KeyRotationStatement naming
it with each key it replaces, retires those, and signs every artifact
manifest and every stored assignment statement again with the new key, all
in one transaction: from its commit on, nothing pushed is signed by a
retired key. Replicas need no message about it: the push path's caches are
keyed by the key that signed the assignment (services/deployments.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.bulk import update_rows
from edgefleet.controlplane.db.models import (
    ArtifactRow,
    DeviceAssignmentRow,
    DeviceRow,
    SigningKeyRotationRow,
    SigningKeyRow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import signing
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.controlplane.services import audit, statements
from edgefleet.controlplane.services.devices import EventSink
from edgefleet.controlplane.services.events import FleetEvent

MAX_REASON = 500


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    public_key: bytes
    private_key: bytes


def _current() -> Select[SigningKeyRow]:
    """The keys not retired, oldest first. Replicas that start together may
    each create a key; all of them then sign with the oldest, so the choice
    is the same everywhere."""
    return (
        select(SigningKeyRow)
        .where(SigningKeyRow.retired_at.is_(None))
        .order_by(SigningKeyRow.created_at, SigningKeyRow.id)
    )


def _active(session: Session) -> SigningKeyRow | None:
    return session.scalar(_current().limit(1))


def ensure_signing_key(db: Database) -> SigningKey:
    """The active key, generated on first start."""
    with db.unit_of_work() as uow:
        row = _active(uow.session)
        if row is None:
            kid, private, public = signing.generate()
            uow.session.add(SigningKeyRow(id=kid, public_key=public, private_key=private))
            uow.commit()
            row = _active(uow.session)
        assert row is not None
        return SigningKey(row.id, row.public_key, row.private_key)


def active_key(session: Session) -> SigningKey:
    row = _active(session)
    if row is None:
        raise RuntimeError("no signing key; the server creates one on start")
    return SigningKey(row.id, row.public_key, row.private_key)


def signing_key(session: Session) -> SigningKey:
    """The active key, held (FOR SHARE on PostgreSQL) until the caller's
    transaction ends, for writers that sign with it: a rotation waits for
    them, so what they sign is signed again with the new key, or they wait
    for it and sign with the new key. Locking a row a rotation just retired
    finds none in the statement's snapshot: asked again, the new key."""
    for _ in range(2):
        row = session.scalar(_current().limit(1).with_for_update(read=True))
        if row is not None:
            return SigningKey(row.id, row.public_key, row.private_key)
    raise RuntimeError("no signing key; the server creates one on start")


def public_keys(db: Database) -> list[SigningKeyRow]:
    """Keys agents should trust (not retired), oldest first."""
    with db.unit_of_work(readonly=True) as uow:
        return list(uow.session.scalars(_current()))


def all_keys(db: Database) -> list[SigningKeyRow]:
    """Every key, current and retired, oldest first."""
    with db.unit_of_work(readonly=True) as uow:
        return list(
            uow.session.scalars(
                select(SigningKeyRow).order_by(SigningKeyRow.created_at, SigningKeyRow.id)
            )
        )


def rotation_chain(session: Session) -> tuple[tuple[bytes, bytes], ...]:
    """Every rotation, oldest first, as (statement, signature)."""
    r = SigningKeyRotationRow
    return tuple(
        (statement, signature)
        for statement, signature in session.execute(select(r.statement, r.signature).order_by(r.id))
    )


@dataclass(frozen=True)
class Rotation:
    previous: SigningKeyRow
    new: SigningKeyRow
    artifacts_resigned: int
    assignments_resigned: int


def rotate(db: Database, events: EventSink, actor: str, *, reason: str = "") -> Rotation:
    """Replace the signing key (see the module docstring); audited. Every
    device row is locked first, in id order as assignments lock them, so an
    assignment in flight either commits before the rotation (whose re-signing
    then covers it) or waits and signs with the new key."""
    if len(reason) > MAX_REASON:
        raise InvalidArgument(f"reason: at most {MAX_REASON} characters")
    now = dt.datetime.now(dt.UTC)
    with db.unit_of_work() as uow:
        session = uow.session
        session.execute(select(DeviceRow.id).order_by(DeviceRow.id).with_for_update()).all()
        retiring = list(session.scalars(_current().with_for_update()))
        if not retiring:
            raise RuntimeError("no signing key; the server creates one on start")
        kid, private, public = signing.generate()
        new = SigningKeyRow(id=kid, public_key=public, private_key=private, created_at=now)
        session.add(new)
        session.flush()
        # One statement per key replaced: replicas started together may each
        # have made a key, and agents that pinned any of them must find a way.
        for old in retiring:
            statement = statements.rotation_statement(
                previous_key_id=old.id, key_id=kid, public_key=public, rotated_at=now
            )
            session.add(SigningKeyRotationRow(
                previous_key_id=old.id, key_id=kid, statement=statement,
                signature=signing.sign(old.private_key, statement), rotated_at=now,
                rotated_by=actor, reason=reason,
            ))  # fmt: skip
            old.retired_at = now
        signer = signing.Signer(private)
        artifacts = [
            {"id": artifact_id, "signature": signer.sign(manifest), "key_id": kid}
            for artifact_id, manifest in session.execute(
                select(ArtifactRow.id, ArtifactRow.manifest).order_by(ArtifactRow.id)
            )
        ]
        update_rows(session, ArtifactRow, artifacts)
        assignments: list[dict[str, Any]] = []
        for device_id, model_id, statement in session.execute(
            select(
                DeviceAssignmentRow.device_id, DeviceAssignmentRow.model_id,
                DeviceAssignmentRow.statement,
            )
            .where(DeviceAssignmentRow.statement != b"")
            .order_by(DeviceAssignmentRow.device_id, DeviceAssignmentRow.model_id)
        ):  # fmt: skip
            again = statements.with_key(statement, kid)
            assignments.append({
                "device_id": device_id, "model_id": model_id, "statement": again,
                "statement_signature": signer.sign(again), "key_id": kid,
            })  # fmt: skip
        update_rows(session, DeviceAssignmentRow, assignments)
        previous = retiring[0]
        audit.record(
            uow, actor, "signing_key.rotate", f"signing_key:{kid}",
            previous=[k.id for k in retiring], reason=reason,
            artifacts_resigned=len(artifacts), assignments_resigned=len(assignments),
        )  # fmt: skip
        uow.commit()
        result = Rotation(previous, new, len(artifacts), len(assignments))
    events.publish(FleetEvent("signing_key.rotated", subject=kid))
    return result
