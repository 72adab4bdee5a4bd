"""Talking to a control plane from a test over grpc.aio: the admin's
metadata, the status of a call that must fail, enrollment, a device's Sync
stream, an operator's WatchFleet stream and a telemetry sample."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet import update_state
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN

ADMIN = bearer_metadata(ADMIN_TOKEN)
OPERATOR_SERVICE = o.DESCRIPTOR.services_by_name["OperatorService"]


async def status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The code and details of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def enrollment_token(
    op: og.OperatorServiceAsyncStub,
    policy: o.EnrollmentPolicy.ValueType = o.ENROLLMENT_POLICY_AUTO_ACCEPT,
) -> str:
    resp = await op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="t", policy=policy),
        metadata=ADMIN,
    )
    return resp.secret


async def enroll(
    channel: grpc.aio.Channel, op: og.OperatorServiceAsyncStub, hw_id: str, arch: str
) -> d.EnrollResponse:
    """`hw_id` enrolled with a token of its own (the default policy), reporting `arch`."""
    token = await op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name=hw_id), metadata=ADMIN
    )
    return await dg.DeviceServiceStub(channel).Enroll(
        d.EnrollRequest(
            enrollment_token=token.secret,
            hardware_id=hw_id,
            hardware=c.HardwareProfile(arch=arch),
        )
    )


async def enroll_accepted(channel: grpc.aio.Channel, hw_id: str) -> d.EnrollResponse:
    """`hw_id` enrolled with an auto-accept token: an accepted aarch64 device."""
    op: og.OperatorServiceAsyncStub = og.OperatorServiceStub(channel)
    token = await op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name=hw_id, policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT),
        metadata=ADMIN,
    )
    return await dg.DeviceServiceStub(channel).Enroll(
        d.EnrollRequest(
            enrollment_token=token.secret,
            hardware_id=hw_id,
            hardware=c.HardwareProfile(arch="aarch64", memory_mb=2048, cpu_cores=4),
        )
    )


class SyncStream:
    """A device's Sync stream: send agent messages, read desired states."""

    def __init__(
        self, channel: grpc.aio.Channel, credential: str, arch: str, protocol: int = 0
    ) -> None:
        self.outbox: asyncio.Queue[d.AgentMessage] = asyncio.Queue()
        # 0: an old one-model agent (Hello.protocol); 2: a multi-model one.
        self.protocol = protocol
        # The Hello's hardware is what classifies the device: keep its arch.
        hello = d.Hello(hardware=c.HardwareProfile(arch=arch), protocol=protocol)
        self.outbox.put_nowait(d.AgentMessage(hello=hello))
        self.call = dg.DeviceServiceStub(channel).Sync(
            self._requests(), metadata=bearer_metadata(credential)
        )

    async def _requests(self) -> AsyncIterator[d.AgentMessage]:
        while True:
            yield await self.outbox.get()

    async def desired(self) -> d.DesiredState:
        while True:
            message = await asyncio.wait_for(self.call.read(), timeout=10)
            assert isinstance(message, d.ControlMessage), message  # not EOF
            if message.WhichOneof("kind") == "desired":
                return message.desired

    def report(self, state: str, sequence: int, **fields: Any) -> None:
        """One model's status ("digits" 1.0.0 unless `fields` say otherwise),
        as the stream's protocol sends it: protocol 2 in StatusReport.models
        with the state enum, older in StatusReport.update as a string."""
        values: dict[str, Any] = {"model_name": "digits", "model_version": "1.0.0", **fields}
        if self.protocol >= 2:
            update = c.UpdateStatus(state=update_state.to_wire(state), sequence=sequence, **values)
            report = d.StatusReport(models=[update])
        else:
            update = c.UpdateStatus(legacy_state=state, sequence=sequence, **values)
            report = d.StatusReport(update=update)
        self.outbox.put_nowait(d.AgentMessage(status=report))


class FleetWatch:
    """One WatchFleet stream; `ready` returns once the server subscribed."""

    def __init__(self, op: og.OperatorServiceAsyncStub, *kinds: str) -> None:
        self.call = op.WatchFleet(o.WatchFleetRequest(kinds=kinds), metadata=ADMIN)

    async def ready(self) -> FleetWatch:
        await asyncio.wait_for(self.call.initial_metadata(), timeout=10)
        return self

    async def next(self) -> o.FleetEvent:
        event = await asyncio.wait_for(self.call.read(), timeout=10)
        assert isinstance(event, o.FleetEvent), event
        return event


def telemetry_sample(seq: int, at: dt.datetime, **fields: Any) -> d.TelemetrySample:
    """One interval of digits 1.0.0 (10 requests, 1 error); `fields` override."""
    stamp = Timestamp()
    stamp.FromDatetime(at)
    values: dict[str, Any] = {
        "model_name": "digits", "model_version": "1.0.0", "request_count": 10,
        "error_count": 1, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0, "latency_p99_ms": 3.0,
    }  # fmt: skip
    return d.TelemetrySample(seq=seq, at=stamp, **(values | fields))
