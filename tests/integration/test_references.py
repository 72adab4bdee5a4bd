"""Every RPC that names a device, class, rollout, build or token takes its
full id, its name or a unique id prefix (as tables show), on a real control
plane on SQLite and PostgreSQL: an ambiguous one lists the candidates, an
unknown one is NOT_FOUND, and % or _ in the text match only themselves."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.api.operator_servicer import KEEP_UNKNOWN, REFERENCE_FIELDS
from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.db.models import DeviceRow, ModelRow
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.telemetry import Sample
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, status_of

# Ids chosen so that prefixes collide: "abcd" names two devices, "abcd1"
# one; "ab_d" is a device's id start and must not match "abcd..." as LIKE would.
EDGE_01 = "abcd1111aaaa0001"
EDGE_02 = "abcd2222aaaa0002"
UNDERSCORE = "ab_d3333aaaa0003"
TWIN_A = "f00d0000aaaa0004"
TWIN_B = "f00e0000aaaa0005"
DEVICES = {
    EDGE_01: "edge-01",
    EDGE_02: "edge-02",
    UNDERSCORE: "odd-id",
    TWIN_A: "twin",
    TWIN_B: "twin",
}


@pytest.fixture
async def op(cp: ControlPlane) -> AsyncIterator[og.OperatorServiceAsyncStub]:
    """An operator stub to `cp` (both backends), with DEVICES pending."""
    with cp.db.unit_of_work() as uow:
        for device_id, name in DEVICES.items():
            uow.session.add(
                DeviceRow(
                    id=device_id, hardware_id=f"hw-{device_id}", name=name, state="pending",
                    credential_hash="-",
                )
            )  # fmt: skip
        uow.commit()
    async with grpc.aio.insecure_channel(cp.address) as channel:
        yield og.OperatorServiceStub(channel)


async def test_accept_by_name_and_get_by_an_8_character_prefix(
    op: og.OperatorServiceAsyncStub,
) -> None:
    accepted = await op.AcceptDevice(o.AcceptDeviceRequest(id="edge-01"), metadata=ADMIN)
    assert (accepted.id, accepted.name) == (EDGE_01, "edge-01")
    got = await op.GetDevice(o.GetDeviceRequest(id=EDGE_02[:8]), metadata=ADMIN)
    assert got.id == EDGE_02
    got = await op.GetDevice(o.GetDeviceRequest(id=EDGE_01), metadata=ADMIN)
    assert got.id == EDGE_01  # the full id, as always
    labelled = await op.UpdateDeviceLabels(
        o.UpdateDeviceLabelsRequest(id="abcd2", set={"ring": "a"}), metadata=ADMIN
    )
    assert (labelled.id, dict(labelled.labels)) == (EDGE_02, {"ring": "a"})


async def test_an_ambiguous_prefix_lists_the_candidates(op: og.OperatorServiceAsyncStub) -> None:
    code, details = await status_of(
        op.AcceptDevice(o.AcceptDeviceRequest(id="abcd"), metadata=ADMIN)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "device 'abcd' is ambiguous: it could be abcd1111 (edge-01), abcd2222 (edge-02); "
        "give more characters or the full id"
    )
    code, details = await status_of(op.GetDevice(o.GetDeviceRequest(id="twin"), metadata=ADMIN))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "2 devices are named 'twin': f00d0000 (twin), f00e0000 (twin); "
        "give the id (or a unique start of it)"
    )
    # Nothing was accepted on the way.
    device = await op.GetDevice(o.GetDeviceRequest(id=EDGE_01), metadata=ADMIN)
    assert device.state == c.DEVICE_STATE_PENDING


async def test_unknown_and_too_short_references_are_not_found(
    op: og.OperatorServiceAsyncStub,
) -> None:
    code, details = await status_of(op.GetDevice(o.GetDeviceRequest(id="zzzz"), metadata=ADMIN))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "no device with id or name 'zzzz', nor an id starting with it"
    code, details = await status_of(op.GetDevice(o.GetDeviceRequest(id="abc"), metadata=ADMIN))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "an id prefix needs at least 4 characters" in details
    code, details = await status_of(op.GetRollout(o.GetRolloutRequest(id="nope"), metadata=ADMIN))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith("no rollout with id 'nope'")


@pytest.mark.parametrize("text", ["ab%d", "a%", "a_cd", "ab%", "abc_"])
async def test_like_wildcards_in_a_prefix_match_only_themselves(
    op: og.OperatorServiceAsyncStub, text: str
) -> None:
    code, _ = await status_of(op.GetDevice(o.GetDeviceRequest(id=text), metadata=ADMIN))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_an_underscore_prefix_names_the_device_whose_id_has_it(
    op: og.OperatorServiceAsyncStub,
) -> None:
    got = await op.GetDevice(o.GetDeviceRequest(id="ab_d"), metadata=ADMIN)
    assert got.id == UNDERSCORE
    # An upper-case prefix is not a lower-case id on either backend.
    code, _ = await status_of(op.GetDevice(o.GetDeviceRequest(id="ABCD1"), metadata=ADMIN))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_telemetry_query_by_prefix_returns_the_devices_data(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    at_ms = int((now - dt.timedelta(minutes=5)).timestamp() * 1000)
    cp.services.telemetry.ingest(
        EDGE_01, [Sample(seq=1, at_ms=at_ms, model_name="digits", model_version="1.0.0",
                         request_count=42)]
    )  # fmt: skip

    def query(device: str) -> o.QueryTelemetryRequest:
        request = o.QueryTelemetryRequest(metric=o.TELEMETRY_METRIC_REQUEST_COUNT, device_id=device)
        start, end = Timestamp(), Timestamp()
        start.FromDatetime(now - dt.timedelta(hours=1))
        end.FromDatetime(now)
        request.start.CopyFrom(start)
        request.end.CopyFrom(end)
        return request

    by_id = await op.QueryTelemetry(query(EDGE_01), metadata=ADMIN)
    by_prefix = await op.QueryTelemetry(query(EDGE_01[:8]), metadata=ADMIN)
    by_name = await op.QueryTelemetry(query("edge-01"), metadata=ADMIN)
    assert sum(p.value for s in by_id.series for p in s.points) == 42
    assert by_prefix == by_id == by_name
    code, details = await status_of(op.QueryTelemetry(query("abcd"), metadata=ADMIN))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "abcd1111 (edge-01)" in details


async def test_classes_and_tokens_by_name_or_id_prefix(op: og.OperatorServiceAsyncStub) -> None:
    cls = await op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name="cams", constraints=c.ConstraintProfile(runtime=c.RUNTIME_TFLITE)
        ),
        metadata=ADMIN,
    )
    by_prefix = await op.GetDeviceClass(o.GetDeviceClassRequest(name=cls.id[:8]), metadata=ADMIN)
    assert by_prefix.name == "cams"
    device = await op.SetDeviceClass(
        o.SetDeviceClassRequest(id="edge-02", class_name=cls.id[:8]), metadata=ADMIN
    )
    assert (device.id, device.class_name) == (EDGE_02, "cams")

    token = await op.CreateOperatorToken(
        o.CreateOperatorTokenRequest(name="alice", role=o.OPERATOR_ROLE_VIEWER), metadata=ADMIN
    )
    revoked = await op.RevokeOperatorToken(o.RevokeOperatorTokenRequest(id="alice"), metadata=ADMIN)
    assert revoked.id == token.token.id and revoked.HasField("revoked_at")
    enrollment = await op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="line-3"), metadata=ADMIN
    )
    gone = await op.RevokeEnrollmentToken(
        o.RevokeEnrollmentTokenRequest(id=enrollment.token.id[:8]), metadata=ADMIN
    )
    assert gone.id == enrollment.token.id and gone.HasField("revoked_at")


async def test_a_list_of_devices_mixes_ids_names_and_prefixes(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub
) -> None:
    """AssignModel/UnassignModel take a list: each is resolved, and the first
    that names nothing is the error (nothing is done)."""
    code, details = await status_of(
        op.UnassignModel(
            o.UnassignModelRequest(device_ids=[EDGE_01, "edge-02", "nobody"], model_name="m"),
            metadata=ADMIN,
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "no device with id or name 'nobody', nor an id starting with it"
    with cp.db.unit_of_work() as uow:
        uow.session.add(ModelRow(id="m1", name="digits"))
        uow.commit()
    done = await op.UnassignModel(
        o.UnassignModelRequest(device_ids=["edge-01", EDGE_02[:8]], model_name="digits"),
        metadata=ADMIN,
    )
    assert sorted(done.not_assigned) == [EDGE_01, EDGE_02]


def test_every_reference_field_is_a_field_of_its_request() -> None:
    """The table the API resolves by names real fields (a renamed field
    would silently stop being resolved)."""
    for message, fields in REFERENCE_FIELDS.items():
        descriptor = o.DESCRIPTOR.message_types_by_name[message]
        assert set(fields) <= set(descriptor.fields_by_name), message
    for path in KEEP_UNKNOWN:
        message, _, field = path.partition(".")
        assert field in REFERENCE_FIELDS[message]


async def test_the_cli_takes_names_and_prefixes(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub
) -> None:
    """The issue's cases: `devices accept NAME` was NOT_FOUND; `telemetry
    query --device PREFIX` said "No telemetry" while the full id worked."""
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["--server", cp.address, "--token", ADMIN_TOKEN]
    result = await asyncio.to_thread(runner.invoke, cli, [*args, "devices", "accept", "edge-01"])
    assert result.exit_code == 0, result.output
    device = await op.GetDevice(o.GetDeviceRequest(id=EDGE_01), metadata=ADMIN)
    assert device.state == c.DEVICE_STATE_ACCEPTED
    result = await asyncio.to_thread(runner.invoke, cli, [*args, "devices", "show", "abcd"])
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT: device 'abcd' is ambiguous" in result.output
    assert "abcd1111 (edge-01), abcd2222 (edge-02)" in result.output
    at_ms = int((dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).timestamp() * 1000)
    cp.services.telemetry.ingest(EDGE_01, [Sample(seq=1, at_ms=at_ms, request_count=7)])
    query = [*args, "telemetry", "query", "request-count", "--since", "1h", "--device"]
    by_prefix = await asyncio.to_thread(runner.invoke, cli, [*query, EDGE_01[:8]])
    by_id = await asyncio.to_thread(runner.invoke, cli, [*query, EDGE_01])
    assert by_prefix.exit_code == 0 and "No telemetry" not in by_prefix.output
    # The same series (its times may differ by a bucket between two calls).
    assert by_id.exit_code == 0 and "No telemetry" not in by_id.output
    assert by_prefix.output.split()[-1] == by_id.output.split()[-1] == "7"
    unknown = await asyncio.to_thread(runner.invoke, cli, [*query, "zzzz"])
    assert (
        unknown.exit_code == 1 and "NOT_FOUND: no device with id or name 'zzzz'" in unknown.output
    )
