"""The regression tests of what fuzzing found (tests/e2e/test_fuzz.py fuzzes a
real server process): values no Python type or database column holds, enum
values this server does not know, bounds past every id and long inputs in
errors, each against an in-process control plane."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.server import ControlPlane
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN

ADMIN = bearer_metadata(ADMIN_TOKEN)
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1


@pytest.fixture
async def channel(server: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


async def _code(awaitable: Any) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_durations_and_times_no_python_value_holds_are_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    """They were INTERNAL (OverflowError in ToTimedelta/ToDatetime)."""
    op = og.OperatorServiceStub(channel)
    huge = {"seconds": INT64_MIN, "nanos": -1}
    calls = [
        op.CreateEnrollmentToken(
            o.CreateEnrollmentTokenRequest(name="t", ttl=huge), metadata=ADMIN
        ),
        op.CreateOperatorToken(
            o.CreateOperatorTokenRequest(name="t", role=o.OPERATOR_ROLE_VIEWER, ttl=huge),
            metadata=ADMIN,
        ),
        op.CreateRollout(
            o.CreateRolloutRequest(
                spec=o.RolloutSpec(
                    model_name="m",
                    model_version="1.0.0",
                    stages=[o.StageSpec(percent=100)],
                    pacing=o.Pacing(device_timeout=huge),
                )
            ),
            metadata=ADMIN,
        ),
        op.CreateRollout(
            o.CreateRolloutRequest(
                spec=o.RolloutSpec(
                    model_name="m",
                    model_version="1.0.0",
                    start_at=huge,
                    stages=[o.StageSpec(percent=100, bake_time=huge)],
                )
            ),
            metadata=ADMIN,
        ),
        op.QueryTelemetry(
            o.QueryTelemetryRequest(metric=o.TELEMETRY_METRIC_CPU_PERCENT, step=huge),
            metadata=ADMIN,
        ),
    ]
    for call in calls:
        assert await _code(call) == grpc.StatusCode.INVALID_ARGUMENT
    tokens = await op.ListEnrollmentTokens(o.ListEnrollmentTokensRequest(), metadata=ADMIN)
    assert not tokens.tokens


async def test_enum_values_this_server_does_not_know_are_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    """An unknown runtime or quantization was INTERNAL (KeyError)."""
    op = og.OperatorServiceStub(channel)
    for constraints in (
        c.ConstraintProfile(runtime=99),
        c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME, quantization=-5),
    ):
        code = await _code(
            op.CreateDeviceClass(
                o.CreateDeviceClassRequest(name="x", constraints=constraints), metadata=ADMIN
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    await op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name="x", constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME)
        ),
        metadata=ADMIN,
    )
    code = await _code(
        op.UpdateDeviceClass(
            o.UpdateDeviceClassRequest(name="x", constraints=c.ConstraintProfile(runtime=1234)),
            metadata=ADMIN,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    got = await op.GetDeviceClass(o.GetDeviceClassRequest(name="x"), metadata=ADMIN)
    assert got.constraints.runtime == c.RUNTIME_ONNXRUNTIME


async def _sync(dev: dg.DeviceServiceStub, credential: str, *messages: d.AgentMessage) -> Any:
    """A Sync stream that sends `messages` and half-closes; its status."""

    async def requests() -> AsyncIterator[d.AgentMessage]:
        for m in messages:
            yield m

    call = dev.Sync(requests(), metadata=bearer_metadata(credential), timeout=10)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_status_report_no_column_holds_is_refused_and_others_are_still_recorded(
    channel: grpc.aio.Channel,
) -> None:
    """A uint64 past int64 in a status report was queued, and then failed
    every batch write of the status buffer, for every device, forever."""
    op, dev = og.OperatorServiceStub(channel), dg.DeviceServiceStub(channel)
    token = (
        await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN)
    ).secret
    bad, good = [
        await dev.Enroll(d.EnrollRequest(enrollment_token=token, hardware_id=hw))
        for hw in ("bad", "good")
    ]
    hello = d.AgentMessage(hello=d.Hello(applied_revision=1))
    for field, value in (
        ("applied_revision", UINT64_MAX),
        ("sequence", UINT64_MAX),
        ("bytes_total", 2**63),
    ):
        status = d.StatusReport(
            applied_revision=1, update=c.UpdateStatus(legacy_state="downloading")
        )
        if field == "applied_revision":
            status.applied_revision = value
        else:
            setattr(status.update, field, value)
        code = await _sync(dev, bad.device_credential, hello, d.AgentMessage(status=status))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, field
    report = d.StatusReport(
        applied_revision=1,
        update=c.UpdateStatus(
            legacy_state="downloading",
            model_name="m",
            model_version="1.0.0",
            sequence=1,
            bytes_done=1,
            bytes_total=2,
        ),
    )
    assert (
        await _sync(dev, good.device_credential, hello, d.AgentMessage(status=report))
        == grpc.StatusCode.OK
    )
    for _ in range(200):
        device = await op.GetDevice(o.GetDeviceRequest(id=good.device_id), metadata=ADMIN)
        if device.update.state == c.UPDATE_STATE_DOWNLOADING:
            break
        await asyncio.sleep(0.05)
    assert device.update.state == c.UPDATE_STATE_DOWNLOADING and device.applied_revision == 1


async def test_an_audit_bound_past_every_id_lists_everything(channel: grpc.aio.Channel) -> None:
    """before_id beyond int64 was INTERNAL (the database refused the bound)."""
    op = og.OperatorServiceStub(channel)
    await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN)
    every = await op.ListAuditLog(o.ListAuditLogRequest(), metadata=ADMIN)
    for before_id in (UINT64_MAX, 2**63):
        got = await op.ListAuditLog(o.ListAuditLogRequest(before_id=before_id), metadata=ADMIN)
        assert [e.id for e in got.entries] == [e.id for e in every.entries] != []


async def test_an_enrollment_policy_this_server_does_not_know_is_refused(
    channel: grpc.aio.Channel,
) -> None:
    """It was taken for auto-accept, the most permissive policy."""
    op = og.OperatorServiceStub(channel)
    request = o.CreateEnrollmentTokenRequest(name="t", policy=999)
    assert await _code(op.CreateEnrollmentToken(request, metadata=ADMIN)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    unset = await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN)
    assert unset.token.policy == o.ENROLLMENT_POLICY_AUTO_ACCEPT


async def test_an_error_naming_a_long_input_still_reaches_the_client_with_its_status(
    channel: grpc.aio.Channel,
) -> None:
    """The details echoed a 100,000-character id into the trailer, past the
    client's metadata limit: the client saw RESOURCE_EXHAUSTED. Such an id
    is now refused by its field limit (api/limits.py), naming the limit,
    not the input."""
    op = og.OperatorServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await op.GetArtifact(o.GetArtifactRequest(digest="a" * 100_000), metadata=ADMIN)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "digest is 100,000 characters long; at most 64"
    # Past ASCII each byte travels as three: the longest name echoed whole.
    request = o.GetModelVersionRequest(model_name="\U0009c428" * 100, version="1.0.0")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await op.GetModelVersion(request, metadata=ADMIN)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_shadow_count_no_column_holds_is_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    """shadow_requests was not range-checked (INTERNAL: SQLite overflow),
    nor were the shadow's gauges and version."""
    op, dev = og.OperatorServiceStub(channel), dg.DeviceServiceStub(channel)
    token = (
        await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN)
    ).secret
    device = await dev.Enroll(d.EnrollRequest(enrollment_token=token, hardware_id="hw"))
    credential = bearer_metadata(device.device_credential)
    for field, value in (
        ("shadow_requests", UINT64_MAX - 1),
        ("shadow_agreement", float("nan")),
        ("shadow_version", "v" * 65),
        # A time no datetime holds: the error message about it was INTERNAL.
        ("at", -490499988649201408),
        ("at", 2**63 - 1),
    ):
        sample = d.TelemetrySample(seq=1, model_name="m", model_version="1.0.0")
        sample.at.GetCurrentTime()
        if field == "at":
            sample.at.seconds = value
        else:
            setattr(sample, field, value)
        code = await _code(
            dev.UploadTelemetry(d.UploadTelemetryRequest(samples=[sample]), metadata=credential)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, field
