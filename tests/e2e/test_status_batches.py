"""Agents' status reports written in batches (StatusBuffer over
DeploymentService.record_statuses) and set-based assignment, on SQLite and
PostgreSQL: one batch carries many devices' reports, each device's history
keeps every step in order, progress collapses, a failed write is retried
with nothing lost, and concurrent assignments never share a sequence."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.deployments import DeploymentService, StatusReport
from edgefleet.controlplane.services.status_buffer import StatusBuffer
from edgefleet.demo.models import BuiltModel
from edgefleet.v1 import operator_pb2 as o
from tests.e2e.test_builds_service import ADMIN, _setup, cp, digits  # noqa: F401
from tests.e2e.test_deployments import _enroll, _publish


def _status(state: str, sequence: int, **extra: Any) -> dict[str, Any]:
    return {"state": state, "sequence": sequence, "model_name": "digits",
            "model_version": "1.0.0", **extra}  # fmt: skip


def _deployments(cp: ControlPlane) -> DeploymentService:  # noqa: F811
    return DeploymentService(cp.db, _NoEvents())


class _NoEvents:
    def publish(self, event: object) -> None:
        pass


class _FlakyDeployments:
    """A port for the buffer's own logic: fails the first write."""

    def __init__(self) -> None:
        self.calls: list[dict[str, StatusReport]] = []

    def record_statuses(self, reports: dict[str, StatusReport]) -> None:
        self.calls.append({k: StatusReport(v.applied_revision, list(v.statuses))
                           for k, v in reports.items()})  # fmt: skip
        if len(self.calls) == 1:
            raise RuntimeError("database went away")


async def test_buffer_collapses_progress_and_requeues_a_failed_batch_before_newer_reports() -> None:
    port = _FlakyDeployments()
    buffer = StatusBuffer(port)  # type: ignore[arg-type]
    buffer.offer("a", 1, _status("downloading", 1, bytes_done=10))
    buffer.offer("a", 1, _status("downloading", 1, bytes_done=90))
    buffer.offer("a", 2, _status("verifying", 1))
    buffer.offer("b", 3, {})
    with ThreadPoolExecutor(1) as executor:
        with pytest.raises(RuntimeError):
            await buffer.flush(executor)
        assert buffer.pending() == 2  # nothing lost
        buffer.offer("a", 2, _status("committed", 1))
        await buffer.flush(executor)
    first, second = port.calls
    assert [s["bytes_done"] for s in first["a"].statuses if s["state"] == "downloading"] == [90]
    assert [s["state"] for s in second["a"].statuses] == ["downloading", "verifying", "committed"]
    assert (second["a"].applied_revision, second["b"].applied_revision) == (2, 3)
    assert buffer.pending() == 0


async def test_one_batch_of_many_devices_keeps_each_history_in_order(
    cp: ControlPlane,  # noqa: F811
    digits: BuiltModel,  # noqa: F811
) -> None:
    op, channel = await _setup(cp, digits)
    try:
        ids = [(await _enroll(channel, op, f"hw-{i}", "aarch64")).device_id for i in range(30)]
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
            assert [e.state for e in history.events] == expected
            device = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
            assert device.update.state == ("downloading" if i == 2 else last)
        failed = await op.GetDevice(o.GetDeviceRequest(id=ids[0]), metadata=ADMIN)
        assert failed.update.reason == "bad"
    finally:
        await channel.close()


async def test_concurrent_assignments_never_hand_out_one_sequence_twice(
    cp: ControlPlane,  # noqa: F811
    digits: BuiltModel,  # noqa: F811
) -> None:
    op, channel = await _setup(cp, digits)
    try:
        await _publish(cp, digits)
        ids = [(await _enroll(channel, op, f"hw-{i}", "aarch64")).device_id for i in range(5)]

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
