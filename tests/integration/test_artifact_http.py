"""Artifact downloads over HTTP from a real control plane (aiohttp beside
its gRPC ports), with a real HTTP client: ranges, resume, the same
permissions as DownloadArtifact, and readable refusals."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from edgefleet.agent.update.http_download import HttpDownloader
from edgefleet.agent.update.ports import Chunk
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.demo.models import BuiltModel
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import build_service, classes_and_digits, fake_result
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN


async def _published(
    cp: ControlPlane, digits: BuiltModel, tmp_path: Path
) -> tuple[str, bytes, str, str, grpc.aio.Channel]:
    """A ~2 MB artifact built for class "arm"; credentials of an "arm"
    device and of an unclassified one; the channel (the caller closes it)."""
    op, channel = await classes_and_digits(cp, digits)
    big = tmp_path / "big.onnx"
    big.write_bytes(digits.model.read_bytes() * 200)
    builds = build_service(cp)
    job = await asyncio.to_thread(builds.claim, "r", 60)
    assert job is not None
    await asyncio.to_thread(builds.finish, job, "r", fake_result(big), "")
    built = await op.GetBuild(o.GetBuildRequest(id=job.build_id), metadata=ADMIN)
    token = await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN)
    dev = dg.DeviceServiceStub(channel)

    async def enroll(hw_id: str, arch: str) -> str:
        resp = await dev.Enroll(
            d.EnrollRequest(
                enrollment_token=token.secret, hardware_id=hw_id,
                hardware=c.HardwareProfile(arch=arch),
            )
        )  # fmt: skip
        return resp.device_credential

    arm = await enroll("hw-arm", "aarch64")
    x86 = await enroll("hw-x86", "x86_64")
    return built.artifact_digest, big.read_bytes(), arm, x86, channel


def _url(cp: ControlPlane, digest: str) -> str:
    assert cp.artifact_http is not None
    return f"{cp.artifact_http.url}/v1/artifacts/{digest}"


async def test_ranges_resume_and_the_same_permissions_as_download_artifact(
    cp: ControlPlane, digits: BuiltModel, tmp_path: Path
) -> None:
    digest, data, arm, x86, channel = await _published(cp, digits, tmp_path)
    auth = {"Authorization": f"Bearer {arm}"}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            whole = await http.get(_url(cp, digest), headers=auth)
            assert whole.status_code == 200 and whole.content == data
            assert whole.headers["ETag"] == f'"{digest}"'
            assert whole.headers["Accept-Ranges"] == "bytes"
            assert int(whole.headers["Content-Length"]) == len(data)

            # Resume from any offset: 206 with the rest, byte for byte.
            for offset in (1, 65_536, 1_000_000, len(data) - 1):
                part = await http.get(
                    _url(cp, digest), headers={**auth, "Range": f"bytes={offset}-"}
                )
                assert part.status_code == 206 and part.content == data[offset:]
                assert (
                    part.headers["Content-Range"] == f"bytes {offset}-{len(data) - 1}/{len(data)}"
                )
            middle = await http.get(_url(cp, digest), headers={**auth, "Range": "bytes=10-19"})
            assert middle.status_code == 206 and middle.content == data[10:20]
            tail = await http.get(_url(cp, digest), headers={**auth, "Range": "bytes=-5"})
            assert tail.content == data[-5:]
            # If-Range naming another version: the whole blob, not a part of it.
            other = await http.get(
                _url(cp, digest), headers={**auth, "Range": "bytes=5-", "If-Range": '"other"'}
            )
            assert other.status_code == 200 and other.content == data
            cached = await http.get(
                _url(cp, digest), headers={**auth, "If-None-Match": f'"{digest}"'}
            )
            assert cached.status_code == 304 and cached.content == b""
            head = await http.head(_url(cp, digest), headers=auth)
            assert head.status_code == 200 and head.content == b""
            assert int(head.headers["Content-Length"]) == len(data)

            # Ranges it cannot satisfy: 416 with the size, and why.
            for bad in (f"bytes={len(data)}-", "bytes=9-3", "bytes=abc", "bytes=-0", "bytes=1-2-3"):
                refused = await http.get(_url(cp, digest), headers={**auth, "Range": bad})
                assert refused.status_code == 416, bad
                assert refused.headers["Content-Range"] == f"bytes */{len(data)}"
                assert refused.text.strip()

            # Who may download: as DownloadArtifact decides.
            nobody = await http.get(_url(cp, digest))
            assert nobody.status_code == 401 and "Authorization: Bearer" in nobody.text
            assert nobody.headers["WWW-Authenticate"] == "Bearer"
            forged = await http.get(_url(cp, digest), headers={"Authorization": "Bearer dev_x.y"})
            assert forged.status_code == 401
            other_class = await http.get(
                _url(cp, digest), headers={"Authorization": f"Bearer {x86}"}
            )
            assert other_class.status_code == 403 and "not built for this device's class" in (
                other_class.text
            )
            missing = await http.get(_url(cp, "f" * 64), headers=auth)
            assert missing.status_code == 404
            malformed = await http.get(_url(cp, "not-a-digest"), headers=auth)
            assert malformed.status_code == 400 and "sha256" in malformed.text
    finally:
        await channel.close()


async def test_assignments_name_the_control_planes_http_source(
    cp: ControlPlane, digits: BuiltModel, tmp_path: Path
) -> None:
    """What an agent is told: its assignment lists the control plane's own
    endpoint as a source (with DownloadArtifact left as the fallback)."""
    digest, _, arm, _, channel = await _published(cp, digits, tmp_path)
    op = og.OperatorServiceStub(channel)
    try:
        listed = await op.ListDevices(o.ListDevicesRequest(), metadata=ADMIN)
        arm_id = next(dv.id for dv in listed.devices if dv.hardware_id == "hw-arm")
        await op.AssignModel(
            o.AssignModelRequest(device_ids=[arm_id], model_name="digits", model_version="1.0.0"),
            metadata=ADMIN,
        )
        dev = dg.DeviceServiceStub(channel)
        metadata = (("authorization", f"Bearer {arm}"),)
        call = dev.Sync(metadata=metadata)
        await call.write(d.AgentMessage(hello=d.Hello(protocol=2)))
        async for message in call:
            if message.HasField("desired") and message.desired.assignments:
                source = message.desired.assignments[0].sources[0]
                assert source.control_plane
                assert source.base_url == f"{cp.artifact_http.url}/v1/artifacts"  # type: ignore[union-attr]
                break
        call.cancel()
        assert digest
    finally:
        await channel.close()


@pytest.fixture
async def mirrored(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """A control plane with a server-wide mirror (--artifact-mirror)."""
    server = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=0, artifact_mirrors=("https://cdn.example/edgefleet",),
        )
    )  # fmt: skip
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


async def _desired(channel: grpc.aio.Channel, credential: str, protocol: int) -> d.DesiredState:
    call = dg.DeviceServiceStub(channel).Sync(metadata=(("authorization", f"Bearer {credential}"),))
    # The device's facts as it enrolled: a Hello without them would move it
    # out of its class (its rule matches on arch).
    hello = d.Hello(protocol=protocol, hardware=c.HardwareProfile(arch="aarch64"))
    await call.write(d.AgentMessage(hello=hello))
    try:
        async for message in call:
            if message.HasField("desired") and message.desired.HasField("assignment"):
                return message.desired
    finally:
        call.cancel()
    raise AssertionError("the sync stream ended without an assignment")


async def test_a_class_s_mirrors_come_first_and_its_cap_rides_the_assignment(
    mirrored: ControlPlane, digits: BuiltModel, tmp_path: Path
) -> None:
    """The order a device tries: its class's mirrors (a site's), the
    server-wide ones, then the control plane itself; and the class's rate
    cap, for agents of either protocol. A class change reaches the next
    desired state."""
    _, _, arm, _, channel = await _published(mirrored, digits, tmp_path)
    op = og.OperatorServiceStub(channel)
    site = "http://10.1.2.3:8080/blobs"
    try:
        await op.UpdateDeviceClass(
            o.UpdateDeviceClassRequest(
                name="arm", artifact_mirrors=[site], replace_artifact_mirrors=True,
                max_download_rate=256 * 1024,
            ),
            metadata=ADMIN,
        )  # fmt: skip
        listed = await op.ListDevices(o.ListDevicesRequest(), metadata=ADMIN)
        arm_id = next(dv.id for dv in listed.devices if dv.hardware_id == "hw-arm")
        await op.AssignModel(
            o.AssignModelRequest(device_ids=[arm_id], model_name="digits", model_version="1.0.0"),
            metadata=ADMIN,
        )
        assert mirrored.artifact_http is not None
        cp_source = (f"{mirrored.artifact_http.url}/v1/artifacts", True)
        for protocol in (1, 2):
            got = (await _desired(channel, arm, protocol)).assignment
            assert [(s.base_url, s.control_plane) for s in got.sources] == [
                (site, False), ("https://cdn.example/edgefleet", False), cp_source,
            ], protocol  # fmt: skip
            assert got.max_download_rate == 256 * 1024
        # The site's mirror removed, the cap too: the server's order again.
        await op.UpdateDeviceClass(
            o.UpdateDeviceClassRequest(
                name="arm", replace_artifact_mirrors=True, max_download_rate=0
            ),
            metadata=ADMIN,
        )
        got = (await _desired(channel, arm, 2)).assignment
        assert got.sources[0].base_url == "https://cdn.example/edgefleet"
        assert got.max_download_rate == 0
    finally:
        await channel.close()


def test_artifact_downloads_over_http_listen_beside_the_device_port_or_not_at_all() -> None:
    config = ServerConfig(data_dir=Path("/nonexistent"), artifact_http_listen="off")
    assert config.artifact_http_address() is None
    assert ServerConfig(data_dir=Path("/x"), listen="10.0.0.1:7443").artifact_http_address() == (
        "10.0.0.1:7445"
    )


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """A control plane that sends one artifact download at a time."""
    server = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=0, max_concurrent_downloads=1, artifact_http_max_connections=3,
        )
    )  # fmt: skip
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


async def test_downloads_over_the_limit_wait_with_retry_after(
    limited: ControlPlane, digits: BuiltModel, tmp_path: Path
) -> None:
    """One download holds the only slot (its client reads slowly, so the
    kernel's buffers fill and sendfile waits); the next is told 429 with
    when to come back, and gets its bytes once the first is done."""
    op, channel = await classes_and_digits(limited, digits)
    big = tmp_path / "large.onnx"
    big.write_bytes(os.urandom(48 * 1024 * 1024))
    builds = build_service(limited)
    job = await asyncio.to_thread(builds.claim, "r", 60)
    assert job is not None
    await asyncio.to_thread(builds.finish, job, "r", fake_result(big), "")
    digest = (await op.GetBuild(o.GetBuildRequest(id=job.build_id), metadata=ADMIN)).artifact_digest
    token = await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN)
    enrolled = await dg.DeviceServiceStub(channel).Enroll(
        d.EnrollRequest(
            enrollment_token=token.secret, hardware_id="hw",
            hardware=c.HardwareProfile(arch="aarch64"),
        )
    )  # fmt: skip
    auth = {"Authorization": f"Bearer {enrolled.device_credential}"}
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("GET", _url(limited, digest), headers=auth) as first:
                assert first.status_code == 200
                await asyncio.sleep(0.5)  # its sendfile is waiting on the reader
                busy = await http.get(_url(limited, digest), headers=auth)
                assert busy.status_code == 429 and busy.headers["Retry-After"] == "5"
                assert "try again" in busy.text
                data = b"".join([chunk async for chunk in first.aiter_bytes()])
            assert hashlib.sha256(data).hexdigest() == digest
            again = await http.get(_url(limited, digest), headers=auth)
            assert again.status_code == 200 and len(again.content) == len(data)

        # The agent's side: its download waits its turn (Retry-After) rather
        # than spend the update's retries or take the bytes over gRPC.
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("GET", _url(limited, digest), headers=auth) as first:
                waits: list[float] = []

                def pause(seconds: float) -> None:
                    waits.append(seconds)
                    time.sleep(0.2)

                downloader = HttpDownloader(
                    lambda: [(f"{limited.artifact_http.url}/v1/artifacts", True)],  # type: ignore[union-attr]
                    NoFallback(), lambda: enrolled.device_credential, lambda: None, sleep=pause,
                )  # fmt: skip
                fetched = asyncio.create_task(asyncio.to_thread(
                    lambda: b"".join(c.data for c in downloader.fetch(digest, 0))
                ))  # fmt: skip
                await asyncio.sleep(1.0)
                assert not fetched.done() and waits and waits[0] == 5
                async for _ in first.aiter_bytes():
                    pass
            assert hashlib.sha256(await fetched).hexdigest() == digest
            assert downloader.last_source == "control plane (HTTP)"
    finally:
        await channel.close()


class NoFallback:
    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        raise AssertionError("fell back to DownloadArtifact")


async def test_connections_over_the_cap_are_closed_as_they_arrive(limited: ControlPlane) -> None:
    """Idle connections that never send a byte (nor a TLS ClientHello) hold
    at most the cap; the next is closed at once; when they go, it serves."""
    assert limited.artifact_http is not None
    port = limited.artifact_http.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        await asyncio.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(5)
        assert await asyncio.to_thread(extra.recv, 1) == b""  # closed by the server
        extra.close()
    finally:
        for sock in idle:
            sock.close()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(timeout=10) as http:
        answered = await http.get(f"{limited.artifact_http.url}/v1/artifacts/{'f' * 64}")
    assert answered.status_code == 401
