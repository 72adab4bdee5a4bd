"""The gRPC contract against a real server on a loopback port: auth on every
RPC, bad input answered with the right status and nothing stored, desired-state
push, and the standard services (health, reflection, metrics)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from sqlalchemy import func, select

from edgefleet.controlplane.client.connection import bearer_metadata, operator_stub
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.db.models import BlobRow
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.demo.models import BuiltModel
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.metrics import histogram_summary, scrape_histograms
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN, OPERATOR_SERVICE, enrollment_token, status_of

CHUNK = 256 * 1024


@pytest.fixture
async def channel(server: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def op(channel: grpc.aio.Channel) -> og.OperatorServiceStub:
    return og.OperatorServiceStub(channel)


@pytest.fixture
def dev(channel: grpc.aio.Channel) -> dg.DeviceServiceStub:
    return dg.DeviceServiceStub(channel)


async def _enroll(
    dev: dg.DeviceServiceStub,
    token: str,
    hw_id: str,
    *,
    proof: d.EnrollResponse | None = None,
    **labels: str,
) -> d.EnrollResponse:
    """Enroll `hw_id`; again, with `proof`: the earlier answer's identity."""
    return await dev.Enroll(  # type: ignore[no-any-return]
        d.EnrollRequest(
            enrollment_token=token,
            hardware_id=hw_id,
            labels=labels,
            hardware=c.HardwareProfile(arch="aarch64", memory_mb=2048, cpu_cores=4),
            runtime=c.RuntimeFingerprint(onnxruntime_version="1.20.0"),
            proof=d.ReenrollmentProof(
                device_id=proof.device_id, device_credential=proof.device_credential
            ) if proof is not None else None,
        )
    )  # fmt: skip


# ---------------------------------------------------------------- auth


def _methods(service: Any) -> Iterator[tuple[str, Any]]:
    for method in service.methods:
        yield method.name, method


async def _call_raw(channel: grpc.aio.Channel, service: Any, method: Any, metadata: Any) -> None:
    path = f"/{service.full_name}/{method.name}"
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    kwargs = {
        "request_serializer": request_cls.SerializeToString,
        "response_deserializer": response_cls.FromString,
    }
    if method.client_streaming:

        async def requests() -> AsyncIterator[Any]:
            yield request_cls()

        if method.server_streaming:
            call = channel.stream_stream(path, **kwargs)(requests(), metadata=metadata, timeout=10)
            async for _ in call:
                pass
        else:
            await channel.stream_unary(path, **kwargs)(requests(), metadata=metadata, timeout=10)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **kwargs)(
            request_cls(), metadata=metadata, timeout=10
        ):
            pass
    else:
        await channel.unary_unary(path, **kwargs)(request_cls(), metadata=metadata, timeout=10)


DEVICE_SERVICE = d.DESCRIPTOR.services_by_name["DeviceService"]


