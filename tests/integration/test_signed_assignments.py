"""Signed assignments on the control plane (a real server, SQLite and
PostgreSQL, raw Sync streams so the test sees exactly what is pushed): every
assignment carries a statement signed by the current key that binds it; the
rollback flag is set exactly when a device is sent to an older version; a
key rotation signs the rotation with the old key and every manifest and
stored statement again with the new one, and another replica's push path
serves the new signatures without being told (its caches are keyed by the
signing key)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import threading

import grpc
import pytest
from sqlalchemy import select

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.db.engine import make_engine, upgrade
from edgefleet.controlplane.db.models import DeviceAssignmentRow, ModelVersionRow, SigningKeyRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import signing
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services import keys
from edgefleet.controlplane.services.deployments import DeploymentService, Desired, assign_devices
from edgefleet.controlplane.services.keys import ensure_signing_key
from edgefleet.demo.models import BuiltModel
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import build_service, classes_and_digits, fake_result
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN, SyncStream, enroll


class _NoEvents:
    def publish(self, event: object) -> None:
        pass


async def _publish_all(cp: ControlPlane, digits: BuiltModel) -> None:
    builds = build_service(cp)
    while (job := await asyncio.to_thread(builds.claim, "runner", 60)) is not None:
        assert await asyncio.to_thread(builds.finish, job, "runner", fake_result(digits.model), "")


async def _replica_desired(replica: DeploymentService, device_id: str) -> Desired:
    return (await asyncio.to_thread(replica.desired_many, [device_id]))[device_id]


def _statement(a: d.Assignment) -> c.AssignmentStatement:
    return c.AssignmentStatement.FromString(a.statement)


async def _assign(op: og.OperatorServiceStub, device_id: str, version: str) -> None:
    await op.AssignModel(
        o.AssignModelRequest(device_ids=[device_id], model_name="digits", model_version=version),
        metadata=ADMIN,
    )


async def test_statements_bind_assignments_rollback_marks_downgrades_and_rotation_resigns(
    cp: ControlPlane,
    digits: BuiltModel,
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        await op.PushModel(push_requests("digits", "2.0.0", model_parts(model=digits.model)),
                           metadata=ADMIN)  # fmt: skip
        for _ in range(100):
            if len((await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds) == 4:
                break
            await asyncio.sleep(0.05)
        await _publish_all(cp, digits)
        arm = await enroll(channel, op, "hw-1", "aarch64")
        (k1,) = arm.signing_keys
        stream = SyncStream(channel, arm.device_credential, "aarch64")
        await stream.desired()

        pushed = []
        for version in ("2.0.0", "1.0.0", "2.0.0", "1.0.0"):
            await _assign(op, arm.device_id, version)
            pushed.append((await stream.desired()).assignment)
        for a in pushed:
            s = _statement(a)
            assert signing.verify(k1.public_key, a.statement, a.statement_signature)
            assert (s.device_id, s.sequence, s.model_name, s.model_version, s.key_id) == (
                arm.device_id, a.sequence, "digits", a.model_version, k1.key_id,
            )  # fmt: skip
            assert s.artifact_sha256 == a.artifact_digest
            assert s.manifest_sha256 == hashlib.sha256(a.manifest).hexdigest()
            assert s.rollback == a.rollback and s.shadow == a.shadow is False
        # Down from 2.0.0 is a rollback; up again is not.
        assert [(a.sequence, a.rollback) for a in pushed] == [
            (1, False), (2, True), (3, False), (4, True),
        ]  # fmt: skip

        # The device reports 1.0.0 committed; an assignment of 2.0.0 is an
        # upgrade, and going back to 1.0.0 after it is a rollback again.
        stream.report("committed", 4, active_model_version="1.0.0")
        await _assign(op, arm.device_id, "2.0.0")
        assert not (await stream.desired()).assignment.rollback

        # Another replica, its push caches warm, before the rotation.
        replica = DeploymentService(cp.db, _NoEvents())
        before, (current,) = await _replica_desired(replica, arm.device_id)
        assert not before.key_rotations

        viewer = await op.CreateOperatorToken(
            o.CreateOperatorTokenRequest(name="dash", role=o.OPERATOR_ROLE_VIEWER), metadata=ADMIN
        )
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await op.RotateSigningKey(o.RotateSigningKeyRequest(),
                                      metadata=bearer_metadata(viewer.secret))  # fmt: skip
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        rotated = await op.RotateSigningKey(
            o.RotateSigningKeyRequest(reason="drill"), metadata=ADMIN
        )
        k2 = rotated.new_key
        assert rotated.previous_key.key_id == k1.key_id and rotated.previous_key.HasField(
            "retired_at"
        )
        assert rotated.artifacts_resigned == 4
        listed = await op.ListSigningKeys(
            o.ListSigningKeysRequest(), metadata=bearer_metadata(viewer.secret)
        )
        assert [(k.key_id, k.HasField("retired_at")) for k in listed.keys] == [
            (k1.key_id, True), (k2.key_id, False),
        ]  # fmt: skip

        # The replica was told nothing: what it pushes now is signed by k2.
        view, (after,) = await _replica_desired(replica, arm.device_id)
        assert after.sequence == current.sequence
        assert signing.verify(k2.public_key, after.statement, after.statement_signature)
        assert c.AssignmentStatement.FromString(after.statement).key_id == k2.key_id
        assert signing.verify(k2.public_key, after.manifest, after.manifest_signature)
        assert not signing.verify(k1.public_key, after.manifest, after.manifest_signature)
        ((link, link_signature),) = view.key_rotations
        assert signing.verify(k1.public_key, link, link_signature)
        parsed = c.KeyRotationStatement.FromString(link)
        assert (parsed.previous_key_id, parsed.key_id, parsed.public_key) == (
            k1.key_id, k2.key_id, k2.public_key,
        )  # fmt: skip

        # A stream opened now gets the same, with the chain in its desired state.
        fresh = SyncStream(channel, arm.device_credential, "aarch64")
        first = await fresh.desired()
        assert first.assignment.statement == after.statement
        assert [(r.statement, r.signature) for r in first.key_rotations] == [(link, link_signature)]
        # New devices pin only the new key.
        (pinned,) = (await enroll(channel, op, "hw-2", "aarch64")).signing_keys
        assert pinned.key_id == k2.key_id
        audit = await op.ListAuditLog(
            o.ListAuditLogRequest(action="signing_key.rotate"), metadata=ADMIN
        )
        (entry,) = audit.entries
        assert entry.target == f"signing_key:{k2.key_id}" and "drill" in entry.details
        stream.call.cancel()
        fresh.call.cancel()
    finally:
        await channel.close()


async def test_an_assignment_racing_a_rotation_ends_signed_by_the_new_key(
    cp: ControlPlane,
    digits: BuiltModel,
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        await _publish_all(cp, digits)
        ids = [(await enroll(channel, op, f"hw-{i}", "aarch64")).device_id for i in range(3)]
        db = cp.db
        locked, release = threading.Event(), threading.Event()

        def assign() -> None:
            # Holds the device rows (and on SQLite the write lock) while the
            # rotation starts; whichever way they interleave, the stored
            # statements must end up signed by the key that is current.
            with db.unit_of_work() as uow:
                mv = uow.session.scalars(select(ModelVersionRow)).one()
                assign_devices(uow.session, mv, ids, actor="test")
                locked.set()
                release.wait(10)
                uow.commit()

        assigner = threading.Thread(target=assign)
        assigner.start()
        assert await asyncio.to_thread(locked.wait, 10)
        rotation = asyncio.create_task(
            asyncio.to_thread(keys.rotate, db, _NoEvents(), "test", reason="race")
        )
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.to_thread(assigner.join)
        done = await rotation
        with db.unit_of_work(readonly=True) as uow:
            rows = uow.session.execute(
                select(DeviceAssignmentRow.statement, DeviceAssignmentRow.statement_signature)
            ).all()
        assert len(rows) == 3
        for statement, signature in rows:
            assert signing.verify(done.new.public_key, statement, signature)
            assert c.AssignmentStatement.FromString(statement).key_id == done.new.id
    finally:
        await channel.close()


def test_a_signer_waiting_on_a_rotation_gets_the_new_key(db_url: str) -> None:
    """keys.signing_key (what builds and assignments sign with) against a
    rotation in flight: it waits (PostgreSQL: FOR SHARE behind the
    rotation's FOR UPDATE; SQLite: the one writer) and then signs with the
    new key, not with the one that was retired meanwhile."""
    engine = make_engine(db_url)
    upgrade(engine)
    db = Database(engine)
    old = ensure_signing_key(db)
    holding, got = threading.Event(), []

    def rotation_in_flight() -> None:
        with db.unit_of_work() as uow:
            row = uow.session.scalars(select(SigningKeyRow).with_for_update()).one()
            holding.set()
            threading.Event().wait(0.3)  # the signer blocks meanwhile
            kid, private, public = signing.generate()
            uow.session.add(SigningKeyRow(id=kid, public_key=public, private_key=private))
            row.retired_at = dt.datetime.now(dt.UTC)
            uow.commit()

    rotator = threading.Thread(target=rotation_in_flight)
    rotator.start()
    assert holding.wait(10)

    def sign() -> None:
        with db.unit_of_work() as uow:
            got.append(keys.signing_key(uow.session).key_id)

    signer = threading.Thread(target=sign)
    signer.start()
    rotator.join()
    signer.join()
    listed = keys.all_keys(db)
    (current,) = [k.id for k in listed if k.retired_at is None]
    (retired,) = [k.id for k in listed if k.retired_at is not None]
    assert retired == old.key_id and got == [current]
    db.dispose()
