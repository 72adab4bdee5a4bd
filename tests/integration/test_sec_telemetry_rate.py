"""The agent's telemetry uploader against an in-process control plane that
refuses uploads: a refused batch is kept and nothing is sent before the
delay the server asked for, and a refusal without a delay keeps the old
behaviour."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from edgefleet.agent.telemetry import IntervalSample, RequestStats, Resources
from edgefleet.agent.telemetry_buffer import TelemetryBuffer
from edgefleet.agent.telemetry_uploader import TelemetryUploader
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane as InProcessControlPlane
from edgefleet.controlplane.server import create_server
from testkit.clock import FakeClock
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import enroll_accepted

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def tiny_limit_server(tmp_path: Path) -> AsyncIterator[InProcessControlPlane]:
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=0, telemetry_rate_per_s=1.0, telemetry_burst=500,
        )
    )  # fmt: skip
    try:
        yield cp
    finally:
        await cp.stop(grace=0.5)


async def _uploads_refused(cp: InProcessControlPlane, at_least: int) -> int:
    """The server's count of refused uploads, once it reached `at_least`
    (the count is taken as the handler ends, which may be just after the
    client has its answer), and a moment later, so that a stray call shows."""
    labels = {"method": "UploadTelemetry", "code": "RESOURCE_EXHAUSTED"}
    for _ in range(100):
        if (cp.registry.get_sample_value("edgefleet_rpc_total", labels) or 0) >= at_least:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    return int(cp.registry.get_sample_value("edgefleet_rpc_total", labels) or 0)


async def test_the_uploader_keeps_a_refused_batch_and_sends_nothing_before_the_delay(
    tiny_limit_server: InProcessControlPlane, tmp_path: Path
) -> None:
    cp = tiny_limit_server
    async with grpc.aio.insecure_channel(cp.address) as ch:
        device = await enroll_accepted(ch, "hw-uploader")
    now = dt.datetime.now(dt.UTC)
    stats = RequestStats(probe=lambda: Resources(memory_mb=10.0))
    buffer = TelemetryBuffer(tmp_path)
    buffer.append([IntervalSample(at=now - dt.timedelta(seconds=700 - i)) for i in range(600)])
    clock = FakeClock()
    uploader = TelemetryUploader(
        stats=stats, buffer=buffer, target=cp.address, credential=device.device_credential,
        clock=lambda: now, monotonic=clock,
    )  # fmt: skip
    try:
        # The burst takes the first 500; the next batch (100) needs 100 s at 1/s.
        result = await uploader.flush()
        assert (result.uploaded, result.acked_seq) == (500, 500)
        assert result.error == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server's own clock ran while it stored the first batch: a little less.
        assert result.retry_after_s is not None and 50 <= result.retry_after_s <= 110.01
        assert len(buffer) == 100 and buffer.dropped_total == 0
        assert await _uploads_refused(cp, 1) == 1
        wait = result.retry_after_s

        # Until the delay has passed: intervals still go into the buffer, and
        # nothing is sent (the server saw no further call).
        for _ in range(3):
            clock.now += wait / 4
            result = await uploader.tick()
            assert result.error == grpc.StatusCode.RESOURCE_EXHAUSTED and result.uploaded == 0
            assert result.retry_after_s is not None and 0 < result.retry_after_s < wait
        assert len(buffer) == 103 and await _uploads_refused(cp, 1) == 1

        # Past it (by the agent's clock) the batch is tried again; the server's
        # own clock has not moved 100 s, so it is refused again, once, and kept.
        clock.now += wait / 4 + 0.001
        result = await uploader.flush()
        assert result.error == grpc.StatusCode.RESOURCE_EXHAUSTED and result.uploaded == 0
        assert await _uploads_refused(cp, 2) == 2 and len(buffer) == 103
    finally:
        await uploader.close()
        buffer.close()


async def test_a_refusal_without_a_delay_keeps_the_old_behaviour(
    tiny_limit_server: InProcessControlPlane, tmp_path: Path
) -> None:
    """RESOURCE_EXHAUSTED with no trailer (the busy shedding): kept, and
    retried at the next flush, not held back."""
    from edgefleet.controlplane.api import device_servicer

    cp = tiny_limit_server
    async with grpc.aio.insecure_channel(cp.address) as ch:
        device = await enroll_accepted(ch, "hw-busy")
    now = dt.datetime.now(dt.UTC)
    buffer = TelemetryBuffer(tmp_path)
    buffer.append([IntervalSample(at=now)])
    uploader = TelemetryUploader(
        stats=RequestStats(probe=Resources), buffer=buffer, target=cp.address,
        credential=device.device_credential, clock=lambda: now, monotonic=FakeClock(),
    )  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(device_servicer, "MAX_TELEMETRY_IN_FLIGHT", 0)
            result = await uploader.flush()
        assert result.error == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert result.retry_after_s is None and len(buffer) == 1
        result = await uploader.flush()
        assert result.error is None and result.acked_seq == 1
    finally:
        await uploader.close()
        buffer.close()
