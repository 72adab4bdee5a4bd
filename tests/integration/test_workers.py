"""Two workers of one control plane in this process, on one SQLite file, each
on its own port: a change made through one reaches an agent synced to the
other, and both write to the file together. `edgefleet server --workers`
as processes: tests/e2e/test_workers.py."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import WorkerSlot, create_server
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN, open_sync

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers need Linux"),
]
ADMIN = bearer_metadata(ADMIN_TOKEN)


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    """Channels to two workers of one server on one SQLite file, in this
    process, each on its own port so the test decides which one a call
    reaches."""
    config = ServerConfig(data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN)
    first = await create_server(config, WorkerSlot(0, 2))
    second = await create_server(config, WorkerSlot(1, 2))
    try:
        async with (
            grpc.aio.insecure_channel(first.address) as ch_a,
            grpc.aio.insecure_channel(second.address) as ch_b,
        ):
            yield ch_a, ch_b
    finally:
        await asyncio.gather(first.stop(), second.stop())


async def _token(channel: grpc.aio.Channel) -> str:
    created = await og.OperatorServiceStub(channel).CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN
    )
    return str(created.secret)


async def test_a_change_made_on_one_worker_reaches_an_agent_on_the_other(
    workers: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    ch_a, ch_b = workers
    enrolled = await dg.DeviceServiceStub(ch_b).Enroll(
        d.EnrollRequest(enrollment_token=await _token(ch_a), hardware_id="hw-x")
    )
    call, stream = open_sync(ch_b, enrolled.device_credential)
    first = await asyncio.wait_for(stream.__anext__(), 10)
    for value in ("one", "two"):
        await og.OperatorServiceStub(ch_a).UpdateDeviceLabels(
            o.UpdateDeviceLabelsRequest(id=enrolled.device_id, set={"via": value}),
            metadata=ADMIN,
        )
        pushed = await asyncio.wait_for(stream.__anext__(), 5)
        assert pushed.desired.revision > first.desired.revision
        assert pushed.desired.labels["via"] == value
    call.cancel()


async def test_workers_write_to_the_sqlite_file_together(
    workers: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    token = await _token(workers[0])
    stubs = [dg.DeviceServiceStub(ch) for ch in workers]
    enrolled = await asyncio.gather(*(
        stubs[i % 2].Enroll(d.EnrollRequest(enrollment_token=token, hardware_id=f"hw-{i}"))
        for i in range(40)
    ))  # fmt: skip
    listed = await og.OperatorServiceStub(workers[1]).ListDevices(
        o.ListDevicesRequest(page_size=100), metadata=ADMIN
    )
    assert sorted(x.id for x in listed.devices) == sorted(e.device_id for e in enrolled)
