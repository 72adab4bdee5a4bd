"""The agent's loop against a fake DeviceService on a real loopback gRPC server:
enrollment, the Sync stream, persistence, and the reaction to each refusal.
Fast and deterministic; tests/test_agent_e2e.py runs the real control plane."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from edgefleet.agent import identity as store
from edgefleet.agent.config import AgentConfig, HardwareOverrides
from edgefleet.agent.daemon import Agent
from edgefleet.agent.errors import NotProvisioned
from edgefleet.agent.reconnect import Step
from edgefleet.polling import wait_for_async
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

TOKEN = "efe_test.token"


@dataclass
class FakeDeviceService(device_pb2_grpc.DeviceServiceServicer):
    """Enough of the control plane to drive the agent: one device per
    hardware id, credentials that can be revoked, a device that can be
    refused, and desired states pushed on demand."""

    desired: device_pb2.DesiredState = field(
        default_factory=lambda: device_pb2.DesiredState(
            revision=1, device_state=common_pb2.DEVICE_STATE_ACCEPTED
        )
    )
    enrollments: list[device_pb2.EnrollRequest] = field(default_factory=list)
    hellos: list[device_pb2.Hello] = field(default_factory=list)
    reports: list[int] = field(default_factory=list)
    heartbeats: list[int] = field(default_factory=list)
    valid_credentials: set[str] = field(default_factory=set)
    refuse: grpc.StatusCode | None = None
    streams: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def Enroll(
        self, request: device_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> device_pb2.EnrollResponse:
        if request.enrollment_token != TOKEN:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown enrollment token")
        self.enrollments.append(request)
        credential = f"efd_{len(self.enrollments)}"
        self.valid_credentials = {credential}  # a new credential replaces the old
        return device_pb2.EnrollResponse(
            device_id=f"dev-{request.hardware_id}",
            device_credential=credential,
            state=common_pb2.DEVICE_STATE_ACCEPTED,
        )

    def push(self, **changes: Any) -> None:
        """Bump the revision with `changes`; open streams send it."""
        desired = device_pb2.DesiredState()
        desired.CopyFrom(self.desired)
        for name, value in changes.items():
            if name == "labels":
                desired.labels.clear()
                desired.labels.update(value)
            elif name == "config":
                desired.config.CopyFrom(value)
            else:
                setattr(desired, name, value)
        desired.revision += 1
        self.desired = desired
        self.changed.set()

    async def Sync(
        self,
        requests: AsyncIterator[device_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[device_pb2.ControlMessage]:
        metadata = dict(context.invocation_metadata() or ())
        credential = str(metadata.get("authorization", "")).removeprefix("Bearer ")
        if credential not in self.valid_credentials:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown device credential")
        if self.refuse is not None:
            await context.abort(self.refuse, "device dev-x is rejected")
        self.streams += 1
        first = await anext(aiter(requests))
        assert first.WhichOneof("kind") == "hello"
        self.hellos.append(first.hello)

        async def read() -> None:
            async for message in requests:
                if message.WhichOneof("kind") == "status":
                    self.reports.append(message.status.applied_revision)
                elif message.WhichOneof("kind") == "heartbeat":
                    self.heartbeats.append(message.heartbeat.seq)

        reader = asyncio.create_task(read())
        try:
            while True:
                self.changed.clear()
                yield device_pb2.ControlMessage(desired=self.desired)
                await self.changed.wait()
        finally:
            reader.cancel()

    async def DownloadArtifact(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")

    async def UploadTelemetry(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")


@dataclass
class Running:
    agent: Agent
    fake: FakeDeviceService
    server: grpc.aio.Server
    task: asyncio.Task[None] | None = None
    delays: list[float] = field(default_factory=list)

    async def wait_for(self, predicate: Callable[[], object], within_s: float = 15.0) -> None:
        """edgefleet.polling's wait, failing at once with the agent's crash."""

        def check() -> object:
            if self.task is not None and self.task.done():
                self.task.result()  # surface the agent's crash
            return predicate()

        await wait_for_async(check, within_s, interval=0.02)


def make_config(tmp_path: Path, port: int, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "server": f"127.0.0.1:{port}",
        "enrollment_token": TOKEN,
        "state_dir": tmp_path / "state",
        "hardware_id": "hw1",
        "labels": {"site": "lab"},
        "heartbeat_interval_s": 30.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "hardware": HardwareOverrides(arch="aarch64", memory_mb=2048),
        "insecure": True,
    }
    values.update(overrides)
    return AgentConfig(**values)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeDeviceService, grpc.aio.Server, int]]:
    service = FakeDeviceService()
    server = grpc.aio.server()
    device_pb2_grpc.add_DeviceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield service, server, port
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def running(
    fake: tuple[FakeDeviceService, grpc.aio.Server, int], tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Running] = []

    async def start(**overrides: Any) -> Running:
        service, server, port = fake
        delays: list[float] = []

        async def recording_sleep(seconds: float) -> None:
            delays.append(seconds)
            await asyncio.sleep(min(seconds, 0.05))

        agent = Agent(make_config(tmp_path, port, **overrides), sleep=recording_sleep)
        run = Running(agent, service, server, delays=delays)
        run.task = asyncio.create_task(agent.run())
        started.append(run)
        return run

    yield start
    for run in started:
        assert run.task is not None
        run.task.cancel()
        await asyncio.wait({run.task})


def desired_file(tmp_path: Path) -> dict[str, Any] | None:
    path = tmp_path / "state" / "desired.json"
    return json.loads(path.read_text()) if path.exists() else None


async def test_enrolls_syncs_and_reports(
    running: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    run = await running()
    fake = run.fake
    await run.wait_for(lambda: fake.reports == [1])

    [enroll] = fake.enrollments
    assert (enroll.hardware_id, enroll.enrollment_token) == ("hw1", TOKEN)
    assert enroll.labels == {"site": "lab"}
    assert (enroll.hardware.arch, enroll.hardware.memory_mb) == ("aarch64", 2048)
    assert enroll.runtime.python_version
    identity = store.load_identity(tmp_path / "state")
    assert identity is not None
    assert (identity.device_id, identity.device_credential) == ("dev-hw1", "efd_1")
    [hello] = fake.hellos
    assert hello.applied_revision == 0
    assert hello.hardware.arch == "aarch64"

    fake.push(labels={"site": "lab", "tier": "canary"}, class_name="pi")
    await run.wait_for(lambda: fake.reports == [1, 2])
    document = desired_file(tmp_path)
    assert document is not None
    assert document["revision"] == 2
    assert document["labels"] == {"site": "lab", "tier": "canary"}
    assert document["class_name"] == "pi"
    assert document["device_state"] == "DEVICE_STATE_ACCEPTED"


async def test_restart_resumes_identity_and_revision(
    running: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    first = await running()
    await first.wait_for(lambda: first.fake.reports == [1])
    assert first.task is not None
    first.task.cancel()
    await asyncio.wait({first.task})

    second = await running()
    await second.wait_for(lambda: len(second.fake.hellos) == 2)
    # No second enrollment, and the Hello says what was applied before.
    assert len(second.fake.enrollments) == 1
    assert second.fake.hellos[1].applied_revision == 1
    await asyncio.sleep(0.2)
    assert second.fake.reports == [1]  # revision 1 is not applied twice


async def test_server_interval_drives_heartbeats(
    running: Callable[..., Awaitable[Running]],
) -> None:
    run = await running()
    await run.wait_for(lambda: run.fake.reports == [1])
    run.fake.push(config=device_pb2.AgentConfig(heartbeat_interval_s=1))
    await run.wait_for(lambda: len(run.fake.heartbeats) >= 2, within_s=10)
    assert run.fake.heartbeats[:2] == [1, 2]


async def test_unauthenticated_sync_reenrolls_same_hardware_id(
    running: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    run = await running()
    fake = run.fake
    await run.wait_for(lambda: fake.streams == 1)
    # The control plane forgets the credential and drops the stream.
    fake.valid_credentials = set()
    await run.server.stop(grace=None)
    server = grpc.aio.server()
    device_pb2_grpc.add_DeviceServiceServicer_to_server(fake, server)
    port = int(run.agent.config.server.rsplit(":", 1)[1])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        await run.wait_for(lambda: fake.streams == 2)
        assert [e.hardware_id for e in fake.enrollments] == ["hw1", "hw1"]
        identity = store.load_identity(tmp_path / "state")
        assert identity is not None
        assert (identity.device_id, identity.device_credential) == ("dev-hw1", "efd_2")
    finally:
        await server.stop(grace=None)


async def test_unauthenticated_without_token_backs_off_at_max(
    running: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store.save_identity(
        state,
        store.Identity(
            device_id="dev-hw1", device_credential="revoked", server="x", hardware_id="hw1"
        ),
    )
    run = await running(enrollment_token=None)
    await run.wait_for(lambda: len(run.delays) >= 3)
    assert all(0.25 <= d <= 0.5 for d in run.delays[:3])
    assert run.fake.enrollments == []


async def test_permission_denied_backs_off_at_max_and_keeps_trying(
    fake: tuple[FakeDeviceService, grpc.aio.Server, int],
    running: Callable[..., Awaitable[Running]],
) -> None:
    service = fake[0]
    service.refuse = grpc.StatusCode.PERMISSION_DENIED
    run = await running()
    await run.wait_for(lambda: len(run.delays) >= 3)
    assert all(0.25 <= d <= 0.5 for d in run.delays[:3])
    assert len(service.enrollments) == 1  # refusal is not a reason to re-enroll
    service.refuse = None  # an operator accepts it again
    await run.wait_for(lambda: service.reports == [1])


async def test_unreachable_server_backs_off_exponentially(
    running: Callable[..., Awaitable[Running]],
) -> None:
    run = await running()
    await run.wait_for(lambda: run.fake.reports == [1])
    await run.server.stop(grace=None)
    await run.wait_for(lambda: len(run.delays) >= 5)
    # The first delay follows a session that worked, so it starts small; the
    # ceilings then double from 0.05 s up to the 0.5 s maximum.
    ceilings = [0.05, 0.1, 0.2, 0.4, 0.5]
    assert all(0 <= d <= c for d, c in zip(run.delays, ceilings, strict=False))


async def test_not_provisioned_without_identity_or_token(tmp_path: Path) -> None:
    agent = Agent(make_config(tmp_path, 1, enrollment_token=None))
    with pytest.raises(NotProvisioned, match="enrollment token"):
        agent.boot()


async def test_boot_with_identity_goes_straight_to_sync(tmp_path: Path) -> None:
    config = make_config(tmp_path, 1)
    state = tmp_path / "state"
    state.mkdir()
    store.save_identity(
        state,
        store.Identity(
            device_id="dev-hw1", device_credential="c", server=config.server, hardware_id="hw1"
        ),
    )
    assert Agent(config).boot() is Step.SYNC
    # A different server (or hardware id) with a token at hand: enroll again.
    moved = make_config(tmp_path, 2)
    assert Agent(moved).boot() is Step.ENROLL
