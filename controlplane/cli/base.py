"""Plumbing shared by the `edgefleet` command modules: the connection
settings object, option helpers, output and error reporting."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import grpc
from google.protobuf.message import Message
from rich.console import Console, RenderableType

from edgefleet.controlplane.cli.convert import (
    enum_choices,
    enum_value,
    parse_label,
    resolve_prefix,
    to_json_dict,
)
from edgefleet.controlplane.client import operator_stub, probe_tls
from edgefleet.v1 import operator_pb2_grpc

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class CliError(click.ClickException):
    """A failure to report as `error: <message>` on stderr, exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def rpc_error_message(err: grpc.RpcError) -> str:
    """`NOT_FOUND: device 'x' not found` from a failed call."""
    if isinstance(err, grpc.Call):
        return f"{err.code().name}: {err.details() or ''}".rstrip(": ")
    return str(err)


def transport_hint(err: grpc.RpcError, env: Env) -> str | None:
    """For a call that found the control plane UNAVAILABLE, what to do when
    the reason is that this client and the server disagree about TLS (gRPC
    says "Socket closed" or quotes OpenSSL); None for every other failure."""
    if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    found = probe_tls(env.server, env.ca_cert)
    if env.ca_cert is None and found.serves_tls:
        return (
            f"the control plane at {env.server} serves TLS and this connection was plain "
            "text: pass its CA certificate (ca.pem in the server's data directory) with "
            "--ca-cert or EDGEFLEET_CA_CERT"
        )
    if env.ca_cert is not None and found.serves_tls is False:
        return (
            f"the control plane at {env.server} does not speak TLS (started with --insecure?) "
            f"and this connection used TLS, trusting {env.ca_cert} (--ca-cert or "
            "EDGEFLEET_CA_CERT): leave that out to connect in plain text"
        )
    if env.ca_cert is not None and found.untrusted:
        fix = (
            "connect by a name or address its certificate names (the server's --tls-name)"
            if "hostname" in found.untrusted.lower()
            else "pass the ca.pem from that server's data directory with --ca-cert"
        )
        return (
            f"the control plane at {env.server} has a certificate that {env.ca_cert} does not "
            f"verify ({found.untrusted}): {fix}"
        )
    return None


class RootGroup(click.Group):
    """Turns RPC and file errors from any command into CliError: a one-line
    message, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as err:
            env = ctx.find_object(Env)
            hint = transport_hint(err, env) if env is not None else None
            raise CliError(hint or rpc_error_message(err)) from None
        except OSError as err:
            where = f": {err.filename}" if err.filename else ""
            raise CliError(f"{err.strerror or err}{where}") from None


@dataclass
class Env:
    """Connection settings; the stub (and its channel) is made on first use."""

    server: str
    token: str | None
    # The control plane's CA certificate: TLS. None: plain text.
    ca_cert: Path | None = None
    _stub: operator_pb2_grpc.OperatorServiceStub | None = field(default=None, repr=False)

    @property
    def stub(self) -> operator_pb2_grpc.OperatorServiceStub:
        if self._stub is None:
            self._stub = operator_stub(self.server, self.token, self.ca_cert)
        return self._stub


pass_env = click.make_pass_decorator(Env)


def parsed(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option callback running a pure parser over the value (or each value
    of a multiple option); its ValueError becomes a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            if isinstance(value, tuple):
                return tuple(parse(v) for v in value)
            return None if value is None else parse(value)
        except ValueError as err:
            raise click.BadParameter(str(err), ctx, param) from None

    return callback


def enum_option(*decls: str, wrapper: Any, **kwargs: Any) -> Callable[[F], F]:
    """An option choosing among an enum's CLI names (`auto-accept`); the
    command receives the enum value."""
    return click.option(
        *decls,
        type=click.Choice(list(enum_choices(wrapper)), case_sensitive=False),
        callback=parsed(lambda text: enum_value(wrapper, text)),
        **kwargs,
    )


def label_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--label",
        "labels",
        multiple=True,
        metavar="KEY=VALUE",
        callback=parsed(parse_label),
        help=help_text,
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def emit(
    as_json: bool, data: Message | Sequence[Message], human: Callable[[], RenderableType]
) -> None:
    """Print `data` as JSON (a list for sequences), or the human rendering."""
    if as_json:
        obj = to_json_dict(data) if isinstance(data, Message) else [to_json_dict(m) for m in data]
        click.echo(json.dumps(obj, indent=2))
    else:
        Console().print(human(), markup=False, highlight=False)


def usage_error(message: str) -> NoReturn:
    raise click.UsageError(message)


def now() -> datetime:
    return datetime.now(UTC)


def call_by_id(
    text: str, call: Callable[[str], T], list_ids: Callable[[], Iterable[str]], what: str
) -> T:
    """`call(text)`; when the server answers NOT_FOUND and `text` is the unique
    prefix of a listed id (tables show short ids), `call(full_id)` instead."""
    try:
        return call(text)
    except grpc.RpcError as err:
        if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        try:
            full = resolve_prefix(text, list_ids(), what)
        except ValueError as ambiguous:
            raise CliError(str(ambiguous)) from None
        if full == text:
            raise
        return call(full)
