"""Several control-plane replicas on one PostgreSQL database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import create_server
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN, open_sync

ADMIN = bearer_metadata(ADMIN_TOKEN)


async def test_two_replicas_start_together_and_share_the_fleet(pg_url: str, tmp_path: Path) -> None:
    configs = [
        ServerConfig(
            data_dir=tmp_path / f"r{i}",
            db_url=pg_url,
            listen="127.0.0.1:0",
            admin_token=ADMIN_TOKEN,
        )
        for i in range(2)
    ]
    # Started concurrently: migrations must serialize, not collide.
    a, b = await asyncio.gather(*(create_server(cfg) for cfg in configs))
    try:
        async with (
            grpc.aio.insecure_channel(a.address) as ch_a,
            grpc.aio.insecure_channel(b.address) as ch_b,
        ):
            op_a, op_b = og.OperatorServiceStub(ch_a), og.OperatorServiceStub(ch_b)
            token = await op_a.CreateEnrollmentToken(
                o.CreateEnrollmentTokenRequest(name="t", max_uses=1), metadata=ADMIN
            )
            enrolled = await dg.DeviceServiceStub(ch_b).Enroll(
                d.EnrollRequest(enrollment_token=token.secret, hardware_id="hw-1")
            )
            listed = await op_a.ListDevices(o.ListDevicesRequest(), metadata=ADMIN)
            assert [x.id for x in listed.devices] == [enrolled.device_id]
            # The token's use limit holds across replicas.
            with_a = dg.DeviceServiceStub(ch_a).Enroll(
                d.EnrollRequest(enrollment_token=token.secret, hardware_id="hw-2")
            )
            try:
                await with_a
                raise AssertionError("a second enrollment exceeded max_uses=1")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            got = await op_b.GetDevice(o.GetDeviceRequest(id=enrolled.device_id), metadata=ADMIN)
            assert got.state == c.DEVICE_STATE_ACCEPTED
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_a_change_on_one_replica_reaches_an_agent_on_another(
    pg_url: str, tmp_path: Path
) -> None:
    configs = [
        ServerConfig(
            data_dir=tmp_path / f"r{i}",
            db_url=pg_url,
            listen="127.0.0.1:0",
            admin_token=ADMIN_TOKEN,
        )
        for i in range(2)
    ]
    a = await create_server(configs[0])
    b = await create_server(configs[1])
    try:
        async with (
            grpc.aio.insecure_channel(a.address) as ch_a,
            grpc.aio.insecure_channel(b.address) as ch_b,
        ):
            op_a = og.OperatorServiceStub(ch_a)
            token = await op_a.CreateEnrollmentToken(
                o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN
            )
            enrolled = await dg.DeviceServiceStub(ch_b).Enroll(
                d.EnrollRequest(enrollment_token=token.secret, hardware_id="hw-x")
            )
            call, stream = open_sync(ch_b, enrolled.device_credential)
            first = await asyncio.wait_for(stream.__anext__(), 10)
            await op_a.UpdateDeviceLabels(
                o.UpdateDeviceLabelsRequest(id=enrolled.device_id, set={"via": "replica-a"}),
                metadata=ADMIN,
            )
            pushed = await asyncio.wait_for(stream.__anext__(), 5)
            assert pushed.desired.revision > first.desired.revision
            assert pushed.desired.labels["via"] == "replica-a"
            call.cancel()
    finally:
        await asyncio.gather(a.stop(), b.stop())
