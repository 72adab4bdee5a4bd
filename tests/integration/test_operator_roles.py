"""Operator tokens and roles through a real server: viewer < operator <
admin, checked on every operator RPC (PERMISSION_DENIED, naming the role
needed); tokens are created with a role and a lifetime, listed, revoked
(never the last admin) and expire; every change is in the audit log under
the token's name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf import message_factory

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.server import ControlPlane
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, OPERATOR_SERVICE, status_of

# What a viewer may call: reads and the watch stream.
VIEWER_RPCS = {
    "ListEnrollmentTokens", "ListDevices", "GetDevice", "ListDeployments", "ListDeviceClasses",
    "GetDeviceClass", "ListModels", "GetModel", "GetModelVersion", "ListBuilds", "GetBuild",
    "ListArtifacts", "GetArtifact", "QueryTelemetry", "ListAuditLog", "WatchFleet",
    "ListRollouts", "GetRollout", "ListSigningKeys",
}  # fmt: skip
ADMIN_RPCS = {
    "CreateOperatorToken", "ListOperatorTokens", "RevokeOperatorToken", "RotateSigningKey",
}  # fmt: skip


@pytest.fixture
async def op(server: ControlPlane) -> AsyncIterator[og.OperatorServiceStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield og.OperatorServiceStub(channel)


async def _token(op: og.OperatorServiceStub, name: str, role: int, **kw: Any) -> str:
    resp = await op.CreateOperatorToken(
        o.CreateOperatorTokenRequest(name=name, role=role, **kw), metadata=ADMIN
    )
    assert resp.token.name == name and resp.token.role == role
    return resp.secret


async def _status(channel: grpc.aio.Channel, method: Any, metadata: Any) -> grpc.StatusCode:
    """The status of `method` called with an empty request (OK if none)."""
    path = f"/{OPERATOR_SERVICE.full_name}/{method.name}"
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    kw = {"request_serializer": request_cls.SerializeToString,
          "response_deserializer": response_cls.FromString}  # fmt: skip
    try:
        if method.client_streaming:

            async def one() -> AsyncIterator[Any]:
                yield request_cls()

            await channel.stream_unary(path, **kw)(one(), metadata=metadata, timeout=3)
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **kw)(
                request_cls(), metadata=metadata, timeout=1
            ):
                pass
        else:
            await channel.unary_unary(path, **kw)(request_cls(), metadata=metadata, timeout=3)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_every_operator_rpc_checks_the_tokens_role(
    server: ControlPlane, op: og.OperatorServiceStub
) -> None:
    viewer = bearer_metadata(await _token(op, "dashboards", o.OPERATOR_ROLE_VIEWER))
    operator = bearer_metadata(await _token(op, "on-call", o.OPERATOR_ROLE_OPERATOR))
    async with grpc.aio.insecure_channel(server.address) as channel:
        for method in OPERATOR_SERVICE.methods:
            for who, metadata, allowed in (
                ("viewer", viewer, method.name in VIEWER_RPCS),
                ("operator", operator, method.name not in ADMIN_RPCS),
            ):
                code = await _status(channel, method, metadata)
                denied = code == grpc.StatusCode.PERMISSION_DENIED
                assert denied != allowed, f"{method.name} as {who}: {code}"
    code, details = await status_of(op.AcceptDevice(o.AcceptDeviceRequest(id="x"), metadata=viewer))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == "AcceptDevice needs the operator role; operator token 'dashboards' has viewer"


async def test_tokens_are_listed_revoked_and_expire_and_every_change_is_audited(
    op: og.OperatorServiceStub,
) -> None:
    on_call = bearer_metadata(await _token(op, "on-call", o.OPERATOR_ROLE_OPERATOR))
    # What an operator changes is recorded under its token's name.
    await op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name="pi", constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME)
        ),
        metadata=on_call,
    )
    listed = (await op.ListOperatorTokens(o.ListOperatorTokensRequest(), metadata=ADMIN)).tokens
    by_name = {t.name: t for t in listed}
    assert by_name["on-call"].role == o.OPERATOR_ROLE_OPERATOR
    assert not by_name["on-call"].HasField("revoked_at")
    assert by_name["on-call"].HasField("last_used_at")  # it was just used

    revoked = await op.RevokeOperatorToken(
        o.RevokeOperatorTokenRequest(id=by_name["on-call"].id), metadata=ADMIN
    )
    assert revoked.HasField("revoked_at")
    code, details = await status_of(op.ListDevices(o.ListDevicesRequest(), metadata=on_call))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details

    ttl = o.CreateOperatorTokenRequest().ttl
    ttl.FromMilliseconds(500)
    brief = bearer_metadata(await _token(op, "brief", o.OPERATOR_ROLE_VIEWER, ttl=ttl))
    await op.ListDevices(o.ListDevicesRequest(), metadata=brief)
    await asyncio.sleep(0.7)  # past its lifetime
    code, details = await status_of(op.ListDevices(o.ListDevicesRequest(), metadata=brief))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in details

    audit = (await op.ListAuditLog(o.ListAuditLogRequest(), metadata=ADMIN)).entries
    actions = [(e.actor, e.action) for e in audit]
    assert ("on-call", "class.create") in actions
    assert ("bootstrap-admin", "operator_token.revoke") in actions
    assert sum(a == "operator_token.create" for _, a in actions) == 2


async def test_bad_requests_and_the_last_admin(op: og.OperatorServiceStub) -> None:
    code, _ = await status_of(op.CreateOperatorToken(
        o.CreateOperatorTokenRequest(name="no-role"), metadata=ADMIN
    ))  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await status_of(op.CreateOperatorToken(
        o.CreateOperatorTokenRequest(name="", role=o.OPERATOR_ROLE_VIEWER), metadata=ADMIN
    ))  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await _token(op, "twice", o.OPERATOR_ROLE_VIEWER)
    code, _ = await status_of(op.CreateOperatorToken(
        o.CreateOperatorTokenRequest(name="twice", role=o.OPERATOR_ROLE_VIEWER), metadata=ADMIN
    ))  # fmt: skip
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = await status_of(
        op.RevokeOperatorToken(o.RevokeOperatorTokenRequest(id="nope"), metadata=ADMIN)
    )
    assert code == grpc.StatusCode.NOT_FOUND

    # The bootstrap admin is the only admin: revoking it would lock everyone out.
    tokens = (await op.ListOperatorTokens(o.ListOperatorTokensRequest(), metadata=ADMIN)).tokens
    (bootstrap,) = [t for t in tokens if t.role == o.OPERATOR_ROLE_ADMIN]
    code, details = await status_of(op.RevokeOperatorToken(
        o.RevokeOperatorTokenRequest(id=bootstrap.id), metadata=ADMIN
    ))  # fmt: skip
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "last usable admin" in details
    second = bearer_metadata(await _token(op, "second-admin", o.OPERATOR_ROLE_ADMIN))
    await op.RevokeOperatorToken(o.RevokeOperatorTokenRequest(id=bootstrap.id), metadata=second)
    code, _ = await status_of(op.ListDevices(o.ListDevicesRequest(), metadata=ADMIN))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_operator_tokens_cli(server: ControlPlane) -> None:
    runner = CliRunner(env={"COLUMNS": "200"})

    async def edgefleet(*args: str, token: str = ADMIN_TOKEN) -> Any:
        return await asyncio.to_thread(
            runner.invoke, cli, ["--server", server.address, "--token", token, *args]
        )

    made = await edgefleet("operator-tokens", "create", "--name", "grafana", "--role", "viewer",
                           "--ttl", "90d", "--json")  # fmt: skip
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    assert created["token"]["role"] == "OPERATOR_ROLE_VIEWER"
    listed = await edgefleet("operator-tokens", "ls")
    assert "grafana" in listed.stdout and "viewer" in listed.stdout and "active" in listed.stdout
    refused = await edgefleet("devices", "accept", "x", token=created["secret"])
    assert refused.exit_code == 1
    assert "PERMISSION_DENIED: AcceptDevice needs the operator role" in refused.output
    revoked = await edgefleet("operator-tokens", "revoke", created["token"]["id"][:8])
    assert revoked.exit_code == 0 and "revoked operator token grafana" in revoked.stdout
    listed = await edgefleet("operator-tokens", "ls")
    assert "revoked" in listed.stdout
