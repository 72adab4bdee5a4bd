"""`edgefleet tokens`: enrollment tokens; `edgefleet operator-tokens`: who may
use the operator API, with which role."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import click

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import (
    emit,
    enum_option,
    json_option,
    label_option,
    now,
    parsed,
    pass_env,
)
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.syntax import parse_duration
from edgefleet.v1 import operator_pb2


@click.group()
def tokens() -> None:
    """Enrollment tokens that devices use to join the fleet."""


@tokens.command("create")
@click.option("--name", required=True, help="What the token is for.")
@enum_option(
    "--policy",
    wrapper=operator_pb2.EnrollmentPolicy,
    help="auto-accept: devices get work at once; pending: an operator accepts each "
    "(server default: auto-accept).",
)
@label_option("Label for enrolled devices; repeatable.")
@click.option("--max-uses", type=click.IntRange(min=0), default=0, help="0: unlimited.")
@click.option(
    "--ttl",
    callback=parsed(parse_duration),
    help="Lifetime, e.g. 30m, 24h, 7d (server default: 24h).",
)
@json_option
@pass_env
def tokens_create(
    env: Connection,
    name: str,
    policy: operator_pb2.EnrollmentPolicy.ValueType | None,
    labels: Sequence[tuple[str, str]],
    max_uses: int,
    ttl: timedelta | None,
    as_json: bool,
) -> None:
    """Create an enrollment token; its secret is printed once."""
    request = operator_pb2.CreateEnrollmentTokenRequest(
        name=name,
        policy=policy or operator_pb2.ENROLLMENT_POLICY_UNSPECIFIED,
        labels=dict(labels),
        max_uses=max_uses,
    )
    if ttl is not None:
        request.ttl.FromTimedelta(ttl)
    resp = env.stub.CreateEnrollmentToken(request)
    emit(as_json, resp, lambda: render.token_created(resp))


@tokens.command("ls")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@json_option
@pass_env
def tokens_ls(env: Connection, include_revoked: bool, as_json: bool) -> None:
    """List enrollment tokens."""
    resp = env.stub.ListEnrollmentTokens(
        operator_pb2.ListEnrollmentTokensRequest(include_revoked=include_revoked)
    )
    emit(as_json, resp.tokens, lambda: render.tokens_table(resp.tokens, now()))


@tokens.command("revoke")
@click.argument("token_id", metavar="ID")
@pass_env
def tokens_revoke(env: Connection, token_id: str) -> None:
    """Revoke an enrollment token (its name, ID or a unique prefix of it)."""
    token = env.stub.RevokeEnrollmentToken(operator_pb2.RevokeEnrollmentTokenRequest(id=token_id))
    click.echo(f"revoked token {token.name} ({token.id})")


@click.group("operator-tokens")
def operator_tokens() -> None:
    """Operator tokens: viewer (reads), operator (changes the fleet), admin
    (also manages these tokens)."""


@operator_tokens.command("create")
@click.option("--name", required=True, help="Who or what uses the token.")
@enum_option("--role", wrapper=operator_pb2.OperatorRole, required=True, help="What it may do.")
@click.option(
    "--ttl", callback=parsed(parse_duration), help="Lifetime, e.g. 12h, 90d (default: none)."
)
@json_option
@pass_env
def operator_tokens_create(
    env: Connection, name: str, role: operator_pb2.OperatorRole.ValueType, ttl: timedelta | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Create an operator token; its secret is printed once."""
    request = operator_pb2.CreateOperatorTokenRequest(name=name, role=role)
    if ttl is not None:
        request.ttl.FromTimedelta(ttl)
    resp = env.stub.CreateOperatorToken(request)
    emit(as_json, resp, lambda: render.operator_token_created(resp))


@operator_tokens.command("ls")
@json_option
@pass_env
def operator_tokens_ls(env: Connection, as_json: bool) -> None:
    """List operator tokens, revoked and expired ones too."""
    resp = env.stub.ListOperatorTokens(operator_pb2.ListOperatorTokensRequest())
    emit(as_json, resp.tokens, lambda: render.operator_tokens_table(resp.tokens, now()))


@operator_tokens.command("revoke")
@click.argument("token_id", metavar="ID")
@pass_env
def operator_tokens_revoke(env: Connection, token_id: str) -> None:
    """Revoke an operator token at once (its name, ID or a unique prefix of it)."""
    token = env.stub.RevokeOperatorToken(operator_pb2.RevokeOperatorTokenRequest(id=token_id))
    click.echo(f"revoked operator token {token.name} ({token.id})")
