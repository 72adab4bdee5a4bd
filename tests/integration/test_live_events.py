"""Events that live views (the TUI) build on, through a real server and the
real WatchFleet stream: devices coming online and going offline, and new
telemetry, each announced in batches rather than per message."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgefleet.controlplane import server as server_module
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import FleetWatch, enroll_accepted, telemetry_sample

ADMIN = bearer_metadata(ADMIN_TOKEN)


@pytest.fixture
async def fast_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ControlPlane]:
    # Announce every 0.1 s instead of every 5 s, so the test is quick.
    monkeypatch.setattr(server_module, "PRESENCE_FLUSH_S", 0.1)
    monkeypatch.setattr(server_module, "TELEMETRY_EVENT_S", 0.1)
    cp = await create_server(ServerConfig(
        data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN, build_workers=0,
    ))  # fmt: skip
    try:
        yield cp
    finally:
        await cp.stop(grace=0.5)


async def _next_of(watch: FleetWatch, kind: str) -> o.FleetEvent:
    while True:
        event = await watch.next()
        if event.kind == kind:
            return event


async def test_presence_and_telemetry_are_announced_to_watchers(fast_server: ControlPlane) -> None:
    async with grpc.aio.insecure_channel(fast_server.address) as channel:
        op = og.OperatorServiceStub(channel)
        watch = await FleetWatch(op, "device.presence", "telemetry.updated").ready()
        enrolled = await enroll_accepted(channel, "hw-live")

        async def hello() -> AsyncIterator[d.AgentMessage]:
            yield d.AgentMessage(hello=d.Hello(hardware=c.HardwareProfile(arch="aarch64")))
            await asyncio.sleep(60)

        stream = dg.DeviceServiceStub(channel).Sync(
            hello(), metadata=bearer_metadata(enrolled.device_credential)
        )
        await stream.read()  # the first desired state: connected
        online = await _next_of(watch, "device.presence")
        assert online.message == (
            f"1 device(s) came online or went offline (device {enrolled.device_id})"
        )

        now = dt.datetime.now(dt.UTC)
        await dg.DeviceServiceStub(channel).UploadTelemetry(
            d.UploadTelemetryRequest(samples=[telemetry_sample(1, now), telemetry_sample(2, now)]),
            metadata=bearer_metadata(enrolled.device_credential),
        )
        telemetry = await _next_of(watch, "telemetry.updated")
        assert telemetry.message == "2 new sample(s)"

        stream.cancel()
        offline = await _next_of(watch, "device.presence")
        assert offline.message == online.message
        watch.call.cancel()
