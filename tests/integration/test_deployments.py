"""Deployments through a real server on SQLite and PostgreSQL: AssignModel
puts each device's class artifact (with its own signed manifest) into its
desired state, all or nothing; agents' status reports become the deployment
history. The build result is a hand-made one over a real file (as in
test_builds_service.py); agents here are raw Sync streams, so the test sees
exactly what the control plane sends."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from edgefleet.controlplane.domain import signing
from edgefleet.controlplane.server import ControlPlane
from edgefleet.demo.models import BuiltModel
from edgefleet.update_state import name_of
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import classes_and_digits, publish_one_build
from testkit.rpc import ADMIN, SyncStream, enroll


async def _wait_history(op: og.OperatorServiceStub, device_id: str, count: int) -> list[str]:
    for _ in range(200):
        listed = await op.ListDeployments(o.ListDeploymentsRequest(device_id=device_id),
                                          metadata=ADMIN)  # fmt: skip
        if len(listed.events) >= count:
            return [name_of(e.state) for e in listed.events]
        await asyncio.sleep(0.05)
    raise AssertionError(f"history has {len(listed.events)} events, expected {count}")


async def test_assignments_carry_each_class_its_own_signed_manifest_and_reports_make_history(
    cp: ControlPlane,
    digits: BuiltModel,
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        await publish_one_build(cp, digits)
        # The twin class reused the build; it still gets a manifest of its own.
        artifacts = (await op.ListArtifacts(o.ListArtifactsRequest(), metadata=ADMIN)).artifacts
        assert sorted(a.manifest.class_name for a in artifacts) == ["arm", "arm-twin"]
        assert len({a.digest for a in artifacts}) == 1

        arm = await enroll(channel, op, "hw-1", "aarch64")
        arm_id, (key,) = arm.device_id, arm.signing_keys
        twin_id = (await enroll(channel, op, "hw-2", "aarch64")).device_id
        await op.SetDeviceClass(o.SetDeviceClassRequest(id=twin_id, class_name="arm-twin"),
                                metadata=ADMIN)  # fmt: skip
        stream = SyncStream(channel, arm.device_credential, "aarch64")
        first = await stream.desired()
        assert not first.HasField("assignment")

        assigned = await op.AssignModel(
            o.AssignModelRequest(device_ids=[arm_id, twin_id], model_name="digits",
                                 model_version="1.0.0", reason="canary"),
            metadata=ADMIN,
        )  # fmt: skip
        assert [(a.device_id, a.class_name, a.sequence) for a in assigned.assignments] == [
            (arm_id, "arm", 1), (twin_id, "arm-twin", 1),
        ]  # fmt: skip
        pushed = await stream.desired()
        assignment = pushed.assignment
        assert pushed.revision > first.revision
        assert (assignment.model_name, assignment.model_version, assignment.sequence) == (
            "digits", "1.0.0", 1,
        )  # fmt: skip
        assert assignment.runtime == c.RUNTIME_ONNXRUNTIME
        assert assignment.artifact_digest == artifacts[0].digest
        manifest = c.ArtifactManifest.FromString(assignment.manifest)
        assert manifest.class_name == "arm" and manifest.sha256 == assignment.artifact_digest
        assert signing.verify(key.public_key, assignment.manifest, assignment.manifest_signature)

        # Reports: a new (sequence, state) is history; progress is not.
        stream.report("downloading", 1, bytes_done=10, bytes_total=100)
        stream.report("downloading", 1, bytes_done=50, bytes_total=100)
        stream.report("verifying", 1, bytes_done=100, bytes_total=100)
        stream.report("committed", 1, active_model_version="1.0.0",
                      active_artifact_digest=assignment.artifact_digest)  # fmt: skip
        assert await _wait_history(op, arm_id, 3) == ["committed", "verifying", "downloading"]
        device = await op.GetDevice(o.GetDeviceRequest(id=arm_id), metadata=ADMIN)
        assert (device.update.state, device.update.active_model_version) == (
            c.UPDATE_STATE_COMMITTED, "1.0.0",
        )  # fmt: skip
        # The protocol-0 stream's legacy string is stored as the model's status.
        assert [
            (m.model_name, m.assigned_version, m.sequence, m.status.state) for m in device.models
        ] == [("digits", "1.0.0", 1, c.UPDATE_STATE_COMMITTED)]
        assert device.agent_protocol == 1  # fmt: skip
        listed = await op.ListDeployments(
            o.ListDeploymentsRequest(model_name="digits", model_version="1.0.0"), metadata=ADMIN
        )
        assert {a.device_id for a in listed.assignments} == {arm_id, twin_id}

        # A second assignment counts the sequence up and is pushed at once.
        again = await op.AssignModel(
            o.AssignModelRequest(device_ids=[arm_id], model_name="digits", model_version="1.0.0"),
            metadata=ADMIN,
        )
        assert again.assignments[0].sequence == 2
        assert (await stream.desired()).assignment.sequence == 2
        audit = await op.ListAuditLog(o.ListAuditLogRequest(), metadata=ADMIN)
        assert sum(e.action == "device.assign" for e in audit.entries) == 3
        stream.call.cancel()
    finally:
        await channel.close()


async def test_assign_is_all_or_nothing_and_names_every_device_it_refuses(
    cp: ControlPlane,
    digits: BuiltModel,
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        arm_id = (await enroll(channel, op, "hw-1", "aarch64")).device_id
        x86_id = (await enroll(channel, op, "hw-2", "x86_64")).device_id  # no class

        async def assign(ids: list[str], version: str = "1.0.0") -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await op.AssignModel(
                    o.AssignModelRequest(device_ids=ids, model_name="digits",
                                         model_version=version), metadata=ADMIN,
                )  # fmt: skip
            return err.value

        # Not built yet: the class has no successful build.
        err = await assign([arm_id])
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no successful build" in (err.details() or "")
        await publish_one_build(cp, digits)
        err = await assign([arm_id, x86_id])
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert x86_id in (err.details() or "") and arm_id not in (err.details() or "")
        assert "1 of 2" in (err.details() or "")
        await op.RejectDevice(o.RejectDeviceRequest(id=arm_id), metadata=ADMIN)
        err = await assign([arm_id])
        assert "rejected" in (err.details() or "")
        assert (await assign([arm_id], "9.9.9")).code() == grpc.StatusCode.NOT_FOUND
        assert (await assign(["nope"])).code() == grpc.StatusCode.NOT_FOUND
        assert (await assign([])).code() == grpc.StatusCode.INVALID_ARGUMENT
        listed = await op.ListDeployments(o.ListDeploymentsRequest(), metadata=ADMIN)
        assert not listed.assignments and not listed.events
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await op.ListDeployments(o.ListDeploymentsRequest(model_version="1"), metadata=ADMIN)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await op.ListDeployments(o.ListDeploymentsRequest(device_id="nope"), metadata=ADMIN)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
