"""Several models per device (issue 20) through a real control plane on
SQLite and PostgreSQL: assignments per (device, model), unassigning one
model, the desired state as each agent protocol reads it (raw Sync streams,
so the test sees exactly what is sent), the one-model agents' refusal, the
device memory budget, per-model statuses and history, rollouts of two
models at once, and migration 0010's conversion of a pre-0010 database."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from edgefleet.controlplane.db.engine import make_engine, upgrade
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.deployments import DeploymentService, StatusReport
from edgefleet.demo.models import BuiltModel
from edgefleet.update_state import name_of
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import classes_and_digits, finish_builds_by_hand
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN, SyncStream, enroll

SECOND = "digits-b"


class _NoEvents:
    def publish(self, event: object) -> None:
        pass


async def _two_models(
    cp: ControlPlane, digits: BuiltModel
) -> tuple[og.OperatorServiceAsyncStub, grpc.aio.Channel]:
    """Classes arm/arm-twin, digits 1.0.0 and 2.0.0 and digits-b 1.0.0, each
    built for both classes (fake results: 1 MB of measured memory each)."""
    op, channel = await classes_and_digits(cp, digits)
    parts = model_parts(model=digits.model, sample_data=digits.sample_data)
    await op.PushModel(push_requests("digits", "2.0.0", parts), metadata=ADMIN)
    await op.PushModel(push_requests(SECOND, "1.0.0", parts), metadata=ADMIN)
    await finish_builds_by_hand(cp, op, digits.model, 6)
    return op, channel


async def _assign(op: Any, ids: list[str], model: str, version: str = "1.0.0") -> list[int]:
    done = await op.AssignModel(
        o.AssignModelRequest(device_ids=ids, model_name=model, model_version=version),
        metadata=ADMIN,
    )
    return [a.sequence for a in done.assignments]


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_models_are_assigned_replaced_and_unassigned_one_at_a_time(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    op, channel = await _two_models(cp, digits)
    try:
        device_id = (await enroll(channel, op, "hw-1", "aarch64")).device_id
        assert await _assign(op, [device_id], "digits") == [1]
        assert await _assign(op, [device_id], SECOND) == [2]
        desired = (await asyncio.to_thread(
            DeploymentService(cp.db, _NoEvents()).desired_many, [device_id]
        ))[device_id][1]  # fmt: skip
        assert [(a.model_name, a.model_version, a.sequence) for a in desired] == [
            ("digits", "1.0.0", 1), (SECOND, "1.0.0", 2),
        ]  # fmt: skip
        # Replacing digits' version counts the device's sequence up and
        # leaves digits-b's assignment as it was.
        assert await _assign(op, [device_id], "digits", "2.0.0") == [3]
        device = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
        assert [(m.model_name, m.assigned_version, m.sequence) for m in device.models] == [
            ("digits", "2.0.0", 3), (SECOND, "1.0.0", 2),
        ]  # fmt: skip
        # Unassign: that model only; a device without it is reported as such.
        other = (await enroll(channel, op, "hw-2", "aarch64")).device_id
        gone = await op.UnassignModel(
            o.UnassignModelRequest(device_ids=[device_id, other], model_name="digits",
                                   reason="retired"), metadata=ADMIN,
        )  # fmt: skip
        assert (list(gone.removed), list(gone.not_assigned)) == ([device_id], [other])
        device = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
        assert [(m.model_name, m.sequence) for m in device.models] == [(SECOND, 2)]
        audit = await op.ListAuditLog(o.ListAuditLogRequest(), metadata=ADMIN)
        assert [e.action for e in audit.entries].count("device.unassign") == 1
        # All or nothing: an unknown device removes nothing.
        err = await _refused(op.UnassignModel(
            o.UnassignModelRequest(device_ids=[device_id, "nope"], model_name=SECOND),
            metadata=ADMIN,
        ))  # fmt: skip
        assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in (err.details() or "")
        err = await _refused(
            op.UnassignModel(o.UnassignModelRequest(device_ids=[device_id]), metadata=ADMIN)
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model name" in (err.details() or "")
        device = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
        assert [m.model_name for m in device.models] == [SECOND]
    finally:
        await channel.close()


async def test_each_protocol_gets_its_view_and_one_model_agents_get_one_model(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    op, channel = await _two_models(cp, digits)
    try:
        new = await enroll(channel, op, "hw-new", "aarch64")
        old = await enroll(channel, op, "hw-old", "aarch64")
        never = (await enroll(channel, op, "hw-never", "aarch64")).device_id
        new_stream = SyncStream(channel, new.device_credential, "aarch64", protocol=2)
        old_stream = SyncStream(channel, old.device_credential, "aarch64", protocol=0)
        await new_stream.desired()
        await old_stream.desired()  # its Hello (protocol 0) is recorded by now

        ids = [new.device_id, old.device_id, never]
        assert await _assign(op, ids, "digits") == [1, 1, 1]
        one = await new_stream.desired()
        assert [a.model_name for a in one.assignments] == ["digits"]
        assert one.assignment.model_name == "digits"  # exactly one: both fields
        legacy = await old_stream.desired()
        assert legacy.assignment.sequence == 1 and not legacy.assignments

        # A second model: refused for the whole call because of the old agent.
        err = await _refused(op.AssignModel(
            o.AssignModelRequest(device_ids=ids, model_name=SECOND, model_version="1.0.0"),
            metadata=ADMIN,
        ))  # fmt: skip
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.details() or ""
        assert old.device_id in details and "one-model protocol" in details
        assert "upgrade the agent" in details and new.device_id not in details
        # Nothing was assigned, not even to the devices that could take it.
        device = await op.GetDevice(o.GetDeviceRequest(id=new.device_id), metadata=ADMIN)
        assert [m.model_name for m in device.models] == ["digits"]
        assert device.agent_protocol == 2
        old_device = await op.GetDevice(o.GetDeviceRequest(id=old.device_id), metadata=ADMIN)
        assert old_device.agent_protocol == 1
        # Replacing the old agent's one model is fine.
        assert await _assign(op, [old.device_id], "digits", "2.0.0") == [2]
        assert (await old_stream.desired()).assignment.model_version == "2.0.0"
        # Unassigning it is not: a one-model agent never unloads its model.
        err = await _refused(op.UnassignModel(
            o.UnassignModelRequest(device_ids=[old.device_id, new.device_id],
                                   model_name="digits"), metadata=ADMIN,
        ))  # fmt: skip
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert old.device_id in (err.details() or "") and "one-model" in (err.details() or "")
        device = await op.GetDevice(o.GetDeviceRequest(id=new.device_id), metadata=ADMIN)
        assert [m.model_name for m in device.models] == ["digits"]  # nothing removed
        # What a one-model agent reports is the one model it holds: a report
        # of another model replaces what it reported before.
        service = DeploymentService(cp.db, _NoEvents())
        for name in ("digits", SECOND):
            status = {"state": "committed", "sequence": 2, "model_name": name,
                      "active_model_version": "1.0.0"}  # fmt: skip
            await asyncio.to_thread(
                service.record_statuses, {old.device_id: StatusReport(3, [status])}
            )
        old_device = await op.GetDevice(o.GetDeviceRequest(id=old.device_id), metadata=ADMIN)
        reported = {m.model_name: m.HasField("status") for m in old_device.models}
        assert reported == {"digits": False, SECOND: True}, old_device.models

        # The other two take it (a device that never connected is allowed).
        assert await _assign(op, [new.device_id, never], SECOND) == [2, 2]
        both = await new_stream.desired()
        assert [(a.model_name, a.sequence) for a in both.assignments] == [
            ("digits", 1), (SECOND, 2),
        ]  # fmt: skip
        assert not both.HasField("assignment")
        # An old agent on a device holding two models gets the latest one only.
        late = await enroll(channel, op, "hw-late", "aarch64")
        await _assign(op, [late.device_id], "digits")
        await _assign(op, [late.device_id], SECOND)
        late_stream = SyncStream(channel, late.device_credential, "aarch64", protocol=1)
        got = await late_stream.desired()
        assert (got.assignment.model_name, got.assignment.sequence) == (SECOND, 2)
        assert not got.assignments
        for stream in (new_stream, old_stream, late_stream):
            stream.call.cancel()
    finally:
        await channel.close()


async def test_statuses_and_history_are_per_model(cp: ControlPlane, digits: BuiltModel) -> None:
    op, channel = await _two_models(cp, digits)
    try:
        new = await enroll(channel, op, "hw-1", "aarch64")
        stream = SyncStream(channel, new.device_credential, "aarch64", protocol=2)
        await stream.desired()
        await _assign(op, [new.device_id], "digits")
        await _assign(op, [new.device_id], SECOND)
        stream.report("downloading", 1, bytes_done=1, bytes_total=10)
        stream.report("downloading", 2, model_name=SECOND, bytes_done=5, bytes_total=10)
        stream.report("downloading", 1, bytes_done=9, bytes_total=10)  # progress only
        stream.report("committed", 2, model_name=SECOND, active_model_version="1.0.0")
        stream.report("failed", 1, reason="bad bytes")
        for _ in range(200):
            history = await op.ListDeployments(
                o.ListDeploymentsRequest(device_id=new.device_id), metadata=ADMIN
            )
            if len(history.events) >= 4:
                break
            await asyncio.sleep(0.05)
        assert sorted((e.model_name, e.sequence, name_of(e.state)) for e in history.events) == [
            ("digits", 1, "downloading"), ("digits", 1, "failed"),
            (SECOND, 2, "committed"), (SECOND, 2, "downloading"),
        ]  # fmt: skip
        device = await op.GetDevice(o.GetDeviceRequest(id=new.device_id), metadata=ADMIN)
        statuses = {m.model_name: m.status for m in device.models}
        assert statuses["digits"].state == c.UPDATE_STATE_FAILED
        assert statuses["digits"].reason == "bad bytes"
        assert statuses[SECOND].state == c.UPDATE_STATE_COMMITTED
        # Device.update: the most recently reported model.
        assert (device.update.model_name, device.update.state) == (
            "digits", c.UPDATE_STATE_FAILED,
        )  # fmt: skip
        # A report of more models than a device may hold is refused whole.
        too_many = [c.UpdateStatus(model_name=f"m{i}", state=c.UPDATE_STATE_IDLE)
                    for i in range(33)]  # fmt: skip
        from edgefleet.v1 import device_pb2 as d

        stream.outbox.put_nowait(d.AgentMessage(status=d.StatusReport(models=too_many)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            for _ in range(50):
                await stream.call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "status.models has 33 items; at most 32" in (err.value.details() or "")
    finally:
        await channel.close()


async def test_reports_of_unassigned_models_are_kept_but_bounded(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    op, channel = await _two_models(cp, digits)
    try:
        device_id = (await enroll(channel, op, "hw-1", "aarch64")).device_id
        service = DeploymentService(cp.db, _NoEvents())
        statuses = [
            {"state": "committed", "sequence": 1, "model_name": f"m{i:02}",
             "active_model_version": "1.0.0"}
            for i in range(40)
        ]  # fmt: skip
        # (An idle status with nothing active says the agent unloaded the
        # model: that one is not kept, see the e2e unassign test.)
        await asyncio.to_thread(service.record_statuses, {device_id: StatusReport(3, statuses)})
        device = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
        assert [m.model_name for m in device.models] == [f"m{i:02}" for i in range(32)]
        assert all(not m.assigned_version for m in device.models)
        assert device.applied_revision == 3
    finally:
        await channel.close()


async def test_the_device_memory_budget_refuses_what_does_not_fit(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    op, channel = await _two_models(cp, digits)
    try:
        artifacts = (await op.ListArtifacts(o.ListArtifactsRequest(), metadata=ADMIN)).artifacts
        assert {a.manifest.memory_mb for a in artifacts} == {1.0}  # the build's measurement
        err = await _refused(op.UpdateDeviceClass(
            o.UpdateDeviceClassRequest(name="arm",
                                       constraints=c.ConstraintProfile(device_memory_mb=-1)),
            metadata=ADMIN,
        ))  # fmt: skip
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "device memory budget" in (err.details() or "")
        updated = await op.UpdateDeviceClass(
            o.UpdateDeviceClassRequest(name="arm",
                                       constraints=c.ConstraintProfile(device_memory_mb=1.5)),
            metadata=ADMIN,
        )  # fmt: skip
        assert updated.constraints.device_memory_mb == 1.5
        arm = (await enroll(channel, op, "hw-1", "aarch64")).device_id
        twin = (await enroll(channel, op, "hw-2", "aarch64")).device_id
        await op.SetDeviceClass(o.SetDeviceClassRequest(id=twin, class_name="arm-twin"),
                                metadata=ADMIN)  # fmt: skip
        await _assign(op, [arm, twin], "digits")
        # Replacing a model's version swaps its memory: still 1 MB.
        await _assign(op, [arm], "digits", "2.0.0")
        err = await _refused(op.AssignModel(
            o.AssignModelRequest(device_ids=[arm, twin], model_name=SECOND,
                                 model_version="1.0.0"), metadata=ADMIN,
        ))  # fmt: skip
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.details() or ""
        assert (
            f"{arm}: its models would need digits-b@1.0.0 1 MB + digits@2.0.0 1 MB = 2 MB, "
            "over the 1.5 MB device memory budget of class arm" in details
        )
        assert twin not in details  # its class sets no budget
        device = await op.GetDevice(o.GetDeviceRequest(id=twin), metadata=ADMIN)
        assert [m.model_name for m in device.models] == ["digits"]  # all or nothing
        # A rollout's plan (and its dry run) leaves the device out up front,
        # with the same reason, rather than rejecting it when notified.
        cp.services.devices.touch({i: dt.datetime.now(dt.UTC) for i in (arm, twin)})  # online
        plan = await op.CreateRollout(o.CreateRolloutRequest(
            spec=o.RolloutSpec(model_name=SECOND, model_version="1.0.0",
                               class_names=["arm", "arm-twin"],
                               stages=[o.StageSpec(percent=100.0)]),
            dry_run=True,
        ), metadata=ADMIN)  # fmt: skip
        assert [p.device_id for p in plan.planned] == [twin]
        (excluded,) = plan.excluded
        assert excluded.device_id == arm
        assert "over the 1.5 MB device memory budget of class arm" in excluded.reason
        # An update with a budget of 0 removes it: the device takes both.
        cleared = await op.UpdateDeviceClass(
            o.UpdateDeviceClassRequest(name="arm",
                                       constraints=c.ConstraintProfile(device_memory_mb=0)),
            metadata=ADMIN,
        )  # fmt: skip
        assert not cleared.constraints.HasField("device_memory_mb")
        await _assign(op, [arm], SECOND)
        device = await op.GetDevice(o.GetDeviceRequest(id=arm), metadata=ADMIN)
        assert sorted(m.model_name for m in device.models) == ["digits", SECOND]
    finally:
        await channel.close()


async def test_rollouts_of_two_models_share_devices_but_not_one_model(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    op, channel = await _two_models(cp, digits)
    try:
        ids = [(await enroll(channel, op, f"hw-{i}", "aarch64")).device_id for i in range(2)]
        cp.services.devices.touch({i: dt.datetime.now(dt.UTC) for i in ids})  # online

        def spec(model: str, version: str) -> o.RolloutSpec:
            return o.RolloutSpec(model_name=model, model_version=version, class_names=["arm"],
                                 stages=[o.StageSpec(percent=100.0)])  # fmt: skip

        draft = (await op.CreateRollout(o.CreateRolloutRequest(spec=spec("digits", "2.0.0")),
                                        metadata=ADMIN)).rollout  # fmt: skip
        first = await op.CreateRollout(
            o.CreateRolloutRequest(spec=spec("digits", "1.0.0"), start=True), metadata=ADMIN
        )
        other = await op.CreateRollout(
            o.CreateRolloutRequest(spec=spec(SECOND, "1.0.0"), start=True), metadata=ADMIN
        )
        assert sorted(p.device_id for p in other.planned) == sorted(ids)
        assert not other.excluded
        # The same model twice on one device: the draft cannot start.
        err = await _refused(op.StartRollout(o.RolloutActionRequest(id=draft.id), metadata=ADMIN))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert first.rollout.id in (err.details() or "")
        assert other.rollout.id not in (err.details() or "")
        # A dry run of the model excludes the devices, naming the rollout.
        plan = await op.CreateRollout(
            o.CreateRolloutRequest(spec=spec("digits", "2.0.0"), dry_run=True), metadata=ADMIN
        )
        assert {e.reason for e in plan.excluded} == {
            f"already in active rollout {first.rollout.id}"
        }
        # Unassigning a model an active rollout is rolling out is refused.
        err = await _refused(op.UnassignModel(
            o.UnassignModelRequest(device_ids=ids[:1], model_name=SECOND), metadata=ADMIN,
        ))  # fmt: skip
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert other.rollout.id in (err.details() or "")
    finally:
        await channel.close()


async def test_a_revert_goes_back_to_the_version_a_device_serves(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    """Found by a stranger's try: a device assigned 2.0.0 whose update failed
    still serves 1.0.0; backing out a rollout must put it on 1.0.0, never on
    the failed 2.0.0 (which would install the version being backed out)."""
    from edgefleet.controlplane.db.models import ModelRow, ModelVersionRow
    from edgefleet.controlplane.services.deployments import revert_targets

    op, channel = await _two_models(cp, digits)
    try:
        failed, fresh, empty = [
            (await enroll(channel, op, f"hw-{i}", "aarch64")).device_id for i in range(3)
        ]
        await _assign(op, [failed, fresh, empty], "digits", "2.0.0")
        service = DeploymentService(cp.db, _NoEvents())
        reports = {
            failed: {"state": "failed", "sequence": 1, "model_name": "digits",
                     "active_model_version": "1.0.0", "reason": "bad bytes"},
            empty: {"state": "failed", "sequence": 1, "model_name": "digits",
                    "active_model_version": "", "reason": "bad bytes"},
        }  # fmt: skip
        await asyncio.to_thread(
            service.record_statuses, {d: StatusReport(3, [s]) for d, s in reports.items()}
        )
        with cp.db.unit_of_work(readonly=True) as uow:
            model = uow.session.scalars(sa.select(ModelRow).where(ModelRow.name == "digits")).one()
            versions = {
                v.id: v.version
                for v in uow.session.scalars(
                    sa.select(ModelVersionRow).where(ModelVersionRow.model_id == model.id)
                )
            }
            targets = revert_targets(uow.session, [failed, fresh, empty], model.id)
        named = {d: versions.get(t) if t else None for d, t in targets.items()}
        # Served 1.0.0; never reported (its assignment); serves nothing (remove).
        assert named == {failed: "1.0.0", fresh: "2.0.0", empty: None}
    finally:
        await channel.close()


def test_migration_0010_converts_a_pre_0010_database(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0009")
    meta = sa.MetaData()
    meta.reflect(engine)
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)

    def row(table: str, **values: Any) -> dict[str, Any]:
        """`values`, and a plausible value for every other NOT NULL column."""
        for column in meta.tables[table].columns:
            if column.name in values or column.nullable or column.server_default is not None:
                continue
            kind = column.type
            if isinstance(kind, sa.DateTime):
                values[column.name] = now
            elif isinstance(kind, sa.Boolean):
                values[column.name] = False
            elif isinstance(kind, (sa.Integer, sa.Float)):
                values[column.name] = 0
            elif isinstance(kind, sa.LargeBinary):
                values[column.name] = b""
            elif isinstance(kind, sa.JSON):
                values[column.name] = {}
            else:
                values[column.name] = "x"
        return values

    status = {"state": "committed", "model_name": "digits", "model_version": "1.0.0",
              "sequence": 1}  # fmt: skip
    with engine.begin() as conn:

        def add(table: str, **values: Any) -> None:
            conn.execute(meta.tables[table].insert().values(row(table, **values)))

        add("blobs", digest="b" * 64)
        add("models", id="m1", name="digits")
        add("model_versions", id="v1", model_id="m1", version="1.0.0", model_digest="b" * 64,
            inputs=[], outputs=[])  # fmt: skip
        add("signing_keys", id="k1")
        add("builds", id="bu1", model_version_id="v1", target={}, candidates=[])
        add("artifacts", id="a1", digest="b" * 64, key_id="k1", build_id="bu1",
            model_version_id="v1")  # fmt: skip
        add("devices", id="d1", hardware_id="hw-1", update_status=status, labels={},
            hardware={}, runtime={})  # fmt: skip
        add("devices", id="d2", hardware_id="hw-2", update_status={}, labels={}, hardware={},
            runtime={})  # fmt: skip
        add("device_assignments", device_id="d1", sequence=1, artifact_id="a1",
            model_version_id="v1")  # fmt: skip
    upgrade(engine)
    with engine.connect() as conn:
        got = dict(conn.execute(sa.text("SELECT id, agent_protocol FROM devices")).all())
        assert got == {"d1": 0, "d2": 0}
        statuses = dict(conn.execute(sa.select(
            meta.tables["devices"].c.id, meta.tables["devices"].c.update_status
        )).all())  # fmt: skip
        assert statuses == {"d1": {"digits": status}, "d2": {}}
        rows = conn.execute(
            sa.text("SELECT device_id, model_id, sequence FROM device_assignments")
        ).all()
        assert [tuple(r) for r in rows] == [("d1", "m1", 1)]
        pk = sa.inspect(conn).get_pk_constraint("device_assignments")["constrained_columns"]
        assert sorted(pk) == ["device_id", "model_id"]
    engine.dispose()