async def test_every_operator_rpc_requires_an_operator_token(
    channel: grpc.aio.Channel, op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    device = await _enroll(dev, await enrollment_token(op), "hw-auth")
    device_md = bearer_metadata(device.device_credential)
    cases = {
        "none": (None, grpc.StatusCode.UNAUTHENTICATED),
        "garbage": (bearer_metadata("efo_nope.nope"), grpc.StatusCode.UNAUTHENTICATED),
        "not bearer": ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
        "device credential": (device_md, grpc.StatusCode.PERMISSION_DENIED),
    }
    for name, method in _methods(OPERATOR_SERVICE):
        for case, (metadata, expected) in cases.items():
            code, _ = await status_of(_call_raw(channel, OPERATOR_SERVICE, method, metadata))
            assert code == expected, f"{name} with {case}: {code}"


async def test_every_device_rpc_requires_a_device_credential(
    channel: grpc.aio.Channel, op: og.OperatorServiceStub
) -> None:
    cases = {
        "none": (None, grpc.StatusCode.UNAUTHENTICATED),
        "garbage": (bearer_metadata("efd_abc.def"), grpc.StatusCode.UNAUTHENTICATED),
        "operator token": (bearer_metadata(ADMIN_TOKEN), grpc.StatusCode.UNAUTHENTICATED),
    }
    for name, method in _methods(DEVICE_SERVICE):
        if name == "Enroll":  # authenticated by the enrollment token in the request
            continue
        for case, (metadata, expected) in cases.items():
            code, _ = await status_of(_call_raw(channel, DEVICE_SERVICE, method, metadata))
            assert code == expected, f"{name} with {case}: {code}"


async def test_operator_token_shaped_secret_on_device_rpc_is_permission_denied(
    channel: grpc.aio.Channel,
) -> None:
    method = DEVICE_SERVICE.methods_by_name["UploadTelemetry"]
    code, details = await status_of(
        _call_raw(channel, DEVICE_SERVICE, method, bearer_metadata("efo_abc.def"))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "operator token" in details


async def test_enroll_with_a_bad_token_is_unauthenticated(dev: dg.DeviceServiceStub) -> None:
    code, details = await status_of(_enroll(dev, "efe_0000.nope", "hw"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "enrollment token" in details
    code, _ = await status_of(_enroll(dev, "", "hw"))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_device_cannot_act_as_another(
    op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    token = await enrollment_token(op)
    a = await _enroll(dev, token, "hw-a", who="a")
    b = await _enroll(dev, token, "hw-b", who="b")
    # A's id with B's secret: the id names the device, the secret must be A's.
    forged = f"efd_{a.device_id}.{b.device_credential.split('.', 1)[1]}"
    code, _ = await _sync_refusal(dev, forged)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # Each credential sees only its own desired state.
    desired_b = await _first_desired(dev, b.device_credential)
    assert desired_b.labels["who"] == "b"
    # A re-enrollment rotates the credential: the old one stops working,
    # also right after it was used (and verified) successfully.
    assert (await _first_desired(dev, a.device_credential)).labels["who"] == "a"
    again = await _enroll(dev, token, "hw-a", proof=a)
    assert again.device_id == a.device_id
    code, _ = await _sync_refusal(dev, a.device_credential)
    assert code == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------- sync


async def _first_desired(dev: dg.DeviceServiceStub, credential: str) -> d.DesiredState:
    async def requests() -> AsyncIterator[d.AgentMessage]:
        yield d.AgentMessage(hello=d.Hello(hardware=c.HardwareProfile(arch="aarch64")))
        await asyncio.sleep(30)

    call = dev.Sync(requests(), metadata=bearer_metadata(credential), timeout=10)
    try:
        async for message in call:
            assert message.WhichOneof("kind") == "desired", "the first reply is DesiredState"
            return message.desired
    finally:
        call.cancel()
    raise AssertionError("stream ended without a desired state")


async def _sync_refusal(dev: dg.DeviceServiceStub, credential: str) -> tuple[grpc.StatusCode, str]:
    """How Sync refuses `credential`. The credential is checked before the
    agent's first message, and this agent sends none: grpc.aio reports a
    client write that fails after the server's early status as INTERNAL in
    place of that status (grpc/grpc#36066), which made the refusal flaky
    under load. A credential that is not refused times out instead."""

    async def silent() -> AsyncIterator[d.AgentMessage]:
        await asyncio.sleep(30)
        yield d.AgentMessage()

    call = dev.Sync(silent(), metadata=bearer_metadata(credential), timeout=10)
    try:
        return await status_of(call.read())
    finally:
        call.cancel()


class AgentStream:
    """A minimal real-protocol agent: Hello, then heartbeats on demand."""

    def __init__(self, dev: dg.DeviceServiceStub, credential: str) -> None:
        self.outbox: asyncio.Queue[d.AgentMessage | None] = asyncio.Queue()
        self.desired: asyncio.Queue[d.DesiredState] = asyncio.Queue()
        self.acks: asyncio.Queue[int] = asyncio.Queue()
        self.outbox.put_nowait(d.AgentMessage(hello=d.Hello()))
        self.call = dev.Sync(self._requests(), metadata=bearer_metadata(credential))
        self.task = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[d.AgentMessage]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def _read(self) -> None:
        async for message in self.call:
            if message.HasField("desired"):
                self.desired.put_nowait(message.desired)
            else:
                self.acks.put_nowait(message.heartbeat_ack.seq)

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def test_desired_state_change_reaches_a_connected_agent(
    op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    device = await _enroll(dev, await enrollment_token(op), "hw-push")
    agent = AgentStream(dev, device.device_credential)
    try:
        first = await asyncio.wait_for(agent.desired.get(), 10)
        assert first.device_state == c.DEVICE_STATE_ACCEPTED
        assert first.config.heartbeat_interval_s == 2
        agent.outbox.put_nowait(d.AgentMessage(heartbeat=d.Heartbeat(seq=7)))
        assert await asyncio.wait_for(agent.acks.get(), 10) == 7
        await op.UpdateDeviceLabels(
            o.UpdateDeviceLabelsRequest(id=device.device_id, set={"ring": "1"}), metadata=ADMIN
        )
        pushed = await asyncio.wait_for(agent.desired.get(), 5)
        assert pushed.revision > first.revision and pushed.labels["ring"] == "1"
        listed = await op.GetDevice(o.GetDeviceRequest(id=device.device_id), metadata=ADMIN)
        assert listed.online
    finally:
        await agent.close()


async def test_pending_device_syncs_but_gets_no_work_until_accepted(
    op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    device = await _enroll(
        dev, await enrollment_token(op, o.ENROLLMENT_POLICY_PENDING), "hw-pending"
    )
    assert device.state == c.DEVICE_STATE_PENDING
    agent = AgentStream(dev, device.device_credential)
    try:
        first = await asyncio.wait_for(agent.desired.get(), 10)
        assert first.device_state == c.DEVICE_STATE_PENDING
        assert not first.HasField("assignment")
        pending = await op.ListDevices(
            o.ListDevicesRequest(state=c.DEVICE_STATE_PENDING), metadata=ADMIN
        )
        assert [x.id for x in pending.devices] == [device.device_id]
        await op.AcceptDevice(o.AcceptDeviceRequest(id=device.device_id), metadata=ADMIN)
        accepted = await asyncio.wait_for(agent.desired.get(), 5)
        assert accepted.device_state == c.DEVICE_STATE_ACCEPTED
        # Rejecting ends the stream with PERMISSION_DENIED, after saying so.
        await op.RejectDevice(
            o.RejectDeviceRequest(id=device.device_id, reason="stolen"), metadata=ADMIN
        )
        rejected = await asyncio.wait_for(agent.desired.get(), 5)
        assert rejected.device_state == c.DEVICE_STATE_REJECTED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(agent.task, 5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        code, details = await _sync_refusal(dev, device.device_credential)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "stolen" in details
    finally:
        await agent.close()


async def test_sync_must_start_with_hello(
    op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    device = await _enroll(dev, await enrollment_token(op), "hw-hello")

    async def requests() -> AsyncIterator[d.AgentMessage]:
        yield d.AgentMessage(heartbeat=d.Heartbeat(seq=1))

    call = dev.Sync(requests(), metadata=bearer_metadata(device.device_credential))
    code, details = await status_of(_drain(call))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Hello" in details


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


# ---------------------------------------------------------------- models


def _stored_blobs(server: ControlPlane) -> int:
    with server.db.unit_of_work(readonly=True) as uow:
        return int(uow.session.scalar(select(func.count()).select_from(BlobRow)) or 0)


async def _assert_nothing_stored(
    op: og.OperatorServiceStub, server: ControlPlane, models: int, blobs: int
) -> None:
    listed = await op.ListModels(o.ListModelsRequest(), metadata=ADMIN)
    assert sum(m.version_count for m in listed.models) == models
    assert _stored_blobs(server) == blobs


async def test_push_a_real_model_with_sample_data_and_labels(
    op: og.OperatorServiceStub, server: ControlPlane, digits: BuiltModel
) -> None:
    parts = model_parts(model=digits.model, sample_data=digits.sample_data, labels=digits.labels)
    version = await op.PushModel(push_requests("digits", "1.0.0", parts), metadata=ADMIN)
    assert version.sha256 == hashlib.sha256(parts[o.MODEL_PART_MODEL]).hexdigest()
    assert [(t.name, t.dtype, list(t.shape)) for t in version.inputs] == [
        ("input", "float32", [-1, 64])
    ]
    assert [(t.name, list(t.shape)) for t in version.outputs] == [("probabilities", [-1, 10])]
    assert version.sample_data.num_samples == 200 and version.sample_data.has_labels
    assert version.sample_data.size_bytes == digits.sample_data.stat().st_size
    assert version.labels.count == 10 and version.opset == 17
    await op.PushModel(push_requests("digits", "1.1.0-rc.1", parts), metadata=ADMIN)
    got = await op.GetModel(o.GetModelRequest(name="digits"), metadata=ADMIN)
    assert [v.version for v in got.versions] == ["1.1.0-rc.1", "1.0.0"]
    assert got.model.latest_version == "1.1.0-rc.1"
    # Identical bytes are stored once (content-addressed).
    assert _stored_blobs(server) == 3


async def test_bad_pushes_get_clear_errors_and_store_nothing(
    op: og.OperatorServiceStub, server: ControlPlane, digits: BuiltModel, tmp_path: Path
) -> None:
    good = model_parts(model=digits.model, sample_data=digits.sample_data)
    await op.PushModel(push_requests("digits", "1.0.0", good), metadata=ADMIN)
    await _assert_nothing_stored(op, server, models=1, blobs=2)
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, input=np.zeros((4, 63), np.float32))
    model = good[o.MODEL_PART_MODEL]
    cases: list[tuple[str, Any, grpc.StatusCode, str]] = [
        ("duplicate", push_requests("digits", "1.0.0", good),
         grpc.StatusCode.ALREADY_EXISTS, "immutable"),
        ("invalid onnx", push_requests("junk", "1.0.0", model_parts(model=b"\x08\x01garbage" * 50)),
         grpc.StatusCode.INVALID_ARGUMENT, "not a valid ONNX model"),
        ("bad version", push_requests("digits", "v2", good),
         grpc.StatusCode.INVALID_ARGUMENT, "semantic version"),
        ("truncated", push_requests("digits", "2.0.0", {o.MODEL_PART_MODEL: model},
                                     declared={o.MODEL_PART_MODEL: len(model) + 10}),
         grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("corrupted", push_requests("digits", "2.0.0", {o.MODEL_PART_MODEL: model},
                                     send={o.MODEL_PART_MODEL: model[:-1] + b"\x00"}),
         grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
        ("oversized", push_requests("big", "1.0.0", model_parts(model=os.urandom(5 * 1024 * 1024))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
        ("sample data shape", push_requests("digits", "2.0.0",
                                             model_parts(model=digits.model, sample_data=bad_npz)),
         grpc.StatusCode.INVALID_ARGUMENT, "axis 1: 63 != 64"),
        ("no header", _only_chunks(), grpc.StatusCode.INVALID_ARGUMENT, "header"),
    ]  # fmt: skip
    # Sent with the blocking stack, as the CLI does: grpc.aio clients can see
    # INTERNAL instead of the server's status when the server rejects a
    # client stream early (grpc/grpc#36066).
    sync_op = operator_stub(server.address, ADMIN_TOKEN)
    for name, requests, code, text in cases:
        messages = [m async for m in requests]
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(sync_op.PushModel, iter(messages), timeout=30)
        got_code, details = info.value.code(), info.value.details() or ""
        assert (got_code, text in details) == (code, True), f"{name}: {got_code} {details}"
        await _assert_nothing_stored(op, server, models=1, blobs=2)
    assert not list((server.config.blob_dir / "tmp").iterdir())


async def _only_chunks() -> AsyncIterator[o.PushModelRequest]:
    yield o.PushModelRequest(chunk=o.PushModelChunk(part=o.MODEL_PART_MODEL, data=b"x"))


async def test_a_push_cancelled_midway_leaves_nothing(
    op: og.OperatorServiceStub, server: ControlPlane, digits: BuiltModel
) -> None:
    blob = os.urandom(3 * 1024 * 1024)
    sent_half = asyncio.Event()

    async def requests() -> AsyncIterator[o.PushModelRequest]:
        async for request in push_requests("digits", "9.0.0", {o.MODEL_PART_MODEL: blob}):
            yield request
            if request.HasField("chunk") and not sent_half.is_set():
                sent_half.set()
                await asyncio.sleep(30)

    call = op.PushModel(requests(), metadata=ADMIN)
    await asyncio.wait_for(sent_half.wait(), 10)
    await asyncio.sleep(0.2)
    call.cancel()
    for _ in range(100):  # the server notices the cancellation asynchronously
        if not list((server.config.blob_dir / "tmp").iterdir()):
            break
        await asyncio.sleep(0.05)
    assert not list((server.config.blob_dir / "tmp").iterdir())
    await _assert_nothing_stored(op, server, models=0, blobs=0)


async def test_unknown_ids_are_not_found(op: og.OperatorServiceStub) -> None:
    calls = [
        op.GetDevice(o.GetDeviceRequest(id="nope"), metadata=ADMIN),
        op.AcceptDevice(o.AcceptDeviceRequest(id="nope"), metadata=ADMIN),
        op.UpdateDeviceLabels(o.UpdateDeviceLabelsRequest(id="nope"), metadata=ADMIN),
        op.GetDeviceClass(o.GetDeviceClassRequest(name="nope"), metadata=ADMIN),
        op.DeleteDeviceClass(o.DeleteDeviceClassRequest(name="nope"), metadata=ADMIN),
        op.GetModel(o.GetModelRequest(name="nope"), metadata=ADMIN),
        op.GetModelVersion(
            o.GetModelVersionRequest(model_name="nope", version="1.0.0"), metadata=ADMIN
        ),
        op.RevokeEnrollmentToken(o.RevokeEnrollmentTokenRequest(id="nope"), metadata=ADMIN),
        op.ListDevices(o.ListDevicesRequest(class_name="nope"), metadata=ADMIN),
    ]
    for call in calls:
        code, details = await status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


async def test_invalid_class_and_label_input(
    op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    cases = [
        o.CreateDeviceClassRequest(name="x"),  # no runtime
        o.CreateDeviceClassRequest(
            name="Bad Name", constraints=c.ConstraintProfile(runtime=c.RUNTIME_TFLITE)
        ),
        o.CreateDeviceClassRequest(
            name="x",
            constraints=c.ConstraintProfile(runtime=c.RUNTIME_TFLITE, max_model_size_mb=-1),
        ),
        o.CreateDeviceClassRequest(
            name="x",
            constraints=c.ConstraintProfile(runtime=c.RUNTIME_TFLITE),
            match_rules=[c.MatchRule(field="colour", op=c.MATCH_OP_EQ, values=["red"])],
        ),
    ]
    for request in cases:
        code, details = await status_of(op.CreateDeviceClass(request, metadata=ADMIN))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details
    listed = await op.ListDeviceClasses(o.ListDeviceClassesRequest(), metadata=ADMIN)
    assert not listed.classes
    device = await _enroll(dev, await enrollment_token(op), "hw-labels")
    code, details = await status_of(
        op.UpdateDeviceLabels(
            o.UpdateDeviceLabelsRequest(id=device.device_id, set={"bad key!": "x"}), metadata=ADMIN
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "label key" in details


async def test_class_rules_place_devices_over_the_api(
    op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    token = await enrollment_token(op)
    canary = await _enroll(dev, token, "hw-1", tier="canary")
    await _enroll(dev, token, "hw-2", tier="prod")
    created = await op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name="pi-canary",
            constraints=c.ConstraintProfile(
                runtime=c.RUNTIME_TFLITE, max_model_size_mb=4, latency_budget_p95_ms=20,
                max_memory_mb=256, quantization=c.QUANTIZATION_INT8, min_accuracy_retention=0.98,
            ),
            match_rules=[
                c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["aarch64"]),
                c.MatchRule(field="memory_mb", op=c.MATCH_OP_LT, values=["4096"]),
                c.MatchRule(field="label.tier", op=c.MATCH_OP_EQ, values=["canary"]),
            ],
        ),
        metadata=ADMIN,
    )  # fmt: skip
    assert created.device_count == 1
    assert created.constraints.max_model_size_mb == 4
    assert created.constraints.HasField("latency_budget_p95_ms")
    assert not c.ConstraintProfile().HasField("max_memory_mb")
    members = await op.ListDevices(o.ListDevicesRequest(class_name="pi-canary"), metadata=ADMIN)
    assert [m.id for m in members.devices] == [canary.device_id]
    unclassified = await op.ListDevices(o.ListDevicesRequest(unclassified=True), metadata=ADMIN)
    assert len(unclassified.devices) == 1
    updated = await op.UpdateDeviceClass(
        o.UpdateDeviceClassRequest(name="pi-canary", replace_match_rules=True, match_rules=[
            c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["aarch64"])]),
        metadata=ADMIN,
    )  # fmt: skip
    assert updated.device_count == 2 and updated.constraints.max_model_size_mb == 4
    audit = await op.ListAuditLog(o.ListAuditLogRequest(), metadata=ADMIN)
    assert [e.action for e in audit.entries][:2] == ["class.update", "class.create"]
    assert audit.entries[0].actor == "bootstrap-admin"


# ---------------------------------------------------------------- standard services


async def test_health_and_reflection(server: ControlPlane, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "edgefleet.v1.DeviceService", "edgefleet.v1.OperatorService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    def reflect() -> list[str]:
        with grpc.insecure_channel(server.address) as sync_channel:
            db = ProtoReflectionDescriptorDatabase(sync_channel)
            services = list(db.get_services())
            # Full descriptors come back too, so grpcurl can call methods.
            db.FindFileContainingSymbol("edgefleet.v1.OperatorService")
            return services

    services = await asyncio.to_thread(reflect)
    assert {"edgefleet.v1.DeviceService", "edgefleet.v1.OperatorService"} <= set(services)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LOOP_AND_TICK = ("edgefleet_event_loop_lag_seconds", "edgefleet_rollout_tick_seconds")


async def test_prometheus_metrics(tmp_path: Path) -> None:
    port = _free_port()
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "m", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            metrics_listen=f"127.0.0.1:{port}",
        )
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(cp.address) as ch:
            op = og.OperatorServiceStub(ch)
            token = await enrollment_token(op)
            await _enroll(dg.DeviceServiceStub(ch), token, "hw-m")
            await status_of(op.GetDevice(o.GetDeviceRequest(id="nope"), metadata=ADMIN))

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return str(r.read().decode())

        url, names = f"http://127.0.0.1:{port}/metrics", tuple(LOOP_AND_TICK)
        before = await asyncio.to_thread(scrape_histograms, url, names)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: block the loop, as a stall would
        for _ in range(100):  # until the probe woke and a tick ended
            await asyncio.sleep(0.1)
            after = await asyncio.to_thread(scrape_histograms, url, names)
            if all(histogram_summary(before[n], after[n])["count"] for n in names):
                break
        body = await asyncio.to_thread(scrape)
    finally:
        await cp.stop()
    lag = histogram_summary(before[LOOP_AND_TICK[0]], after[LOOP_AND_TICK[0]])
    # A wake-up came more than 0.2 s late: the blocked stretch is seen.
    late = after[LOOP_AND_TICK[0]].buckets[0.2] - before[LOOP_AND_TICK[0]].buckets[0.2]
    assert lag["count"] - late >= 1 and lag["sum_s"] >= 0.25, lag
    assert histogram_summary(before[LOOP_AND_TICK[1]], after[LOOP_AND_TICK[1]])["count"] >= 1
    assert 'edgefleet_rpc_total{code="OK",method="Enroll"} 1.0' in body
    assert 'edgefleet_rpc_total{code="NOT_FOUND",method="GetDevice"} 1.0' in body
    assert 'edgefleet_rpc_seconds_count{method="CreateEnrollmentToken"} 1.0' in body
    assert 'edgefleet_devices{state="accepted"} 1.0' in body


async def test_bootstrap_admin_token_is_written_once_with_mode_0600(tmp_path: Path) -> None:
    data = tmp_path / "boot"
    cp = await create_server(ServerConfig(data_dir=data, listen="127.0.0.1:0"))
    try:
        path = data / "admin-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert cp.admin_token == token
        async with grpc.aio.insecure_channel(cp.address) as ch:
            resp = await og.OperatorServiceStub(ch).ListDevices(
                o.ListDevicesRequest(), metadata=bearer_metadata(token)
            )
            assert list(resp.devices) == []
    finally:
        await cp.stop()
    cp = await create_server(ServerConfig(data_dir=data, listen="127.0.0.1:0"))
    try:
        assert cp.admin_token is None  # not regenerated on restart
        assert path.read_text().strip() == token
    finally:
        await cp.stop()


async def test_uploads_cut_off_by_a_crash_are_removed_on_start(tmp_path: Path) -> None:
    """Once older than the blob grace period: the blob directory may be
    shared, and a younger one another replica's upload in progress."""
    leftover = tmp_path / "crash" / "blobs" / "tmp" / "upload-abc"
    leftover.mkdir(parents=True)
    (leftover / "model").write_bytes(b"half a model")
    young = tmp_path / "crash" / "blobs" / "tmp" / "upload-young"
    young.mkdir()
    (young / "model").write_bytes(b"a model on its way")
    old = time.time() - 2 * 3600
    for path in (leftover, leftover / "model"):
        os.utime(path, (old, old))
    cp = await create_server(
        ServerConfig(data_dir=tmp_path / "crash", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN)
    )
    try:
        for _ in range(100):  # garbage collection runs as the server starts
            if not leftover.exists():
                break
            await asyncio.sleep(0.05)
        assert not leftover.exists()
        assert (young / "model").exists()
    finally:
        await cp.stop()


async def test_class_build_fields_round_trip_and_are_validated(op: og.OperatorServiceStub) -> None:
    created = await op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name="mcu",
            constraints=c.ConstraintProfile(
                runtime=c.RUNTIME_TFLITE, threads=2, speed_factor=12.5, microcontroller=True
            ),
        ),
        metadata=ADMIN,
    )
    got = created.constraints
    assert (got.threads, got.speed_factor, got.microcontroller) == (2, 12.5, True)
    updated = await op.UpdateDeviceClass(
        o.UpdateDeviceClassRequest(
            name="mcu", constraints=c.ConstraintProfile(microcontroller=False, threads=4)
        ),
        metadata=ADMIN,
    )
    got = updated.constraints
    assert (got.threads, got.speed_factor, got.microcontroller) == (4, 12.5, False)
    for bad in (
        c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME, microcontroller=True),
        c.ConstraintProfile(runtime=c.RUNTIME_TFLITE, threads=0),
        c.ConstraintProfile(runtime=c.RUNTIME_TFLITE, speed_factor=0),
    ):
        code, details = await status_of(
            op.CreateDeviceClass(
                o.CreateDeviceClassRequest(name="bad", constraints=bad), metadata=ADMIN
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details
