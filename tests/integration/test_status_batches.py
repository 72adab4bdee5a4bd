"""Agents' status reports written in batches (StatusBuffer over
DeploymentService.record_statuses) and set-based assignment, on SQLite and
PostgreSQL: one batch carries many devices' reports, each device's history
keeps every step in order, progress collapses, a failed write is retried
with nothing lost, and concurrent assignments never share a sequence."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.deployments import DeploymentService, StatusReport
from edgefleet.demo.models import BuiltModel
from edgefleet.update_state import name_of
from edgefleet.v1 import operator_pb2 as o
from testkit.builds import classes_and_digits, publish_one_build
from testkit.rpc import ADMIN, enroll


def _status(state: str, sequence: int, **extra: Any) -> dict[str, Any]:
    return {"state": state, "sequence": sequence, "model_name": "digits",
            "model_version": "1.0.0", **extra}  # fmt: skip


def _deployments(cp: ControlPlane) -> DeploymentService:
    return DeploymentService(cp.db, _NoEvents())


class _NoEvents:
    def publish(self, event: object) -> None:
        pass


async def test_one_batch_of_many_devices_keeps_each_history_in_order(
    cp: ControlPlane,
    digits: BuiltModel,
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        ids = [(await enroll(channel, op, f"hw-{i}", "aarch64")).device_id for i in range(30)]
        service = _deployments(cp)
        reports = {
            device_id: StatusReport(7, [_status("downloading", 1), _status("verifying", 1),
                                        _status("failed" if i % 3 == 0 else "committed", 1,
                                                reason="bad" if i % 3 == 0 else "")])
            for i, device_id in enumerate(ids)
        }  # fmt: skip
        reports["no-such-device"] = StatusReport(1, [_status("committed", 1)])
        await asyncio.to_thread(service.record_statuses, reports)
        # The same last step again adds nothing; a new one adds one event.
        again = {ids[1]: StatusReport(8, [_status("committed", 1)]),
                 ids[2]: StatusReport(8, [_status("downloading", 2)])}  # fmt: skip
        await asyncio.to_thread(service.record_statuses, again)
        for i, device_id in enumerate(ids[:4]):
            history = await op.ListDeployments(o.ListDeploymentsRequest(device_id=device_id),
                                               metadata=ADMIN)  # fmt: skip
            last = "failed" if i % 3 == 0 else "committed"
            expected = ["downloading", "verifying", last][::-1]
            if i == 2:
                expected = ["downloading", *expected]
            assert [name_of(e.state) for e in history.events] == expected
            device = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
            assert name_of(device.update.state) == ("downloading" if i == 2 else last)
        failed = await op.GetDevice(o.GetDeviceRequest(id=ids[0]), metadata=ADMIN)
        assert failed.update.reason == "bad"
    finally:
        await channel.close()


async def test_concurrent_assignments_never_hand_out_one_sequence_twice(
    cp: ControlPlane,
    digits: BuiltModel,
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        await publish_one_build(cp, digits)
        ids = [(await enroll(channel, op, f"hw-{i}", "aarch64")).device_id for i in range(5)]

        async def assign() -> list[int]:
            for _ in range(20):
                try:
                    done = await op.AssignModel(
                        o.AssignModelRequest(device_ids=ids, model_name="digits",
                                             model_version="1.0.0"), metadata=ADMIN,
                    )  # fmt: skip
                    return [a.sequence for a in done.assignments]
                except grpc.aio.AioRpcError as err:  # SQLite: busy writer, try again
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.05)
            raise AssertionError("never assigned")

        results = await asyncio.gather(*(assign() for _ in range(6)))
        for position in range(len(ids)):
            assert sorted(r[position] for r in results) == list(range(1, 7))
        listed = await op.ListDeployments(o.ListDeploymentsRequest(), metadata=ADMIN)
        assert {a.sequence for a in listed.assignments} == {6}
    finally:
        await channel.close()
